"""Writing a dask array to zarr resumably: blocks computed on a Dask cluster, gathered and
written by the calling process through ``infscale.store``'s writer, with the same completion
markers as ``SequentialInfluenceCalculator``'s ``to_zarr``. Re-exported as
``infscale.parallel.dask_to_zarr`` (its usual import path); see ``docs/parallel.md``.

Framework-free (no torch); zarr only through ``infscale.sequences`` / ``infscale.store``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import dask
import dask.array as da
import numpy as np

from .sequences import BlockSource, ChunkSource, LazyChunkSequence, NestedLazyChunkSequence

__all__ = ["dask_to_zarr", "BLOCK_AXES"]

#: Block axes of each quantity: its markers are "i.j" (test block × train block) or "i".
BLOCK_AXES = {"influences": 2, "self_influences": 1, "influence_factors": 1}


def _gather(client: Any, array: da.Array, indices: list[tuple[int, ...]], row_major: bool):
    """Yield ``(index, numpy block)`` for the blocks of ``array`` at ``indices``: on the client's
    cluster all at once, gathered one at a time as they finish (in order if ``row_major``);
    without a client, in this process (synchronous scheduler), one row of blocks at a time."""
    delayed = array.to_delayed()
    tasks = [delayed[index + (0,) * (array.ndim - len(index))] for index in indices]
    if client is None:
        for _, row in itertools.groupby(zip(indices, tasks), key=lambda item: item[0][0]):
            row_indices, row_tasks = zip(*row)
            yield from zip(row_indices, dask.compute(*row_tasks, scheduler="sync"))
        return
    from distributed import as_completed

    futures = client.compute(tasks)
    owner = dict(zip(futures, indices))
    for future in futures if row_major else as_completed(futures):
        block = future.result()
        future.release()
        yield owner.pop(future), block


class _DaskSource(BlockSource, ChunkSource):
    """The blocks of a dask array as a ``BlockSource`` (two block axes) or ``ChunkSource`` (one)."""

    def __init__(self, array: da.Array, client: Any, block_axes: int, attributes: dict[str, Any]):
        self.array, self.client, self.block_axes, self._attributes = array, client, block_axes, attributes
        self.feature_shape, self.dtype = tuple(array.shape[block_axes:]), array.dtype

    def _blocks(self, todo, row_major: bool):
        grid = itertools.product(*(range(n) for n in self.array.numblocks[: self.block_axes]))
        return _gather(self.client, self.array, [i for i in grid if todo is None or todo(*i)], row_major)

    def row_sizes(self) -> list[int]:
        return list(self.array.chunks[0])

    def col_sizes(self) -> list[int]:
        return list(self.array.chunks[1])

    chunk_sizes = row_sizes

    def iter_blocks(self, todo=None, row_major=False):
        return ((i, j, block) for (i, j), block in self._blocks(todo, row_major))

    def iter_chunks(self, todo=None):
        return ((i, block) for (i,), block in self._blocks(todo, True))

    def attributes(self) -> dict[str, Any]:
        return dict(self._attributes)


def dask_to_zarr(
    array: da.Array,
    path_or_url: Any,
    *,
    client: Any = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    attributes: dict[str, Any] | None = None,
    block_axes: int | None = None,
    storage_options: dict | None = None,
    return_stored: bool = False,
    before_first_write: Callable[[], None] | None = None,
):
    """Write a dask array into a zarr v3 array **resumably**: each block is computed on the
    cluster, gathered and written by this process through the writer of the sequential
    calculator's ``to_zarr``, then marked complete; ``resume=True`` finishes a killed run (under
    any scheduler, or with ``SequentialInfluenceCalculator``). Only this process opens the store.

    Args:
        array: e.g. ``calc.influences(...)`` of a ``DaskInfluenceCalculator``; regular chunks
            (all but the last equal) on the block axes, the other axes whole.
        path_or_url: a local path, or a ``file://``, ``memory://``, ``s3://`` (any fsspec) URL.
        client: the ``distributed.Client`` computing the blocks; None: the current client if
            there is one, else this process with the synchronous scheduler.
        resume: check that the store holds the same computation (shape, chunks, dtype,
            attributes) and compute only the blocks not marked complete.
        overwrite: replace a zarr store at ``path_or_url`` (other data is never deleted).
        progress: a tqdm bar over the blocks written.
        attributes: stored with the array; ``calc.result_attributes("influences", mode)`` gives
            those of the sequential calculator, so that each can resume the other's store.
        block_axes: 2 (blocks test × train, markers ``"i.j"``) or 1 (row blocks, ``"i"``); default
            from ``attributes["quantity"]``, else 1 for a 1-D array and 2 otherwise.
        storage_options: fsspec options for URLs.
        return_stored: return the zarr array (else None).
        before_first_write: called once, when the first computed block is ready and checked,
            before the array is created or replaced (``infscale run --overwrite`` replaces its old
            results there, so that a run that fails before its first block leaves them intact).

    Raises:
        TypeError: ``array`` is not a dask array. ValueError: unknown or irregular chunks, a
            non-block axis in several chunks, a bad ``block_axes``, overwrite with resume.
        StoreExistsError, StoreMismatchError, OSError: as ``to_zarr``.
    """
    if not isinstance(array, da.Array):
        raise TypeError(f"dask_to_zarr(): array must be a dask.array.Array; got {type(array).__name__}.")
    from ._version import __version__

    attributes = {"infscale_version": __version__, **dict(attributes or {})}
    if block_axes is None:
        block_axes = BLOCK_AXES.get(attributes.get("quantity"), 1 if array.ndim == 1 else 2)
    if block_axes not in (1, 2) or block_axes > array.ndim:
        raise ValueError(
            f"dask_to_zarr(): block_axes must be 1 or 2, at most array.ndim={array.ndim}; got {block_axes!r}."
        )
    if any(np.isnan(c) for chunks in array.chunks for c in chunks):
        raise ValueError(
            f"dask_to_zarr(): array has unknown chunk sizes {array.chunks}; call array.compute_chunk_sizes()."
        )
    if any(len(chunks) > 1 for chunks in array.chunks[block_axes:]):
        raise ValueError(
            f"dask_to_zarr(): only the first {block_axes} axes may have several chunks; got chunks "
            f"{array.chunks}. Rechunk the others whole, e.g. array.rechunk({{{block_axes}: -1}})."
        )
    client = _client(client)
    source = _DaskSource(array, client, block_axes, attributes)
    source.before_first_write = before_first_write  # read by the writer
    sequence = NestedLazyChunkSequence(source) if block_axes == 2 else LazyChunkSequence(source)
    return sequence.to_zarr(
        path_or_url,
        _AS_NUMPY,
        return_stored=return_stored,
        overwrite=overwrite,
        resume=resume,
        progress=progress,
        storage_options=storage_options,
    )


def _client(client: Any) -> Any:
    """The client given, else the current ``distributed`` client, else None (this process).

    Raises:
        TypeError: something that is not a ``distributed.Client``.
        ValueError: a closed client.
    """
    from distributed import Client, default_client

    if client is None:
        try:
            return default_client()
        except ValueError:  # no client in this process
            return None
    if not isinstance(client, Client):
        raise TypeError(
            f"dask_to_zarr(): client must be a distributed.Client, or None for the current client or "
            f"this process; got {client!r}."
        )
    if client.status in ("closed", "closing", "failed"):
        raise ValueError(f"dask_to_zarr(): the client is {client.status}; give an open distributed.Client.")
    return client


#: The converter for blocks that arrive as numpy arrays already.
_AS_NUMPY = SimpleNamespace(to_numpy=np.asarray)
