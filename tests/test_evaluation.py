"""The benchmark's evaluation code (benchmarks/evaluation.py) on cases with known answers."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import evaluation as ev  # noqa: E402

scipy_stats = pytest.importorskip("scipy.stats")


# ---------------------------------------------------------------------------- agreement measures
def test_rank_correlations_match_scipy():
    g = np.random.default_rng(0)
    a = g.integers(0, 5, size=40).astype(float)  # many ties
    b = a + g.normal(size=40)
    np.testing.assert_allclose(ev.rankdata(a), scipy_stats.rankdata(a))
    assert ev.spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).statistic, abs=1e-12)
    assert ev.pearson(a, b) == pytest.approx(scipy_stats.pearsonr(a, b).statistic, abs=1e-12)
    assert ev.spearman(a, np.exp(a)) == pytest.approx(1.0)


def test_topk_overlap_and_relative_error():
    ref = np.array([[5.0, 4, 3, 2, 1], [1, 2, 3, 4, 5]])
    other = np.array([[5.0, 1, 4, 2, 3], [5, 4, 3, 2, 1]])
    # row 0: top-2 {0,1} vs {0,2} -> 1/2; row 1: {4,3} vs {0,1} -> 0
    assert ev.topk_overlap(other, ref, k=2) == pytest.approx(0.25)
    assert ev.topk_overlap(ref, ref, k=3) == 1.0
    assert ev.relative_error(np.array([3.0, 4.0]) * 1.1, np.array([3.0, 4.0])) == pytest.approx(0.1)


# ---------------------------------------------------------------------------- LDS
def test_lds_is_one_for_an_exact_linear_datamodel_and_minus_one_reversed():
    g = np.random.default_rng(1)
    n_train, n_test, m = 30, 4, 25
    tau = g.normal(size=(n_test, n_train))
    masks = ev.random_subsets(n_train, m, seed=2)
    assert masks.shape == (m, n_train) and (masks.sum(1) == 15).all()
    # losses exactly as the attribution predicts: loss_S(t) = c_t - sum_{i in S} tau[t, i]
    losses = 3.0 - masks @ tau.T
    lds, per_test = ev.linear_datamodeling_score(tau, masks, np.exp(losses))  # monotone: same ranks
    assert lds == pytest.approx(1.0) and per_test.shape == (n_test,)
    assert ev.linear_datamodeling_score(-tau, masks, losses)[0] == pytest.approx(-1.0)


def test_lds_hand_computed():
    # one test point, three subsets of two training points
    tau = np.array([[1.0, -2.0]])
    masks = np.array([[1, 0], [0, 1], [1, 1]], dtype=bool)
    # predicted losses -[1, -2, -1] = [-1, 2, 1] -> ranks [1, 3, 2]; measured ranks [1, 2, 3]
    losses = np.array([[0.1], [0.2], [0.3]])
    expected = scipy_stats.spearmanr([-1, 2, 1], [0.1, 0.2, 0.3]).statistic  # 0.5
    assert ev.linear_datamodeling_score(tau, masks, losses)[0] == pytest.approx(expected)
    assert expected == pytest.approx(0.5)
    with pytest.raises(ValueError, match="test_losses"):
        ev.linear_datamodeling_score(tau, masks, losses.T)


# ---------------------------------------------------------------------------- mislabel detection
def test_mislabel_recall():
    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.0, 0.05, 0.15, 0.25])
    flipped = np.zeros(10, dtype=bool)
    flipped[[0, 4, 9]] = True
    assert ev.mislabel_recall(scores, flipped, 0.1) == pytest.approx(1 / 3)  # top 1: {0}
    assert ev.mislabel_recall(scores, flipped, 0.3) == pytest.approx(2 / 3)  # top 3: {0, 2, 4}
    assert ev.mislabel_recall(scores, flipped, 1.0) == 1.0


# ---------------------------------------------------------------------------- leave-one-out
def _ridge_problem(n=40, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 10, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + 0.3 * torch.randn(
        n + 10, generator=g, dtype=torch.float64
    )
    return x[:n], y[:n], x[n:], y[n:]


def _squared(z, y):
    return 0.5 * (z - y) ** 2


def test_loo_retraining_matches_closed_form_ridge():
    x, y, xt, yt = _ridge_problem()
    lam, n = 0.05, len(x)

    A = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], dim=1)

    def ridge(keep):  # argmin (1/n) sum_{j in S} 0.5 (a_j θ - y_j)^2 + λ/2 |θ|^2, n fixed, a_j = (x_j, 1)
        As, ys = A[keep], y[keep]
        return torch.linalg.solve(As.T @ As / n + lam * torch.eye(A.shape[1], dtype=x.dtype), As.T @ ys / n)

    def loss(theta, x_, y_):
        return 0.5 * (x_ @ theta[:-1] + theta[-1] - y_) ** 2

    full = ridge(torch.ones(n, dtype=torch.bool))
    theta = ev.newton_fit(_squared, torch.zeros(4, dtype=torch.float64), x, y, lam)
    torch.testing.assert_close(theta, full, rtol=0, atol=1e-12)
    removed = np.array([0, 7, 13])
    changes = ev.loo_test_loss_changes(_squared, full, x, y, xt, yt, lam, removed)
    for column, i in enumerate(removed):
        keep = torch.ones(n, dtype=torch.bool)
        keep[i] = False
        expected = loss(ridge(keep), xt, yt) - loss(full, xt, yt)
        np.testing.assert_allclose(changes[:, column], expected.numpy(), rtol=1e-8, atol=1e-14)


def _logistic(z, y):
    return torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")


def test_newton_fit_matches_scikit_learn_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    g = np.random.default_rng(3)
    x = g.normal(size=(80, 4))
    y = (x[:, 0] + 0.5 * g.normal(size=80) > 0).astype(float)
    lam = 0.1
    theta = ev.newton_fit(
        _logistic, torch.zeros(5, dtype=torch.float64), torch.tensor(x), torch.tensor(y), lam
    )
    # sklearn: C Σ ℓ + ½‖w‖², bias as a penalized column of ones, C = 1 / (λ n)
    clf = LogisticRegression(C=1 / (lam * len(x)), fit_intercept=False, tol=1e-12, max_iter=10_000)
    clf.fit(np.hstack([x, np.ones((80, 1))]), y)
    np.testing.assert_allclose(theta.numpy(), clf.coef_.ravel(), atol=1e-6)


def test_influence_over_n_predicts_leave_one_out_with_the_right_sign():
    """The mapping the validation relies on: nn.Linear + BCE + hessian_regularization=λ in infscale
    gives the Hessian of J, and removing i changes the test loss by about +influence / n."""
    from infscale.torch import DirectInfluence

    g = np.random.default_rng(4)
    n, d = 120, 5
    x = torch.tensor(g.normal(size=(n + 30, d)))
    y = ((x[:, 0] - x[:, 1] + 0.8 * torch.tensor(g.normal(size=n + 30))) > 0).double()
    xtr, ytr, xte, yte = x[:n], y[:n], x[n:], y[n:]
    lam = 0.01
    theta = ev.newton_fit(_logistic, torch.zeros(d + 1, dtype=torch.float64), xtr, ytr, lam)
    model = torch.nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(theta[:-1].unsqueeze(0))
        model.bias.copy_(theta[-1:])

    def bce(out, target):
        return torch.nn.functional.binary_cross_entropy_with_logits(out.squeeze(-1), target)

    from torch.utils.data import DataLoader, TensorDataset

    infl = DirectInfluence(model, bce, hessian_regularization=lam).fit(
        DataLoader(TensorDataset(xtr, ytr), 64)
    )
    influences = infl.influences(xte, yte, xtr, ytr).detach().numpy()
    removed = np.arange(0, n, 2)
    actual = ev.loo_test_loss_changes(_logistic, theta, xtr, ytr, xte, yte, lam, removed)
    predicted = ev.predicted_loo_changes(influences, n, removed)
    assert ev.pearson(predicted, actual) > 0.99
    slope = float((predicted * actual).sum() / (predicted * predicted).sum())
    assert 0.9 < slope < 1.1  # same sign and scale, not just correlated
    assert ev.relative_error(predicted, actual) < 0.15
