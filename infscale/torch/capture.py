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
``model(**x)``), touched only through the batch helpers below (``batch_size_of``, ``take_rows``,
``call_with_state``, ``input_signature``): minimal versions of those of ``infscale.torch.data``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

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


# ------------------------------------------------------------------------------ batches
# Minimal versions of the batch helpers of ``infscale.torch.data`` (x: a tensor or a mapping of
# tensors with the samples along dim 0), not exported: the torch core's own modules use them.


def batch_size_of(x: Any) -> int:
    """The number of samples in x: dim 0 of the tensor, or of the mapping's first tensor."""
    if isinstance(x, Mapping):
        return int(next(iter(x.values())).shape[0]) if x else 0
    return int(x.shape[0])


def take_rows(x: Any, index) -> Any:
    """Rows ``index`` (a slice or index tensor) of x, or of each tensor of the mapping."""
    if isinstance(x, Mapping):
        return {k: v[index] for k, v in x.items()}
    return x[index]


def call_with_state(model: nn.Module, state: Mapping[str, Tensor], x: Any) -> Any:
    """The model's outputs on x with its state (parameters and buffers) taken from ``state``."""
    if isinstance(x, Mapping):
        return functional_call(model, dict(state), (), dict(x))
    return functional_call(model, dict(state), (x,))


def input_signature(x: Any) -> tuple:
    """What the batched path's verdicts are keyed by: per tensor, its feature shape, dtype and device."""
    if isinstance(x, Mapping):
        return tuple((k, tuple(v.shape[1:]), v.dtype, v.device) for k, v in x.items())
    return (tuple(x.shape[1:]), x.dtype, x.device)


def _unsqueezed(xi: Any) -> Any:
    if isinstance(xi, Mapping):
        return {k: v.unsqueeze(0) for k, v in xi.items()}
    return xi.unsqueeze(0)


# ------------------------------------------------------------------------------ per sample
def sample_loss(model: nn.Module, loss) -> SampleLoss:
    """``f(params, fixed, x_i, y_i)``: ``loss`` of the model on the batch of one (x_i, y_i), with the
    model's state taken from ``fixed`` and ``params`` (the latter varying)."""

    def f(params: Mapping[str, Tensor], fixed: Mapping[str, Tensor], xi: Any, yi: Tensor) -> Tensor:
        out = call_with_state(model, {**fixed, **params}, _unsqueezed(xi))
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
            value = loss(call_with_state(model, state, take_rows(x, slice(i, i + 1))), y[i : i + 1])
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
            outputs = call_with_state(model, state, x)
    finally:
        for h in handles:
            h.remove()
    return outputs, [records[id(m)] for m in modules]


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
    leaves, spec = pytree.tree_flatten(outputs)
    batched = [i for i, v in enumerate(leaves) if isinstance(v, Tensor) and v.ndim and v.shape[0] == n]

    def one(rows: list[Tensor], yi: Tensor) -> Tensor:
        new = list(leaves)
        for i, r in zip(batched, rows):
            new[i] = r.unsqueeze(0)
        return loss(pytree.tree_unflatten(new, spec), yi.unsqueeze(0))

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
    leaves, spec = pytree.tree_flatten(outputs)
    where = [i for i, v in enumerate(leaves) if isinstance(v, Tensor) and v.is_floating_point()]

    def rebuild(tensors: Sequence[Tensor]) -> Any:
        new = list(leaves)
        for i, t in zip(where, tensors):
            new[i] = t
        return pytree.tree_unflatten(new, spec)

    return tuple(leaves[i] for i in where), rebuild
