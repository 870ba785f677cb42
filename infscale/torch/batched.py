"""The batched per-sample gradient pass: which parameters it covers, and one forward/backward.

``Coverage`` sorts the varying parameters of a model by how their per-sample gradients come:

- *factored*: the weight and bias of a covered linear-like layer (``nn.Linear``, HuggingFace
  ``Conv1D``, ``nn.Conv1d``/``nn.Conv2d``) that no other module holds: kept as factors (A, D);
- *dense*: parameters of the other covered kinds (``nn.Embedding``, norms), and parameters held by
  several covered modules (tied weights, e.g. GPT-2's ``lm_head`` and ``wte``: one parameter, counted
  once, its gradient the sum of every holder's part): (n, numel) gradients;
- *uncovered*: parameters held by a module of no covered kind; they take the engine's fallbacks.

``capture`` runs one batched forward with hooks on the covered modules and one backward of Σᵢ ℓᵢ to
their outputs (``infscale.torch.capture``); the kinds of ``infscale.torch.layer_kinds`` turn the
recorded (input, output gradient) pairs into every sample's gradients. Nothing here checks that the
result is right (a parameter used outside its modules, samples that interact): the engine does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .capture import capture_layer_calls, live_state, loss_total
from .data import batch_size_of, call_model
from .layer_kinds import LayerKind, kind_of

__all__ = ["Coverage", "Captured", "capture", "plain_batch_gradient"]


@dataclass(frozen=True)
class _LinearLayer:
    """A covered linear-like layer in factored form: weight gradient ``Σ_t D_t A_tᵀ`` (rows, cols)."""

    module: nn.Module
    kind: LayerKind
    weight: str | None  # the weight's name in the model, if varying and factored
    bias: str | None
    weight_index: slice | None  # positions of the weight in the flat vector (row-major, stored layout)
    bias_index: slice | None
    rows: int
    cols: int
    transposed: bool  # weight stored (in, out): the bias gradient sums A, not D

    def bias_factor(self, a: Tensor, d: Tensor) -> Tensor:
        """The factor whose sum over positions is the bias gradient: (n, T, bias size)."""
        return a if self.transposed else d


@dataclass(frozen=True)
class _DenseUse:
    module: nn.Module
    kind: LayerKind
    names: dict[str, str]  # local attribute name → parameter name, for the dense names it holds


@dataclass
class Coverage:
    """How each varying parameter's per-sample gradients come (see the module docstring)."""

    layers: list[_LinearLayer]
    dense: list[_DenseUse]
    uncovered: list[str]
    modules: list[nn.Module] = field(default_factory=list)  # every module the pass hooks
    kinds: list[LayerKind] = field(default_factory=list)  # the kind of each module, in order

    @property
    def dense_names(self) -> list[str]:
        return list(dict.fromkeys(n for use in self.dense for n in use.names.values()))

    @property
    def factored_names(self) -> list[str]:
        return [n for layer in self.layers for n in (layer.weight, layer.bias) if n]

    @staticmethod
    def of(model: nn.Module, names: list[str], offsets: dict[str, slice]) -> Coverage:
        by_id = {id(p): n for n, p in model.named_parameters()}
        wanted = set(names)
        holders: dict[str, list[nn.Module]] = {}
        for m in model.modules():
            for p in m._parameters.values():
                if p is not None and by_id.get(id(p)) in wanted:
                    holders.setdefault(by_id[id(p)], []).append(m)
        kinds = {id(m): kind_of(m) for ms in holders.values() for m in ms}

        def handled(m: nn.Module, name: str) -> bool:
            kind = kinds[id(m)]
            return kind is not None and any(by_id.get(id(getattr(m, k))) == name for k in kind.local_names(m))

        covered = {n for n in names if n in holders and all(handled(m, n) for m in holders[n])}
        factored = {n for n in covered if len(holders[n]) == 1 and kinds[id(holders[n][0])].factored}
        layers, dense = [], []
        for m in dict.fromkeys(m for ms in holders.values() for m in ms):
            kind = kinds[id(m)]
            if kind is None:
                continue
            local = {k: by_id.get(id(getattr(m, k))) for k in kind.local_names(m)}
            mine_factored = {k: n for k, n in local.items() if n in factored}
            mine_dense = {k: n for k, n in local.items() if n in covered and n not in factored}
            if mine_factored:
                rows, cols = kind.shape(m)
                w, b = mine_factored.get("weight"), mine_factored.get("bias")
                layers.append(
                    _LinearLayer(m, kind, w, b, offsets.get(w), offsets.get(b), rows, cols, kind.transposed)
                )
            if mine_dense:
                dense.append(_DenseUse(m, kind, mine_dense))
        modules = list(dict.fromkeys([layer.module for layer in layers] + [use.module for use in dense]))
        uncovered = [n for n in names if n not in covered]
        return Coverage(layers, dense, uncovered, modules, [kinds[id(m)] for m in modules])

    def bad_names(self, captured: Captured) -> set[str]:
        """The names held by a module whose calls in ``captured`` were not batches of n samples."""
        out = {
            n for layer in self.layers if id(layer.module) in captured.bad for n in (layer.weight, layer.bias)
        }
        for use in self.dense:
            if id(use.module) in captured.bad:
                out.update(use.names.values())
        out.discard(None)
        return out


@dataclass
class Captured:
    """One batched pass over n samples: per hooked module, its calls' (input, output gradient)."""

    n: int
    calls: dict[int, list[tuple[Tensor, Tensor]]]  # id(module) → [(a, δ)], detached
    bad: set[int]  # ids of modules with a call that is not a batch of n samples
    expanded: bool  # some call's output was expanded from a batch of 1 (a broadcast position embedding)
    total: dict[str, Tensor] | None  # name → the gradient of Σᵢ ℓᵢ (when asked for and not expanded)
    loss_vmap: bool  # whether vmap computed Σᵢ ℓᵢ (else a loop did)

    def factors(self, layer: _LinearLayer, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(A (n, T, cols), D (n, T, rows)) of a factored layer, its calls' positions concatenated."""
        a_parts, d_parts = [], []
        for a, d in self.calls[id(layer.module)]:
            A, D = layer.kind.factors(layer.module, a, d, self.n)
            a_parts.append(A)
            d_parts.append(D)
        if not a_parts:  # the layer was not called: its gradient is zero
            device = layer.module.weight.device
            a_parts = [torch.zeros(self.n, 0, layer.cols, dtype=dtype, device=device)]
            d_parts = [torch.zeros(self.n, 0, layer.rows, dtype=dtype, device=device)]
        if len(a_parts) == 1:
            return a_parts[0], d_parts[0]
        return torch.cat(a_parts, dim=1), torch.cat(d_parts, dim=1)

    def add_dense(self, use: _DenseUse, views: dict[str, Tensor]) -> None:
        """Adds the module's part of the per-sample gradients into ``views`` (local name → (n, numel))."""
        for a, d in self.calls[id(use.module)]:
            use.kind.add_dense(use.module, a, d, self.n, views)


def capture(
    model: nn.Module,
    loss,
    coverage: Coverage,
    params: dict[str, Tensor],
    fixed: dict[str, Tensor],
    x: Any,
    y: Tensor,
    with_total: bool,
    loss_vmap: bool = True,
) -> Captured:
    """One batched forward/backward of x: the covered modules' (input, output gradient) per call.

    With ``with_total``, also the gradient of Σᵢ ℓᵢ in every varying parameter from the same backward
    (unless a broadcast output was expanded: then ``total`` is None and ``plain_batch_gradient``
    gives it). If the forward fails with expanded outputs, it is run again without.
    """
    n = batch_size_of(x)
    state = live_state(params, fixed)
    grown: list[nn.Module] = []
    try:
        outputs, records = capture_layer_calls(model, coverage.modules, state, x, n, grown)
    except Exception:  # noqa: BLE001 - an expanded output the model could not take: run it plainly
        if not grown:
            raise
        grown = []
        state = live_state(params, fixed)
        outputs, records = capture_layer_calls(model, coverage.modules, state, x)
    expanded, bad, kept = bool(grown), set(), []
    for m, kind, calls in zip(coverage.modules, coverage.kinds, records):
        if not all(kind.valid(m, a, o, n) for a, o in calls):
            bad.add(id(m))
        else:
            kept.append((m, calls))
    with torch.enable_grad():
        total_loss, used_vmap = loss_total(loss, outputs, y, n, loss_vmap)
        layer_outputs = [o for _, calls in kept for _, o in calls]
        names = (
            [k for k, p in params.items() if state[k].requires_grad] if with_total and not expanded else []
        )
        inputs = layer_outputs + [state[k] for k in names]
        grads = torch.autograd.grad(total_loss, inputs, allow_unused=True) if inputs else ()
    calls_out: dict[int, list[tuple[Tensor, Tensor]]] = {}
    k = 0
    for m, calls in kept:
        pairs = []
        for a, o in calls:
            d = grads[k]
            k += 1
            pairs.append((a.detach(), (torch.zeros_like(o) if d is None else d).detach()))
        calls_out[id(m)] = pairs
    total = None
    if with_total and not expanded:
        total = {
            name: (torch.zeros_like(params[name]) if g is None else g.detach())
            for name, g in zip(names, grads[len(layer_outputs) :])
        }
    return Captured(n, calls_out, bad, expanded, total, used_vmap)


def plain_batch_gradient(
    model: nn.Module, loss, params: dict[str, Tensor], fixed: dict[str, Tensor], x: Any, y: Tensor
) -> dict[str, Tensor]:
    """The gradient of Σᵢ ℓᵢ over the batch in every varying parameter, by a plain forward/backward."""
    n = batch_size_of(x)
    state = live_state(params, fixed)
    names = [k for k in params if state[k].requires_grad]
    with torch.enable_grad():
        total, _ = loss_total(loss, call_model(model, x, state), y, n)
        grads = torch.autograd.grad(total, [state[k] for k in names], allow_unused=True)
    return {k: (torch.zeros_like(params[k]) if g is None else g.detach()) for k, g in zip(names, grads)}
