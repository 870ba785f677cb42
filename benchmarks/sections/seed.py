"""The seed example (../shared/checks/seed_examples.py): CG through the sequential calculator to zarr,
every loader with batches of 10 as the seed writes it, infscale against pyDVL."""

from __future__ import annotations

import workloads as W
from runner import log
from shared import PYDVL_SIGN, Context, agreement, ratio, timing


def measure(ctx: Context) -> dict:
    """Runs the section; returns its results as plain data ({"available": False, ...} without the seed)."""
    log("seed example, sequential")
    problem = W.seed_problem()
    if problem is None:
        return {"available": False, "reason": "../shared/checks/seed_examples.py is absent"}
    model, _, (x_tr, y_tr, x_te, y_te) = problem
    wl = ctx.runner.save(
        "seed", model, "ce", {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te}
    )
    batch = 10
    # as the seed writes it: CG fitted on the training loader with batches of 10, both loaders in 10s
    spec = dict(
        method="cg",
        params={"regularization": 0.01},
        task="sequential",
        batch_size=batch,
        fit_batch_size=batch,
    )
    res = {lib: ctx.runner.run(lib, wl, **spec) for lib in ("infscale", "pydvl")}
    pd_values = res["pydvl"].get("values")
    ag = agreement(pd_values * PYDVL_SIGN if pd_values is not None else None, res["infscale"].get("values"))
    return {
        "available": True,
        "n_train": len(x_tr),
        "n_test": len(x_te),
        "batch": batch,
        "method": "cg",
        "regularization": 0.01,
        "blocks": [-(-len(x_te) // batch), -(-len(x_tr) // batch)],
        "infscale": timing(res["infscale"]),
        "pydvl": timing(res["pydvl"]),
        "time_ratio": ratio(res["pydvl"], res["infscale"]),
        "pearson": ag.get("pearson"),
    }
