"""PyTorch utilities for the calculators: converters, aggregators, and dask input arrays."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ..aggregators import (
    BlockAggregator,
    ExtremumResult,
    MaxAggregator,
    MinAggregator,
    SequenceAggregator,
    TopKAggregator,
    TopKResult,
)
from .dask_data import torch_dataset_to_dask_array

__all__ = [
    "TorchNumpyConverter",
    "torch_dataset_to_dask_array",
    "TorchCatAggregator",
    "NestedTorchCatAggregator",
    "TorchTopKAggregator",
    "TorchMinAggregator",
    "TorchMaxAggregator",
    "TopKAggregator",
    "TopKResult",
    "ExtremumResult",
]


class TorchNumpyConverter:
    """Converts between numpy arrays and torch tensors (on ``device``, default CPU).

    Used by the calculators to write tensors into zarr and to feed numpy chunks
    (from dask arrays) to a torch model; a dict of numpy chunks (the features of a
    model called as ``model(**x)``, see ``torch_dataset_to_dask_array``) becomes a
    dict of tensors.
    """

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else None

    def to_numpy(self, x: torch.Tensor) -> np.ndarray:
        """A tensor on any device → a numpy array on the host."""
        return x.detach().cpu().numpy()

    def from_numpy(self, x: np.ndarray | Mapping[str, np.ndarray]) -> torch.Tensor | dict[str, torch.Tensor]:
        """A numpy array → a tensor on ``device`` (dtype preserved); a mapping → a dict of them."""
        if isinstance(x, Mapping):
            return {k: self.from_numpy(v) for k, v in x.items()}
        t = torch.from_numpy(np.ascontiguousarray(x))
        return t.to(self.device) if self.device is not None else t

    def __repr__(self) -> str:
        return f"TorchNumpyConverter(device={self.device!r})"


class TorchCatAggregator(SequenceAggregator):
    """Concatenates the chunks of a flat lazy sequence along the first dimension
    (e.g. self-influences (n,) or factors (n, n_parameters))."""

    def __call__(self, chunks) -> torch.Tensor:
        parts = list(chunks)
        if not parts:
            raise ValueError("TorchCatAggregator: the sequence had no chunk.")
        return torch.cat(parts, dim=0)


class NestedTorchCatAggregator(BlockAggregator):
    """Assembles the blocks into one tensor (n_test, n_train[, *feature_shape]).

    Holds the whole result in memory; for large n use ``to_zarr`` or a reduction
    (``TorchTopKAggregator``) instead. Accepts blocks in any order.
    """

    def __init__(self) -> None:
        self._blocks: dict[tuple[int, int], torch.Tensor] = {}

    def reset(self) -> None:
        self._blocks = {}

    def add_block(self, row, col, row_offset, col_offset, block) -> None:
        self._blocks[(row, col)] = block

    def result(self) -> torch.Tensor:
        if not self._blocks:
            raise ValueError("NestedTorchCatAggregator: the sequence had no block.")
        rows: dict[int, dict[int, torch.Tensor]] = {}
        for (i, j), block in self._blocks.items():
            rows.setdefault(i, {})[j] = block
        return torch.cat(
            [torch.cat([r[j] for j in sorted(r)], dim=1) for _, r in sorted(rows.items())], dim=0
        )


class _TorchOps:
    """The array operations of the streaming reductions, in torch (results stay on the block's device)."""

    def _convert(self, block):
        return block.detach() if isinstance(block, torch.Tensor) else torch.as_tensor(block)

    def _column_indices(self, block, col_offset: int):
        idx = torch.arange(col_offset, col_offset + block.shape[1], device=block.device)
        return idx.expand(block.shape[0], -1)

    def _cat(self, a, b):
        return torch.cat([a, b], dim=1)

    def _topk(self, values, k: int, largest: bool):
        return torch.topk(values, k, dim=1, largest=largest, sorted=True)

    def _take(self, x, pos):
        return torch.gather(x, 1, pos)

    def _cat_rows(self, parts):
        return torch.cat(parts, dim=0)


class TorchTopKAggregator(_TorchOps, TopKAggregator):
    """Streaming top-k in torch: like ``infscale.aggregators.TopKAggregator`` (the k most
    helpful and k most harmful training points per test point, memory
    O(n_test · k + one block)), but the ``TopKResult`` holds torch tensors on the
    blocks' device."""


class TorchMaxAggregator(_TorchOps, MaxAggregator):
    """Running maximum per test point (values and training indices), as torch tensors."""


class TorchMinAggregator(_TorchOps, MinAggregator):
    """Running minimum per test point (values and training indices), as torch tensors."""
