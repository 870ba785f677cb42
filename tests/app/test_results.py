"""infscale.app.results: the results group (create, resume, overwrite), reading it back,
completeness from the block markers, and the top-k against a sort of the matrix."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr

from infscale._version import __version__
from infscale.app.results import (
    INFLUENCES,
    SELF_INFLUENCES,
    TOP_ARRAYS,
    array_url,
    completeness,
    missing_row_blocks,
    open_results,
    prepare_group,
    write_top_k,
)
from infscale.errors import StoreExistsError, StoreMismatchError, UsageError
from infscale.sequences import NestedLazyChunkSequence

CONFIG = {
    "method": "DirectInfluence",
    "params": {"hessian_regularization": 0.1},
    "batch_size": 4,
    "scheduler": "sync",
}


class _Identity:
    @staticmethod
    def to_numpy(block):
        return np.asarray(block)


def _matrix(n_test=7, n_train=10, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n_test, n_train))


def _write(url, matrix, bt=3, br=4):
    """The matrix into url/influences in blocks (bt, br), with markers (as the calculators write it)."""

    def rows():
        for r in range(0, matrix.shape[0], bt):
            yield (matrix[r : r + bt, c : c + br] for c in range(0, matrix.shape[1], br))

    NestedLazyChunkSequence(rows).to_zarr(array_url(url, INFLUENCES), _Identity(), progress=False)


def _files(path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes: a store is bit-identical when this is equal."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_prepare_group_creates_refuses_and_resumes(tmp_path):
    url = str(tmp_path / "out.zarr")
    target = prepare_group(url, overwrite=False, resume=False, attributes=CONFIG)
    assert dict(zarr.open_group(url, mode="r").attrs) == {**CONFIG, "infscale_version": __version__}
    assert target.url == url and not target.replace_pending
    _write(url, _matrix())

    with pytest.raises(StoreExistsError, match="already exists; pass --overwrite to replace it or --resume"):
        prepare_group(url, overwrite=False, resume=False, attributes=CONFIG)
    with pytest.raises(UsageError, match="--overwrite and --resume exclude each other"):
        prepare_group(url, overwrite=True, resume=True, attributes=CONFIG)

    # resume: keys other than RESUME_FREE must match; the free ones are updated
    target = prepare_group(url, overwrite=False, resume=True, attributes={**CONFIG, "scheduler": "local:2"})
    group = target.open()
    assert group.attrs["scheduler"] == "local:2" and INFLUENCES in group
    changed = {**CONFIG, "batch_size": 8, "params": {"hessian_regularization": 0.2}}
    with pytest.raises(StoreMismatchError) as info:
        prepare_group(url, overwrite=False, resume=True, attributes=changed)
    message = str(info.value)
    assert (
        "another configuration" in message
        and "batch_size: stored 4, now 8" in message
        and "params" in message
    )
    assert "scheduler" not in message


def test_overwrite_replaces_the_old_store_only_when_the_first_block_is_ready(tmp_path):
    """prepare_group(overwrite=True) touches nothing; before_first_write (called by the writer when
    the new run's first block is ready) replaces the old store by an empty group."""
    path = tmp_path / "out.zarr"
    prepare_group(str(path), overwrite=False, resume=False, attributes=CONFIG)
    _write(str(path), _matrix())
    write_top_k(str(path), 2, progress=False)
    before = _files(path)
    changed = {**CONFIG, "batch_size": 8}
    target = prepare_group(str(path), overwrite=True, resume=False, attributes=changed)
    assert target.replace_pending and _files(path) == before  # bit-identical until then
    target.before_first_write()
    group = zarr.open_group(str(path), mode="r")
    assert dict(group.attrs)["batch_size"] == 8 and list(group.keys()) == []
    assert not target.replace_pending
    target.before_first_write()  # once only: a second call changes nothing
    assert zarr.open_group(str(path), mode="r").attrs["batch_size"] == 8

    # a file added between the plan and the replacement: refused then, nothing deleted
    _write(str(path), _matrix())
    target = prepare_group(str(path), overwrite=True, resume=False, attributes=CONFIG)
    (path / "notes.txt").write_text("mine")
    before = _files(path)
    with pytest.raises(StoreExistsError, match=r"files infscale did not write \(notes.txt\)"):
        target.before_first_write()
    assert _files(path) == before


@pytest.mark.parametrize("flags", [(True, False), (False, False), (False, True)])
def test_prepare_group_never_deletes_what_infscale_did_not_write(tmp_path, flags):
    overwrite, resume = flags
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("notes")
    (folder / "sub" / "data.csv").write_text("a,b\n1,2\n")
    # ... an infscale store with a file of the user's added, and a zarr array another tool wrote
    added = tmp_path / "added.zarr"
    prepare_group(str(added), overwrite=False, resume=False, attributes=CONFIG)
    _write(str(added), _matrix())
    (added / INFLUENCES / "c" / "README").write_text("mine")
    other = tmp_path / "other.zarr"
    zarr.create_array(str(other), shape=(2,), chunks=(2,), dtype="f8")[:] = 1.0
    cases = {
        folder: "data that is not a zarr store written by infscale",
        added: f"files infscale did not write ({INFLUENCES}/c/README)",
        other: "a zarr store infscale did not write",
    }
    for path, what in cases.items():
        before = _files(path)
        with pytest.raises(StoreExistsError) as info:
            prepare_group(str(path), overwrite=overwrite, resume=resume, attributes=CONFIG)
        assert what in str(info.value) and "Choose another --out" in str(info.value)
        assert _files(path) == before
    with pytest.raises(UsageError, match="is a file, not a directory"):
        prepare_group(str(folder / "notes.txt"), overwrite=overwrite, resume=resume, attributes=CONFIG)


@pytest.mark.parametrize("resume", [False, True])
def test_a_leftover_without_finished_blocks_is_reused(tmp_path, resume):
    """A failed run's leftover is not the user's data: no --overwrite needed, and a resume may
    start over with another configuration."""
    url = str(tmp_path / "out.zarr")
    prepare_group(url, overwrite=False, resume=False, attributes={**CONFIG, "batch_size": 99})
    # an influence array created, no block finished, and a write cut short
    zarr.create_array(
        url + "/" + INFLUENCES, shape=(3, 3), chunks=(3, 3), dtype="f8", attributes={"infscale_version": "x"}
    )
    (tmp_path / "out.zarr" / INFLUENCES / "zarr.0123456789abcdef0123456789abcdef.partial").write_text("{")
    target = prepare_group(url, overwrite=False, resume=resume, attributes=CONFIG)
    assert dict(target.open().attrs)["batch_size"] == 4 and INFLUENCES not in target.open()
    # a folder holding nothing but a temporary file of a write cut short
    shutil.rmtree(tmp_path / "out.zarr")
    (tmp_path / "out.zarr").mkdir()
    (tmp_path / "out.zarr" / "zarr.0123456789abcdef0123456789abcdef.partial").write_text("{")
    prepare_group(url, overwrite=False, resume=resume, attributes=CONFIG)
    assert dict(zarr.open_group(url, mode="r").attrs)["batch_size"] == 4


def test_resume_on_an_empty_place_creates_the_group(tmp_path):
    target = prepare_group(str(tmp_path / "new.zarr"), overwrite=False, resume=True, attributes=CONFIG)
    assert dict(target.open().attrs) == {**CONFIG, "infscale_version": __version__}


def test_open_results(tmp_path):
    url = str(tmp_path / "out.zarr")
    with pytest.raises(UsageError, match="no zarr store at"):
        open_results(url)
    prepare_group(url, overwrite=False, resume=False, attributes=CONFIG)
    with pytest.raises(UsageError, match="is a zarr group without an 'influences' array"):
        open_results(url)
    matrix = _matrix()
    _write(url, matrix)
    group, array = open_results(url)
    assert group.attrs["method"] == "DirectInfluence"
    np.testing.assert_array_equal(array[:], matrix)
    # a bare array written by to_zarr at the root of its store
    bare, array = open_results(array_url(url, INFLUENCES))
    assert bare is None and array.shape == matrix.shape
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("hello")
    with pytest.raises(UsageError, match="is not a zarr store"):
        open_results(str(other))


def test_completeness_from_markers_and_missing_row_blocks(tmp_path):
    url = str(tmp_path / "out.zarr")
    prepare_group(url, overwrite=False, resume=False, attributes=CONFIG)
    _write(url, _matrix())  # 7 × 10 in blocks 3 × 4: a 3 × 3 grid
    _, array = open_results(url)
    done, total, keys = completeness(array)
    assert (done, total) == (9, 9) and keys == {f"{i}.{j}" for i in range(3) for j in range(3)}
    (tmp_path / "out.zarr" / INFLUENCES / "_infscale_complete" / "1.2").unlink()
    done, total, keys = completeness(array)
    assert (done, total) == (8, 9) and "1.2" not in keys
    assert [missing_row_blocks(array, row, keys) for row in (0, 2, 3, 5, 6)] == [[], [], [2], [2], []]
    assert missing_row_blocks(array, 3, None) == []


def test_arrays_written_by_others_count_as_complete(tmp_path):
    z = zarr.create_array(str(tmp_path / "plain.zarr"), shape=(5, 6), chunks=(2, 2), dtype="f8")
    assert completeness(z) == (9, 9, None)


def test_write_top_k_matches_a_sort_of_the_matrix(tmp_path):
    url = str(tmp_path / "out.zarr")
    prepare_group(url, overwrite=False, resume=False, attributes=CONFIG)
    matrix = _matrix()
    _write(url, matrix)
    write_top_k(url, 3, progress=False)
    group = zarr.open_group(url, mode="r")
    order = np.argsort(-matrix, axis=1, kind="stable")
    np.testing.assert_array_equal(group["top_helpful_indices"][:], order[:, :3])
    np.testing.assert_array_equal(group["top_harmful_indices"][:], order[:, ::-1][:, :3])
    np.testing.assert_array_equal(group["top_helpful_values"][:], np.take_along_axis(matrix, order[:, :3], 1))
    np.testing.assert_array_equal(group["top_harmful_values"][:], np.sort(matrix, axis=1)[:, :3])
    assert group["top_helpful_indices"].dtype == np.int64 and group.attrs["top_k"] == 3
    assert all(name in group for name in TOP_ARRAYS) and SELF_INFLUENCES not in group
    write_top_k(url, 50, progress=False)  # k is at most n_train
    assert zarr.open_group(url, mode="r")["top_helpful_indices"].shape == (7, 10)


def test_write_top_k_refuses_an_incomplete_store_and_bad_k(tmp_path):
    url = str(tmp_path / "out.zarr")
    prepare_group(url, overwrite=False, resume=False, attributes=CONFIG)
    _write(url, _matrix())
    with pytest.raises(UsageError, match="expected an integer ≥ 1; got 0"):
        write_top_k(url, 0, progress=False)
    shutil.rmtree(tmp_path / "out.zarr" / INFLUENCES / "_infscale_complete")
    with pytest.raises(UsageError, match=r"is incomplete \(0 of 9 blocks\); rerun with --resume"):
        write_top_k(url, 2, progress=False)
