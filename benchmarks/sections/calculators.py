"""The wide MLP to zarr with CG: sequentially, and on Dask with 1 and 2 worker processes (parallel
efficiency), infscale against pyDVL's SequentialInfluenceCalculator and DaskInfluenceCalculator on the
same cluster. pyDVL's calculators call ``influences`` per block pair, so they redo the CG solve of a
test batch for every training batch: those two runs are capped short (slow=True) and run last."""

from __future__ import annotations

import numpy as np
from config import WIDE_REG, wide_settings
from runner import log
from shared import PYDVL_SIGN, Context, agreement, ok, ratio, timing

from sections.wide import workload

TASKS = ("memory", "sequential", "dask1", "dask2")
AGREEMENT_ROWS = 20  # rows of each result kept and compared with infscale in memory


def measure(ctx: Context) -> dict:
    """Runs the section; returns its results as plain data."""
    S = ctx.sizes
    n, m, nf = S["wide_n_train"], S["calc_n_test"], S["wide_n_fit"]
    bs, tbs = S["calc_batch"], S["calc_test_batch"]
    method = "cg"
    wl = workload(ctx, "wide_calc", n, m, nf)
    log(f"wide MLP calculators with {method} ({m} test × {n} train)")
    n_blocks = -(-m // tbs) * -(-n // bs)
    common = dict(
        method=method,
        params=wide_settings(method, S),
        fit_batch_size=nf,
        batch_size=bs,
        test_batch_size=tbs,
        keep_rows=AGREEMENT_ROWS,
        n_blocks=n_blocks,
    )
    plan = [  # infscale's four runs first, then pyDVL's (capped at slow_run_s)
        ("infscale", "memory", {}),
        ("infscale", "sequential", dict(task="sequential")),
        ("infscale", "dask1", dict(task="dask", n_workers=1)),
        ("infscale", "dask2", dict(task="dask", n_workers=2)),
        ("pydvl", "dask2", dict(task="dask", n_workers=2)),
        ("pydvl", "sequential", dict(task="sequential")),
    ]
    runs = {
        (lib, task): ctx.runner.run(lib, wl, slow=lib == "pydvl", **common, **extra)
        for lib, task, extra in plan
    }
    ref = runs[("infscale", "memory")].get("values")

    def pearson(values):
        if values is None or ref is None:
            return None
        return agreement(values, ref[: np.shape(values)[0]]).get("pearson")

    rows = []
    for task in TASKS:
        a, b = runs[("infscale", task)], runs.get(("pydvl", task))
        row = {"task": task, "infscale": timing(a), "pearson": {"infscale": pearson(a.get("values"))}}
        if b is not None:
            vb = b.get("values") * PYDVL_SIGN if b.get("values") is not None else None
            row |= {"pydvl": timing(b), "time_ratio": ratio(b, a)}
            row["pearson"]["pydvl"] = pearson(vb)
        rows.append(row)
    d1, d2 = runs[("infscale", "dask1")], runs[("infscale", "dask2")]
    efficiency = None
    if ok(d1) and ok(d2):  # the Dask compute only: cluster start-up excluded
        t1, t2 = d1.get("compute_s", d1["query_s"]), d2.get("compute_s", d2["query_s"])
        efficiency = {"value": t1 / (2 * t2), "compute_1_worker_s": t1, "compute_2_workers_s": t2}
    return {
        "method": method,
        "curvature": "empirical_fisher",
        "regularization": WIDE_REG,
        "settings": wide_settings(method, S),
        "n_train": n,
        "n_test": m,
        "n_fit": nf,
        "batch": bs,
        "test_batch": tbs,
        "n_blocks": n_blocks,
        "n_train_batches": -(-n // bs),
        "agreement_rows": AGREEMENT_ROWS,
        "slow_run_s": S["slow_run_s"],
        "rows": rows,
        "efficiency": efficiency,
    }
