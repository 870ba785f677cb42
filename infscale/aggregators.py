"""Aggregators: what a lazy chunk sequence's ``compute(aggregator=...)`` reduces its chunks with.

- ``SequenceAggregator``: ``aggregator(chunk_generator)`` for flat sequences;
  ``ListAggregator`` collects the chunks in a list.
- ``NestedSequenceAggregator``: ``aggregator(generator_of_row_generators)`` for nested
  sequences; ``NestedListAggregator`` collects a list of rows of blocks.
- ``BlockAggregator``: a nested aggregator that accepts the blocks in *any* order
  (``add_block``), so that the calculator may pick the cheaper loop order. The
  reductions ``MinAggregator``, ``MaxAggregator`` and ``TopKAggregator`` are of this
  kind; their memory is O(n_test · k) plus one block, whatever n_train is.

Torch versions (``TorchCatAggregator``, ``NestedTorchCatAggregator``, and reductions
that keep tensors on their device) are in ``infscale.torch.util``. Framework-free.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
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
]


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
