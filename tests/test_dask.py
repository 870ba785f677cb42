"""DaskInfluenceCalculator and torch_dataset_to_dask_array without a process cluster:
values against an explicit float64 Hessian, laziness, graph shape, errors.

The cluster tests (worker processes, the `dask` command line, a killed worker) are
in test_dask_cluster.py.
"""

from __future__ import annotations

import warnings

import cloudpickle
import dask
import dask.array as da
import numpy as np
import pytest
import torch
import zarr
from distributed import Client
from helpers import flat_forward
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from infscale import (
    DaskInfluenceCalculator,
    DisableClientSingleThreadCheck,
    InfluenceFunctionModel,
    InvalidDimensionChunksError,
    NotFittedError,
    ThreadSafetyViolationError,
    UnalignedChunksError,
    UnsupportedInfluenceModeError,
)
from infscale.torch import DirectInfluence
from infscale.torch.util import TorchNumpyConverter, torch_dataset_to_dask_array

LAMBDA = 0.05
N_TRAIN, N_TEST, N_FEATURES, N_CLASSES = 11, 7, 3, 3


# ---------------------------------------------------------------- ground truth
@pytest.fixture(scope="module")
def problem():
    """A small tanh MLP (float64) with the explicit Hessian of its mean training loss."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only contend
    try:
        yield _problem()
    finally:
        torch.set_num_threads(threads)


def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + N_TEST, N_FEATURES, generator=g, dtype=torch.float64)
    y = torch.randint(0, N_CLASSES, (N_TRAIN + N_TEST,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(N_FEATURES, 4), nn.Tanh(), nn.Linear(4, N_CLASSES)).double()
    loss = nn.functional.cross_entropy
    x_tr, y_tr, x_te, y_te = x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]
    for _ in range(200):  # gradient descent towards a minimum, so that H + λI is positive definite
        model.zero_grad()
        loss(model(x_tr), y_tr).backward()
        with torch.no_grad():
            for param in model.parameters():
                param -= 0.5 * (param.grad + 1e-2 * param)

    forward, theta0 = flat_forward(model)

    def sample_loss(theta, xi, yi):
        return loss(forward(theta, xi[None]), yi[None])

    def mean_loss(theta):
        return loss(forward(theta, x_tr), y_tr)

    hessian = torch.autograd.functional.hessian(mean_loss, theta0)
    inverse = torch.linalg.inv(hessian + LAMBDA * torch.eye(len(theta0), dtype=torch.float64))

    def grads(xs, ys):
        rows = []
        for a, b in zip(xs, ys):
            rows.append(torch.autograd.functional.jacobian(lambda t, a=a, b=b: sample_loss(t, a, b), theta0))
        return torch.stack(rows)

    g_tr, g_te = grads(x_tr, y_tr), grads(x_te, y_te)
    factors = g_te @ inverse
    up = factors @ g_tr.T

    def perturbation(fac, xs, ys):
        # d/dx_j of fac_i · ∇θ ℓ(x_j, y_j), by autograd through the exact gradient
        out = torch.zeros(fac.shape[0], len(xs), N_FEATURES, dtype=torch.float64)
        for j, (a, b) in enumerate(zip(xs, ys)):

            def f(a_, b=b):
                return fac @ torch.func.grad(sample_loss)(theta0, a_, b)

            out[:, j] = torch.autograd.functional.jacobian(f, a)
        return out

    pert = perturbation(factors, x_tr, y_tr)
    sym_up = factors @ g_te.T
    sym_pert = perturbation(factors, x_te, y_te)
    infl = DirectInfluence(model, loss, hessian_regularization=LAMBDA)
    infl.fit(DataLoader(TensorDataset(x_tr, y_tr), batch_size=5))
    return dict(
        model=model, loss=loss, infl=infl, x_tr=x_tr, y_tr=y_tr, x_te=x_te, y_te=y_te,
        factors=factors, up=up, pert=pert, sym_up=sym_up, sym_pert=sym_pert,
    )  # fmt: skip


def _calc(model) -> DaskInfluenceCalculator:
    with pytest.warns(UserWarning, match="thread-safety check is off"):
        return DaskInfluenceCalculator(model, TorchNumpyConverter(), DisableClientSingleThreadCheck)


def _dask(t: torch.Tensor, rows: int) -> da.Array:
    return da.from_array(t.numpy(), chunks=(rows,) + t.shape[1:])


@pytest.fixture()
def synchronous():
    with dask.config.set(scheduler="synchronous"):
        yield


# ---------------------------------------------------------------- values
def test_influences_match_explicit_hessian_in_both_modes(problem, synchronous):
    p = problem
    calc = _calc(p["infl"])
    # chunk sizes that divide neither n_test (7) nor n_train (11)
    xt, yt, x, y = _dask(p["x_te"], 3), _dask(p["y_te"], 3), _dask(p["x_tr"], 4), _dask(p["y_tr"], 4)
    up = calc.influences(xt, yt, x, y)
    assert up.shape == (N_TEST, N_TRAIN) and up.chunks == ((3, 3, 1), (4, 4, 3))
    assert up.dtype == np.float64
    np.testing.assert_allclose(up.compute(), p["up"].numpy(), rtol=1e-9, atol=1e-11)

    pert = calc.influences(xt, yt, x, y, mode="perturbation")
    assert pert.chunks == ((3, 3, 1), (4, 4, 3), (N_FEATURES,))
    np.testing.assert_allclose(pert.compute(), p["pert"].numpy(), rtol=1e-8, atol=1e-10)


def test_symmetric_self_influences_and_factors(problem, synchronous):
    p = problem
    calc = _calc(p["infl"])
    xt, yt = _dask(p["x_te"], 2), _dask(p["y_te"], 2)
    np.testing.assert_allclose(calc.influences(xt, yt).compute(), p["sym_up"].numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(
        calc.influences(xt, yt, mode="perturbation").compute(), p["sym_pert"].numpy(), rtol=1e-8, atol=1e-10
    )
    self_up = calc.self_influences(xt, yt)
    assert self_up.chunks == ((2, 2, 2, 1),)
    np.testing.assert_allclose(self_up.compute(), np.diag(p["sym_up"].numpy()), rtol=1e-9, atol=1e-11)
    self_pert = calc.self_influences(xt, yt, mode="perturbation")
    diagonal = p["sym_pert"].numpy()[np.arange(N_TEST), np.arange(N_TEST)]
    np.testing.assert_allclose(self_pert.compute(), diagonal, rtol=1e-8, atol=1e-10)

    factors = calc.influence_factors(xt, yt)
    assert factors.shape == (N_TEST, p["infl"].n_parameters) and factors.chunks[0] == (2, 2, 2, 1)
    np.testing.assert_allclose(factors.compute(), p["factors"].numpy(), rtol=1e-9, atol=1e-11)
    x, y = _dask(p["x_tr"], 5), _dask(p["y_tr"], 5)
    for mode, expected in (("up", p["up"]), ("perturbation", p["pert"])):
        result = calc.influences_from_factors(factors, x, y, mode=mode)
        assert result.chunks[:2] == ((2, 2, 2, 1), (5, 5, 1))
        np.testing.assert_allclose(result.compute(), expected.numpy(), rtol=1e-8, atol=1e-10)


def test_float32_model_gives_float32_equal_to_in_memory(problem, synchronous):
    p = problem
    model = nn.Sequential(nn.Linear(N_FEATURES, 4), nn.Tanh(), nn.Linear(4, N_CLASSES))
    model.load_state_dict({k: v.float() for k, v in p["model"].state_dict().items()})
    x_tr, x_te = p["x_tr"].float(), p["x_te"].float()
    infl = DirectInfluence(model, p["loss"], hessian_regularization=LAMBDA)
    infl.fit(DataLoader(TensorDataset(x_tr, p["y_tr"]), batch_size=N_TRAIN))
    calc = _calc(infl)
    # float64 inputs are cast to the model's dtype; the result is in the model's dtype
    result = calc.influences(
        _dask(p["x_te"], 4), _dask(p["y_te"], 4), _dask(p["x_tr"], 3), _dask(p["y_tr"], 3)
    )
    assert result.dtype == np.float32
    computed = result.compute()
    assert computed.dtype == np.float32
    expected = infl.influences(x_te, p["y_te"], x_tr, p["y_tr"]).numpy()
    np.testing.assert_allclose(computed, expected, rtol=1e-5, atol=1e-6)
    # and close to the float64 ground truth
    np.testing.assert_allclose(computed, p["up"].numpy(), rtol=1e-3, atol=1e-4)


def test_to_zarr_stores_the_influences(problem, synchronous, tmp_path):
    p = problem
    calc = _calc(p["infl"])
    arr = calc.influences(_dask(p["x_te"], 3), _dask(p["y_te"], 3), _dask(p["x_tr"], 4), _dask(p["y_tr"], 4))
    path = str(tmp_path / "influences.zarr")
    arr.to_zarr(path)
    stored = zarr.open_array(path, mode="r")
    assert stored.shape == (N_TEST, N_TRAIN) and stored.chunks == (3, 4)
    np.testing.assert_allclose(stored[:], p["up"].numpy(), rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------- laziness and graph shape
class SpyModel(InfluenceFunctionModel):
    """Delegates to a real model and counts the calls each worker-side method gets
    (in a class attribute: the calculator works on a pickled copy of the model)."""

    calls: dict[str, int] = {}

    def __init__(self, inner, thread_safe=False):
        self.inner, self.thread_safe = inner, thread_safe

    def _count(self, name):
        SpyModel.calls[name] = SpyModel.calls.get(name, 0) + 1

    is_fitted = property(lambda self: self.inner.is_fitted)
    is_thread_safe = property(lambda self: self.thread_safe)
    n_parameters = property(lambda self: self.inner.n_parameters)
    dtype = property(lambda self: self.inner.dtype)

    def fit(self, data):
        return self.inner.fit(data)

    def influence_factors(self, x, y):
        self._count("influence_factors")
        return self.inner.influence_factors(x, y)

    def influences_from_factors(self, f, x, y, mode="up"):
        self._count("influences_from_factors")
        return self.inner.influences_from_factors(f, x, y, mode)

    def train_representation(self, x, y, mode="up"):
        self._count("train_representation")
        return self.inner.train_representation(x, y, mode)

    def influences_from_representation(self, f, r, mode="up"):
        self._count("influences_from_representation")
        return self.inner.influences_from_representation(f, r, mode)

    def influences(self, *args, **kwargs):
        self._count("influences")
        return self.inner.influences(*args, **kwargs)

    def self_influences(self, x, y, mode="up"):
        self._count("self_influences")
        return self.inner.self_influences(x, y, mode)


@pytest.mark.parametrize("mode", ["up", "perturbation"])
def test_work_per_chunk_and_laziness(problem, synchronous, mode):
    p = problem
    spy = SpyModel(p["infl"])
    SpyModel.calls.clear()
    calc = _calc(spy)
    n_test_chunks, n_train_chunks = 3, 4  # test rows 3,3,1; train rows 3,3,3,2
    arr = calc.influences(
        _dask(p["x_te"], 3), _dask(p["y_te"], 3), _dask(p["x_tr"], 3), _dask(p["y_tr"], 3), mode=mode
    )
    assert spy.calls == {}, "building the array must not run the model"
    arr.compute()
    assert spy.calls == {
        "influence_factors": n_test_chunks,
        "train_representation": n_train_chunks,
        "influences_from_representation": n_test_chunks * n_train_chunks,
    }


def test_graph_task_counts_and_model_held_once(problem):
    p = problem
    calc = _calc(p["infl"])
    # test rows 7 in chunks of 2 (4 chunks), train rows 11 in chunks of 3 (4 chunks)
    arr = calc.influences(_dask(p["x_te"], 2), _dask(p["y_te"], 2), _dask(p["x_tr"], 3), _dask(p["y_tr"], 3))
    graph = dict(arr.__dask_graph__())

    def count(prefix):
        return sum(1 for k in graph if (k if isinstance(k, str) else k[0]).startswith(prefix))

    counts = {
        "model (pickled snapshot, unpickling task)": count("influence-model-"),
        "factors": count("influence-factors-"),
        "train representations": count("influence-train-representation-"),
        "products": count("influences-up-"),
    }
    print("task counts, 4 test chunks x 4 train chunks:", counts)
    assert counts == {
        "model (pickled snapshot, unpickling task)": 2,
        "factors": 4,
        "train representations": 4,
        "products": 16,
    }

    # after optimization (what is sent to a scheduler) the model is still one entry:
    # every other task refers to it by key instead of carrying a pickled copy
    (optimized,) = dask.optimize(arr)
    model_size = len(cloudpickle.dumps(p["infl"]))
    sizes = {k: len(cloudpickle.dumps(v)) for k, v in dict(optimized.__dask_graph__()).items()}
    heavy = [k for k, s in sizes.items() if s >= model_size]
    assert len(heavy) == 1 and str(heavy[0]).startswith("influence-model-DirectInfluence-pickle-"), heavy
    assert max(s for k, s in sizes.items() if k not in heavy) < model_size / 4


# ---------------------------------------------------------------- torch_dataset_to_dask_array
class CountingDataset(Dataset):
    """Counts reads in a class attribute (the arrays read from a pickled copy)."""

    reads = 0

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        CountingDataset.reads += 1
        return self.x[i], int(self.y[i])


def test_dataset_to_dask_array_is_lazy_and_reads_each_row_once(synchronous):
    x = torch.randn(10, 2, 3, dtype=torch.float64)
    y = torch.arange(10) % 3
    ds = CountingDataset(x, y)
    CountingDataset.reads = 0
    da_x, da_y = torch_dataset_to_dask_array(ds, chunk_size=4)
    assert ds.reads == 1  # sample 0 only, for shapes and dtypes
    assert da_x.shape == (10, 2, 3) and da_x.chunks == ((4, 4, 2), (2,), (3,)) and da_x.dtype == np.float32
    assert da_y.shape == (10,) and da_y.chunks == ((4, 4, 2),) and da_y.dtype == np.int64
    assert da_x[:3].compute().shape == (3, 2, 3)
    assert ds.reads == 1 + 4  # one chunk only
    CountingDataset.reads = 0
    cx, cy = dask.compute(da_x, da_y)  # x and y share one read task per chunk
    assert ds.reads == 10
    np.testing.assert_array_equal(cx, x.float().numpy())
    np.testing.assert_array_equal(cy, y.numpy())
    assert cx.dtype == np.float32 and cy.dtype == np.int64

    (short,) = torch_dataset_to_dask_array(
        TensorDataset(x), chunk_size=3, total_size=7, resulting_dtype=np.float64
    )
    assert short.chunks[0] == (3, 3, 1)
    np.testing.assert_array_equal(short.compute(), x[:7].numpy())


def test_dataset_to_dask_array_bad_input():
    ds = TensorDataset(torch.randn(5, 2), torch.arange(5))
    with pytest.raises(ValueError, match="chunk_size"):
        torch_dataset_to_dask_array(ds, chunk_size=0)
    with pytest.raises(ValueError, match="total_size"):
        torch_dataset_to_dask_array(ds, chunk_size=2, total_size=6)


# ---------------------------------------------------------------- errors
def test_bad_input_errors(problem):
    p = problem
    calc = _calc(p["infl"])
    x, y = _dask(p["x_tr"], 4), _dask(p["y_tr"], 4)
    xt, yt = _dask(p["x_te"], 3), _dask(p["y_te"], 3)

    with pytest.raises(InvalidDimensionChunksError, match="x_test must be chunked along its first axis"):
        calc.influences(xt.rechunk((3, 1)), yt, x, y)
    with pytest.raises(UnalignedChunksError, match=r"x and y must have the same row chunks"):
        calc.influences(xt, yt, x, y.rechunk(3))
    with pytest.raises(ValueError, match=r"x and y must have the same number of rows.*\(11, 3\).*\(10,\)"):
        calc.influences(xt, yt, x, y[:10])
    with pytest.raises(ValueError, match="feature shape"):
        calc.influences(xt, yt, da.concatenate([x, x[:, :1]], axis=1).rechunk({1: -1}), y)
    with pytest.raises(ValueError, match="only x was given"):
        calc.influences(xt, yt, x)
    with pytest.raises(TypeError, match="x must be a dask.array.Array"):
        calc.influences(xt, yt, p["x_tr"], y)
    with pytest.raises(UnsupportedInfluenceModeError, match="sideways"):
        calc.influences(xt, yt, x, y, mode="sideways")
    with pytest.raises(ValueError, match="z_test_factors must have shape"):
        calc.influences_from_factors(xt, x, y)

    unfitted = DirectInfluence(p["model"], p["loss"], hessian_regularization=LAMBDA)
    with pytest.raises(NotFittedError, match=r"not fitted.*fit\(train_dataloader\)"):
        DaskInfluenceCalculator(unfitted, TorchNumpyConverter(), DisableClientSingleThreadCheck)
    with pytest.raises(TypeError, match="client must be a distributed.Client"):
        DaskInfluenceCalculator(p["infl"], TorchNumpyConverter(), "localhost:8786")
    with pytest.raises(TypeError, match="converter"):
        DaskInfluenceCalculator(p["infl"], None, DisableClientSingleThreadCheck)


def test_thread_safety_check_and_closed_client(problem):
    p = problem
    # threads in this process: cheap to start, enough to see the check
    with Client(
        processes=False, n_workers=1, threads_per_worker=2, dashboard_address="127.0.0.1:0"
    ) as client:
        address = next(iter(client.nthreads()))
        with pytest.raises(ThreadSafetyViolationError, match=r"threads_per_worker=1") as info:
            DaskInfluenceCalculator(p["infl"], TorchNumpyConverter(), client)
        assert address in str(info.value) and "2 threads" in str(info.value)
        # a model that declares itself thread-safe is accepted on the same client
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            DaskInfluenceCalculator(SpyModel(p["infl"], thread_safe=True), TorchNumpyConverter(), client)

    with Client(
        processes=False, n_workers=1, threads_per_worker=1, dashboard_address="127.0.0.1:0"
    ) as client:
        calc = DaskInfluenceCalculator(p["infl"], TorchNumpyConverter(), client)
        xt, yt = _dask(p["x_te"], 4), _dask(p["y_te"], 4)
        np.testing.assert_allclose(
            calc.influences(xt, yt).compute(), p["sym_up"].numpy(), rtol=1e-9, atol=1e-11
        )
    assert client.status == "closed"
    with pytest.raises(ValueError, match="client is closed"):
        calc.influences(xt, yt)
    with pytest.raises(ValueError, match="client is closed"):
        DaskInfluenceCalculator(p["infl"], TorchNumpyConverter(), client)


def test_moving_the_model_between_workers_sends_the_snapshot_not_the_live_object(problem):
    """A worker ships the unpickled model to another by pickling it, possibly while a task in another
    thread is inside a forward pass. The copy must not carry that pass's state (here: a forward hook,
    as the gradient engine registers): it is rebuilt from the snapshot's bytes."""
    from infscale.parallel import _graph_object

    p = problem
    state = _graph_object((p["infl"], TorchNumpyConverter()), "model").compute(scheduler="synchronous")
    live, _ = state
    records: dict[int, list] = {}
    handle = live.model[0].register_forward_hook(lambda module, inputs, output: records[id(module)].append(1))
    try:
        copy, _ = cloudpickle.loads(cloudpickle.dumps(state))  # a worker sends it while the hook is on
    finally:
        handle.remove()
    assert copy is not live and not copy.model[0]._forward_hooks
    x, y = p["x_te"][:3], p["y_te"][:3]
    torch.testing.assert_close(copy.self_influences(x, y), live.self_influences(x, y), rtol=0, atol=0)


def test_a_lazy_result_computed_after_its_client_closed_says_so(problem):
    """After its client closed, Dask computes a lazy result with its threaded scheduler: the
    thread-safety check runs again when the graph is computed and names what happened, instead
    of running a model that is not thread-safe in several threads at once."""
    p = problem
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        calc = DaskInfluenceCalculator(p["infl"], TorchNumpyConverter(), client)
        safe = DaskInfluenceCalculator(SpyModel(p["infl"], thread_safe=True), TorchNumpyConverter(), client)
        xt, yt = _dask(p["x_te"], 2), _dask(p["y_te"], 2)
        lazy, lazy_self = calc.influences(xt, yt), calc.self_influences(xt, yt)
        lazy_safe = safe.influences(xt, yt)
    with dask.config.set(num_workers=2):  # Dask's fallback: its threaded scheduler, two threads
        for result in (lazy, lazy_self):
            with pytest.raises(ThreadSafetyViolationError) as info:
                result.compute()
            message = str(info.value)
            assert "Dask's local threaded scheduler with 2 threads" in message and "was closed" in message
            assert "scheduler='synchronous'" in message
        np.testing.assert_allclose(lazy_safe.compute(), p["sym_up"].numpy(), rtol=1e-9, atol=1e-11)
    # one thread is fine: the synchronous scheduler, or a threaded one with a single thread
    for options in ({"scheduler": "synchronous"}, {"scheduler": "threads", "num_workers": 1}):
        np.testing.assert_allclose(lazy.compute(**options), p["sym_up"].numpy(), rtol=1e-9, atol=1e-11)

    # computed on another cluster whose worker runs two threads: named too, on the worker
    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as other:
        address = next(iter(other.nthreads()))
        with pytest.raises(ThreadSafetyViolationError, match=f"computed by the Dask worker at {address}"):
            lazy.compute()
