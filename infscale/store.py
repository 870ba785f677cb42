"""The one module that touches zarr: opening stores, writing blocks with completion markers,
resuming, and reading back what is complete.

Layout of an array written by infscale (a zarr v3 array at the root of its store)::

    zarr.json, c/...                 the array, one chunk per block
    _infscale_complete/<i>[.<j>]     a marker per block, written after its chunk is stored

Framework-free: blocks arrive as numpy arrays through a converter.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import NonFiniteError, StoreExistsError, StoreMismatchError

__all__ = [
    "StoreExistsError",
    "StoreMismatchError",
    "COMPLETE_PREFIX",
    "open_zarr_store",
    "completed_blocks",
    "store_is_empty",
    "verify_blocks",
    "VerifyReport",
    "block_digest",
    "input_digest",
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


def _marker_keys(store, prefix: str = "") -> list[str]:
    """Block keys ("i" or "i.j") that have a marker under ``prefix``; leftovers of a write cut
    short (``1.<hex>.partial``) do not count."""

    async def collect():
        return [k async for k in store.list_prefix(prefix + COMPLETE_PREFIX)]

    keys = (k[len(prefix + COMPLETE_PREFIX) :] for k in _sync(collect()))
    return [k for k in keys if k and all(part.isdigit() for part in k.split("."))]


def _chunk_keys(store, prefix: str = "") -> set[str]:
    async def collect():
        return [k[len(prefix) :] async for k in store.list_prefix(prefix + "c/")]

    return set(_sync(collect()))


def _chunk_key(array, key: str) -> str:
    index = tuple(int(p) for p in key.split("."))
    return array.metadata.encode_chunk_key(index + (0,) * (array.ndim - len(index)))


def completed_blocks(store, path: str = "") -> set[str]:
    """Keys (``"i.j"`` or ``"i"``) of the blocks of the array at ``path`` in ``store`` that are
    complete: their marker AND their chunk exist. (A marker whose chunk was deleted does not
    count; checksums are checked by :func:`verify_blocks`.)"""
    import zarr

    prefix = path.rstrip("/") + "/" if path else ""
    keys = _marker_keys(store, prefix)
    if not keys:
        return set()
    try:
        array = zarr.open_array(store=store, path=path or None, mode="r")
    except Exception:
        return set()
    chunks = _chunk_keys(store, prefix)
    return {k for k in keys if _chunk_key(array, k) in chunks}


def _read_marker(store, key: str) -> dict:
    from zarr.core.buffer import default_buffer_prototype

    raw = _sync(store.get(key, prototype=default_buffer_prototype()))
    try:
        value = json.loads(raw.to_bytes()) if raw is not None else None
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {}  # markers of infscale < 0.1.1 hold b"1"


def _mark_complete(store, key: str, content: dict) -> None:
    from zarr.core.buffer import default_buffer_prototype

    blob = json.dumps(content, sort_keys=True).encode()
    _sync(store.set(key, default_buffer_prototype().buffer.from_bytes(blob)))


def block_digest(data: np.ndarray) -> str:
    """Checksum of a block's values as stored (dtype, shape and bytes)."""
    data = np.ascontiguousarray(data)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{data.dtype.str}{data.shape}".encode())
    h.update(data.view(np.uint8).reshape(-1) if data.size else b"")
    return h.hexdigest()


def _numpy_of(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, on any device (bfloat16 has no numpy dtype)
        x = x.detach().cpu()
        try:
            return x.numpy()
        except TypeError:
            return x.float().numpy()
    return np.asarray(x)


def input_digest(*parts: Any) -> str:
    """A cheap running hash of a batch of inputs (arrays, tensors, or mappings of them)."""
    h = hashlib.blake2b(digest_size=16)

    def add(part: Any) -> None:
        if isinstance(part, dict) or hasattr(part, "keys") and hasattr(part, "__getitem__"):
            for key in sorted(part.keys()):
                h.update(str(key).encode())
                add(part[key])
        elif isinstance(part, (tuple, list)):
            for item in part:
                add(item)
        else:
            a = np.ascontiguousarray(_numpy_of(part))
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.view(np.uint8).reshape(-1) if a.size else b"")

    for part in parts:
        add(part)
    return h.hexdigest()


@dataclass
class VerifyReport:
    """What :func:`verify_blocks` found: complete blocks whose data match their checksum, and
    those recorded complete whose chunk is missing, unreadable or altered."""

    good: set[str]
    damaged: dict[str, str]  # block key → what is wrong


def verify_blocks(array, store, path: str = "", keys: set[str] | None = None) -> VerifyReport:
    """Re-read every block recorded complete and check it against its stored checksum.

    A block is damaged when its chunk is missing, cannot be decoded (truncated), holds NaN
    (never a finished value) or differs from its checksum. Costs one read of those blocks.
    """
    prefix = path.rstrip("/") + "/" if path else ""
    keys = set(_marker_keys(store, prefix)) if keys is None else set(keys)
    chunks = _chunk_keys(store, prefix)
    good, damaged = set(), {}
    for key in sorted(keys):
        if _chunk_key(array, key) not in chunks:
            damaged[key] = "chunk missing"
            continue
        index = [int(p) for p in key.split(".")]
        region = tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, array.chunks))
        try:
            data = np.asarray(array[region])
        except Exception as error:  # a truncated or corrupted chunk
            damaged[key] = f"unreadable ({type(error).__name__})"
            continue
        expected = _read_marker(store, prefix + COMPLETE_PREFIX + key).get("checksum")
        if data.dtype.kind in "fc" and np.isnan(data).any():
            damaged[key] = "holds NaN (unwritten values)"
        elif expected is not None and block_digest(data.astype(array.dtype, copy=False)) != expected:
            damaged[key] = "checksum mismatch"
        else:
            good.add(key)
    return VerifyReport(good, damaged)


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
    foreign = [k for k in keys if k != "zarr.json" and not k.startswith(("c/", COMPLETE_PREFIX))]
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

    if empty:  # nothing to keep: fail fast on an unwritable path, before computing
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
        array = create() if replace else zarr.open_array(store=store, mode="r+")
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
