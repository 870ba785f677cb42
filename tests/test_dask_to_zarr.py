"""infscale.parallel.dask_to_zarr: Dask results written block by block with completion markers,
resumable under any scheduler (the function ``infscale run`` uses on Dask).

Ground truth: the closed form of linear regression (conftest's ``linreg``) for the values, and,
for a run killed with SIGKILL after a chosen block and resumed, the same run uninterrupted
(bit-identical) and DirectInfluence in memory.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import warnings

import dask.array as da
import numpy as np
import pytest
import torch
import zarr
from distributed import Client

from infscale import SequentialInfluenceCalculator
from infscale.errors import StoreExistsError, StoreMismatchError
from infscale.parallel import DaskInfluenceCalculator, DisableClientSingleThreadCheck, dask_to_zarr
from infscale.torch import DirectInfluence
from infscale.torch.util import TorchNumpyConverter

LAM = 0.1


def _markers(path) -> set[str]:
    folder = os.path.join(str(path), "_infscale_complete")
    return set(os.listdir(folder)) if os.path.isdir(folder) else set()


@pytest.fixture
def fitted(linreg, ground_truth):
    p = linreg
    infl = DirectInfluence(p.model, p.loss, hessian_regularization=LAM).fit(p.loader(4))
    closed = ground_truth.linreg(p, LAM)
    g_train = closed.gradients(p.x, p.y)
    truth = {
        "influences": (closed.factors @ g_train.T).numpy(),
        "perturbation": closed.perturbation(closed.factors, p.x, p.y).numpy(),
        "self_influences": torch.einsum(
            "ip,ip->i", g_train, torch.linalg.solve(closed.solve, g_train.T).T
        ).numpy(),
    }
    return p, infl, truth


def _sync_calc(infl):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the thread-safety check is off: one thread here
        return DaskInfluenceCalculator(infl, TorchNumpyConverter(), DisableClientSingleThreadCheck)


def _da(t: torch.Tensor, rows: int) -> da.Array:
    return da.from_array(t.numpy(), chunks=(rows,) + tuple(t.shape[1:]))


def test_influences_self_influences_and_perturbation_without_a_client(fitted, tmp_path):
    """No client: blocks computed in this process; markers "i.j" for matrices, "i" for rows."""
    p, infl, truth = fitted
    calc = _sync_calc(infl)
    x, y, xt, yt = _da(p.x, 5), _da(p.y, 5), _da(p.x_test, 2), _da(p.y_test, 2)
    cases = {
        "influences": (calc.influences(xt, yt, x, y), calc.result_attributes("influences", "up")),
        "perturbation": (
            calc.influences(xt, yt, x, y, mode="perturbation"),
            calc.result_attributes("influences", "perturbation"),
        ),
        "self_influences": (calc.self_influences(x, y), calc.result_attributes("self_influences", "up")),
    }
    grids = {"influences": (3, 3), "perturbation": (3, 3), "self_influences": (3,)}
    for name, (array, attributes) in cases.items():
        path = tmp_path / f"{name}.zarr"
        stored = dask_to_zarr(array, str(path), attributes=attributes, progress=False, return_stored=True)
        np.testing.assert_allclose(stored[:], truth[name], rtol=1e-9, atol=1e-12)
        keys = {".".join(map(str, k)) for k in np.ndindex(*grids[name])}
        assert _markers(path) == keys, name
        assert (
            stored.attrs["quantity"] == attributes["quantity"] and stored.attrs["method"] == "DirectInfluence"
        )


def test_resumes_a_sequential_store_and_is_resumed_by_one(fitted, tmp_path):
    """With the sequential calculator's attributes (result_attributes) each resumes the other's store;
    attributes of another computation are refused."""
    p, infl, truth = fitted
    dask_result = _sync_calc(infl).influences(_da(p.x_test, 2), _da(p.y_test, 2), _da(p.x, 4), _da(p.y, 4))
    attributes = _sync_calc(infl).result_attributes("influences", "up")
    sequential = SequentialInfluenceCalculator(infl).influences(
        [(p.x_test[i : i + 2], p.y_test[i : i + 2]) for i in range(0, 5, 2)], p.loader(4)
    )
    for first, second in (("sequential", "dask"), ("dask", "sequential")):
        path = tmp_path / f"{first}.zarr"
        if first == "sequential":
            sequential.to_zarr(str(path), TorchNumpyConverter(), progress=False)
        else:
            dask_to_zarr(dask_result, str(path), attributes=attributes, progress=False)
        stored = zarr.open_array(str(path), mode="r+")
        for key in ("0.1", "2.2"):  # forget two blocks and wipe them: the resume must recompute them
            os.remove(path / "_infscale_complete" / key)
            i, j = map(int, key.split("."))
            stored[2 * i : 2 * i + 2, 4 * j : 4 * j + 4] = 0.0
        if second == "dask":
            with pytest.raises(StoreMismatchError, match="method: stored 'DirectInfluence', requested 'Cg"):
                other = {**attributes, "method": "CgInfluence"}
                dask_to_zarr(dask_result, str(path), attributes=other, resume=True, progress=False)
            dask_to_zarr(dask_result, str(path), attributes=attributes, resume=True, progress=False)
        else:
            sequential.to_zarr(str(path), TorchNumpyConverter(), resume=True, progress=False)
        assert len(_markers(path)) == 9
        np.testing.assert_allclose(zarr.open_array(str(path), mode="r")[:], truth["influences"], rtol=1e-9)


def test_on_a_client(fitted, tmp_path):
    p, infl, truth = fitted
    with Client(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as client:
        calc = DaskInfluenceCalculator(infl, TorchNumpyConverter(), client)
        result = calc.influences(_da(p.x_test, 2), _da(p.y_test, 2), _da(p.x, 5), _da(p.y, 5))
        dask_to_zarr(result, str(tmp_path / "a.zarr"), client=client, progress=False)
        dask_to_zarr(result, str(tmp_path / "b.zarr"), progress=False)  # the current client by default
    for name in ("a.zarr", "b.zarr"):
        np.testing.assert_allclose(zarr.open_array(str(tmp_path / name))[:], truth["influences"], rtol=1e-9)
        assert len(_markers(tmp_path / name)) == 9
    with pytest.raises(ValueError, match="the client is closed"):
        dask_to_zarr(result, str(tmp_path / "c.zarr"), client=client)


def test_errors(fitted, tmp_path):
    p, infl, _ = fitted
    result = _sync_calc(infl).influences(_da(p.x_test, 2), _da(p.y_test, 2), _da(p.x, 5), _da(p.y, 5))
    path = str(tmp_path / "e.zarr")
    with pytest.raises(TypeError, match="array must be a dask.array.Array; got ndarray"):
        dask_to_zarr(np.zeros((2, 2)), path)
    with pytest.raises(TypeError, match="client must be a distributed.Client"):
        dask_to_zarr(result, path, client="tcp://somewhere")
    with pytest.raises(ValueError, match=r"only the first 1 axes may have several chunks"):
        dask_to_zarr(da.zeros((4, 6), chunks=(2, 3)), path, block_axes=1)
    with pytest.raises(ValueError, match="block_axes must be 1 or 2"):
        dask_to_zarr(da.zeros((4,), chunks=2), path, block_axes=2)
    with pytest.raises(ValueError, match="unknown chunk sizes"):
        x = da.from_array(np.arange(6.0), chunks=2)
        dask_to_zarr(x[x > 2], path)
    with pytest.raises(ValueError, match="needs batches of one size"):
        dask_to_zarr(da.zeros((7,), chunks=((2, 3, 2),)), path)
    with pytest.raises(ValueError, match="exclude each other"):
        dask_to_zarr(result, path, overwrite=True, resume=True)
    dask_to_zarr(result, path, progress=False)
    with pytest.raises(StoreExistsError, match="already holds results"):
        dask_to_zarr(result, path, progress=False)


# ------------------------------------------------------------------ killed with SIGKILL, resumed
CHILD = textwrap.dedent(
    """
    import os
    import signal
    import sys

    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    N_TRAIN, N_TEST, TRAIN_CHUNK, TEST_CHUNK = 23, 11, 5, 4  # a 3 × 5 grid of blocks


    def problem():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(N_TRAIN + N_TEST, 4, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (N_TRAIN + N_TEST,), generator=g)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        return model, TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), TensorDataset(x[N_TRAIN:], y[N_TRAIN:])


    def fitted():
        from infscale.torch import DirectInfluence

        model, train, test = problem()
        infl = DirectInfluence(model, nn.functional.cross_entropy, hessian_regularization=1.0)
        return infl.fit(DataLoader(train, batch_size=TRAIN_CHUNK)), train, test


    def write(out, resume):
        from distributed import Client

        from infscale.parallel import DaskInfluenceCalculator, dask_to_zarr
        from infscale.torch.util import TorchNumpyConverter, torch_dataset_to_dask_array

        infl, train, test = fitted()
        # one in-process worker: in-process workers would share one model object between threads
        with Client(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as client:
            calc = DaskInfluenceCalculator(infl, TorchNumpyConverter(), client)
            x, y = torch_dataset_to_dask_array(train, chunk_size=TRAIN_CHUNK, resulting_dtype=calc.dtype)
            dtype = calc.dtype
            x_test, y_test = torch_dataset_to_dask_array(test, chunk_size=TEST_CHUNK, resulting_dtype=dtype)
            result = calc.influences(x_test, y_test, x, y)
            attributes = calc.result_attributes("influences", "up")
            dask_to_zarr(result, out, client=client, resume=resume, progress=False, attributes=attributes)


    if __name__ == "__main__":
        from zarr.storage import LocalStore

        from infscale.store import COMPLETE_PREFIX

        torch.set_num_threads(1)
        out, kill_after = sys.argv[1], int(sys.argv[2])
        markers = []
        store_set = LocalStore.set

        async def set_then_die(self, key, value, *args, **kwargs):
            # the hook: die right after the kill_after-th completion marker is stored
            await store_set(self, key, value, *args, **kwargs)
            if key.startswith(COMPLETE_PREFIX):
                markers.append(key)
                if len(markers) == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)

        LocalStore.set = set_then_die
        write(out, resume=False)
    """
)


def test_killed_with_sigkill_then_resumed_equals_an_uninterrupted_run(tmp_path):
    """A writer killed right after its sixth marker (a new process), resumed here: only the nine
    missing blocks are written, and the store is bit-identical to an uninterrupted run's."""
    script = tmp_path / "dask_child.py"
    script.write_text(CHILD)
    killed, whole = tmp_path / "killed.zarr", tmp_path / "whole.zarr"
    run = subprocess.run(
        [sys.executable, str(script), str(killed), "6"], capture_output=True, text=True, timeout=300,
        cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert len(_markers(killed)) == 6  # the kill point is exact: six blocks stored and marked
    marker_dir = killed / "_infscale_complete"
    first = {name: (marker_dir / name).stat().st_mtime_ns for name in _markers(killed)}

    spec = importlib.util.spec_from_file_location("dask_child", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write(str(killed), resume=True)
    module.write(str(whole), resume=False)
    assert _markers(killed) == _markers(whole) and len(_markers(whole)) == 15
    assert {name: (marker_dir / name).stat().st_mtime_ns for name in first} == first  # not rewritten
    files = {
        name: {str(p.relative_to(name)): p.read_bytes() for p in name.rglob("*") if p.is_file()}
        for name in (killed, whole)
    }
    assert files[killed] == files[whole]  # bit-identical, markers and metadata included

    # and both equal DirectInfluence in memory, computed here independently of Dask and zarr
    infl, train, test = module.fitted()
    in_memory = infl.influences(*test.tensors, *train.tensors).numpy()
    np.testing.assert_allclose(zarr.open_array(str(killed), mode="r")[:], in_memory, rtol=1e-10, atol=1e-12)
