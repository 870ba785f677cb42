"""Completion markers, checksums and input digests: what makes a block count as done."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from .opening import _sync

__all__ = [
    "COMPLETE_PREFIX",
    "completed_blocks",
    "block_digest",
    "input_digest",
    "VerifyReport",
    "verify_blocks",
]

#: Key prefix (inside the zarr store) of the markers of completed blocks.
COMPLETE_PREFIX = "_infscale_complete/"


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
