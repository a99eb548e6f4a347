"""The client matrix: every client of the README's table, through the proxy to the simulator.

Each client is set up as its README line says, called streamed and not, and must show its
caller the provider's text and usage, while the proxy writes exactly one row for the call
with the same tokens and the cost computed here from the pricing table's rates. Then each
meets an exhausted budget, and must do what the README says it does on a refusal.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import re
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.simulator import Scenario, reply_text
from proxy.simulator import anthropic as sim_anthropic
from proxy.simulator import gemini as sim_gemini
from proxy.simulator import openai as sim_openai
from tests.client_matrix import (
    LATEST,
    MATRIX,
    NODE_DIR,
    PINNED,
    RAW,
    Client,
    ClientFailed,
    Request,
    latest_python,
    node_dir,
    nodeps_dir,
)
from tests.conftest import VIRTUAL_KEY, Stack, http, sha

REFUSED_KEY = "mp-test-refused-429"
REFUSED_402_KEY = "mp-test-refused-402"
_TINY = [{"period": "day", "limit_usd": 0.000001}]
CONFIG = {"keys": [
    {"name": "team-a", "key_sha256": sha(VIRTUAL_KEY)},
    {"name": "broke", "key_sha256": sha(REFUSED_KEY), "budgets": _TINY},
    {"name": "broke-402", "key_sha256": sha(REFUSED_402_KEY), "budgets": _TINY,
     "refusal_status": 402},
]}
PROMPTS = {"openai": sim_openai, "anthropic": sim_anthropic, "gemini": sim_gemini}
IDS = [c.name for c in MATRIX]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    s = Stack(tmp_path_factory.mktemp("clients"), CONFIG)
    yield s
    s.close()


def ready(client: Client) -> None:
    """Skip, with the line that installs it, a client this machine lacks."""
    if client.language == "Python" and LATEST:
        latest_python()  # the newest clients' venv has every one of them
    elif client.language == "Node":
        try:
            node_dir()
        except FileNotFoundError as exc:
            pytest.skip(f"node and npm are needed: {exc}")
    elif client.name == "instructor":
        nodeps_dir()
    elif client.package:
        try:
            importlib.metadata.version(client.package)
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"{client.package} is not installed: pip install -e '.[test]'")


def expected_text(provider: str, body: bytes) -> str:
    """The answer the simulator wrote for the request it received."""
    prompt = PROMPTS[provider]._prompt(orjson.loads(body))
    return reply_text(prompt[0] if isinstance(prompt, tuple) else prompt)


def expected_cost(stack: Stack, provider: str, model: str, tokens_in: int,
                  tokens_out: int) -> Decimal:
    """Tokens times the table's rates, computed here rather than by the engine."""
    price = stack.runtime.prices.lookup(provider, [model], datetime.now(UTC))
    assert price is not None
    total = tokens_in * price.rates.input + tokens_out * price.rates.output
    return (total / Decimal(1_000_000)).quantize(Decimal("1e-10"))


def calls_since(stack: Stack, before: int, calls: int) -> list[dict[str, Any]]:
    """The rows after the first `before`, once they stand for `calls` calls."""
    deadline = time.monotonic() + 15
    while True:
        rows = stack.rows()[before:]
        if sum(r["repeat_count"] for r in rows) >= calls or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("client", MATRIX, ids=IDS)
def test_client_sees_answer_and_usage_and_one_exact_row(stack: Stack, client: Client,
                                                        stream: bool) -> None:
    """Text and usage reach the client; one row has the same tokens, exact cost and tags."""
    ready(client)
    feature = "matrix-" + "".join(ch if ch.isalnum() else "-" for ch in client.name)
    before = len(stack.rows())
    received = len(stack.sim.received)
    if client.name == "instructor":  # it parses a JSON answer: let the model give one
        stack.sim.then(Scenario(text=json.dumps({"greeting": "hello from the matrix"})))
    answer = client.run(Request(stack.url, VIRTUAL_KEY, stream, f"Greet the {client.name} "
                                "user", {"X-Meter-Customer": "acme", "X-Meter-Feature": feature}))

    rows = stack.rows(before + 1)[before:]
    assert len(rows) == 1, rows
    assert len(stack.sim.received) == received + 1
    sent = stack.sim.received[-1]
    if client.name == "instructor":
        assert answer.text == "hello from the matrix"
    else:
        assert answer.text == expected_text(client.provider, sent.body)
    row = rows[0]
    assert (row["provider"], row["key_name"], row["status"], row["outcome"]) == (
        client.provider, "team-a", 200, "ok")
    assert (row["customer"], row["feature"], row["stream"]) == ("acme", feature, int(stream))
    assert "x-meter-customer" not in {k.lower() for k in sent.headers}
    assert row["usage_source"] == "provider" and row["input_tokens"] > 0
    if not stream or client.usage_streamed:
        assert (answer.input_tokens, answer.output_tokens) == (row["input_tokens"],
                                                               row["output_tokens"])
    cost = expected_cost(stack, client.provider, row["model"], row["input_tokens"],
                         row["output_tokens"])
    assert Decimal(str(row["cost_usd"])) == cost and cost > 0


@pytest.mark.parametrize("client", MATRIX, ids=IDS)
def test_client_on_a_budget_refusal(stack: Stack, client: Client) -> None:
    """An exhausted budget: the client raises what the README says after as many attempts."""
    ready(client)
    before = len(stack.rows())
    received = len(stack.sim.received)
    with pytest.raises(ClientFailed) as caught:
        client.run(Request(stack.url, REFUSED_KEY, False, "Refuse me",
                           {"X-Meter-Customer": "acme"}))
    assert client.raises in caught.value.name
    rows = calls_since(stack, before, client.attempts_on_429)
    assert len(stack.sim.received) == received  # nothing was forwarded
    # Attempts within a second of the first are one row (repeat_count); later ones are not.
    assert sum(r["repeat_count"] for r in rows) == client.attempts_on_429, rows
    assert {(r["status"], r["outcome"], r["key_name"], r["customer"]) for r in rows} == {
        (429, "budget_exceeded", "broke", "acme")}


@pytest.mark.parametrize("client", [c for c in MATRIX if c.attempts_on_429 > 1],
                         ids=[c.name for c in MATRIX if c.attempts_on_429 > 1])
def test_client_that_retries_429_stops_at_402(stack: Stack, client: Client) -> None:
    """With refusal_status 402 a client that retries every 429 gives up at once."""
    ready(client)
    before = len(stack.rows())
    with pytest.raises(ClientFailed) as caught:
        client.run(Request(stack.url, REFUSED_402_KEY, False, "Refuse me", {}))
    assert caught.value.status == 402
    rows = calls_since(stack, before, 1)
    assert [(r["status"], r["outcome"], r["repeat_count"]) for r in rows] == [
        (402, "budget_exceeded", 1)]


@pytest.mark.skipif(LATEST, reason="METERPROXY_CLIENTS_LATEST runs the newest clients")
def test_python_clients_are_the_pinned_versions() -> None:
    """The Python clients the matrix imports are the versions pyproject.toml pins."""
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    pins = dict(re.findall(r'"([a-z0-9-]+)(?:\[[a-z,]+\])?==([0-9.]+)"', pyproject))
    pins.update(re.findall(r"^([a-z0-9-]+)==([0-9.]+)$", (Path(__file__).parent / "clients"
                                                        / "requirements-nodeps.txt").read_text(),
                           re.MULTILINE))
    named = {c.package for c in MATRIX if c.language == "Python"}
    assert named - {"openai", "anthropic", "google-genai"} <= set(pins), pins
    nodeps = str(nodeps_dir())
    for package, version in pins.items():
        if package == "instructor":
            found = importlib.metadata.distributions(path=[nodeps])
            assert {d.version for d in found if d.metadata["Name"] == package} == {version}
        else:
            assert importlib.metadata.version(package) == version, package


@pytest.mark.skipif(LATEST, reason="METERPROXY_CLIENTS_LATEST runs the newest clients")
def test_node_clients_install_from_the_lockfile() -> None:
    """The Node clients come from tests/clients/package-lock.json at its pinned versions."""
    ready(next(c for c in MATRIX if c.language == "Node"))
    lock = json.loads((Path(__file__).parent / "clients" / "package-lock.json").read_text())
    pinned = json.loads((Path(__file__).parent / "clients" / "package.json").read_text())
    for name, version in pinned["dependencies"].items():
        installed = json.loads((node_dir() / "node_modules" / name / "package.json").read_text())
        assert installed["version"] == version == lock["packages"][f"node_modules/{name}"][
            "version"]


def test_litellm_gemini_without_version_is_told_the_base_url(stack: Stack) -> None:
    """litellm's Gemini route set to …/gemini (it then calls /gemini/models/…) gets a 400
    naming …/gemini/v1beta, and the row keeps the model and method it asked for."""
    litellm = next(c for c in MATRIX if c.name == "litellm (gemini)")
    ready(litellm)
    import tests.client_matrix as matrix

    before, received = len(stack.rows()), len(stack.sim.received)
    bases = matrix.LITELLM_BASE
    matrix.LITELLM_BASE = {**bases, "gemini": "/gemini"}
    try:
        with pytest.raises(ClientFailed) as caught:  # in this process, which reads the base
            PINNED[litellm.name](Request(stack.url, VIRTUAL_KEY, False, "Where am I",
                                         {"X-Meter-Customer": "acme", "X-Meter-Feature": "lost"}))
    finally:
        matrix.LITELLM_BASE = bases
    assert caught.value.status == 400
    assert f"{stack.url}/gemini/v1beta" in str(caught.value)
    assert len(stack.sim.received) == received
    [row] = stack.rows(before + 1)[before:]
    assert (row["status"], row["outcome"], row["endpoint"], row["model"]) == (
        400, "rejected", "generateContent", "gemini-2.5-flash")
    assert (row["key_name"], row["customer"], row["feature"]) == ("team-a", "acme", "lost")


@pytest.mark.parametrize(("path", "headers", "shape"), [
    ("/anthropic/messages", {"x-api-key": VIRTUAL_KEY}, "anthropic"),
    ("/gemini/models/gemini-2.5-flash:generateContent", {"x-goog-api-key": VIRTUAL_KEY},
     "gemini"),
])
def test_unversioned_provider_path_is_a_400_naming_the_base_url(stack: Stack, path: str,
                                                                headers: dict[str, str],
                                                                shape: str) -> None:
    """A path the provider's API cannot have is not forwarded into a 404 but explained."""
    received = len(stack.sim.received)
    body = json.dumps({"model": "claude-haiku-4-5", "max_tokens": 5, "messages": [],
                       "contents": []}).encode()
    reply = http("POST", stack.url + path, body, {**headers, "Content-Type": "application/json"})
    assert reply.status_code == 400 and len(stack.sim.received) == received
    error = reply.json()["error"]
    message = error["message"]
    assert f"{stack.url}/{path.split('/')[1]}" in message
    assert error["type" if shape == "anthropic" else "status"] == (
        "invalid_request_error" if shape == "anthropic" else "INVALID_ARGUMENT")


def test_rejected_call_row_keeps_what_was_readable(stack: Stack) -> None:
    """A call refused for a bad header keeps its endpoint, model, customer and feature."""
    before = len(stack.rows())
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user",
                                                             "content": "hi"}]}).encode()
    reply = http("POST", f"{stack.url}/openai/v1/chat/completions", body,
                 {"Authorization": f"Bearer {VIRTUAL_KEY}", "Content-Type": "application/json",
                  "X-Meter-Customer": "acme", "X-Meter-Feature": "search",
                  "X-Meter-Colour": "blue"})
    assert reply.status_code == 400 and "X-Meter-Colour" in reply.json()["error"]["message"]
    [row] = stack.rows(before + 1)[before:]
    assert (row["status"], row["outcome"], row["key_name"], row["endpoint"], row["model"],
            row["customer"], row["feature"]) == (400, "rejected", "team-a", "chat.completions",
                                                 "gpt-4o-mini", "acme", "search")
    # A caller with a key the proxy does not know cannot put a customer's name in the log.
    reply = http("POST", f"{stack.url}/openai/v1/chat/completions", body,
                 {"Authorization": "Bearer mp-not-a-key", "X-Meter-Customer": "acme"})
    assert reply.status_code == 401
    assert all(r["customer"] is None for r in stack.rows() if r["key_name"] is None)


def test_curl_gzip_body_and_helicone_headers(stack: Stack, tmp_path: Path) -> None:
    """curl sending a gzip body (as `--data-binary @body.json.gz -H "Content-Encoding:
    gzip"`) and a Helicone set-up's headers: the provider receives the gzip bytes with
    their Content-Encoding, which decode to the body sent, and no Helicone-* header; the
    answer and the row are as for a plain call."""
    import gzip
    import subprocess

    body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 256, "messages": [
        {"role": "user", "content": "Greet the gzip user"}]}).encode()
    packed = tmp_path / "body.json.gz"
    packed.write_bytes(gzip.compress(body))
    before, received = len(stack.rows()), len(stack.sim.received)
    out = subprocess.run(
        ["curl", "-sS", "--fail-with-body", f"{stack.url}/openai/v1/chat/completions",
         "--data-binary", f"@{packed}", "-H", f"Authorization: Bearer {VIRTUAL_KEY}",
         "-H", "Content-Type: application/json", "-H", "Content-Encoding: gzip",
         "-H", "Helicone-Auth: Bearer sk-helicone-secret", "-H", "Helicone-Cache-Enabled: true",
         "-H", "X-Meter-Customer: acme"], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    answer = json.loads(out.stdout)
    assert len(stack.sim.received) == received + 1
    sent = stack.sim.received[-1]
    names = {k.lower(): v for k, v in sent.headers.items()}
    assert names.get("content-encoding") == "gzip"
    assert sent.body == body  # the simulator un-gzipped exactly what curl sent
    assert not [n for n in names if n.startswith("helicone-")], sorted(names)
    assert answer["choices"][0]["message"]["content"] == expected_text("openai", body)
    [row] = stack.rows(before + 1)[before:]
    assert (row["key_name"], row["outcome"], row["customer"], row["input_tokens"],
            row["output_tokens"]) == ("team-a", "ok", "acme", answer["usage"]["prompt_tokens"],
                                      answer["usage"]["completion_tokens"])
    assert "helicone" not in (row["tags"] or "").lower()


def test_langchain_chatopenai_without_stream_usage_still_logs_usage(stack: Stack) -> None:
    """ChatOpenAI with a custom base_url and no stream_usage streams its caller no usage;
    the proxy asks the provider for it anyway, so the row has the exact tokens."""
    ready(next(c for c in MATRIX if c.name == "langchain-openai"))
    from langchain_openai import ChatOpenAI

    before = len(stack.rows())
    model = ChatOpenAI(model="gpt-4o-mini", base_url=f"{stack.url}/openai/v1",
                       api_key=VIRTUAL_KEY, max_retries=0)
    message = None
    for chunk in model.stream("Greet the quiet user"):
        message = chunk if message is None else message + chunk
    assert message is not None and not message.usage_metadata
    sent = orjson.loads(stack.sim.received[-1].body)
    assert sent["stream_options"] == {"include_usage": True}  # the proxy asked for it
    [row] = stack.rows(before + 1)[before:]
    assert message.text == expected_text("openai", stack.sim.received[-1].body)
    assert (row["outcome"], row["stream"], row["usage_source"]) == ("ok", 1, "provider")
    assert row["input_tokens"] > 0 and row["output_tokens"] > 0
    assert Decimal(str(row["cost_usd"])) == expected_cost(
        stack, "openai", "gpt-4o-mini", row["input_tokens"], row["output_tokens"])


@pytest.mark.parametrize("client", MATRIX, ids=IDS)
def test_each_client_is_set_up_with_the_base_url_the_readme_gives(client: Client) -> None:
    """The base the matrix declares for a client (test_docs holds the README to it) is the
    one its driver really sets: in the Python function or in tests/clients/drive.mjs."""
    if client.language == "Node":
        assert f"`${{proxy}}{client.base}`" in (NODE_DIR / "drive.mjs").read_text()
    elif client.name.startswith(("litellm", "curl")):
        assert client.base  # read from the driver's own table (LITELLM_BASE, _CURL)
    else:
        assert f'{{req.proxy}}{client.base}"' in inspect.getsource(RAW[client.name])
