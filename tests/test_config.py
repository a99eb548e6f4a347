"""Configuration: defaults, the example file, and one clear line per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import ConfigError, load_settings, parse_settings

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_need_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without any file the proxy runs on SQLite with the built-in providers."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("METERPROXY_CONFIG", raising=False)
    settings = load_settings(None)
    assert settings.storage.usage_log == "sqlite:///meterproxy.db"
    assert settings.server.port == 8787
    assert {"openai", "anthropic", "gemini"} <= set(settings.providers)


def test_example_config_is_valid() -> None:
    """config.example.yaml, which documents every key, loads as it is."""
    settings = load_settings(str(ROOT / "config.example.yaml"))
    assert settings.keys[0].name == "search-team"
    assert settings.budgets[0].scope == {"customer": "acme"}


def test_env_var_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$METERPROXY_CONFIG is read when --config is not given."""
    path = tmp_path / "conf.yaml"
    path.write_text("server: {port: 9999}\n")
    monkeypatch.setenv("METERPROXY_CONFIG", str(path))
    assert load_settings(None).server.port == 9999


@pytest.mark.parametrize(("text", "expected"), [
    ("server: {prot: 1}\n", "server.prot: unknown key"),
    ("server: {port: many}\n", "server.port: must be a whole number"),
    ("auth: {mode: open}\n", "auth.mode: must be one of virtual_keys, passthrough"),
    ("keys: [{name: a, key_sha256: abc}]\n", "keys[0].key_sha256: must be the 64 hex digits"),
    ("providers: {x: {base_url: ftp://a, dialect: openai}}\n",
     "providers.x.base_url: must be an http(s) URL"),
    ("providers: {x: {base_url: 'http://a', dialect: soap}}\n",
     "providers.x.dialect: must be one of anthropic, gemini, openai"),
    ("budgets: [{scope: {customer: a}, period: fortnight, limit_usd: 1}]\n",
     "budgets[0].period: must be one of day, week, month, total"),
    ("keys: [{name: a, key_sha256: '" + "a" * 64 + "', budgets: [{period: day}]}]\n",
     "keys[0].budgets[0]: needs limit_usd or limit_tokens"),
    ("server: [1, 2]\n", "server: must be a mapping"),
    ("server: {port: 1\n", "not valid YAML"),
])
def test_config_errors_name_file_key_and_problem(tmp_path: Path, text: str,
                                                 expected: str) -> None:
    """Each mistake is one line: the file, the key path and what is wrong."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert "\n" not in message


def test_provider_override_keeps_builtin_fields() -> None:
    """Overriding one field of a built-in provider keeps the others."""
    settings = parse_settings({"providers": {"openai": {"timeout_s": 5}}}, "<t>")
    assert settings.providers["openai"].timeout_s == 5
    assert settings.providers["openai"].base_url == "https://api.openai.com"
    assert settings.providers["openai"].api_key_env == "OPENAI_API_KEY"
