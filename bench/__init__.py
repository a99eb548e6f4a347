"""meterproxy's benchmarks: load (loadgen), usage-log generation (loggen) and queries.

See bench/README.md; results go to docs/performance.md.
"""
