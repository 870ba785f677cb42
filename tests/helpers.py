"""Small helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

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


def flat_forward(model: nn.Module):
    """The model as a function of one flat parameter vector: returns ((θ, x) ↦ model_θ(x), θ₀), θ the
    concatenation of all parameters in ``named_parameters`` order and θ₀ their current values."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def forward(theta: Tensor, x: Tensor) -> Tensor:
        parts = torch.split(theta, [s.numel() for s in shapes])
        return functional_call(model, {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}, (x,))

    return forward, theta0
