"""The benchmark suite: ``make bench`` (full) or ``make bench-quick``; measures, saves, renders.

Runs the selected sections (benchmarks/sections/, one module each), saves what each measured as plain
data in docs/benchmarks-data/<section>.json (next to the page, with the command, date, machine and
versions), then renders docs/benchmarks.md from the saved data (benchmarks/render.py; ``make
bench-render`` re-renders without measuring).

Every comparison runs infscale (this venv) and pyDVL 0.10 (the cached yardstick venv .bench-venv,
created on first use) in separate fresh processes (benchmarks/child.py) on the same saved model and
data, and in the same run the floor (plain torch: every needed per-sample gradient once plus the
final product). Then, in this process: validation against leave-one-out retraining, the linear
datamodeling score, and mislabel detection. Each section has its own fixed time budget
(config.SECTION_BUDGETS, sized from a full run's timings), so a slow section never starves the later
ones; each run has a cap (shorter for runs known to be hopeless for pyDVL); a run that would exceed
either is cut and reported as such. Runs under ``short_run_s`` are repeated (best of ``repeats``) for
both libraries.

    python benchmarks/run_all.py [--quick | --smoke] [--only digits,wide] [--budget SECONDS]
                                 [--out docs/benchmarks.md] [--no-pydvl]

``--only lds`` (or mislabel) also runs digits, whose influence matrices they use (config.REQUIRES).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT))

import render  # noqa: E402
import sections  # noqa: E402
import torch  # noqa: E402
from config import REQUIRES, SECTION_BUDGETS, SECTIONS, SIZES  # noqa: E402
from runner import Runner, ensure_bench_venv, log, machine_info, versions_info  # noqa: E402
from shared import Context, plain  # noqa: E402

SCHEMA = render.SCHEMA
COMMANDS = {"smoke": "make bench-smoke", "quick": "make bench-quick", "full": "make bench"}


def section_budgets(mode: str, total: float | None, selected: list[str]) -> dict[str, float]:
    """Seconds per selected section: SECTION_BUDGETS[mode], scaled proportionally so that the
    selected sections' budgets sum to ``total`` when it is given."""
    budgets = {k: float(SECTION_BUDGETS[mode][k]) for k in selected}
    if total:
        scale = total / sum(budgets.values())
        budgets = {k: v * scale for k, v in budgets.items()}
    return budgets


def parse_only(only: str | None) -> list[str]:
    """The sections to run, in order (all when ``only`` is None), with the sections they require
    (config.REQUIRES) added; unknown names raise SystemExit."""
    if not only:
        return list(SECTIONS)
    wanted = {s.strip() for s in only.split(",") if s.strip()}
    unknown = sorted(wanted - set(SECTIONS))
    if unknown or not wanted:
        raise SystemExit(
            f"--only: unknown section(s) {unknown or only!r}; expected some of {', '.join(SECTIONS)}"
        )
    for name in list(wanted):
        wanted |= set(REQUIRES.get(name, ()))
    return [s for s in SECTIONS if s in wanted]


def envelope(
    name: str, run: dict, budget: float, took: float, results: dict | None, error: str | None
) -> dict:
    """The saved document of one section: what made it (run), its budget and time, and its results."""
    doc = {
        "schema": SCHEMA,
        "section": name,
        "source": f"measured by `{run['command']}` (`{run['argv']}`) on {run['started']}",
        "run": run,
        "budget_s": budget,
        "took_s": took,
        "status": "ok" if error is None else "failed",
    }
    if error is not None:
        doc["error"] = error
    doc["results"] = results
    return plain(doc)


def save(data_dir: Path, doc: dict) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / f"{doc['section']}.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced sizes, at most about 15 min")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"), help="the page to render")
    parser.add_argument(
        "--data", default=None, help="where the sections' JSON goes (default: benchmarks-data/ next to --out)"
    )
    parser.add_argument("--no-pydvl", action="store_true", help="skip the pyDVL side (no venv)")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="total seconds for the selected sections; scales each section's budget proportionally "
        "(default: the sum of their SECTION_BUDGETS, about 42 min for the full run)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: only checks that the code runs")
    parser.add_argument(
        "--only", default=None, help=f"comma-separated sections (default: all): {','.join(SECTIONS)}"
    )
    args = parser.parse_args()
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    sizes = dict(SIZES[mode])
    selected = parse_only(args.only)
    budgets = section_budgets(mode, args.budget, selected)
    torch.set_num_threads(1)  # this process trains and evaluates small models; the children use 2
    started = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    t_start = time.perf_counter()
    machine = machine_info()
    pydvl_python, pydvl_version = ensure_bench_venv(not args.no_pydvl)
    planned = sum(budgets.values()) / 60
    log(f"mode {mode}; pyDVL: {pydvl_version}; sections {', '.join(selected)}: budget {planned:.0f} min")
    out = Path(args.out)
    data_dir = Path(args.data) if args.data else out.parent / "benchmarks-data"
    run = {
        "command": COMMANDS[mode],
        "argv": "python benchmarks/run_all.py" + "".join(f" {a}" for a in sys.argv[1:]),
        "mode": mode,
        "started": started.isoformat(),
        "elapsed_s": None,  # filled in at the end of the run
        "machine": machine,
        "versions": versions_info(pydvl_version),
        "sizes": sizes,
    }
    workdir = Path(tempfile.mkdtemp(prefix="infscale-bench-"))
    ctx = Context(mode, sizes, Runner(workdir, pydvl_python, sizes), out.parent / "figures")
    docs = []
    try:
        for name in selected:
            t0 = time.perf_counter()
            ctx.runner.deadline = t0 + budgets[name]
            log(f"== section {name} (budget {budgets[name]:.0f} s)")
            results, error = None, None
            try:
                results = sections.load(name).measure(ctx)
            except Exception as exc:  # noqa: BLE001 - one broken section must not hide the others
                traceback.print_exc()
                error = f"{type(exc).__name__}: {exc}"
            spent = time.perf_counter() - t0
            docs.append(envelope(name, run, budgets[name], spent, results, error))
            save(data_dir, docs[-1])  # at once: a crash later keeps what was measured
            total = (time.perf_counter() - t_start) / 60
            log(f"== section {name}: {spent:.0f} s of {budgets[name]:.0f} s; total {total:.1f} min")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.perf_counter() - t_start
    for doc in docs:  # the run's length, now known
        doc["run"]["elapsed_s"] = elapsed
        save(data_dir, doc)
    render.write_page(data_dir, out, figures=True)
    log(f"wrote {data_dir}/ and {out} in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
