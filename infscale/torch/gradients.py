"""Per-sample gradients, fast: ``nn.Linear`` layers from one batched forward/backward.

The per-sample gradient of a linear layer ``z = W a + b`` is ``δ aᵀ`` (and ``δ`` for the
bias), where ``a`` is the layer's input and ``δ = ∂ℓ/∂z`` the gradient at its output, summed
over the positions (sequence, extra dimensions, repeated calls) the layer sees for one
sample. Both come out of ONE batched forward/backward of the model, far cheaper than
``vmap(grad)``, and the product of test factors with training gradients needs only them:

    factor · ∇_W ℓᵢ  =  Σ_t δᵢₜᵀ F aᵢₜ

so the (n, p) matrix of training gradients is never formed (``infscale.torch.factored``).
Trainable parameters outside ``nn.Linear`` layers (convolutions, norms, embeddings, …) go
through ``vmap(grad)``. Both ways of differentiating come from ``infscale.torch.capture``.

Correctness guard: the batched pass equals the per-sample one only if samples don't
interact inside the model and no Linear parameter is used outside its module. Every call
checks one sample against ``vmap(grad)``; on a mismatch (or with a batch-norm or dropout
module in training mode) the model permanently uses ``vmap(grad)`` for everything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import vmap

from .capture import capture_layer_calls, live_state, loop_gradients, vmap_gradients
from .data import batch_size_of, feature_layout, take_rows
from .factored import (
    FactoredGradients,
    _form_weight_gradients,  # noqa: F401  (importable from here, as before)
    weight_gradients_into,
    weight_gram_into,
    weight_products_into,
    weight_squared_norms,
    weight_sums_into,
)
from .layout import LossFunction, ParameterLayout, _Block
from .memory import default_chunk_size, pass_rows

__all__ = ["GradientEngine", "FactoredGradients", "gradient_engine", "per_sample_gradients"]


@dataclass(frozen=True)
class _LinearLayer:
    module: nn.Module
    weight: str | None  # the weight's name in the model, if trainable and in the parameter set
    bias: str | None
    weight_index: slice | None  # positions of the weight in the flat vector (row-major (out, in))
    bias_index: slice | None
    in_features: int
    out_features: int


def _slice_or_index(positions: list[int]) -> slice | Tensor:
    if positions and positions == list(range(positions[0], positions[0] + len(positions))):
        return slice(positions[0], positions[0] + len(positions))
    return torch.tensor(positions, dtype=torch.long)


_TRAINING_SENSITIVE = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)


class GradientEngine:
    """Per-sample gradients and factor products for the parameters of a layout (or of one block).

    Positions in the flat vector are the layout's (``ParameterLayout.offsets``). Parameter values
    are read from the layout at every call, so the engine always sees the model's current values.

    Args:
        layout: the parameter layout.
        loss: ``loss(outputs, targets)``; the per-sample loss is ``loss`` on a batch of one.
        block: the block whose parameters vary (default: every trainable parameter); the
            others are held fixed.
    """

    def __init__(self, layout: ParameterLayout, loss: LossFunction, block: _Block | None = None):
        self.layout = layout
        self.block = block
        self.model = layout.model
        self.loss = loss
        self.names = layout.names(block)
        offsets = layout.offsets(block)
        self.size = block.size if block else layout.n_parameters
        self.layers = self._linear_layers(offsets)
        covered = {name for layer in self.layers for name in (layer.weight, layer.bias) if name}
        self.rest = [n for n in self.names if n not in covered]
        positions = [i for n in self.rest for i in range(offsets[n].start, offsets[n].stop)]
        self.rest_index = _slice_or_index(positions)
        self.rest_index_list = positions
        self.batched_ok = bool(self.layers)
        self._verified: set[tuple] = set()  # input signatures whose batched gradients matched vmap
        self._vmap_ok = True  # False once vmap failed on the model (then: one sample at a time)

    @property
    def parameters(self) -> dict[str, Tensor]:
        """name → detached current value of every varying parameter."""
        return self.layout.parameters(self.block)

    @property
    def fixed(self) -> dict[str, Tensor]:
        """Everything held fixed in a functional call (buffers, other parameters)."""
        return self.layout.fixed_state(self.block)

    @property
    def _dtype(self) -> torch.dtype:
        return self.layout.dtype

    # ---------------------------------------------------------------- structure
    def _linear_layers(self, offsets: dict[str, slice]) -> list[_LinearLayer]:
        by_id = {id(p): n for n, p in self.model.named_parameters()}
        params = dict(self.model.named_parameters())
        wanted = {id(params[n]) for n in self.names}
        counts: dict[int, int] = {}
        for m in self.model.modules():
            for p in m._parameters.values():
                if p is not None:
                    counts[id(p)] = counts.get(id(p), 0) + 1
        layers = []
        for m in self.model.modules():
            if type(m) is not nn.Linear:
                continue
            w = by_id.get(id(m.weight)) if id(m.weight) in wanted else None
            b = by_id.get(id(m.bias)) if m.bias is not None and id(m.bias) in wanted else None
            shared = any(counts.get(id(p), 0) > 1 for p in (m.weight, m.bias) if p is not None)
            if shared or (w is None and b is None):
                continue
            if m.weight.ndim != 2:  # F.linear also takes a 1-d weight: left to vmap
                continue
            index = {n: offsets[n] for n in (w, b) if n is not None}
            # the shapes F.linear runs with are the weight's (out, in); in_features/out_features
            # are only what the module was built with (a replaced weight may disagree)
            out_features, in_features = m.weight.shape
            layers.append(_LinearLayer(m, w, b, index.get(w), index.get(b), in_features, out_features))
        return layers

    def _batched_allowed(self) -> bool:
        if not self.batched_ok:
            return False
        return not any(m.training for m in self.model.modules() if isinstance(m, _TRAINING_SENSITIVE))

    # ---------------------------------------------------------------- vmap path
    def _vmap_gradients(self, names: list[str], x: Tensor, y: Tensor) -> Tensor:
        """(n, Σ numel) per-sample gradients of ``names`` by vmap(grad)."""
        params = self.parameters
        varying = {n: params[n] for n in names}
        fixed = {**self.fixed, **{n: p for n, p in params.items() if n not in varying}}
        g = None
        if self._vmap_ok:
            try:
                g = vmap_gradients(self.model, self.loss, varying, fixed, x, y)
            except RuntimeError:  # e.g. data-dependent control flow: the loop raises real errors
                self._vmap_ok = False
        if g is None:
            g = loop_gradients(self.model, self.loss, varying, fixed, x, y)
        return torch.cat([g[n].reshape(batch_size_of(x), -1) for n in names], dim=1)

    def _vmap_into(
        self, out: Tensor, names: list[str], columns, x: Tensor, y: Tensor, chunk_size: int
    ) -> None:
        """Writes vmap(grad) gradients of ``names`` into ``out[:, columns]``, chunk by chunk."""
        for s in range(0, batch_size_of(x), chunk_size):
            out[s : s + chunk_size, columns] = self._vmap_gradients(
                names, take_rows(x, slice(s, s + chunk_size)), y[s : s + chunk_size]
            )

    # ---------------------------------------------------------------- batched path
    def _capture(self, x: Tensor, y: Tensor) -> list[tuple[Tensor, Tensor]] | None:
        """(a, δ) per covered layer, shapes (n, T, in) and (n, T, out); None if not possible."""
        n = batch_size_of(x)
        state = live_state(self.parameters, self.fixed)
        outputs, records = capture_layer_calls(self.model, [layer.module for layer in self.layers], state, x)
        if not isinstance(outputs, Tensor):  # a tuple or ModelOutput: vmap(grad) handles it
            return None
        layer_outputs = [o for calls in records for (_, o) in calls]
        if not layer_outputs or any(o.shape[0] != n or not o.requires_grad for o in layer_outputs):
            return None
        loss = self.loss

        def one(o, t):
            return loss(o.unsqueeze(0), t.unsqueeze(0))

        with torch.enable_grad():
            total = vmap(one)(outputs, y).sum()
            deltas = torch.autograd.grad(total, layer_outputs, allow_unused=True)
        result, k = [], 0
        for layer, calls in zip(self.layers, records):
            a_parts, d_parts = [], []
            for a, _ in calls:
                d = deltas[k]
                k += 1
                if d is None:
                    d = torch.zeros(*a.shape[:-1], layer.out_features, dtype=a.dtype, device=a.device)
                a_parts.append(a.detach().reshape(n, -1, layer.in_features))
                d_parts.append(d.detach().reshape(n, -1, layer.out_features))
            if not a_parts:  # the layer was not called: its gradient is zero
                a_parts = [torch.zeros(n, 0, layer.in_features, dtype=self._dtype, device=y.device)]
                d_parts = [torch.zeros(n, 0, layer.out_features, dtype=self._dtype, device=y.device)]
            result.append((torch.cat(a_parts, dim=1), torch.cat(d_parts, dim=1)))
        return result

    def _layer_gradient_into(self, out: Tensor, layer: _LinearLayer, a: Tensor, d: Tensor) -> None:
        n = a.shape[0]
        if layer.weight_index is not None:
            weight_gradients_into(
                out[:, layer.weight_index].view(n, layer.out_features, layer.in_features), a, d
            )
        if layer.bias_index is not None:
            torch.sum(d, dim=1, out=out[:, layer.bias_index])

    def _matches_vmap(self, dense_first: Tensor, x: Tensor, y: Tensor) -> bool:
        reference = self._vmap_gradients(self.names, take_rows(x, slice(0, 1)), y[:1])[0]
        tol = 1e-10 if reference.dtype == torch.float64 else 1e-4
        scale = reference.norm() + dense_first.norm()
        return bool((dense_first - reference).norm() <= tol * scale + 1e-30)

    def _batched(self, x: Tensor, y: Tensor):
        """Captured (a, δ) of x, checked on its first sample against vmap(grad) the first time
        inputs of this feature shape, dtype and device come (the failure modes — samples that
        interact, a weight used outside its module — belong to the model, not to the values);
        None when the batched path doesn't apply to this model (then it never will)."""
        if not self._batched_allowed():
            return None
        captured = self._capture(x, y)
        if captured is None:
            self.batched_ok = False
            return None
        signature = (feature_layout(x), tuple(y.shape[1:]), y.dtype)
        if signature in self._verified:
            return captured
        first = torch.zeros(1, self.size, dtype=self._dtype, device=y.device)
        for layer, (a, d) in zip(self.layers, captured):
            self._layer_gradient_into(first, layer, a[:1], d[:1])
        if self.rest:
            first[:, self.rest_index] = self._vmap_gradients(self.rest, take_rows(x, slice(0, 1)), y[:1])
        if not self._matches_vmap(first[0], x, y):
            self.batched_ok = False
            return None
        self._verified.add(signature)
        return captured

    # ---------------------------------------------------------------- public
    def gradients(self, x: Tensor, y: Tensor, chunk_size: int) -> Tensor:
        """Per-sample gradients, (n, size)."""
        n, rows_per_pass = batch_size_of(x), pass_rows()
        out = torch.empty(n, self.size, dtype=self._dtype, device=y.device)
        captured = self._batched(take_rows(x, slice(0, rows_per_pass)), y[:rows_per_pass]) if n else None
        if captured is None:
            self._vmap_into(out, self.names, slice(None), x, y, chunk_size)
            return out
        for s in range(0, n, rows_per_pass):
            rows = slice(s, s + rows_per_pass)
            cap = captured if s == 0 else self._capture(take_rows(x, rows), y[rows])
            if cap is None:  # this chunk can't take the batched path: vmap gives the same values
                self._vmap_into(out[rows], self.names, slice(None), take_rows(x, rows), y[rows], chunk_size)
                continue
            for layer, (a, d) in zip(self.layers, cap):
                self._layer_gradient_into(out[rows], layer, a, d)
            if self.rest:
                xs = take_rows(x, rows)
                self._vmap_into(out[rows], self.rest, self.rest_index, xs, y[rows], chunk_size)
        return out

    def factored(self, x: Tensor, y: Tensor, chunk_size: int) -> FactoredGradients | Tensor:
        """Per-sample gradients in factored form, or dense (n, size) if the batched path
        doesn't apply (then the caller gets the same values, slower)."""
        n, rows_per_pass = batch_size_of(x), pass_rows()
        captured = self._batched(take_rows(x, slice(0, rows_per_pass)), y[:rows_per_pass]) if n else None
        if captured is None:
            return self.gradients(x, y, chunk_size)
        parts = [captured] + [
            self._capture(take_rows(x, slice(s, s + rows_per_pass)), y[s : s + rows_per_pass])
            for s in range(rows_per_pass, n, rows_per_pass)
        ]
        if any(p is None for p in parts):
            return self.gradients(x, y, chunk_size)
        factored_floats = len(self.rest_index_list) + sum(
            a.shape[1] * (a.shape[2] + d.shape[2]) for a, d in captured
        )
        if factored_floats >= self.size:  # many positions per sample: the dense form is smaller
            return self.gradients(x, y, chunk_size)
        if self.rest:
            rest = torch.cat(
                [
                    self._vmap_gradients(
                        self.rest, take_rows(x, slice(s, s + chunk_size)), y[s : s + chunk_size]
                    )
                    for s in range(0, n, chunk_size)
                ]
            )
        else:
            rest = torch.zeros(n, 0, dtype=self._dtype, device=y.device)
        items: list[Tensor] = [rest]
        for k in range(len(self.layers)):
            items.append(torch.cat([p[k][0] for p in parts]))
            items.append(torch.cat([p[k][1] for p in parts]))
        return FactoredGradients(items)

    def products(
        self, factors: Tensor, gradients: FactoredGradients | Tensor, columns: slice | None = None
    ) -> Tensor:
        """``factors @ gradientsᵀ``: (k, size) with n per-sample gradients → (k, n).

        With ``columns`` (a slice of the flat vector) only those columns take part.
        """
        if isinstance(gradients, Tensor):
            if columns is not None:
                return factors[:, columns] @ gradients[:, columns].T
            return factors @ gradients.T
        rest = gradients[0]
        k = factors.shape[0]
        n = gradients.n_samples
        result = torch.zeros(k, n, dtype=factors.dtype, device=factors.device)
        if k == 0 or n == 0:
            return result
        if self.rest:
            keep = self._rest_within(columns)
            if keep is None:
                result += factors[:, self.rest_index] @ rest.T
            elif keep.numel():
                positions = torch.tensor(self.rest_index_list, dtype=torch.long)[keep]
                result += factors[:, positions] @ rest[:, keep].T
        for i, layer, use_w, use_b in self._layers_within(columns):
            a, d = gradients[1 + 2 * i], gradients[2 + 2 * i]
            if a.shape[1] == 0:
                continue
            if use_b:  # Σ_t δ_t · f_b
                result += factors[:, layer.bias_index] @ d.sum(dim=1).T
            if use_w:
                F = factors[:, layer.weight_index].reshape(k, layer.out_features, layer.in_features)
                weight_products_into(result, F, a, d)
        return result

    def gram_width(self, gradients: FactoredGradients | Tensor, columns: slice | None = None) -> int:
        """Numbers multiplied per pair of samples by ``gram`` on this form: the parameter count for
        dense gradients; for factored ones, T²·(in + out) per covered weight (the inner product of two
        rank-T gradients), or in·out where forming them is cheaper."""
        if isinstance(gradients, Tensor):
            return self.size if columns is None else columns.stop - columns.start
        keep = self._rest_within(columns)
        width = len(self.rest_index_list) if keep is None else int(keep.numel())
        for i, layer, use_w, use_b in self._layers_within(columns):
            positions = gradients[1 + 2 * i].shape[1]
            if use_b:
                width += layer.out_features
            if use_w:
                ghost = positions * positions * (layer.in_features + layer.out_features)
                width += min(ghost, layer.in_features * layer.out_features)
        return width

    def inner_products_pay(self, *gradients: FactoredGradients | Tensor) -> bool:
        """Whether ``gram`` on these forms multiplies at most half the numbers per pair that
        dense gradients would (the parameter count)."""
        return 2 * max(self.gram_width(g) for g in gradients) <= self.size

    def gram(
        self,
        left: FactoredGradients | Tensor,
        right: FactoredGradients | Tensor,
        columns: slice | None = None,
    ) -> Tensor:
        """Inner products of two sets of per-sample gradients, ``G_left G_rightᵀ``: (n_left, n_right).

        With both in factored form, a covered layer's part needs no (n, in·out) gradients:
        ⟨Σ_t δ_t a_tᵀ, Σ_s δ'_s a'_sᵀ⟩ = Σ_{t,s} (δ_t·δ'_s)(a_t·a'_s), T²·(in + out) numbers per pair
        instead of in·out (the weight gradients are formed only where that is cheaper). With
        ``columns`` (a slice of the flat vector) only those parameters take part.
        """
        if isinstance(left, Tensor) and isinstance(right, Tensor):
            cols = columns or slice(0, self.size)
            return left[:, cols] @ right[:, cols].T
        if isinstance(left, Tensor):
            return self.products(left, right, columns)
        if isinstance(right, Tensor):
            return self.products(right, left, columns).T
        rest_l, rest_r = left[0], right[0]
        result = torch.zeros(rest_l.shape[0], rest_r.shape[0], dtype=rest_l.dtype, device=rest_l.device)
        if self.rest:
            keep = self._rest_within(columns)
            if keep is None:
                result += rest_l @ rest_r.T
            elif keep.numel():
                result += rest_l[:, keep] @ rest_r[:, keep].T
        for i, _, use_w, use_b in self._layers_within(columns):
            a_l, d_l, a_r, d_r = left[1 + 2 * i], left[2 + 2 * i], right[1 + 2 * i], right[2 + 2 * i]
            if a_l.shape[1] == 0 or a_r.shape[1] == 0:
                continue
            if use_b:
                result += d_l.sum(dim=1) @ d_r.sum(dim=1).T
            if use_w:
                weight_gram_into(result, a_l, d_l, a_r, d_r)
        return result

    def to_dense(self, gradients: FactoredGradients | Tensor) -> Tensor:
        """The (n, size) per-sample gradients of a factored form (a dense one as it is)."""
        if isinstance(gradients, Tensor):
            return gradients
        rest = gradients[0]
        out = torch.empty(rest.shape[0], self.size, dtype=rest.dtype, device=rest.device)
        for i, layer in enumerate(self.layers):
            self._layer_gradient_into(out, layer, gradients[1 + 2 * i], gradients[2 + 2 * i])
        if self.rest:
            out[:, self.rest_index] = rest
        return out

    # ---------------------------------------------------------------- sums and norms
    def _layers_within(self, columns: slice | None):
        """(index, layer, weight?, bias?) of the covered layers whose parameters lie in ``columns``."""
        for i, layer in enumerate(self.layers):
            use_w = layer.weight_index is not None and _inside(layer.weight_index, columns)
            use_b = layer.bias_index is not None and _inside(layer.bias_index, columns)
            if use_w or use_b:
                yield i, layer, use_w, use_b

    def _rest_within(self, columns: slice | None) -> Tensor | None:
        """Columns of the ``rest`` tensor whose flat positions lie in ``columns`` (None: all)."""
        if columns is None:
            return None
        start, stop = columns.start, columns.stop
        return torch.tensor(
            [j for j, p in enumerate(self.rest_index_list) if start <= p < stop], dtype=torch.long
        )

    def weighted_sums(
        self, weights: Tensor, gradients: FactoredGradients | Tensor, columns: slice | None = None
    ) -> Tensor:
        """``weights @ gradients``: (k, n) weights of n per-sample gradients → (k, size).

        With ``columns`` (a slice of the flat vector) only those columns are filled; the
        others are zero.
        """
        if isinstance(gradients, Tensor):
            out = torch.zeros(weights.shape[0], self.size, dtype=gradients.dtype, device=gradients.device)
            cols = columns or slice(0, self.size)
            out[:, cols] = weights @ gradients[:, cols]
            return out
        rest = gradients[0]
        out = torch.zeros(weights.shape[0], self.size, dtype=rest.dtype, device=rest.device)
        if self.rest:
            keep = self._rest_within(columns)
            if keep is None:
                out[:, self.rest_index] = weights @ rest
            elif keep.numel():
                positions = torch.tensor(self.rest_index_list, dtype=torch.long)[keep]
                out[:, positions] = weights @ rest[:, keep]
        for i, layer, use_w, use_b in self._layers_within(columns):
            a, d = gradients[1 + 2 * i], gradients[2 + 2 * i]
            if use_b:
                out[:, layer.bias_index] = weights @ d.sum(dim=1)
            if use_w:
                weight_sums_into(out[:, layer.weight_index], weights, a, d)
        return out

    def squared_norms(self, gradients: FactoredGradients | Tensor, columns: slice | None = None) -> Tensor:
        """‖gᵢ‖² of each per-sample gradient (restricted to ``columns`` if given): (n,)."""
        if isinstance(gradients, Tensor):
            g = gradients if columns is None else gradients[:, columns]
            return (g * g).sum(dim=1)
        rest = gradients[0]
        if self.rest:
            keep = self._rest_within(columns)
            part = rest if keep is None else rest[:, keep]
            total = (part * part).sum(dim=1)
        else:
            total = rest.new_zeros(rest.shape[0])
        for i, _, use_w, use_b in self._layers_within(columns):
            a, d = gradients[1 + 2 * i], gradients[2 + 2 * i]
            if use_b:
                total += d.sum(dim=1).square().sum(dim=1)
            if use_w:
                total += weight_squared_norms(a, d)
        return total


def _inside(index: slice, columns: slice | None) -> bool:
    if columns is None:
        return True
    return columns.start <= index.start and index.stop <= columns.stop


def gradient_engine(
    layout: ParameterLayout, loss: LossFunction, block: _Block | None = None
) -> GradientEngine:
    """The per-sample gradient engine of the layout's parameters (of one block, if given)."""
    return GradientEngine(layout, loss, block)


def per_sample_gradients(
    layout: ParameterLayout,
    loss: LossFunction,
    x: Tensor,
    y: Tensor,
    chunk_size: int | None = None,
    block: _Block | None = None,
) -> Tensor:
    """Per-sample gradients ∇_θ ℓ(x_i, y_i), shape (n, p) (p of the block if given).

    ``nn.Linear`` layers come from one batched forward/backward; other parameters from
    ``vmap(grad)`` in chunks of ``chunk_size`` samples (default: ``memory.default_chunk_size``),
    so memory stays bounded by chunk_size · (p + activations).
    """
    engine = GradientEngine(layout, loss, block)
    chunk = chunk_size or default_chunk_size(engine.size, layout.dtype.itemsize)
    return engine.gradients(x, y, chunk)
