"""Per-sample gradients of ``nn.Linear`` layers in factored form, and the products with them.

The per-sample gradient of a linear layer ``z = W a + b`` is ``Σ_t δ_t a_tᵀ`` (and ``Σ_t δ_t`` for
the bias), where ``a_t`` is the layer's input at position t and ``δ_t = ∂ℓ/∂z_t``. The kernels here
meet such gradients with other vectors without forming the (n, out·in) gradients, or form them
chunk by chunk where that is cheaper. Chunks are sized by ``memory.product_rows``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .memory import product_rows

__all__ = ["FactoredGradients"]

#: the factored contraction writes and reads k·T·min(in, out) intermediate numbers per sample and
#: layer, forming the gradients in·out; measured on a 2-core CPU (128-256-256-10 MLP, 2,000 samples):
#: k = 20 factored 3.5× faster, k = 100 formed 1.2× faster, k = 500 formed 3.4× faster
_FACTORED_COST = 4


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


def _form_weight_gradients(k: int, positions: int, width_in: int, width_out: int) -> bool:
    """Whether k factors meet a layer's per-sample weight gradients more cheaply by forming
    them chunk by chunk (in·out numbers per sample, then one matrix product) than through
    the factored contraction (k·T·min(in, out) intermediate numbers per sample). Few factors
    on wide layers: factored; many factors or narrow layers: formed."""
    return _FACTORED_COST * k * positions * min(width_in, width_out) >= width_in * width_out


def weight_gradients(a: Tensor, d: Tensor) -> Tensor:
    """Σ_t δ_t a_tᵀ per sample: (r, out, in)."""
    if a.shape[1] == 1:
        return d[:, 0, :, None] * a[:, 0, None, :]
    return torch.bmm(d.transpose(1, 2), a)


def weight_gradients_into(view: Tensor, a: Tensor, d: Tensor) -> None:
    """Writes Σ_t δ_t a_tᵀ per sample into ``view`` (n, out, in)."""
    if a.shape[1] == 1:
        torch.mul(d[:, 0, :, None], a[:, 0, None, :], out=view)
    else:
        torch.bmm(d.transpose(1, 2), a, out=view)


def weight_products_into(result: Tensor, F: Tensor, a: Tensor, d: Tensor) -> None:
    """Adds ⟨F_i, ∇_W ℓ_j⟩ to ``result`` (k, n) for factors F (k, out, in) of one layer."""
    k, width_out, width_in = F.shape
    n, positions = a.shape[0], a.shape[1]
    if _form_weight_gradients(k, positions, width_in, width_out):
        rows = product_rows(F, width_out * width_in)
        flat = F.reshape(k, -1)
        for s in range(0, n, rows):
            g = weight_gradients(a[s : s + rows], d[s : s + rows])
            result[:, s : s + rows] += flat @ g.reshape(g.shape[0], -1).T
        return
    rows = product_rows(F, k * positions * min(width_in, width_out))
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


def weight_gram_into(result: Tensor, a_l: Tensor, d_l: Tensor, a_r: Tensor, d_r: Tensor) -> None:
    """Adds ⟨∇_W ℓ_left, ∇_W ℓ_right⟩ of one layer to ``result`` (n_left, n_right)."""
    n_left, t_l, width_in = a_l.shape
    n_right, t_r, width_out = d_r.shape
    if t_l == 1 and t_r == 1:
        result += (a_l[:, 0] @ a_r[:, 0].T) * (d_l[:, 0] @ d_r[:, 0].T)
        return
    if t_l * t_r * (width_in + width_out) <= width_in * width_out:
        rows = product_rows(result, t_l * n_right * t_r)
        A_r, D_r = a_r.reshape(-1, width_in), d_r.reshape(-1, width_out)
        for s in range(0, n_left, rows):
            A = a_l[s : s + rows].reshape(-1, width_in) @ A_r.T  # (r·T, n_right·T)
            A *= d_l[s : s + rows].reshape(-1, width_out) @ D_r.T
            result[s : s + rows] += A.view(-1, t_l, n_right, t_r).sum(dim=(1, 3))
        return
    numel = width_in * width_out
    rows = product_rows(result, numel)
    for s in range(0, n_left, rows):
        W_l = weight_gradients(a_l[s : s + rows], d_l[s : s + rows]).reshape(-1, numel)
        for u in range(0, n_right, rows):
            W_r = weight_gradients(a_r[u : u + rows], d_r[u : u + rows]).reshape(-1, numel)
            result[s : s + rows, u : u + rows] += W_l @ W_r.T


def weight_sums_into(flat: Tensor, weights: Tensor, a: Tensor, d: Tensor) -> None:
    """Adds Σ_j weights_ij ∇_W ℓ_j of one layer to ``flat`` (k, out·in), row-major."""
    k = weights.shape[0]
    n, positions, width_out = d.shape
    width_in = a.shape[2]
    if _form_weight_gradients(k, positions, width_in, width_out):
        rows = product_rows(weights, width_out * width_in)
        for s in range(0, n, rows):
            g = weight_gradients(a[s : s + rows], d[s : s + rows])
            flat += weights[:, s : s + rows] @ g.reshape(g.shape[0], -1)
        return
    view = flat.view(k, width_out, width_in)
    rows = product_rows(weights, k * positions * width_out)
    for s in range(0, n, rows):
        wd = weights[:, s : s + rows, None, None] * d[None, s : s + rows]  # (k, r, T, out)
        wd = wd.reshape(k, -1, width_out).transpose(1, 2)  # (k, out, r·T)
        view += wd @ a[s : s + rows].reshape(-1, width_in)


def weight_squared_norms(a: Tensor, d: Tensor) -> Tensor:
    """‖Σ_t δ_t a_tᵀ‖² per sample: (n,)."""
    if a.shape[1] == 1:
        return a[:, 0].square().sum(dim=1) * d[:, 0].square().sum(dim=1)
    # ‖Σ_t δ_t a_tᵀ‖² = Σ_{t,t'} (δ_t·δ_t')(a_t·a_t')
    return ((d @ d.transpose(1, 2)) * (a @ a.transpose(1, 2))).sum(dim=(1, 2))
