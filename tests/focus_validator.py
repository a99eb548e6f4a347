"""The FinOps Foundation's focus-validator, in a cached Python 3.12 venv of its own.

focus-validator 2.2.1 needs Python 3.12 and pins numpy<2, which a current pyarrow will
not load beside: so pyarrow<18 goes in with it. The venv is built once per machine
(under a file lock, as parallel test runs share it) in a folder named by those versions.
The validator reads `focus_validator/rules/currency_codes.csv` relative to the working
directory, so it runs from its site-packages folder; it exits 0 even when rules fail,
so callers read its summary line.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

VALIDATOR = "focus-validator==2.2.1"
PINS = ("pyarrow<18",)
PYTHON = "3.12"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "meterproxy"
VENV = CACHE / f"focus-validator-2.2.1-py{PYTHON}-pyarrow17"
SUMMARY = re.compile(r"Total: (\d+) \| Pass: (\d+) \| Fail: (\d+) \| Skipped: (\d+)")
INSTALL_HINT = (f"focus-validator needs Python {PYTHON}: pyenv install {PYTHON} "
                f"(or apt-get install python{PYTHON} python{PYTHON}-venv)")


def python312() -> str | None:
    """A Python 3.12 interpreter: pyenv's newest 3.12.x, else python3.12 on PATH."""
    if shutil.which("pyenv"):
        found = subprocess.run(["pyenv", "versions", "--bare"], capture_output=True,
                               text=True, check=False).stdout.split()
        versions = sorted((v for v in found if re.fullmatch(rf"{PYTHON}\.\d+", v)),
                          key=lambda v: int(v.rsplit(".", 1)[1]))
        if versions:
            which = subprocess.run(["pyenv", "which", "python"], capture_output=True,
                                   text=True, check=False,
                                   env={**os.environ, "PYENV_VERSION": versions[-1]})
            if which.returncode == 0 and which.stdout.strip():
                return which.stdout.strip()
    return shutil.which(f"python{PYTHON}")


def venv_python() -> Path:
    """The venv's interpreter, building the venv first if this machine has none yet."""
    python = VENV / "bin" / "python"
    done = VENV / ".complete"
    if done.exists():
        return python
    base = python312()
    if base is None:
        pytest.skip(INSTALL_HINT)
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{VENV.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():  # another run built it while this one waited
            return python
        shutil.rmtree(VENV, ignore_errors=True)  # a build that was interrupted
        subprocess.run([base, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", VALIDATOR, *PINS],
                       check=True, timeout=900)
        done.write_text(f"{VALIDATOR} {' '.join(PINS)}\n")
    return python


def site_packages(python: Path) -> Path:
    return Path(subprocess.run(
        [str(python), "-c", "import focus_validator, pathlib; "
                            "print(pathlib.Path(focus_validator.__file__).parent.parent)"],
        capture_output=True, text=True, check=True).stdout.strip())


# Rules of focus-validator 2.2.1's FOCUS 1.2 model that no dataset can pass, each with the
# reason (read from the model file and confirmed by running it on variants of our export).
DEFECTS = {
    "CapacityReservationStatus-C-004-C":
        "its condition is written {'AND': [...]}, which the validator drops "
        "(finopsfoundation/focus_validator#142); enforced on every row, 'MUST NOT be null' "
        "contradicts C-003-C 'MUST be null', whose condition is dropped the same way",
    "CommitmentDiscountStatus-C-004-C":
        "its condition is inverted (CommitmentDiscountId IS NULL where the spec says 'is not "
        "null'), so it contradicts C-003-C on every row without a commitment discount",
    "InvoiceId-C-005-C":
        "C-004-C 'MUST be null' and C-005-C 'MUST NOT be null' both run unconditionally "
        "(whether a charge is on an invoice is not in the data): one of the two always fails",
}
# The composite rules that fail because a defective child does.
DEFECT_PARENTS = {"CapacityReservationStatus-C-000-C", "CapacityReservationStatus-C-002-C",
                  "CommitmentDiscountStatus-C-000-C", "CommitmentDiscountStatus-C-002-C",
                  "CostAndUsage-D-000-M", "CostAndUsage-D-002-M"}
FAILED = re.compile(r"^\S+ (\S+): FAIL ", re.MULTILINE)


@dataclass
class Verdict:
    line: str  # the summary line, as the validator printed it
    passed: int
    failed: set[str]  # the ids of the failed rules
    output: str


def validate(path: Path, rules: Path | None = None) -> Verdict:
    """Run the validator (FOCUS 1.2, every applicability criterion) on a CSV or Parquet."""
    python = venv_python()
    fmt = "parquet" if path.suffix == ".parquet" else "csv"
    result = subprocess.run(
        [str(python), "-m", "focus_validator.main", "--data-file", str(path.resolve()),
         "--data-format", fmt, "--validate-version", "1.2", "--block-download",
         "--applicability-criteria", "ALL", "--show-violations",
         *(("--rule-set-path", str(rules)) if rules is not None else ())],
        cwd=site_packages(python), capture_output=True, text=True, timeout=600, check=False)
    output = result.stdout + result.stderr
    found = SUMMARY.search(output)
    assert found, f"no summary line from focus-validator (exit {result.returncode}):\n{output}"
    failed = set(FAILED.findall(output))
    assert len(failed) == int(found.group(3)), output
    return Verdict(found.group(0), int(found.group(2)), failed, output)


def corrected_rules(folder: Path) -> Path:
    """The validator's own FOCUS 1.2 model with its DEFECTS mended as the spec reads.

    Conditions written {'AND': ...} get the CheckFunction form the validator reads; the
    inverted condition is turned round (and, as the spec says, limited to Usage rows);
    the InvoiceId pair becomes dynamic, as rules the data cannot decide already are. One
    more inverted condition is mended though it never failed: ConsumedQuantity-C-006-C
    checked only Correction rows, and now checks every other row, which is stricter.
    """
    python = venv_python()
    model = json.loads((site_packages(python) / "focus_validator" / "rules"
                        / "model-1.2.0.1.json").read_text(encoding="utf-8"))
    rules = model["ModelRules"]

    def condition(rule: str, value: dict) -> None:
        rules[rule]["ValidationCriteria"]["Condition"] = value

    for rule in ("CapacityReservationStatus-C-003-C", "CapacityReservationStatus-C-004-C"):
        items = rules[rule]["ValidationCriteria"]["Condition"]["AND"]
        condition(rule, {"CheckFunction": "AND",
                         "Items": items if isinstance(items, list) else [items]})
    condition("CommitmentDiscountStatus-C-004-C", {"CheckFunction": "AND", "Items": [
        {"CheckFunction": "CheckNotValue", "ColumnName": "CommitmentDiscountId", "Value": None},
        {"CheckFunction": "CheckValue", "ColumnName": "ChargeCategory", "Value": "Usage"}]})
    condition("ConsumedQuantity-C-006-C", {"CheckFunction": "CheckNotValue",
                                           "ColumnName": "ChargeClass", "Value": "Correction"})
    for rule in ("InvoiceId-C-004-C", "InvoiceId-C-005-C"):
        rules[rule]["Type"] = "Dynamic"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model-1.2.0.1.json").write_text(json.dumps(model), encoding="utf-8")
    return folder
