"""Small helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

CE = nn.functional.cross_entropy


def loader(x: Tensor, y: Tensor, sizes: list[int]) -> list[tuple[Tensor, Tensor]]:
    """Consecutive batches (x, y) of the given sizes."""
    out, s = [], 0
    for b in sizes:
        out.append((x[s : s + b], y[s : s + b]))
        s += b
    return out


def rel(a: Tensor, b: Tensor) -> float:
    """‖a − b‖ / ‖b‖ (Frobenius)."""
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()
