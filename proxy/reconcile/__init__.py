"""Reconcile the meter with the provider's bill: per day x model x token class.

`bill` holds the provider-neutral shape of a bill, `openai`, `anthropic` and `gemini` read
one provider's billing data into it, `compare` sets it against the usage log and explains
drift, `schedule` runs the check in the server. Facts about the billing APIs: docs/reconcile.md.
"""
