"""to_zarr: layout and attributes, URLs (file://, memory://, s3:// on a local moto server),
refusing to overwrite, resuming after SIGKILL, progress, and errors that leave stores intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import test_sequential
import torch
import zarr
from helpers import moto_s3
from test_sequential import LAM, CountingModel, counting_problem
from torch.utils.data import DataLoader, TensorDataset

import infscale
from infscale import SequentialInfluenceCalculator
from infscale.array import COMPLETE_PREFIX, StoreExistsError, StoreMismatchError, completed_blocks
from infscale.torch.util import TorchNumpyConverter

TESTS = Path(__file__).resolve().parent
N_BLOCKS = 3 * 8
# counting_problem: 12 test points in batches of 4, 40 train points in batches of 5


@pytest.fixture
def linear():
    """Fitted DirectInfluence, loaders and closed form; fitted once, shared with test_sequential.py."""
    return test_sequential.fitted_linear()


def counted_to_zarr(path, model=None, problem=None, **kwargs):
    xtr, xte, train, test = counting_problem(**(problem or {}))
    model = model or CountingModel()
    kwargs.setdefault("progress", False)
    stored = (
        SequentialInfluenceCalculator(model)
        .influences(test, train)
        .to_zarr(path, TorchNumpyConverter(), return_stored=True, **kwargs)
    )
    return model, stored, (xte @ model.a @ xtr.T).numpy()


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------- layout, attributes
def test_store_layout_values_and_attributes(linear, tmp_path):
    infl, train, test, truth = linear
    path = tmp_path / "infl.zarr"
    lazy = SequentialInfluenceCalculator(infl).influences(test, train)
    assert lazy.to_zarr(str(path), TorchNumpyConverter(), progress=False) is None
    array = zarr.open(str(path), mode="r")
    assert array.metadata.zarr_format == 3
    assert array.shape == (7, 23) and array.chunks == (3, 5) and array.dtype == np.float64
    np.testing.assert_allclose(array[:], truth["influences"], rtol=1e-9, atol=1e-12)
    attrs = dict(array.attrs)
    assert attrs["method"] == "DirectInfluence"
    assert attrs["hyperparameters"]["hessian_regularization"] == LAM
    assert attrs["mode"] == "up" and attrs["quantity"] == "influences"
    assert attrs["sign_convention"] == infscale.SIGN_CONVENTION
    assert attrs["infscale_version"] == infscale.__version__
    assert (attrs["n_test"], attrs["n_train"]) == (7, 23)
    assert (attrs["test_block_size"], attrs["train_block_size"]) == (3, 5)
    assert len(completed_blocks(array.store)) == 3 * 5


def test_perturbation_factors_and_self_influences_stores(linear, tmp_path):
    infl, train, test, truth = linear
    calc = SequentialInfluenceCalculator(infl)
    conv = TorchNumpyConverter()
    stored = calc.influences(test, train, mode="perturbation").to_zarr(
        tmp_path / "p.zarr", conv, return_stored=True, progress=False
    )
    assert stored.shape == (7, 23, 3) and stored.chunks == (3, 5, 3)
    assert stored.attrs["mode"] == "perturbation"
    np.testing.assert_allclose(stored[:], truth["perturbation"], rtol=1e-8, atol=1e-10)
    factors = calc.influence_factors(test).to_zarr(
        tmp_path / "f.zarr", conv, return_stored=True, progress=False
    )
    assert factors.shape == (7, 4) and factors.chunks == (3, 4)
    np.testing.assert_allclose(factors[:], truth["factors"], rtol=1e-9)
    diag = calc.self_influences(train).to_zarr(tmp_path / "s.zarr", conv, return_stored=True, progress=False)
    assert diag.shape == (23,) and diag.attrs["quantity"] == "self_influences"
    np.testing.assert_allclose(diag[:], truth["self"], rtol=1e-9)


def test_file_and_memory_urls(tmp_path):
    _, stored, expected = counted_to_zarr(f"file://{tmp_path}/a.zarr")
    np.testing.assert_allclose(np.asarray(zarr.open(str(tmp_path / "a.zarr"), mode="r")[:]), expected)
    url = f"memory://infscale-{uuid.uuid4().hex}/b.zarr"
    _, stored, expected = counted_to_zarr(url)
    np.testing.assert_allclose(np.asarray(zarr.open(url, mode="r")[:]), expected)


# ---------------------------------------------------------------------------- existing stores
def test_existing_store_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "s.zarr"
    counted_to_zarr(path)
    before = tree(path)
    model = CountingModel(seed=5)
    with pytest.raises(StoreExistsError, match=str(path)):
        counted_to_zarr(path, model=model)
    assert tree(path) == before
    assert model.calls["factors"] == 0
    model, stored, expected = counted_to_zarr(path, model=CountingModel(seed=5), overwrite=True)
    np.testing.assert_allclose(stored[:], expected)
    assert model.calls["blocks"] == N_BLOCKS


def test_overwrite_never_deletes_a_directory_that_is_not_a_zarr_store(tmp_path):
    folder = tmp_path / "my_documents"
    folder.mkdir()
    (folder / "thesis.txt").write_text("precious")
    with pytest.raises(StoreExistsError, match="not a zarr store"):
        counted_to_zarr(folder, overwrite=True)
    assert (folder / "thesis.txt").read_text() == "precious"
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.txt"]


def test_resume_computes_only_unmarked_blocks(tmp_path):
    path = tmp_path / "r.zarr"
    _, stored, expected = counted_to_zarr(path)
    store = stored.store
    # simulate a crash: blocks (0, 1) and (2, 7) were being written, never marked
    for i, j in ((0, 1), (2, 7)):
        (path / COMPLETE_PREFIX / f"{i}.{j}").unlink()
        stored[i * 4 : (i + 1) * 4, j * 5 : (j + 1) * 5] = 1e9
    assert len(completed_blocks(store)) == N_BLOCKS - 2
    model, stored, expected = counted_to_zarr(path, resume=True)
    assert model.calls["blocks"] == 2
    assert model.calls["factors"] == 2  # rows 0 and 2 only
    np.testing.assert_allclose(stored[:], expected)
    model, _, _ = counted_to_zarr(path, resume=True)  # complete: nothing to do
    assert model.calls == {"factors": 0, "representation": 0, "blocks": 0}


def test_resume_against_another_computation_is_refused(linear, tmp_path):
    infl, train, test, _ = linear
    path = tmp_path / "m.zarr"
    SequentialInfluenceCalculator(infl).influences(test, train).to_zarr(
        path, TorchNumpyConverter(), progress=False
    )
    before = tree(path)
    x, y = train.dataset.tensors
    other_batch = DataLoader(TensorDataset(x, y), batch_size=4)
    with pytest.raises(StoreMismatchError, match=r"train_block_size: stored 5, requested 4"):
        SequentialInfluenceCalculator(infl).influences(test, other_batch).to_zarr(
            path, TorchNumpyConverter(), resume=True, progress=False
        )
    with pytest.raises(StoreMismatchError, match=r"shape: stored \[7, 23\], requested \[7, 20\]"):
        SequentialInfluenceCalculator(infl).influences(
            test, DataLoader(TensorDataset(x[:20], y[:20]), batch_size=5)
        ).to_zarr(path, TorchNumpyConverter(), resume=True, progress=False)
    with pytest.raises(
        StoreMismatchError, match="method: stored 'DirectInfluence', requested 'CountingModel'"
    ):
        SequentialInfluenceCalculator(CountingModel()).influences(test, train).to_zarr(
            path, TorchNumpyConverter(), resume=True, progress=False
        )
    with pytest.raises(StoreMismatchError, match="mode"):
        SequentialInfluenceCalculator(infl).influences(test, train, mode="perturbation").to_zarr(
            path, TorchNumpyConverter(), resume=True, progress=False
        )
    assert tree(path) == before


def test_unwritable_path_and_bad_arguments(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    model = CountingModel()
    with pytest.raises(OSError, match="a_file"):
        counted_to_zarr(blocker / "s.zarr", model=model)
    with pytest.raises(NotADirectoryError, match="a_file"):
        counted_to_zarr(blocker, model=model)
    assert blocker.read_text() == "not a directory"
    assert model.calls["blocks"] == 0
    with pytest.raises(ValueError, match="exclude each other"):
        counted_to_zarr(tmp_path / "x.zarr", overwrite=True, resume=True)
    with pytest.raises(TypeError, match="converter"):
        _no_converter(tmp_path)
    assert not (tmp_path / "x.zarr").exists()


def _no_converter(tmp_path):
    xtr, xte, train, test = counting_problem()
    SequentialInfluenceCalculator(CountingModel()).influences(test, train).to_zarr(tmp_path / "x.zarr", None)


def test_uneven_batches_are_refused_before_writing(tmp_path):
    xtr, xte, train, test = counting_problem()
    uneven = [(xtr[:5], xtr[:5, 0]), (xtr[5:7], xtr[5:7, 0]), (xtr[7:12], xtr[7:12, 0])]
    with pytest.raises(ValueError, match=r"batches of one size.*\[5, 2, 5\]"):
        SequentialInfluenceCalculator(CountingModel()).influences(test, uneven).to_zarr(
            tmp_path / "u.zarr", TorchNumpyConverter(), progress=False
        )
    assert not (tmp_path / "u.zarr").exists()


def test_progress_bar_on_by_default_and_switchable(tmp_path, capsys):
    counted_to_zarr(tmp_path / "a.zarr", progress=True)
    err = capsys.readouterr().err
    assert f"{N_BLOCKS}/{N_BLOCKS}" in err and "block/s" in err
    counted_to_zarr(tmp_path / "b.zarr", progress=False)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------- crash and resume
CHILD = """
import sys
sys.path.insert(0, {tests!r})
from test_sequential import CountingModel, counting_problem
from infscale import SequentialInfluenceCalculator
from infscale.torch.util import TorchNumpyConverter

xtr, xte, train, test = counting_problem()
model = CountingModel(block_sleep=0.2)
lazy = SequentialInfluenceCalculator(model).influences(test, train)
lazy.to_zarr({path!r}, TorchNumpyConverter(), progress=False)
print("finished")
"""


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    path = tmp_path / "crash.zarr"
    script = textwrap.dedent(CHILD).format(tests=str(TESTS), path=str(path))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    markers = path / COMPLETE_PREFIX
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and child.poll() is None:
            if markers.exists() and len(list(markers.iterdir())) >= 5:
                break
            time.sleep(0.05)
        assert child.poll() is None, child.communicate()
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    done_at_kill = len(completed_blocks(zarr.open(str(path), mode="r").store))
    assert 5 <= done_at_kill < N_BLOCKS

    model, stored, expected = counted_to_zarr(path, resume=True)
    assert model.calls["blocks"] == N_BLOCKS - done_at_kill
    _, reference, _ = counted_to_zarr(tmp_path / "uninterrupted.zarr")
    np.testing.assert_array_equal(stored[:], reference[:])
    np.testing.assert_allclose(stored[:], expected)


# ---------------------------------------------------------------------------- S3 (moto)
@pytest.fixture(scope="module")
def s3_server():
    with moto_s3("infscale-test") as options:
        yield options


def test_s3_store_on_local_moto_server(s3_server):
    url = "s3://infscale-test/influences.zarr"
    small = {"bt": 6, "br": 20}  # 2 × 2 blocks: moto answers each request slowly
    _, stored, expected = counted_to_zarr(url, problem=small, storage_options=s3_server)
    array = zarr.open(url, mode="r", storage_options=s3_server)
    assert array.shape == (12, 40) and array.chunks == (6, 20)
    np.testing.assert_allclose(array[:], expected)
    assert array.attrs["method"] == "CountingModel"
    with pytest.raises(StoreExistsError, match="s3://infscale-test/influences.zarr"):
        counted_to_zarr(url, problem=small, storage_options=s3_server)
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    fs.rm(f"infscale-test/influences.zarr/{COMPLETE_PREFIX}1.0")
    model, stored, expected = counted_to_zarr(url, problem=small, resume=True, storage_options=s3_server)
    assert model.calls["blocks"] == 1
    np.testing.assert_allclose(stored[:], expected)


def test_counting_model_matches_its_formula():
    # the instrumented model itself: blocks are (x_test A) x_trainᵀ
    xtr, xte, train, test = counting_problem()
    model = CountingModel()
    block = model.influences_from_representation(model.influence_factors(xte, None), xtr)
    np.testing.assert_allclose(block.numpy(), (xte.numpy() @ model.a.numpy()) @ xtr.numpy().T)
    assert torch.equal(model.train_representation(xtr, None), xtr)


# ---------------------------------------------------------------------------- store objects
@pytest.mark.parametrize("kind", ["MemoryStore", "LocalStore", "fsspec mapper", "dict"])
def test_to_zarr_takes_zarr_store_objects_and_mappers(tmp_path, kind):
    import fsspec

    target = {
        "MemoryStore": lambda: zarr.storage.MemoryStore(),
        "LocalStore": lambda: zarr.storage.LocalStore(tmp_path / "local.zarr"),
        "fsspec mapper": lambda: fsspec.get_mapper(f"memory://infscale-{uuid.uuid4().hex}"),
        "dict": lambda: {},
    }[kind]()
    model, stored, truth = counted_to_zarr(target)
    np.testing.assert_allclose(stored[:], truth, rtol=1e-12)
    # the same overwrite / resume semantics as with paths
    with pytest.raises(StoreExistsError):
        counted_to_zarr(target)
    resumed, again, _ = counted_to_zarr(target, resume=True)
    assert resumed.calls["blocks"] == 0
    np.testing.assert_allclose(again[:], truth, rtol=1e-12)
    _, replaced, truth2 = counted_to_zarr(target, model=CountingModel(seed=4), overwrite=True)
    np.testing.assert_allclose(replaced[:], truth2, rtol=1e-12)


def test_to_zarr_rejects_other_targets_by_name():
    with pytest.raises(TypeError, match="zarr Store, an fsspec mapper or a dict; got 3"):
        counted_to_zarr(3)
