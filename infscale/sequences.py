"""Lazy chunk sequences: results computed chunk by chunk (one batch at a time), only when asked.

- ``compute(aggregator=...)`` streams the chunks into an aggregator (``infscale.aggregators``);
- ``to_zarr(path_or_url, converter, ...)`` writes them chunk by chunk into a zarr v3 array,
  recording each finished block so that an interrupted run can be resumed (``infscale.store``).

``LazyChunkSequence`` is flat (one chunk per batch, e.g. influence factors or
self-influences); ``NestedLazyChunkSequence`` is a grid of blocks (test batch × train batch,
e.g. the influence matrix). Both are normally made by the calculators. Framework-free.
"""

from __future__ import annotations

import itertools
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from .aggregators import (
    BlockAggregator,
    ListAggregator,
    NestedListAggregator,
    NestedSequenceAggregator,
    SequenceAggregator,
    _as_numpy,
)
from .store import _Layout, _offsets, _regular_chunk, _write_blocks

__all__ = ["ChunkSource", "BlockSource", "LazyChunkSequence", "NestedLazyChunkSequence"]


class _Source:
    """What every source of a lazy sequence has, besides its chunks."""

    #: trailing dimensions of every chunk after the first (batch) one
    feature_shape: tuple[int, ...] = ()
    #: numpy dtype of the stored chunks, or None if unknown
    dtype: np.dtype | None = None
    #: set by ``to_zarr`` while writing: called as ``observer(axis, index, *inputs)`` with the
    #: inputs of each batch as it is read ("row" for the test side, "col" for the training
    #: side), so that a resume can check that it reads the same data. Sources without
    #: loaders leave it unused.
    input_observer: Callable[..., None] | None = None

    def attributes(self) -> dict[str, Any]:
        """What the numbers are (stored as zarr attributes)."""
        return {}


class ChunkSource(_Source, ABC):
    """What a flat lazy sequence is made of: chunk sizes known up front and a way to
    compute chunks (all, or only some of them)."""

    @abstractmethod
    def chunk_sizes(self) -> list[int]:
        """Number of rows of each chunk, in order."""

    @abstractmethod
    def iter_chunks(self, todo: Callable[[int], bool] | None = None) -> Iterator[tuple[int, Any]]:
        """Yield (index, chunk) in order, computing only chunks with ``todo(index)`` true."""


class BlockSource(_Source, ABC):
    """What a nested lazy sequence is made of: a grid of blocks (row batch × column batch)."""

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
        verify: bool = True,
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
            storage_options, "chunks", source=self.source, verify=verify,
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
        verify: bool = True,
    ):
        """Write the blocks into a zarr v3 array, block by block, never holding the whole matrix.

        The array has shape (n_test, n_train[, *feature_shape]), chunks (test batch,
        train batch[, *feature_shape]) and the model's dtype; it sits at the root of the
        store, so ``zarr.open(path_or_url, mode="r")[:]`` reads it back. Its attributes
        record the method, hyperparameters, mode, sign convention, infscale version,
        n_test, n_train and block sizes.

        Each block is written, then marked complete (a key under ``_infscale_complete/``
        holding the block's checksum and digests of the test and training inputs it was
        computed from). Unwritten float values read back as NaN, never as a plausible 0.

        Guarantees (see docs/sequential.md):

        - ``overwrite=True`` only ever replaces a store infscale wrote (recognised by its
          attributes, with no other files in it), and only once the first new block has been
          computed: a run that fails before that leaves the old results intact.
        - A store infscale wrote that holds no finished block (a failed run's leftover) is
          reused without ``overwrite``.
        - ``resume=True`` checks that the store was made for the same computation (shape,
          blocks, dtype, method, settings, mode, the model's fingerprint when the model has
          one) and that every batch read has the same inputs as recorded; it recomputes the
          blocks whose marker or chunk is missing, and, with ``verify`` (default), those whose
          chunk cannot be read or does not match its checksum. A run killed mid-block leaves
          that block unmarked, so it is redone.
        - A block holding NaN or inf is never written: ``NonFiniteError``.

        Args:
            path_or_url: a local path, or a ``file://``, ``memory://``, ``s3://`` (any
                fsspec) URL.
            converter: turns a block into a numpy array (``TorchNumpyConverter()``).
            return_stored: return the zarr array (else None).
            overwrite: replace a store infscale wrote at the path (nothing else is deleted).
            resume: finish an interrupted run (a missing store is simply created).
            progress: show a tqdm bar over the blocks (rate, ETA).
            storage_options: fsspec options for URLs (credentials, ``endpoint_url``).
            verify: on resume, re-read the finished blocks and check their checksums (one
                read of what is stored); False checks only that their chunks exist.

        Raises:
            StoreExistsError: the path holds results and neither overwrite nor resume was
                given, or holds something infscale did not write (the data is left untouched).
            StoreMismatchError: resume against a store of another shape, block size, method,
                mode, hyperparameters or model, or with different input data.
            NonFiniteError: a computed block holds NaN or inf.
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
            progress, storage_options, "influence blocks", source=self.source, verify=verify,
        )  # fmt: skip
