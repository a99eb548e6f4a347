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
