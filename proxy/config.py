"""Configuration: YAML in, frozen dataclasses out, one clear line per mistake.

Every setting has a default, so meterproxy runs with no file at all. Unknown keys are
errors: a misspelt budget must not silently turn into no budget.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from datetime import date, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

DEFAULT_FILE = "meterproxy.yaml"
ENV_FILE = "METERPROXY_CONFIG"


class ConfigError(Exception):
    """A configuration problem, phrased as `file: key.path: what is wrong`."""


class AuthMode(StrEnum):
    VIRTUAL_KEYS = "virtual_keys"  # clients send meterproxy keys; the proxy holds provider keys
    PASSTHROUGH = "passthrough"  # clients send their own provider keys, named by fingerprint


class LedgerFailure(StrEnum):
    """What a call meets while the shared ledger is unreachable."""

    CLOSED = "closed"  # refused (503): no budget can be overspent
    OPEN = "open"  # admitted, charged once the ledger is back


class Period(StrEnum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"
    TOTAL = "total"


class Unpriced(StrEnum):
    """A model with no price, under a blocking USD budget."""

    REFUSE = "refuse"  # 403 model_unpriced
    ALLOW = "allow"  # admitted and flagged (priced = 0, a warning, a metric)


class AnomalyAction(StrEnum):
    """What an anomaly does besides alerting."""

    ALERT = "alert"  # log, metric and webhook, once per episode
    BLOCK = "block"  # also refuse the scope's calls until an operator clears it


class Enforce(StrEnum):
    BLOCK = "block"  # refuse calls that would go over
    ALERT_ONLY = "alert_only"  # only alert


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8787
    admin_key_env: str = "METERPROXY_ADMIN_KEY"
    max_body_mb: float = 64
    grace_s: float = 30
    # The HTTP status of a budget refusal: 429, or 402/403 for clients that retry every 429.
    refusal_status: int = 429
    header_timeout_s: float = 15
    body_timeout_s: float = 60
    max_connections: int = 1000
    estimate_bytes_above_kb: int = 256


@dataclass(frozen=True)
class StorageConfig:
    usage_log: str = "sqlite:///meterproxy.db"
    ledger: str = "local"
    flush_interval_ms: int = 250
    batch_rows: int = 500
    max_backlog_rows: int = 100_000
    # Identical refusals of one key starting within this time of the first: one row.
    fold_refusals_ms: int = 1000
    ledger_failure: LedgerFailure = LedgerFailure.CLOSED
    spool_dir: str = "meterproxy-spool"
    # The secret that keys the stable-prefix hashes (proxy.fingerprint); unset: a file.
    prefix_secret_env: str = "METERPROXY_PREFIX_SECRET"


@dataclass(frozen=True)
class PricingConfig:
    dir: str | None = None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    # A model with no price under a USD budget: refused, or admitted and flagged.
    unpriced: Unpriced = Unpriced.REFUSE


@dataclass(frozen=True)
class AuthConfig:
    mode: AuthMode = AuthMode.VIRTUAL_KEYS


@dataclass(frozen=True)
class ProviderConfig:
    base_url: str = ""
    dialect: str = "openai"
    api_key_env: str | None = None
    timeout_s: float = 600
    pricing: str | None = None
    auth_header: str | None = None
    # Endpoints the proxy cannot meter, opened anyway (logged unpriced, never under a USD
    # budget), by the name the refusal gives (e.g. batches, images.generations).
    allow_unmetered: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class BudgetConfig:
    name: str | None = None
    period: Period = Period.MONTH
    limit_usd: float | None = None
    scope: dict[str, str] = field(default_factory=dict)
    limit_tokens: int | None = None
    enforce: Enforce = Enforce.BLOCK
    timezone: str = "UTC"


class Per(StrEnum):
    """The length of a rate limit's sliding window."""

    SECOND = "second"
    MINUTE = "minute"
    HOUR = "hour"


PER_SECONDS = {Per.SECOND: 1, Per.MINUTE: 60, Per.HOUR: 3600}


@dataclass(frozen=True)
class RateLimitConfig:
    name: str | None = None
    scope: dict[str, str] = field(default_factory=dict)
    per: Per = Per.MINUTE
    requests: int | None = None
    tokens: int | None = None
    usd: float | None = None


@dataclass(frozen=True)
class KeyConfig:
    name: str = ""
    key_sha256: str = ""
    budgets: list[BudgetConfig] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    models: list[str] = field(default_factory=list)
    refusal_status: int | None = None  # this key's clients' own (else server.refusal_status)
    # Attribution the key fixes: headers may repeat these values, never change them.
    customer: str | None = None
    feature: str | None = None
    # The only customers this key may name (X-Meter-Customer); empty: any.
    customers: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ReservationsConfig:
    default_max_output_tokens: int = 4096
    ttl_s: float = 900


@dataclass(frozen=True)
class AlertsConfig:
    thresholds: list[float] = field(default_factory=lambda: [0.5, 0.8, 1.0])
    webhook_url: str | None = None


@dataclass(frozen=True)
class CustomerConfig:
    plan_usd: float | None = None  # what the customer pays per month


@dataclass(frozen=True)
class UnitEconomicsConfig:
    max_cost_share: float = 0.3  # flag a customer whose AI cost exceeds this share of price


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: str = "auto"


@dataclass(frozen=True)
class BillingSourceConfig:
    """Where one provider's bill is read, and which of its keys/projects are the proxy's."""

    base_url: str | None = None  # None: the provider's public API
    admin_key_env: str | None = None
    api_key_ids: list[str] = field(default_factory=list)
    project_ids: list[str] = field(default_factory=list)  # OpenAI projects, GCP projects
    workspace_ids: list[str] = field(default_factory=list)  # Anthropic workspaces
    billing_export: str | None = None  # Gemini: a Cloud Billing export file (JSONL/CSV)


@dataclass(frozen=True)
class ReconcileConfig:
    every: str | None = None  # e.g. 24h: the server checks the previous day this often
    tolerance_pct: float = 1.0
    openai: BillingSourceConfig = field(default_factory=lambda: BillingSourceConfig(
        admin_key_env="OPENAI_ADMIN_KEY"))
    anthropic: BillingSourceConfig = field(default_factory=lambda: BillingSourceConfig(
        admin_key_env="ANTHROPIC_ADMIN_KEY"))
    gemini: BillingSourceConfig = field(default_factory=BillingSourceConfig)


@dataclass(frozen=True)
class TelemetryConfig:
    otlp_endpoint: str | None = None  # OTLP/HTTP base URL, e.g. http://collector:4318
    service_name: str = "meterproxy"
    export_interval_ms: int = 10000  # how often metrics are pushed


# Sensitivity words: how many robust standard deviations above its baseline an hour's
# spend must be to fire (a number may be given instead).
SENSITIVITY = {"low": 6.0, "medium": 4.0, "high": 3.0}
ANOMALY_SCOPES = ("key", "customer", "feature")


@dataclass(frozen=True)
class AnomaliesConfig:
    """Spend anomaly guardrails (docs/anomalies.md); absent from the file: off."""

    # low | medium | high, or the threshold in robust SDs; low by default: the backtest's
    # best precision at the same recall (docs/anomalies.md)
    sensitivity: Any = "low"
    action: AnomalyAction = AnomalyAction.ALERT
    scopes: list[str] = field(default_factory=lambda: list(ANOMALY_SCOPES))
    min_usd: float = 1.0  # the smallest excess over the baseline per hour that fires
    weeks: int = 4  # history the baseline reads
    min_history_hours: int = 24  # a younger scope is not judged
    check_every_s: float = 60
    resolve_after_minutes: int = 30  # alert mode: quiet this long ends the episode

    @property
    def threshold(self) -> float:
        """The sensitivity as robust standard deviations."""
        if isinstance(self.sensitivity, str) and self.sensitivity in SENSITIVITY:
            return SENSITIVITY[self.sensitivity]
        return float(self.sensitivity)


@dataclass(frozen=True)
class Settings:
    server: ServerConfig = field(default_factory=ServerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    pricing: PricingConfig = field(default_factory=PricingConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    providers: dict[str, ProviderConfig] = field(default_factory=dict)
    keys: list[KeyConfig] = field(default_factory=list)
    budgets: list[BudgetConfig] = field(default_factory=list)
    rate_limits: list[RateLimitConfig] = field(default_factory=list)
    reservations: ReservationsConfig = field(default_factory=ReservationsConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    customers: dict[str, CustomerConfig] = field(default_factory=dict)
    unit_economics: UnitEconomicsConfig = field(default_factory=UnitEconomicsConfig)
    reconcile: ReconcileConfig = field(default_factory=ReconcileConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    anomalies: AnomaliesConfig | None = None
    source: str = "<built-in defaults>"

    def provider(self, name: str) -> ProviderConfig | None:
        return self.providers.get(name)

    def pricing_table(self, provider: str) -> str:
        conf = self.providers[provider]
        return conf.pricing or provider


SCOPE_KEYS = ("key", "customer", "feature", "trace")
# Statuses a budget refusal may take: no client retries 402 or 403 (some retry every 429).
REFUSAL_STATUSES = (429, 402, 403)


def find_config_file(explicit: str | None) -> Path | None:
    """The file a command reads: --config, else $METERPROXY_CONFIG, else ./meterproxy.yaml."""
    if explicit:
        return Path(explicit)
    if os.environ.get(ENV_FILE):
        return Path(os.environ[ENV_FILE])
    default = Path(DEFAULT_FILE)
    return default if default.exists() else None


def load_settings(explicit: str | None = None) -> Settings:
    """Read the configuration the way every command does (see find_config_file)."""
    path = find_config_file(explicit)
    if path is None:
        return parse_settings({}, "<built-in defaults>")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(exc, "problem", exc)
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    return parse_settings(data or {}, str(path))


def parse_settings(data: Any, source: str) -> Settings:
    """Build Settings from parsed YAML, checking every key and type."""
    from proxy.dialects import builtin_providers

    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    data = dict(data)
    providers_raw = data.pop("providers", None) or {}
    if not isinstance(providers_raw, dict):
        raise ConfigError(f"{source}: providers: must be a mapping of name to settings")
    settings: Settings = _build(Settings, data, "", source)
    providers: dict[str, ProviderConfig] = {}
    for name, (dialect, builtin) in builtin_providers().items():
        providers[name] = ProviderConfig(base_url=builtin.base_url, dialect=dialect,
                                         api_key_env=builtin.api_key_env)
    for name, conf in providers_raw.items():
        path = f"providers.{name}"
        if not isinstance(conf, dict):
            raise ConfigError(f"{source}: {path}: must be a mapping")
        base = dataclasses.asdict(providers[name]) if name in providers else {}
        providers[name] = _build(ProviderConfig, {**base, **conf}, path, source)
    settings = dataclasses.replace(settings, providers=providers, source=source)
    _validate(settings)
    return settings


def _validate(s: Settings) -> None:
    from proxy.dialects import registry

    src = s.source

    def fail(path: str, msg: str) -> typing.NoReturn:
        raise ConfigError(f"{src}: {path}: {msg}")

    if s.auth.mode is AuthMode.PASSTHROUGH and any(k.budgets for k in s.keys):
        fail("keys[].budgets", "passthrough mode has no virtual keys to hold these budgets "
             "against: use auth.mode virtual_keys, or move them to top-level budgets")
    if not 0 < s.server.port < 65536:
        fail("server.port", f"must be a TCP port (1-65535), not {s.server.port}")
    if s.reservations.default_max_output_tokens <= 0 or s.reservations.ttl_s <= 0:
        fail("reservations", "default_max_output_tokens and ttl_s must be positive")
    if s.server.max_body_mb <= 0:
        fail("server.max_body_mb", "must be positive")
    if s.server.refusal_status not in REFUSAL_STATUSES:
        fail("server.refusal_status", f"must be 429, 402 or 403, not {s.server.refusal_status!r}")
    if s.storage.fold_refusals_ms < 0:
        fail("storage.fold_refusals_ms", "must be 0 (never fold) or more")
    for name in ("header_timeout_s", "body_timeout_s", "max_connections",
                 "estimate_bytes_above_kb"):
        if getattr(s.server, name) <= 0:
            fail(f"server.{name}", "must be positive")
    for name, p in s.providers.items():
        if p.dialect not in registry():
            fail(f"providers.{name}.dialect", f"must be one of {', '.join(registry())}, "
                 f"not {p.dialect!r}")
        if not p.base_url.startswith(("http://", "https://")):
            fail(f"providers.{name}.base_url", f"must be an http(s) URL, not {p.base_url!r}")
        if p.timeout_s <= 0:
            fail(f"providers.{name}.timeout_s", "must be positive")
        if not name.replace("-", "").replace("_", "").isalnum() or name.startswith("_"):
            fail(f"providers.{name}", "a provider name is letters, digits, - and _")
    seen: dict[str, int] = {}
    for i, key in enumerate(s.keys):
        path = f"keys[{i}]"
        if not key.name:
            fail(f"{path}.name", "is required")
        digest = key.key_sha256.lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            fail(f"{path}.key_sha256", "must be the 64 hex digits of the key's sha256 "
                 "(meterproxy keys new NAME prints it)")
        if digest in seen:
            fail(f"{path}.key_sha256", f"repeats keys[{seen[digest]}]")
        seen[digest] = i
        if key.refusal_status is not None and key.refusal_status not in REFUSAL_STATUSES:
            fail(f"{path}.refusal_status", f"must be 429, 402 or 403, not {key.refusal_status!r}")
        for j, b in enumerate(key.budgets):
            _validate_budget(b, f"{path}.budgets[{j}]", fail)
        if key.customer is not None and key.customers and key.customer not in key.customers:
            fail(f"{path}.customer", "is pinned to a customer not in its customers list")
    for i, b in enumerate(s.budgets):
        _validate_budget(b, f"budgets[{i}]", fail)
        if not b.scope:
            fail(f"budgets[{i}].scope", "is required (e.g. {customer: acme})")
    names: dict[str, int] = {}
    for i, r in enumerate(s.rate_limits):
        _validate_rate_limit(r, f"rate_limits[{i}]", fail)
        if r.name is not None:
            if r.name in names:
                fail(f"rate_limits[{i}].name", f"repeats rate_limits[{names[r.name]}]")
            names[r.name] = i
    for t in s.alerts.thresholds:
        if not 0 < t <= 10:
            fail("alerts.thresholds", f"each threshold is a fraction of the limit, not {t}")
    for name, customer in s.customers.items():
        if customer.plan_usd is not None and customer.plan_usd < 0:
            fail(f"customers.{name}.plan_usd", "must not be negative")
    endpoint = s.telemetry.otlp_endpoint
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        fail("telemetry.otlp_endpoint", f"must be an http(s) URL (OTLP/HTTP), not {endpoint!r}")
    if s.telemetry.export_interval_ms <= 0:
        fail("telemetry.export_interval_ms", "must be positive")
    if not 0 < s.unit_economics.max_cost_share <= 10:
        fail("unit_economics.max_cost_share", "is a fraction of the customer's price, "
             f"e.g. 0.3, not {s.unit_economics.max_cost_share}")
    _validate_reconcile(s.reconcile, fail)
    if s.anomalies is not None:
        _validate_anomalies(s.anomalies, fail)
    for key, value in s.pricing.overrides.items():
        if not isinstance(value, dict):
            fail(f"pricing.overrides.{key}", "must be a mapping")


_INTERVAL = re.compile(r"(\d+)\s*([smhd])")
_INTERVAL_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def interval_seconds(text: str) -> int:
    """`30m`, `24h`, `1d` as seconds; ValueError for anything else."""
    m = _INTERVAL.fullmatch(text.strip())
    if not m or int(m.group(1)) <= 0:
        raise ValueError(f"an interval is a whole number and s, m, h or d (e.g. 24h), not {text!r}")
    return int(m.group(1)) * _INTERVAL_S[m.group(2)]


def _validate_reconcile(r: ReconcileConfig, fail: Any) -> None:
    if r.every is not None:
        try:
            interval_seconds(r.every)
        except ValueError as exc:
            fail("reconcile.every", str(exc))
    if not 0 <= r.tolerance_pct <= 100:
        fail("reconcile.tolerance_pct", f"must be a percentage, 0 to 100, not {r.tolerance_pct}")
    for name in ("openai", "anthropic", "gemini"):
        source: BillingSourceConfig = getattr(r, name)
        if source.base_url is not None and not source.base_url.startswith(("http://",
                                                                           "https://")):
            fail(f"reconcile.{name}.base_url", f"must be an http(s) URL, not {source.base_url!r}")


def _validate_anomalies(a: AnomaliesConfig, fail: Any) -> None:
    words = ", ".join(SENSITIVITY)
    value = a.sensitivity
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        fail("anomalies.sensitivity", f"must be {words} or a number, not {value!r}")
    if isinstance(value, str) and value not in SENSITIVITY:
        fail("anomalies.sensitivity", f"must be {words} or a number of robust standard "
             f"deviations (e.g. 4), not {value!r}")
    if not isinstance(value, str) and not 1 <= value <= 50:
        fail("anomalies.sensitivity", f"a number is robust standard deviations, 1 to 50, "
             f"not {value}")
    if not a.scopes:
        fail("anomalies.scopes", f"needs at least one of {', '.join(ANOMALY_SCOPES)}")
    for i, scope in enumerate(a.scopes):
        if scope not in ANOMALY_SCOPES:
            fail(f"anomalies.scopes[{i}]", f"must be one of {', '.join(ANOMALY_SCOPES)} "
                 f"(tags are not watched: a caller picks them freely), not {scope!r}")
    if a.min_usd < 0:
        fail("anomalies.min_usd", "must not be negative")
    if not 1 <= a.weeks <= 52:
        fail("anomalies.weeks", f"must be 1 to 52, not {a.weeks}")
    if not 1 <= a.min_history_hours <= 24 * 7 * a.weeks:
        fail("anomalies.min_history_hours", "must be at least 1 and within the weeks read")
    if not 1 <= a.check_every_s <= 3600:
        fail("anomalies.check_every_s", f"must be 1 to 3600 seconds, not {a.check_every_s}")
    if a.resolve_after_minutes < 1:
        fail("anomalies.resolve_after_minutes", "must be at least 1")


def _validate_budget(b: BudgetConfig, path: str, fail: Any) -> None:
    if b.limit_usd is None and b.limit_tokens is None:
        fail(path, "needs limit_usd or limit_tokens")
    if b.limit_usd is not None and b.limit_usd < 0:
        fail(f"{path}.limit_usd", "must not be negative")
    if b.limit_tokens is not None and b.limit_tokens < 0:
        fail(f"{path}.limit_tokens", "must not be negative")
    try:
        ZoneInfo(b.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        fail(f"{path}.timezone", f"unknown time zone {b.timezone!r}")
    _validate_scope(b.scope, f"{path}.scope", fail)


def _validate_scope(scope: dict[str, str], path: str, fail: Any) -> None:
    """The scope syntax budgets and rate limits share."""
    for dim, value in scope.items():
        if dim not in SCOPE_KEYS and not dim.startswith("tag:"):
            fail(f"{path}.{dim}", "scopes take key, customer, feature, trace or tag:NAME")
        if not value:
            fail(f"{path}.{dim}", 'needs a value, or "*" for each value separately')


def _validate_rate_limit(r: RateLimitConfig, path: str, fail: Any) -> None:
    if not r.scope:
        fail(f"{path}.scope", "is required (e.g. {key: search-team}, or {customer: \"*\"})")
    _validate_scope(r.scope, f"{path}.scope", fail)
    if r.requests is None and r.tokens is None and r.usd is None:
        fail(path, "needs requests, tokens or usd (the most a window may hold)")
    for name in ("requests", "tokens", "usd"):
        value = getattr(r, name)
        if value is not None and value <= 0:
            fail(f"{path}.{name}", f"must be positive, not {value!r} (to refuse every call, "
                 "use a key's models list or remove the key)")


def _build(cls: type, data: Any, path: str, source: str) -> Any:
    """Construct dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    where = path or "the top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where}: must be a mapping, not {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    kwargs = {}
    for key, value in data.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{source}: {sub}: unknown key (known here: {known})")
        kwargs[key] = _coerce(hints[key], value, sub, source)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path, source)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path, source)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {path}: must be a list")
        return [_coerce(args[0], v, f"{path}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {path}: must be a mapping")
        return {str(k): _coerce(args[1], v, f"{path}.{k}", source) for k, v in value.items()}
    if hint is Any:
        return value
    if isinstance(hint, type) and issubclass(hint, StrEnum):
        try:
            return hint(value)
        except ValueError:
            raise ConfigError(f"{source}: {path}: must be one of "
                              f"{', '.join(hint)}, not {value!r}") from None
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {path}: must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {path}: must be a whole number, not {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{source}: {path}: must be a number, not {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, date | datetime):
            return value.isoformat()
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(f"{source}: {path}: must be a string, not {value!r}")
        return str(value)
    return value
