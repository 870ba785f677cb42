"""Linear datamodeling score on the tiny BERT task (benchmarks/bert_task.py): the influences of the
kronfluence section (CG with the Gauss-Newton matrix, infscale's and kronfluence's K-FAC / EK-FAC, all
at the same λ), Arnoldi and Nyström (measured here, Gauss-Newton too), and the gradient dot product
(no curvature), scored against BERTs retrained on random halves of the training set
(benchmarks/lds_bert.py: M subsets × K training runs each, cached in benchmarks/results-kronfluence/
lds_bert.npz, regenerated when missing or when it does not belong to this model and these sizes).

The noise of the ground truth is reported next to the scores: how well two training runs on the same
subsets agree (Spearman across subsets, mean over test points), the LDS of every method against each
single run, and the standard error of the mean over test points.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import bert_task as B
import lds_bert as L
import numpy as np
import torch
from config import KRONFLUENCE_DAMPING, LDS_BERT_SETTINGS
from runner import log
from shared import Context, timing

CACHE = Path(L.RESULTS) / "lds_bert.npz"

# (label key, where it comes from): the kronfluence section's rows (lib, key) on the BERT; infscale's
# whole-model rows where they ran, else kronfluence's set of layers (see "tracked").
FROM_KRONFLUENCE = [
    ("infscale", "ekfac_exact"),
    ("infscale", "ekfac_true"),
    ("infscale", "kfac_exact"),
    ("kronfluence", "ekfac_true"),
    ("kronfluence", "kfac_true"),
]


def ground_truth(ctx: Context, data: dict, model) -> dict:
    """{subsets (M, n_train) bool, losses (M, K, n_test), source, seconds}: the cache when it holds
    exactly these subsets, K runs and the analysed model's test losses, else retrained now (and, in full
    mode, saved as the new cache)."""
    m, k = ctx.sizes["lds_bert_models"], ctx.sizes["lds_bert_seeds"]
    n_train = len(data["train"]["labels"])
    subsets = L.random_subsets(m, n_train, 0.5)
    full_losses = B.per_example_losses(model, data["test"])
    why = "missing"
    if CACHE.exists() and ctx.mode != "smoke":
        cached = np.load(CACHE)
        if cached["losses"].shape != (m, k, len(full_losses)) or not np.array_equal(
            cached["subsets"], subsets
        ):
            why = f"other sizes ({cached['losses'].shape})"
        elif not np.allclose(cached["full_losses"], full_losses, rtol=0, atol=1e-5):
            why = "other model (its full-data test losses differ)"
        else:
            return {
                "subsets": subsets,
                "losses": cached["losses"],
                "source": f"cached: {CACHE.relative_to(CACHE.parents[2])}",
                "seconds": None,
            }
    log(f"LDS BERT: retraining {m} × {k} models ({why} cache)")
    t0 = time.perf_counter()
    losses, _ = L.retrain_losses(subsets, data, k)
    seconds = time.perf_counter() - t0
    if ctx.mode == "full":
        np.savez(CACHE, subsets=subsets, losses=losses, full_losses=full_losses)
    return {
        "subsets": subsets,
        "losses": losses,
        "source": f"retrained in this run ({why} cache)",
        "seconds": seconds,
    }


def score(values: np.ndarray, truth: dict) -> dict:
    """LDS against the mean over the K runs, its standard error over test points, and the LDS against
    each single run."""
    mean, per_test = L.lds(values, truth["subsets"], truth["losses"])
    n = np.isfinite(per_test).sum()
    return {
        "lds": mean,
        "stderr": float(np.nanstd(per_test, ddof=1) / np.sqrt(n)) if n > 1 else None,
        "per_run": [
            L.lds(values, truth["subsets"], truth["losses"][:, k])[0] for k in range(truth["losses"].shape[1])
        ],
    }


def measure(ctx: Context) -> dict:
    """Runs the section; returns its results as plain data (see docs/benchmarks-data/README.md)."""
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    kr = ctx.needs("kronfluence")["bert"]
    wd = Path(kr["workdir"])
    model = B.load_model(wd / "bert-weights.pt")
    saved = torch.load(wd / "workload.pt", weights_only=False)
    data = {
        "train": {**saved["x_train"], "labels": saved["y_train"]},
        "test": {**saved["x_test"], "labels": saved["y_test"]},
    }
    truth = ground_truth(ctx, data, model)
    losses = truth["losses"]
    rows = []

    def add(key: str, lib: str, values, run: dict | None, tracked: str, settings: dict | None = None):
        row = {"key": key, "lib": lib, "tracked": tracked, "settings": settings, "run": run}
        if values is None or not np.all(np.isfinite(values)):
            row["error"] = (run or {}).get("error", "no values")
        else:
            row |= score(values, truth)
        rows.append(row)

    for tracked in ("all", "linear"):
        ref = kr["references"].get(tracked)
        add("cg", "infscale", ref, None, tracked, {"second_order_mode": "gauss_newton"})
    lam = kr["lambda"]
    base = {"threads": 1, "kind": "bert", "damping": lam, "batch_size": len(data["train"]["labels"])}
    jobs = [(wd, base | {"method": m, "tracked": "all", "params": p}) for m, p in LDS_BERT_SETTINGS.items()]
    for (method, params), r in zip(
        LDS_BERT_SETTINGS.items(), ctx.runner.run_jobs("infscale", jobs, script="kron_child.py")
    ):
        add(method, "infscale", r.get("values"), timing(r), "all", params)
    for lib, key in FROM_KRONFLUENCE:
        tracked = "all" if kr["values"].get((lib, key, "all")) is not None else "linear"
        run = next(
            (r["run"] for r in kr["rows"] if (r["lib"], r["key"], r["tracked"]) == (lib, key, tracked)), None
        )
        add(key, lib, kr["values"].get((lib, key, tracked)), run, tracked)
    t0 = time.perf_counter()
    dots = L.gradient_inner_products(B.load_model(wd / "bert-weights.pt"), data)
    add("gradient_dot", "plain torch", dots, {"total_s": time.perf_counter() - t0}, "all")
    return {
        "n_train": len(data["train"]["labels"]),
        "n_test": len(data["test"]["labels"]),
        "n_models": losses.shape[0],
        "runs_per_model": losses.shape[1],
        "subset_fraction": 0.5,
        "lambda": lam,
        "lambda_source": f"config.KRONFLUENCE_DAMPING['bert'] = {KRONFLUENCE_DAMPING['bert']}",
        "truth": {
            "source": truth["source"],
            "retrain_s": truth["seconds"],
            "run_agreement": L.run_agreement(losses),
            "loss_std_across_subsets": float(losses.mean(1).std(0).mean()),
            "loss_std_across_runs": float(losses.std(1).mean()) if losses.shape[1] > 1 else None,
            "retraining": f"bert_task.TRAINING {B.TRAINING}, same initialization, run k on subset m "
            "shuffles with seed 1_000_000 + 1000 k + m (lds_bert.shuffle_seed)",
        },
        "rows": rows,
        "load_start": load_start,
        "load_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
