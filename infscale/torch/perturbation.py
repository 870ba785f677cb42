"""Perturbation influences: derivatives of influences with respect to the training inputs.

``∂/∂x_j [f_i · ∇_θ ℓ(x_j, y_j)]`` for factors f_i = (H + λI)⁻¹ ∇ℓ(z_test,i), from the one per-sample
loss closure of ``infscale.torch.capture``; the p × d mixed-derivative matrix is never formed. They are
second derivatives of the model: computed within ``kernels.derivative_kernels`` (MATH attention).
Samples are batched by ``vmap``; for a model it cannot trace (an RNN with default initial states) they
are taken one at a time, with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import grad, jacfwd, jacrev, vmap

from .capture import sample_loss
from .kernels import derivative_kernels
from .layout import LossFunction, ParameterLayout
from .memory import default_chunk_size

__all__ = ["perturbation_influences", "self_perturbation_influences"]


def _per_sample(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``fn`` (of one sample's tensors) over samples along dim 0 of every argument: by vmap, or a
    loop over the samples where vmap cannot trace the model."""
    batched = vmap(fn, in_dims=0)

    def run(*args: Tensor) -> Tensor:
        try:
            return batched(*args)
        except Exception as error:  # noqa: BLE001 - vmap cannot trace the model: a loop can
            warnings.warn(
                "infscale: perturbation influences are computed one sample at a time (slow): vmap cannot "
                f"trace the model ({str(error).splitlines()[0][:200]})",
                stacklevel=3,
            )
            return torch.stack([fn(*(a[i] for a in args)) for i in range(args[0].shape[0])])

    return run


def perturbation_influences(
    layout: ParameterLayout,
    loss: LossFunction,
    factors: Tensor,
    x: Tensor,
    y: Tensor,
    chunk_size: int | None = None,
) -> Tensor:
    """∂/∂x_j [factors_i · ∇_θ ℓ(x_j, y_j)] for every factor row i and sample j.

    Returns (n_factors, n, *x.shape[1:]). Uses reverse mode over the factors when
    there are fewer factors than input features, forward mode over the input
    features otherwise; never forms the p × d mixed-derivative matrix. Samples are taken
    ``chunk_size`` at a time (default: ``memory.default_chunk_size`` for the derivatives held).
    """
    params = layout.parameters()
    fixed = layout.fixed_state()
    f = sample_loss(layout.model, loss)
    n_features = max(1, x[0].numel()) if x.shape[0] else 1

    def projected_grad(xi: Tensor, yi: Tensor) -> Tensor:
        return factors @ layout.flatten(grad(f)(params, fixed, xi, yi))

    if factors.shape[0] <= n_features:
        per_sample = _per_sample(jacrev(projected_grad))
    elif y.is_floating_point():
        # forward mode with a floating target: give it a tangent too (and drop its
        # columns), as some losses' forward-over-reverse formulas fail without one
        per_sample = _per_sample(lambda xi, yi: jacfwd(projected_grad, argnums=(0, 1))(xi, yi)[0])
    else:
        per_sample = _per_sample(jacfwd(projected_grad))
    chunk = chunk_size or default_chunk_size(
        layout.n_parameters, x.element_size(), factor=max(1, min(factors.shape[0], n_features))
    )
    with derivative_kernels(layout.model, 2):
        parts = [per_sample(x[s : s + chunk], y[s : s + chunk]) for s in range(0, x.shape[0], chunk)]
    if not parts:
        return x.new_zeros((factors.shape[0], 0, *x.shape[1:]))
    return torch.cat(parts).transpose(0, 1)


def self_perturbation_influences(
    layout: ParameterLayout,
    loss: LossFunction,
    factors: Tensor,
    x: Tensor,
    y: Tensor,
    chunk_size: int | None = None,
) -> Tensor:
    """∂/∂x_i [factors_i · ∇_θ ℓ(x_i, y_i)] with factors_i held fixed: (n, *x.shape[1:])."""
    params = layout.parameters()
    fixed = layout.fixed_state()
    f = sample_loss(layout.model, loss)

    def projected_grad(xi: Tensor, yi: Tensor, fi: Tensor) -> Tensor:
        return fi @ layout.flatten(grad(f)(params, fixed, xi, yi))

    per_sample = _per_sample(grad(projected_grad))
    chunk = chunk_size or default_chunk_size(layout.n_parameters, x.element_size(), factor=2)
    with derivative_kernels(layout.model, 2):
        parts = [
            per_sample(x[s : s + chunk], y[s : s + chunk], factors[s : s + chunk])
            for s in range(0, x.shape[0], chunk)
        ]
    return torch.cat(parts) if parts else x.new_zeros(x.shape)
