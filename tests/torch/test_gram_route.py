"""Influences through inner products of per-sample gradients (the "Gram" route of the inverse
harmonic mean and the Nyström sketch) against explicit float64 references.

The route is taken when a model's nn.Linear layers make gradient inner products cheaper than
p numbers per pair (a layer of width 16 on 6 inputs: 22 numbers per pair instead of 96); both
routes must give the numbers of the explicit formulas, whichever is chosen.
"""

from __future__ import annotations

import pytest
import torch
from conftest import explicit_gauss_newton, explicit_loss_gradients
from helpers import CE, loader, rel
from torch import nn

from infscale.torch import BlockMode, InverseHarmonicMeanInfluence, NystroemSketchInfluence


@pytest.fixture(scope="module")
def wide():
    """A 6-16-3 tanh MLP (163 parameters, float64), 40 training and 20 test points."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(60, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (60,), generator=g)
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x_train, y_train, x_test, y_test = x[:40], y[:40], x[40:], y[40:]
    return {
        "model": model,
        "data": (x_train, y_train, x_test, y_test),
        "G_train": explicit_loss_gradients(model, CE, x_train, y_train),
        "G_test": explicit_loss_gradients(model, CE, x_test, y_test),
        "gauss_newton": explicit_gauss_newton(model, CE, x_train, y_train),
    }


BLOCKS = {"0": slice(0, 112), "2": slice(112, 163)}  # the two layers' parameters in the flat vector


def inverse_harmonic_mean(G, regularization):
    """(1/n) Σᵢ (gᵢgᵢᵀ + λ_b I)⁻¹ per block (one block for a float λ), each inverse explicit."""
    blocks = (
        [(sl, regularization[name]) for name, sl in BLOCKS.items()]
        if isinstance(regularization, dict)
        else [(slice(0, G.shape[1]), regularization)]
    )
    P = torch.zeros(G.shape[1], G.shape[1], dtype=torch.float64)
    for sl, lam in blocks:
        eye = torch.eye(sl.stop - sl.start, dtype=torch.float64)
        for g in G[:, sl]:
            P[sl, sl] += torch.linalg.inv(torch.outer(g, g) + lam * eye)
    return P / G.shape[0]


@pytest.mark.parametrize("regularization", [1e-3, {"0": 2e-3, "2": 5e-4}])
@pytest.mark.parametrize("stored", [True, False])
# 560 bytes = 70 float64 numbers: the fit gradients in chunks of 1 to 3 rows
@pytest.mark.parametrize("gram_bytes", [2**28, 560])
def test_inverse_harmonic_mean_takes_the_gram_route_and_matches_the_explicit_sum(
    wide, regularization, stored, gram_bytes, monkeypatch
):
    import infscale.torch.memory as module

    monkeypatch.setattr(module, "GRAM_BYTES", gram_bytes)
    x, y, xt, yt = wide["data"]
    kw = {"block_structure": BlockMode.LAYER_WISE} if isinstance(regularization, dict) else {}
    if not stored:
        kw["max_stored_gradient_bytes"] = 0
    ihm = InverseHarmonicMeanInfluence(wide["model"], CE, regularization, **kw).fit(loader(x, y, [15, 25]))
    P = inverse_harmonic_mean(wide["G_train"], regularization)
    exact = wide["G_test"] @ P @ wide["G_train"].T
    taken = []
    original = InverseHarmonicMeanInfluence._gram_influences
    monkeypatch.setattr(
        InverseHarmonicMeanInfluence,
        "_gram_influences",
        lambda self, *a: taken.append(True) or original(self, *a),
    )
    assert rel(ihm.influences(xt, yt, x, y), exact) < 1e-10
    assert taken == [True]  # 20 test × 40 fit × 40 training points: fewer multiplications
    symmetric = wide["G_test"] @ P @ wide["G_test"].T
    assert rel(ihm.influences(xt, yt), symmetric) < 1e-10
    assert rel(ihm.self_influences(xt, yt), torch.diagonal(symmetric)) < 1e-10
    fit_self = ((wide["G_train"][5:30] @ P) * wide["G_train"][5:30]).sum(dim=1)
    assert rel(ihm.self_influences(x[5:30], y[5:30]), fit_self) < 1e-10  # stored rows, if kept
    # the factor route gives the same numbers
    monkeypatch.setattr(InverseHarmonicMeanInfluence, "_gram_cheaper", lambda self, *a: False)
    assert rel(ihm.influences(xt, yt, x, y), exact) < 1e-10
    assert len(taken) == 2


def test_inverse_harmonic_mean_gram_route_on_a_model_with_positions_and_a_convolution(monkeypatch):
    """Parameters outside nn.Linear (a Conv1d) and a linear layer applied at several positions."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 3, 3, padding=1)
            self.mix = nn.Linear(3, 8)  # applied at 5 positions
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h = torch.tanh(self.conv(x)).transpose(1, 2)  # (n, 5, 3)
            return self.head(torch.tanh(self.mix(h)).mean(dim=1))

    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, 2, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    torch.manual_seed(2)
    model = Model().double()
    G = explicit_loss_gradients(model, CE, x, y)
    ihm = InverseHarmonicMeanInfluence(model, CE, 1e-3).fit(loader(x[:20], y[:20], [20]))
    monkeypatch.setattr(InverseHarmonicMeanInfluence, "_gram_cheaper", lambda self, *a: True)
    P = inverse_harmonic_mean(G[:20], 1e-3)
    assert rel(ihm.influences(x[20:], y[20:], x[:20], y[:20]), G[20:] @ P @ G[:20].T) < 1e-10


def woodbury_inverse(nys: NystroemSketchInfluence, regularization) -> torch.Tensor:
    """Block-diagonal (U diag(σ) Uᵀ + λI)⁻¹ from the fitted sketch, built explicitly."""
    lams = regularization if isinstance(regularization, dict) else {"model": regularization}
    slices = BLOCKS if isinstance(regularization, dict) else {"model": slice(0, 163)}
    inverse = torch.zeros(163, 163, dtype=torch.float64)
    for name, sl in slices.items():
        U, s = nys.eigenvectors[name], nys.eigenvalues[name]
        inverse[sl, sl] = torch.linalg.inv(
            U @ torch.diag(s) @ U.T + lams[name] * torch.eye(U.shape[0], dtype=torch.float64)
        )
    return inverse


@pytest.mark.parametrize("regularization", [1e-3, {"0": 2e-3, "2": 5e-4}])
def test_nystroem_gram_route_matches_the_explicit_woodbury_inverse(wide, regularization, monkeypatch):
    x, y, xt, yt = wide["data"]
    kw = {"block_structure": BlockMode.LAYER_WISE} if isinstance(regularization, dict) else {}
    nys = NystroemSketchInfluence(
        wide["model"], CE, regularization, rank=12, second_order_mode="gauss_newton", **kw
    ).fit(loader(x, y, [40]))
    exact = wide["G_test"] @ woodbury_inverse(nys, regularization) @ wide["G_train"].T
    grams = []
    from infscale.torch.gradients import GradientEngine

    original = GradientEngine.gram
    monkeypatch.setattr(GradientEngine, "gram", lambda self, *a: grams.append(1) or original(self, *a))
    assert rel(nys.influences(xt, yt, x, y), exact) < 1e-10
    assert grams  # the inner products came from the factored gradients
    symmetric = wide["G_test"] @ woodbury_inverse(nys, regularization) @ wide["G_test"].T
    assert rel(nys.influences(xt, yt), symmetric) < 1e-10
    assert rel(nys.self_influences(xt, yt), torch.diagonal(symmetric)) < 1e-10
    # the factors give the same numbers
    factors = nys.influence_factors(xt, yt)
    assert rel(nys.influences_from_factors(factors, x, y), exact) < 1e-10


def test_nystroem_full_rank_gram_route_equals_the_explicit_gauss_newton_solve(wide):
    x, y, xt, yt = wide["data"]
    lam = 1e-3
    nys = NystroemSketchInfluence(wide["model"], CE, lam, rank=163, second_order_mode="gauss_newton")
    nys.fit(loader(x, y, [13, 27]))
    A = wide["gauss_newton"] + lam * torch.eye(163, dtype=torch.float64)
    exact = wide["G_test"] @ torch.linalg.solve(A, wide["G_train"].T)
    assert rel(nys.influences(xt, yt, x, y), exact) < 1e-6


@pytest.mark.parametrize("method", ["ihm", "nystroem", "cg"])
def test_empty_queries_give_empty_matrices(wide, method):
    """No test points, or no training points: an empty (n_test, n_train) matrix, not an error
    (products of zero factors with factored gradients used to divide by zero)."""
    from infscale.torch import CgInfluence

    x, y, xt, yt = wide["data"]
    model = {
        "ihm": lambda: InverseHarmonicMeanInfluence(wide["model"], CE, 1e-3),
        "nystroem": lambda: NystroemSketchInfluence(
            wide["model"], CE, 1e-3, rank=4, second_order_mode="gauss_newton"
        ),
        # Gauss-Newton: the wide MLP's Hessian plus 1e-3 is indefinite, which CG refuses
        "cg": lambda: CgInfluence(wide["model"], CE, 1e-3, second_order_mode="gauss_newton"),
    }[method]().fit(loader(x, y, [40]))
    assert model.influences(xt[:0], yt[:0], x, y).shape == (0, 40)
    assert model.influences(xt[:3], yt[:3], x[:0], y[:0]).shape == (3, 0)
    assert model.self_influences(xt[:0], yt[:0]).shape == (0,)
