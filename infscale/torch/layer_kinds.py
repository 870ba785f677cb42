"""The layers whose per-sample gradients come from one batched forward/backward, without vmap.

From each call of a covered module, its input ``a`` and the gradient ``δ`` of the summed per-sample
losses at its output give every sample's gradient of the module's parameters:

==========================================  ==========================================================
kind                                        per-sample gradient (sums over the positions t of a sample)
==========================================  ==========================================================
``nn.Linear`` (any leading dimensions)      W: Σ_t δ_t a_tᵀ, b: Σ_t δ_t                      (factored)
HuggingFace ``Conv1D`` (GPT-2; W is (in,    W: Σ_t a_t δ_tᵀ, b: Σ_t δ_t                      (factored)
out), the transpose of ``nn.Linear``'s)
``nn.Conv1d``, ``nn.Conv2d`` (groups 1)     as ``nn.Linear`` on the unfolded input: a_t the     (factored)
                                            receptive field of output position t
``nn.Embedding``                            W: δ_t scatter-added into the rows of the ids       (dense)
                                            (none for ``padding_idx``)
``nn.LayerNorm``, ``nn.RMSNorm``,           w: Σ x̂ ⊙ δ, b: Σ δ, with x̂ the normalized input      (dense)
``nn.GroupNorm``, eval-mode ``BatchNorm``
==========================================  ==========================================================

Factored kinds give a per-call pair (A (n, T, cols), D (n, T, rows)) with the weight's gradient in
its stored (rows, cols) layout ``Σ_t D_t A_tᵀ``, which ``infscale.torch.factored`` multiplies with
other vectors without forming it. Dense kinds add (n, numel) gradients into given views.

A module counts only if its forward is the library's own (a subclass that overrides ``forward`` is
not covered). Modules not listed here are not covered: their parameters take the fallback routes
of ``infscale.torch.gradients``. Whether a covered parameter is also used outside its modules, or
samples interact, is checked at run time by the engine, not assumed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LayerKind", "kind_of"]


class LayerKind:
    """How one kind of module's per-sample gradients follow from its calls' inputs and output gradients."""

    #: the kind gives factors (A, D) of its weight's gradient (else dense gradients)
    factored = False
    #: a factored kind whose weight is stored (in, out): the bias gradient sums A, not D
    transposed = False

    def local_names(self, m: nn.Module) -> tuple[str, ...]:
        """The attribute names of the parameters this kind computes (those that are not None)."""
        return tuple(k for k in ("weight", "bias") if getattr(m, k, None) is not None)

    def valid(self, m: nn.Module, a: Tensor, out: Tensor, n: int) -> bool:
        """Whether a call with input ``a`` and output ``out`` is a batch of n samples along dim 0."""
        return (
            isinstance(a, Tensor)
            and isinstance(out, Tensor)
            and a.ndim > 0
            and out.ndim > 0
            and a.shape[0] == n
            and out.shape[0] == n
            and out.requires_grad
        )

    def shape(self, m: nn.Module) -> tuple[int, int]:
        """(rows, cols) of the weight in its stored layout (factored kinds)."""
        shape = m.weight.shape
        return int(shape[0]), math.prod(shape[1:])

    def factors(self, m: nn.Module, a: Tensor, d: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """(A (n, T, cols), D (n, T, rows)) of one call (factored kinds)."""
        raise NotImplementedError

    def add_dense(self, m: nn.Module, a: Tensor, d: Tensor, n: int, views: dict[str, Tensor]) -> None:
        """Adds one call's per-sample gradients into ``views`` (local name → (n, numel))."""
        A, D = self.factors(m, a, d, n)
        if "weight" in views:
            if A.shape[1] == 1:
                g = D[:, 0, :, None] * A[:, 0, None, :]
            else:
                g = torch.bmm(D.transpose(1, 2), A)
            views["weight"] += g.reshape(n, -1)
        if "bias" in views:
            views["bias"] += (A if self.transposed else D).sum(dim=1)


class _Linear(LayerKind):
    factored = True

    def factors(self, m, a, d, n):
        rows, cols = self.shape(m)
        return a.reshape(n, -1, cols), d.reshape(n, -1, rows)


class _TransposedLinear(LayerKind):
    """HuggingFace ``Conv1D``: ``x @ W + b`` with W stored (in, out)."""

    factored = True
    transposed = True

    def factors(self, m, a, d, n):
        rows, cols = self.shape(m)  # (in, out)
        return d.reshape(n, -1, cols), a.reshape(n, -1, rows)


class _Convolution(LayerKind):
    """``nn.Conv1d`` / ``nn.Conv2d`` with groups 1, as a linear layer over unfolded patches."""

    factored = True

    def valid(self, m, a, out, n):
        return super().valid(m, a, out, n) and a.ndim == m.weight.ndim

    def factors(self, m, a, d, n):
        rows, cols = self.shape(m)
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            a = F.pad(a, m._reversed_padding_repeated_twice, mode=mode)
            padding = (0,) * (a.ndim - 2)
        else:
            padding = tuple(m.padding)
        kernel, dilation, stride = tuple(m.kernel_size), tuple(m.dilation), tuple(m.stride)
        if a.ndim == 3:  # Conv1d: a one-row image
            a = a.unsqueeze(2)
            kernel, dilation, stride, padding = ((1, *kernel), (1, *dilation), (1, *stride), (0, *padding))
        patches = F.unfold(a, kernel, dilation=dilation, padding=padding, stride=stride)  # (n, cols, L)
        return patches.transpose(1, 2), d.reshape(n, rows, -1).transpose(1, 2)


class _Embedding(LayerKind):
    def local_names(self, m):
        return ("weight",)

    def valid(self, m, a, out, n):
        return super().valid(m, a, out, n) and not a.is_floating_point()

    def add_dense(self, m, a, d, n, views):
        vocab, width = m.weight.shape
        ids = a.reshape(n, -1)
        grads = d.reshape(n, -1, width)
        rows = torch.arange(n, device=ids.device)[:, None].expand_as(ids)
        keep = ids != m.padding_idx if m.padding_idx is not None else torch.ones_like(ids, dtype=torch.bool)
        view = views["weight"].unflatten(1, (vocab, width))
        view.index_put_((rows[keep], ids[keep]), grads[keep].to(view.dtype), accumulate=True)


@dataclass(frozen=True)
class _Norm(LayerKind):
    """An affine normalization ``x̂ ⊙ w + b``: x̂ from the input, w and b along the trailing
    (``LayerNorm``, ``RMSNorm``) or the channel dimension (``GroupNorm``, ``BatchNorm``)."""

    channel_first: bool

    def valid(self, m, a, out, n):
        return super().valid(m, a, out, n) and a.is_floating_point() and a.shape == out.shape

    def normalized(self, m: nn.Module, a: Tensor) -> Tensor:
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(a, m.normalized_shape, None, None, m.eps)
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(a, m.num_groups, None, None, m.eps)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return F.batch_norm(a, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)
        return F.rms_norm(a, m.normalized_shape, None, m.eps)

    def _sum(self, t: Tensor, m: nn.Module, n: int) -> Tensor:
        numel = m.weight.numel() if m.weight is not None else m.bias.numel()
        if self.channel_first:
            return t.reshape(n, numel, -1).sum(dim=2)
        return t.reshape(n, -1, numel).sum(dim=1)

    def add_dense(self, m, a, d, n, views):
        if "weight" in views:
            views["weight"] += self._sum(self.normalized(m, a) * d, m, n)
        if "bias" in views:
            views["bias"] += self._sum(d, m, n)


_LINEAR, _TRANSPOSED, _CONV = _Linear(), _TransposedLinear(), _Convolution()
_EMBEDDING, _TRAILING_NORM, _CHANNEL_NORM = _Embedding(), _Norm(False), _Norm(True)


def _own_forward(m: nn.Module, cls: type) -> bool:
    return isinstance(m, cls) and type(m).forward is cls.forward


def _is_hf_conv1d(m: nn.Module) -> bool:
    """A HuggingFace ``transformers.pytorch_utils.Conv1D`` (recognized without importing transformers)."""
    w = getattr(m, "weight", None)
    return (
        type(m).__name__ == "Conv1D"
        and isinstance(w, Tensor)
        and w.ndim == 2
        and getattr(m, "nf", None) == w.shape[1]
        and getattr(m, "nx", w.shape[0]) == w.shape[0]
        and set(dict(m.named_parameters(recurse=False))) <= {"weight", "bias"}
    )


def kind_of(m: nn.Module) -> LayerKind | None:
    """The kind of a module whose per-sample gradients the batched pass computes; None if not covered."""
    if _own_forward(m, nn.Linear):
        return _LINEAR
    if _is_hf_conv1d(m):
        return _TRANSPOSED
    if (_own_forward(m, nn.Conv2d) or _own_forward(m, nn.Conv1d)) and m.groups == 1:
        return _CONV
    if _own_forward(m, nn.Embedding) and not m.scale_grad_by_freq:
        return _EMBEDDING
    if _own_forward(m, nn.LayerNorm) or (hasattr(nn, "RMSNorm") and _own_forward(m, nn.RMSNorm)):
        return _TRAILING_NORM
    if _own_forward(m, nn.GroupNorm):
        return _CHANNEL_NORM
    if (
        isinstance(m, nn.modules.batchnorm._BatchNorm)
        and type(m).forward is nn.modules.batchnorm._BatchNorm.forward
        and not m.training
        and m.track_running_stats
        and m.running_mean is not None
    ):
        return _CHANNEL_NORM
    return None
