"""Small CNN on the 8×8 digits images: K-FAC and EK-FAC against the exact Gauss-Newton inverse.

scikit-learn digits as 1×8×8 images (standardized, 1437 train / 360 test), a 3,818-parameter CNN
Conv2d(1,8,3,p1) → tanh → Conv2d(8,16,3,s2,p1) → tanh → flatten → Linear(256,10), trained
deterministically. Fit and query time of ``EkfacInfluence`` (K-FAC and EK-FAC, ``fisher="exact"``)
for the whole test × train matrix, and agreement (Pearson r, top-10 overlap per test point) with
``DirectInfluence`` in Gauss-Newton mode at the same λ, full and layer-wise (what K-FAC approximates).

Run alone: ``python benchmarks/cnn.py [--quick | --smoke]`` (prints the page's section).
"""

from __future__ import annotations

import time

import evaluation as E
import torch
import workloads as W
from runner import log
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from infscale.torch import DirectInfluence, EkfacInfluence
from infscale.torch.functional import BlockMode, SecondOrderMode

LAMBDA_SHARES = (0.03, 0.1)  # λ = 3% and 10% of the largest eigenvalue of the full Gauss-Newton matrix


def cnn_workload(quick: bool, seed: int = 0):
    """The trained CNN and the digits images (x: (n, 1, 8, 8) float32, y: (n,) int64)."""
    x_tr, y_tr, x_te, y_te = W.digits_data()
    x_tr, x_te = x_tr.reshape(-1, 1, 8, 8), x_te.reshape(-1, 1, 8, 8)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )
    W.train(model, x_tr, y_tr, epochs=40 if quick else 150, lr=0.01, seed=seed, weight_decay=1e-3)
    return model, (x_tr, y_tr, x_te, y_te)


def measure(ctx=None, *, quick: bool = False, smoke: bool = False) -> dict:
    """Runs the benchmark; returns its results as plain data.

    ``ctx`` (the suite's Context) sets quick / smoke from its mode; without it (``python
    benchmarks/cnn.py``) the keywords do. quick: shorter training (the influence sizes stay
    360 × 1437). smoke: also only 200 training and 20 test points, to check that the code runs."""
    if ctx is not None:
        quick, smoke = ctx.mode == "quick", ctx.mode == "smoke"
    log("small CNN on digits: K-FAC and EK-FAC vs Direct Gauss-Newton")
    torch.set_num_threads(1)
    model, (x_tr, y_tr, x_te, y_te) = cnn_workload(quick or smoke)
    if smoke:
        x_tr, y_tr, x_te, y_te = x_tr[:200], y_tr[:200], x_te[:20], y_te[:20]
    with torch.no_grad():
        accuracy = (model(x_te).argmax(1) == y_te).float().mean().item()
    loader = DataLoader(TensorDataset(x_tr, y_tr), batch_size=len(x_tr))
    loss = nn.functional.cross_entropy
    gn = SecondOrderMode.GAUSS_NEWTON

    # λ relative to the curvature: a fraction of the largest eigenvalue of the full Gauss-Newton matrix
    # (of the mean training loss). The full Direct fit builds that matrix once; with_regularization
    # then refactorizes it at the chosen λ (both counted in its fit time; the eigenvalue is not).
    # Timings at the first λ; the other λ reuse every fit (with_regularization) and only re-query.
    methods, times = {}, {}
    t0 = time.perf_counter()
    full = DirectInfluence(model, loss, hessian_regularization=1.0, second_order_mode=gn).fit(loader)
    t_eig = time.perf_counter()
    curvature = next(iter(full.curvature.values()))
    lam_max = float(torch.linalg.eigvalsh(curvature.double()).max())
    t_eig = time.perf_counter() - t_eig
    lams = [float(f"{share * lam_max:.2g}") for share in LAMBDA_SHARES]
    methods["Direct GN, full"] = full = full.with_regularization(lams[0])
    times["Direct GN, full"] = time.perf_counter() - t0 - t_eig
    layer = DirectInfluence(
        model,
        loss,
        hessian_regularization=lams[0],
        block_structure=BlockMode.LAYER_WISE,
        second_order_mode=gn,
    )
    t0 = time.perf_counter()
    methods["Direct GN, layer-wise"] = layer.fit(loader)
    times["Direct GN, layer-wise"] = time.perf_counter() - t0
    for name, update in (("K-FAC", False), ("EK-FAC", True)):
        ek = EkfacInfluence(model, update_diagonal=update, hessian_regularization=lams[0], fisher="exact")
        t0 = time.perf_counter()
        methods[name] = ek.fit(loader)
        times[name] = time.perf_counter() - t0

    rows = []
    for i, lam in enumerate(lams):
        values, query_s = {}, {}
        for name, method in methods.items():
            method = method if i == 0 else method.with_regularization(lam)
            t0 = time.perf_counter()
            values[name] = method.influences(x_te, y_te, x_tr, y_tr).detach().numpy()
            query_s[name] = time.perf_counter() - t0
        for name in methods:
            row = {"lambda": lam, "method": name, "reused": i > 0}
            row |= {"fit_s": None, "query_s": None} if i else {"fit_s": times[name], "query_s": query_s[name]}
            for key, ref in (("vs_full", "Direct GN, full"), ("vs_layer_wise", "Direct GN, layer-wise")):
                row[key] = {
                    "pearson": E.pearson(values[name], values[ref]),
                    "top10": E.topk_overlap(values[name], values[ref], 10),
                }
            rows.append(row)
    return {
        "n_train": len(x_tr),
        "n_test": len(x_te),
        "n_params": sum(p.numel() for p in model.parameters()),
        "test_accuracy": accuracy,
        "lambda_shares": list(LAMBDA_SHARES),
        "lambdas": lams,
        "lambda_max": lam_max,
        "rows": rows,
        "command": "python benchmarks/cnn.py" + (" --smoke" if smoke else " --quick" if quick else ""),
    }
