"""Groups of arrays (the results layout of ``infscale.app.results``) and reading back what is done;
whose a store is (only a store infscale wrote may be replaced) and whether it holds results."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import numpy as np

from .markers import COMPLETE_PREFIX, _marker_keys, block_digest, completed_blocks
from .opening import _jsonable, _sync, is_temporary_key

__all__ = [
    "holds_zarr",
    "clear_store",
    "create_group",
    "open_group",
    "open_node",
    "write_group_array",
    "verify_group_array",
    "array_completed_blocks",
    "array_completeness",
    "attribute_differences",
    "store_keys",
    "ownership_problem",
    "holds_finished_blocks",
]


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
    """Create (replacing one of the same name) the array ``group[name]`` holding ``value``.

    Unwritten values read as NaN (floats) or -1 (integers). The attributes, with the checksum of
    ``value`` (``checksum``), are written last: an array without them was cut short."""
    value = np.asarray(value)
    fill = np.nan if value.dtype.kind in "fc" else -1 if value.dtype.kind == "i" else 0
    array = group.create_array(
        name, shape=value.shape, chunks=chunks, dtype=value.dtype, fill_value=fill, overwrite=True
    )
    array[...] = value
    array.attrs.update(_jsonable({**dict(attributes or {}), "checksum": block_digest(value)}))
    return array


def verify_group_array(array) -> str | None:
    """What is wrong with an array written by ``write_group_array`` (None when nothing is): cut
    short (no checksum), unreadable, or not matching its checksum. Costs one read of the array."""
    expected = array.attrs.get("checksum")
    if expected is None:
        return "incomplete (its write was cut short)"
    try:
        data = np.asarray(array[...])
    except Exception as error:  # a truncated or corrupted chunk
        return f"unreadable ({type(error).__name__})"
    return None if block_digest(data.astype(array.dtype, copy=False)) == expected else "checksum mismatch"


def array_completed_blocks(array) -> set[str]:
    """Keys (``"i.j"`` or ``"i"``) of the complete blocks of a zarr array (marker and chunk both
    present), wherever it sits in its store (at the root, as ``to_zarr`` writes it, or inside a
    group)."""
    return completed_blocks(array.store, array.path)


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


def remove_temporary_keys(store) -> int:
    """Delete the temporary files that writes cut short left in a store infscale owns (zarr's
    ``*.partial``; never anything else), so that a resumed store holds what an uninterrupted run
    would. Returns how many were removed."""
    from .opening import is_temporary_key

    leftovers = [k for k in store_keys(store) if is_temporary_key(k)]
    for key in leftovers:
        _sync(store.delete(key))
    return len(leftovers)


def store_keys(store) -> list[str]:
    """Every key in ``store`` (one listing; on object stores, one request per 1000 keys)."""

    async def collect():
        return [k async for k in store.list_prefix("")]

    return _sync(collect())


def _root_metadata(store) -> dict[str, Any]:
    from zarr.core.buffer import default_buffer_prototype

    raw = _sync(store.get("zarr.json", prototype=default_buffer_prototype()))
    try:
        value = json.loads(raw.to_bytes()) if raw is not None else None
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {}


def _digits(parts: list[str]) -> bool:
    return bool(parts) and all(part.isdigit() for part in parts)


def _written_by_infscale(key: str, arrays: Iterable[str]) -> bool:
    """Whether ``key`` is one infscale writes in a group holding ``arrays`` ("" for an array at the
    root): a ``zarr.json``, a chunk (``c/0/1``), a completion marker (``_infscale_complete/0.1``),
    or a temporary file of one of them (``c/0/1.<hex>.partial``, judged by its folder)."""
    if key == "zarr.json" or is_temporary_key(key) and "/" not in key:
        return True
    for name in arrays:
        prefix = f"{name}/" if name else ""
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        folder, _, base = rest.rpartition("/")
        if rest == "zarr.json" or is_temporary_key(rest) and not folder:
            return True
        if rest.startswith("c/"):  # chunks: c/0/1; a temporary file in any chunk folder
            parts = rest.split("/")[1:]
            if _digits(parts) or is_temporary_key(base) and _digits(parts[:-1] or ["0"]):
                return True
        if folder + "/" == COMPLETE_PREFIX and (_digits(base.split(".")) or is_temporary_key(base)):
            return True
    return False


def ownership_problem(store, arrays: Iterable[str]) -> str | None:
    """Why ``store`` is not one infscale wrote, or None when it is: a zarr group (or array) whose
    attributes name an infscale version, holding nothing but the zarr metadata, chunks and
    completion markers of the arrays named in ``arrays`` (temporary files of writes cut short
    included). A store holding only such temporary files is infscale's (a leftover) too.

    The text completes "holds ..." in an error message."""
    keys = store_keys(store)
    if all(is_temporary_key(k) for k in keys):
        return None
    if "zarr.json" not in keys:
        return "data that is not a zarr store written by infscale"
    metadata = _root_metadata(store)
    if "infscale_version" not in (metadata.get("attributes") or {}):
        return "a zarr store infscale did not write (its attributes name no infscale version)"
    names = [""] if metadata.get("node_type") == "array" else list(arrays)
    foreign = sorted(k for k in keys if not _written_by_infscale(k, names))
    if foreign:
        listed = ", ".join(foreign[:5]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 5 else "")
        return f"files infscale did not write ({listed})"
    return None


def holds_finished_blocks(store, arrays: Iterable[str]) -> bool:
    """Whether any of the arrays named in ``arrays`` (or an array at the root of ``store``) has a
    block marked complete: results that only ``--overwrite`` may replace."""
    return any(_marker_keys(store, f"{name}/" if name else "") for name in ("", *arrays))
