"""NystroemSketchInfluence against DirectInfluence and explicit float64 curvature matrices."""

import pytest
import torch
from helpers import CE, loader, rel
from torch import nn
from torch.autograd.functional import hessian, jacobian

from infscale.torch import BlockMode, DirectInfluence, NystroemSketchInfluence

LAM = 1e-3  # the Gauss-Newton spectrum spans about 1e-4 … 0.6


def test_full_rank_gauss_newton_equals_direct_and_explicit(small_classifier):
    model, x, y, xt, yt = small_classifier
    data = loader(x, y, [13, 10, 7])
    kw = dict(second_order_mode="gauss_newton")
    nys = NystroemSketchInfluence(model, CE, LAM, rank=31, **kw).fit(data)
    direct = DirectInfluence(model, CE, LAM, **kw).fit(data)
    approx = nys.influences(xt, yt, x, y)
    assert rel(approx, direct.influences(xt, yt, x, y)) < 1e-6
    exact = small_classifier.exact_influences("gauss_newton", LAM)
    assert rel(approx, exact) < 1e-6
    pert = nys.influences(xt[:2], yt[:2], x[:3], y[:3], mode="perturbation")
    assert rel(pert, direct.influences(xt[:2], yt[:2], x[:3], y[:3], mode="perturbation")) < 1e-6


def test_full_rank_hessian_of_a_convex_model_equals_direct():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (50,), generator=g)
    model = nn.Linear(3, 3).double()  # multinomial logistic regression: PSD Hessian

    def logits(theta, x):
        return x @ theta[:9].reshape(3, 3).T + theta[9:]

    theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    H = hessian(lambda t: CE(logits(t, x[:40]), y[:40]), theta)
    G = jacobian(lambda t: CE(logits(t, x), y, reduction="none"), theta)
    exact = G[40:] @ torch.linalg.solve(H + LAM * torch.eye(12, dtype=torch.float64), G[:40].T)
    nys = NystroemSketchInfluence(model, CE, LAM, rank=12).fit(loader(x[:40], y[:40], [25, 15]))
    assert rel(nys.influences(x[40:], y[40:], x[:40], y[:40]), exact) < 1e-6


@pytest.mark.parametrize("rank", [8, 16])
def test_rank_k_between_best_rank_k_and_best_rank_half_k(small_classifier, rank):
    # the randomized sketch cannot beat the exact top-k eigenpairs (Woodbury form), and a
    # sketch of size k is better than the exact top-k/2 ones on this decaying spectrum
    model, x, y, xt, yt = small_classifier
    lam = 1e-2
    H = small_classifier.curvature("gauss_newton")
    evals, evecs = torch.linalg.eigh(H)
    G_test, G_train = small_classifier.test_gradients, small_classifier.train_gradients
    eye = torch.eye(31, dtype=torch.float64)
    exact = G_test @ torch.linalg.solve(H + lam * eye, G_train.T)

    def best(k):
        top = torch.argsort(evals, descending=True)[:k]
        V, s = evecs[:, top], evals[top]
        inverse = V @ torch.diag(1 / (s + lam)) @ V.T + (eye - V @ V.T) / lam
        return rel(G_test @ inverse @ G_train.T, exact)

    nys = NystroemSketchInfluence(model, CE, lam, rank=rank, second_order_mode="gauss_newton")
    error = rel(nys.fit(loader(x, y, [30])).influences(xt, yt, x, y), exact)
    assert best(rank) <= error <= best(rank // 2)
    assert nys.eigenvalues["model"].shape == (rank,)
    assert bool((nys.eigenvalues["model"] <= evals.max() * (1 + 1e-9)).all())


def test_layer_wise_dict_regularization_against_explicit_block_diagonal(small_classifier):
    model, x, y, xt, yt = small_classifier
    reg = {"0": 2e-3, "2": 5e-4}
    nys = NystroemSketchInfluence(
        model, CE, reg, rank=16, block_structure=BlockMode.LAYER_WISE, second_order_mode="gauss_newton"
    ).fit(loader(x, y, [11, 19]))
    exact = small_classifier.exact_influences("gauss_newton", reg)
    assert rel(nys.influences(xt, yt, x, y), exact) < 1e-6
    by_block = nys.influences_by_block(xt, yt, x, y)
    assert rel(by_block["0"] + by_block["2"], exact) < 1e-6


def test_with_regularization_reuses_the_sketch(small_classifier):
    model, x, y, xt, yt = small_classifier
    kw = dict(rank=10, second_order_mode="gauss_newton", seed=5)
    base = NystroemSketchInfluence(model, CE, LAM, **kw).fit(loader(x, y, [30]))
    swept = base.with_regularization(0.05)
    fresh = NystroemSketchInfluence(model, CE, 0.05, **kw).fit(loader(x, y, [30]))
    assert rel(swept.influences(xt, yt, x, y), fresh.influences(xt, yt, x, y)) < 1e-10
    assert swept.eigenvectors is base.eigenvectors
    with pytest.raises(ValueError, match="hessian_regularization > 0"):
        base.with_regularization(0.0)


def test_indefinite_hessian_warns_and_points_to_gauss_newton(small_classifier):
    model, x, y, _, _ = small_classifier  # this MLP's Hessian has eigenvalues down to about -1e-2
    nys = NystroemSketchInfluence(model, CE, LAM, rank=31)
    with pytest.warns(RuntimeWarning, match="indefinite.*GAUSS_NEWTON"):
        nys.fit(loader(x, y, [30]))


def test_bad_arguments(small_classifier):
    model = small_classifier[0]
    with pytest.raises(ValueError, match="hessian_regularization > 0"):
        NystroemSketchInfluence(model, CE, 0.0)
    with pytest.raises(ValueError, match="hessian_regularization > 0"):
        NystroemSketchInfluence(model, CE, {"0": 1e-3}, block_structure="layer_wise")  # "2" left at 0
    with pytest.raises(ValueError, match="rank"):
        NystroemSketchInfluence(model, CE, LAM, rank=0)
