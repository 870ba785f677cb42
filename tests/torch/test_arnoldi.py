"""ArnoldiInfluence against explicit float64 curvature matrices (torch.autograd.functional)."""

import pytest
import torch
from torch import nn
from torch.autograd.functional import hessian, jacobian

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


@pytest.mark.parametrize("mode", ["hessian", "gauss_newton"])
def test_full_rank_equals_direct(problem, mode):
    model, x, y, xt, yt = problem
    data = loader(x, y, [13, 10, 7])
    lam = LAM_H if mode == "hessian" else LAM
    arnoldi = ArnoldiInfluence(model, nn.functional.cross_entropy, lam, rank=31, second_order_mode=mode)
    direct = DirectInfluence(model, nn.functional.cross_entropy, lam, second_order_mode=mode)
    arnoldi.fit(data), direct.fit(data)
    assert rel(arnoldi.influences(xt, yt, x, y), direct.influences(xt, yt, x, y)) < 1e-6
    # and against the explicit curvature (independent of the library's products)
    A = explicit(model, x, y, mode) + lam * torch.eye(31, dtype=torch.float64)
    exact = gradients(model, xt, yt) @ torch.linalg.solve(A, gradients(model, x, y).T)
    assert rel(arnoldi.influences(xt, yt, x, y), exact) < 1e-6


def test_full_rank_perturbation_equals_direct(problem):
    model, x, y, xt, yt = problem
    data = loader(x, y, [16, 14])
    kw = dict(second_order_mode="gauss_newton")
    arnoldi = ArnoldiInfluence(model, nn.functional.cross_entropy, LAM, rank=31, **kw).fit(data)
    direct = DirectInfluence(model, nn.functional.cross_entropy, LAM, **kw).fit(data)
    a = arnoldi.influences(xt[:3], yt[:3], x[:5], y[:5], mode="perturbation")
    assert a.shape == (3, 5, 3)
    assert rel(a, direct.influences(xt[:3], yt[:3], x[:5], y[:5], mode="perturbation")) < 1e-6


@pytest.mark.parametrize("rank", [4, 8])
def test_rank_k_matches_best_truncation(problem, rank):
    model, x, y, xt, yt = problem
    data = loader(x, y, [13, 10, 7])
    H = explicit(model, x, y, "gauss_newton")
    evals, evecs = torch.linalg.eigh(H)
    top = torch.argsort(evals.abs(), descending=True)[:rank]
    V, sigma = evecs[:, top], evals[top]
    G_test, G_train = gradients(model, xt, yt), gradients(model, x, y)
    truncated = (G_test @ V) @ torch.diag(1 / (sigma + LAM)) @ (G_train @ V).T
    exact = G_test @ torch.linalg.solve(H + LAM * torch.eye(31, dtype=torch.float64), G_train.T)
    arnoldi = ArnoldiInfluence(
        model, nn.functional.cross_entropy, LAM, rank=rank, tol=1e-10, second_order_mode="gauss_newton"
    ).fit(data)
    approx = arnoldi.influences(xt, yt, x, y)
    assert torch.allclose(arnoldi.eigenvalues["model"], sigma, rtol=1e-8, atol=1e-12)
    assert rel(approx, truncated) < 1e-6
    assert rel(approx, exact) == pytest.approx(rel(truncated, exact), rel=1e-4)
    assert rel(approx, exact) > 1e-3  # rank k really truncates here


def test_layer_wise_against_explicit_block_diagonal(problem):
    model, x, y, xt, yt = problem
    data = loader(x, y, [11, 19])
    reg = {"0": 3e-2, "2": 1.5e-2}
    arnoldi = ArnoldiInfluence(
        model,
        nn.functional.cross_entropy,
        reg,
        rank=16,
        block_structure=BlockMode.LAYER_WISE,
        second_order_mode=SecondOrderMode.HESSIAN,
    ).fit(data)
    H = explicit(model, x, y, "hessian")
    A = torch.zeros_like(H)
    for sl, lam in ((slice(0, 16), reg["0"]), (slice(16, 31), reg["2"])):
        A[sl, sl] = H[sl, sl] + lam * torch.eye(sl.stop - sl.start, dtype=torch.float64)
    G_test, G_train = gradients(model, xt, yt), gradients(model, x, y)
    exact = G_test @ torch.linalg.solve(A, G_train.T)
    assert rel(arnoldi.influences(xt, yt, x, y), exact) < 1e-6
    by_block = arnoldi.influences_by_block(xt, yt, x, y)
    assert set(by_block) == {"0", "2"}
    assert rel(by_block["0"], G_test[:, :16] @ torch.linalg.solve(A[:16, :16], G_train[:, :16].T)) < 1e-6
    assert rel(sum(by_block.values()), exact) < 1e-6


def test_with_regularization_reuses_eigenpairs(problem):
    model, x, y, xt, yt = problem
    data = loader(x, y, [30])
    kw = dict(rank=6, second_order_mode="gauss_newton")
    base = ArnoldiInfluence(model, nn.functional.cross_entropy, LAM, **kw).fit(data)
    swept = base.with_regularization(0.05)
    fresh = ArnoldiInfluence(model, nn.functional.cross_entropy, 0.05, **kw).fit(data)
    assert rel(swept.influences(xt, yt, x, y), fresh.influences(xt, yt, x, y)) < 1e-8
    assert swept.eigenvectors is base.eigenvectors  # nothing recomputed
    assert rel(base.influences(xt, yt, x, y), fresh.influences(xt, yt, x, y)) > 1e-2  # λ matters


def test_representation_is_projected(problem):
    model, x, y, xt, yt = problem
    arnoldi = ArnoldiInfluence(
        model, nn.functional.cross_entropy, LAM, rank=5, second_order_mode="gauss_newton"
    )
    arnoldi.fit(loader(x, y, [30]))
    rep = arnoldi.train_representation(x, y)
    assert rep.shape == (30, 5)
    factors = arnoldi.influence_factors(xt, yt)
    expected = factors @ gradients(model, x, y).T  # factors lie in the eigenbasis
    assert rel(arnoldi.influences_from_representation(factors, rep), expected) < 1e-8
    assert rel(arnoldi.influences_from_factors(factors, x, y), expected) < 1e-8
    sym = arnoldi.influences(xt, yt)
    assert rel(sym, arnoldi.influences(xt, yt, xt, yt)) < 1e-12
    assert torch.allclose(arnoldi.self_influences(xt, yt), torch.diagonal(sym), rtol=1e-8)


def test_non_convergence_warns(problem):
    model, x, y, _, _ = problem
    arnoldi = ArnoldiInfluence(
        model,
        nn.functional.cross_entropy,
        LAM,
        rank=4,
        krylov_dimension=6,
        tol=1e-12,
        second_order_mode="gauss_newton",
    )
    with pytest.warns(RuntimeWarning, match="krylov_dimension"):
        arnoldi.fit(loader(x, y, [30]))


def test_indefinite_hessian_raises(problem):
    model, x, y, _, _ = problem
    arnoldi = ArnoldiInfluence(model, nn.functional.cross_entropy, 0.0, rank=31)
    with pytest.raises(NotPositiveDefiniteError, match="GAUSS_NEWTON"):
        arnoldi.fit(loader(x, y, [30]))


def test_bad_arguments(problem):
    model = problem[0]
    with pytest.raises(ValueError, match="rank"):
        ArnoldiInfluence(model, nn.functional.cross_entropy, rank=0)
    with pytest.raises(ValueError, match="krylov_dimension"):
        ArnoldiInfluence(model, nn.functional.cross_entropy, rank=5, krylov_dimension=3)
    with pytest.raises(ValueError, match="tol"):
        ArnoldiInfluence(model, nn.functional.cross_entropy, tol=0.0)


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
