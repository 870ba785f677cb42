"""The one module that touches zarr: opening stores, writing blocks with completion markers,
resuming, and reading back what is complete.

Layout of an array written by infscale (a zarr v3 array at the root of its store)::

    zarr.json, c/...                 the array, one chunk per block
    _infscale_complete/<i>[.<j>]     a marker per block, written after its chunk is stored

Framework-free: blocks arrive as numpy arrays through a converter.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StoreExistsError, StoreMismatchError

__all__ = [
    "StoreExistsError",
    "StoreMismatchError",
    "COMPLETE_PREFIX",
    "open_zarr_store",
    "completed_blocks",
    "store_is_empty",
]

#: Key prefix (inside the zarr store) of the markers of completed blocks.
COMPLETE_PREFIX = "_infscale_complete/"


def open_zarr_store(path_or_url: str | os.PathLike, storage_options: dict | None = None):
    """A zarr v3 store for a local path, ``file://`` URL, or any fsspec URL
    (``memory://``, ``s3://``, ...). ``storage_options`` go to fsspec (e.g.
    ``{"endpoint_url": ..., "key": ..., "secret": ...}`` for S3)."""
    from zarr.storage import FsspecStore, LocalStore

    if isinstance(path_or_url, os.PathLike):
        path_or_url = os.fspath(path_or_url)
    if not isinstance(path_or_url, str) or not path_or_url:
        raise TypeError(f"path_or_url must be a non-empty str or path; got {path_or_url!r}.")
    if path_or_url.startswith("file://"):
        path_or_url = path_or_url[len("file://") :]
    if "://" in path_or_url:
        return FsspecStore.from_url(path_or_url, storage_options=dict(storage_options or {}), read_only=False)
    if storage_options:
        raise ValueError("storage_options is only used with URLs (memory://, s3://, ...), not local paths.")
    return LocalStore(Path(path_or_url).expanduser())


def _sync(coro):
    from zarr.core.sync import sync

    return sync(coro)


def completed_blocks(store) -> set[str]:
    """Keys (``"i.j"`` or ``"i"``) of the blocks recorded as complete in ``store``."""

    async def collect():
        return [k async for k in store.list_prefix(COMPLETE_PREFIX)]

    keys = (k[len(COMPLETE_PREFIX) :] for k in _sync(collect()))
    # a write cut short may leave a temporary file beside the markers: only "i" or "i.j" count
    return {k for k in keys if all(part.isdigit() for part in k.split("."))}


def _mark_complete(store, key: str) -> None:
    from zarr.core.buffer import default_buffer_prototype

    _sync(store.set(COMPLETE_PREFIX + key, default_buffer_prototype().buffer.from_bytes(b"1")))


def store_is_empty(store, where: str) -> bool:
    """Whether the store holds nothing (a missing local folder counts as empty).

    Raises:
        NotADirectoryError: a local path that is a file.
    """
    if hasattr(store, "root"):  # LocalStore
        root = Path(store.root)
        if root.is_file():
            raise NotADirectoryError(f"{where} is a file, not a directory for a zarr store.")
        return not root.exists() or not any(root.iterdir())
    return _sync(store.is_empty(""))


def _jsonable(value: Any) -> Any:
    """Attributes as they come back from zarr.json (tuples → lists, enums → values)."""
    import json

    return json.loads(json.dumps(value, default=lambda o: getattr(o, "value", str(o))))


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
):
    """Create (or reopen, when resuming) the array, then write the blocks still missing,
    marking each complete after its data is stored."""
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
    if not empty and resume:
        array = _open_for_resume(store, where, layout, attributes)
        done = completed_blocks(store)
    elif not empty and not overwrite:
        raise StoreExistsError(
            f"to_zarr: {where!r} already holds data; pass overwrite=True to replace it or "
            "resume=True to finish an interrupted run. Nothing was written."
        )
    else:
        if not empty and not _sync(store.exists("zarr.json")):
            raise StoreExistsError(
                f"to_zarr: {where!r} holds data that is not a zarr store; overwrite=True only replaces "
                "zarr stores. Choose another path. Nothing was written."
            )
        try:
            if not empty:
                _sync(store.delete_dir(""))
            array = zarr.create_array(
                store=store,
                shape=layout.shape,
                chunks=layout.chunks,
                dtype=layout.dtype,
                fill_value=0,
                attributes=attributes,
                overwrite=True,
            )
        except Exception as error:
            raise OSError(f"to_zarr: cannot write a zarr store at {where!r}: {error}") from error

    def todo(*index: int) -> bool:
        return ".".join(map(str, index)) not in done

    n_todo = n_blocks - len(done)

    def store_block(region, data, key):
        array[region] = data
        _mark_complete(store, key)  # only after the data is stored

    # One writer thread overlaps storing a block with computing the next one; at most
    # two converted blocks wait for it, so memory stays at a few blocks.
    pending: deque = deque()
    with (
        tqdm(total=n_todo, unit="block", desc=description, disable=not progress) as bar,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="infscale-zarr") as writer,
    ):
        try:
            for index, region, block in blocks(todo if done else None):
                data = np.asarray(converter.to_numpy(block))
                expected = tuple(s.stop - s.start for s in region) + tuple(layout.shape[len(region) :])
                if data.shape != expected:
                    raise ValueError(
                        f"to_zarr: block {index} has shape {data.shape}, expected {expected} "
                        "(does a loader yield different batches on different passes?)."
                    )
                data = data.astype(layout.dtype, copy=False)
                pending.append(writer.submit(store_block, region, data, ".".join(map(str, index))))
                del data, block
                while len(pending) > 2 or (pending and pending[0].done()):
                    pending.popleft().result()
                    bar.update(1)
            while pending:
                pending.popleft().result()
                bar.update(1)
        finally:
            for future in pending:
                future.cancel()
    return array if return_stored else None


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
    diff = [f"{k}: stored {stored[k]!r}, requested {wanted[k]!r}" for k in wanted if stored[k] != wanted[k]]
    if diff:
        raise StoreMismatchError(
            f"to_zarr(resume=True): the store at {where!r} was written for another computation; "
            + "; ".join(diff)
            + ". Use overwrite=True or another path. Nothing was written."
        )
    return array


def _offsets(sizes: list[int]) -> list[int]:
    out, total = [], 0
    for s in sizes:
        out.append(total)
        total += s
    return out


# ---------------------------------------------------------------------------------------------
# Groups of arrays (the results layout of ``infscale.app.results``) and reading back what is done.


def holds_zarr(store) -> bool:
    """Whether the root of ``store`` is a zarr node (an array or a group: it has a ``zarr.json``)."""
    return bool(_sync(store.exists("zarr.json")))


def clear_store(store) -> None:
    """Delete everything in ``store`` (callers check first that it holds a zarr node)."""
    _sync(store.delete_dir(""))


def create_group(store, attributes: dict[str, Any] | None = None):
    """A new, empty zarr v3 group at the root of ``store`` with ``attributes`` (made JSON-safe)."""
    import zarr

    return zarr.open_group(store=store, mode="w", attributes=_jsonable(dict(attributes or {})))


def open_group(store, writable: bool = False):
    """The zarr group at the root of ``store``, read-only unless ``writable``.

    Raises:
        Exception: whatever zarr raises when the root is not a group (the caller words the error).
    """
    import zarr

    return zarr.open_group(store=store, mode="r+" if writable else "r")


def open_node(store):
    """(``"group"`` or ``"array"``, node): the zarr node at the root of ``store``, read-only.

    Raises:
        Exception: whatever zarr raises when the root holds no zarr node.
    """
    import zarr

    node = zarr.open(store=store, mode="r")
    return ("group" if isinstance(node, zarr.Group) else "array"), node


def write_group_array(group, name: str, value: np.ndarray, chunks: tuple[int, ...], attributes=None):
    """Create (replacing one of the same name) the array ``group[name]`` holding ``value``."""
    value = np.asarray(value)
    array = group.create_array(name, shape=value.shape, chunks=chunks, dtype=value.dtype, overwrite=True)
    array[...] = value
    if attributes:
        array.attrs.update(_jsonable(dict(attributes)))
    return array


def array_completed_blocks(array) -> set[str]:
    """Keys (``"i.j"`` or ``"i"``) of the blocks marked complete for a zarr array, wherever it
    sits in its store (at the root, as ``to_zarr`` writes it, or inside a group)."""
    prefix = (array.path + "/" if array.path else "") + COMPLETE_PREFIX

    async def collect():
        return [k async for k in array.store.list_prefix(prefix)]

    keys = (k[len(prefix) :] for k in _sync(collect()))
    return {k for k in keys if all(part.isdigit() for part in k.split("."))}


def array_completeness(array) -> tuple[int, int, set[str] | None]:
    """(complete blocks, all blocks, keys of the complete blocks) of a zarr array.

    An array written by infscale has its blocks on its first two axes (``n_test``/``n_train``
    attributes) or its first axis (``n``); only marked blocks count as complete. An array
    written by other means (none of these attributes) counts as complete (its blocks are all
    its chunks), with keys None.
    """
    import math

    attrs = array.attrs
    grid = [math.ceil(s / c) for s, c in zip(array.shape, array.chunks)]
    if "infscale_version" not in attrs and "n_test" not in attrs and "n" not in attrs:
        return math.prod(grid), math.prod(grid), None  # every chunk
    total = math.prod(grid[: 2 if "n_train" in attrs else 1])
    done = array_completed_blocks(array)
    return len(done), total, done


def attribute_differences(stored: dict[str, Any], wanted: dict[str, Any], ignore=()) -> list[str]:
    """``"key: stored X, now Y"`` for every key of ``wanted`` (but those in ``ignore``) whose
    JSON form differs from ``stored``'s (a missing key counts as ``None``)."""
    wanted = _jsonable(dict(wanted))
    return [
        f"{key}: stored {stored.get(key)!r}, now {value!r}"
        for key, value in wanted.items()
        if key not in ignore and stored.get(key) != value
    ]


__all__ += [
    "holds_zarr",
    "clear_store",
    "create_group",
    "open_group",
    "open_node",
    "write_group_array",
    "array_completed_blocks",
    "array_completeness",
    "attribute_differences",
]
