"""Every billing class of a call, defined once: its log column, its price key, how it sums.

Everything that names token classes derives from `CLASSES`: `Usage` (what a dialect
reports), `UsageRow` (the log's columns), the cost engine (which count is priced at which
rate), the cost breakdown, metrics, reprice and the query layer's sums. Adding a class is
one entry here plus a new migration that adds its column (migrations are frozen literals;
a test checks that the migrated schema has exactly these columns).

Counts nest: a class `within` another is a part of that column's count (audio input is
part of `input_tokens`, 1-hour cache writes part of `cache_write_tokens`), so the older
columns keep their meaning and sums over them stay right. A part with its own rate is
priced apart and taken out of its parent's priced count; a part without one (reasoning)
is only reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum


class Side(StrEnum):
    """Which multiplier of a tier or discount scales the class's rate."""

    INPUT = "input"
    OUTPUT = "output"
    UNIT = "unit"  # per-request charges: never scaled by token multipliers


class Unit(StrEnum):
    TOKENS = "tokens"
    REQUESTS = "requests"


@dataclass(frozen=True, slots=True)
class TokenClass:
    """One class: `name` in breakdowns and `pricing show`, `column` in the log and Usage."""

    name: str
    column: str
    side: Side
    rate: str | None  # the price key in the tables; None: reported only, never priced apart
    fallback: tuple[str, ...] = ()  # price keys used, in order, when the table names no rate
    within: str | None = None  # the column whose count includes this one
    since: str = "m001_usage"  # the migration that added the column
    about: str = ""
    genai: str | None = None  # genai-prices' price key for the same rate

    @property
    def unit(self) -> Unit:
        return Unit.REQUESTS if self.side is Side.UNIT else Unit.TOKENS

    @property
    def per(self) -> Decimal:
        """How many of the unit one table price is for: 1M tokens, or 1,000 requests."""
        return MILLION if self.side is not Side.UNIT else THOUSAND


MILLION = Decimal(1_000_000)
THOUSAND = Decimal(1000)
_I, _O, _U = Side.INPUT, Side.OUTPUT, Side.UNIT
_M4 = "m004_token_classes"

CLASSES: tuple[TokenClass, ...] = (
    TokenClass("input", "input_tokens", _I, "input",
               about="uncached prompt tokens (every modality; parts below are priced apart)",
               genai="input_mtok"),
    TokenClass("audio_input", "audio_input_tokens", _I, "audio_input", ("input",),
               "input_tokens", _M4, "the audio part of uncached input", genai="input_audio_mtok"),
    TokenClass("image_input", "image_input_tokens", _I, "image_input", ("input",),
               "input_tokens", _M4, "the image part of uncached input", genai="input_image_mtok"),
    TokenClass("video_input", "video_input_tokens", _I, "video_input", ("input",),
               "input_tokens", _M4, "the video part of uncached input", genai="input_video_mtok"),
    TokenClass("cached_input", "cached_input_tokens", _I, "cached_input", ("input",),
               about="cache reads", genai="cache_read_mtok"),
    TokenClass("cached_audio_input", "cached_audio_input_tokens", _I, "cached_audio_input",
               ("cached_input", "input"), "cached_input_tokens", _M4,
               "the audio part of cache reads (Gemini)",
               genai="cache_audio_read_mtok"),
    TokenClass("cache_write_5m", "cache_write_tokens", _I, "cache_write_5m", ("input",),
               about="every cache write; priced apart: writes at the standard retention "
                     "(Anthropic 5 minutes; OpenAI writes without a TTL split)",
               genai="cache_write_mtok"),
    TokenClass("cache_write_1h", "cache_write_1h_tokens", _I, "cache_write_1h",
               ("cache_write_5m", "input"), "cache_write_tokens",
               about="Anthropic 1-hour cache writes",
               genai="cache_write_1h_mtok"),
    TokenClass("cache_write_30m", "cache_write_30m_tokens", _I, "cache_write_30m",
               ("cache_write_5m", "input"), "cache_write_tokens", _M4,
               "OpenAI 30-minute cache writes"),
    TokenClass("cache_write_12h", "cache_write_12h_tokens", _I, "cache_write_12h",
               ("cache_write_1h", "cache_write_5m", "input"), "cache_write_tokens", _M4,
               "OpenAI 12-hour cache writes"),
    TokenClass("output", "output_tokens", _O, "output",
               about="output tokens, reasoning and every modality included",
               genai="output_mtok"),
    TokenClass("reasoning", "reasoning_tokens", _O, None, (), "output_tokens",
               about="the reasoning (thinking) part of output, billed as output"),
    TokenClass("audio_output", "audio_output_tokens", _O, "audio_output", ("output",),
               "output_tokens", _M4, "the audio part of output", genai="output_audio_mtok"),
    TokenClass("image_output", "image_output_tokens", _O, "image_output", ("output",),
               "output_tokens", _M4, "the image part of output", genai="output_image_mtok"),
    TokenClass("web_search", "web_search_requests", _U, "web_search", (), None, _M4,
               "web searches run by a server tool (USD per 1,000)",
               genai="web_searches_kcount"),
    TokenClass("grounding", "grounding_requests", _U, "grounding", (), None, _M4,
               "prompts grounded with a search engine (Gemini; USD per 1,000)"),
    TokenClass("code_execution", "code_executions", _U, "code_execution", (), None, _M4,
               "code-execution tool runs (USD per 1,000)",
               genai="code_executions_kcount"),
)

BY_NAME = {c.name: c for c in CLASSES}
BY_COLUMN = {c.column: c for c in CLASSES}
COLUMNS: tuple[str, ...] = tuple(c.column for c in CLASSES)
TOKEN_COLUMNS: tuple[str, ...] = tuple(c.column for c in CLASSES if c.unit is Unit.TOKENS)
UNIT_COLUMNS: tuple[str, ...] = tuple(c.column for c in CLASSES if c.unit is Unit.REQUESTS)
PRICED: tuple[TokenClass, ...] = tuple(c for c in CLASSES if c.rate is not None)
RATE_KEYS: tuple[str, ...] = tuple(c.rate for c in PRICED if c.rate is not None)
TOKEN_RATE_KEYS: tuple[str, ...] = tuple(c.rate for c in PRICED
                                         if c.rate is not None and c.side is not Side.UNIT)
UNIT_RATE_KEYS: tuple[str, ...] = tuple(c.rate for c in PRICED
                                        if c.rate is not None and c.side is Side.UNIT)
SIDE_OF_RATE: dict[str, Side] = {c.rate: c.side for c in PRICED if c.rate is not None}
GENAI_KEYS: dict[str, str] = {c.rate: c.genai for c in PRICED if c.rate and c.genai}
# Parts priced apart, by the column that includes them.
PRICED_PARTS: dict[str, tuple[str, ...]] = {
    c.column: tuple(p.column for p in PRICED if p.within == c.column) for c in CLASSES}
# Every part (priced apart or not) by the column that includes it.
PARTS: dict[str, tuple[str, ...]] = {
    c.column: tuple(p.column for p in CLASSES if p.within == c.column) for c in CLASSES}
# The top-level columns whose sum is the whole prompt (cache reads and writes included).
PROMPT_COLUMNS = ("input_tokens", "cached_input_tokens", "cache_write_tokens")


def label(column: str) -> str:
    """A column's short name for metrics: `cache_write_1h_tokens` -> `cache_write_1h`."""
    return column.removesuffix("_tokens")


def priced_counts(counts: dict[str, int]) -> dict[str, int]:
    """Split column counts into the disjoint amounts each rate applies to, by class name.

    A part is capped at what remains of its parent, so a malformed report never makes a
    negative count.
    """
    result: dict[str, int] = {}
    for cls in PRICED:
        n = counts.get(cls.column, 0)
        if cls.within is not None:
            continue
        for part_column in PRICED_PARTS[cls.column]:
            part = BY_COLUMN[part_column]
            taken = min(counts.get(part_column, 0), n)
            result[part.name] = taken
            n -= taken
        result[cls.name] = n
    return result


def doc_table() -> str:
    """The classes as the Markdown table in docs/usage-log.md (a test keeps them equal)."""
    lines = ["| class | column | part of | price key | unit | without its price | meaning |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in CLASSES:
        per = "" if c.rate is None else ("per 1M tokens" if c.unit is Unit.TOKENS
                                         else "per 1,000 requests")
        lines.append(f"| `{c.name}` | `{c.column}` | {f'`{c.within}`' if c.within else ''} "
                     f"| {f'`{c.rate}`' if c.rate else '(billed as its parent)'} | {per} "
                     f"| {' -> '.join(f'`{k}`' for k in c.fallback)} | {c.about} |")
    return "\n".join(lines)
