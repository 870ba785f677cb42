"""Small CNN on the 8×8 digits images: K-FAC and EK-FAC against the exact Gauss-Newton inverse.

scikit-learn digits as 1×8×8 images (standardized, 1437 train / 360 test), a 3,818-parameter CNN
Conv2d(1,8,3,p1) → tanh → Conv2d(8,16,3,s2,p1) → tanh → flatten → Linear(256,10), trained
deterministically. Fit and query time of ``EkfacInfluence`` (K-FAC and EK-FAC, ``fisher="exact"``)
for the whole test × train matrix, and agreement (Pearson r, top-10 overlap per test point) with
``DirectInfluence`` in Gauss-Newton mode at the same λ, full and layer-wise (what K-FAC approximates).

    python benchmarks/cnn.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import evaluation as E  # noqa: E402
import workloads as W  # noqa: E402

from infscale.torch import DirectInfluence, EkfacInfluence  # noqa: E402
from infscale.torch.functional import BlockMode, SecondOrderMode  # noqa: E402

TITLE = "Small CNN on 8×8 digits: K-FAC and EK-FAC"
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


def cnn_section(quick: bool, smoke: bool = False) -> str:
    """Runs the benchmark and returns a markdown section (title, setup, table, command).

    quick: shorter training (the influence sizes stay 360 × 1437). smoke: also only 200 training and
    20 test points, to check that the code runs."""
    torch.set_num_threads(1)
    model, (x_tr, y_tr, x_te, y_te) = cnn_workload(quick or smoke)
    if smoke:
        x_tr, y_tr, x_te, y_te = x_tr[:200], y_tr[:200], x_te[:20], y_te[:20]
    n_params = sum(p.numel() for p in model.parameters())
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
            cells = [f"{lam:g}", name]
            cells += [f"{times[name]:.2f}", f"{query_s[name]:.2f}"] if i == 0 else ["(reused)", "–"]
            for ref in (values["Direct GN, full"], values["Direct GN, layer-wise"]):
                r, top = E.pearson(values[name], ref), E.topk_overlap(values[name], ref, 10)
                cells += [f"{r:.3f}", f"{top:.2f}"]
            rows.append(cells)
    header = [
        "λ",
        "method",
        "fit (s)",
        "query (s)",
        "r vs GN full",
        "top-10 vs GN full",
        "r vs GN layer-wise",
        "top-10 vs GN layer-wise",
    ]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(" --- " for _ in header) + "|",
        *["| " + " | ".join(r) + " |" for r in rows],
    ]
    command = "python benchmarks/cnn.py" + (" --smoke" if smoke else " --quick" if quick else "")
    return "\n".join(
        [
            f"## {TITLE}",
            "",
            f"scikit-learn digits as 1×8×8 images (standardized), {len(x_tr):,} train × {len(x_te)} test; "
            f"CNN Conv2d(1,8,3,pad 1) → tanh → Conv2d(8,16,3,stride 2,pad 1) → tanh → Linear(256,10), "
            f"{n_params:,} parameters, trained with Adam (seeded, full batch; test accuracy "
            f"{accuracy:.1%}). Influences for all {len(x_te)} × {len(x_tr):,} pairs, float32 model, one "
            f"thread. λ = {lams[0]:g} and {lams[1]:g}, i.e. {LAMBDA_SHARES[0]:.0%} and "
            f"{LAMBDA_SHARES[1]:.0%} "
            f"of the largest eigenvalue of the full Gauss-Newton matrix ({lam_max:.3g}); times at the first "
            "λ (fit = building and factorizing the curvature, query = the whole test × train matrix), the "
            "second reuses the fits. "
            '`EkfacInfluence(fisher="exact")`: K-FAC = `update_diagonal=False`, EK-FAC = `True`. '
            'References: `DirectInfluence(second_order_mode="gauss_newton")` with `block_structure` '
            "full (exact) and layer-wise (the block-diagonal matrix that K-FAC and EK-FAC approximate). "
            "Top-10: mean over test points of the overlap of the 10 most helpful training points.",
            "",
            *lines,
            "",
            f"Command: `{command}`.",
            "",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter training")
    parser.add_argument("--smoke", action="store_true", help="200 train × 20 test: only checks that it runs")
    args = parser.parse_args()
    print(cnn_section(args.quick, args.smoke))
    return 0


if __name__ == "__main__":
    sys.exit(main())
