"""Opening stores: paths, URLs (fsspec), zarr Store objects, mappers; emptiness; attributes."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

__all__ = ["open_zarr_store", "store_is_empty", "is_temporary_key"]

#: zarr's LocalStore writes a key to ``<stem>.<32 hex digits>.partial`` and then renames it: a process
#: killed in between leaves that file behind. It is never data.
_TEMPORARY = re.compile(r"\.[0-9a-f]{32}\.partial$")


def is_temporary_key(key: str) -> bool:
    """Whether ``key`` is a temporary file of a write cut short (``c/0/1.<hex>.partial``)."""
    return bool(_TEMPORARY.search(key))


def open_zarr_store(path_or_url: Any, storage_options: dict | None = None):
    """A zarr v3 store for a local path, a ``file://`` URL, any fsspec URL (``memory://``,
    ``s3://``, ...), or something that already is a store: a zarr ``Store`` object
    (``zarr.storage.MemoryStore()``, ``LocalStore(...)``, ``FsspecStore``), an fsspec mapper
    (``fsspec.get_mapper(url)``) or a plain dict (held in memory). ``storage_options`` go to
    fsspec with URLs (e.g. ``{"endpoint_url": ..., "key": ..., "secret": ...}`` for S3).

    Raises:
        TypeError: anything else (the message says what is accepted).
        ValueError: ``storage_options`` with something other than a URL.
    """
    from zarr.abc.store import Store
    from zarr.storage import FsspecStore, LocalStore, MemoryStore

    if isinstance(path_or_url, (Store, dict)) or _is_fsspec_mapper(path_or_url):
        if storage_options:
            raise ValueError("storage_options is only used with URLs (memory://, s3://, ...).")
        if isinstance(path_or_url, Store):
            return path_or_url
        if isinstance(path_or_url, dict):
            return MemoryStore(path_or_url)
        return FsspecStore.from_mapper(path_or_url, read_only=False)
    if isinstance(path_or_url, os.PathLike):
        path_or_url = os.fspath(path_or_url)
    if not isinstance(path_or_url, str) or not path_or_url:
        raise TypeError(
            "path_or_url must be a non-empty path or URL, a zarr Store, an fsspec mapper or a dict; "
            f"got {path_or_url!r}."
        )
    if path_or_url.startswith("file://"):
        path_or_url = path_or_url[len("file://") :]
    if "://" in path_or_url:
        return FsspecStore.from_url(path_or_url, storage_options=dict(storage_options or {}), read_only=False)
    if storage_options:
        raise ValueError("storage_options is only used with URLs (memory://, s3://, ...), not local paths.")
    return LocalStore(Path(path_or_url).expanduser())


def _is_fsspec_mapper(value: Any) -> bool:
    return type(value).__name__ == "FSMap" and hasattr(value, "fs") and hasattr(value, "root")


def _sync(coro):
    from zarr.core.sync import sync

    return sync(coro)


def store_is_empty(store, where: str) -> bool:
    """Whether the store holds nothing (a missing local folder, or one holding only empty folders
    and temporary files of writes cut short, counts as empty).

    Raises:
        NotADirectoryError: a local path that is a file.
    """
    if hasattr(store, "root"):  # LocalStore
        root = Path(store.root)
        if root.is_file():
            raise NotADirectoryError(f"{where} is a file, not a directory for a zarr store.")
        return not root.exists() or not any(
            p.is_file() and not is_temporary_key(p.name) for p in root.rglob("*")
        )
    return _sync(store.is_empty(""))


def _jsonable(value: Any) -> Any:
    """Attributes as they come back from zarr.json (tuples → lists, enums → values)."""
    import json

    return json.loads(json.dumps(value, default=lambda o: getattr(o, "value", str(o))))
