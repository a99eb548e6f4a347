"""SQL of shipped migrations that both log backends run alike, as frozen literals.

A migration that has shipped never changes: its SQL is written out here (or in the
backend's module) as it ran, not built from constants that a later change could edit.
A change to the schema is a new migration. `tests/test_migrations.py` holds each older
schema and checks that upgrading from it gives the schema a blank database gets.
"""

from __future__ import annotations

# m002_views: Datasette-friendly views (plain sums, rounded for reading).
M002_SPEND = ("count(*) AS calls,\n"
              "        sum(input_tokens) AS input_tokens,\n"
              "        sum(cached_input_tokens) AS cached_input_tokens,\n"
              "        sum(cache_write_tokens) AS cache_write_tokens,\n"
              "        sum(output_tokens) AS output_tokens,\n"
              "        sum(reasoning_tokens) AS reasoning_tokens,\n"
              "        round(coalesce(sum(cost_usd), 0), 6) AS cost_usd,\n"
              "        sum(CASE WHEN priced = 0 THEN 1 ELSE 0 END) AS unpriced_calls")
M002_VIEWS = (
    "CREATE VIEW daily_spend AS\n        SELECT substr(ts, 1, 10) AS day, " + M002_SPEND
    + "\n        FROM usage GROUP BY 1 ORDER BY 1",
    "CREATE VIEW spend_by_customer AS\n"
    "            SELECT substr(ts, 1, 7) AS month, customer, " + M002_SPEND
    + "\n            FROM usage GROUP BY 1, 2 ORDER BY 1 DESC, cost_usd DESC",
    "CREATE VIEW spend_by_feature AS\n"
    "            SELECT substr(ts, 1, 7) AS month, feature, " + M002_SPEND
    + "\n            FROM usage GROUP BY 1, 2 ORDER BY 1 DESC, cost_usd DESC",
)

# m003_query_indexes: the covered columns of spend by customer, feature or model. SQLite
# appends them to the key; PostgreSQL carries them with INCLUDE.
M003_COVERED = ("outcome, priced, input_tokens, cached_input_tokens, cache_write_tokens, "
                "cache_write_1h_tokens, output_tokens, reasoning_tokens, cost_usd, duration_ms")
M003_COVER_KEYS = (("customer", "customer, ts, feature, provider, model"),
                   ("feature", "feature, ts, customer, provider, model"),
                   ("model", "model, ts, provider, customer, feature"))
M003_COMMON = (
    "CREATE INDEX idx_usage_outcome_ts ON usage (outcome, ts)",
    "CREATE INDEX idx_usage_unpriced_ts ON usage (ts) WHERE priced = 0",
    "CREATE INDEX idx_usage_trace_id ON usage (trace_id) WHERE trace_id IS NOT NULL",
)

# m004_token_classes: the columns for token classes and unit charges added in 2026-12
# (all counts, NOT NULL DEFAULT 0), and where an older row's breakdown already recorded
# some of them (audio parts, web searches), that count copied into the new column.
M004_COLUMNS = ("audio_input_tokens", "image_input_tokens", "video_input_tokens",
                "cached_audio_input_tokens", "cache_write_30m_tokens",
                "cache_write_12h_tokens", "audio_output_tokens", "image_output_tokens",
                "web_search_requests", "grounding_requests", "code_executions")
# The covering indexes of m003, rebuilt to carry the new columns too, so summing every
# class still reads no table.
M004_COVERED = (f"{M003_COVERED}, audio_input_tokens, image_input_tokens, video_input_tokens, "
                "cached_audio_input_tokens, cache_write_30m_tokens, cache_write_12h_tokens, "
                "audio_output_tokens, image_output_tokens, web_search_requests, "
                "grounding_requests, code_executions")
M004_BACKFILL = (("audio_input_tokens", "audio_input", "tokens"),
                 ("audio_output_tokens", "audio_output", "tokens"),
                 ("web_search_requests", "web_search", "requests"))

# m005_call_shape: a row may stand for several identical refusals from one key within a
# second (repeat_count), and records the hash and token length of the prompt's stable
# prefix (system prompt, tools, first messages; never the text) for the savings advisor.
M005_COLUMNS = (("repeat_count", "INTEGER NOT NULL DEFAULT 1"),
                ("prefix_hash", "TEXT"),
                ("prefix_tokens", "INTEGER"))
# m006_rollups: hourly rollups the writer keeps in the transaction that adds the rows, so
# whole-log questions sum a few rows per hour instead of every call. Each rollup is keyed
# by the hour (`substr(ts, 1, 13)`) and its dimensions; a NULL dimension is stored as ''
# with its bit set in `nulls` (bit i: the i-th dimension), so the key has no NULLs and a
# plain primary key can take an upsert on both databases. `calls` sums `repeat_count`
# (a refused row may stand for several calls); `cost_units` sums each row's cost as an
# exact integer count of 1e-10 USD. Smallest first: a question reads the first rollup
# that has every dimension it groups or filters by.
# (Customers times the other dimensions would be half the size of the log itself.)
M006_ROLLUPS = (
    ("usage_hourly", ("key_name", "provider", "model", "feature", "outcome", "priced")),
    ("usage_hourly_customer", ("customer", "outcome", "priced")),
)
# Dimensions that are NOT NULL in `usage` itself, and the integer ones.
M006_NOT_NULL = ("outcome", "priced")
M006_INTEGER = ("priced",)
# The summed token and unit columns (every class column as of m006).
M006_SUMS = ("input_tokens", "cached_input_tokens", "cache_write_tokens",
             "cache_write_1h_tokens", "output_tokens", "reasoning_tokens",
             "audio_input_tokens", "image_input_tokens", "video_input_tokens",
             "cached_audio_input_tokens", "cache_write_30m_tokens", "cache_write_12h_tokens",
             "audio_output_tokens", "image_output_tokens", "web_search_requests",
             "grounding_requests", "code_executions")
M006_COST_UNITS = {"sqlite": "CAST(round(cost_usd * 1e10) AS INTEGER)",
                   "postgresql": "CAST(round(cost_usd * 10000000000) AS BIGINT)"}
# The covering indexes of m003/m004 and the narrow (key_name, ts) of m001: whole-log
# questions read the rollups now, and every insert paid for them.
M006_DROP_INDEXES = ("idx_usage_customer_cover", "idx_usage_feature_cover",
                     "idx_usage_model_cover", "idx_usage_day", "idx_usage_key_name_ts")


def m006_create(table: str, dims: tuple[str, ...], integer: str) -> str:
    """CREATE TABLE for one rollup; `integer` is the 64-bit integer type's name."""
    columns = [f"{d} {integer if d in M006_INTEGER else 'TEXT'} NOT NULL" for d in dims]
    sums = [f"{c} {integer} NOT NULL DEFAULT 0" for c in ("calls", *M006_SUMS, "cost_units")]
    return (f"CREATE TABLE {table} (hour TEXT NOT NULL, {', '.join(columns)}, "
            f"nulls INTEGER NOT NULL DEFAULT 0, {', '.join(sums)}, "
            f"PRIMARY KEY (hour, {', '.join(dims)}, nulls))")


def m006_fold(table: str, dims: tuple[str, ...], cost_units: str, source: str,
              where: str, sign: str = "") -> str:
    """Add (sign '') or take away (sign '-') the rows of `source` matching `where` into a
    rollup: one upsert per (hour, dimensions) group, in key order (so concurrent writers
    lock rollup rows in the same order)."""
    return _fold(table, "hour", 13, dims, cost_units, source, where, sign)


def _fold(table: str, period: str, width: int, dims: tuple[str, ...], cost_units: str,
          source: str, where: str, sign: str) -> str:
    keys = []
    for d in dims:
        if d in M006_NOT_NULL:
            keys.append(d)
        else:
            keys.append(f"coalesce({d}, {'0' if d in M006_INTEGER else chr(39) * 2})")
    nullable = [d for d in dims if d not in M006_NOT_NULL]
    mask = " + ".join(f"CASE WHEN {d} IS NULL THEN {1 << dims.index(d)} ELSE 0 END"
                      for d in nullable) or "0"
    sums = [f"{sign}sum(repeat_count)"]
    sums += [f"{sign}sum({c})" for c in M006_SUMS]
    sums.append(f"{sign}coalesce(sum({cost_units}), 0)")
    n = len(dims) + 2
    summed = ("calls", *M006_SUMS, "cost_units")
    return (f"INSERT INTO {table} ({period}, {', '.join(dims)}, nulls, {', '.join(summed)}) "
            f"SELECT substr(ts, 1, {width}), {', '.join(keys)}, {mask}, {', '.join(sums)} "
            f"FROM {source} WHERE {where} "
            f"GROUP BY {', '.join(str(i + 1) for i in range(n))} "
            f"ORDER BY {', '.join(str(i + 1) for i in range(n))} "
            f"ON CONFLICT ({period}, {', '.join(dims)}, nulls) DO UPDATE SET "
            + ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in summed))


# m006_rollups, too: each hourly rollup's sums by UTC day as well (`day` is
# substr(ts, 1, 10)), for the whole days of a window: a 60-day question reads about
# twenty times fewer rows. Backfilled from the hourly rollups, which hold the same sums.
M006_DAILY = (("usage_daily", "usage_hourly"),
                ("usage_daily_customer", "usage_hourly_customer"))


def m006_create_daily(table: str, dims: tuple[str, ...], integer: str) -> str:
    """CREATE TABLE for one daily rollup: m006's columns with `day` for `hour`."""
    columns = [f"{d} {integer if d in M006_INTEGER else 'TEXT'} NOT NULL" for d in dims]
    sums = [f"{c} {integer} NOT NULL DEFAULT 0" for c in ("calls", *M006_SUMS, "cost_units")]
    return (f"CREATE TABLE {table} (day TEXT NOT NULL, {', '.join(columns)}, "
            f"nulls INTEGER NOT NULL DEFAULT 0, {', '.join(sums)}, "
            f"PRIMARY KEY (day, {', '.join(dims)}, nulls))")


def m006_backfill_daily(table: str, hourly: str, dims: tuple[str, ...]) -> str:
    """Sum an hourly rollup's rows into its daily twin."""
    summed = ("calls", *M006_SUMS, "cost_units")
    n = len(dims) + 2
    return (f"INSERT INTO {table} (day, {', '.join(dims)}, nulls, {', '.join(summed)}) "
            f"SELECT substr(hour, 1, 10), {', '.join(dims)}, nulls, "
            f"{', '.join(f'sum({c})' for c in summed)} FROM {hourly} "
            f"GROUP BY {', '.join(str(i + 1) for i in range(n))}")


def m006_fold_daily(table: str, dims: tuple[str, ...], cost_units: str, source: str,
              where: str, sign: str = "") -> str:
    """m006_fold for a daily rollup."""
    return _fold(table, "day", 10, dims, cost_units, source, where, sign)

# m007_anomalies: spend anomaly episodes (proxy.storage.anomalies). One active episode
# (open or blocked) per scope: the partial unique index is how instances sharing the log
# agree on who opened it, so it is announced once. Amounts are the backend's exact type.
M007_ANOMALIES = """
        CREATE TABLE anomalies (
            id TEXT PRIMARY KEY,
            scope_kind TEXT NOT NULL,
            scope_value TEXT NOT NULL,
            state TEXT NOT NULL,
            action TEXT NOT NULL,
            started_at TEXT NOT NULL,
            last_seen_at TEXT NOT NULL,
            ended_at TEXT,
            observed_usd {money} NOT NULL,
            baseline_usd {money} NOT NULL,
            threshold_usd {money} NOT NULL,
            method TEXT NOT NULL,
            cleared_by TEXT
        )
        """
M007_INDEXES = (
    "CREATE UNIQUE INDEX idx_anomalies_active ON anomalies (scope_kind, scope_value) "
    "WHERE state IN ('open', 'blocked')",
    "CREATE INDEX idx_anomalies_started ON anomalies (started_at)",
)

# m008_views_count_calls: the m002 views count calls as sum(repeat_count) (a folded
# refusal row stands for several calls since m005); otherwise the views are m002's.
M008_SPEND = ("sum(repeat_count) AS calls,\n"
              "        sum(input_tokens) AS input_tokens,\n"
              "        sum(cached_input_tokens) AS cached_input_tokens,\n"
              "        sum(cache_write_tokens) AS cache_write_tokens,\n"
              "        sum(output_tokens) AS output_tokens,\n"
              "        sum(reasoning_tokens) AS reasoning_tokens,\n"
              "        round(coalesce(sum(cost_usd), 0), 6) AS cost_usd,\n"
              "        sum(CASE WHEN priced = 0 THEN repeat_count ELSE 0 END) AS unpriced_calls")
M008_DROP = ("DROP VIEW daily_spend", "DROP VIEW spend_by_customer", "DROP VIEW spend_by_feature")
M008_VIEWS = (
    "CREATE VIEW daily_spend AS\n        SELECT substr(ts, 1, 10) AS day, " + M008_SPEND
    + "\n        FROM usage GROUP BY 1 ORDER BY 1",
    "CREATE VIEW spend_by_customer AS\n"
    "            SELECT substr(ts, 1, 7) AS month, customer, " + M008_SPEND
    + "\n            FROM usage GROUP BY 1, 2 ORDER BY 1 DESC, cost_usd DESC",
    "CREATE VIEW spend_by_feature AS\n"
    "            SELECT substr(ts, 1, 7) AS month, feature, " + M008_SPEND
    + "\n            FROM usage GROUP BY 1, 2 ORDER BY 1 DESC, cost_usd DESC",
)
