"""Render the benchmark page from the saved data only: reads docs/benchmarks-data/<section>.json (one per
section, written by benchmarks/run_all.py), writes docs/benchmarks.md. Imports neither torch nor the
measuring code, and measures nothing (``make bench-render``, about a second).

    python benchmarks/render.py [--data docs/benchmarks-data] [--out docs/benchmarks.md] [--figures]

A section without a data file (or with a file this version cannot read) is reported on the page and on
stderr, never silently left out. ``--figures`` also redraws figures/speed.png from the data (the
leave-one-out scatter needs the arrays, so only run_all.py draws it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from config import SECTIONS  # noqa: E402
from page import RENDERERS, TITLES  # noqa: E402
from page.format import Rendered, table  # noqa: E402

SCHEMA = 1


def load(data_dir: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """(section → saved document, section → why it is missing) for every section in config.SECTIONS."""
    docs, missing = {}, {}
    for name in SECTIONS:
        path = data_dir / f"{name}.json"
        if not path.exists():
            missing[name] = f"`{path.name}` is missing"
            continue
        try:
            doc = json.loads(path.read_text())
        except ValueError as error:
            missing[name] = f"`{path.name}` is not valid JSON ({error})"
            continue
        if doc.get("schema") != SCHEMA or doc.get("section") != name:
            missing[name] = f"`{path.name}` is not schema {SCHEMA} data of section {name!r}"
            continue
        docs[name] = doc
    return docs, missing


def _date(iso: str) -> str:
    return f"{dt.datetime.fromisoformat(iso):%Y-%m-%d %H:%M} UTC"


def machine_text(m: dict) -> str:
    text = f"{m['system']} {m['arch']}, {m['cores']} cores ({m['cpu']})"
    if m.get("ram_gib") is not None:
        text += f", {m['ram_gib']:.0f} GiB RAM"
    if m.get("load_at_start") is not None:
        text += f", load average at start {m['load_at_start']:.1f}"
    return text


def versions_text(v: dict) -> str:
    return (
        f"Python {v['python']}, torch {v['torch']}, numpy {v['numpy']}, dask {v['dask']}, zarr {v['zarr']}; "
        f"infscale {v['infscale']}; pyDVL {v['pydvl']} (separate venv `.bench-venv`, a yardstick only)"
    )


def run_text(run: dict) -> str:
    elapsed = f" in {run['elapsed_s'] / 60:.1f} min" if run.get("elapsed_s") is not None else ""
    return f"`{run['command']}` (`{run['argv']}`) on {_date(run['started'])}{elapsed}"


def _runs(docs: dict) -> list[tuple[dict, list[str]]]:
    """The runs the data comes from, as (run, its sections), the run with most sections first."""
    groups: dict[tuple, tuple[dict, list[str]]] = {}
    for name, doc in docs.items():
        run = doc["run"]
        groups.setdefault((run["started"], run["argv"]), (run, []))[1].append(name)
    return sorted(groups.values(), key=lambda g: (-len(g[1]), g[0]["started"]))


def caps_and_repeats(sizes: dict) -> list[str]:
    return [
        f"each run is cut at {sizes['run_timeout_s']} s, and runs known to be hopeless for pyDVL (its "
        "calculators and its inverse harmonic mean and Arnoldi on the wide MLP) at "
        f"{sizes['slow_run_s']} s; each section also has a fixed budget "
        "(table below) that cuts its last runs if it is spent. A cut run shows as '> t s (timeout)'; ratios "
        "with a cut run are lower bounds",
        f"repeats: runs under {sizes['short_run_s']:g} s are repeated, best of {sizes['repeats']} (each "
        "repeat refits, in the same fresh process), for both libraries; longer runs are measured once",
    ]


def header(docs: dict, missing: dict, parts: dict[str, Rendered], data_label: str) -> list[str]:
    runs = _runs(docs)
    lines = ["# Benchmarks", ""]
    note = (
        f"This page is rendered from the saved results in `{data_label}/` (one JSON file per section) by "
        "`make bench-render` (`python benchmarks/render.py`). Do not edit: `make bench` measures and "
        "rewrites the data, this page and `docs/figures/`."
    )
    if len(runs) == 1:
        run = runs[0][0]
        lines += [f"Measured by {run_text(run)}. {note}", ""]
        lines.append(
            f"- Machine: {machine_text(run['machine'])}. Absolute times on a shared machine mean little; "
            "the ratios, measured in the same run, mean more."
        )
        lines.append(f"- Versions: {versions_text(run['versions'])}.")
    else:
        lines += [f"Measured in {len(runs)} runs (see each section's data for its own). {note}", ""]
        for run, names in runs:
            lines.append(
                f"- {', '.join(names)}: measured by {run_text(run)} on {machine_text(run['machine'])}; "
                f"{versions_text(run['versions'])}."
            )
        lines.append(
            "- Absolute times on a shared machine mean little; ratios measured in the same run mean more."
        )
    transcribed = [name for name, doc in docs.items() if str(doc.get("source", "")).startswith("transcribed")]
    if transcribed:
        which = "all sections" if len(transcribed) == len(SECTIONS) else ", ".join(transcribed)
        lines.append(
            f"- Data: {which} transcribed from an earlier page (the raw results were not kept); "
            'each file\'s "source" says from where.'
        )
    lines += [
        "- Every measurement is a fresh process (`benchmarks/child.py`) that loads the same saved model "
        "(state_dict) and data; time = fit + query inside the process (imports excluded); peak RSS from "
        "`getrusage`. pyDVL runs in its own venv and is never imported by infscale.",
        "- Sign convention (infscale): influence = ∇ℓ(z_test)ᵀ (H + λI)⁻¹ ∇ℓ(z_train); positive = the "
        "training point helps (lowers the test loss); removing point i changes the test loss by about "
        "+influence / n_train.",
        "- On a GPU (the wide MLP at its full 500 × 10,000 size, both libraries): "
        "[benchmarks-gpu.md](benchmarks-gpu.md), made by `benchmarks/gpu.py` on a lent H200. pyDVL's "
        "calculators without the 150 s cap: [benchmarks-extra.md](benchmarks-extra.md).",
        "",
        "## Summary",
        "",
        *[f"- {line}" for part in parts.values() for line in part.summary],
        "",
        "## What was reduced, and why",
        "",
    ]
    reduced = []
    if runs:
        primary = runs[0][0]
        if primary["mode"] == "quick":
            reduced.append(f"QUICK MODE: every size reduced ({json.dumps(primary['sizes'])})")
        if primary["mode"] == "smoke":
            reduced.append(
                "SMOKE MODE: tiny sizes, only to check that every code path runs; the numbers mean nothing"
            )
        reduced += [line for part in parts.values() for line in part.reduced]
        reduced += caps_and_repeats(primary["sizes"])
    lines += [f"- {line}" for line in reduced]
    timings = [[name, f"{doc['budget_s']:.0f}", f"{doc['took_s']:.0f}"] for name, doc in docs.items()]
    elapsed = runs[0][0].get("elapsed_s") if len(runs) == 1 else None
    total_took = elapsed if elapsed is not None else sum(doc["took_s"] for doc in docs.values())
    timings.append(["total", f"{sum(doc['budget_s'] for doc in docs.values()):.0f}", f"{total_took:.0f}"])
    lines += [
        "",
        "Time per section (each has its own budget, so a slow section cannot starve the later ones):",
        "",
        table(["section", "budget (s)", "took (s)"], timings),
        "",
    ]
    failed = [name for name, doc in docs.items() if doc.get("status") != "ok"]
    if failed:
        lines += [f"Sections that failed or were skipped: {', '.join(failed)}.", ""]
    if missing:
        lines += [f"Sections with no saved data: {', '.join(missing)} (see each section below).", ""]
    return lines


def render(docs: dict, missing: dict, data_label: str = "docs/benchmarks-data") -> tuple[str, list]:
    """The page's text and the (name, pyDVL / infscale time) pairs of the speed figure."""
    parts: dict[str, Rendered] = {}
    for name in SECTIONS:
        doc = docs.get(name)
        if doc is None:
            parts[name] = Rendered(
                [
                    f"## {TITLES[name]}",
                    "",
                    f'No data: {missing[name]} in `{data_label}/`; `make bench BENCH_ARGS="--only {name}"` '
                    "measures it.",
                    "",
                ]
            )
        elif doc.get("status") != "ok":
            parts[name] = Rendered([f"## {TITLES[name]}", "", f"Failed: `{doc.get('error')}`", ""])
        else:
            parts[name] = RENDERERS[name](doc["results"], doc["run"])
    speed = [pair for part in parts.values() for pair in part.speed]
    body = [line for part in parts.values() for line in part.lines]
    if speed:
        body += ["## Speed ratios at a glance", "", "![speed ratios](figures/speed.png)", ""]
    text = "\n".join(header(docs, missing, parts, data_label) + body).rstrip() + "\n"
    return text, speed


def speed_figure(speed: list[tuple[str, float]], path: Path) -> None:
    """Bar chart of pyDVL / infscale time per comparison (log scale; green where infscale is faster)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k, _ in speed]
    values = [v for _, v in speed]
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(names) + 1.2))
    ax.barh(range(len(names)), values, color=["C2" if v >= 1 else "C3" for v in values])
    ax.axvline(1, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("pyDVL 0.10 time / infscale time (> 1: infscale faster)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_page(data_dir: Path, out: Path, figures: bool = False) -> list[str]:
    """Render ``out`` from ``data_dir``; returns the sections with no usable data (also on stderr)."""
    docs, missing = load(data_dir)
    try:
        label = data_dir.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        label = data_dir.as_posix()
    text, speed = render(docs, missing, label)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if figures and speed:
        speed_figure(speed, out.parent / "figures" / "speed.png")
    for name, why in missing.items():
        print(f"render.py: section {name}: no data ({why} in {data_dir})", file=sys.stderr)
    return list(missing)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "docs" / "benchmarks-data")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--figures", action="store_true", help="also redraw figures/speed.png from the data")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"render.py: --data {args.data}: no such folder (run `make bench` first)", file=sys.stderr)
        return 2
    write_page(args.data, args.out, args.figures)
    print(f"render.py: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
