"""Per-sample gradients, fast: ``nn.Linear`` layers from one batched forward/backward.

The per-sample gradient of a linear layer ``z = W a + b`` is ``δ aᵀ`` (and ``δ`` for the
bias), where ``a`` is the layer's input and ``δ = ∂ℓ/∂z`` the gradient at its output, summed
over the positions (sequence, extra dimensions, repeated calls) the layer sees for one
sample. Both come out of ONE batched forward/backward of the model, far cheaper than
``vmap(grad)``, and the product of test factors with training gradients needs only them:

    factor · ∇_W ℓᵢ  =  Σ_t δᵢₜᵀ F aᵢₜ

so the (n, p) matrix of training gradients is never formed. Trainable parameters outside
``nn.Linear`` layers (convolutions, norms, embeddings, …) go through ``vmap(grad)``.

Correctness guard: the batched pass equals the per-sample one only if samples don't
interact inside the model and no Linear parameter is used outside its module. Every call
checks one sample against ``vmap(grad)``; on a mismatch (or with a batch-norm or dropout
module in training mode) the model permanently uses ``vmap(grad)`` for everything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

__all__ = ["GradientEngine", "FactoredGradients"]

#: floats of intermediate (rows × factors × width) held at once in products (CPU: cache-sized;
#: an accelerator takes 16× larger chunks, fewer kernel launches)
PRODUCT_CHUNK_FLOATS = 2**22
ACCELERATOR_CHUNK_FLOATS = 2**26

#: rows of one batched forward/backward
ROWS_PER_PASS = 1024
#: the factored contraction writes and reads k·T·min(in, out) intermediate numbers per sample and
#: layer, forming the gradients in·out; measured on a 2-core CPU (128-256-256-10 MLP, 2,000 samples):
#: k = 20 factored 3.5× faster, k = 100 formed 1.2× faster, k = 500 formed 3.4× faster
_FACTORED_COST = 4


def _chunk_floats(t: Tensor) -> int:
    """Floats of intermediate held at once in products with ``t``'s device."""
    return PRODUCT_CHUNK_FLOATS if t.device.type == "cpu" else ACCELERATOR_CHUNK_FLOATS


def _form_weight_gradients(k: int, positions: int, width_in: int, width_out: int) -> bool:
    """Whether k factors meet a layer's per-sample weight gradients more cheaply by forming
    them chunk by chunk (in·out numbers per sample, then one matrix product) than through
    the factored contraction (k·T·min(in, out) intermediate numbers per sample). Few factors
    on wide layers: factored; many factors or narrow layers: formed."""
    return _FACTORED_COST * k * positions * min(width_in, width_out) >= width_in * width_out


def _weight_gradients(a: Tensor, d: Tensor) -> Tensor:
    """Σ_t δ_t a_tᵀ per sample: (r, out, in)."""
    if a.shape[1] == 1:
        return d[:, 0, :, None] * a[:, 0, None, :]
    return torch.bmm(d.transpose(1, 2), a)


class FactoredGradients(tuple):
    """Per-sample gradients in factored form: ``(rest, a₁, δ₁, a₂, δ₂, …)``.

    ``rest`` (n, p_rest) holds the gradients of the parameters outside the covered linear
    layers; ``aₖ`` (n, T, in) and ``δₖ`` (n, T, out) are the inputs and output gradients of
    the k-th covered layer (T positions per sample). A plain tuple of tensors, so that
    calculators can size, ship and convert it like any container of arrays.
    """

    __slots__ = ()

    @property
    def n_samples(self) -> int:
        return int(self[0].shape[0])

    def rows(self, start: int, stop: int) -> FactoredGradients:
        """The gradients of samples start … stop − 1."""
        return FactoredGradients(t[start:stop] for t in self)

    @property
    def nbytes(self) -> int:
        return sum(t.element_size() * t.numel() for t in self)

    @staticmethod
    def cat(parts: Sequence[FactoredGradients]) -> FactoredGradients:
        """Samples of several factored forms of the same model, in order (raises
        RuntimeError if their numbers of positions differ)."""
        return FactoredGradients(torch.cat(items) for items in zip(*parts))


@dataclass(frozen=True)
class _LinearLayer:
    module: nn.Module
    weight: str | None  # the weight's name in the model, if trainable and in the parameter set
    bias: str | None
    weight_index: Tensor | None  # positions of the weight in the flat vector (row-major (out, in))
    bias_index: Tensor | None
    in_features: int
    out_features: int


def _slice_or_index(positions: list[int]) -> slice | Tensor:
    if positions and positions == list(range(positions[0], positions[0] + len(positions))):
        return slice(positions[0], positions[0] + len(positions))
    return torch.tensor(positions, dtype=torch.long)


_TRAINING_SENSITIVE = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)


class GradientEngine:
    """Per-sample gradients and factor products for a set of trainable parameters.

    Args:
        model: the model.
        loss: ``loss(outputs, targets)``; the per-sample loss is ``loss`` on a batch of one.
        names: the parameter names, in flat-vector order (each flattened row-major).
        parameters: name → detached tensor for every name.
        fixed: everything held fixed in a functional call (buffers, other parameters).
    """

    def __init__(self, model: nn.Module, loss, names: Sequence[str], parameters: dict, fixed: dict):
        self.model = model
        self.loss = loss
        self.names = list(names)
        self.parameters = parameters
        self.fixed = fixed
        offsets, start = {}, 0
        for n in self.names:
            offsets[n] = (start, parameters[n].numel())
            start += parameters[n].numel()
        self.size = start
        self.layers = self._linear_layers(offsets)
        covered = {name for layer in self.layers for name in (layer.weight, layer.bias) if name}
        self.rest = [n for n in self.names if n not in covered]
        positions = [i for n in self.rest for i in range(offsets[n][0], offsets[n][0] + offsets[n][1])]
        self.rest_index = _slice_or_index(positions)
        self.rest_index_list = positions
        self.batched_ok = bool(self.layers)
        self._verified: set[tuple] = set()  # input signatures whose batched gradients matched vmap

    # ---------------------------------------------------------------- structure
    def _linear_layers(self, offsets) -> list[_LinearLayer]:
        by_id = {id(p): n for n, p in self.model.named_parameters()}
        wanted = {id(dict(self.model.named_parameters())[n]) for n in self.names}
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

            def index(name):
                if name is None:
                    return None
                s, k = offsets[name]
                return slice(s, s + k)

            layers.append(_LinearLayer(m, w, b, index(w), index(b), m.in_features, m.out_features))
        return layers

    def _batched_allowed(self) -> bool:
        if not self.batched_ok:
            return False
        return not any(m.training for m in self.model.modules() if isinstance(m, _TRAINING_SENSITIVE))

    # ---------------------------------------------------------------- vmap path
    def _vmap_gradients(self, names: list[str], x: Tensor, y: Tensor) -> Tensor:
        """(n, Σ numel) per-sample gradients of ``names`` by vmap(grad)."""
        model, loss = self.model, self.loss
        varying = {n: self.parameters[n] for n in names}
        fixed = {**self.fixed, **{n: p for n, p in self.parameters.items() if n not in varying}}

        def sample_loss(params, xi, yi):
            out = functional_call(model, {**fixed, **params}, (xi.unsqueeze(0),))
            return loss(out, yi.unsqueeze(0))

        g = vmap(grad(sample_loss), in_dims=(None, 0, 0))(varying, x, y)
        return torch.cat([g[n].reshape(x.shape[0], -1) for n in names], dim=1)

    # ---------------------------------------------------------------- batched path
    def _capture(self, x: Tensor, y: Tensor) -> list[tuple[Tensor, Tensor]] | None:
        """(a, δ) per covered layer, shapes (n, T, in) and (n, T, out); None if not possible."""
        n = x.shape[0]
        records: dict[int, list] = {id(layer.module): [] for layer in self.layers}

        def hook(module, inputs, output):
            records[id(module)].append((inputs[0], output))

        handles = [layer.module.register_forward_hook(hook) for layer in self.layers]
        try:
            with torch.enable_grad():
                # parameters that require grad, so that the layer outputs carry a graph
                live = {
                    n: p.detach().requires_grad_(p.is_floating_point()) for n, p in self.parameters.items()
                }
                state = {**self.fixed, **live}
                outputs = functional_call(self.model, state, (x,))
                layer_outputs = [o for layer in self.layers for (_, o) in records[id(layer.module)]]
                if not layer_outputs or any(o.shape[0] != n or not o.requires_grad for o in layer_outputs):
                    return None
                loss = self.loss

                def one(o, t):
                    return loss(o.unsqueeze(0), t.unsqueeze(0))

                total = vmap(one)(outputs, y).sum()
                deltas = torch.autograd.grad(total, layer_outputs, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        result, k = [], 0
        for layer in self.layers:
            a_parts, d_parts = [], []
            for a, _ in records[id(layer.module)]:
                d = deltas[k]
                k += 1
                if d is None:
                    d = torch.zeros(*a.shape[:-1], layer.out_features, dtype=a.dtype, device=a.device)
                a_parts.append(a.detach().reshape(n, -1, layer.in_features))
                d_parts.append(d.detach().reshape(n, -1, layer.out_features))
            if not a_parts:  # the layer was not called: its gradient is zero
                z = x.new_zeros(n, 0, layer.in_features)
                a_parts, d_parts = [z], [x.new_zeros(n, 0, layer.out_features)]
            result.append((torch.cat(a_parts, dim=1), torch.cat(d_parts, dim=1)))
        return result

    def _layer_gradient_into(self, out: Tensor, layer: _LinearLayer, a: Tensor, d: Tensor) -> None:
        n = a.shape[0]
        if layer.weight_index is not None:
            view = out[:, layer.weight_index].view(n, layer.out_features, layer.in_features)
            if a.shape[1] == 1:
                torch.mul(d[:, 0, :, None], a[:, 0, None, :], out=view)
            else:
                torch.bmm(d.transpose(1, 2), a, out=view)
        if layer.bias_index is not None:
            torch.sum(d, dim=1, out=out[:, layer.bias_index])

    @property
    def _dtype(self) -> torch.dtype:
        return next(iter(self.parameters.values())).dtype

    def _matches_vmap(self, dense_first: Tensor, x: Tensor, y: Tensor) -> bool:
        reference = self._vmap_gradients(self.names, x[:1], y[:1])[0]
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
        signature = (tuple(x.shape[1:]), x.dtype, tuple(y.shape[1:]), y.dtype, x.device)
        if signature in self._verified:
            return captured
        first = torch.zeros(1, self.size, dtype=self._dtype, device=x.device)
        for layer, (a, d) in zip(self.layers, captured):
            self._layer_gradient_into(first, layer, a[:1], d[:1])
        if self.rest:
            first[:, self.rest_index] = self._vmap_gradients(self.rest, x[:1], y[:1])
        if not self._matches_vmap(first[0], x, y):
            self.batched_ok = False
            return None
        self._verified.add(signature)
        return captured

    # ---------------------------------------------------------------- public
    def _vmap_into(
        self, out: Tensor, names: list[str], columns, x: Tensor, y: Tensor, chunk_size: int
    ) -> None:
        """Writes vmap(grad) gradients of ``names`` into ``out[:, columns]``, chunk by chunk."""
        for s in range(0, x.shape[0], chunk_size):
            out[s : s + chunk_size, columns] = self._vmap_gradients(
                names, x[s : s + chunk_size], y[s : s + chunk_size]
            )

    def gradients(self, x: Tensor, y: Tensor, chunk_size: int) -> Tensor:
        """Per-sample gradients, (n, size)."""
        n = x.shape[0]
        out = torch.empty(n, self.size, dtype=self._dtype, device=x.device)
        captured = self._batched(x[:ROWS_PER_PASS], y[:ROWS_PER_PASS]) if n else None
        if captured is None:
            self._vmap_into(out, self.names, slice(None), x, y, chunk_size)
            return out
        for s in range(0, n, ROWS_PER_PASS):
            rows = slice(s, s + ROWS_PER_PASS)
            cap = captured if s == 0 else self._capture(x[rows], y[rows])
            if cap is None:  # this chunk can't take the batched path: vmap gives the same values
                self._vmap_into(out[rows], self.names, slice(None), x[rows], y[rows], chunk_size)
                continue
            for layer, (a, d) in zip(self.layers, cap):
                self._layer_gradient_into(out[rows], layer, a, d)
            if self.rest:
                self._vmap_into(out[rows], self.rest, self.rest_index, x[rows], y[rows], chunk_size)
        return out

    def factored(self, x: Tensor, y: Tensor, chunk_size: int) -> FactoredGradients | Tensor:
        """Per-sample gradients in factored form, or dense (n, size) if the batched path
        doesn't apply (then the caller gets the same values, slower)."""
        n = x.shape[0]
        captured = self._batched(x[:ROWS_PER_PASS], y[:ROWS_PER_PASS]) if n else None
        if captured is None:
            return self.gradients(x, y, chunk_size)
        parts = [captured] + [
            self._capture(x[s : s + ROWS_PER_PASS], y[s : s + ROWS_PER_PASS])
            for s in range(ROWS_PER_PASS, n, ROWS_PER_PASS)
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
                    self._vmap_gradients(self.rest, x[s : s + chunk_size], y[s : s + chunk_size])
                    for s in range(0, n, chunk_size)
                ]
            )
        else:
            rest = torch.zeros(n, 0, dtype=self._dtype, device=x.device)
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
            positions = a.shape[1]
            if positions == 0:
                continue
            if use_b:
                # Σ_t δ_t · f_b
                result += factors[:, layer.bias_index] @ d.sum(dim=1).T
            if not use_w:
                continue
            F = factors[:, layer.weight_index].reshape(k, layer.out_features, layer.in_features)
            if _form_weight_gradients(k, positions, layer.in_features, layer.out_features):
                rows = max(1, _chunk_floats(factors) // (layer.out_features * layer.in_features))
                flat = F.reshape(k, -1)
                for s in range(0, n, rows):
                    g = _weight_gradients(a[s : s + rows], d[s : s + rows])
                    result[:, s : s + rows] += flat @ g.reshape(g.shape[0], -1).T
                continue
            width_in, width_out = layer.in_features, layer.out_features
            rows = max(1, _chunk_floats(factors) // (k * positions * min(width_in, width_out)))
            # contract over the wider side in a matrix product, the narrower one elementwise
            # (the factor matrix is arranged once, not per chunk)
            if width_out <= width_in:
                wide_side, narrow_side, narrow = a, d, width_out
                M = F.reshape(k * width_out, width_in).T  # (in, k·out)
            else:
                wide_side, narrow_side, narrow = d, a, width_in
                M = F.transpose(1, 2).reshape(k * width_in, width_out).T  # (out, k·in)
            for s in range(0, n, rows):
                w_s = wide_side[s : s + rows].reshape(-1, wide_side.shape[2])  # (r·T, wide)
                n_s = narrow_side[s : s + rows].reshape(-1, narrow, 1)  # (r·T, narrow, 1)
                p = (w_s @ M).view(-1, k, narrow)  # (r·T, k, narrow)
                vals = torch.bmm(p, n_s).view(-1, positions, k)  # summed over the narrow side
                result[:, s : s + rows] += vals.sum(dim=1).T
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
        n_left, n_right = rest_l.shape[0], rest_r.shape[0]
        result = torch.zeros(n_left, n_right, dtype=rest_l.dtype, device=rest_l.device)
        if self.rest:
            keep = self._rest_within(columns)
            if keep is None:
                result += rest_l @ rest_r.T
            elif keep.numel():
                result += rest_l[:, keep] @ rest_r[:, keep].T
        for i, layer, use_w, use_b in self._layers_within(columns):
            a_l, d_l, a_r, d_r = left[1 + 2 * i], left[2 + 2 * i], right[1 + 2 * i], right[2 + 2 * i]
            positions = a_l.shape[1]
            if positions == 0 or a_r.shape[1] == 0:
                continue
            if use_b:
                result += d_l.sum(dim=1) @ d_r.sum(dim=1).T
            if use_w:
                self._weight_gram_into(result, layer, a_l, d_l, a_r, d_r)
        return result

    def _weight_gram_into(self, result: Tensor, layer, a_l, d_l, a_r, d_r) -> None:
        """Adds ⟨∇_W ℓ_left, ∇_W ℓ_right⟩ of one covered layer to ``result`` (n_left, n_right)."""
        n_left, t_l, width_in = a_l.shape
        n_right, t_r, width_out = d_r.shape
        if t_l == 1 and t_r == 1:
            result += (a_l[:, 0] @ a_r[:, 0].T) * (d_l[:, 0] @ d_r[:, 0].T)
            return
        if t_l * t_r * (width_in + width_out) <= width_in * width_out:
            rows = max(1, _chunk_floats(result) // max(1, t_l * n_right * t_r))
            A_r, D_r = a_r.reshape(-1, width_in), d_r.reshape(-1, width_out)
            for s in range(0, n_left, rows):
                A = a_l[s : s + rows].reshape(-1, width_in) @ A_r.T  # (r·T, n_right·T)
                A *= d_l[s : s + rows].reshape(-1, width_out) @ D_r.T
                result[s : s + rows] += A.view(-1, t_l, n_right, t_r).sum(dim=(1, 3))
            return
        numel = width_in * width_out
        rows = max(1, _chunk_floats(result) // numel)
        for s in range(0, n_left, rows):
            W_l = _weight_gradients(a_l[s : s + rows], d_l[s : s + rows]).reshape(-1, numel)
            for u in range(0, n_right, rows):
                W_r = _weight_gradients(a_r[u : u + rows], d_r[u : u + rows]).reshape(-1, numel)
                result[s : s + rows, u : u + rows] += W_l @ W_r.T

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
        k = weights.shape[0]
        rest = gradients[0]
        out = torch.zeros(k, self.size, dtype=rest.dtype, device=rest.device)
        if self.rest:
            keep = self._rest_within(columns)
            if keep is None:
                out[:, self.rest_index] = weights @ rest
            elif keep.numel():
                positions = torch.tensor(self.rest_index_list, dtype=torch.long)[keep]
                out[:, positions] = weights @ rest[:, keep]
        for i, layer, use_w, use_b in self._layers_within(columns):
            a, d = gradients[1 + 2 * i], gradients[2 + 2 * i]
            n, positions, width_out = d.shape
            if use_b:
                out[:, layer.bias_index] = weights @ d.sum(dim=1)
            if use_w and _form_weight_gradients(k, positions, layer.in_features, width_out):
                flat = out[:, layer.weight_index]
                rows = max(1, _chunk_floats(weights) // (width_out * layer.in_features))
                for s in range(0, n, rows):
                    g = _weight_gradients(a[s : s + rows], d[s : s + rows])
                    flat += weights[:, s : s + rows] @ g.reshape(g.shape[0], -1)
            elif use_w:
                view = out[:, layer.weight_index].view(k, width_out, layer.in_features)
                rows = max(1, _chunk_floats(weights) // max(1, k * positions * width_out))
                for s in range(0, n, rows):
                    wd = weights[:, s : s + rows, None, None] * d[None, s : s + rows]  # (k, r, T, out)
                    wd = wd.reshape(k, -1, width_out).transpose(1, 2)  # (k, out, r·T)
                    view += wd @ a[s : s + rows].reshape(-1, layer.in_features)
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
                if a.shape[1] == 1:
                    total += a[:, 0].square().sum(dim=1) * d[:, 0].square().sum(dim=1)
                else:  # ‖Σ_t δ_t a_tᵀ‖² = Σ_{t,t'} (δ_t·δ_t')(a_t·a_t')
                    total += ((d @ d.transpose(1, 2)) * (a @ a.transpose(1, 2))).sum(dim=(1, 2))
        return total


def _inside(index: slice | Tensor, columns: slice | None) -> bool:
    if columns is None:
        return True
    return columns.start <= index.start and index.stop <= columns.stop
