"""The benchmark page's render step (benchmarks/render.py): from saved JSON only, no measuring."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import render  # noqa: E402

RUN = {
    "command": "make bench",
    "argv": "python benchmarks/run_all.py --only seed_example,lds",
    "mode": "full",
    "started": "2031-02-03T04:05:00+00:00",
    "elapsed_s": 754.0,
    "machine": {
        "system": "Linux",
        "arch": "x86_64",
        "cores": 7,
        "cpu": "Test CPU",
        "ram_gib": 13.0,
        "load_at_start": 0.3,
    },
    "versions": {
        "python": "3.99.1",
        "torch": "9.8.7",
        "numpy": "6.5.4",
        "dask": "1.2.3",
        "zarr": "4.5.6",
        "infscale": "0.0.9",
        "pydvl": "0.10.0",
    },
    "sizes": {"run_timeout_s": 241, "slow_run_s": 151, "short_run_s": 9.5, "repeats": 4},
}
SEED = {
    "available": True,
    "n_train": 120,
    "n_test": 30,
    "batch": 10,
    "method": "cg",
    "regularization": 0.01,
    "blocks": [3, 12],
    "infscale": {"total_s": 0.4567, "fit_s": 0.1},
    "pydvl": {"total_s": 12.3456, "fit_s": 0.2},
    "time_ratio": {"value": 27.0312, "lower_bound": False},
    "pearson": 0.987654,
}
LDS = {
    "n_models": 37,
    "n_models_planned": 50,
    "subset_fraction": 0.5,
    "n_train": 1437,
    "n_test": 360,
    "rows": [
        {"method": "direct", "infscale": 0.6123, "pydvl": 0.5987},
        {"method": "ekfac", "infscale": 0.4321, "pydvl": None},
    ],
}


def doc(section: str, results: dict | None, status: str = "ok", **extra) -> dict:
    return {
        "schema": render.SCHEMA,
        "section": section,
        "source": "test fixture",
        "run": RUN,
        "budget_s": 90.0,
        "took_s": 33.3,
        "status": status,
        "results": results,
        **extra,
    }


def write(folder: Path, *docs: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for d in docs:
        (folder / f"{d['section']}.json").write_text(json.dumps(d))
    return folder


@pytest.fixture
def page(tmp_path, capsys):
    data = write(tmp_path / "data", doc("seed_example", SEED), doc("lds", LDS))
    out = tmp_path / "page" / "benchmarks.md"
    missing = render.write_page(data, out)
    return out.read_text(), missing, capsys.readouterr().err


def test_the_numbers_of_the_json_appear_in_the_page(page):
    text, _, _ = page
    seed = text.split("## Seed example: sequential calculator")[1].split("\n## ")[0]
    assert "| 0.46 s | 12.35 s | 27.0× | 0.987654 |" in seed
    assert "batches of 10" in seed and "(3 × 12 blocks)" in seed
    lds = text.split("## Linear datamodeling score (LDS)")[1].split("\n## ")[0]
    assert "| Direct | 0.612 | 0.599 |" in lds
    assert "| EK-FAC | 0.432 | – |" in lds  # None: not measured
    assert "37 digits MLPs retrained" in lds
    # the run: command, date, machine, versions, the sizes' caps, the section times
    assert (
        "`make bench` (`python benchmarks/run_all.py --only seed_example,lds`) on 2031-02-03 04:05 UTC"
        in text
    )
    assert "in 12.6 min" in text
    assert "7 cores (Test CPU), 13 GiB RAM, load average at start 0.3" in text
    assert "torch 9.8.7" in text and "zarr 4.5.6" in text
    assert "cut at 241 s" in text and "at 151 s" in text and "best of 4" in text
    assert "| lds | 90 | 33 |" in text and "| total | 180 | 754 |" in text
    # derived lines: the summary and what was reduced
    assert "- LDS on the digits MLP (37 half-data models): Direct 0.61." in text
    assert "- LDS: only 37 of 50 retrained models fitted in the time budget" in text
    assert "![speed ratios](figures/speed.png)" in text  # the seed ratio is one of the figure's bars


def test_a_missing_section_is_reported_not_dropped(page):
    text, missing, err = page
    absent = ["digits", "loo", "mislabel", "wide", "calculators", "out_of_core", "cnn"]
    assert missing == absent
    assert f"Sections with no saved data: {', '.join(absent)}" in text
    for name in absent:
        heading = render.TITLES[name]
        section = text.split(f"## {heading}\n")[1].split("\n## ")[0]
        assert f"No data: `{name}.json` is missing" in section
        assert f"section {name}: no data" in err
    assert text.index("## Mislabel detection") < text.index("## Seed example")  # page order kept


def test_a_failed_section_and_an_unreadable_file_are_reported(tmp_path):
    data = write(
        tmp_path, doc("cnn", None, status="failed", error="RuntimeError: boom"), doc("seed_example", SEED)
    )
    (tmp_path / "lds.json").write_text("{not json")
    (tmp_path / "wide.json").write_text(json.dumps(doc("wide", {}) | {"schema": 99}))
    out = tmp_path / "benchmarks.md"
    missing = render.write_page(data, out)
    text = out.read_text()
    assert "## Small CNN on 8×8 digits: K-FAC and EK-FAC\n\nFailed: `RuntimeError: boom`" in text
    assert "Sections that failed or were skipped: cnn." in text
    assert "lds" in missing and "`lds.json` is not valid JSON" in text
    assert "wide" in missing and "`wide.json` is not schema 1 data of section 'wide'" in text


def test_sections_of_different_runs_each_say_which_run(tmp_path):
    other = dict(RUN, started="2031-03-04T05:06:00+00:00", argv="python benchmarks/run_all.py --only lds")
    data = write(tmp_path, doc("seed_example", SEED), doc("lds", LDS) | {"run": other})
    out = tmp_path / "benchmarks.md"
    render.write_page(data, out)
    text = out.read_text()
    assert "Measured in 2 runs" in text
    assert (
        "- lds: measured by `make bench` (`python benchmarks/run_all.py --only lds`) on 2031-03-04 05:06"
        in text
    )
    assert "- seed_example: measured by" in text


def test_render_imports_neither_torch_nor_numpy(tmp_path):
    data = write(tmp_path / "data", doc("seed_example", SEED))
    code = (
        f"import sys; sys.path.insert(0, {str(BENCH)!r}); import render; "
        f"code = render.main(['--data', {str(data)!r}, '--out', {str(tmp_path / 'p.md')!r}]); "
        "assert code == 0, code; "
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, 'render imported torch or numpy'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert "0.46 s" in (tmp_path / "p.md").read_text()


def test_the_committed_page_is_what_the_committed_data_renders(tmp_path):
    """docs/benchmarks.md must come from docs/benchmarks-data/ (``make bench-render``), not be edited."""
    out = tmp_path / "benchmarks.md"
    missing = render.write_page(ROOT / "docs" / "benchmarks-data", out)
    assert missing == []
    assert out.read_text() == (ROOT / "docs" / "benchmarks.md").read_text()
