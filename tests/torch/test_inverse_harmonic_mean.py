"""InverseHarmonicMeanInfluence against an explicit per-sample inverse sum (float64)."""

import pytest
import torch
from helpers import CE, loader, rel

from infscale.torch import BlockMode, InverseHarmonicMeanInfluence

LAM = 1e-2


def inverse_harmonic_mean(G, blocks):
    """(1/n) Σᵢ (gᵢgᵢᵀ + λ_b I)⁻¹ per block, each inverse explicit."""
    p = G.shape[1]
    P = torch.zeros(p, p, dtype=torch.float64)
    for sl, lam in blocks:
        d = sl.stop - sl.start
        for g in G[:, sl]:
            P[sl, sl] += torch.linalg.inv(torch.outer(g, g) + lam * torch.eye(d, dtype=torch.float64))
    return P / G.shape[0]


def test_full_block_against_explicit_inverse_sum(small_classifier):
    model, x, y, xt, yt = small_classifier
    ihm = InverseHarmonicMeanInfluence(model, CE, LAM).fit(loader(x, y, [13, 10, 7]))
    G_train = small_classifier.train_gradients
    P = inverse_harmonic_mean(G_train, [(slice(0, 31), LAM)])
    exact = small_classifier.test_gradients @ P @ G_train.T
    approx = ihm.influences(xt, yt, x, y)
    assert approx.shape == (10, 30)
    assert rel(approx, exact) < 1e-10
    assert ihm.stores_gradients
    factors = ihm.influence_factors(xt, yt)
    assert rel(factors, small_classifier.test_gradients @ P) < 1e-10
    # queries on other training points use the fitted sum, not the query points
    assert rel(ihm.influences(xt, yt, x[:4], y[:4]), exact[:, :4]) < 1e-10


def test_layer_wise_dict_regularization_and_recomputation(small_classifier):
    model, x, y, xt, yt = small_classifier
    reg = {"0": 2e-2, "2": 5e-3}
    data = loader(x, y, [4, 19, 7])
    kw = dict(block_structure=BlockMode.LAYER_WISE)
    stored = InverseHarmonicMeanInfluence(model, CE, reg, **kw).fit(data)
    recomputed = InverseHarmonicMeanInfluence(model, CE, reg, max_stored_gradient_bytes=0, **kw).fit(data)
    assert stored.stores_gradients and not recomputed.stores_gradients
    G_train = small_classifier.train_gradients
    P = inverse_harmonic_mean(G_train, [(slice(0, 16), reg["0"]), (slice(16, 31), reg["2"])])
    exact = small_classifier.test_gradients @ P @ G_train.T
    assert rel(stored.influences(xt, yt, x, y), exact) < 1e-10
    assert rel(recomputed.influences(xt, yt, x, y), exact) < 1e-10
    by_block = recomputed.influences_by_block(xt, yt, x, y)
    assert rel(by_block["0"] + by_block["2"], exact) < 1e-10


def test_perturbation_mode_against_finite_differences(small_classifier):
    model, x, y, xt, yt = small_classifier
    ihm = InverseHarmonicMeanInfluence(model, CE, LAM).fit(loader(x, y, [16, 14]))
    pert = ihm.influences(xt[:3], yt[:3], x[:2], y[:2], mode="perturbation")
    assert pert.shape == (3, 2, 3)
    factors = small_classifier.gradients(xt[:3], yt[:3]) @ inverse_harmonic_mean(
        small_classifier.train_gradients, [(slice(0, 31), LAM)]
    )
    h = 1e-5
    for j in range(2):
        for d in range(3):
            e = torch.zeros(1, 3, dtype=torch.float64)
            e[0, d] = h
            up = factors @ small_classifier.gradients(x[j : j + 1] + e, y[j : j + 1]).T
            down = factors @ small_classifier.gradients(x[j : j + 1] - e, y[j : j + 1]).T
            fd = ((up - down) / (2 * h))[:, 0]
            assert torch.allclose(pert[:, j, d], fd, rtol=1e-5, atol=1e-8)


def test_with_regularization_and_self_influences(small_classifier):
    model, x, y, xt, yt = small_classifier
    base = InverseHarmonicMeanInfluence(model, CE, LAM).fit(loader(x, y, [30]))
    swept = base.with_regularization(0.1)
    fresh = InverseHarmonicMeanInfluence(model, CE, 0.1).fit(loader(x, y, [30]))
    assert rel(swept.influences(xt, yt, x, y), fresh.influences(xt, yt, x, y)) < 1e-12
    assert rel(base.influences(xt, yt, x, y), fresh.influences(xt, yt, x, y)) > 1e-2
    assert torch.allclose(base.self_influences(xt, yt), torch.diagonal(base.influences(xt, yt)), rtol=1e-10)
    assert "second_order_mode" not in base.hyperparameters()


def test_bad_arguments(small_classifier):
    model = small_classifier[0]
    with pytest.raises(ValueError, match="hessian_regularization > 0"):
        InverseHarmonicMeanInfluence(model, CE, 0.0)
    with pytest.raises(ValueError, match="hessian_regularization > 0"):
        InverseHarmonicMeanInfluence(model, CE, {"0": 1e-2}, block_structure="layer_wise")
    with pytest.raises(ValueError, match="hessian_regularization"):
        InverseHarmonicMeanInfluence(model, CE, {"nope": 1e-2})
    ihm = InverseHarmonicMeanInfluence(model, CE, LAM)
    with pytest.raises(ValueError, match="before fit"):
        ihm.influences(small_classifier[3], small_classifier[4])


def test_fit_rows_take_stored_gradients_and_other_rows_are_computed(small_classifier, monkeypatch):
    """Points that are a contiguous run of the fit data reuse the stored gradients (no
    new gradient pass); points that differ from it anywhere (here one label) do not."""
    from infscale.torch.gradients import GradientEngine

    model, x, y, xt, yt = small_classifier
    ihm = InverseHarmonicMeanInfluence(model, CE, LAM).fit(loader(x, y, [13, 10, 7]))
    computed = []

    def counting(method):
        original = getattr(GradientEngine, method)

        def counted(self, a, b, *args):
            computed.append(a.shape[0])
            return original(self, a, b, *args)

        monkeypatch.setattr(GradientEngine, method, counted)

    counting("gradients")  # dense per-sample gradients (test side)
    counting("factored")  # factored training gradients (never falls back here: Linear layers only)
    G = small_classifier.train_gradients
    P = inverse_harmonic_mean(G, [(slice(0, 31), LAM)])
    exact = small_classifier.test_gradients @ P @ G.T
    assert rel(ihm.influences(xt, yt, x, y), exact) < 1e-10
    assert rel(ihm.influences(xt, yt, x[5:17], y[5:17]), exact[:, 5:17]) < 1e-10
    assert computed == [10, 10]  # the test points only
    assert rel(ihm.self_influences(x[20:], y[20:]), ((G[20:] @ P) * G[20:]).sum(1)) < 1e-10
    assert rel(ihm.influences(x[:6], y[:6]), G[:6] @ P @ G[:6].T) < 1e-10
    assert computed == [10, 10]
    y_changed = y[5:17].clone()
    y_changed[3] = (y_changed[3] + 1) % 3
    exact_changed = small_classifier.test_gradients @ P @ small_classifier.gradients(x[5:17], y_changed).T
    assert rel(ihm.influences(xt, yt, x[5:17], y_changed), exact_changed) < 1e-10
    assert computed == [10, 10, 10, 12]
