"""An operator's first hour: clear one-line errors, start-up warnings, --version, --help."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import openai
import yaml

from tests.conftest import VIRTUAL_KEY, Served, Stack, free_port

ROOT = Path(__file__).resolve().parent.parent


def meterproxy(*args: str, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})}, cwd=cwd)


def test_taken_port_is_one_line_and_leaves_no_database(tmp_path: Path) -> None:
    """`serve` on a port in use says so in one line, exits 1, and creates no database."""
    db = tmp_path / "fresh.db"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"storage": {"usage_log": f"sqlite:///{db}"}}))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = meterproxy("serve", "--config", str(config), "--port", str(port))
    assert done.returncode != 0
    assert f"port {port} on 127.0.0.1 is already in use" in done.stderr
    assert "Traceback" not in done.stderr
    assert not db.exists()


def test_postgres_log_without_psycopg_is_one_line(tmp_path: Path) -> None:
    """A postgresql:// log without the scale extra names the extra, no traceback."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['psycopg'] = None\n")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"storage": {"usage_log": "postgresql://u@127.0.0.1/x"}}))
    done = meterproxy("serve", "--config", str(config), "--port", str(free_port()),
                      env={"PYTHONPATH": f"{hide}{os.pathsep}{ROOT}"})
    assert done.returncode != 0
    assert "pip install 'meterproxy[scale]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_unreadable_log_is_one_line(tmp_path: Path) -> None:
    """`usage` on a file that is not a SQLite database says so in one line."""
    db = tmp_path / "garbage.db"
    db.write_bytes(b"this is not a database" * 100)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"storage": {"usage_log": f"sqlite:///{db}"}}))
    done = meterproxy("usage", "--config", str(config))
    assert done.returncode == 2
    assert done.stderr.startswith("meterproxy: ") and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_start_up_warns_of_what_will_fail(tmp_path: Path) -> None:
    """No keys, no admin key, a provider key unset: each is a warning at start."""
    config = {"storage": {"usage_log": f"sqlite:///{tmp_path}/u.db"},
              "server": {"admin_key_env": "METERPROXY_TEST_NO_SUCH_ADMIN"},
              "providers": {"openai": {"base_url": "http://127.0.0.1:9",
                                       "api_key_env": "METERPROXY_TEST_NO_SUCH_KEY"}}}
    served = Served(tmp_path, config)
    try:
        logs = served.logs()
    finally:
        assert served.stop() == 0
    assert '"event":"no_keys_configured"' in logs
    assert '"event":"admin_key_unset"' in logs and "METERPROXY_TEST_NO_SUCH_ADMIN" in logs
    assert '"event":"provider_keys_missing"' in logs and "METERPROXY_TEST_NO_SUCH_KEY" in logs


def test_missing_provider_key_is_not_retried(tmp_path: Path) -> None:
    """The 503 for a provider key the proxy lacks says `x-should-retry: false`: the SDK
    (max_retries=2) asks once, so one row, not three."""
    stack = Stack(tmp_path, {"providers": {"openai": {"api_key_env": "METERPROXY_UNSET_1"}}})
    try:
        client = openai.OpenAI(base_url=stack.base(), api_key=VIRTUAL_KEY, max_retries=2)
        before = len(stack.rows())
        try:
            client.chat.completions.create(model="gpt-4o-mini",
                                           messages=[{"role": "user", "content": "x"}])
        except openai.APIStatusError as err:
            assert err.status_code == 503
            assert err.response.headers["x-should-retry"] == "false"
        rows = stack.rows(before + 1)
        assert len(rows) == before + 1
    finally:
        stack.close()


def test_version_and_a_light_help() -> None:
    """`--version` names the version; `--help` loads neither aiohttp nor the price tables."""
    done = meterproxy("--version")
    assert done.returncode == 0 and done.stdout.startswith("meterproxy ")
    probe = ("import sys\nfrom proxy.cli import main\ntry:\n    main(['--help'])\n"
             "except SystemExit:\n    pass\nprint(sorted(m for m in ('aiohttp', 'proxy.pricing',"
             " 'sqlite_utils', 'proxy.query') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.stdout.strip().splitlines()[-1] == "[]"
