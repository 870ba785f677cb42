"""DaskInfluenceCalculator on real clusters: a LocalCluster of worker processes
(2 workers x 1 thread), a scheduler and a worker started with the `dask` command
and reached by address, and worker processes killed with SIGKILL mid-computation.

Results are compared with the in-memory model (float32, rtol 1e-5). Schedulers,
workers and their HTTP servers bind to 127.0.0.1, on free ports.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import dask
import numpy as np
import pytest
import torch
import zarr
from distributed import Client, LocalCluster
from distributed.utils import get_mp_context
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from infscale import DaskInfluenceCalculator
from infscale.torch import DirectInfluence
from infscale.torch.util import TorchNumpyConverter, torch_dataset_to_dask_array

# SlowConverter below travels to the worker processes by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])

N_TRAIN, N_TEST, N_FEATURES = 30, 12, 5
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_TRAIN + N_TEST, N_FEATURES, generator=g)
    y = torch.randint(0, 3, (N_TRAIN + N_TEST,), generator=g)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(N_FEATURES, 6), nn.Tanh(), nn.Linear(6, 3))
    train, test = TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), TensorDataset(x[N_TRAIN:], y[N_TRAIN:])
    infl = DirectInfluence(
        model, nn.functional.cross_entropy, hessian_regularization=0.1, second_order_mode="gauss_newton"
    )
    infl.fit(DataLoader(train, batch_size=8))
    x_tr, y_tr = train.tensors
    x_te, y_te = test.tensors
    expected = {
        "up": infl.influences(x_te, y_te, x_tr, y_tr).numpy(),
        "perturbation": infl.influences(x_te, y_te, x_tr, y_tr, mode="perturbation").numpy(),
        "symmetric": infl.influences(x_te, y_te).numpy(),
        "self": infl.self_influences(x_tr, y_tr).numpy(),
    }
    return dict(infl=infl, train=train, test=test, expected=expected)


@pytest.fixture(scope="module")
def client():
    """2 worker processes x 1 thread. They fork from a multiprocessing forkserver that has
    imported torch and infscale once: otherwise every worker (and every replacement of a
    killed one) spends seconds of CPU importing them, which dominates these tests."""
    with (
        dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}),
        pytest.MonkeyPatch.context() as env,
    ):
        # one torch thread per worker: the forkserver imports torch before the nanny could set this
        env.setenv("OMP_NUM_THREADS", "1")
        env.setenv("MKL_NUM_THREADS", "1")
        context = get_mp_context()  # distributed sets its own preload list here; extend it
        context.set_forkserver_preload(["distributed", "numpy", "torch", "torch._dynamo", "infscale.torch"])
        with (
            LocalCluster(
                n_workers=2,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address="127.0.0.1:0",
            ) as cluster,
            Client(cluster) as client,
        ):
            yield client


def check_against_in_memory(client, problem, train_chunk: int, test_chunk: int) -> None:
    """Every query on this client, with chunk sizes that divide neither n, equals the in-memory one."""
    calc = DaskInfluenceCalculator(problem["infl"], TorchNumpyConverter(device=torch.device("cpu")), client)
    da_x, da_y = torch_dataset_to_dask_array(problem["train"], chunk_size=train_chunk)
    da_x_test, da_y_test = torch_dataset_to_dask_array(problem["test"], chunk_size=test_chunk)
    arrays = {
        "up": calc.influences(da_x_test, da_y_test, da_x, da_y),
        "perturbation": calc.influences(da_x_test, da_y_test, da_x, da_y, mode="perturbation"),
        "symmetric": calc.influences(da_x_test, da_y_test),
        "self": calc.self_influences(da_x, da_y),
    }
    assert arrays["up"].chunks[1][0] == train_chunk and arrays["up"].chunks[0][0] == test_chunk
    computed = dict(zip(arrays, dask.compute(*arrays.values())))  # on the client's cluster
    for name, value in computed.items():
        assert value.dtype == np.float32, name
        np.testing.assert_allclose(value, problem["expected"][name], rtol=RTOL, atol=ATOL, err_msg=name)


def test_local_cluster_of_processes_matches_in_memory_and_stores_to_zarr(client, problem, tmp_path):
    assert sorted(client.nthreads().values()) == [1, 1]
    assert set(client.run(torch.get_num_threads).values()) == {1}
    pids = set(client.run(os.getpid).values())
    assert len(pids) == 2 and os.getpid() not in pids  # two separate worker processes
    check_against_in_memory(client, problem, train_chunk=7, test_chunk=5)

    calc = DaskInfluenceCalculator(problem["infl"], TorchNumpyConverter(), client)
    da_x, da_y = torch_dataset_to_dask_array(problem["train"], chunk_size=8)
    da_x_test, da_y_test = torch_dataset_to_dask_array(problem["test"], chunk_size=5)
    path = str(tmp_path / "influences.zarr")
    calc.influences(da_x_test, da_y_test, da_x, da_y).to_zarr(path)  # each worker writes its chunks
    stored = zarr.open_array(path, mode="r")
    assert stored.chunks == (5, 8)
    np.testing.assert_allclose(stored[:], problem["expected"]["up"], rtol=RTOL, atol=ATOL)


class SlowConverter(TorchNumpyConverter):
    """Sleeps on every conversion, so that a computation lasts long enough to be interrupted."""

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay

    def from_numpy(self, x):
        time.sleep(self.delay)
        return super().from_numpy(x)


@pytest.mark.timeout(240)
def test_workers_killed_mid_computation_do_not_lose_the_result(client, problem):
    """SIGKILL every worker process while the result is half done: all intermediate
    results and every copy of the model are lost; the nannies start new workers and
    the scheduler rebuilds everything from the graph, with the same values."""
    calc = DaskInfluenceCalculator(problem["infl"], SlowConverter(delay=0.03), client)
    da_x, da_y = torch_dataset_to_dask_array(problem["train"], chunk_size=4)
    da_x_test, da_y_test = torch_dataset_to_dask_array(problem["test"], chunk_size=4)
    persisted = calc.influences(da_x_test, da_y_test, da_x, da_y).persist()  # 3 x 8 result chunks
    result_keys = {str(k) for k in dask.core.flatten(persisted.__dask_keys__())}
    pids = client.run(os.getpid)
    deadline = time.monotonic() + 120
    while True:
        held = {w: {str(k) for k in keys} & result_keys for w, keys in client.has_what().items()}
        done = set().union(*held.values())
        assert len(done) < len(result_keys), "the computation finished before the workers could be killed"
        if len(done) >= 3:
            break
        assert time.monotonic() < deadline, "no result chunk appeared within 120 s"
        time.sleep(0.02)
    for pid in pids.values():
        os.kill(pid, signal.SIGKILL)
    result = persisted.compute()
    np.testing.assert_allclose(result, problem["expected"]["up"], rtol=RTOL, atol=ATOL)
    client.wait_for_workers(2, timeout=120)
    assert not set(client.nthreads()) & set(pids)  # both workers were replaced


@pytest.mark.timeout(240)
def test_cluster_started_from_the_command_line(problem, tmp_path):
    """The path of a user with several machines: `dask scheduler`, `dask worker`, Client(ADDRESS).
    Scheduler and worker start together (the worker waits for the scheduler file); one worker:
    the two-worker case is the LocalCluster's above."""
    dask_command = str(Path(sys.executable).with_name("dask"))
    scheduler_file = tmp_path / "scheduler.json"
    log = open(tmp_path / "cluster.log", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(
            [dask_command, "scheduler", "--host", "127.0.0.1", "--port", "0",
             "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(scheduler_file)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        ),
        subprocess.Popen(
            [dask_command, "worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1",
             "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0", "--no-nanny", "--name", "worker-a"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        ),
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        address = None
        while address is None:
            assert processes[0].poll() is None, (tmp_path / "cluster.log").read_text()
            assert time.monotonic() < deadline, "the scheduler did not start in 120 s"
            try:
                address = json.loads(scheduler_file.read_text())["address"]
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                time.sleep(0.1)
        with Client(address, timeout=60) as client:
            client.wait_for_workers(1, timeout=120)
            assert sorted(client.nthreads().values()) == [1]
            check_against_in_memory(client, problem, train_chunk=9, test_chunk=7)
            # the model and the dataset reach the scheduler as bytes: it needs no torch
            assert not client.run_on_scheduler(lambda: "torch" in sys.modules)
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in reversed(processes):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()
