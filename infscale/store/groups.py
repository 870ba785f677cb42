"""Groups of arrays (the results layout of ``infscale.app.results``) and reading back what is done."""

from __future__ import annotations

from typing import Any

import numpy as np

from .markers import completed_blocks
from .opening import _jsonable, _sync

__all__ = [
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
