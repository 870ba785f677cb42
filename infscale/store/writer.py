"""Writing an array block by block: create or reopen, replace safely, resume, check each block."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import NonFiniteError, StoreExistsError, StoreMismatchError
from .markers import (
    COMPLETE_PREFIX,
    _mark_complete,
    _marker_keys,
    _read_marker,
    block_digest,
    completed_blocks,
    input_digest,
    verify_blocks,
)
from .opening import _jsonable, _sync, is_temporary_key, open_zarr_store, store_is_empty


@dataclass
class _Layout:
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    attributes: dict[str, Any]


def _regular_chunk(sizes: list[int], what: str) -> int:
    """The chunk length for blocks of these sizes; all but the last must be equal."""
    if not sizes:
        raise ValueError(f"{what} is empty: there is nothing to store.")
    first = sizes[0]
    if any(s != first for s in sizes[:-1]) or sizes[-1] > first:
        raise ValueError(
            f"to_zarr needs batches of one size (only the last may be smaller) so that each "
            f"block is one zarr chunk; {what} has batch sizes {sizes[:10]}"
            f"{'...' if len(sizes) > 10 else ''}."
        )
    return first


_STORE_EXISTS_HINT = "pass overwrite=True to replace it or resume=True to finish an interrupted run"


def _infscale_keys_only(store, where: str) -> None:
    """Refuse to delete a store holding anything infscale did not write.

    Raises:
        StoreExistsError: not an infscale array, or files beside it (named in the message).
    """
    async def collect():
        return [k async for k in store.list_prefix("")]

    keys = _sync(collect())
    if "zarr.json" not in keys:
        raise StoreExistsError(
            f"to_zarr: {where!r} holds data that is not a zarr store written by infscale; overwrite=True "
            "only replaces stores infscale wrote. Choose another path. Nothing was written."
        )
    attributes = json.loads(_sync(_get_bytes(store, "zarr.json"))).get("attributes", {})
    foreign = [
        k for k in keys
        if k != "zarr.json" and not k.startswith(("c/", COMPLETE_PREFIX)) and not is_temporary_key(k)
    ]  # fmt: skip
    if "infscale_version" not in attributes or foreign:
        what = f"files infscale did not write ({', '.join(sorted(foreign)[:5])})" if foreign else (
            "a zarr array infscale did not write (no infscale attributes)"
        )
        raise StoreExistsError(
            f"to_zarr: {where!r} holds {what}; overwrite=True only replaces stores infscale wrote. "
            "Choose another path, or move those files away. Nothing was written."
        )


async def _get_bytes(store, key: str) -> bytes:
    from zarr.core.buffer import default_buffer_prototype

    raw = await store.get(key, prototype=default_buffer_prototype())
    return raw.to_bytes() if raw is not None else b"{}"


class _InputCheck:
    """Hashes each batch of inputs the first time it is read, refuses a resume whose inputs
    differ from those recorded with the finished blocks, and remembers the digests for the
    markers of the blocks written now."""

    def __init__(self, recorded: dict[tuple[str, int], str], where: str):
        self.recorded = recorded
        self.where = where
        self.seen: dict[tuple[str, int], str] = {}

    def __call__(self, axis: str, index: int, *inputs: Any) -> None:
        if (axis, index) in self.seen:
            return
        digest = input_digest(*inputs)
        self.seen[(axis, index)] = digest
        old = self.recorded.get((axis, index))
        if old is not None and old != digest:
            side = {"row": "test (row)", "col": "training (column)"}[axis]
            raise StoreMismatchError(
                f"to_zarr(resume=True): the {side} data of batch {index} differ from those the store at "
                f"{self.where!r} was written with; resuming would mix two computations. Use overwrite=True "
                "or another path. Nothing was written."
            )

    def digests(self, index: tuple[int, ...]) -> dict[str, str]:
        return {
            axis: self.seen[(axis, i)]
            for axis, i in zip(("row", "col"), index)
            if (axis, i) in self.seen
        }


def _write_blocks(
    path_or_url,
    layout: _Layout,
    blocks: Callable[[Callable | None], Iterator[tuple[tuple[int, ...], tuple[slice, ...], Any]]],
    n_blocks: int,
    converter: Any,
    return_stored: bool,
    overwrite: bool,
    resume: bool,
    progress: bool,
    storage_options: dict | None,
    description: str,
    source: Any = None,
    verify: bool = True,
):
    """Create (or reopen, when resuming) the array, then write the blocks still missing, marking
    each complete (with its checksum and the digests of its inputs) after its data is stored.

    An existing store is replaced only when it is one infscale wrote, and only once the first
    new block has been computed, so a run that fails early leaves the old results intact. A
    store infscale wrote that holds no finished block is reused without ``overwrite``.
    On resume, blocks whose chunk is missing (and, with ``verify``, unreadable or not matching
    their checksum) are computed again, and inputs that differ from the recorded ones are refused.
    """
    import zarr
    from tqdm.auto import tqdm

    where = str(path_or_url)
    if overwrite and resume:
        raise ValueError("to_zarr: overwrite=True and resume=True exclude each other; choose one.")
    if converter is None or not hasattr(converter, "to_numpy"):
        raise TypeError(
            f"to_zarr: converter must have a to_numpy(tensor) method, e.g. "
            f"infscale.torch.util.TorchNumpyConverter(); got {converter!r}."
        )
    store = open_zarr_store(path_or_url, storage_options)
    try:
        empty = store_is_empty(store, where)
    except NotADirectoryError:
        raise
    except Exception as error:
        raise OSError(f"to_zarr: cannot access the store at {where!r}: {error}") from error
    attributes = _jsonable(layout.attributes)
    done: set[str] = set()
    recorded: dict[tuple[str, int], str] = {}
    array = None
    replace = False
    if not empty and resume:
        array = _open_for_resume(store, where, layout, attributes)
        done = completed_blocks(store)
        if verify and done:
            report = verify_blocks(array, store, keys=done)
            done = report.good
        for key in _marker_keys(store):
            if key not in done:  # a marker without (valid) data: the block is redone
                _sync(store.delete(COMPLETE_PREFIX + key))
        for key in done:
            marker = _read_marker(store, COMPLETE_PREFIX + key)
            index = [int(p) for p in key.split(".")]
            for axis, i in zip(("row", "col"), index):
                if axis in marker.get("inputs", {}):
                    recorded[(axis, i)] = marker["inputs"][axis]
    elif not empty:
        _infscale_keys_only(store, where)
        if _marker_keys(store) and not overwrite:
            raise StoreExistsError(
                f"to_zarr: {where!r} already holds results; {_STORE_EXISTS_HINT}. Nothing was written."
            )
        replace = True  # ours, and either empty of results or overwrite=True

    check = _InputCheck(recorded, where)
    if source is not None and hasattr(source, "input_observer"):
        source.input_observer = check

    def create():
        try:
            if replace:
                _sync(store.delete_dir(""))
            return zarr.create_array(
                store=store,
                shape=layout.shape,
                chunks=layout.chunks,
                dtype=layout.dtype,
                fill_value=np.nan if np.dtype(layout.dtype).kind in "fc" else 0,
                attributes=attributes,
                overwrite=True,
                config={"write_empty_chunks": True},
            )
        except Exception as error:
            raise OSError(f"to_zarr: cannot write a zarr store at {where!r}: {error}") from error

    # A caller's hook on the source (the command replaces its old results group there): called
    # once, when the first block is ready and checked, before the array is created or replaced.
    before_first_write = getattr(source, "before_first_write", None)
    if empty and before_first_write is None:  # nothing to keep: fail fast on an unwritable path
        array = create()

    def todo(*index: int) -> bool:
        return ".".join(map(str, index)) not in done

    def store_block(region, data, key, content):
        array[region] = data
        _mark_complete(store, COMPLETE_PREFIX + key, content)  # only after the data is stored

    # One writer thread overlaps storing a block with computing the next one; at most
    # two converted blocks wait for it, so memory stays at a few blocks.
    pending: deque = deque()
    with (
        tqdm(total=n_blocks - len(done), unit="block", desc=description, disable=not progress) as bar,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="infscale-zarr") as writer,
    ):
        try:
            for index, region, block in blocks(todo if done else None):
                data = _checked_block(converter, block, index, region, layout)
                if array is None:  # the first block is ready: only now replace the old store
                    if before_first_write is not None:
                        before_first_write()
                    array = create()
                content = {"checksum": block_digest(data), "inputs": check.digests(index)}
                pending.append(writer.submit(store_block, region, data, ".".join(map(str, index)), content))
                del data, block
                while len(pending) > 2 or (pending and pending[0].done()):
                    pending.popleft().result()
                    bar.update(1)
            while pending:
                pending.popleft().result()
                bar.update(1)
        except BaseException:
            for future in pending:  # blocks computed before the failure are valid: keep them
                try:
                    future.result()
                except Exception:
                    pass
            raise
        finally:
            if source is not None and hasattr(source, "input_observer"):
                source.input_observer = None
    if array is None:  # nothing was left to compute
        array = create() if replace or empty else zarr.open_array(store=store, mode="r+")
    return array if return_stored else None


def _checked_block(converter, block, index, region, layout: _Layout) -> np.ndarray:
    """The block as a numpy array of the layout's dtype.

    Raises:
        ValueError: the shape differs from the grid's.
        NonFiniteError: NaN or inf in the block (nothing of it is written).
    """
    data = np.asarray(converter.to_numpy(block))
    expected = tuple(s.stop - s.start for s in region) + tuple(layout.shape[len(region) :])
    if data.shape != expected:
        raise ValueError(
            f"to_zarr: block {index} has shape {data.shape}, expected {expected} "
            "(does a loader yield different batches on different passes?)."
        )
    data = np.ascontiguousarray(data.astype(layout.dtype, copy=False))
    if data.dtype.kind in "fc" and not np.isfinite(data).all():
        bad = np.argwhere(~np.isfinite(data))[:3].tolist()
        raise NonFiniteError(
            f"to_zarr: block {index} holds {int((~np.isfinite(data)).sum())} NaN or infinite values "
            f"(first at {bad} within the block): check the data, the model's parameters and the loss "
            "for non-finite values, or the regularization. Nothing of this block was written."
        )
    return data


def _open_for_resume(store, where: str, layout: _Layout, attributes: dict):
    import zarr

    try:
        array = zarr.open_array(store=store, mode="r+")
    except Exception as error:
        raise StoreMismatchError(
            f"to_zarr(resume=True): {where!r} holds data that is not a zarr array written by "
            f"infscale ({error}); use overwrite=True or another path."
        ) from error
    stored = {
        "shape": list(array.shape),
        "chunks": list(array.chunks),
        "dtype": str(array.dtype),
    }
    wanted = {
        "shape": list(layout.shape),
        "chunks": list(layout.chunks),
        "dtype": str(np.dtype(layout.dtype)),
    }
    for key in sorted(set(attributes) - {"infscale_version"}):
        stored[key] = array.attrs.get(key, "<missing>")
        wanted[key] = attributes[key]
    diff = [_describe_change(k, stored[k], wanted[k]) for k in wanted if stored[k] != wanted[k]]
    if diff:
        raise StoreMismatchError(
            f"to_zarr(resume=True): the store at {where!r} was written for another computation; "
            + "; ".join(diff)
            + ". Use overwrite=True or another path. Nothing was written."
        )
    return array


#: What a changed attribute means, for the resume error.
_CHANGES = {
    "model_fingerprint": "the model's parameters or buffers changed (retrained or another model?)",
    "hyperparameters": "the method's settings changed",
}


def _describe_change(key: str, stored: Any, wanted: Any) -> str:
    if key in _CHANGES:
        return f"{_CHANGES[key]} ({key}: stored {stored!r}, now {wanted!r})"
    return f"{key}: stored {stored!r}, requested {wanted!r}"


def _offsets(sizes: list[int]) -> list[int]:
    out, total = [], 0
    for s in sizes:
        out.append(total)
        total += s
    return out
