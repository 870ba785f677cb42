"""PyTorch utilities for the calculators: converters, aggregators, and dask input arrays."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["TorchNumpyConverter"]


class TorchNumpyConverter:
    """Converts between numpy arrays and torch tensors (on ``device``, default CPU).

    Used by the calculators to write tensors into zarr and to feed numpy chunks
    (from dask arrays) to a torch model.
    """

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else None

    def to_numpy(self, x: torch.Tensor) -> np.ndarray:
        """A tensor on any device → a numpy array on the host."""
        return x.detach().cpu().numpy()

    def from_numpy(self, x: np.ndarray) -> torch.Tensor:
        """A numpy array → a tensor on ``device`` (dtype preserved)."""
        t = torch.from_numpy(np.ascontiguousarray(x))
        return t.to(self.device) if self.device is not None else t

    def __repr__(self) -> str:
        return f"TorchNumpyConverter(device={self.device!r})"
