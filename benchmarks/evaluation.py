"""Evaluation of influence values against what retraining does.

- leave-one-out retraining of an L2-regularized model by Newton's method (float64) and the
  first-order prediction ``influences / n_train`` (Koh & Liang 2017, Fig. 2);
- the linear datamodeling score, LDS (Park et al. 2023);
- mislabel detection by self-influence;
- agreement measures (Pearson, Spearman, relative error, top-k overlap).

Sign convention (infscale's): influence = ∇ℓ(z_test)ᵀ (H + λI)⁻¹ ∇ℓ(z_train), positive when
up-weighting the training point lowers the test loss. With the objective

    J_S(θ) = (1/n) Σ_{j ∈ S} ℓ_j(θ) + (λ/2) ‖θ‖²,        S ⊆ {1..n},  n fixed,

H + λI is exactly ∇²J at the optimum, and removing training point i changes the test loss by
``+influence[t, i] / n`` to first order (up-weighting i by ε = −1/n).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

__all__ = [
    "pearson",
    "spearman",
    "rankdata",
    "relative_error",
    "topk_overlap",
    "linear_model_losses",
    "newton_fit",
    "loo_test_loss_changes",
    "predicted_loo_changes",
    "linear_datamodeling_score",
    "random_subsets",
    "mislabel_recall",
]


# ---------------------------------------------------------------------------- agreement
def rankdata(a) -> np.ndarray:
    """Ranks 1..n of a 1-d array, ties get the mean of their ranks (as scipy.stats.rankdata)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a), dtype=np.float64)
    ranks[order] = np.arange(1, len(a) + 1)
    sorted_a = a[order]
    boundaries = np.flatnonzero(np.diff(sorted_a)) + 1
    for group in np.split(np.arange(len(a)), boundaries):
        if len(group) > 1:
            ranks[order[group]] = ranks[order[group]].mean()
    return ranks


def pearson(a, b) -> float:
    """Pearson correlation of two arrays, flattened (nan when one is constant)."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"pearson(): shapes differ: {a.shape} and {b.shape}")
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def spearman(a, b) -> float:
    """Spearman rank correlation of two arrays, flattened."""
    return pearson(rankdata(a), rankdata(b))


def relative_error(a, reference) -> float:
    """‖a − reference‖ / ‖reference‖ (Frobenius)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def topk_overlap(a, reference, k: int = 10) -> float:
    """Mean over rows of |top-k(a_row) ∩ top-k(reference_row)| / k (largest values)."""
    a, b = np.atleast_2d(np.asarray(a)), np.atleast_2d(np.asarray(reference))
    k = min(k, a.shape[1])
    top_a = np.argpartition(-a, k - 1, axis=1)[:, :k]
    top_b = np.argpartition(-b, k - 1, axis=1)[:, :k]
    return float(np.mean([len(np.intersect1d(ta, tb)) / k for ta, tb in zip(top_a, top_b)]))


# ---------------------------------------------------------------------------- leave-one-out
LinkLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""link_loss(z, y) -> elementwise losses of the linear predictor z = x·w + b, e.g. logistic or squared."""


def _design(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x.to(torch.float64), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)


def linear_model_losses(link_loss: LinkLoss, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """Per-sample losses of the linear model θ = (w, b): link_loss(x·w + b, y), shape (n,)."""
    return link_loss(_design(x) @ theta, y.to(torch.float64))


def newton_fit(
    link_loss: LinkLoss,
    theta0: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    regularization: float,
    n_norm: int | None = None,
    weights: torch.Tensor | None = None,
    tol: float = 1e-12,
    max_iter: int = 100,
) -> torch.Tensor:
    """Minimize J(θ) = (1/n_norm) Σ_j w_j ℓ(x_j·w + b, y_j) + (λ/2)‖θ‖², θ = (w, b), by damped Newton.

    The Hessian is exact: Aᵀ diag(w ℓ'') A / n_norm + λI with A = [x, 1] and ℓ'' from autograd.

    Args:
        link_loss: elementwise loss of the linear predictor, convex in it (see ``LinkLoss``).
        theta0: start (d + 1,), e.g. the full-data optimum for leave-one-out.
        weights: per-sample weights w_j (default all ones; 0 removes a sample).
        n_norm: the normalizer (default len(x)); keep it fixed at the full n for leave-one-out.
        tol: stop when ‖∇J‖ ≤ tol.

    Returns the minimizer (float64). Raises RuntimeError when the tolerance is not reached.
    """
    n_norm = n_norm or len(x)
    A = _design(x)
    y = y.to(torch.float64)
    w = torch.ones(len(x), dtype=torch.float64) if weights is None else weights.to(torch.float64)
    eye = torch.eye(A.shape[1], dtype=torch.float64)

    def objective(theta):
        return (w * link_loss(A @ theta, y)).sum() / n_norm + 0.5 * regularization * theta.dot(theta)

    def derivatives(theta):
        z = (A @ theta).requires_grad_(True)
        (d1,) = torch.autograd.grad(link_loss(z, y).sum(), z, create_graph=True)
        (d2,) = torch.autograd.grad(d1.sum(), z)  # elementwise loss: the Hessian in z is diagonal
        g = A.T @ (w * d1.detach()) / n_norm + regularization * theta
        H = (A * (w * d2).unsqueeze(1)).T @ A / n_norm + regularization * eye
        return g, H

    theta = theta0.detach().clone().to(torch.float64)
    for _ in range(max_iter):
        g, H = derivatives(theta)
        if torch.linalg.norm(g) <= tol:
            return theta
        step = torch.linalg.solve(H, g)
        t = 1.0
        if torch.linalg.norm(step) > 1e-6 * (1 + torch.linalg.norm(theta)):  # far: backtrack
            f0 = objective(theta)
            while objective(theta - t * step) > f0 - 1e-4 * t * g.dot(step) and t > 1e-8:
                t /= 2
        theta = theta - t * step  # near the optimum: full Newton steps, quadratic convergence
    g, _ = derivatives(theta)
    if torch.linalg.norm(g) > tol:
        raise RuntimeError(f"newton_fit(): ‖∇J‖ = {torch.linalg.norm(g):.3g} > tol = {tol:g}")
    return theta


def loo_test_loss_changes(
    link_loss: LinkLoss,
    theta_full: torch.Tensor,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    regularization: float,
    removed: np.ndarray,
    tol: float = 1e-12,
) -> np.ndarray:
    """Actual change of each test loss when each training point in ``removed`` is left out.

    Retrains J_{S∖i} (n fixed, see the module docstring) by Newton warm-started at θ_full.
    Returns (n_test, len(removed)): ℓ_test(θ_{−i}) − ℓ_test(θ_full).
    """
    n = len(x_train)
    base = linear_model_losses(link_loss, theta_full, x_test, y_test)
    out = np.empty((len(x_test), len(removed)))
    for column, i in enumerate(removed):
        w = torch.ones(n, dtype=torch.float64)
        w[int(i)] = 0.0
        theta = newton_fit(link_loss, theta_full, x_train, y_train, regularization, n, w, tol)
        out[:, column] = (linear_model_losses(link_loss, theta, x_test, y_test) - base).numpy()
    return out


def predicted_loo_changes(influences, n_train: int, removed: np.ndarray | None = None) -> np.ndarray:
    """First-order prediction of ``loo_test_loss_changes``: +influences[:, removed] / n_train."""
    influences = np.asarray(influences, dtype=np.float64)
    if removed is not None:
        influences = influences[:, removed]
    return influences / n_train


# ---------------------------------------------------------------------------- LDS
def random_subsets(n: int, m: int, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """m random subsets of {0..n−1}, each of round(fraction·n) points: a bool mask (m, n)."""
    g = np.random.default_rng(seed)
    size = int(round(fraction * n))
    masks = np.zeros((m, n), dtype=bool)
    for row in masks:
        row[g.choice(n, size=size, replace=False)] = True
    return masks


def linear_datamodeling_score(influences, masks, test_losses) -> tuple[float, np.ndarray]:
    """LDS (Park et al. 2023) with the test loss as model output.

    The attribution predicts the test loss of the model trained on subset S as
    −Σ_{i ∈ S} influence[t, i] (+ a constant): points that help lower the loss. For each test
    point t, LDS_t is the Spearman correlation over the m subsets between that prediction and the
    loss actually measured after retraining on S.

    Args:
        influences: (n_test, n_train).
        masks: (m, n_train) bool, the subsets.
        test_losses: (m, n_test), the test losses of the models retrained on each subset.

    Returns (mean LDS over test points, LDS_t per test point).
    """
    influences = np.asarray(influences, dtype=np.float64)
    masks = np.asarray(masks, dtype=np.float64)
    test_losses = np.asarray(test_losses, dtype=np.float64)
    if masks.shape[1] != influences.shape[1] or test_losses.shape != (masks.shape[0], influences.shape[0]):
        raise ValueError(
            "linear_datamodeling_score(): expected influences (n_test, n_train), masks (m, n_train), "
            f"test_losses (m, n_test); got {influences.shape}, {masks.shape}, {test_losses.shape}"
        )
    predicted = -(masks @ influences.T)  # (m, n_test)
    per_test = np.array([spearman(predicted[:, t], test_losses[:, t]) for t in range(influences.shape[0])])
    return float(np.nanmean(per_test)), per_test


# ---------------------------------------------------------------------------- mislabel detection
def mislabel_recall(scores, flipped, fraction: float) -> float:
    """Fraction of the flipped points found among the top ``fraction`` of points by score."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    flipped = np.asarray(flipped, dtype=bool).ravel()
    if scores.shape != flipped.shape:
        raise ValueError(f"mislabel_recall(): {scores.shape} scores for {flipped.shape} labels")
    k = int(round(fraction * len(scores)))
    top = np.argsort(-scores, kind="stable")[:k]
    return float(flipped[top].sum() / max(flipped.sum(), 1))
