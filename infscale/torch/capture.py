"""The two ways the torch core takes derivatives from a model, each written once.

- ``sample_loss``: the loss of one sample as a function of the parameters, for ``torch.func``
  (``vmap(grad(...))`` per-sample gradients, mixed derivatives for perturbation influences).
- ``capture_layer_calls``: one batched forward pass with forward hooks on chosen modules,
  recording the input and output of every call, so that the gradients at the outputs can be
  taken in one backward pass (the batched per-sample gradients of ``nn.Linear`` layers and the
  Kronecker factors of EK-FAC come from it).

Neither touches the model: parameters are passed to ``torch.func.functional_call`` as detached
tensors, so their ``requires_grad`` and values stay as the user left them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from .data import add_batch_dim, batch_size_of, call_model, take_rows

__all__ = ["sample_loss", "vmap_gradients", "loop_gradients", "live_state", "capture_layer_calls"]

SampleLoss = Callable[[Mapping[str, Tensor], Mapping[str, Tensor], Tensor, Tensor], Tensor]


def sample_loss(model: nn.Module, loss) -> SampleLoss:
    """``f(params, fixed, x_i, y_i)``: ``loss`` of the model on the batch of one (x_i, y_i), with the
    model's state taken from ``fixed`` and ``params`` (the latter varying)."""

    def f(params: Mapping[str, Tensor], fixed: Mapping[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = call_model(model, add_batch_dim(xi), {**fixed, **params})
        return loss(out, yi.unsqueeze(0))

    return f


def vmap_gradients(
    model: nn.Module, loss, params: Mapping[str, Tensor], fixed: Mapping[str, Tensor], x: Tensor, y: Tensor
) -> dict[str, Tensor]:
    """Per-sample gradients of ``loss`` with respect to ``params`` by ``vmap(grad)``: name →
    (n, *shape)."""
    return vmap(grad(sample_loss(model, loss)), in_dims=(None, None, 0, 0))(params, fixed, x, y)


def loop_gradients(
    model: nn.Module, loss, params: Mapping[str, Tensor], fixed: Mapping[str, Tensor], x, y: Tensor
) -> dict[str, Tensor]:
    """The same as ``vmap_gradients`` by plain autograd, one batch of one (rows i:i+1 of x, with their
    padding) at a time: for models ``vmap`` cannot trace (data-dependent control flow)."""
    out = {name: p.new_zeros(batch_size_of(x), *p.shape) for name, p in params.items()}
    for i in range(batch_size_of(x)):
        state = live_state(params, fixed)
        names = [name for name in params if state[name].requires_grad]
        with torch.enable_grad():
            value = loss(call_model(model, take_rows(x, i), state), y[i : i + 1])
            grads = torch.autograd.grad(value, [state[name] for name in names], allow_unused=True)
        for name, g in zip(names, grads):
            if g is not None:
                out[name][i] = g
    return out


def live_state(params: Mapping[str, Tensor], fixed: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A state for ``functional_call`` whose floating ``params`` are fresh leaves that require
    grad (so that layer outputs carry a graph), the rest as given; the originals are untouched."""
    live = {n: p.detach().requires_grad_(p.is_floating_point()) for n, p in params.items()}
    return {**fixed, **live}


def capture_layer_calls(
    model: nn.Module, modules: Sequence[nn.Module], state: Mapping[str, Tensor], x: Tensor
) -> tuple[Tensor, list[list[tuple[Tensor, Tensor]]]]:
    """Runs ``functional_call(model, state, (x,))`` in grad mode with forward hooks on ``modules``.

    Returns the model's output and, for each module (in the order given), the (input, output)
    of each of its calls in call order: an empty list for a module that was not called. The
    hooks are removed afterwards, also on an error.
    """
    records: dict[int, list[tuple[Tensor, Tensor]]] = {id(m): [] for m in modules}

    def hook(module, inputs, output):
        records[id(module)].append((inputs[0], output))

    handles = [m.register_forward_hook(hook) for m in dict.fromkeys(modules)]
    try:
        with torch.enable_grad():
            outputs = call_model(model, x, state)
    finally:
        for h in handles:
            h.remove()
    return outputs, [records[id(m)] for m in modules]
