"""What the gradient engine does with per-sample gradients in factored or dense form: products with
factors, inner products, weighted sums, squared norms, forming them.

A mixin of ``GradientEngine``: it reads the engine's ``layers`` (factored linear-like layers, each
with its weight's (rows, cols) layout and positions in the flat vector), ``rest`` (the names in the
dense part), ``rest_index`` / ``rest_index_list`` (their flat positions) and ``size``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .factored import (
    FactoredGradients,
    weight_gram_into,
    weight_products_into,
    weight_squared_norms,
    weight_sums_into,
)

__all__ = ["FactoredProducts"]


def _inside(index: slice, columns: slice | None) -> bool:
    if columns is None:
        return True
    return columns.start <= index.start and index.stop <= columns.stop


class FactoredProducts:
    """Products with per-sample gradients, dense (n, size) or ``FactoredGradients``."""

    layers: list
    rest: list[str]
    rest_index: slice | Tensor
    rest_index_list: list[int]
    size: int

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
                result += factors[:, layer.bias_index] @ layer.bias_factor(a, d).sum(dim=1).T
            if use_w:
                F = factors[:, layer.weight_index].reshape(k, layer.rows, layer.cols)
                weight_products_into(result, F, a, d)
        return result

    def gram_width(self, gradients: FactoredGradients | Tensor, columns: slice | None = None) -> int:
        """Numbers multiplied per pair of samples by ``gram`` on this form: the parameter count for
        dense gradients; for factored ones, T²·(rows + cols) per covered weight (the inner product of
        two rank-T gradients), or rows·cols where forming them is cheaper."""
        if isinstance(gradients, Tensor):
            return self.size if columns is None else columns.stop - columns.start
        keep = self._rest_within(columns)
        width = len(self.rest_index_list) if keep is None else int(keep.numel())
        for i, layer, use_w, use_b in self._layers_within(columns):
            positions = gradients[1 + 2 * i].shape[1]
            if use_b:
                width += layer.bias_index.stop - layer.bias_index.start
            if use_w:
                ghost = positions * positions * (layer.rows + layer.cols)
                width += min(ghost, layer.rows * layer.cols)
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

        With both in factored form, a covered layer's part needs no (n, rows·cols) gradients:
        ⟨Σ_t δ_t a_tᵀ, Σ_s δ'_s a'_sᵀ⟩ = Σ_{t,s} (δ_t·δ'_s)(a_t·a'_s), T²·(rows + cols) numbers per pair
        (the weight gradients are formed only where that is cheaper). With ``columns`` (a slice of the
        flat vector) only those parameters take part.
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
        for i, layer, use_w, use_b in self._layers_within(columns):
            a_l, d_l, a_r, d_r = left[1 + 2 * i], left[2 + 2 * i], right[1 + 2 * i], right[2 + 2 * i]
            if a_l.shape[1] == 0 or a_r.shape[1] == 0:
                continue
            if use_b:
                result += layer.bias_factor(a_l, d_l).sum(dim=1) @ layer.bias_factor(a_r, d_r).sum(dim=1).T
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

    def _layer_gradient_into(self, out: Tensor, layer, a: Tensor, d: Tensor) -> None:
        raise NotImplementedError

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
                out[:, layer.bias_index] = weights @ layer.bias_factor(a, d).sum(dim=1)
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
        for i, layer, use_w, use_b in self._layers_within(columns):
            a, d = gradients[1 + 2 * i], gradients[2 + 2 * i]
            if use_b:
                total += layer.bias_factor(a, d).sum(dim=1).square().sum(dim=1)
            if use_w:
                total += weight_squared_norms(a, d)
        return total
