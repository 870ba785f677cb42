"""DirectInfluence against closed forms (linear regression), explicit float64 Hessians and
Gauss-Newton matrices from torch.autograd.functional, and explicit block-diagonal matrices."""

import re
from collections import OrderedDict

import pytest
import torch
from torch import nn

from infscale import NotFittedError, UnsupportedInfluenceModeError
from infscale.torch import BlockMode, DirectInfluence, NotPositiveDefiniteError, SecondOrderMode

LAM = 1e-3  # linear regression: the Hessian's eigenvalues are O(1)


@pytest.mark.parametrize("symmetric", [False, True])
def test_linear_regression_closed_form(linreg, ground_truth, symmetric):
    p = linreg
    closed = ground_truth.linreg(p, LAM)
    model = DirectInfluence(p.model, p.loss, LAM).fit(p.loader(5))
    assert ground_truth.relerr(model.curvature["model"], closed.hessian) < 1e-12
    x, y = (p.x_test, p.y_test) if symmetric else (p.x, p.y)
    train_grads = closed.gradients(x, y)
    up = model.influences(p.x_test, p.y_test) if symmetric else model.influences(p.x_test, p.y_test, x, y)
    assert up.shape == (p.x_test.shape[0], x.shape[0]) and up.dtype == torch.float64
    assert ground_truth.relerr(up, closed.factors @ train_grads.T) < 1e-8
    pert = (
        model.influences(p.x_test, p.y_test, mode="perturbation")
        if symmetric
        else model.influences(p.x_test, p.y_test, x, y, mode="perturbation")
    )
    assert pert.shape == (p.x_test.shape[0], x.shape[0], 3)
    assert ground_truth.relerr(pert, closed.perturbation(closed.factors, x, y)) < 1e-8
    # self-influences: the closed-form diagonal, both modes
    own = torch.linalg.solve(closed.solve, closed.gradients(x, y).T).T
    assert ground_truth.relerr(model.self_influences(x, y), (own * closed.gradients(x, y)).sum(1)) < 1e-8
    diag = closed.perturbation(own, x, y)[torch.arange(x.shape[0]), torch.arange(x.shape[0])]
    assert ground_truth.relerr(model.self_influences(x, y, mode="perturbation"), diag) < 1e-8


def test_mlp_curvature_and_influences_against_explicit_hessian(mlp, ground_truth):
    p = mlp
    H = ground_truth.hessian(p.model, p.loss, p.x, p.y)
    evals = torch.linalg.eigvalsh(H)
    lam = 1e-3 * evals[-1].item() + max(0.0, -evals[0].item())
    assert lam < 0.01 * evals[-1].item()  # small next to the spectrum: curvature matters
    model = DirectInfluence(p.model, p.loss, lam).fit(p.loader(13))
    assert ground_truth.relerr(model.curvature["model"], H) < 1e-8
    g_test = ground_truth.gradients(p.model, p.loss, p.x_test, p.y_test)
    g_train = ground_truth.gradients(p.model, p.loss, p.x, p.y)
    expected = torch.linalg.solve(H + lam * torch.eye(H.shape[0], dtype=H.dtype), g_test.T).T @ g_train.T
    got = model.influences(p.x_test, p.y_test, p.x, p.y)
    assert ground_truth.relerr(got, expected) < 1e-8
    assert ground_truth.relerr(got, g_test @ g_train.T / lam) > 0.5  # not ≈ I/λ


def test_gauss_newton_against_explicit_jacobians(untrained_mlp, untrained_mlp_curvature, ground_truth):
    p = untrained_mlp
    G = untrained_mlp_curvature["gauss_newton"]
    model = DirectInfluence(p.model, p.loss, 1e-3, second_order_mode=SecondOrderMode.GAUSS_NEWTON)
    model.fit(p.loader(8))  # batches 8, 8, 8, 6
    assert ground_truth.relerr(model.curvature["model"], G) < 1e-8
    g_test = ground_truth.gradients(p.model, p.loss, p.x_test, p.y_test)
    g_train = ground_truth.gradients(p.model, p.loss, p.x, p.y)
    expected = torch.linalg.solve(G + 1e-3 * torch.eye(G.shape[0], dtype=G.dtype), g_test.T).T @ g_train.T
    assert ground_truth.relerr(model.influences(p.x_test, p.y_test, p.x, p.y), expected) < 1e-8


def test_not_positive_definite_error(untrained_mlp, untrained_mlp_curvature):
    p = untrained_mlp
    smallest = torch.linalg.eigvalsh(untrained_mlp_curvature["hessian"])[0].item()
    assert smallest < 0  # the untrained MLP's Hessian is indefinite
    with pytest.raises(NotPositiveDefiniteError) as info:
        DirectInfluence(p.model, p.loss, 0.0).fit(p.loader())
    message = str(info.value)
    assert "not positive definite" in message and "GAUSS_NEWTON" in message
    reported = float(re.search(r"smallest eigenvalue is (\S+)\.", message).group(1))
    assert reported == pytest.approx(smallest, rel=1e-3)
    suggested = float(re.search(r"hessian_regularization ≥ (\S+),", message).group(1))
    assert suggested > -smallest
    DirectInfluence(p.model, p.loss, suggested).fit(p.loader())  # the suggestion works


def _block_diagonal_influences(H, blocks, lams, g_test, g_train):
    total = torch.zeros(g_test.shape[0], g_train.shape[0], dtype=H.dtype)
    for idx, lam in zip(blocks, lams):
        Hb = H[idx][:, idx] + lam * torch.eye(len(idx), dtype=H.dtype)
        total += torch.linalg.solve(Hb, g_test[:, idx].T).T @ g_train[:, idx].T
    return total


def test_block_structures_against_explicit_block_diagonal(mlp, ground_truth):
    p = mlp
    H = ground_truth.hessian(p.model, p.loss, p.x, p.y)
    g_test = ground_truth.gradients(p.model, p.loss, p.x_test, p.y_test)
    g_train = ground_truth.gradients(p.model, p.loss, p.x, p.y)
    # flat order: 0.weight (24), 0.bias (6), 2.weight (18), 2.bias (3)
    w0, b0, w2, b2 = (list(range(0, 24)), list(range(24, 30)), list(range(30, 48)), list(range(48, 51)))
    lam = 0.05
    cases = [
        (BlockMode.LAYER_WISE, lam, [w0 + b0, w2 + b2], [lam, lam]),
        ("parameter_wise", lam, [w0, b0, w2, b2], [lam] * 4),
        (
            OrderedDict(first=["0.weight", "2.bias"], second=["0.bias", "2.weight"]),
            {"first": 0.1, "second": 0.02},
            [w0 + b2, b0 + w2],
            [0.1, 0.02],
        ),
        (BlockMode.LAYER_WISE, {"0": 0.01, "2": 0.2}, [w0 + b0, w2 + b2], [0.01, 0.2]),
    ]
    for structure, reg, blocks, lams in cases:
        model = DirectInfluence(p.model, p.loss, reg, block_structure=structure).fit(p.loader())
        expected = _block_diagonal_influences(H, blocks, lams, g_test, g_train)
        assert ground_truth.relerr(model.influences(p.x_test, p.y_test, p.x, p.y), expected) < 1e-8
        by_block = model.influences_by_block(p.x_test, p.y_test, p.x, p.y)
        assert ground_truth.relerr(sum(by_block.values()), expected) < 1e-8
    partial = DirectInfluence(p.model, p.loss, {"2": 0.2}, block_structure=BlockMode.LAYER_WISE)
    assert partial.regularization == {"0": 0.0, "2": 0.2}  # blocks left out get 0.0
    with pytest.raises(ValueError, match=r"\['nope'\].*blocks are \['0', '2'\]"):
        DirectInfluence(p.model, p.loss, {"nope": 1.0}, block_structure=BlockMode.LAYER_WISE)


def test_nested_module_layer_names(ground_truth):
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(enc=nn.Sequential(nn.Linear(3, 4), nn.Tanh()), head=nn.Linear(4, 2))
    ).double()
    x, y = torch.randn(20, 3, dtype=torch.float64), torch.arange(20) % 2
    loss = nn.functional.cross_entropy
    d = DirectInfluence(model, loss, {"enc.0": 0.5, "head": 0.3}, block_structure=BlockMode.LAYER_WISE)
    d.fit([(x, y)])
    assert list(d.curvature) == ["enc.0", "head"]
    H = ground_truth.hessian(model, loss, x, y)
    assert ground_truth.relerr(d.curvature["head"], H[16:, 16:]) < 1e-10


def test_with_regularization_equals_refit(mlp, ground_truth):
    p = mlp
    model = DirectInfluence(p.model, p.loss, 0.05).fit(p.loader())
    swept = model.with_regularization(0.2)
    refit = DirectInfluence(p.model, p.loss, 0.2).fit(p.loader())
    assert (
        ground_truth.relerr(swept.influences(p.x_test, p.y_test), refit.influences(p.x_test, p.y_test))
        < 1e-12
    )
    assert model.regularization["model"] == 0.05  # the original is unchanged
    with pytest.raises(NotFittedError):
        DirectInfluence(p.model, p.loss, 0.05).with_regularization(0.1)


def test_float64_stays_float64(mlp):
    p = mlp
    model = DirectInfluence(p.model, p.loss, 0.1).fit([(p.x.float(), p.y)])  # float32 data is cast
    x32 = p.x_test.float()
    for out in (
        model.influence_factors(x32, p.y_test),
        model.influences(x32, p.y_test, p.x.float(), p.y),
        model.influences(x32, p.y_test, mode="perturbation"),
        model.self_influences(x32, p.y_test),
        model.self_influences(x32, p.y_test, mode="perturbation"),
    ):
        assert out.dtype == torch.float64
    assert model.curvature["model"].dtype == torch.float64


def test_frozen_parameters_are_skipped(mlp, ground_truth):
    p = mlp
    p.model[0].requires_grad_(False)
    model = DirectInfluence(p.model, p.loss, 0.01).fit(p.loader())
    assert model.n_parameters == 21
    names = ["2.weight", "2.bias"]
    H = ground_truth.hessian(p.model, p.loss, p.x, p.y, names)
    g_test = ground_truth.gradients(p.model, p.loss, p.x_test, p.y_test, names)
    g_train = ground_truth.gradients(p.model, p.loss, p.x, p.y, names)
    expected = torch.linalg.solve(H + 0.01 * torch.eye(21, dtype=H.dtype), g_test.T).T @ g_train.T
    assert ground_truth.relerr(model.influences(p.x_test, p.y_test, p.x, p.y), expected) < 1e-8


def test_bad_input(mlp):
    p = mlp
    model = DirectInfluence(p.model, p.loss, 0.1)
    for call in (
        lambda: model.influences(p.x_test, p.y_test),
        lambda: model.influence_factors(p.x_test, p.y_test),
        lambda: model.self_influences(p.x, p.y),
    ):
        with pytest.raises(NotFittedError, match=r"DirectInfluence\.\w+\(\) was called before fit"):
            call()
    model.fit(p.loader())
    with pytest.raises(ValueError, match=r"x_test and y_test.*\(7, 4\).*\(6,\)"):
        model.influences(p.x_test, p.y_test[:6])
    with pytest.raises(ValueError, match=r"x and y must have the same number of rows"):
        model.influences(p.x_test, p.y_test, p.x[:5], p.y)
    with pytest.raises(ValueError, match=r"feature shape \(5,\).*feature shape \(4,\)"):
        model.influences(torch.zeros(7, 5, dtype=torch.float64), p.y_test)
    for bad in ("upp", "Up", 3, None):
        with pytest.raises(UnsupportedInfluenceModeError, match=r"DirectInfluence\.influences\(\).*'up'"):
            model.influences(p.x_test, p.y_test, mode=bad)
    with pytest.raises(UnsupportedInfluenceModeError, match="self_influences"):
        model.self_influences(p.x, p.y, mode="pert")
    with pytest.raises(ValueError, match="only x was given"):
        model.influences(p.x_test, p.y_test, p.x)
    with pytest.raises(ValueError, match="only y was given"):
        model.influences(p.x_test, p.y_test, y=p.y)
    with pytest.raises(ValueError, match=r"z_test_factors must be a tensor of shape \(n_test, 51\)"):
        model.influences_from_factors(torch.zeros(2, 50, dtype=torch.float64), p.x, p.y)
    with pytest.raises(ValueError, match="empty"):
        DirectInfluence(p.model, p.loss).fit([])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        DirectInfluence(lambda x: x, p.loss)
    frozen = nn.Linear(2, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        DirectInfluence(frozen, p.loss)
