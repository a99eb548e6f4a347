"""schemathesis against docs/openapi.yaml: the admin API answers as described, never a 500."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance
from schemathesis.core.parameters import ParameterLocation
from schemathesis.generation import GenerationMode

from tests.conftest import VIRTUAL_KEY, Stack

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "schema-admin-key"
schema = schemathesis.openapi.from_path(ROOT / "docs" / "openapi.yaml")


@pytest.fixture(scope="module")
def admin_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    os.environ["METERPROXY_TEST_SCHEMA_ADMIN"] = ADMIN
    s = Stack(tmp_path_factory.mktemp("schema"), {
        "server": {"admin_key_env": "METERPROXY_TEST_SCHEMA_ADMIN"},
        "budgets": [{"scope": {"customer": "*"}, "period": "month", "limit_usd": 5}]})
    client = openai.OpenAI(base_url=s.base(), api_key=VIRTUAL_KEY, max_retries=0)
    for customer in ("acme", "globex"):
        client.chat.completions.create(model="gpt-4o-mini",
                                       messages=[{"role": "user", "content": "x"}],
                                       extra_headers={"X-Meter-Customer": customer,
                                                      "X-Meter-Tag-Env": "prod"})
    s.rows(2)
    yield s
    s.close()


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_admin_api_follows_its_description(case: schemathesis.Case, admin_stack: Stack) -> None:
    """Every generated request gets a documented status, content type and body shape.

    Free-form values (times like `7d`, group-by names, tag filters) cannot be spelt in JSON
    Schema, so a documented 400 for one the schema allows is not counted as a failure.
    """
    case.call_and_validate(base_url=admin_stack.url, headers=admin_auth(case),
                           excluded_checks=[positive_data_acceptance])


def admin_auth(case: schemathesis.Case) -> dict[str, str]:
    """The admin key, except for a case whose headers are the deliberately invalid part:
    schemathesis then leaves out or spoils `Authorization`, and the 401 it gets is the
    rejection it expects. (Adding the key back made such a case valid and "accepted".)"""
    headers = case.meta.components.get(ParameterLocation.HEADER) if case.meta else None
    if headers is not None and headers.mode == GenerationMode.NEGATIVE:
        return {}
    return {"Authorization": f"Bearer {ADMIN}"}
