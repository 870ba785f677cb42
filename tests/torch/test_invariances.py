"""Invariances every method must have: batch size and data order do not matter; factors,
train representations and self-influences agree with the full matrix; perturbation mode is
the derivative of up mode with respect to the training input (finite differences)."""

import pytest
import torch

from infscale.errors import BatchFormatError
from infscale.torch import CgInfluence, DirectInfluence


def make(method, p, lam=0.05):
    if method == "direct":
        return DirectInfluence(p.model, p.loss, lam)
    return CgInfluence(p.model, p.loss, lam, rtol=1e-11, atol=0.0)


METHODS = ["direct", "cg"]


@pytest.mark.parametrize("method", METHODS)
def test_batch_size_order_and_batch_kind_do_not_matter(mlp, ground_truth, method):
    p = mlp
    reference = make(method, p).fit(p.loader()).influences(p.x_test, p.y_test, p.x, p.y)
    loaders = ((7, "tuple"), (16, "list"), (3, "tuple"))  # 40 = 5·7 + 5 = 2·16 + 8 = 13·3 + 1
    if method == "cg":  # every CG iteration is a pass over the batches: keep them few
        loaders = ((16, "list"), (13, "tuple"))
    with pytest.raises(BatchFormatError, match="length 3"):  # (x, y, index) or (x1, x2, y)? never guessed
        make(method, p).fit(p.loader(13, "long"))
    for batch_size, kind in loaders:
        got = make(method, p).fit(p.loader(batch_size, kind)).influences(p.x_test, p.y_test, p.x, p.y)
        assert ground_truth.relerr(got, reference) < 1e-10, (batch_size, kind)
    perm = torch.randperm(p.x.shape[0], generator=torch.Generator().manual_seed(0))
    shuffled = [(p.x[perm][s : s + 25], p.y[perm][s : s + 25]) for s in range(0, 40, 25)]
    model = make(method, p).fit(shuffled)
    got = model.influences(p.x_test, p.y_test, p.x[perm], p.y[perm])
    assert ground_truth.relerr(got, reference[:, perm]) < 1e-10


@pytest.mark.parametrize("method", METHODS)
def test_factors_representation_and_self_influences(mlp, ground_truth, method):
    p = mlp
    model = make(method, p).fit(p.loader(11 if method == "direct" else None))
    factors = model.influence_factors(p.x_test, p.y_test)
    assert factors.shape == (p.x_test.shape[0], model.n_parameters)
    for mode in ("up", "perturbation"):
        full = model.influences(p.x_test, p.y_test, p.x, p.y, mode=mode)
        from_factors = model.influences_from_factors(factors, p.x, p.y, mode=mode)
        assert ground_truth.relerr(from_factors, full) < 1e-10
        representation = model.train_representation(p.x, p.y, mode=mode)
        from_repr = model.influences_from_representation(factors, representation, mode=mode)
        assert ground_truth.relerr(from_repr, from_factors) < 1e-12
        symmetric = model.influences(p.x_test, p.y_test, mode=mode)
        idx = torch.arange(p.x_test.shape[0])
        diagonal = symmetric[idx, idx]
        assert ground_truth.relerr(model.self_influences(p.x_test, p.y_test, mode=mode), diagonal) < 1e-8
    up_repr = model.train_representation(p.x, p.y)
    with pytest.raises(ValueError, match="made in up mode"):
        model.influences_from_representation(factors, up_repr, mode="perturbation")
    with pytest.raises(ValueError, match="made in perturbation mode"):
        model.influences_from_representation(factors, model.train_representation(p.x, p.y, "perturbation"))


@pytest.mark.parametrize("method", METHODS)
def test_perturbation_is_the_derivative_of_up_mode(mlp, ground_truth, method):
    """∂/∂x_j of [factors · ∇ℓ(x_j, y_j)] by central differences (the fit stays fixed)."""
    p = mlp
    model = make(method, p).fit(p.loader())
    factors = model.influence_factors(p.x_test, p.y_test)
    x, y = p.x[:6], p.y[:6]
    analytic = model.influences_from_factors(factors, x, y, mode="perturbation")  # (7, 6, 4)
    h = 1e-5
    numeric = torch.zeros_like(analytic)
    for f in range(x.shape[1]):
        e = torch.zeros_like(x)
        e[:, f] = h
        plus = model.influences_from_factors(factors, x + e, y)
        minus = model.influences_from_factors(factors, x - e, y)
        numeric[:, :, f] = (plus - minus) / (2 * h)
    assert ground_truth.relerr(analytic, numeric) < 1e-7
