"""Schema pieces both usage-log backends create alike: views and what indexes carry.

The SQLite and PostgreSQL migrations each keep their own list (their SQL differs
elsewhere) but take these from here, so the two schemas cannot drift apart.
"""

from __future__ import annotations

SPEND_COLUMNS = """count(*) AS calls,
        sum(input_tokens) AS input_tokens,
        sum(cached_input_tokens) AS cached_input_tokens,
        sum(cache_write_tokens) AS cache_write_tokens,
        sum(output_tokens) AS output_tokens,
        sum(reasoning_tokens) AS reasoning_tokens,
        round(coalesce(sum(cost_usd), 0), 6) AS cost_usd,
        sum(CASE WHEN priced = 0 THEN 1 ELSE 0 END) AS unpriced_calls"""

# Datasette-friendly views (migration m002_views).
VIEWS = (
    f"""CREATE VIEW daily_spend AS
        SELECT substr(ts, 1, 10) AS day, {SPEND_COLUMNS}
        FROM usage GROUP BY 1 ORDER BY 1""",
    *(f"""CREATE VIEW spend_by_{dim} AS
            SELECT substr(ts, 1, 7) AS month, {dim}, {SPEND_COLUMNS}
            FROM usage GROUP BY 1, 2 ORDER BY 1 DESC, cost_usd DESC"""
      for dim in ("customer", "feature")),
)

# The columns a usage query sums, so an index holding them answers it without the table.
AGGREGATED = ("outcome", "priced", "input_tokens", "cached_input_tokens", "cache_write_tokens",
              "cache_write_1h_tokens", "output_tokens", "reasoning_tokens", "cost_usd",
              "duration_ms")

# Covering indexes for spend by customer, feature or model (m003_query_indexes): each
# leading column, then the columns grouped with it.
COVERING = (("customer", "feature, provider, model"),
            ("feature", "customer, provider, model"),
            ("model", "provider, customer, feature"))
