"""Validation against leave-one-out retraining (after Koh & Liang 2017, Fig. 2): L2-regularized logistic
regression in float64 on two scikit-learn datasets, every removed point retrained away by Newton's
method, against influence / n. Draws figures/loo.png (it needs the arrays, which are not saved)."""

from __future__ import annotations

import time

import evaluation as E
import numpy as np
import torch
import workloads as W
from config import IHM, LOO_REG, bench_methods
from page.format import LABEL
from runner import log
from shared import Context
from torch.utils.data import DataLoader, TensorDataset

NOT_APPLICABLE = {"ekfac": "not applicable: one-logit binary cross-entropy"}


def _link(z, y):
    return torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")


def _linear(theta: torch.Tensor) -> torch.nn.Linear:
    model = torch.nn.Linear(len(theta) - 1, 1).double()
    with torch.no_grad():
        model.weight.copy_(theta[:-1].unsqueeze(0))
        model.bias.copy_(theta[-1:])
    return model


def _influences(method: str, model, reg: float, params: dict, loader, x_te, y_te, x_tr, y_tr):
    from infscale.app.registry import available_methods, make_influence_model

    if method not in available_methods():
        raise ModuleNotFoundError(f"infscale has no method {method!r} here")
    infl = make_influence_model(method, model, W.bce_loss, {"hessian_regularization": reg, **params})
    return infl.fit(loader).influences(x_te, y_te, x_tr, y_tr).detach().numpy()


def _fit_stats(pred, actual) -> dict:
    return {
        "pearson": E.pearson(pred, actual),
        "spearman": E.spearman(pred, actual),
        "slope": float((pred * actual).sum() / (pred * pred).sum()),
    }


def measure(ctx: Context) -> dict:
    """Runs the section; returns its results as plain data and writes figures/loo.png."""
    log("validation against leave-one-out retraining")
    datasets_out, scatter = [], {}
    for name, (x_tr, y_tr, x_te, y_te) in W.binary_datasets().items():
        n, d = x_tr.shape
        theta = E.newton_fit(_link, torch.zeros(d + 1, dtype=torch.float64), x_tr, y_tr, LOO_REG)
        model = _linear(theta)
        rng = np.random.default_rng(0)
        removed = np.sort(rng.choice(n, size=min(ctx.sizes["loo_removed"], n), replace=False))
        t0 = time.perf_counter()
        actual = E.loo_test_loss_changes(_link, theta, x_tr, y_tr, x_te, y_te, LOO_REG, removed)
        t_loo = time.perf_counter() - t0
        loader = DataLoader(TensorDataset(x_tr, y_tr), batch_size=n)
        rank = min(16, d // 2)
        settings = {
            "direct": {},
            "cg": {"rtol": 1e-10, "atol": 1e-12},
            "lissa": {"maxiter": 500, "scale": 2.0, "rtol": 1e-6},
            "arnoldi": {"rank": rank},
            "nystroem": {"rank": rank},
            IHM: {},
        }
        rows = []
        for method, params in settings.items():
            row = {"method": method, "settings": params}
            if time.perf_counter() > ctx.deadline:
                rows.append(row | {"status": "skipped (budget)"})
                continue
            try:
                values = _influences(method, model, LOO_REG, params, loader, x_te, y_te, x_tr, y_tr)
            except ModuleNotFoundError:
                rows.append(row | {"status": "not available"})
                continue
            except Exception as error:  # noqa: BLE001 - reported in the page
                rows.append(row | {"status": f"failed: {str(error)[:60]}"})
                continue
            pred = E.predicted_loo_changes(values, n, removed)
            rows.append(row | _fit_stats(pred, actual))
            scatter[(name, method)] = (pred, actual, rows[-1]["pearson"])
        rows += [{"method": m, "status": why} for m, why in NOT_APPLICABLE.items()]
        weak = None
        if time.perf_counter() < ctx.deadline:  # weaker regularization: first-order error grows
            reg = LOO_REG / 10
            th_w = E.newton_fit(_link, theta, x_tr, y_tr, reg)
            act_w = E.loo_test_loss_changes(_link, th_w, x_tr, y_tr, x_te, y_te, reg, removed)
            values = _influences("direct", _linear(th_w), reg, {}, loader, x_te, y_te, x_tr, y_tr)
            weak = {"method": "direct", "regularization": reg} | _fit_stats(
                E.predicted_loo_changes(values, n, removed), act_w
            )
        datasets_out.append(
            {
                "name": name,
                "n_train": n,
                "n_test": len(x_te),
                "n_params": d + 1,
                "n_removed": len(removed),
                "retrain_s": t_loo,
                "rows": rows,
                "weak": weak,
            }
        )
    figure = _figure(scatter, ctx.figures / "loo.png")
    return {
        "regularization": LOO_REG,
        "newton_tol": 1e-12,
        "datasets": datasets_out,
        "figure": figure,
    }


def _figure(scatter: dict, path) -> str | None:
    """Scatter of predicted against actual test-loss changes per dataset; the figure's page path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({k[0] for k in scatter})
    if not names:
        return None
    order = bench_methods()
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.6))
    axes = np.atleast_1d(axes)
    for ax, name in zip(axes, names):
        lim = 0.0
        for method in reversed(order):  # Direct drawn last, on top
            if (name, method) not in scatter:
                continue
            pred, actual, r = scatter[(name, method)]
            g = np.random.default_rng(0)
            pick = g.choice(pred.size, size=min(3000, pred.size), replace=False)
            ax.scatter(
                actual.ravel()[pick],
                pred.ravel()[pick],
                s=3,
                alpha=0.5,
                label=f"{LABEL[method].split(' r')[0]} (r={r:.3f})",
            )
            lim = max(lim, np.abs(actual).max())
        ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.8)
        ax.set_ylim(-1.5 * lim, 1.5 * lim)  # far-off approximations are clipped, not rescaling the plot
        ax.set_xlabel("actual change in test loss (leave-one-out retraining)")
        ax.set_ylabel("predicted: influence / n")
        ax.set_title(name)
        ax.legend(fontsize=7, markerscale=3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"{path.parent.name}/{path.name}"
