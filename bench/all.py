"""Every benchmark of issue 18 in one command, and the tables of docs/performance.md.

    python -m bench.all --quick     # about 2 minutes: a smoke run, results in bench/results/quick/
    python -m bench.all             # loadgen (~8 min on 2 cores), soak (10 min), scale (~2 min)
    python -m bench.all --no-soak   # the soak is the long part: run it on its own later with
    python -m bench.soak            # ... and then `python -m bench.all --render` to redo the docs
    python -m bench.all --render    # rewrite the docs' tables from bench/results/*.json only
    python -m bench.all --soak-no-cuts   # also a soak without cut streams (budgets alone)

A full run writes bench/results/loadgen.json, soak.json (and soak_no_cuts.json), scale.json
(each with its .md) and all.md, and rewrites two generated sections of docs/performance.md,
each between its own marker comments: the load and soak tables (this module's markers)
and the scale-out section (bench/scale.py's). Nothing outside the markers is touched. A
quick run writes to bench/results/quick/ and leaves the docs alone unless `--doc` is given.

The box's load goes into every result (load averages before and after, `uptime`, the
CPU other processes took during each cell); when others took more than a quarter of the
CPU, the section says the figures are preliminary, measured under load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench import loadgen, scale, soak

ROOT = loadgen.ROOT
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "performance.md"
START = ("<!-- bench.all: start (written by `python -m bench.all`; edit bench/all.py, "
         "not this) -->")
END = "<!-- bench.all: end -->"
BUSY_PCT = 25  # others' median CPU share above which a run is "under load"


def loadgen_argv(quick: bool, out: Path, args: argparse.Namespace) -> list[str]:
    argv = ["--out", str(out), "--plot", str(args.plot) if args.plot else "",
            "--dialects", args.dialects]
    if quick:
        argv += ["--duration", "0.4", "--rounds", "1", "--warmup", "0.2", "--settle", "0.2"]
    if args.no_litellm:
        argv.append("--no-litellm")
    return argv


def under_load(results: dict[str, Any]) -> float | None:
    """The median share of the CPU other processes took during the cells, if over the mark."""
    others = [s["others_cpu_pct"] for s in results.get("samples", [])
              if s.get("others_cpu_pct") is not None]
    if not others:
        return None
    median = statistics.median(others)
    return median if median > BUSY_PCT else None


def section(load: dict[str, Any] | None, soaked: dict[str, Any] | None,
            note: str = "", uncut: dict[str, Any] | None = None) -> str:
    """The generated part of docs/performance.md: loadgen's tables per dialect, the
    targets (the soak's memory among them) and the soak."""
    out = ["## Metering overhead in every dialect (issue 18)", ""]
    if load is None:
        out += ["No loadgen results yet: run `python -m bench.all`.", ""]
    else:
        busy = under_load(load)
        if note or busy is not None:
            out += ["**Preliminary" + (", under load" if busy is not None else "") + ".** "
                    + (f"{note.rstrip('.')}. " if note else "")
                    + (f"Other processes took {busy:.0f}% of the CPU (median over cells): "
                       "latency and throughput figures are noise, CPU per call and the "
                       "paired ratios less so; re-run `python -m bench.all` on a quiet box."
                       if busy is not None else ""), ""]
        out += [
            "`python -m bench.all` runs `bench.loadgen` (how it works and what each figure "
            "means: [bench/README.md](../bench/README.md)): a fake provider answering at once "
            "with canned bytes in each wire format, usage included; the same calls go to it "
            "**direct**, through a **bare aiohttp pass-through** (the floor for a Python "
            "proxy), through **meterproxy with everything on** (virtual key, attribution "
            "headers and tags, a key budget every call reserves and settles against, pricing, "
            "the SQLite usage log, JSON logs) and through the **LiteLLM proxy** (its own venv, "
            "one worker, no database, every model routed to the same fake provider). Ratios "
            "are paired round by round against the pass-through.", "",
            f"`uptime` before the run: `{load['machine'].get('uptime', '')}`", "",
            loadgen.markdown(load, "###").rstrip("\n"), ""]
    out += ["### Memory over the soak (issue 18: RSS < 100 MB, flat, budgets on)", ""]
    if soaked is None or "rss_start_mb" not in soaked:
        out += ["No soak results of this version yet: run `python -m bench.soak` (10 minutes), "
                "then `python -m bench.all --render`.", ""]
    else:
        out += [soak.markdown(soaked).rstrip("\n"), ""]
    if uncut is not None and "rss_start_mb" in uncut:
        out += ["Without cut streams (`--cut-share 0`, or `--soak-no-cuts` here): every call "
                "reports its usage, so nothing needs an estimate and the tokenizer (about "
                "44 MB) never loads; budgets hold prompts by their byte length far from a "
                "limit (docs/budgets.md, \"The prompt's count\").", "",
                soak.markdown(uncut).rstrip("\n"), ""]
    return "\n".join(out)


def write_section(path: Path, text: str) -> None:
    """Put `text` between this module's markers, leaving the rest of the file alone; the
    first time, right after the title."""
    doc = path.read_text() if path.exists() else "# Performance\n"
    block = f"{START}\n{text.rstrip()}\n{END}\n"
    if START in doc and END in doc:
        head, rest = doc.split(START, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        doc = head + block + ("\n" + tail if tail else "")
    else:
        title, sep, rest = doc.partition("\n")
        doc = title + sep + "\n" + block + "\n" + rest.lstrip("\n")
    path.write_text(doc)


def read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.all", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="short cells, one round, a 30 s soak: a smoke run (~2 min)")
    parser.add_argument("--render", action="store_true",
                        help="run nothing: rewrite the docs from the results on disk")
    parser.add_argument("--no-soak", action="store_true", help="skip the soak")
    parser.add_argument("--soak-no-cuts", action="store_true",
                        help="also soak without cut streams (no estimates: budgets alone)")
    parser.add_argument("--no-scale", action="store_true", help="skip the scale-out run")
    parser.add_argument("--no-litellm", action="store_true", help="skip LiteLLM")
    parser.add_argument("--soak-minutes", type=float, default=None,
                        help="soak length (10; --quick: 0.5)")
    parser.add_argument("--dialects", default=",".join(loadgen.DIALECTS))
    parser.add_argument("--note", default="", help="said at the top of the docs' section")
    parser.add_argument("--doc", default=None,
                        help=f"the file to rewrite (default {DOC.relative_to(ROOT)}; --quick: "
                             "none unless given; '' for none)")
    parser.add_argument("--plot", default=None,
                        help="throughput PNG (default docs/performance.png; --quick: none)")
    args = parser.parse_args(argv)
    if args.doc is None:
        args.doc = "" if args.quick else str(DOC)
    if args.plot is None:
        args.plot = "" if args.quick else str(ROOT / "docs" / "performance.png")
    if args.soak_minutes is None:
        args.soak_minutes = 0.5 if args.quick else 10.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = RESULTS / "quick" if args.quick else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / f"{name}.json"
             for name in ("loadgen", "soak", "soak_no_cuts", "scale")}
    timings: dict[str, float] = {}
    status = 0
    if not args.render:
        began = time.monotonic()
        print("== loadgen", file=sys.stderr)
        results = loadgen.bench(loadgen.parse_args(loadgen_argv(args.quick, paths["loadgen"],
                                                                args)))
        if args.plot:
            loadgen.plot(results, Path(args.plot))
        timings["loadgen_s"] = round(time.monotonic() - began, 1)
        for dialect, log in results["usage_log"].items():
            if log["rows"] != log["calls_sent"]:
                print(f"warning: meterproxy logged {log['rows']} {dialect} rows for "
                      f"{log['calls_sent']} calls", file=sys.stderr)
                status = 1
        if not args.no_scale:
            began = time.monotonic()
            print("== scale", file=sys.stderr)
            scale_argv = ["--out", str(paths["scale"]), "--doc", args.doc]
            if args.quick:
                scale_argv += ["--duration", "0.5", "--rounds", "1", "--workers", "1,2",
                               "--concurrency", "32", "--warmup", "0.3"]
            status |= scale.main(scale_argv)
            timings["scale_s"] = round(time.monotonic() - began, 1)
        if not args.no_soak:
            began = time.monotonic()
            print(f"== soak ({args.soak_minutes:g} min)", file=sys.stderr)
            status |= soak.main(["--minutes", str(args.soak_minutes), "--out",
                                 str(paths["soak"]), "--dialects", args.dialects])
            timings["soak_s"] = round(time.monotonic() - began, 1)
        if args.soak_no_cuts:
            began = time.monotonic()
            print(f"== soak without cut streams ({args.soak_minutes:g} min)", file=sys.stderr)
            status |= soak.main(["--minutes", str(args.soak_minutes), "--cut-share", "0",
                                 "--out", str(paths["soak_no_cuts"]),
                                 "--dialects", args.dialects])
            timings["soak_no_cuts_s"] = round(time.monotonic() - began, 1)
    load, soaked = read(paths["loadgen"]), read(paths["soak"])
    if load is not None and timings:
        load["bench_all_timings"] = timings
        paths["loadgen"].write_text(json.dumps(load, indent=1) + "\n")
    text = section(load, soaked, args.note, read(paths["soak_no_cuts"]))
    (folder / "all.md").write_text(text)
    if args.doc:
        write_section(Path(args.doc), text)
    print(text)
    if timings:
        print("run time: " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in timings.items()),
              file=sys.stderr)
    print(f"results: {folder}" + (f"; docs: {args.doc}" if args.doc else ""), file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
