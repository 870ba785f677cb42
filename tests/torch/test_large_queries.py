"""Queries of more rows than one pass of the per-sample gradient engine (``memory.PASS_ROWS``): every
row against an explicit float64 reference built here with torch.func and torch.autograd only.

A mutation that reused the first pass's gradients for later rows once went unnoticed (relative error
1.41 on rows 1,024-2,047); each query below spans three passes, on the test side and on the
training side."""

import pytest
import torch
from torch import nn
from torch.autograd.functional import hessian
from torch.func import functional_call, grad, vmap

from infscale.torch import ArnoldiInfluence, DirectInfluence, memory

N_BIG = 2_100  # rows of one query: passes of 1,024, 1,024 and 52 rows
N_FIT = 40
LAM = 0.5  # above the Hessian's most negative eigenvalue (checked below)


@pytest.fixture(scope="module")
def problem():
    """A 3-4-3 tanh MLP (31 parameters, float64), 40 fit rows, and 2,100 query rows."""
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(N_FIT + N_BIG, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N_FIT + N_BIG,), generator=g)
    return model, (x[:N_FIT], y[:N_FIT]), (x[N_FIT:], y[N_FIT:])


@pytest.fixture(scope="module")
def reference(problem):
    """Per-sample gradients by vmap(grad) of each sample's loss, the Hessian of the mean fit loss by
    torch.autograd.functional.hessian, both on the flat parameter vector (named_parameters order)."""
    model, (x_fit, y_fit), _ = problem
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def params(t):
        parts = torch.split(t, [s.numel() for s in shapes])
        return {n: part.reshape(s) for n, part, s in zip(names, parts, shapes)}

    def loss(t, x, y):
        return nn.functional.cross_entropy(functional_call(model, params(t), (x,)), y)

    def gradients(x, y):
        return vmap(grad(lambda t, xi, yi: loss(t, xi[None], yi[None])), in_dims=(None, 0, 0))(theta, x, y)

    H = hessian(lambda t: loss(t, x_fit, y_fit), theta)
    A = H + LAM * torch.eye(H.shape[0], dtype=H.dtype)
    return gradients, A, torch.linalg.eigvalsh(H)


def _relerr(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _rowwise_relerr(a, b, rows: slice) -> float:
    return _relerr(a[rows], b[rows])


def _methods():
    return {
        "direct": lambda m: DirectInfluence(m, nn.functional.cross_entropy, LAM),
        # all 31 eigenpairs: the exact inverse, through Arnoldi's own projected training side
        "arnoldi": lambda m: ArnoldiInfluence(m, nn.functional.cross_entropy, LAM, rank=31, tol=1e-12),
    }


def test_the_queries_span_several_passes(reference):
    assert 2 * memory.pass_rows() < N_BIG  # three passes: otherwise this module tests nothing
    assert reference[2][0] + LAM > 0  # H + λI is positive definite


@pytest.mark.parametrize("method", sorted(_methods()))
def test_large_queries_against_explicit_reference(problem, reference, method):
    model, (x_fit, y_fit), (x_big, y_big) = problem
    gradients, A, _ = reference
    infl = _methods()[method](model).fit([(x_fit, y_fit)])
    G_big = gradients(x_big, y_big)
    factors_big = torch.linalg.solve(A, G_big.T).T
    G_fit = gradients(x_fit, y_fit)
    passes = [slice(0, 1024), slice(1024, 2048), slice(2048, N_BIG)]

    # test side: 2,100 test rows against the 40 fit rows
    got = infl.influences(x_big, y_big, x_fit, y_fit)
    expected = factors_big @ G_fit.T
    assert got.shape == (N_BIG, N_FIT)
    for rows in passes:
        assert _rowwise_relerr(got, expected, rows) < 1e-8, rows

    # training side: 5 test rows against the 2,100 rows
    got = infl.influences(x_fit[:5], y_fit[:5], x_big, y_big)
    expected = torch.linalg.solve(A, G_fit[:5].T).T @ G_big.T
    assert got.shape == (5, N_BIG)
    for rows in passes:
        assert _rowwise_relerr(got.T, expected.T, rows) < 1e-8, rows

    # influence factors and self-influences of the 2,100 rows
    got = infl.influence_factors(x_big, y_big)
    for rows in passes:
        assert _rowwise_relerr(got, factors_big, rows) < 1e-8, rows
    got = infl.self_influences(x_big, y_big)
    expected = (factors_big * G_big).sum(1)
    for rows in passes:
        assert _rowwise_relerr(got, expected, rows) < 1e-8, rows


def test_symmetric_large_query_against_explicit_reference(problem, reference):
    """influences(x, y) of 2,100 rows against themselves: (2,100, 2,100), every pass on both sides."""
    model, (x_fit, y_fit), (x_big, y_big) = problem
    gradients, A, _ = reference
    G_big = gradients(x_big, y_big)
    expected = torch.linalg.solve(A, G_big.T).T @ G_big.T
    for name, make in _methods().items():
        got = make(model).fit([(x_fit, y_fit)]).influences(x_big, y_big)
        for rows in (slice(0, 1024), slice(1024, 2048), slice(2048, N_BIG)):
            assert _relerr(got[rows], expected[rows]) < 1e-8, (name, rows)
            assert _relerr(got[:, rows], expected[:, rows]) < 1e-8, (name, rows)
