"""Spend anomaly guardrails: baselines per scope, the running check, blocked scopes."""
