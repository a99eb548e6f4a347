"""The bundled pricing tables: well formed, complete, and in agreement with genai-prices."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

from proxy.dialects import builtin_providers
from proxy.pricing import PriceBook
from proxy.pricing_check import check, diff_against_genai_prices, parse_exceptions

TABLES = Path(__file__).resolve().parent.parent / "pricing"

BROKEN = """\
provider: acme
source: https://example.com/pricing
models:
  big:
    checked: 2026-01-01
    aliases: [big-2025, small]
    prices:
      - effective_from: 2025-01-01
        effective_until: 2025-08-01
        input: 1
        output: 2
      - effective_from: 2025-06-01
        input: 1
      - effective_from: 2025-06-01
        input: 1
        output: 2
        tiers:
          - {above_input_tokens: 0, multiplier: 2}
        service_tiers:
          batch: {multiplier: -0.5}
  small:
    aliases: [big-2025]
    prices:
      - effective_from: 2025-01-01
        output: 1
  tiny:
    checked: 2026-01-01
    prices:
      - {effective_from: 2025-01-01, input: 1, output: 1}
  tiny:
    checked: 2026-01-01
    prices:
      - {effective_from: 2025-02-01, input: 2, output: 2}
"""


def test_bundled_tables_pass_every_check() -> None:
    """check() finds no problem in the tables that ship with the proxy."""
    assert [str(p) for p in check()] == []
    assert [str(p) for p in check(TABLES)] == []


def test_bundled_tables_are_the_repository_tables() -> None:
    """The installed proxy.tables package reads the same files as pricing/ in the repo."""
    bundled = {e.name for e in resources.files("proxy.tables").iterdir()
               if e.name.endswith(".yaml")}
    assert bundled == {p.name for p in TABLES.glob("*.yaml")}
    assert PriceBook.load().digest == PriceBook.load(TABLES).digest


def test_tables_cover_the_builtin_providers_with_enough_models() -> None:
    """Every table is named after a built-in provider, and together they price 60+ models."""
    book = PriceBook.load()
    assert set(book.tables) <= set(builtin_providers())
    assert set(builtin_providers()) - set(book.tables) <= {"openrouter"}
    assert sum(len(models) for models in book.tables.values()) >= 60
    assert all(len(models) >= 5 for models in book.tables.values())


def test_check_reports_each_problem_of_a_broken_table(tmp_path) -> None:
    """A table with overlaps, gaps in prices, bad names and duplicates gets one line each."""
    (tmp_path / "broken.yaml").write_text(BROKEN)
    problems = "\n".join(str(p) for p in check(tmp_path))
    for expected in [
        "broken.yaml: models.tiny: duplicate key",
        "broken.yaml: provider: must be 'broken'",
        "broken.yaml: models.small: needs a checked:",
        "runs until 2025-08-01, after the next one starts",
        "two periods start on 2025-06-01",
        "has no output price",
        "models.small: period from 2025-01-01 has no input price",
        "service tier batch has a negative multiplier",
        "a tier needs above_input_tokens greater than 0",
        "models.big.aliases: small is the name of small",
        "models.small.aliases: big-2025 is also an alias of big",
    ]:
        assert expected in problems, f"{expected!r} not reported in:\n{problems}"


def test_check_reports_schema_errors_with_their_key_path(tmp_path) -> None:
    """A table the parser refuses is one problem naming the file and the bad key."""
    (tmp_path / "openai.yaml").write_text(
        "provider: openai\nsource: s\nchecked: 2026-01-01\nmodels:\n"
        "  m:\n    prices:\n      - {effective_from: 2025-01-01, input: -1, output: 1}\n")
    (tmp_path / "gemini.yaml").write_text("provider: gemini\nmodels:\n  m: {pricez: []}\n")
    problems = [str(p) for p in check(tmp_path)]
    assert problems == [
        "gemini.yaml: models.m: unknown key 'pricez'",
        "openai.yaml: models.m.prices[0].input: a price cannot be negative",
    ]


def test_every_shared_price_agrees_with_genai_prices_or_is_a_listed_exception() -> None:
    """Each rate genai-prices also knows is equal, or listed with a reason in EXCEPTIONS.md."""
    kept = parse_exceptions((TABLES / "EXCEPTIONS.md").read_text(encoding="utf-8"))
    assert kept and all(reason for reason in kept.values()), "every exception needs a reason"
    found = {d.key: str(d) for d in diff_against_genai_prices(PriceBook.load())}
    unlisted = sorted(text for key, text in found.items() if key not in kept)
    stale = sorted(key for key in kept if key not in found)
    assert unlisted == [], "disagreements not in EXCEPTIONS.md:\n" + "\n".join(unlisted)
    assert stale == [], "EXCEPTIONS.md lines the diff no longer finds:\n" + "\n".join(stale)


def copy_tables(into: Path) -> None:
    for path in TABLES.glob("*.yaml"):
        shutil.copy(path, into / path.name)


def test_diff_notices_a_changed_price(tmp_path) -> None:
    """Editing one rate in a copy of the tables makes the diff report exactly that rate."""
    copy_tables(tmp_path)
    table = tmp_path / "openai.yaml"
    text = table.read_text()
    assert text.index("        input: 0.15\n") > text.index("  gpt-4o-mini:\n")
    table.write_text(text.replace("        input: 0.15\n", "        input: 0.16\n", 1))
    before = {d.key for d in diff_against_genai_prices(PriceBook.load(TABLES))}
    after = {d.key for d in diff_against_genai_prices(PriceBook.load(tmp_path))}
    assert after - before == {"openai/gpt-4o-mini@2024-07-18 input"}


def test_diff_notices_a_missing_batch_price(tmp_path) -> None:
    """Dropping batch prices genai-prices knows shows up as batch disagreements."""
    copy_tables(tmp_path)
    table = tmp_path / "anthropic.yaml"
    table.write_text(table.read_text().replace("          batch: {multiplier: 0.5}\n", ""))
    as_of = datetime(2026, 11, 1, tzinfo=UTC)
    before = {d.key for d in diff_against_genai_prices(PriceBook.load(TABLES), as_of)}
    after = {d.key for d in diff_against_genai_prices(PriceBook.load(tmp_path), as_of)}
    assert {"anthropic/claude-haiku-4-5@2025-10-15 batch.input",
            "anthropic/claude-sonnet-4-5@2025-09-29 batch.output>200000",
            "anthropic/claude-opus-4-5@2025-11-24 batch.cached_input"} <= after - before
