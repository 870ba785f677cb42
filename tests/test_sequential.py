"""SequentialInfluenceCalculator: results against closed-form linear regression, and the
work it does (counted with an instrumented model)."""

from __future__ import annotations

import functools
import time

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from infscale import InfluenceFunctionModel, NotFittedError, SequentialInfluenceCalculator
from infscale.array import MaxAggregator, MinAggregator, NestedSequenceAggregator, TopKAggregator
from infscale.base import UnsupportedInfluenceModeError
from infscale.torch import DirectInfluence
from infscale.torch.util import (
    NestedTorchCatAggregator,
    TorchCatAggregator,
    TorchMaxAggregator,
    TorchNumpyConverter,
    TorchTopKAggregator,
)

LAM = 0.05


def mse(outputs, targets):
    # written out: torch 2.13's nn.functional.mse_loss fails under torch.func's
    # forward-over-reverse Hessian products ("ZeroTensors are immutable")
    return ((outputs - targets) ** 2).mean()


# ---------------------------------------------------------------------------- linear regression
def make_linear(n_train=23, n_test=7, d=3, seed=0):
    """A linear model y ≈ w·x + b with MSE loss (float64) and its data."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, d, generator=g, dtype=torch.float64)
    y = (x @ torch.randn(d, 1, generator=g, dtype=torch.float64)) + 0.5 * torch.randn(
        n_train + n_test, 1, generator=g, dtype=torch.float64
    )
    model = nn.Linear(d, 1).double()
    with torch.no_grad():  # not the minimiser: residuals stay non-zero, gradients informative
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64))
        model.bias.fill_(0.3)
    return model, x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def closed_form(model, x_train, y_train, x_test, y_test, lam=LAM):
    """Influences, factors and perturbation influences by hand (numpy, float64).

    ℓ_i = (w·x_i + b − y_i)²,  ∇ℓ_i = 2 r_i [x_i, 1],  H = 2/n Σ [x_i, 1][x_i, 1]ᵀ.
    """
    w = model.weight.detach().numpy().ravel()
    b = float(model.bias.detach())
    xtr, ytr, xte, yte = (t.numpy() for t in (x_train, y_train.ravel(), x_test, y_test.ravel()))

    def aug(x):
        return np.hstack([x, np.ones((len(x), 1))])

    def grads(x, y):
        return 2 * (x @ w + b - y)[:, None] * aug(x)

    hessian = 2 / len(xtr) * aug(xtr).T @ aug(xtr) + lam * np.eye(len(w) + 1)
    factors = np.linalg.solve(hessian, grads(xte, yte).T).T
    influences = factors @ grads(xtr, ytr).T
    # d/dx_j of factorᵀ 2 r_j [x_j, 1] = 2 r_j v_w + 2 (v_w·x_j + v_b) w
    r = xtr @ w + b - ytr
    vw, vb = factors[:, :-1], factors[:, -1]
    perturbation = 2 * r[None, :, None] * vw[:, None, :] + 2 * (vw @ xtr.T + vb[:, None])[:, :, None] * w
    self_factors = np.linalg.solve(hessian, grads(xtr, ytr).T).T
    self_infl = (self_factors * grads(xtr, ytr)).sum(1)
    return {"influences": influences, "factors": factors, "perturbation": perturbation, "self": self_infl}


@functools.lru_cache(maxsize=1)
def fitted_linear():
    """Fitted DirectInfluence on the linear problem, its loaders and the closed form (cached:
    test_zarr_store.py uses it too, and fitting once keeps the suite fast)."""
    model, xtr, ytr, xte, yte = make_linear()
    infl = DirectInfluence(model, mse, hessian_regularization=LAM)
    infl.fit(DataLoader(TensorDataset(xtr, ytr), batch_size=len(xtr)))
    truth = closed_form(model, xtr, ytr, xte, yte)
    train = DataLoader(TensorDataset(xtr, ytr), batch_size=5)  # 5, 5, 5, 5, 3
    test = DataLoader(TensorDataset(xte, yte), batch_size=3)  # 3, 3, 1
    return infl, train, test, truth


@pytest.fixture
def linear():
    return fitted_linear()


def test_influences_match_closed_form_in_every_loop_order(linear):
    infl, train, test, truth = linear
    for order in ("auto", "test_outer", "train_outer"):
        for cache in (0, 1 << 20):
            calc = SequentialInfluenceCalculator(infl, cache_bytes=cache, loop_order=order)
            lazy = calc.influences(test, train)
            assert lazy.shape() == (7, 23)
            result = lazy.compute(aggregator=NestedTorchCatAggregator())
            np.testing.assert_allclose(result.numpy(), truth["influences"], rtol=1e-9, atol=1e-12)


def test_default_aggregator_is_nested_list_of_blocks(linear):
    infl, train, test, truth = linear
    rows = SequentialInfluenceCalculator(infl).influences(test, train).compute()
    assert [len(r) for r in rows] == [5, 5, 5]
    assert [tuple(b.shape) for b in rows[2]] == [(1, 5)] * 4 + [(1, 3)]
    stacked = np.block([[b.numpy() for b in r] for r in rows])
    np.testing.assert_allclose(stacked, truth["influences"], rtol=1e-9)


def test_plain_nested_aggregator_gets_rows_in_order(linear):
    infl, train, test, truth = linear

    class RowSums(NestedSequenceAggregator):
        def __call__(self, rows):
            return [sum(float(b.sum()) for b in row) for row in rows]

    calc = SequentialInfluenceCalculator(infl, cache_bytes=0, loop_order="train_outer")
    sums = calc.influences(test, train).compute(aggregator=RowSums())
    expected = [truth["influences"][s].sum() for s in (slice(0, 3), slice(3, 6), slice(6, 7))]
    np.testing.assert_allclose(sums, expected, rtol=1e-9)


def test_perturbation_mode_matches_closed_form(linear):
    infl, train, test, truth = linear
    lazy = SequentialInfluenceCalculator(infl).influences(test, train, mode="perturbation")
    assert lazy.shape() == (7, 23, 3)
    result = lazy.compute(aggregator=NestedTorchCatAggregator())
    np.testing.assert_allclose(result.numpy(), truth["perturbation"], rtol=1e-8, atol=1e-10)


def test_factors_self_influences_and_from_factors(linear):
    infl, train, test, truth = linear
    calc = SequentialInfluenceCalculator(infl)
    factors = calc.influence_factors(test)
    assert factors.chunk_sizes() == [3, 3, 1]
    np.testing.assert_allclose(factors.compute(TorchCatAggregator()).numpy(), truth["factors"], rtol=1e-9)
    np.testing.assert_allclose(
        calc.self_influences(train).compute(TorchCatAggregator()).numpy(), truth["self"], rtol=1e-9
    )
    for given in (factors, list(factors)):
        lazy = calc.influences_from_factors(given, train)
        result = lazy.compute(aggregator=NestedTorchCatAggregator())
        np.testing.assert_allclose(result.numpy(), truth["influences"], rtol=1e-9, atol=1e-12)


def test_streaming_reductions_match_brute_force(linear):
    infl, train, test, truth = linear
    full = truth["influences"]
    calc = SequentialInfluenceCalculator(infl, cache_bytes=0, loop_order="train_outer")
    lazy = calc.influences(test, train)
    for agg in (TopKAggregator(4), TorchTopKAggregator(4)):
        top = lazy.compute(aggregator=agg)
        hi = np.asarray(top.helpful_indices)
        lo = np.asarray(top.harmful_indices)
        np.testing.assert_array_equal(hi, np.argsort(-full, axis=1)[:, :4])
        np.testing.assert_array_equal(lo, np.argsort(full, axis=1)[:, :4])
        np.testing.assert_allclose(np.asarray(top.helpful_values), np.take_along_axis(full, hi, 1), rtol=1e-9)
        np.testing.assert_allclose(np.asarray(top.harmful_values), np.take_along_axis(full, lo, 1), rtol=1e-9)
    for agg in (MaxAggregator(), TorchMaxAggregator()):
        res = lazy.compute(aggregator=agg)
        np.testing.assert_array_equal(np.asarray(res.indices), full.argmax(1))
        np.testing.assert_allclose(np.asarray(res.values), full.max(1), rtol=1e-9)
    res = lazy.compute(aggregator=MinAggregator())
    np.testing.assert_array_equal(res.indices, full.argmin(1))


# ---------------------------------------------------------------------------- bad input
def test_bad_input_gives_clear_errors(linear):
    infl, train, test, _ = linear
    calc = SequentialInfluenceCalculator(infl)
    x, y = train.dataset.tensors
    empty = DataLoader(TensorDataset(x[:0], y[:0]), batch_size=4)
    with pytest.raises(ValueError, match="train_data_iterable is empty"):
        calc.influences(test, empty)
    with pytest.raises(ValueError, match=r"\(x, y\) batches; batch 0 is a Tensor"):
        calc.influences(test, [x[:4], x[4:8]])
    wide = DataLoader(TensorDataset(torch.randn(6, 5, dtype=torch.float64), y[:6]), batch_size=3)
    with pytest.raises(ValueError, match=r"same feature shape.*\(5,\).*\(3,\)"):
        calc.influences(wide, train)
    with pytest.raises(ValueError, match="shuffle"):
        calc.influences(test, DataLoader(train.dataset, batch_size=4, shuffle=True))
    with pytest.raises(TypeError, match="one-shot iterator"):
        calc.influences(test, iter(list(train)))
    with pytest.raises(UnsupportedInfluenceModeError, match="'sideways'"):
        calc.influences(test, train, mode="sideways")
    with pytest.raises(ValueError, match="loop_order"):
        SequentialInfluenceCalculator(infl, loop_order="diagonal")
    with pytest.raises(ValueError, match="cache_bytes"):
        SequentialInfluenceCalculator(infl, cache_bytes=-1)
    with pytest.raises(ValueError, match="k must be an integer"):
        TopKAggregator(0)
    with pytest.raises(ValueError, match="mode 'up'"):
        calc.influences(test, train, mode="perturbation").compute(aggregator=TopKAggregator(2))
    model, *_ = make_linear()
    unfitted = DirectInfluence(model, mse, hessian_regularization=LAM)
    with pytest.raises(NotFittedError, match="fit"):
        SequentialInfluenceCalculator(unfitted).influences(test, train)


def test_plain_iterables_without_lengths_are_counted(linear):
    infl, train, test, truth = linear
    train_list, test_list = list(train), list(test)  # lists of (x, y): no batch_size attribute
    lazy = SequentialInfluenceCalculator(infl).influences(test_list, train_list)
    assert lazy.shape() == (7, 23)
    result = lazy.compute(aggregator=NestedTorchCatAggregator())
    np.testing.assert_allclose(result.numpy(), truth["influences"], rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------- work done once
class CountingModel(InfluenceFunctionModel):
    """influences = (x_test A)(x_train)ᵀ, counting every call; optional sleeps make a side expensive."""

    def __init__(self, d=3, factor_sleep=0.0, repr_sleep=0.0, block_sleep=0.0, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.a = torch.randn(d, d, generator=g, dtype=torch.float64)
        self.factor_sleep, self.repr_sleep, self.block_sleep = factor_sleep, repr_sleep, block_sleep
        self.calls = {"factors": 0, "representation": 0, "blocks": 0}
        self.dtype = torch.float64

    is_fitted = True
    is_thread_safe = True

    @property
    def n_parameters(self):
        return self.a.shape[0]

    def fit(self, data):
        return self

    def hyperparameters(self):
        return {"seed_matrix": "gaussian"}

    def influence_factors(self, x, y):
        self.calls["factors"] += 1
        time.sleep(self.factor_sleep)
        return x @ self.a

    def train_representation(self, x, y, mode="up"):
        self.calls["representation"] += 1
        time.sleep(self.repr_sleep)
        return x.clone()

    def influences_from_representation(self, factors, representation, mode="up"):
        self.calls["blocks"] += 1
        time.sleep(self.block_sleep)
        return factors @ representation.T

    def influences_from_factors(self, z_test_factors, x, y, mode="up"):
        return z_test_factors @ x.T

    def influences(self, x_test, y_test, x=None, y=None, mode="up"):
        return x_test @ self.a @ x.T

    def self_influences(self, x, y, mode="up"):
        return ((x @ self.a) * x).sum(1)


def counting_problem(n_train=40, n_test=12, bt=4, br=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    xtr = torch.randn(n_train, 3, generator=g, dtype=torch.float64)
    xte = torch.randn(n_test, 3, generator=g, dtype=torch.float64)
    train = DataLoader(TensorDataset(xtr, torch.zeros(n_train)), batch_size=br)
    test = DataLoader(TensorDataset(xte, torch.zeros(n_test)), batch_size=bt)
    return xtr, xte, train, test


def run_counted(model, cache_bytes, loop_order, aggregator=None):
    xtr, xte, train, test = counting_problem()
    calc = SequentialInfluenceCalculator(model, cache_bytes=cache_bytes, loop_order=loop_order)
    lazy = calc.influences(test, train)
    result = lazy.compute(aggregator=aggregator or NestedTorchCatAggregator())
    if aggregator is None:
        np.testing.assert_allclose(result.numpy(), (xte @ model.a @ xtr.T).numpy(), rtol=1e-12)
    return model.calls, lazy.source.last_plan


T, R = 3, 8  # test batches, train batches of counting_problem
BATCH_BYTES = 5 * 3 * 8  # one cached training representation: 5 rows × 3 float64


def test_everything_cached_computes_each_side_once():
    calls, plan = run_counted(CountingModel(), 1 << 20, "auto")
    assert calls == {"factors": T, "representation": R, "blocks": T * R}
    assert plan["loop_order"] == "test_outer" and plan["cached_batches"] == R


def test_forced_orders_without_cache_recompute_the_inner_side():
    assert run_counted(CountingModel(), 0, "test_outer")[0] == {
        "factors": T,
        "representation": T * R,
        "blocks": T * R,
    }
    assert run_counted(CountingModel(), 0, "train_outer")[0] == {
        "factors": T * R,
        "representation": R,
        "blocks": T * R,
    }


def test_partial_cache_recomputes_only_what_does_not_fit():
    cached = 3
    calls, plan = run_counted(CountingModel(), cached * BATCH_BYTES, "test_outer")
    assert plan["cached_batches"] == cached
    assert calls["factors"] == T
    assert calls["representation"] == R + (T - 1) * (R - cached)


def test_auto_order_recomputes_the_cheaper_side():
    # factors expensive: keep test batches outside, recompute training representations
    calls, plan = run_counted(CountingModel(factor_sleep=0.05), 0, "auto")
    assert plan["loop_order"] == "test_outer"
    assert calls["factors"] == T and calls["representation"] == T * R
    # representations expensive: go over training batches outside, recompute factors
    calls, plan = run_counted(CountingModel(repr_sleep=0.05), 0, "auto")
    assert plan["loop_order"] == "train_outer"
    assert calls["representation"] == R and calls["factors"] == T * R


def test_row_ordered_aggregators_force_test_outer():
    class Rows(NestedSequenceAggregator):
        def __call__(self, rows):
            return [torch.cat(list(r), dim=1) for r in rows]

    calls, plan = run_counted(CountingModel(repr_sleep=0.02), 0, "auto", aggregator=Rows())
    assert plan["loop_order"] == "test_outer"
    assert calls["factors"] == T


def test_real_model_factors_computed_once_per_test_batch(linear):
    infl, train, test, truth = linear
    calls = {"factors": 0, "representation": 0}

    class Counted(type(infl)):
        def influence_factors(self, x, y):
            calls["factors"] += 1
            return super().influence_factors(x, y)

        def train_representation(self, x, y, mode="up"):
            calls["representation"] += 1
            return super().train_representation(x, y, mode)

    infl.__class__ = Counted
    try:
        lazy = SequentialInfluenceCalculator(infl).influences(test, train)
        result = lazy.compute(NestedTorchCatAggregator())
    finally:
        infl.__class__ = Counted.__bases__[0]
    np.testing.assert_allclose(result.numpy(), truth["influences"], rtol=1e-9, atol=1e-12)
    assert calls == {"factors": 3, "representation": 5}


def test_influences_from_factors_takes_dataloader_batches_of_factors():
    """pyDVL users pass what a DataLoader over a TensorDataset of factors yields: [tensor] batches."""
    xtr, xte, train, test = counting_problem()
    model = CountingModel()
    calc = SequentialInfluenceCalculator(model)
    factors = xte @ model.a
    truth = (factors @ xtr.T).numpy()
    for given in (
        DataLoader(TensorDataset(factors), batch_size=4),
        [factors[:4], factors[4:8], factors[8:]],
        factors,
    ):
        result = calc.influences_from_factors(given, train).compute(aggregator=NestedTorchCatAggregator())
        np.testing.assert_allclose(result.numpy(), truth, rtol=1e-12)
    with pytest.raises(TypeError, match=r"z_test_factors: chunk 0 is a tuple of length 2"):
        calc.influences_from_factors([(factors[:4], factors[:4])], train).compute()


def test_drop_last_training_loader_stores_what_is_read(tmp_path):
    """A drop_last loader's shape comes from the batches it yields, not from its dataset."""
    xtr, xte, _, test = counting_problem(n_train=43)
    train = DataLoader(TensorDataset(xtr, torch.zeros(43)), batch_size=5, drop_last=True)
    model = CountingModel()
    stored = (
        SequentialInfluenceCalculator(model)
        .influences(test, train)
        .to_zarr(str(tmp_path / "s.zarr"), TorchNumpyConverter(), progress=False, return_stored=True)
    )
    assert stored.shape == (12, 40)
    np.testing.assert_allclose(stored[:], (xte @ model.a @ xtr[:40].T).numpy(), rtol=1e-12)
