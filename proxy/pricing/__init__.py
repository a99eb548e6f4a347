"""Pricing: versioned tables in, an exact Decimal cost out.

Three parts with one job each: `tables` reads the YAML files (format in
pricing/README.md) into frozen model entries; `book` indexes them (bundled tables plus
`pricing.dir` overlays and configured overrides) and resolves a model name and a moment
to the price in force; `engine` turns a call's usage and that price into a cost. On the
hot path there is no I/O: a lookup is two dict hits and `cost` is a pure function.
"""

from proxy.pricing.book import Price, PriceBook
from proxy.pricing.engine import Cost, cost, rates_dict, rounded
from proxy.pricing.tables import PricingError, Rates, bundled_tables_dir

__all__ = ["Cost", "Price", "PriceBook", "PricingError", "Rates", "bundled_tables_dir", "cost",
           "rates_dict", "rounded"]
