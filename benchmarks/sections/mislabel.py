"""Mislabel detection: the digits MLP retrained on digits with 10% flipped labels, training points ranked
by self-influence (measured by the digits section, in the same run); the share of flipped labels
found in the top 10% and 20%."""

from __future__ import annotations

import evaluation as E
import numpy as np
from runner import log
from shared import Context, ok

FRACTIONS = (0.1, 0.2)


def measure(ctx: Context) -> dict:
    """Runs the section; returns its results as plain data."""
    digits = ctx.needs("digits")
    log("mislabel detection")
    flipped = digits["flipped"]
    rows = []
    for method in digits["methods"]:
        row = {"method": method}
        for lib in ("infscale", "pydvl"):
            run = digits["self_runs"].get((lib, method))
            scores = digits["self_scores"].get((lib, method))
            if ok(run) and scores is not None:
                s = np.asarray(scores, dtype=np.float64)
                row[lib] = {f"top{round(f * 100)}": E.mislabel_recall(s, flipped, f) for f in FRACTIONS}
            else:  # the run that did not give scores: how it ended
                row[lib] = {"run": run}
        rows.append(row)
    rng = np.random.default_rng(0)
    return {
        "n_flipped": int(flipped.sum()),
        "n_train": len(flipped),
        "fraction_flipped": 0.1,
        "random_top10": E.mislabel_recall(rng.random(len(flipped)), flipped, 0.1),
        "rows": rows,
    }
