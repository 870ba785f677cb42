"""ArnoldiInfluence against explicit float64 curvature matrices (torch.autograd.functional)."""

import pytest
import torch
from helpers import CE, loader, rel

from infscale.torch import (
    ArnoldiInfluence,
    BlockMode,
    DirectInfluence,
    NotPositiveDefiniteError,
    SecondOrderMode,
)
from infscale.torch.arnoldi import lanczos_eigenpairs

LAM = 1e-3  # the Gauss-Newton spectrum spans about 1e-4 … 0.6
LAM_H = 2e-2  # the Hessian has eigenvalues down to about -1e-2 (and up to 0.7)


@pytest.mark.parametrize("mode", ["hessian", "gauss_newton"])
def test_full_rank_equals_direct(small_classifier, mode):
    model, x, y, xt, yt = small_classifier
    data = loader(x, y, [13, 10, 7])
    lam = LAM_H if mode == "hessian" else LAM
    arnoldi = ArnoldiInfluence(model, CE, lam, rank=31, second_order_mode=mode)
    direct = DirectInfluence(model, CE, lam, second_order_mode=mode)
    arnoldi.fit(data), direct.fit(data)
    assert rel(arnoldi.influences(xt, yt, x, y), direct.influences(xt, yt, x, y)) < 1e-6
    # and against the explicit curvature (independent of the library's products)
    exact = small_classifier.exact_influences(mode, lam)
    assert rel(arnoldi.influences(xt, yt, x, y), exact) < 1e-6


def test_full_rank_perturbation_equals_direct(small_classifier):
    model, x, y, xt, yt = small_classifier
    data = loader(x, y, [16, 14])
    kw = dict(second_order_mode="gauss_newton")
    arnoldi = ArnoldiInfluence(model, CE, LAM, rank=31, **kw).fit(data)
    direct = DirectInfluence(model, CE, LAM, **kw).fit(data)
    a = arnoldi.influences(xt[:3], yt[:3], x[:5], y[:5], mode="perturbation")
    assert a.shape == (3, 5, 3)
    assert rel(a, direct.influences(xt[:3], yt[:3], x[:5], y[:5], mode="perturbation")) < 1e-6


@pytest.mark.parametrize("rank", [4, 8])
def test_rank_k_matches_best_truncation(small_classifier, rank):
    model, x, y, xt, yt = small_classifier
    data = loader(x, y, [13, 10, 7])
    H = small_classifier.curvature("gauss_newton")
    evals, evecs = torch.linalg.eigh(H)
    top = torch.argsort(evals.abs(), descending=True)[:rank]
    V, sigma = evecs[:, top], evals[top]
    G_test, G_train = small_classifier.test_gradients, small_classifier.train_gradients
    truncated = (G_test @ V) @ torch.diag(1 / (sigma + LAM)) @ (G_train @ V).T
    exact = G_test @ torch.linalg.solve(H + LAM * torch.eye(31, dtype=torch.float64), G_train.T)
    arnoldi = ArnoldiInfluence(model, CE, LAM, rank=rank, tol=1e-10, second_order_mode="gauss_newton").fit(
        data
    )
    approx = arnoldi.influences(xt, yt, x, y)
    assert torch.allclose(arnoldi.eigenvalues["model"], sigma, rtol=1e-8, atol=1e-12)
    assert rel(approx, truncated) < 1e-6
    assert rel(approx, exact) == pytest.approx(rel(truncated, exact), rel=1e-4)
    assert rel(approx, exact) > 1e-3  # rank k really truncates here


def test_layer_wise_against_explicit_block_diagonal(small_classifier):
    model, x, y, xt, yt = small_classifier
    data = loader(x, y, [11, 19])
    reg = {"0": 3e-2, "2": 1.5e-2}
    arnoldi = ArnoldiInfluence(
        model,
        CE,
        reg,
        rank=16,
        block_structure=BlockMode.LAYER_WISE,
        second_order_mode=SecondOrderMode.HESSIAN,
    ).fit(data)
    H = small_classifier.curvature("hessian")
    A = torch.zeros_like(H)
    for sl, lam in ((slice(0, 16), reg["0"]), (slice(16, 31), reg["2"])):
        A[sl, sl] = H[sl, sl] + lam * torch.eye(sl.stop - sl.start, dtype=torch.float64)
    G_test, G_train = small_classifier.test_gradients, small_classifier.train_gradients
    exact = G_test @ torch.linalg.solve(A, G_train.T)
    assert rel(arnoldi.influences(xt, yt, x, y), exact) < 1e-6
    by_block = arnoldi.influences_by_block(xt, yt, x, y)
    assert set(by_block) == {"0", "2"}
    assert rel(by_block["0"], G_test[:, :16] @ torch.linalg.solve(A[:16, :16], G_train[:, :16].T)) < 1e-6
    assert rel(sum(by_block.values()), exact) < 1e-6


def test_with_regularization_reuses_eigenpairs(small_classifier):
    model, x, y, xt, yt = small_classifier
    data = loader(x, y, [30])
    kw = dict(rank=6, second_order_mode="gauss_newton")
    base = ArnoldiInfluence(model, CE, LAM, **kw).fit(data)
    swept = base.with_regularization(0.05)
    fresh = ArnoldiInfluence(model, CE, 0.05, **kw).fit(data)
    assert rel(swept.influences(xt, yt, x, y), fresh.influences(xt, yt, x, y)) < 1e-8
    assert swept.eigenvectors is base.eigenvectors  # nothing recomputed
    assert rel(base.influences(xt, yt, x, y), fresh.influences(xt, yt, x, y)) > 1e-2  # λ matters


def test_representation_is_projected(small_classifier):
    model, x, y, xt, yt = small_classifier
    arnoldi = ArnoldiInfluence(model, CE, LAM, rank=5, second_order_mode="gauss_newton")
    arnoldi.fit(loader(x, y, [30]))
    rep = arnoldi.train_representation(x, y)
    assert rep.shape == (30, 5)
    factors = arnoldi.influence_factors(xt, yt)
    expected = factors @ small_classifier.train_gradients.T  # factors lie in the eigenbasis
    assert rel(arnoldi.influences_from_representation(factors, rep), expected) < 1e-8
    assert rel(arnoldi.influences_from_factors(factors, x, y), expected) < 1e-8
    sym = arnoldi.influences(xt, yt)
    assert rel(sym, arnoldi.influences(xt, yt, xt, yt)) < 1e-12
    assert torch.allclose(arnoldi.self_influences(xt, yt), torch.diagonal(sym), rtol=1e-8)


def test_non_convergence_warns(small_classifier):
    model, x, y, _, _ = small_classifier
    arnoldi = ArnoldiInfluence(
        model,
        CE,
        LAM,
        rank=4,
        krylov_dimension=6,
        tol=1e-12,
        second_order_mode="gauss_newton",
    )
    with pytest.warns(RuntimeWarning, match="krylov_dimension"):
        arnoldi.fit(loader(x, y, [30]))


def test_indefinite_hessian_raises(small_classifier):
    model, x, y, _, _ = small_classifier
    arnoldi = ArnoldiInfluence(model, CE, 0.0, rank=31)
    with pytest.raises(NotPositiveDefiniteError, match="GAUSS_NEWTON"):
        arnoldi.fit(loader(x, y, [30]))


def test_bad_arguments(small_classifier):
    model = small_classifier[0]
    with pytest.raises(ValueError, match="rank"):
        ArnoldiInfluence(model, CE, rank=0)
    with pytest.raises(ValueError, match="krylov_dimension"):
        ArnoldiInfluence(model, CE, rank=5, krylov_dimension=3)
    with pytest.raises(ValueError, match="tol"):
        ArnoldiInfluence(model, CE, tol=0.0)


def test_lanczos_on_explicit_matrix():
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))
    spectrum = torch.cat([torch.tensor([-5.0, 4.0, 3.0], dtype=torch.float64), torch.linspace(1, 0.01, 57)])
    A = Q @ torch.diag(spectrum) @ Q.T
    result = lanczos_eigenpairs(lambda V: V @ A.T, 60, 3, torch.float64, "cpu", tol=1e-10)
    assert result.converged
    assert torch.allclose(result.eigenvalues, spectrum[:3], atol=1e-9)
    overlap = (result.eigenvectors.T @ Q[:, :3]).abs()
    assert torch.allclose(overlap, torch.eye(3, dtype=torch.float64), atol=1e-6)


# ---------------------------------------------------------------- use_woodbury=True (pyDVL 0.10)


def woodbury_inverse(C: torch.Tensor, rank: int, lam: float) -> torch.Tensor:
    """(V diag(σ) Vᵀ + λI)⁻¹ = V diag(1/(σ+λ)) Vᵀ + (I − VVᵀ)/λ from the explicit matrix C's ``rank``
    eigenpairs of largest magnitude (a float64 eigendecomposition)."""
    evals, evecs = torch.linalg.eigh(C)
    top = torch.argsort(evals.abs(), descending=True)[:rank]
    V, sigma = evecs[:, top], evals[top]
    eye = torch.eye(C.shape[0], dtype=C.dtype)
    return V @ torch.diag(1 / (sigma + lam)) @ V.T + (eye - V @ V.T) / lam


@pytest.mark.parametrize("mode, lam", [("gauss_newton", 1e-2), ("hessian", 5e-2)])
@pytest.mark.parametrize("rank", [4, 8])
def test_woodbury_equals_the_explicit_low_rank_plus_lambda_inverse(small_classifier, mode, lam, rank):
    model, x, y, xt, yt = small_classifier
    data = loader(x, y, [13, 10, 7])
    inverse = woodbury_inverse(small_classifier.curvature(mode), rank, lam)
    G_test, G_train = small_classifier.test_gradients, small_classifier.train_gradients
    arnoldi = ArnoldiInfluence(
        model, CE, lam, rank=rank, tol=1e-10, second_order_mode=mode, use_woodbury=True
    ).fit(data)
    expected = G_test @ inverse @ G_train.T
    assert rel(arnoldi.influences(xt, yt, x, y), expected) < 1e-8
    sym = G_test @ inverse @ G_test.T
    assert rel(arnoldi.influences(xt, yt), sym) < 1e-8
    assert rel(arnoldi.self_influences(xt, yt), torch.diagonal(sym)) < 1e-8
    factors = arnoldi.influence_factors(xt, yt)
    assert rel(factors, G_test @ inverse) < 1e-8
    assert rel(arnoldi.influences_from_factors(factors, x, y), expected) < 1e-8
    rep = arnoldi.train_representation(x, y)  # gradients, not projections: the complement counts
    assert rel(arnoldi.influences_from_representation(factors, rep), expected) < 1e-8
    truncated = ArnoldiInfluence(model, CE, lam, rank=rank, tol=1e-10, second_order_mode=mode).fit(data)
    assert rel(truncated.influences(xt, yt, x, y), expected) > 1e-2  # the two forms differ here


def test_woodbury_perturbation_uses_the_woodbury_factors(small_classifier):
    model, x, y, xt, yt = small_classifier
    arnoldi = ArnoldiInfluence(
        model, CE, LAM, rank=5, tol=1e-10, second_order_mode="gauss_newton", use_woodbury=True
    ).fit(loader(x, y, [30]))
    factors = small_classifier.test_gradients[:3] @ woodbury_inverse(
        small_classifier.curvature("gauss_newton"), 5, LAM
    )
    pert = arnoldi.influences(xt[:3], yt[:3], x[:4], y[:4], mode="perturbation")
    assert pert.shape == (3, 4, 3)
    assert rel(pert, arnoldi.influences_from_factors(factors, x[:4], y[:4], mode="perturbation")) < 1e-8


def test_woodbury_layer_wise_and_with_regularization(small_classifier):
    model, x, y, xt, yt = small_classifier
    data = loader(x, y, [11, 19])
    reg = {"0": 3e-2, "2": 1.5e-2}
    H = small_classifier.curvature("hessian")
    A_inv = torch.zeros_like(H)
    for sl, name in ((slice(0, 16), "0"), (slice(16, 31), "2")):
        A_inv[sl, sl] = woodbury_inverse(H[sl, sl], 5, reg[name])
    G_test, G_train = small_classifier.test_gradients, small_classifier.train_gradients
    arnoldi = ArnoldiInfluence(
        model, CE, reg, rank=5, tol=1e-10, block_structure=BlockMode.LAYER_WISE, use_woodbury=True
    ).fit(data)
    assert rel(arnoldi.influences(xt, yt, x, y), G_test @ A_inv @ G_train.T) < 1e-8
    swept = arnoldi.with_regularization(0.2)
    assert swept.eigenvectors is arnoldi.eigenvectors
    for sl in (slice(0, 16), slice(16, 31)):
        A_inv[sl, sl] = woodbury_inverse(H[sl, sl], 5, 0.2)
    assert rel(swept.influences(xt, yt, x, y), G_test @ A_inv @ G_train.T) < 1e-8
    with pytest.raises(ValueError, match=r"use_woodbury=True.*> 0 in every block.*'2': 0\.0"):
        arnoldi.with_regularization({"0": 0.1})


def test_woodbury_needs_positive_regularization_and_is_recorded(small_classifier):
    model = small_classifier.model
    with pytest.raises(ValueError, match=r"use_woodbury=True.*hessian_regularization > 0"):
        ArnoldiInfluence(model, CE, rank=3, use_woodbury=True)
    with pytest.raises(TypeError, match="use_woodbury must be True or False"):
        ArnoldiInfluence(model, CE, 0.1, use_woodbury="yes")
    record = ArnoldiInfluence(model, CE, regularization=0.1, use_woodbury=True).hyperparameters()
    assert record["use_woodbury"] is True
    assert not ArnoldiInfluence(model, CE, 0.1).hyperparameters()["use_woodbury"]
