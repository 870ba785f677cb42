"""LissaInfluence against DirectInfluence and explicit float64 curvature matrices."""

import pytest
import torch
from torch import nn
from torch.autograd.functional import hessian, jacobian

from infscale.torch import BlockMode, DirectInfluence, LissaDivergenceError, LissaInfluence

LAM = 0.1  # well conditioned: the curvature spectrum tops out near 0.7 (Hessian min ≈ -1e-2)
STEPS = 300


def make_problem(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 0.8).long()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    params = list(model.parameters())
    for _ in range(STEPS):  # plain gradient descent (torch.optim imports are slow)
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= 0.5 * g
    return model, x, y


def forward(theta, x):
    """The same MLP written out on a flat parameter vector (layout order)."""
    W1, b1 = theta[:12].reshape(4, 3), theta[12:16]
    W2, b2 = theta[16:28].reshape(3, 4), theta[28:31]
    return torch.tanh(x @ W1.T + b1) @ W2.T + b2


def explicit(model, x, y, mode):
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    if mode == "hessian":
        return hessian(lambda t: nn.functional.cross_entropy(forward(t, x), y), theta)
    J = jacobian(lambda t: forward(t, x), theta)  # (n, c, p)
    s = torch.softmax(forward(theta, x), dim=1)
    H_out = torch.diag_embed(s) - s[:, :, None] * s[:, None, :]
    return torch.einsum("nci,ncd,ndj->ij", J, H_out, J) / len(x)


def gradients(model, x, y):
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return jacobian(lambda t: nn.functional.cross_entropy(forward(t, x), y, reduction="none"), theta)


def loader(x, y, sizes):
    out, s = [], 0
    for b in sizes:
        out.append((x[s : s + b], y[s : s + b]))
        s += b
    return out


@pytest.fixture(scope="module")
def problem():
    model, x, y = make_problem()
    return model, x[:30], y[:30], x[30:], y[30:]


def rel(a, b):
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


CE = nn.functional.cross_entropy


def test_full_batch_converges_to_direct_and_explicit(problem):
    model, x, y, xt, yt = problem
    data = loader(x, y, [30])
    lissa = LissaInfluence(model, CE, LAM, maxiter=1000, scale=0.8, rtol=1e-7).fit(data)
    direct = DirectInfluence(model, CE, LAM).fit(data)
    approx = lissa.influences(xt, yt, x, y)
    assert rel(approx, direct.influences(xt, yt, x, y)) < 1e-3
    A = explicit(model, x, y, "hessian") + LAM * torch.eye(31, dtype=torch.float64)
    exact = gradients(model, xt, yt) @ torch.linalg.solve(A, gradients(model, x, y).T)
    assert rel(approx, exact) < 1e-3
    assert lissa.last_iterations["model"] < 1000


def test_gauss_newton_perturbation_mode(problem):
    model, x, y, xt, yt = problem
    data = loader(x, y, [30])
    kw = dict(second_order_mode="gauss_newton")
    lissa = LissaInfluence(model, CE, LAM, maxiter=1000, scale=0.8, rtol=1e-7, **kw).fit(data)
    direct = DirectInfluence(model, CE, LAM, **kw).fit(data)
    a = lissa.influences(xt[:3], yt[:3], x[:4], y[:4], mode="perturbation")
    assert a.shape == (3, 4, 3)
    assert rel(a, direct.influences(xt[:3], yt[:3], x[:4], y[:4], mode="perturbation")) < 1e-3


def test_dampen_adds_dampen_times_scale_to_the_regularization(problem):
    model, x, y, xt, yt = problem
    data = loader(x, y, [30])
    lissa = LissaInfluence(model, CE, LAM, maxiter=1000, dampen=0.05, scale=1.0, rtol=1e-9).fit(data)
    direct = DirectInfluence(model, CE, LAM + 0.05 * 1.0).fit(data)
    assert rel(lissa.influences(xt, yt, x, y), direct.influences(xt, yt, x, y)) < 1e-4


def test_unequal_mini_batches_warn_at_maxiter_and_stay_close(problem):
    model, x, y, xt, yt = problem
    data = loader(x, y, [13, 10, 7])  # every cycle averages to the mean curvature
    lissa = LissaInfluence(model, CE, LAM, maxiter=300, scale=8.0, rtol=1e-9).fit(data)
    with pytest.warns(RuntimeWarning, match=r"maxiter=300 with relative change \d"):
        approx = lissa.influences(xt, yt, x, y)
    direct = DirectInfluence(model, CE, LAM).fit(data)
    # mini-batch noise remains; it shrinks like 1/scale (unweighted batches would be off by ~0.2)
    assert rel(approx, direct.influences(xt, yt, x, y)) < 0.1


def test_layer_wise_against_explicit_block_diagonal(problem):
    model, x, y, xt, yt = problem
    reg = {"0": 0.12, "2": 0.08}
    lissa = LissaInfluence(
        model, CE, reg, maxiter=1000, scale=0.8, rtol=1e-7, block_structure=BlockMode.LAYER_WISE
    ).fit(loader(x, y, [30]))
    H = explicit(model, x, y, "hessian")
    A = torch.zeros_like(H)
    for sl, lam in ((slice(0, 16), reg["0"]), (slice(16, 31), reg["2"])):
        A[sl, sl] = H[sl, sl] + lam * torch.eye(sl.stop - sl.start, dtype=torch.float64)
    exact = gradients(model, xt, yt) @ torch.linalg.solve(A, gradients(model, x, y).T)
    assert rel(lissa.influences(xt, yt, x, y), exact) < 1e-3


@pytest.mark.parametrize("lam", [LAM, 0.0])
def test_divergence_raises_and_says_what_to_raise(problem, lam):
    model, x, y, xt, yt = problem
    lissa = LissaInfluence(model, CE, lam, maxiter=2000, scale=0.05).fit(loader(x, y, [30]))
    with pytest.raises(LissaDivergenceError, match="scale.*dampen"):
        lissa.influences(xt, yt, x, y)


def test_bad_arguments(problem):
    model = problem[0]
    for kw, name in [
        ({"scale": 0.0}, "scale"),
        ({"dampen": 1.0}, "dampen"),
        ({"maxiter": 0}, "maxiter"),
        ({"rtol": -1.0}, "rtol"),
    ]:
        with pytest.raises(ValueError, match=name):
            LissaInfluence(model, CE, LAM, **kw)
