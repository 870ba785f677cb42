"""Factories for ``infscale run`` in the tests of ``infscale.app``: a linear regression in float64
(y ≈ w·x + b, three features), 40 training and 20 test points."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

N_TRAIN, N_TEST = 40, 20


def tensors() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + N_TEST, 3, generator=g, dtype=torch.float64)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    y = (x @ w + 0.3 * torch.randn(N_TRAIN + N_TEST, generator=g, dtype=torch.float64)).unsqueeze(1)
    return x, y


def regression() -> nn.Linear:
    m = nn.Linear(3, 1).double()
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[0.8, -1.5, 0.2]], dtype=torch.float64))
        m.bias.fill_(0.1)
    return m


def mse_model():
    """(model, torch.nn.functional.mse_loss): the loss EK-FAC recognizes as mean squared error."""
    return regression(), F.mse_loss


def data():
    x, y = tensors()
    return TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), TensorDataset(x[N_TRAIN:], y[N_TRAIN:])
