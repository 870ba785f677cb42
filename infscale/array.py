"""Lazy chunk sequences, aggregators and zarr writing for chunked influence computation.

A *lazy chunk sequence* describes a result that is computed chunk by chunk (one
batch of a data loader at a time) without computing anything until asked:

- ``compute(aggregator=...)`` streams the chunks into an aggregator (concatenation,
  a running min/max, a streaming top-k, ...), and
- ``to_zarr(path_or_url, converter, ...)`` writes them chunk by chunk into a zarr v3
  array, recording each finished block so that an interrupted run can be resumed.

``LazyChunkSequence`` is flat (one chunk per batch, e.g. influence factors or
self-influences); ``NestedLazyChunkSequence`` is a grid of blocks (test batch ×
train batch, e.g. the influence matrix). Both are normally made by
``infscale.SequentialInfluenceCalculator``.

Aggregators:

- ``SequenceAggregator``: ``aggregator(chunk_generator)`` for flat sequences;
  ``ListAggregator`` collects the chunks in a list.
- ``NestedSequenceAggregator``: ``aggregator(generator_of_row_generators)`` for nested
  sequences; ``NestedListAggregator`` collects a list of rows of blocks.
- ``BlockAggregator``: a nested aggregator that accepts the blocks in *any* order
  (``add_block``), so that the calculator may pick the cheaper loop order. The
  reductions ``MinAggregator``, ``MaxAggregator`` and ``TopKAggregator`` are of this
  kind; their memory is O(n_test · k) plus one block, whatever n_train is.

Torch versions (``TorchCatAggregator``, ``NestedTorchCatAggregator``, and reductions
that keep tensors on their device) are in ``infscale.torch.util``.
"""

from __future__ import annotations

import itertools
import os
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "SequenceAggregator",
    "NestedSequenceAggregator",
    "BlockAggregator",
    "ListAggregator",
    "NestedListAggregator",
    "MinAggregator",
    "MaxAggregator",
    "TopKAggregator",
    "ExtremumResult",
    "TopKResult",
    "ChunkSource",
    "BlockSource",
    "LazyChunkSequence",
    "NestedLazyChunkSequence",
    "StoreExistsError",
    "StoreMismatchError",
    "COMPLETE_PREFIX",
    "open_zarr_store",
    "completed_blocks",
]

#: Key prefix (inside the zarr store) of the markers of completed blocks.
COMPLETE_PREFIX = "_infscale_complete/"


# ====================================================================== aggregators
class SequenceAggregator(ABC):
    """Turns a generator of chunks (a flat lazy sequence) into one result."""

    @abstractmethod
    def __call__(self, chunks: Iterable[Any]) -> Any:
        """Consume ``chunks`` (in order) and return the aggregate."""


class NestedSequenceAggregator(ABC):
    """Turns a generator of rows, each a generator of blocks, into one result.

    Rows are test batches, blocks within a row are train batches, in order.
    """

    @abstractmethod
    def __call__(self, nested_chunks: Iterable[Iterable[Any]]) -> Any:
        """Consume the rows of blocks (row by row, in order) and return the aggregate."""


class ListAggregator(SequenceAggregator):
    """Collects the chunks of a flat sequence in a list (the default)."""

    def __call__(self, chunks: Iterable[Any]) -> list:
        return list(chunks)


class BlockAggregator(NestedSequenceAggregator):
    """A nested aggregator that accepts the blocks in any order.

    A calculator feeds it with ``reset()``, then ``add_block(...)`` once per block
    (in whatever loop order is cheapest), then ``result()``. Calling it like any
    nested aggregator, ``aggregator(rows)``, does the same in row order.
    """

    @abstractmethod
    def reset(self) -> None:
        """Forget everything added so far."""

    @abstractmethod
    def add_block(self, row: int, col: int, row_offset: int, col_offset: int, block: Any) -> None:
        """Add block (row, col): test points ``row_offset + range(block.shape[0])`` against
        training points ``col_offset + range(block.shape[1])``."""

    @abstractmethod
    def result(self) -> Any:
        """The aggregate of all blocks added since ``reset``."""

    def __call__(self, nested_chunks: Iterable[Iterable[Any]]) -> Any:
        self.reset()
        row_offset = 0
        for i, row in enumerate(nested_chunks):
            col_offset, height = 0, 0
            for j, block in enumerate(row):
                self.add_block(i, j, row_offset, col_offset, block)
                col_offset += block.shape[1]
                height = block.shape[0]
            row_offset += height
        return self.result()


class NestedListAggregator(BlockAggregator):
    """Collects the blocks as a list of rows, each a list of blocks (the default)."""

    def __init__(self) -> None:
        self._blocks: dict[tuple[int, int], Any] = {}

    def reset(self) -> None:
        self._blocks = {}

    def add_block(self, row, col, row_offset, col_offset, block) -> None:
        self._blocks[(row, col)] = block

    def result(self) -> list[list]:
        rows: dict[int, dict[int, Any]] = {}
        for (i, j), block in self._blocks.items():
            rows.setdefault(i, {})[j] = block
        return [[rows[i][j] for j in sorted(rows[i])] for i in sorted(rows)]


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, on any device
        return x.detach().cpu().numpy()
    return np.asarray(x)


@dataclass
class ExtremumResult:
    """Per test point: the extreme influence ``values`` (n_test,) and the training
    ``indices`` (n_test,) where they occur."""

    values: Any
    indices: Any


@dataclass
class TopKResult:
    """The k most helpful and k most harmful training points of every test point.

    With the sign convention of infscale (positive = up-weighting the training point
    lowers the test loss):

    - ``helpful_indices`` / ``helpful_values``, shape (n_test, k): the k largest
      influences, largest first;
    - ``harmful_indices`` / ``harmful_values``, shape (n_test, k): the k smallest
      (most negative) influences, smallest first.

    ``k`` is min(requested k, n_train). If fewer than k training points help a test
    point, its helpful list continues with the least harmful ones (and vice versa).
    Indices are positions in the training loader's order.
    """

    k: int
    helpful_values: Any
    helpful_indices: Any
    harmful_values: Any
    harmful_indices: Any


def _check_2d(block: Any, owner: str) -> None:
    if len(block.shape) != 2:
        raise ValueError(
            f"{owner} reduces blocks of shape (test batch, train batch) (mode 'up'); "
            f"got a block of shape {tuple(block.shape)}."
        )


class _RowReduction(BlockAggregator):
    """Shared machinery of the streaming reductions: state per row block, numpy ops.

    Subclasses for other array libraries override the ``_ops`` helpers.
    """

    def __init__(self) -> None:
        self._state: dict[int, Any] = {}

    def reset(self) -> None:
        self._state = {}

    # array operations (numpy); torch versions override these
    def _convert(self, block: Any):
        return _as_numpy(block)

    def _column_indices(self, block, col_offset: int):
        return np.broadcast_to(np.arange(col_offset, col_offset + block.shape[1]), block.shape)

    def _cat(self, a, b):
        return np.concatenate([a, b], axis=1)

    def _topk(self, values, k: int, largest: bool):
        """(values, positions) of the k largest (or smallest) per row, sorted."""
        keys = -values if largest else values
        if k < values.shape[1]:
            part = np.argpartition(keys, k - 1, axis=1)[:, :k]
        else:
            part = np.broadcast_to(np.arange(values.shape[1]), values.shape)
        part_keys = np.take_along_axis(keys, part, axis=1)
        order = np.argsort(part_keys, axis=1, kind="stable")
        pos = np.take_along_axis(part, order, axis=1)
        return np.take_along_axis(values, pos, axis=1), pos

    def _take(self, x, pos):
        return np.take_along_axis(x, pos, axis=1)

    def _cat_rows(self, parts: list):
        return np.concatenate(parts, axis=0)


class _ExtremumAggregator(_RowReduction):
    _largest = True

    def add_block(self, row, col, row_offset, col_offset, block) -> None:
        _check_2d(block, type(self).__name__)
        block = self._convert(block)
        if block.shape[1] == 0:
            return
        vals, pos = self._topk(block, 1, self._largest)
        idx = self._take(self._column_indices(block, col_offset), pos)
        if row in self._state:
            old_v, old_i = self._state[row]
            vals, pos = self._topk(self._cat(old_v, vals), 1, self._largest)
            idx = self._take(self._cat(old_i, idx), pos)
        self._state[row] = (vals, idx)

    def result(self) -> ExtremumResult:
        rows = sorted(self._state)
        if not rows:
            raise ValueError(f"{type(self).__name__}: no block was added.")
        vals = self._cat_rows([self._state[i][0] for i in rows])[:, 0]
        idx = self._cat_rows([self._state[i][1] for i in rows])[:, 0]
        return ExtremumResult(values=vals, indices=idx)


class MaxAggregator(_ExtremumAggregator):
    """Running maximum per test point: the most helpful training point's influence and
    index, ``ExtremumResult(values (n_test,), indices (n_test,))``. Memory O(n_test)."""

    _largest = True


class MinAggregator(_ExtremumAggregator):
    """Running minimum per test point: the most harmful training point's influence and
    index, ``ExtremumResult(values (n_test,), indices (n_test,))``. Memory O(n_test)."""

    _largest = False


class TopKAggregator(_RowReduction):
    """Streaming top-k: the k most helpful and k most harmful training points per test point.

    Keeps only (n_test, k) values and indices per side plus the block being merged,
    so memory is O(n_test · k + one block) whatever n_train is. Use it as
    ``lazy.compute(aggregator=TopKAggregator(k))``; the result is a ``TopKResult``
    of numpy arrays (``infscale.torch.util.TorchTopKAggregator`` keeps torch tensors
    on their device). Only mode ``"up"`` blocks (2-D) are accepted.

    Args:
        k: how many training points to keep per test point and side (≥ 1).
    """

    def __init__(self, k: int) -> None:
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"TopKAggregator: k must be an integer ≥ 1; got {k!r}.")
        self.k = int(k)

    def _merge(self, old, vals, idx, largest: bool):
        if old is not None:
            vals, idx = self._cat(old[0], vals), self._cat(old[1], idx)
        top, pos = self._topk(vals, min(self.k, vals.shape[1]), largest)
        return top, self._take(idx, pos)

    def add_block(self, row, col, row_offset, col_offset, block) -> None:
        _check_2d(block, type(self).__name__)
        block = self._convert(block)
        if block.shape[1] == 0:
            return
        idx = self._column_indices(block, col_offset)
        old = self._state.get(row)
        hi = self._merge(old[0] if old else None, block, idx, largest=True)
        lo = self._merge(old[1] if old else None, block, idx, largest=False)
        self._state[row] = (hi, lo)

    def result(self) -> TopKResult:
        rows = sorted(self._state)
        if not rows:
            raise ValueError(f"{type(self).__name__}: no block was added.")
        hv = self._cat_rows([self._state[i][0][0] for i in rows])
        hi = self._cat_rows([self._state[i][0][1] for i in rows])
        lv = self._cat_rows([self._state[i][1][0] for i in rows])
        li = self._cat_rows([self._state[i][1][1] for i in rows])
        return TopKResult(
            k=hv.shape[1], helpful_values=hv, helpful_indices=hi, harmful_values=lv, harmful_indices=li
        )


# ====================================================================== sources
class ChunkSource(ABC):
    """What a flat lazy sequence is made of: chunk sizes known up front and a way to
    compute chunks (all, or only some of them)."""

    #: trailing dimensions of every chunk after the first (batch) one
    feature_shape: tuple[int, ...] = ()
    #: numpy dtype of the stored chunks, or None if unknown
    dtype: np.dtype | None = None

    @abstractmethod
    def chunk_sizes(self) -> list[int]:
        """Number of rows of each chunk, in order."""

    @abstractmethod
    def iter_chunks(self, todo: Callable[[int], bool] | None = None) -> Iterator[tuple[int, Any]]:
        """Yield (index, chunk) in order, computing only chunks with ``todo(index)`` true."""

    def attributes(self) -> dict[str, Any]:
        """What the numbers are (stored as zarr attributes)."""
        return {}


class BlockSource(ABC):
    """What a nested lazy sequence is made of: a grid of blocks (row batch × column batch)."""

    feature_shape: tuple[int, ...] = ()
    dtype: np.dtype | None = None

    @abstractmethod
    def row_sizes(self) -> list[int]:
        """Number of rows (test points) of each block row."""

    @abstractmethod
    def col_sizes(self) -> list[int]:
        """Number of columns (training points) of each block column."""

    @abstractmethod
    def iter_blocks(
        self, todo: Callable[[int, int], bool] | None = None, row_major: bool = False
    ) -> Iterator[tuple[int, int, Any]]:
        """Yield (row, col, block) for every block with ``todo(row, col)`` true, in the
        cheapest loop order, or row by row if ``row_major``."""

    def attributes(self) -> dict[str, Any]:
        return {}


class _GeneratorChunkSource(ChunkSource):
    """A flat source from a generator factory. Sizes need one pass over the chunks."""

    def __init__(self, factory: Callable[[], Iterable[Any]]):
        self._factory = factory
        self._sizes: list[int] | None = None

    def chunk_sizes(self) -> list[int]:
        if self._sizes is None:
            sizes = []
            for chunk in self._factory():
                sizes.append(int(chunk.shape[0]))
                self.feature_shape = tuple(chunk.shape[1:])
                self.dtype = _as_numpy(chunk[:0]).dtype
            self._sizes = sizes
        return self._sizes

    def iter_chunks(self, todo=None):
        for i, chunk in enumerate(self._factory()):
            if todo is None or todo(i):
                yield i, chunk


class _GeneratorBlockSource(BlockSource):
    """A nested source from a factory of row generators. Sizes need one pass."""

    def __init__(self, factory: Callable[[], Iterable[Iterable[Any]]]):
        self._factory = factory
        self._sizes: tuple[list[int], list[int]] | None = None

    def _scan(self):
        if self._sizes is None:
            rows, cols = [], []
            for i, row in enumerate(self._factory()):
                height = 0
                for block in row:
                    if i == 0:
                        cols.append(int(block.shape[1]))
                    height = int(block.shape[0])
                    self.feature_shape = tuple(block.shape[2:])
                    self.dtype = _as_numpy(block[:0]).dtype
                rows.append(height)
            self._sizes = (rows, cols)
        return self._sizes

    def row_sizes(self):
        return self._scan()[0]

    def col_sizes(self):
        return self._scan()[1]

    def iter_blocks(self, todo=None, row_major=False):
        for i, row in enumerate(self._factory()):
            for j, block in enumerate(row):
                if todo is None or todo(i, j):
                    yield i, j, block


# ====================================================================== zarr helpers
class StoreExistsError(FileExistsError):
    """The target of ``to_zarr`` already holds data and neither overwrite nor resume was asked."""


class StoreMismatchError(ValueError):
    """``resume=True`` against a store written for another computation."""


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


def _store_is_empty(store, where: str) -> bool:
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
        empty = _store_is_empty(store, where)
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


# ====================================================================== sequences
def _offsets(sizes: list[int]) -> list[int]:
    out, total = [], 0
    for s in sizes:
        out.append(total)
        total += s
    return out


class LazyChunkSequence:
    """A flat sequence of chunks (one per batch), computed only on ``compute`` or ``to_zarr``.

    Args:
        source: a ``ChunkSource`` (what the calculators pass), or a zero-argument
            callable returning a fresh iterable of chunks (its sizes then need one
            extra pass before writing to zarr).
    """

    def __init__(self, source: ChunkSource | Callable[[], Iterable[Any]]):
        if isinstance(source, ChunkSource):
            self.source = source
        elif callable(source):
            self.source = _GeneratorChunkSource(source)
        else:
            raise TypeError(
                f"source must be a ChunkSource or a generator factory; got {type(source).__name__}."
            )

    def __iter__(self) -> Iterator[Any]:
        """The chunks in order (computed now)."""
        for _, chunk in self.source.iter_chunks():
            yield chunk

    def chunk_sizes(self) -> list[int]:
        """Rows of each chunk (from the loader, without computing)."""
        return self.source.chunk_sizes()

    def __len__(self) -> int:
        return len(self.chunk_sizes())

    def compute(self, aggregator: SequenceAggregator | None = None, progress: bool = False) -> Any:
        """Compute every chunk and hand them, in order, to ``aggregator`` (default
        ``ListAggregator``: a list of chunks; ``TorchCatAggregator``: one tensor)."""
        from tqdm.auto import tqdm

        aggregator = ListAggregator() if aggregator is None else aggregator
        if not callable(aggregator):
            raise TypeError(f"aggregator must be a SequenceAggregator; got {type(aggregator).__name__}.")
        total = len(self.chunk_sizes()) if progress else None
        chunks = iter(self)
        return aggregator(tqdm(chunks, total=total, unit="chunk", disable=not progress))

    def to_zarr(
        self,
        path_or_url: str | os.PathLike,
        converter: Any,
        return_stored: bool = False,
        overwrite: bool = False,
        resume: bool = False,
        progress: bool = True,
        storage_options: dict | None = None,
    ):
        """Write the chunks into a zarr v3 array of shape (n, *feature_shape), one chunk per batch.

        See ``NestedLazyChunkSequence.to_zarr`` for the arguments, resuming and errors.
        Returns the zarr array if ``return_stored``, else None.
        """
        sizes = self.chunk_sizes()
        chunk = _regular_chunk(sizes, "the loader")
        feature = tuple(self.source.feature_shape)
        dtype = np.dtype(self.source.dtype) if self.source.dtype is not None else np.dtype("float32")
        attributes = dict(self.source.attributes())
        attributes.update({"n": sum(sizes), "block_size": chunk})
        layout = _Layout((sum(sizes), *feature), (chunk, *feature), dtype, attributes)
        offsets = _offsets(sizes)

        def blocks(todo):
            for i, block in self.source.iter_chunks(todo):
                yield (i,), (slice(offsets[i], offsets[i] + sizes[i]),), block

        return _write_blocks(
            path_or_url, layout, blocks, len(sizes), converter, return_stored, overwrite, resume, progress,
            storage_options, "chunks",
        )  # fmt: skip


class NestedLazyChunkSequence:
    """A grid of blocks (test batch × train batch), computed only on ``compute`` or ``to_zarr``.

    Args:
        source: a ``BlockSource`` (what the calculators pass), or a zero-argument
            callable returning a fresh iterable of rows, each an iterable of blocks.
    """

    def __init__(self, source: BlockSource | Callable[[], Iterable[Iterable[Any]]]):
        if isinstance(source, BlockSource):
            self.source = source
        elif callable(source):
            self.source = _GeneratorBlockSource(source)
        else:
            raise TypeError(
                f"source must be a BlockSource or a generator factory; got {type(source).__name__}."
            )

    def __iter__(self) -> Iterator[Iterator[Any]]:
        """Rows of blocks, in order (computed as they are consumed; consume each row
        before asking for the next)."""
        blocks = self.source.iter_blocks(row_major=True)
        for _, group in itertools.groupby(blocks, key=lambda item: item[0]):
            yield (block for _, _, block in group)

    def shape(self) -> tuple[int, ...]:
        """(n_test, n_train, *feature_shape), from the loaders, without computing."""
        return (sum(self.source.row_sizes()), sum(self.source.col_sizes()), *self.source.feature_shape)

    def compute(self, aggregator: NestedSequenceAggregator | None = None, progress: bool = False) -> Any:
        """Compute every block and aggregate.

        With a ``BlockAggregator`` (``NestedTorchCatAggregator``, ``TopKAggregator``,
        ``MinAggregator``, ``MaxAggregator``, ``NestedListAggregator`` — the default) the
        blocks go in the cheapest loop order; any other ``NestedSequenceAggregator``
        gets the rows in order.
        """
        from tqdm.auto import tqdm

        aggregator = NestedListAggregator() if aggregator is None else aggregator
        if not callable(aggregator):
            raise TypeError(
                f"aggregator must be a NestedSequenceAggregator; got {type(aggregator).__name__}."
            )
        if not isinstance(aggregator, BlockAggregator):
            return aggregator(iter(self))
        rows, cols = self.source.row_sizes(), self.source.col_sizes()
        row_off, col_off = _offsets(rows), _offsets(cols)
        aggregator.reset()
        total = len(rows) * len(cols)
        with tqdm(total=total, unit="block", disable=not progress) as bar:
            for i, j, block in self.source.iter_blocks():
                aggregator.add_block(i, j, row_off[i], col_off[j], block)
                bar.update(1)
        return aggregator.result()

    def to_zarr(
        self,
        path_or_url: str | os.PathLike,
        converter: Any,
        return_stored: bool = False,
        overwrite: bool = False,
        resume: bool = False,
        progress: bool = True,
        storage_options: dict | None = None,
    ):
        """Write the blocks into a zarr v3 array, block by block, never holding the whole matrix.

        The array has shape (n_test, n_train[, *feature_shape]), chunks (test batch,
        train batch[, *feature_shape]) and the model's dtype; it sits at the root of the
        store, so ``zarr.open(path_or_url, mode="r")[:]`` reads it back. Its attributes
        record the method, hyperparameters, mode, sign convention, infscale version,
        n_test, n_train and block sizes.

        Each block is written, then marked complete (a key under
        ``_infscale_complete/`` in the store). ``resume=True`` checks that the store
        was made for the same computation and computes only the unmarked blocks; a run
        killed mid-block leaves that block unmarked, so it is redone.

        Args:
            path_or_url: a local path, or a ``file://``, ``memory://``, ``s3://`` (any
                fsspec) URL.
            converter: turns a block into a numpy array (``TorchNumpyConverter()``).
            return_stored: return the zarr array (else None).
            overwrite: replace the zarr store at the path (other data is never deleted).
            resume: finish an interrupted run (a missing store is simply created).
            progress: show a tqdm bar over the blocks (rate, ETA).
            storage_options: fsspec options for URLs (credentials, ``endpoint_url``).

        Raises:
            StoreExistsError: the path holds data and neither overwrite nor resume was
                given (the data is left untouched).
            StoreMismatchError: resume against a store of another shape, block size,
                method, mode or hyperparameters.
            OSError: the path cannot be written.
            ValueError: batches of unequal size (other than the last one).
        """
        rows, cols = self.source.row_sizes(), self.source.col_sizes()
        bt = _regular_chunk(rows, "the test loader")
        br = _regular_chunk(cols, "the train loader")
        feature = tuple(self.source.feature_shape)
        n_test, n_train = sum(rows), sum(cols)
        dtype = np.dtype(self.source.dtype) if self.source.dtype is not None else np.dtype("float32")
        attributes = dict(self.source.attributes())
        attributes.update(
            {"n_test": n_test, "n_train": n_train, "test_block_size": bt, "train_block_size": br}
        )
        layout = _Layout((n_test, n_train, *feature), (bt, br, *feature), dtype, attributes)
        row_off, col_off = _offsets(rows), _offsets(cols)

        def blocks(todo):
            for i, j, block in self.source.iter_blocks(todo):
                region = (slice(row_off[i], row_off[i] + rows[i]), slice(col_off[j], col_off[j] + cols[j]))
                yield (i, j), region, block

        return _write_blocks(
            path_or_url, layout, blocks, len(rows) * len(cols), converter, return_stored, overwrite, resume,
            progress, storage_options, "influence blocks",
        )  # fmt: skip
