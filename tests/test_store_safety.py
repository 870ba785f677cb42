"""The store's guarantees (issue: nothing lost, nothing wrong in silence).

- overwrite only ever removes a store infscale wrote, and only once the new run has a block;
- a leftover store without finished blocks is reused;
- unwritten values read as NaN, a block holding NaN/inf is never written;
- a block counts as done only when its marker and chunk exist; resume re-checks checksums and
  recomputes deleted, truncated or altered chunks;
- resume refuses other input data or another model (fingerprint), naming what changed.

Ground truth: the counting model's closed form (x_test A)(x_train)ᵀ.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from test_sequential import CountingModel, counting_problem
from test_zarr_store import N_BLOCKS, counted_to_zarr, tree
from torch.utils.data import DataLoader, TensorDataset

from infscale import SequentialInfluenceCalculator
from infscale.errors import NonFiniteError, StoreExistsError, StoreMismatchError, UserFixableError
from infscale.store import COMPLETE_PREFIX, completed_blocks, open_zarr_store, verify_blocks
from infscale.torch.util import TorchNumpyConverter


class FailingModel(CountingModel):
    """Raises on its first block (a fit or data problem the user hits after asking to overwrite)."""

    def influences_from_representation(self, factors, representation, mode="up"):
        raise RuntimeError("the new model is broken")


class NaNModel(CountingModel):
    def influences_from_representation(self, factors, representation, mode="up"):
        block = super().influences_from_representation(factors, representation, mode)
        if self.calls["blocks"] == 3:
            block = block.clone()
            block[1, 2] = float("nan")
        return block


class FingerprintedModel(CountingModel):
    def fingerprint(self):
        return f"a={float(self.a.sum()):.12g}"


def markers(path) -> set[str]:
    return {p.name for p in (path / COMPLETE_PREFIX.rstrip("/")).iterdir()} if (
        path / COMPLETE_PREFIX.rstrip("/")
    ).exists() else set()


def chunk_file(path, i, j):
    return path / "c" / str(i) / str(j)


# ---------------------------------------------------------------------------- overwrite
def test_overwrite_refuses_a_folder_of_user_files(tmp_path):
    folder = tmp_path / "results"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes")
    (folder / "sub" / "data.csv").write_text("a,b\n1,2\n")
    before = tree(folder)
    with pytest.raises(StoreExistsError, match="infscale did not write|not a zarr store"):
        counted_to_zarr(folder, overwrite=True)
    assert tree(folder) == before


def test_overwrite_refuses_a_zarr_array_infscale_did_not_write(tmp_path):
    path = tmp_path / "theirs.zarr"
    theirs = zarr.create_array(store=str(path), shape=(4,), chunks=(2,), dtype="f8")
    theirs[:] = np.arange(4.0)
    before = tree(path)
    with pytest.raises(StoreExistsError, match="infscale did not write"):
        counted_to_zarr(path, overwrite=True)
    assert tree(path) == before


def test_overwrite_refuses_an_infscale_store_with_a_user_file_inside(tmp_path):
    path = tmp_path / "s.zarr"
    counted_to_zarr(path)
    (path / "README.txt").write_text("what these numbers are")
    before = tree(path)
    with pytest.raises(StoreExistsError, match="README.txt"):
        counted_to_zarr(path, overwrite=True)
    assert tree(path) == before


def test_failed_overwrite_keeps_the_old_results(tmp_path):
    path = tmp_path / "s.zarr"
    _, _, truth = counted_to_zarr(path)
    before = tree(path)
    with pytest.raises(RuntimeError, match="broken"):
        counted_to_zarr(path, model=FailingModel(), overwrite=True)
    assert tree(path) == before
    np.testing.assert_allclose(zarr.open_array(str(path), mode="r")[:], truth, rtol=1e-12)


def test_successful_overwrite_replaces_the_results(tmp_path):
    path = tmp_path / "s.zarr"
    counted_to_zarr(path, model=CountingModel(seed=0))
    _, stored, truth = counted_to_zarr(path, model=CountingModel(seed=5), overwrite=True)
    np.testing.assert_allclose(stored[:], truth, rtol=1e-12)
    assert len(completed_blocks(open_zarr_store(str(path)))) == N_BLOCKS


def test_a_failed_runs_empty_store_is_reused_without_overwrite(tmp_path):
    path = tmp_path / "s.zarr"
    with pytest.raises(RuntimeError, match="broken"):
        counted_to_zarr(path, model=FailingModel())
    assert (path / "zarr.json").exists() and not markers(path)
    _, stored, truth = counted_to_zarr(path)  # no overwrite needed
    np.testing.assert_allclose(stored[:], truth, rtol=1e-12)


# ---------------------------------------------------------------------------- NaN
def test_unwritten_blocks_read_as_nan_and_nan_blocks_are_never_written(tmp_path):
    path = tmp_path / "s.zarr"
    with pytest.raises(NonFiniteError, match=r"block \(0, 2\) holds 1 NaN") as info:
        counted_to_zarr(path, model=NaNModel())
    assert isinstance(info.value, UserFixableError)
    array = zarr.open_array(str(path), mode="r")
    assert markers(path) == {"0.0", "0.1"}  # the blocks before the bad one
    assert np.isnan(array[0:4, 10:]).all()  # the bad block and everything after: NaN, not 0
    assert np.isfinite(array[0:4, 0:10]).all()


# ---------------------------------------------------------------------------- damaged stores
def test_a_deleted_chunk_is_not_counted_and_resume_recomputes_it(tmp_path):
    path = tmp_path / "s.zarr"
    _, _, truth = counted_to_zarr(path)
    chunk_file(path, 1, 3).unlink()
    store = open_zarr_store(str(path))
    assert len(completed_blocks(store)) == N_BLOCKS - 1 and "1.3" not in completed_blocks(store)
    model, stored, _ = counted_to_zarr(path, resume=True, verify=False)
    assert model.calls["blocks"] == 1
    np.testing.assert_allclose(stored[:], truth, rtol=1e-12)


@pytest.mark.parametrize("damage", ["truncate", "alter"])
def test_resume_verifies_checksums_and_repairs_damaged_chunks(tmp_path, damage):
    path = tmp_path / "s.zarr"
    _, _, truth = counted_to_zarr(path)
    target = chunk_file(path, 2, 5)
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:7])
    else:  # a valid chunk with other values: only the checksum can tell
        other = tmp_path / "other.zarr"
        counted_to_zarr(other, model=CountingModel(seed=9))
        target.write_bytes(chunk_file(other, 2, 5).read_bytes())
    array = zarr.open_array(str(path), mode="r")
    report = verify_blocks(array, open_zarr_store(str(path)))
    assert set(report.damaged) == {"2.5"} and len(report.good) == N_BLOCKS - 1
    model, stored, _ = counted_to_zarr(path, resume=True)
    assert model.calls["blocks"] == 1
    np.testing.assert_allclose(stored[:], truth, rtol=1e-12)


def test_partial_marker_leftovers_do_not_count(tmp_path):
    path = tmp_path / "s.zarr"
    counted_to_zarr(path)
    folder = path / COMPLETE_PREFIX.rstrip("/")
    (folder / "0.1").unlink()
    (folder / "0.9f1c2d3e4b5a69788796a5b4c3d2e1f0.partial").write_bytes(b"")
    assert "0.1" not in completed_blocks(open_zarr_store(str(path)))
    assert len(completed_blocks(open_zarr_store(str(path)))) == N_BLOCKS - 1


# ---------------------------------------------------------------------------- fingerprints
def _problem_with(xtr, xte):
    train = DataLoader(TensorDataset(xtr, torch.zeros(len(xtr))), batch_size=5)
    test = DataLoader(TensorDataset(xte, torch.zeros(len(xte))), batch_size=4)
    return train, test


def _interrupted_store(path, model, train, test, stop_after=7):
    lazy = SequentialInfluenceCalculator(model).influences(test, train)
    source = lazy.source
    original = source.iter_blocks

    def cut(*args, **kwargs):
        for k, item in enumerate(original(*args, **kwargs)):
            if k == stop_after:
                raise KeyboardInterrupt
            yield item

    source.iter_blocks = cut
    with pytest.raises(KeyboardInterrupt):
        lazy.to_zarr(str(path), TorchNumpyConverter(), progress=False)
    source.iter_blocks = original


@pytest.mark.parametrize("side", ["train", "test"])
def test_resume_with_changed_data_of_the_same_shape_is_refused(tmp_path, side):
    xtr, xte, train, test = counting_problem()
    path = tmp_path / "s.zarr"
    _interrupted_store(path, CountingModel(), train, test)
    before = tree(path)
    xtr2, xte2 = xtr.clone(), xte.clone()
    if side == "train":
        xtr2[1, 0] += 1.0  # batch 0 of the training data, read again on resume
    else:
        xte2[1, 0] += 1.0  # batch 0 of the test data
    train2, test2 = _problem_with(xtr2, xte2)
    lazy = SequentialInfluenceCalculator(CountingModel()).influences(test2, train2)
    what = r"training \(column\)" if side == "train" else r"test \(row\)"
    with pytest.raises(StoreMismatchError, match=rf"the {what} data of batch 0 differ"):
        lazy.to_zarr(str(path), TorchNumpyConverter(), resume=True, progress=False)
    assert tree(path) == before


def test_resume_with_the_same_data_finishes_and_equals_the_closed_form(tmp_path):
    xtr, xte, train, test = counting_problem()
    path = tmp_path / "s.zarr"
    model = CountingModel()
    _interrupted_store(path, model, train, test)
    lazy = SequentialInfluenceCalculator(model).influences(test, train)
    stored = lazy.to_zarr(str(path), TorchNumpyConverter(), resume=True, progress=False, return_stored=True)
    np.testing.assert_allclose(stored[:], (xte @ model.a @ xtr.T).numpy(), rtol=1e-12)


def test_resume_with_a_retrained_model_is_refused(tmp_path):
    xtr, xte, train, test = counting_problem()
    path = tmp_path / "s.zarr"
    _interrupted_store(path, FingerprintedModel(seed=0), train, test)
    lazy = SequentialInfluenceCalculator(FingerprintedModel(seed=3)).influences(test, train)
    with pytest.raises(StoreMismatchError, match="model's parameters or buffers changed"):
        lazy.to_zarr(str(path), TorchNumpyConverter(), resume=True, progress=False)
