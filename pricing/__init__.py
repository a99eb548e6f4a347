"""The pricing tables as package data: importable as proxy.tables (see pyproject.toml)."""
