"""Tables that stay current: coverage against genai-prices, sync, overlays, fine-tunes,
and today's models priced as genai-prices (an independent calculator) prices them."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import genai_prices
import pytest
import yaml

from proxy.cli import main
from proxy.pricing import PriceBook, cost
from proxy.pricing.sync import coverage_gaps, sync, write
from proxy.usage import Usage

AT = datetime(2026, 12, 1, 12, tzinfo=UTC)
GENAI_IDS = {"openai": "openai", "anthropic": "anthropic", "gemini": "google"}


@pytest.fixture(scope="module")
def book() -> PriceBook:
    return PriceBook.load()


def genai(model: str, table: str, *, context: dict | None = None, **counts: int) -> Decimal:
    """What genai-prices bills (its input counts include cache reads and writes)."""
    return genai_prices.calc_price(
        genai_prices.Usage(**counts), model, provider_id=GENAI_IDS[table],
        genai_request_timestamp=AT, price_context=context).total_price


def ours(book: PriceBook, table: str, model: str, usage: Usage) -> Decimal:
    price = book.lookup(table, [model], AT)
    assert price is not None, f"{table}/{model} has no price"
    return cost(usage, price, AT).total


def test_coverage_is_clean(capsys) -> None:
    """`pricing check --coverage` passes on the bundled tables: every model genai-prices
    prices for a routed provider is priced here or skipped by a documented rule."""
    assert main(["pricing", "check", "--coverage"]) == 0
    assert "0 problem(s)" in capsys.readouterr().out


def test_coverage_fails_for_a_missing_model(book: PriceBook) -> None:
    """Without claude-sonnet-5 the coverage check names it."""
    tables = {t: dict(models) for t, models in book.tables.items()}
    del tables["anthropic"]["claude-sonnet-5"]
    assert coverage_gaps(PriceBook(tables, "test"), {}) == ["anthropic/claude-sonnet-5"]
    assert coverage_gaps(PriceBook(tables, "test"),
                         {"anthropic/claude-sonnet-5 missing": "why"}) == []


def test_sync_writes_a_missing_model_into_an_overlay(book: PriceBook, tmp_path: Path) -> None:
    """Sync adds what the tables lack to an overlay file without touching what is there;
    the overlay sits on top of the bundled tables and prices the model like genai-prices."""
    tables = {t: dict(models) for t, models in book.tables.items()}
    del tables["anthropic"]["claude-haiku-5-5"]
    report = sync(PriceBook(tables, "test"), provider="anthropic", today=AT.date())
    assert report.added == ["anthropic/claude-haiku-5-5 (genai-prices gives no start date "
                            "for the first price; applied from 2023-01-01)"]
    overlay = tmp_path / "anthropic.yaml"
    mine = ("provider: anthropic\nsource: https://example.com/contract\nchecked: 2026-12-01\n"
            "models:\n  acme-private-model:\n    prices:\n      - effective_from: 2026-01-01\n"
            "        input: 1\n        output: 2\n")
    overlay.write_text(mine)
    write(report, tmp_path)
    text = overlay.read_text()
    assert text.startswith(mine)  # nothing existing rewritten
    assert yaml.safe_load(text)["models"]["claude-haiku-5-5"]["prices"]
    layered = PriceBook.load(tmp_path)
    assert layered.lookup("anthropic", ["acme-private-model"], AT) is not None
    assert layered.lookup("openai", ["gpt-4o"], AT) is not None  # bundled tables stay
    usage = Usage(input_tokens=120_000, output_tokens=2_000)
    assert ours(layered, "anthropic", "claude-haiku-5-5", usage) == \
        genai("claude-haiku-5-5", "anthropic", input_tokens=120_000, output_tokens=2_000)


def test_sync_has_nothing_left_to_add(book: PriceBook) -> None:
    """The bundled tables were refreshed with sync: a second run adds nothing."""
    assert sync(book, today=AT.date()).added == []


@pytest.mark.parametrize(("table", "model"), [
    ("anthropic", "claude-sonnet-4-6"), ("anthropic", "claude-opus-4-6"),
    ("anthropic", "claude-opus-4-8"), ("anthropic", "claude-sonnet-5"),
    ("anthropic", "claude-opus-5-5"), ("anthropic", "claude-haiku-5-5"),
    ("gemini", "gemini-3.5-flash"), ("gemini", "gemini-3.6-flash"),
    ("gemini", "gemini-3.1-pro-preview"), ("gemini", "gemini-4-argon"),
    ("openai", "gpt-6-astra"), ("openai", "gpt-6.1-sol"), ("openai", "gpt-6.1-terra"),
])
@pytest.mark.parametrize("prompt", [8_000, 150_000, 300_000])
def test_todays_models_priced_like_genai_prices(book: PriceBook, table: str, model: str,
                                                prompt: int) -> None:
    """The models the issue found unpriced cost what genai-prices says, at every prompt
    size (long-context rules included), with cache reads, writes and output."""
    cached, written, out = prompt // 4, prompt // 8, 3_000
    usage = Usage(input_tokens=prompt - cached - written, cached_input_tokens=cached,
                  cache_write_tokens=written, output_tokens=out)
    expected = genai(model, table, input_tokens=prompt, cache_read_tokens=cached,
                     cache_write_tokens=written, output_tokens=out)
    assert ours(book, table, model, usage) == expected


def test_haiku_5_5_bills_every_token_5x_above_100k(book: PriceBook) -> None:
    """Haiku 5.5: $0.10 / $0.50 per 1M; a prompt above 100,000 tokens bills all 5x
    (Anthropic long-context pricing, as genai-prices 0.2.3 records it)."""
    at_limit = ours(book, "anthropic", "claude-haiku-5-5",
                    Usage(input_tokens=100_000, output_tokens=1_000))
    above = ours(book, "anthropic", "claude-haiku-5-5",
                 Usage(input_tokens=100_001, output_tokens=1_000))
    assert at_limit == Decimal("0.0105")  # 100000 x 0.10 + 1000 x 0.50, per 1M
    assert above == Decimal("0.0525005")  # 100001 x 0.50 + 1000 x 2.50, per 1M


def test_fast_speed_is_priced_at_its_own_rates(book: PriceBook) -> None:
    """`speed: fast` moves a Fable 5.2 call to the fast rates ($16 / $80)."""
    usage = Usage(input_tokens=1_000, output_tokens=10, speed="fast")
    assert ours(book, "anthropic", "claude-fable-5-2", usage) == \
        genai("claude-fable-5-2", "anthropic", context={"speed": "fast"},
              input_tokens=1_000, output_tokens=10) == Decimal("0.0168")


def test_fine_tunes_price_from_the_base_models_fine_tuned_rates(book: PriceBook) -> None:
    """`ft:gpt-4o-mini-2024-07-18:org::id` is priced as a gpt-4o-mini fine-tune, not as the
    base model."""
    name = "ft:gpt-4o-mini-2024-07-18:acme::x1"
    usage = Usage(input_tokens=1_000, output_tokens=10)
    price = book.lookup("openai", [name], AT)
    assert price is not None and price.model.name == "ft:gpt-4o-mini"
    assert ours(book, "openai", name, usage) == \
        genai(name, "openai", input_tokens=1_000, output_tokens=10)
    assert ours(book, "openai", name, usage) != ours(book, "openai", "gpt-4o-mini", usage)


def test_an_alias_is_priced_by_the_model_that_served_it(book: PriceBook) -> None:
    """A request for `gemini-flash-latest` answered by gemini-3.5-flash is priced as
    3.5 Flash; only with no response model does the alias's current target price it."""
    alone = book.lookup("gemini", [None, "gemini-flash-latest"], AT)
    assert alone is not None and alone.model.name == "gemini-3.8-flash"
    served = book.lookup("gemini", ["gemini-3.5-flash", "gemini-flash-latest"], AT)
    assert served is not None and served.model.name == "gemini-3.5-flash"
