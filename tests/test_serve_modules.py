"""What a `meterproxy serve` process loads: sqlite_utils only while a migration is pending.

sqlite_utils (about 13 MB resident) is needed only to run the usage log's migrations; a
serve on an up-to-date log reads which ran with plain sqlite3 and never imports it. The
real `python -m proxy.cli serve` runs with a `sitecustomize` that, at a clean exit
(SIGTERM: drain and flush), writes which of the watched modules the process loaded.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from proxy.storage.sqlite import MIGRATION_NAMES
from tests.conftest import Served

ROOT = Path(__file__).resolve().parent.parent
HOOK = """\
import atexit, os, sys

def _report():
    loaded = sorted(m for m in ("sqlite_utils", "proxy.storage.sqlite_migrations")
                    if m in sys.modules)
    with open(os.environ["METERPROXY_TEST_MODULES_OUT"], "w") as out:
        out.write(",".join(loaded))

atexit.register(_report)
"""


def _serve_modules(tmp: Path, db: Path, run: str) -> str:
    hook = tmp / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOOK)
    out = tmp / f"modules-{run}.txt"
    served = Served(tmp, {"storage": {"usage_log": f"sqlite:///{db}"}},
                    env={"PYTHONPATH": f"{hook}{os.pathsep}{ROOT}",
                         "METERPROXY_TEST_MODULES_OUT": str(out)})
    assert served.stop() == 0, served.logs()
    return out.read_text()


def test_serve_on_an_up_to_date_log_never_imports_sqlite_utils(tmp_path: Path) -> None:
    """The first serve creates the log (migrations pending: sqlite_utils loaded); the
    second, on the now up-to-date log, never imports sqlite_utils or the registry."""
    db = tmp_path / "usage.db"
    assert _serve_modules(tmp_path, db, "first") == \
        "proxy.storage.sqlite_migrations,sqlite_utils"
    with sqlite3.connect(db) as conn:  # every migration ran, by name
        ran = [name for (name,) in conn.execute("SELECT name FROM _sqlite_migrations")]
    conn.close()
    assert ran == list(MIGRATION_NAMES)
    assert _serve_modules(tmp_path, db, "second") == ""
