"""The meterproxy command: serve, usage, explain, keys and pricing against real files."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import openai
import pytest
import yaml

from proxy.cli import main
from tests.conftest import PROVIDER_KEY, Stack, free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def logged(stack: Stack) -> Stack:
    """A usage log with calls from two customers and two features."""
    client = openai.OpenAI(base_url=stack.base(), api_key="mp-test-virtual-key-0001",
                           max_retries=0)
    for customer, feature, n in (("acme", "search", 3), ("globex", "chat", 2)):
        for i in range(n):
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"q{i}"}],
                extra_headers={"X-Meter-Customer": customer, "X-Meter-Feature": feature,
                               "X-Meter-Tag-Env": "prod" if i else "dev"})
    stack.rows(5)
    return stack


def config_file(stack: Stack, tmp_path: Path) -> str:
    path = tmp_path / "meterproxy.yaml"
    path.write_text(yaml.safe_dump({"storage": {"usage_log": f"sqlite:///{stack.db}"}}))
    return str(path)


def test_usage_json_groups_and_sums_exactly(logged: Stack, tmp_path: Path, capsys) -> None:
    """usage --format json: one object per group with calls, tokens and the exact cost."""
    assert main(["usage", "--config", config_file(logged, tmp_path), "--group-by",
                 "customer,feature", "--format", "json"]) == 0
    groups = {(g["customer"], g["feature"]): g for g in json.loads(capsys.readouterr().out)}
    rows = logged.rows()
    for key in (("acme", "search"), ("globex", "chat")):
        mine = [r for r in rows if (r["customer"], r["feature"]) == key]
        assert groups[key]["calls"] == len(mine)
        assert groups[key]["input_tokens"] == sum(r["input_tokens"] for r in mine)
        assert Decimal(str(groups[key]["cost_usd"])) == sum(
            Decimal(str(r["cost_usd"])) for r in mine)
        assert set(groups[key]) >= {"calls", "input_tokens", "cached_input_tokens",
                                    "cache_write_tokens", "output_tokens",
                                    "reasoning_tokens", "cost_usd"}


def test_usage_where_tag_and_table(logged: Stack, tmp_path: Path, capsys) -> None:
    """--where on a tag filters; the table format is aligned with a header rule."""
    assert main(["usage", "--config", config_file(logged, tmp_path), "--group-by",
                 "tag:env", "--where", "customer=acme"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["tag:env", "calls"]
    assert set(lines[1]) <= {"-", " "}
    counts = {line.split()[0]: int(line.split()[1]) for line in lines[2:]}
    assert counts == {"prod": 2, "dev": 1}


def test_usage_csv_and_bad_group(logged: Stack, tmp_path: Path, capsys) -> None:
    """CSV has a header row; an unknown group-by is a one-line error, exit 2."""
    conf = config_file(logged, tmp_path)
    assert main(["usage", "--config", conf, "--group-by", "model", "--format", "csv"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("model,calls,")
    assert main(["usage", "--config", conf, "--group-by", "colour"]) == 2
    assert "cannot group or filter by 'colour'" in capsys.readouterr().err


def test_explain_shows_each_class_times_rate(logged: Stack, tmp_path: Path, capsys) -> None:
    """explain ID prints the row, the price period and each token class x rate."""
    row = logged.rows()[-1]
    assert main(["explain", row["id"], "--config", config_file(logged, tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"priced by {row['pricing_version']}" in out
    assert re.search(rf"input\s+{row['input_tokens']} tokens x \$0\.15/1M", out)
    assert re.search(rf"output\s+{row['output_tokens']} tokens x \$0\.6/1M", out)
    # the exact amount, never the float's exponent form ($1.875e-05)
    assert f"= ${Decimal(str(row['cost_usd'])):f}\n" in out and "e-0" not in out


def test_keys_new_prints_key_and_its_hash(capsys) -> None:
    """keys new prints a fresh key once and the config line with its sha256."""
    assert main(["keys", "new", "search-team"]) == 0
    out = capsys.readouterr().out
    key = re.search(r"(mp-\S+)", out).group(1)
    assert hashlib.sha256(key.encode()).hexdigest() in out
    assert '{name: "search-team", key_sha256:' in out


def test_pricing_show_json(capsys) -> None:
    """pricing show --format json has the contract's keys, per 1M tokens."""
    assert main(["pricing", "show", "o3", "--at", "2025-06-01", "--format", "json"]) == 0
    before = json.loads(capsys.readouterr().out)
    assert main(["pricing", "show", "o3", "--at", "2025-06-10", "--format", "json"]) == 0
    after = json.loads(capsys.readouterr().out)
    assert (before["input"], before["output"]) == ("10", "40")
    assert (after["input"], after["output"]) == ("2", "8")
    assert {"provider", "model", "effective_from", "input", "cached_input", "cache_write_5m",
            "cache_write_1h", "output"} <= set(after)


def test_serve_meters_a_call_and_stops_cleanly(tmp_path: Path) -> None:
    """`meterproxy serve` as a process: a call goes through, SIGTERM flushes its row."""
    from proxy.simulator import Simulator  # noqa: F401 - the stack below provides one

    stack = Stack(tmp_path / "sim")
    port = free_port()
    db = tmp_path / "served.db"
    key = "mp-serve-test"
    conf = tmp_path / "meterproxy.yaml"
    conf.write_text(yaml.safe_dump({
        "storage": {"usage_log": f"sqlite:///{db}"},
        "providers": {"openai": {"base_url": stack.sim_url}},
        "keys": [{"name": "cli", "key_sha256": hashlib.sha256(key.encode()).hexdigest()}],
    }))
    env = {**os.environ, "OPENAI_API_KEY": PROVIDER_KEY}
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--config", str(conf),
                             "--port", str(port)], env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/openai/v1", api_key=key,
                               max_retries=0)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.chat.completions.create(model="gpt-4o-mini",
                                               messages=[{"role": "user", "content": "hi"}])
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        stack.close()
    logs = proc.stderr.read().decode()
    assert PROVIDER_KEY not in logs and key not in logs
    import sqlite3

    rows = sqlite3.connect(db).execute(
        "SELECT key_name, outcome, input_tokens, output_tokens FROM usage").fetchall()
    assert [r[:2] for r in rows] == [("cli", "ok")]
    # Every stderr line is one JSON event; exactly one says the call, with the row's numbers.
    events = [json.loads(line) for line in logs.splitlines() if line.strip()]
    calls = [e for e in events if e["event"] == "call"]
    assert len(calls) == 1, events
    assert (calls[0]["key"], calls[0]["provider"], calls[0]["model"], calls[0]["status"],
            calls[0]["outcome"], calls[0]["input_tokens"], calls[0]["output_tokens"]) == (
        "cli", "openai", "gpt-4o-mini", 200, "ok", rows[0][2], rows[0][3])
