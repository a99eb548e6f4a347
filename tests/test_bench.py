"""A smoke run of the load benchmark: every dialect, JSON and streams, through real processes.

`bench.loadgen` starts the fake provider, the bare pass-through and `meterproxy serve`
on loopback and drives each dialect through each for a fraction of a second. No timing
is asserted (timing belongs to the benchmark itself); what is asserted is that the
benchmark measured what it says: every cell ran without errors, and meterproxy's usage
log holds one row per call it was sent, priced to the cent fraction from the fake
provider's usage and attributed to the headers the load generator sent.
"""

from __future__ import annotations

import json
import sqlite3
from decimal import Decimal
from pathlib import Path

import pytest

from bench import loadgen
from tests.expected import row_cost

# The fake provider reports 31 prompt tokens and 20 output tokens (one per content
# chunk, --chunks 20) in every dialect. Prices per million tokens from the providers'
# pricing pages: gpt-4o-mini $0.15 in / $0.60 out; Claude Haiku 4.5 $1 / $5; Gemini
# 2.5 Flash $0.30 / $2.50.
EXPECTED = {
    # 31 x 0.15 + 20 x 0.60 = 4.65 + 12.00 = 16.65 micro-dollars
    "openai": ("chat.completions", "gpt-4o-mini", Decimal("0.00001665")),
    # 31 x 1 + 20 x 5 = 31 + 100 = 131 micro-dollars
    "anthropic": ("messages", "claude-haiku-4-5", Decimal("0.000131")),
    # 31 x 0.30 + 20 x 2.50 = 9.3 + 50 = 59.3 micro-dollars
    "gemini": (None, "gemini-2.5-flash", Decimal("0.0000593")),
}
GEMINI_ENDPOINTS = {0: "generateContent", 1: "streamGenerateContent"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    work = tmp_path_factory.mktemp("loadgen")
    args = loadgen.parse_args([
        "--dialects", "openai,anthropic,gemini", "--duration", "0.2", "--rounds", "1",
        "--concurrency", "1,4", "--warmup", "0", "--settle", "0.05", "--no-litellm",
        "--out", str(work / "loadgen.json"), "--plot", "", "--workdir", str(work / "procs")])
    return loadgen.bench(args), work


def test_every_dialect_mode_and_target_was_measured(run: tuple[dict, Path]) -> None:
    results, work = run
    cells = {(s["dialect"], s["mode"], s["concurrency"], s["target"]): s
             for s in results["samples"]}
    wanted = {(d, m, c, t) for d in ("openai", "anthropic", "gemini")
              for m in ("json", "stream") for c in (1, 4)
              for t in ("direct", "passthrough", "meterproxy")}
    assert set(cells) == wanted
    assert all(s["calls"] > 0 and s["errors"] == 0 for s in cells.values())
    assert results["skipped"] == {"litellm": "--no-litellm"}
    # What was written is what the docs are made from: the JSON and its markdown.
    assert json.loads((work / "loadgen.json").read_text())["settings"]["dialects"] == [
        "openai", "anthropic", "gemini"]
    md = (work / "loadgen.md").read_text()
    for title in ("OpenAI chat completions", "Anthropic messages", "Gemini generateContent"):
        assert f"### {title}" in md


def test_meterproxy_logged_one_priced_attributed_row_per_call(run: tuple[dict, Path]) -> None:
    results, work = run
    conn = sqlite3.connect(work / "procs" / "usage.db")
    conn.row_factory = sqlite3.Row
    rows = [dict(r) for r in conn.execute("SELECT * FROM usage")]
    conn.close()
    for dialect, (endpoint, model, cost) in EXPECTED.items():
        mine = [r for r in rows if r["provider"] == dialect]
        sent = results["usage_log"][dialect]["calls_sent"]
        assert sent > 0 and len(mine) == sent, dialect
        assert results["usage_log"][dialect] == {"calls_sent": sent, "rows": sent,
                                                 "priced": sent, "attributed": sent}
        assert {r["stream"] for r in mine} == {0, 1}
        for r in mine:
            assert (r["model"], r["status"], r["outcome"], r["key_name"]) == (
                model, 200, "ok", "bench"), r
            assert r["endpoint"] == (endpoint or GEMINI_ENDPOINTS[r["stream"]])
            assert (r["input_tokens"], r["output_tokens"]) == (31, 20)
            assert row_cost(r) == cost
            assert r["customer"] in {f"customer-{i}" for i in range(8)}
            assert r["feature"] == ("bench-stream" if r["stream"] else "bench-json")
            assert json.loads(r["tags"]) == {"team": "bench", "env": "bench"}
    assert len(rows) == sum(v["calls_sent"] for v in results["usage_log"].values())


def test_verdicts_judge_each_dialect_against_issue_18(run: tuple[dict, Path]) -> None:
    """Throughput is judged at 8 and 32 only (not run here); CPU in every cell; latency
    and time to first byte at concurrency 1."""
    results, _ = run
    judged = {(v["dialect"], v["mode"], v["concurrency"], v["target"])
              for v in results["verdicts"]}
    for dialect in ("openai", "anthropic", "gemini"):
        assert {(m, c, t) for d, m, c, t in judged if d == dialect} == {
            ("json", 1, "cpu"), ("json", 1, "p50"), ("json", 4, "cpu"),
            ("stream", 1, "cpu"), ("stream", 1, "p50"), ("stream", 1, "ttfb"),
            ("stream", 4, "cpu")}
