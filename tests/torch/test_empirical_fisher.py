"""SecondOrderMode.EMPIRICAL_FISHER, (1/n) Σᵢ gᵢgᵢᵀ, for every method that takes a curvature mode,
against the explicit matrix built from one torch.autograd.functional.jacobian per sample (float64),
with unequal batches, both influence modes and block-diagonal structure."""

import pytest
import torch
from helpers import CE, loader, rel
from torch import nn

from infscale.torch import (
    ArnoldiInfluence,
    CgInfluence,
    DirectInfluence,
    LissaInfluence,
    NystroemSketchInfluence,
    SecondOrderMode,
)
from infscale.torch.functional import CurvatureOperator, ParameterLayout

LAM = 1e-3  # small next to the empirical Fisher's top eigenvalue (≈ 0.08): the curvature matters
EF = "empirical_fisher"


def test_products_and_dense_equal_the_explicit_matrix(small_classifier):
    model, x, y, _, _ = small_classifier
    F = small_classifier.curvature(EF)
    assert torch.linalg.eigvalsh(F)[-1] > 50 * LAM
    layout = ParameterLayout(model)
    op = CurvatureOperator(layout, CE, loader(x, y, [13, 10, 7]), layout.blocks[0], EF, lambda a, b: (a, b))
    V = torch.randn(5, 31, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert rel(op.matmat(V), V @ F) < 1e-12
    assert rel(op.dense(), F) < 1e-12


CG_SETTINGS = {"rtol": 1e-12, "atol": 0.0, "maxiter": 300}
METHODS = {  # (constructor, tolerance): exact at these settings (full rank, tight CG tolerance)
    "direct": (lambda m, **kw: DirectInfluence(m, CE, LAM, second_order_mode=EF, **kw), 1e-9),
    "cg": (lambda m, **kw: CgInfluence(m, CE, LAM, second_order_mode=EF, **CG_SETTINGS, **kw), 1e-7),
    "arnoldi": (lambda m, **kw: ArnoldiInfluence(m, CE, LAM, rank=31, second_order_mode=EF, **kw), 1e-6),
    "nystroem": (lambda m, **kw: NystroemSketchInfluence(m, CE, LAM, rank=31, second_order_mode=EF), 1e-6),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_methods_against_explicit_empirical_fisher(small_classifier, method):
    make, tolerance = METHODS[method]
    model, x, y, xt, yt = small_classifier
    fitted = make(model).fit(loader(x, y, [13, 10, 7]))
    assert fitted.second_order_mode is SecondOrderMode.EMPIRICAL_FISHER
    exact = small_classifier.exact_influences(EF, LAM)
    assert rel(fitted.influences(xt, yt, x, y), exact) < tolerance
    assert rel(fitted.influences(xt, yt), small_classifier.test_gradients @ torch.linalg.solve(
        small_classifier.curvature(EF) + LAM * torch.eye(31, dtype=torch.float64),
        small_classifier.test_gradients.T)) < tolerance  # fmt: skip
    if method in ("direct", "cg"):  # layer-wise with a dict: the explicit block-diagonal matrix
        lams = {"0": 2e-3, "2": 5e-3}
        extra = CG_SETTINGS if method == "cg" else {}
        cls = CgInfluence if method == "cg" else DirectInfluence
        layered = cls(model, CE, lams, block_structure="layer_wise", second_order_mode=EF, **extra)
        layered.fit(loader(x, y, [16, 14]))
        assert rel(layered.influences(xt, yt, x, y), small_classifier.exact_influences(EF, lams)) < tolerance


def test_lissa_converges_to_the_empirical_fisher_solution(small_classifier):
    model, x, y, xt, yt = small_classifier
    lam = 0.05  # LiSSA needs a well-conditioned system: (μ + λ)/scale in (0, 2)
    lissa = LissaInfluence(model, CE, lam, maxiter=2000, scale=0.5, rtol=1e-10, second_order_mode=EF)
    lissa.fit(loader(x, y, [30]))
    assert rel(lissa.influences(xt, yt, x, y), small_classifier.exact_influences(EF, lam)) < 1e-4


def test_model_outside_linear_layers_and_perturbation_mode(ground_truth):
    """A convolution (vmap path) and the perturbation mode: ∂/∂x of the up-mode influences by central
    differences, on a float64 model whose empirical Fisher comes from the explicit jacobian."""
    from conftest import explicit_loss_gradients

    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 1, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)).double()
    G = explicit_loss_gradients(model, CE, x, y)
    F = G.T @ G / len(x)
    p = F.shape[0]
    direct = DirectInfluence(model, CE, LAM, second_order_mode=EF).fit(loader(x, y, [10, 14]))
    exact = G[:4] @ torch.linalg.solve(F + LAM * torch.eye(p, dtype=torch.float64), G.T)
    assert rel(direct.influences(x[:4], y[:4], x, y), exact) < 1e-9
    factors = direct.influence_factors(x[:4], y[:4])
    analytic = direct.influences_from_factors(factors, x[:3], y[:3], mode="perturbation")
    h = 1e-6
    numeric = torch.zeros_like(analytic)
    for j in range(6):
        e = torch.zeros_like(x[:3])
        e[:, 0, j] = h
        plus = direct.influences_from_factors(factors, x[:3] + e, y[:3])
        minus = direct.influences_from_factors(factors, x[:3] - e, y[:3])
        numeric[:, :, 0, j] = (plus - minus) / (2 * h)
    assert rel(analytic, numeric) < 1e-6


def test_bad_mode_names_the_argument(small_classifier):
    with pytest.raises(ValueError, match="second_order_mode"):
        DirectInfluence(small_classifier.model, CE, LAM, second_order_mode="fisher")
