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
    absent = [
        "digits",
        "loo",
        "mislabel",
        "wide",
        "calculators",
        "out_of_core",
        "cnn",
        "kronfluence",
        "lds_bert",
    ]
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


def kron_run(total: float, cpu: float, **extra) -> dict:
    return {"fit_s": total / 2, "query_s": total / 2, "total_s": total, "total_cpu_s": cpu, "runs": 3} | extra


def kron_row(key, lib, method, fisher, tracked, run, vs, damping=0.17, wrapper=False) -> dict:
    return {
        "key": key,
        "lib": lib,
        "method": method,
        "fisher": fisher,
        "damping": damping,
        "tracked": tracked,
        "logits_wrapper": wrapper,
        "run": run,
        "vs": vs,
    }


KRON = {
    "goal_line": "the goal of the issue",
    "kronfluence": "1.0.1",
    "kronfluence_python": ".bench-venv-kronfluence/bin/python",
    "threads": 1,
    "seeds": [0, 1],
    "load_start": [3.25, 4.0, 5.0],
    "load_end": [6.5, 4.5, 5.5],
    "workloads": [
        {
            "name": "bert",
            "n_train": 256,
            "n_test": 50,
            "n_params": 5858,
            "n_params_linear": 4626,
            "test_accuracy": 0.74,
            "training": "trained somehow",
            "positions": {"a": 11.13, "classifier": 1.0},
            "lambda": 0.17,
            "batch_size": 256,
            "references": [
                {"tracked": "all", "method": "cg", "settings": {}, "run": kron_run(17.5, 16.25)},
                {"tracked": "linear", "method": "cg", "settings": {}, "run": kron_run(8.75, 8.5)},
            ],
            "rows": [
                kron_row(
                    "ekfac_true",
                    "infscale",
                    "ekfac",
                    "true",
                    "all",
                    {"error": "ValueError: no Embedding"},
                    {},
                ),
                kron_row(
                    "ekfac_true",
                    "infscale",
                    "ekfac",
                    "true",
                    "linear",
                    kron_run(0.125, 0.1),
                    {"all": {"pearson": 0.8125, "top10": 0.5}, "linear": {"pearson": 0.9375, "top10": 0.75}},
                    wrapper=True,
                ),
                kron_row(
                    "ekfac_true",
                    "kronfluence",
                    "ekfac",
                    "true",
                    "linear",
                    kron_run(3.25, 2.5),
                    {"all": {"pearson": 0.8, "top10": 0.5}, "linear": {"pearson": 0.93, "top10": 0.74}},
                ),
            ],
            "cross_checks": [
                {
                    "infscale": "ekfac_empirical",
                    "kronfluence": "ekfac_empirical",
                    "pearson": 0.9999,
                    "top10": 1.0,
                }
            ],
            "seed_spread": [
                {
                    "lib": "infscale",
                    "tracked": "linear",
                    "seeds": [0, 1],
                    "vs": {"linear": {"pearson": [0.9375, 0.875], "top10": [0.75, 0.5]}},
                },
                {
                    "lib": "kronfluence",
                    "tracked": "linear",
                    "seeds": [0, 1],
                    "vs": {"linear": {"pearson": [0.93, 0.9], "top10": [0.74, 0.7]}},
                },
            ],
            "linear_vs_all_reference": {"pearson": 0.125, "top10": 0.375},
            "goal": {
                "reference": "linear",
                "infscale_row": {"key": "ekfac_exact", "tracked": "linear"},
                "accuracy": {
                    "pearson": {"infscale": 0.95, "kronfluence": 0.93},
                    "top10": {"infscale": 0.75, "kronfluence": 0.74},
                },
                "speed": {"total_s": 26.0, "total_cpu_s": 25.0},
                "true_fisher": {
                    "accuracy": {
                        "pearson": {"infscale": 0.9375, "kronfluence": 0.93},
                        "top10": {"infscale": 0.75, "kronfluence": 0.74},
                    },
                    "speed": {"total_s": 30.0, "total_cpu_s": 29.0},
                    "seed_range": {
                        "infscale": {"pearson": [0.875, 0.9375], "top10": [0.5, 0.75]},
                        "kronfluence": {"pearson": [0.9, 0.93], "top10": [0.7, 0.74]},
                    },
                },
                "as_accurate": True,
                "twice_as_fast": True,
                "met": True,
            },
        },
        {
            "name": "cnn",
            "n_train": 1437,
            "n_test": 360,
            "n_params": 3818,
            "n_params_linear": 3818,
            "test_accuracy": 0.97,
            "training": "trained",
            "positions": {"0": 64.0, "2": 16.0, "5": 1.0},
            "lambda": 0.0078,
            "batch_size": 512,
            "references": [{"tracked": "all", "method": "cg", "settings": {}, "run": kron_run(30.0, 29.0)}],
            "rows": [
                kron_row(
                    "ekfac_true",
                    "infscale",
                    "ekfac",
                    "true",
                    "all",
                    kron_run(1.5, 1.25),
                    {"all": {"pearson": 0.7, "top10": 0.6}},
                    damping=0.0078,
                ),
                kron_row(
                    "ekfac_true",
                    "kronfluence",
                    "ekfac",
                    "true",
                    "all",
                    kron_run(2.5, 2.0),
                    {"all": {"pearson": 0.75, "top10": 0.625}},
                    damping=0.0078,
                ),
            ],
            "cross_checks": [],
            "goal": {
                "reference": "all",
                "infscale_row": {"key": "ekfac_exact", "tracked": "all"},
                "accuracy": {
                    "pearson": {"infscale": 0.7, "kronfluence": 0.75},
                    "top10": {"infscale": 0.6, "kronfluence": 0.625},
                },
                "speed": {"total_s": 1.6667, "total_cpu_s": 1.6},
                "true_fisher": {
                    "accuracy": {
                        "pearson": {"infscale": 0.7, "kronfluence": 0.75},
                        "top10": {"infscale": 0.6, "kronfluence": 0.625},
                    },
                    "speed": {"total_s": 1.6667, "total_cpu_s": 1.6},
                    "seed_range": {},
                },
                "as_accurate": False,
                "twice_as_fast": False,
                "met": False,
            },
        },
    ],
}
LDS_BERT = {
    "n_train": 256,
    "n_test": 50,
    "n_models": 50,
    "runs_per_model": 3,
    "subset_fraction": 0.5,
    "lambda": 0.17,
    "lambda_source": "config",
    "truth": {
        "source": "cached: somewhere",
        "retrain_s": None,
        "run_agreement": 0.296,
        "loss_std_across_subsets": 0.6,
        "loss_std_across_runs": 0.35,
        "retraining": "seeded",
    },
    "rows": [
        {
            "key": "cg",
            "lib": "infscale",
            "tracked": "all",
            "settings": {},
            "run": None,
            "lds": 0.1625,
            "stderr": 0.0275,
            "per_run": [0.15, 0.1875],
        },
        {
            "key": "arnoldi",
            "lib": "infscale",
            "tracked": "all",
            "settings": {},
            "run": {"error": "RuntimeError: broke"},
            "error": "RuntimeError: broke",
        },
        {
            "key": "ekfac_true",
            "lib": "kronfluence",
            "tracked": "linear",
            "settings": None,
            "run": {"total_s": 3.25},
            "lds": 0.168,
            "stderr": 0.03,
            "per_run": [0.14, 0.19],
        },
        {
            "key": "gradient_dot",
            "lib": "plain torch",
            "tracked": "all",
            "settings": None,
            "run": {"total_s": 6.25},
            "lds": 0.159,
            "stderr": 0.03,
            "per_run": [0.15, 0.16],
        },
    ],
}


def test_the_kronfluence_and_lds_bert_sections_render_their_numbers(tmp_path):
    data = write(tmp_path / "data", doc("kronfluence", KRON), doc("lds_bert", LDS_BERT))
    out = tmp_path / "benchmarks.md"
    render.write_page(data, out)
    text = out.read_text()
    kron = text.split("## EK-FAC reference: infscale and kronfluence 1.0.1")[1].split("\n## ")[0]
    assert 'Goal (issue 16, item 7): "the goal of the issue".' in kron
    assert (
        '- Tiny BERT: **met**. infscale EK-FAC (`fisher="exact"`) vs kronfluence EK-FAC' in kron
        and "on the Linear layers only (kronfluence's set): Pearson r 0.95 vs 0.93, top-10 0.75 vs 0.74"
        in kron
        and "26× (wall clock), 25× (CPU)" in kron
        and "time 30× / 29×; over 2 draws of the sampled labels: infscale: r 0.875–0.938" in kron
    )
    assert "infscale (Linear only): r 0.875–0.938, top-10 0.5–0.75" in kron  # the seeds' spread
    assert "CG on the Linear layers against CG on the whole model, Pearson r 0.125, top-10 0.38" in kron
    assert "- Digits CNN: **not met** (less accurate and less than 2× faster)." in kron
    assert "at the start 3.2 / 4.0 / 5.0, at the end 6.5 / 4.5 / 5.5 on 7 cores" in kron
    assert (
        "| infscale | **CG, Gauss-Newton (reference)** | – | 0.17 | all | 8.75 | 8.75 | 17.50 | 16.25 |"
        in kron
    )
    assert "| infscale | EK-FAC | true (sampled labels) | 0.17 | all | failed [1] |" in kron
    assert "[1] `ValueError: no Embedding`" in kron
    assert (
        "| infscale | EK-FAC | true (sampled labels) | 0.17 | Linear only (logits wrapper) "
        "| 0.06 | 0.06 | 0.12 | 0.10 | 0.812 | 0.5 | 0.938 | 0.75 |" in kron
    )
    assert (
        "| kronfluence | EK-FAC | true (sampled labels) | 0.0078 | all "
        "| 1.25 | 1.25 | 2.50 | 2.00 | 0.75 | 0.62 |" in kron
    )
    assert "EK-FAC empirical r 0.999900, top-10 1" in kron
    assert (  # the summary
        "- EK-FAC reference (kronfluence 1.0.1), the tiny BERT: goal met: infscale EK-FAC r 0.95 "
        "(kronfluence 0.93), top-10 0.75 (0.74), 26× faster (CPU time 25×); Linear layers only" in text
    )
    assert "infscale's EK-FAC failed on the whole tiny BERT" in text  # what was reduced
    lds = text.split("## Linear datamodeling score on the tiny BERT")[1].split("\n## ")[0]
    assert "on 50 random halves of the training set, 3 times each" in lds
    assert "agree to a Spearman correlation of 0.3" in lds and "by 0.35 (std) between runs and by 0.6" in lds
    assert "| CG, Gauss-Newton (reference) | infscale | all | 0.163 | 0.028 | 0.150 – 0.188 |" in lds
    assert "| Arnoldi r64, Gauss-Newton | infscale | all | failed: RuntimeError: broke |" in lds
    assert (
        "| EK-FAC, true (sampled labels) | kronfluence | Linear only | 0.168 | 0.03 | 0.140 – 0.190 | 3.25 |"
        in lds
    )
    assert "CG 0.163, kronfluence EK-FAC 0.168, gradient dot product 0.159" in text
