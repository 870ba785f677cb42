"""The ways the torch core takes derivatives from a model, each written once.

- ``sample_loss``: the loss of one sample as a function of the parameters, for ``torch.func``
  (``vmap(grad(...))`` per-sample gradients, mixed derivatives for perturbation influences).
- ``loop_gradients``: per-sample gradients by plain autograd, one batch of one at a time: slow, but
  it works for every model that autograd can differentiate (data-dependent control flow, RNNs with
  default initial states), and it is the reference the batched paths are checked against.
- ``capture_layer_calls``: one batched forward pass with forward hooks on chosen modules,
  recording the input and output of every call, so that the gradients at the outputs can be
  taken in one backward pass (the batched per-sample gradients of the covered layers and the
  Kronecker factors of EK-FAC come from it).
- ``loss_total``: Σᵢ ℓᵢ of a batch's outputs, each ℓᵢ the loss of a batch of one;
  ``split_outputs``: a model's outputs as the tuple of their floating tensors (for ``jvp``/``vjp``)
  and the way back.

None of them touches the model: parameters are passed to ``torch.func.functional_call`` as detached
tensors, so their ``requires_grad`` and values stay as the user left them.

Inputs ``x`` are a tensor (passed as ``model(x)``) or a mapping of tensors (passed as
``model(**x)``), touched only through the batch helpers of ``infscale.torch.data``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.func import grad, vmap

from .data import add_batch_dim, batch_size_of, call_model, take_rows

__all__ = [
    "sample_loss",
    "vmap_gradients",
    "loop_gradients",
    "live_state",
    "capture_layer_calls",
    "loss_total",
    "split_outputs",
]

SampleLoss = Callable[[Mapping[str, Tensor], Mapping[str, Tensor], Any, Tensor], Tensor]


# ------------------------------------------------------------------------------ per sample
def sample_loss(model: nn.Module, loss) -> SampleLoss:
    """``f(params, fixed, x_i, y_i)``: ``loss`` of the model on the batch of one (x_i, y_i), with the
    model's state taken from ``fixed`` and ``params`` (the latter varying)."""

    def f(params: Mapping[str, Tensor], fixed: Mapping[str, Tensor], xi: Any, yi: Tensor) -> Tensor:
        out = call_model(model, add_batch_dim(xi), {**fixed, **params})
        return loss(out, yi.unsqueeze(0))

    return f


def vmap_gradients(
    model: nn.Module, loss, params: Mapping[str, Tensor], fixed: Mapping[str, Tensor], x: Any, y: Tensor
) -> dict[str, Tensor]:
    """Per-sample gradients of ``loss`` with respect to ``params`` by ``vmap(grad)``: name →
    (n, *shape). Raises whatever ``vmap`` raises on a model it cannot trace (data-dependent control
    flow, RNN default states); ``loop_gradients`` computes the same without it."""
    return vmap(grad(sample_loss(model, loss)), in_dims=(None, None, 0, 0))(params, fixed, x, y)


def loop_gradients(
    model: nn.Module, loss, params: Mapping[str, Tensor], fixed: Mapping[str, Tensor], x: Any, y: Tensor
) -> dict[str, Tensor]:
    """Per-sample gradients of ``loss`` with respect to ``params`` by plain autograd, one batch of
    one (rows i:i+1 of x, keeping their padding) at a time: name → (n, *shape)."""
    n = batch_size_of(x)
    out = {name: p.new_zeros(n, *p.shape) for name, p in params.items()}
    for i in range(n):
        state = live_state(params, fixed)
        with torch.enable_grad():
            value = loss(call_model(model, take_rows(x, slice(i, i + 1)), state), y[i : i + 1])
            names = [name for name in params if state[name].requires_grad]
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


# ------------------------------------------------------------------------------ batched
def capture_layer_calls(
    model: nn.Module,
    modules: Sequence[nn.Module],
    state: Mapping[str, Tensor],
    x: Any,
    expand_to: int | None = None,
    expanded: list[nn.Module] | None = None,
) -> tuple[Any, list[list[tuple[Tensor, Tensor]]]]:
    """Runs the model on x with ``state`` in grad mode, with forward hooks on ``modules``.

    Returns the model's output and, for each module (in the order given), the (input, output)
    of each of its calls in call order: an empty list for a module that was not called. The
    input is the call's first positional argument (or first keyword argument).

    With ``expand_to = n``, a call whose input and output both have leading dimension 1 (a
    position embedding of shape (1, T, d) broadcast over the batch) has its output replaced by
    ``output.expand(n, …)`` (and its input recorded as ``input.expand(n, …)``), so that the
    gradient at that output is per sample; where the output is only broadcast against the
    batch, this changes no value; such modules are appended to ``expanded`` if given. The hooks
    are removed afterwards, also on an error.
    """
    records: dict[int, list[tuple[Tensor, Tensor]]] = {id(m): [] for m in modules}

    def hook(module, args, kwargs, output):
        inp = args[0] if args else next(iter(kwargs.values()), None)
        if (
            expand_to is not None
            and expand_to > 1
            and isinstance(inp, Tensor)
            and isinstance(output, Tensor)
            and inp.ndim > 0
            and output.ndim > 0
            and inp.shape[0] == 1
            and output.shape[0] == 1
        ):
            output = output.expand(expand_to, *output.shape[1:])
            if expanded is not None:
                expanded.append(module)
            records[id(module)].append((inp.expand(expand_to, *inp.shape[1:]), output))
            return output
        records[id(module)].append((inp, output))
        return None

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in dict.fromkeys(modules)]
    try:
        with torch.enable_grad():
            outputs = call_model(model, x, state)
    finally:
        for h in handles:
            h.remove()
    return outputs, [records[id(m)] for m in modules]


def _flatten(outputs: Any) -> tuple[list, Callable[[list], Any]]:
    """(leaves, unflatten) of a model's outputs: torch's pytree, which knows tuples, lists, dicts
    and HuggingFace ``ModelOutput``; a plain dataclass it does not know is opened field by field
    (a shallow copy gets the new values, the user's object is left alone)."""
    leaves, spec = pytree.tree_flatten(outputs)
    if len(leaves) == 1 and leaves[0] is outputs and dataclasses.is_dataclass(outputs):
        names = [f.name for f in dataclasses.fields(outputs)]
        inner, rebuild = _flatten([getattr(outputs, name) for name in names])

        def unflatten_dataclass(new: list) -> Any:
            copy_ = copy.copy(outputs)
            for name, value in zip(names, rebuild(new)):
                object.__setattr__(copy_, name, value)
            return copy_

        return inner, unflatten_dataclass
    return leaves, lambda new: pytree.tree_unflatten(new, spec)


def loss_total(loss, outputs: Any, y: Tensor, n: int, use_vmap: bool = True) -> tuple[Tensor, bool]:
    """(Σᵢ ℓᵢ, whether vmap did it) for the outputs of a batch of n samples, each ℓᵢ the loss of the
    batch of one (row i of every output tensor whose leading dimension is n, and of y).

    By ``vmap`` over the samples where it works (and ``use_vmap``), else a loop over the samples;
    outputs that are not tensors (a HuggingFace cache object) are passed through as they are.
    """
    if isinstance(outputs, Tensor):  # the common case, without the pytree machinery
        if use_vmap:
            try:
                return vmap(lambda o, t: loss(o.unsqueeze(0), t.unsqueeze(0)))(outputs, y).sum(), True
            except Exception:  # noqa: BLE001 - a loss vmap cannot trace: the loop computes the same
                pass
        return sum(loss(outputs[s : s + 1], y[s : s + 1]) for s in range(n)) + outputs.new_zeros(()), False
    leaves, unflatten = _flatten(outputs)
    batched = [i for i, v in enumerate(leaves) if isinstance(v, Tensor) and v.ndim and v.shape[0] == n]

    def one(rows: list[Tensor], yi: Tensor) -> Tensor:
        new = list(leaves)
        for i, r in zip(batched, rows):
            new[i] = r.unsqueeze(0)
        return loss(unflatten(new), yi.unsqueeze(0))

    if use_vmap:
        try:
            return vmap(one)([leaves[i] for i in batched], y).sum(), True
        except Exception:  # noqa: BLE001 - a loss vmap cannot trace: the loop computes the same
            pass
    total = sum(one([leaves[i][s] for i in batched], y[s]) for s in range(n))
    return (total if isinstance(total, Tensor) else torch.zeros(())), False


def split_outputs(outputs: Any) -> tuple[tuple[Tensor, ...], Callable[[Sequence[Tensor]], Any]]:
    """A model's outputs as (their floating tensors, ``rebuild``): ``rebuild(tensors)`` puts other
    tensors of the same shapes in their places and keeps everything else (integer tensors, cache
    objects) as it was. For ``jvp``/``vjp``, which take tensors only."""
    leaves, unflatten = _flatten(outputs)
    where = [i for i, v in enumerate(leaves) if isinstance(v, Tensor) and v.is_floating_point()]

    def rebuild(tensors: Sequence[Tensor]) -> Any:
        new = list(leaves)
        for i, t in zip(where, tensors):
            new[i] = t
        return unflatten(new)

    return tuple(leaves[i] for i in where), rebuild
