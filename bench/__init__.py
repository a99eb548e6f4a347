"""meterproxy's benchmarks: load in three dialects (loadgen), memory over a soak (soak),
workers on Redis and PostgreSQL (scale), all three at once (all), usage-log generation
(loggen), queries and inserts.

See bench/README.md; results go to bench/results/ and docs/performance.md.
"""
