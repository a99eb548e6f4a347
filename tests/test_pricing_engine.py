"""The pricing engine over the bundled tables: cost properties, history, names, overrides."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.pricing import Price, PriceBook, PricingError, cost
from proxy.usage import Usage

BOOK = PriceBook.load()
ADDITIVE_COUNTS = ("input_tokens", "cached_input_tokens", "cache_write_tokens", "output_tokens",
                   "web_search_requests")


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def priced(table: str, model: str, when: str) -> Price:
    price = BOOK.lookup(table, [model], at(when))
    assert price is not None, f"{table}/{model} has no price at {when}"
    return price


def per_million(price: Price, when: str, **counts: int) -> Decimal:
    """The cost of a call, scaled so one million tokens of a class reads as its rate."""
    return cost(Usage(**counts), price, at(when)).total


# Every model of every table, at the start of its latest period.
LATEST = [(table, model.name, model.periods[-1].effective_from)
          for table, models in sorted(BOOK.tables.items()) for model in models.values()]


@st.composite
def usages(draw: st.DrawFn, limit: int = 2_000_000) -> Usage:
    """A provider-consistent usage: audio and 1-hour writes never exceed their totals."""
    input_tokens = draw(st.integers(0, limit))
    cache_write = draw(st.integers(0, limit))
    output = draw(st.integers(0, limit))
    return Usage(
        input_tokens=input_tokens,
        cached_input_tokens=draw(st.integers(0, limit)),
        cache_write_tokens=cache_write,
        cache_write_1h_tokens=draw(st.integers(0, cache_write)),
        output_tokens=output,
        reasoning_tokens=draw(st.integers(0, output)),
        audio_input_tokens=draw(st.integers(0, input_tokens)),
        audio_output_tokens=draw(st.integers(0, output)),
        web_search_requests=draw(st.integers(0, 50)),
        service_tier=draw(st.sampled_from([None, "default", "batch", "flex", "priority"])),
    )


def only(usage: Usage, *fields: str) -> Usage:
    """The same call with every count but `fields` set to zero."""
    kept = {f: getattr(usage, f) for f in fields}
    return Usage(service_tier=usage.service_tier, **kept)


@settings(max_examples=150, deadline=None)
@given(choice=st.sampled_from(LATEST), usage=usages())
def test_cost_is_exact_sum_of_class_lines(choice, usage) -> None:
    """Each class line is tokens x rate / 1M exactly, and the total is exactly their sum."""
    table, name, when = choice
    result = cost(usage, BOOK.lookup(table, [name], when), when)
    total = Fraction(0)
    for line in result.breakdown["classes"].values():
        if "tokens" in line:
            expected = line["tokens"] * Fraction(Decimal(line["usd_per_mtok"])) / 1_000_000
        else:
            expected = line["requests"] * Fraction(Decimal(line["usd_per_1000"])) / 1000
        assert Fraction(Decimal(line["usd"])) == expected
        total += expected
    assert Fraction(result.total) == total


@settings(max_examples=150, deadline=None)
@given(choice=st.sampled_from([c for c in LATEST
                               if not BOOK.lookup(c[0], [c[1]], c[2]).period.tiers]),
       usage=usages())
def test_cost_is_additive_over_token_classes(choice, usage) -> None:
    """Without a long-context tier, a call costs the sum of its token classes priced apart."""
    table, name, when = choice
    price = BOOK.lookup(table, [name], when)
    parts = [only(usage, "input_tokens", "audio_input_tokens"),
             only(usage, "cached_input_tokens"),
             only(usage, "cache_write_tokens", "cache_write_1h_tokens"),
             only(usage, "output_tokens", "audio_output_tokens", "reasoning_tokens"),
             only(usage, "web_search_requests")]
    assert cost(usage, price, when).total == sum(cost(p, price, when).total for p in parts)


@settings(max_examples=200, deadline=None)
@given(choice=st.sampled_from(LATEST), usage=usages(limit=400_000),
       field=st.sampled_from([*ADDITIVE_COUNTS, "audio_input_tokens", "cache_write_1h_tokens",
                              "audio_output_tokens"]),
       more=st.integers(1, 300_000))
def test_cost_is_monotonic_in_every_count(choice, usage, field, more) -> None:
    """More tokens of any class (or more searches) never make a call cheaper."""
    table, name, when = choice
    price = BOOK.lookup(table, [name], when)
    bigger = Usage(**usage.as_dict())
    setattr(bigger, field, getattr(bigger, field) + more)
    parent = {"audio_input_tokens": "input_tokens", "cache_write_1h_tokens": "cache_write_tokens",
              "audio_output_tokens": "output_tokens"}.get(field)
    if parent:  # a part of a total grows only with its total
        setattr(bigger, parent, getattr(bigger, parent) + more)
    assert cost(bigger, price, when).total >= cost(usage, price, when).total


# (table, model, when, threshold, base rates, tier rates); rates are
# (input, cached input, cache write, output) per 1M tokens as the providers publish them.
TIERED = [
    ("anthropic", "claude-sonnet-4-5", "2025-10-01", 200_000,
     ("3", "0.30", "3.75", "15"), ("6", "0.60", "7.50", "22.50")),
    ("anthropic", "claude-sonnet-4", "2025-09-01", 200_000,
     ("3", "0.30", "3.75", "15"), ("6", "0.60", "7.50", "22.50")),
    ("gemini", "gemini-2.5-pro", "2025-07-01", 200_000,
     ("1.25", "0.125", "1.25", "10"), ("2.50", "0.25", "2.50", "15")),
    ("openai", "gpt-5.4", "2026-04-01", 272_000,
     ("2.50", "0.25", "2.50", "15"), ("5", "0.50", "5", "22.50")),
    ("xai", "grok-4.3", "2026-06-01", 199_999,
     ("1.25", "0.20", "1.25", "2.50"), ("2.50", "0.40", "2.50", "5")),
]


def expected_cost(rates: tuple[str, ...], usage: Usage) -> Decimal:
    rate_in, rate_cached, rate_write, rate_out = map(Decimal, rates)
    return (usage.input_tokens * rate_in + usage.cached_input_tokens * rate_cached
            + usage.cache_write_tokens * rate_write + usage.output_tokens * rate_out) / 1_000_000


@pytest.mark.parametrize(("table", "model", "when", "threshold", "base", "tier"), TIERED)
@settings(max_examples=40, deadline=None)
@given(cached_share=st.floats(0, 1), write_share=st.floats(0, 1),
       output=st.integers(0, 100_000))
def test_long_context_tier_is_a_cliff_above_the_threshold(
        table, model, when, threshold, base, tier, cached_share, write_share, output) -> None:
    """A prompt of exactly the threshold is the base tier; one token more moves every token."""
    price = priced(table, model, when)
    cached = int(threshold * cached_share)
    written = int((threshold - cached) * write_share)
    at_threshold = Usage(input_tokens=threshold - cached - written, cached_input_tokens=cached,
                         cache_write_tokens=written, output_tokens=output)
    assert at_threshold.prompt_tokens == threshold
    result = cost(at_threshold, price, at(when))
    assert result.total == expected_cost(base, at_threshold)
    assert "tier" not in result.breakdown
    one_more = Usage(**{**at_threshold.as_dict(), "input_tokens": at_threshold.input_tokens + 1})
    result = cost(one_more, price, at(when))
    assert result.total == expected_cost(tier, one_more)
    assert result.breakdown["tier"] == f"above {threshold} input tokens"


def test_o3_price_cut_on_2025_06_10() -> None:
    """o3 is $10 / $40 through 2025-06-09 and $2 / $8 from 2025-06-10 00:00 UTC."""
    before = priced("openai", "o3", "2025-06-09T23:59:59")
    after = priced("openai", "o3", "2025-06-10T00:00:00")
    assert (before.rates.input, before.rates.output) == (Decimal("10.00"), Decimal("40.00"))
    assert (after.rates.input, after.rates.output) == (Decimal("2.00"), Decimal("8.00"))
    assert before.version.startswith("openai.yaml@2025-04-16+")
    assert after.version.startswith("openai.yaml@2025-06-10+")
    assert per_million(before, "2025-06-09", output_tokens=1_000_000) == Decimal(40)
    assert per_million(after, "2025-06-10", output_tokens=1_000_000) == Decimal(8)


def test_gpt_4o_alias_moves_to_2024_08_06_prices_on_2024_10_02() -> None:
    """gpt-4o bills $5 / $15 on 2024-10-01 and $2.50 / $10 from 2024-10-02."""
    before = priced("openai", "gpt-4o", "2024-10-01T12:00:00")
    after = priced("openai", "gpt-4o", "2024-10-02T00:00:00")
    assert (before.rates.input, before.rates.output) == (Decimal(5), Decimal(15))
    assert (after.rates.input, after.rates.output) == (Decimal("2.50"), Decimal(10))
    assert before.version.startswith("openai.yaml@2024-05-13+")
    assert after.version.startswith("openai.yaml@2024-10-02+")


def test_dated_snapshot_keeps_its_own_price_after_the_alias_moves() -> None:
    """gpt-4o-2024-05-13 stays at $5 / $15 after the gpt-4o alias got cheaper."""
    price = priced("openai", "gpt-4o-2024-05-13", "2025-01-01")
    assert price.model.name == "gpt-4o-2024-05-13"
    assert (price.rates.input, price.rates.output) == (Decimal(5), Decimal(15))


def test_no_price_before_a_model_exists_or_after_it_is_retired() -> None:
    """A call outside every period is unpriced rather than priced by a neighbour."""
    assert BOOK.lookup("openai", ["o3"], at("2025-04-15")) is None
    assert BOOK.lookup("openai", ["gpt-4.5-preview"], at("2025-07-14")) is None
    assert BOOK.lookup("openai", ["gpt-4.5-preview"], at("2025-07-13T23:59")) is not None


@pytest.mark.parametrize(("table", "sent", "entry"), [
    ("openai", "gpt-4o-2024-08-06", "gpt-4o"),
    ("openai", "GPT-4o-Mini", "gpt-4o-mini"),
    ("openai", "openai/gpt-4o-mini", "gpt-4o-mini"),
    ("openai", "o3-2025-04-16", "o3"),
    ("openai", "gpt-3.5-turbo-0613", "gpt-3.5-turbo-0613"),
    ("openai", "gpt-4-0613", "gpt-4"),
    ("anthropic", "claude-3-5-sonnet-20241022", "claude-3-5-sonnet"),
    ("anthropic", "claude-3-5-sonnet-latest", "claude-3-5-sonnet"),
    ("anthropic", "claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
    ("anthropic", "claude-opus-4-1-20991231", "claude-opus-4-1"),
    ("anthropic", "claude-sonnet-4@20250514", "claude-sonnet-4"),
    ("gemini", "gemini-1.5-pro-002", "gemini-1.5-pro"),
    ("gemini", "models/gemini-2.5-flash", "gemini-2.5-flash"),
    ("mistral", "codestral-latest", "codestral-2501"),
    ("groq", "meta-llama/llama-4-scout-17b-16e-instruct",
     "meta-llama/llama-4-scout-17b-16e-instruct"),
    ("together", "meta-llama/llama-3.3-70b-instruct-turbo",
     "meta-llama/Llama-3.3-70B-Instruct-Turbo"),
])
def test_names_aliases_and_dated_ids_resolve(table, sent, entry) -> None:
    """Exact names, aliases, any case, vendor prefixes and unknown dates find the entry."""
    model = BOOK.model(table, [sent])
    assert model is not None and model.name == entry


def test_unknown_models_and_tables_resolve_to_nothing() -> None:
    """A name no table knows is unpriced; the first known name of several wins."""
    assert BOOK.model("openai", ["gpt-99"]) is None
    assert BOOK.model("nonexistent", ["gpt-4o"]) is None
    assert BOOK.model("openai", [None, "gpt-99", "o3-mini"]).name == "o3-mini"


def test_deepseek_off_peak_window_in_its_historical_period() -> None:
    """deepseek-chat is half price 16:30-00:30 UTC only from 2025-02-26 16:30 to 2025-09-05."""
    million = {"input_tokens": 1_000_000}
    for when, usd in [("2025-02-20T17:00", "0.27"), ("2025-03-01T12:00", "0.27"),
                      ("2025-03-01T17:00", "0.135"), ("2025-03-02T00:29", "0.135"),
                      ("2025-03-02T00:30", "0.27"), ("2025-09-10T17:00", "0.56")]:
        price = priced("deepseek", "deepseek-chat", when)
        assert per_million(price, when, **million) == Decimal(usd), when


def test_service_tiers_and_web_search_fees() -> None:
    """Batch halves Anthropic's rates, cache and long-context tier included; web search is
    $10 per 1,000 searches and not discounted."""
    price = priced("anthropic", "claude-sonnet-4-5", "2025-10-01")
    usage = Usage(input_tokens=100_000, cached_input_tokens=50_000, output_tokens=100_000,
                  web_search_requests=1000, service_tier="batch")
    # 100K x $1.50 + 50K x $0.15 + 100K x $7.50 per 1M, plus $10
    assert cost(usage, price, at("2025-10-01")).total == Decimal("10.9075")
    usage.input_tokens = 300_000  # above 200K: $3 / $0.30 / $11.25 in batch
    assert cost(usage, price, at("2025-10-01")).total == Decimal("0.9") + Decimal("0.015") \
        + Decimal("1.125") + Decimal(10)


def test_discount_override_applies_from_its_effective_date() -> None:
    """A table-wide discount changes prices from effective_from on and names itself."""
    book = PriceBook.load(overrides={"openai": {"discount_pct": 20,
                                                "effective_from": "2026-01-01"}})
    before = book.lookup("openai", ["o3"], at("2025-12-31T23:59"))
    after = book.lookup("openai", ["o3"], at("2026-01-01"))
    assert before.rates.input == Decimal("2.00") and ";override" not in before.version
    assert (after.rates.input, after.rates.output) == (Decimal("1.6"), Decimal("6.4"))
    assert after.version.endswith(";override:openai@2026-01-01")
    assert book.digest != BOOK.digest


def test_custom_price_override_for_one_model_wins_over_the_table_one() -> None:
    """A provider/model override sets its own prices and beats the provider-wide one."""
    book = PriceBook.load(overrides={
        "openai": {"discount_pct": 50},
        "openai/gpt-4o": {"input": "2.00", "output": "8.00"},
    })
    custom = book.lookup("openai", ["gpt-4o-2024-11-20"], at("2025-03-01"))
    assert (custom.rates.input, custom.rates.cached_input, custom.rates.output) == (
        Decimal("2.00"), Decimal("1.25"), Decimal("8.00"))
    assert custom.version.endswith(";override:openai/gpt-4o@1970-01-01")
    other = book.lookup("openai", ["gpt-4o-mini"], at("2025-03-01"))
    assert other.rates.input == Decimal("0.075")
    assert other.version.endswith(";override:openai@1970-01-01")
    assert cost(Usage(output_tokens=1_000_000), custom, at("2025-03-01")).total == Decimal(8)


def test_bad_overrides_are_refused() -> None:
    """An unknown override key or an impossible discount is a PricingError."""
    with pytest.raises(PricingError, match="unknown key"):
        PriceBook.load(overrides={"openai": {"discount": 10}})
    with pytest.raises(PricingError, match="between 0 and 100"):
        PriceBook.load(overrides={"openai": {"discount_pct": 120}})
