"""Linear datamodeling score (Park et al. 2023) of the digits influences (measured by the digits section,
in the same run): digits MLPs retrained on random halves of the training set."""

from __future__ import annotations

import time

import evaluation as E
import numpy as np
import torch
import workloads as W
from runner import log
from shared import Context


def measure(ctx: Context) -> dict:
    """Runs the section; returns its results as plain data. Stops retraining at the section's deadline
    (``n_models`` then says how many of ``n_models_planned`` were fitted)."""
    digits = ctx.needs("digits")
    m = ctx.sizes["lds_models"]
    log(f"LDS: {m} digits MLPs on random halves")
    x_tr, y_tr, x_te, y_te = digits["data"]
    masks = E.random_subsets(len(x_tr), m, 0.5, seed=1)
    losses = []
    for k, mask in enumerate(masks):
        if time.perf_counter() > ctx.deadline:
            masks = masks[:k]
            break
        idx = torch.as_tensor(np.flatnonzero(mask))
        sub = W.digits_mlp_on(x_tr[idx], y_tr[idx], seed=100 + k)
        with torch.no_grad():
            losses.append(torch.nn.functional.cross_entropy(sub(x_te), y_te, reduction="none").numpy())
    losses = np.array(losses)
    rows = []
    for method in digits["methods"]:
        row = {"method": method}
        for lib in ("infscale", "pydvl"):
            v = digits["values"].get((lib, method))
            if v is None or len(masks) < 3 or not np.all(np.isfinite(v)):
                row[lib] = None
                continue
            row[lib], _ = E.linear_datamodeling_score(v, masks, losses)
        rows.append(row)
    return {
        "n_models": len(masks),
        "n_models_planned": m,
        "subset_fraction": 0.5,
        "n_train": len(x_tr),
        "n_test": len(x_te),
        "rows": rows,
    }
