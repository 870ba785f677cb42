"""LissaInfluence against DirectInfluence and explicit float64 curvature matrices; divergence along
negative curvature (NotPositiveDefiniteError) against a scale that is too small (LissaDivergenceError)."""

import re
import warnings

import pytest
import torch
from helpers import CE, loader, rel
from torch.utils.data import DataLoader, TensorDataset

from infscale.torch import (
    BlockMode,
    DirectInfluence,
    LissaDivergenceError,
    LissaInfluence,
    NotPositiveDefiniteError,
)

LAM = 0.1  # well conditioned: the curvature spectrum tops out near 0.72 (Hessian min ≈ -1e-2)
# (μ + λ) / SCALE lies in [0.18, 1.64] ⊂ (0, 2): the error shrinks by ≤ 0.82 per full-batch iteration
SCALE = 0.5


def test_full_batch_converges_to_direct_and_explicit(small_classifier):
    model, x, y, xt, yt = small_classifier
    data = loader(x, y, [30])
    lissa = LissaInfluence(model, CE, LAM, maxiter=1000, scale=SCALE, rtol=1e-5).fit(data)
    direct = DirectInfluence(model, CE, LAM).fit(data)
    approx = lissa.influences(xt, yt, x, y)
    assert rel(approx, direct.influences(xt, yt, x, y)) < 1e-4
    exact = small_classifier.exact_influences("hessian", LAM)
    assert rel(approx, exact) < 1e-4
    assert lissa.last_iterations["model"] < 1000


def test_gauss_newton_perturbation_mode(small_classifier):
    model, x, y, xt, yt = small_classifier
    data = loader(x, y, [30])
    kw = dict(second_order_mode="gauss_newton")
    lissa = LissaInfluence(model, CE, LAM, maxiter=1000, scale=SCALE, rtol=1e-5, **kw).fit(data)
    direct = DirectInfluence(model, CE, LAM, **kw).fit(data)
    a = lissa.influences(xt[:3], yt[:3], x[:4], y[:4], mode="perturbation")
    assert a.shape == (3, 4, 3)
    assert rel(a, direct.influences(xt[:3], yt[:3], x[:4], y[:4], mode="perturbation")) < 1e-3


def test_dampen_adds_dampen_times_scale_to_the_regularization(small_classifier):
    model, x, y, xt, yt = small_classifier
    data = loader(x, y, [30])
    lissa = LissaInfluence(model, CE, LAM, maxiter=1000, dampen=0.1, scale=SCALE, rtol=1e-5).fit(data)
    approx = lissa.influences(xt, yt, x, y)
    direct = DirectInfluence(model, CE, LAM + 0.1 * SCALE).fit(data)
    assert rel(approx, direct.influences(xt, yt, x, y)) < 1e-4
    # dampen · scale, not dampen alone: that would be off by about 0.12
    plain_dampen = DirectInfluence(model, CE, LAM + 0.1).fit(data)
    assert rel(approx, plain_dampen.influences(xt, yt, x, y)) > 1e-2


def test_unequal_mini_batches_warn_at_maxiter_and_stay_close(small_classifier):
    model, x, y, xt, yt = small_classifier
    data = loader(x, y, [20, 10])  # weighted by size, every cycle averages to the mean curvature
    lissa = LissaInfluence(model, CE, LAM, maxiter=90, scale=4.0, rtol=1e-9).fit(data)
    with pytest.warns(RuntimeWarning, match=r"maxiter=90 with relative change \d"):
        approx = lissa.influences(xt, yt, x, y)
    direct = DirectInfluence(model, CE, LAM).fit(data)
    # mini-batch noise remains (about 0.06 here; it shrinks like 1/scale); unweighted batches would
    # be off by about 0.28
    assert rel(approx, direct.influences(xt, yt, x, y)) < 0.1


def test_layer_wise_against_explicit_block_diagonal(small_classifier):
    model, x, y, xt, yt = small_classifier
    reg = {"0": 0.12, "2": 0.08}
    lissa = LissaInfluence(
        model, CE, reg, maxiter=1000, scale=SCALE, rtol=1e-5, block_structure=BlockMode.LAYER_WISE
    ).fit(loader(x, y, [30]))
    exact = small_classifier.exact_influences("hessian", reg)
    assert rel(lissa.influences(xt, yt, x, y), exact) < 1e-4


@pytest.mark.parametrize("lam", [LAM, 0.0])
def test_divergence_raises_and_says_what_to_raise(small_classifier, lam):
    model, x, y, xt, yt = small_classifier
    lissa = LissaInfluence(model, CE, lam, maxiter=2000, scale=0.05).fit(loader(x, y, [30]))
    with pytest.raises(LissaDivergenceError, match="scale.*dampen"):
        lissa.influences(xt, yt, x, y)


def test_bad_arguments(small_classifier):
    model = small_classifier[0]
    for kw, name in [
        ({"scale": 0.0}, "scale"),
        ({"dampen": 1.0}, "dampen"),
        ({"maxiter": 0}, "maxiter"),
        ({"rtol": -1.0}, "rtol"),
    ]:
        with pytest.raises(ValueError, match=name):
            LissaInfluence(model, CE, LAM, **kw)


def test_float_targets_mse_against_closed_form(linreg, ground_truth):
    # Hessian products reverse over reverse: a floating-point target is a constant of the loss
    truth = ground_truth.linreg(linreg, LAM)
    scale = torch.linalg.eigvalsh(truth.solve).max().item()  # (μ + λ) / scale ∈ (0, 1]
    lissa = LissaInfluence(linreg.model, linreg.loss, LAM, maxiter=2000, scale=scale, rtol=1e-9)
    lissa.fit(linreg.loader())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # rtol 1e-9 may sit below float64 noise
        factors = lissa.influence_factors(linreg.x_test, linreg.y_test)
    assert rel(factors, truth.factors) < 1e-6


def test_tensor_dataset_loader_with_drop_last_uses_only_full_batches(small_classifier, ground_truth):
    model, x, y, xt, yt = small_classifier
    # batches of 20 with drop_last: the last 10 samples never enter the curvature
    data = DataLoader(TensorDataset(x, y), batch_size=20, drop_last=True)
    A = ground_truth.hessian(model, CE, x[:20], y[:20]) + LAM * torch.eye(31, dtype=torch.float64)
    scale = torch.linalg.eigvalsh(A).max().item()
    lissa = LissaInfluence(model, CE, LAM, maxiter=3000, scale=scale, rtol=1e-10).fit(data)
    exact = small_classifier.test_gradients @ torch.linalg.solve(A, small_classifier.train_gradients.T)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        approx = lissa.influences(xt, yt, x, y)
    assert rel(approx, exact) < 1e-6
    # the curvature of all 30 samples is a different matrix, far from this result
    assert rel(approx, small_classifier.exact_influences("hessian", LAM)) > 1e-2


def test_unequal_tensor_dataset_batches_equal_the_same_batches_as_a_list(small_classifier):
    model, x, y, xt, yt = small_classifier
    kw = dict(maxiter=40, scale=4.0, rtol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        from_loader = LissaInfluence(model, CE, LAM, **kw).fit(DataLoader(TensorDataset(x, y), batch_size=20))
        from_list = LissaInfluence(model, CE, LAM, **kw).fit(loader(x, y, [20, 10]))
        assert torch.allclose(from_loader.influences(xt, yt, x, y), from_list.influences(xt, yt, x, y))


def test_self_influences_against_explicit_solve(small_classifier):
    model, x, y, xt, yt = small_classifier
    lissa = LissaInfluence(model, CE, LAM, maxiter=1000, scale=SCALE, rtol=1e-6).fit(loader(x, y, [30]))
    C = small_classifier.curvature("hessian") + LAM * torch.eye(31, dtype=torch.float64)
    G = small_classifier.train_gradients
    exact = (G * torch.linalg.solve(C, G.T).T).sum(dim=1)
    assert rel(lissa.self_influences(x, y), exact) < 1e-5


# ------------------------------------------------------------------------------ negative curvature


def _reported(message: str) -> tuple[float, float]:
    """(the smallest eigenvalue the message reports, the hessian_regularization it suggests)."""
    smallest = float(
        re.search(r"smallest eigenvalue is about (\S+) \(estimated by \d+ Lanczos", message).group(1)
    )
    suggested = float(re.search(r"hessian_regularization ≥ (\S+),", message).group(1))
    return smallest, suggested


@pytest.mark.parametrize("lam", [0.0, 1e-3])
def test_negative_curvature_raises_not_positive_definite_with_a_sufficient_lambda(
    untrained_mlp, untrained_mlp_curvature, ground_truth, lam
):
    """A random tanh MLP (explicit float64 Hessian: eigenvalues from about -0.65 to 1.41), full batch,
    scale 2 above the largest eigenvalue: the iteration diverges only along negative curvature. It
    raises NotPositiveDefiniteError, not LissaDivergenceError, with a λ that suffices; at that λ
    LiSSA converges to the explicit solve."""
    p = untrained_mlp
    H = untrained_mlp_curvature["hessian"]
    evals = torch.linalg.eigvalsh(H)
    smallest, largest = evals[0].item(), evals[-1].item()
    scale = 2.0
    assert smallest + lam < 0 < largest + lam < scale
    lissa = LissaInfluence(p.model, p.loss, lam, maxiter=3000, scale=scale).fit(p.loader())
    with pytest.raises(NotPositiveDefiniteError) as info:
        lissa.influences(p.x_test, p.y_test, p.x, p.y)
    assert not isinstance(info.value, LissaDivergenceError)
    message = str(info.value)
    for part in ("LissaInfluence", "block 'model' on a mini-batch of 30 samples", "dampen", "GAUSS_NEWTON"):
        assert part in message
    estimate, suggested = _reported(message)
    assert estimate == pytest.approx(smallest, rel=0.02)
    assert -smallest < suggested < 1.2 * -smallest

    fixed = LissaInfluence(p.model, p.loss, suggested, maxiter=3000, scale=largest + suggested, rtol=1e-7)
    got = fixed.fit(p.loader()).influence_factors(p.x_test, p.y_test)
    g_test = ground_truth.gradients(p.model, p.loss, p.x_test, p.y_test)
    expected = torch.linalg.solve(H + suggested * torch.eye(H.shape[0], dtype=H.dtype), g_test.T).T
    assert rel(got, expected) < 1e-4


def test_negative_curvature_of_mini_batches_names_the_batch_size(untrained_mlp, ground_truth):
    """Batches of 10: the estimate is that of one batch's curvature (explicit Hessians per batch)."""
    p = untrained_mlp
    lissa = LissaInfluence(p.model, p.loss, 1e-3, maxiter=3000, scale=4.0).fit(p.loader(10))
    with pytest.raises(NotPositiveDefiniteError, match="on a mini-batch of 10 samples") as info:
        lissa.influences(p.x_test, p.y_test, p.x, p.y)
    estimate, suggested = _reported(str(info.value))
    batch_smallest = [
        torch.linalg.eigvalsh(ground_truth.hessian(p.model, p.loss, x, y))[0].item() for x, y in p.loader(10)
    ]
    assert min(abs(estimate - s) / abs(s) for s in batch_smallest) < 0.02
    assert any(-s < suggested for s in batch_smallest)


def test_dampen_that_covers_the_negative_curvature_converges(untrained_mlp, untrained_mlp_curvature):
    """λ + dampen · scale above -λ_min: no error; the answer is that of λ + dampen · scale."""
    p = untrained_mlp
    H = untrained_mlp_curvature["hessian"]
    lam, dampen, scale = 1e-3, 0.5, 2.0
    shift = lam + dampen * scale
    assert torch.linalg.eigvalsh(H)[0].item() + shift > 0
    lissa = LissaInfluence(p.model, p.loss, lam, maxiter=2000, dampen=dampen, scale=scale, rtol=1e-9)
    got = lissa.fit(p.loader()).influences(p.x_test, p.y_test, p.x, p.y)
    direct = DirectInfluence(p.model, p.loss, shift).fit(p.loader())
    assert rel(got, direct.influences(p.x_test, p.y_test, p.x, p.y)) < 1e-6


def test_scale_too_small_on_a_positive_definite_curvature_stays_a_divergence_error(
    untrained_mlp, untrained_mlp_curvature
):
    """H + λI positive definite (explicit eigenvalues), scale below half its largest eigenvalue: the
    iteration diverges for the scale alone, and the error says so (LissaDivergenceError)."""
    p = untrained_mlp
    H = untrained_mlp_curvature["hessian"]
    lam = 1.0
    evals = torch.linalg.eigvalsh(H) + lam
    assert evals[0] > 0 and evals[-1] / 0.3 > 2
    lissa = LissaInfluence(p.model, p.loss, lam, maxiter=2000, scale=0.3).fit(p.loader())
    with pytest.raises(LissaDivergenceError, match="Raise scale above the largest curvature eigenvalue"):
        lissa.influences(p.x_test, p.y_test, p.x, p.y)
