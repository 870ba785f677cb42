"""What EK-FAC needs from the loss: the per-sample gradients of the query side, and for the true and
exact Fisher the curvature of the loss in the model's logits.

The loss is the same ``loss(outputs, y)`` every infscale method takes (the batch mean of per-sample
losses, receiving exactly what the model returns). With ``fisher="empirical"`` nothing else is
needed: the output gradients come from autograd of ``n · loss``. The true and the exact Fisher replace
the given labels by the model's predictive distribution, which needs the loss *family*:

- ``cross_entropy``: the loss is Σ_t w_t · CE(z_t, y_t) over predictions t, with the classes on the
  last dimension of the logits z (shape (n, ..., C)) and weights w_t ≥ 0 (1 for a classifier, 1/m for
  a per-sequence mean over m predicted tokens, 0 for ignored positions). Its Hessian in z is
  block-diagonal, w_t (diag p_t − p_t p_tᵀ) per prediction.
- ``mse``: the loss is Σ_k w_k (z_k − y_k)² over the output elements (``F.mse_loss``: w = 1/k); its
  Hessian is diag(2 w).

For ``F.cross_entropy`` / ``F.mse_loss`` (or the names) the weights are known (1, 1/k). For any other
callable they are read from the loss itself by one Hessian-vector product in the logits (no second
derivative of the model is taken), and the product is checked against the family's form, so a loss
that is no such weighted sum is named rather than silently given a wrong curvature.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .layout import parse_enum

__all__ = ["EkfacLoss", "FisherType", "LossSpec", "parse_loss", "default_logits"]


class EkfacLoss(str, Enum):
    """The loss family, which fixes the curvature of the true and the exact Fisher.

    - ``CROSS_ENTROPY``: ``torch.nn.functional.cross_entropy``; outputs (n, C) logits,
      integer class labels (n,). As a ``loss_family`` of another loss: a weighted sum of
      cross-entropies over the predictions of logits (n, ..., C) (see the module docstring).
    - ``MSE``: ``torch.nn.functional.mse_loss`` with its default ``reduction="mean"``: the
      per-sample loss is ``mean_k (f_k(x) - y_k)²`` over the k output elements, so its Hessian
      with respect to the outputs is ``(2/k) I``. Float targets shaped like the outputs. As a
      ``loss_family``: a weighted sum of squares.
    """

    CROSS_ENTROPY = "cross_entropy"
    MSE = "mse"


class FisherType(str, Enum):
    """How the output gradients δ that form G (and the EK-FAC diagonal) are drawn.

    - ``TRUE``: labels sampled from the model's predictive distribution (seeded): a class
      y_t ~ softmax(z_t) per prediction for cross-entropy, y ~ N(f(x), diag(1/(2w))) for MSE, each
      back-propagated with the square root of its weight, so that in expectation G is built from the
      Gauss-Newton matrix of the loss. One sample per training point.
    - ``EMPIRICAL``: the given labels (the empirical Fisher, E[∇ℓ ∇ℓᵀ]).
    - ``EXACT``: the expectation over the predictive distribution computed exactly, by
      back-propagating the columns of a square root of the output Hessian (one backward pass per
      class and prediction position, or per output element for MSE). Equals the Gauss-Newton
      matrix, so for a single sample the K-FAC model of a Linear layer is exact.
    """

    TRUE = "true"
    EMPIRICAL = "empirical"
    EXACT = "exact"


def default_logits(outputs: Any) -> Tensor:
    """The tensor the loss family is applied to: the output itself, ``outputs["logits"]`` of a mapping
    (a HuggingFace ``ModelOutput``), ``outputs.logits``, or the first entry of a tuple or list.

    Raises:
        TypeError: none of these is a tensor.
    """
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping) and isinstance(outputs.get("logits"), Tensor):
        return outputs["logits"]
    if isinstance(getattr(outputs, "logits", None), Tensor):
        return outputs.logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], Tensor):
        return outputs[0]
    raise TypeError(
        f"EkfacInfluence: cannot read logits from the model's output of type {type(outputs).__name__}; "
        "expected a tensor, a mapping or ModelOutput with 'logits', or a tuple whose first entry is the "
        "logits. Pass output_logits=callable(outputs) -> Tensor."
    )


@dataclass
class LossSpec:
    """The loss, its family (None: only the empirical Fisher), whether it is one of the two torch
    losses with known weights, and how the logits are read from the model's output."""

    loss: Callable[[Any, Tensor], Tensor]
    family: EkfacLoss | None
    known: bool
    logits_of: Callable[[Any], Tensor]

    # ------------------------------------------------------------------ checks of the built-in losses
    def check_targets(self, y: Tensor, name: str, where: str) -> None:
        """Raises ValueError when ``y`` are no targets of the built-in loss (other losses: no check)."""
        if not self.known:
            return
        if self.family is EkfacLoss.CROSS_ENTROPY:
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.ndim != 1:
                raise ValueError(
                    f"{where}: loss='cross_entropy' needs integer class labels of shape (n,) in {name}; "
                    f"got dtype {y.dtype} and shape {tuple(y.shape)}."
                )
        elif not y.is_floating_point():
            raise ValueError(
                f"{where}: loss='mse' is a regression loss and needs float targets shaped like the "
                f"model's outputs in {name}; got dtype {y.dtype} (class labels?). Use "
                "loss='cross_entropy' for classification."
            )

    def check_logits(self, z: Tensor, y: Tensor | None, n: int, where: str) -> None:
        """Raises ValueError when logits ``z`` don't fit the loss (and targets ``y``)."""
        if self.known and self.family is EkfacLoss.CROSS_ENTROPY and z.ndim != 2:
            raise ValueError(
                f"{where}: loss='cross_entropy' needs model outputs of shape (n, n_classes); "
                f"got {tuple(z.shape)}."
            )
        if self.known and self.family is EkfacLoss.MSE and y is not None and z.shape != y.shape:
            raise ValueError(
                f"{where}: loss='mse' needs targets shaped like the model's outputs; outputs have shape "
                f"{tuple(z.shape)}, targets {tuple(y.shape)}."
            )
        if z.ndim < 1 or z.shape[0] != n or (self.family is EkfacLoss.CROSS_ENTROPY and z.ndim < 2):
            raise ValueError(
                f"{where}: the logits read from the model's output have shape {tuple(z.shape)}; expected "
                f"({n}, ..., n_classes) for a batch of {n}. Pass output_logits= to say where they are."
            )

    # ------------------------------------------------------------------ weights of the predictions
    def weights(self, outputs: Any, z: Tensor, y: Tensor, n: int, where: str) -> Tensor:
        """The weight w ≥ 0 of each prediction in the per-sample loss: shape z.shape[:-1] for
        cross-entropy, z.shape for MSE (module docstring). Keeps the autograd graph of ``z``."""
        if self.family is EkfacLoss.CROSS_ENTROPY:
            if self.known:
                return torch.ones(z.shape[:-1], dtype=z.dtype, device=z.device)
            return self._cross_entropy_weights(outputs, z, y, n, where)
        if self.known:
            return torch.full_like(z, 1.0 / (z[0].numel() if z.shape[0] else 1)).detach()
        return self._mse_weights(outputs, z, y, n, where)

    def _hvp(self, outputs, z: Tensor, y: Tensor, n: int, probes: list[Tensor], where: str) -> list[Tensor]:
        """Products of the Hessian of ``n · loss`` in the logits with ``probes`` (the model's graph
        is kept for the backward passes that follow)."""
        (g,) = torch.autograd.grad(self.loss(outputs, y) * n, z, create_graph=True, allow_unused=True)
        if g is None or not g.requires_grad:
            raise ValueError(
                f"{where}: the loss does not depend on the logits read from the model's output (or is "
                "linear in them), so it has no curvature there; output_logits= must return the very "
                "tensor the loss computes from (an entry of the output, not a new computation on it), "
                "or use fisher='empirical'."
            )
        return [torch.autograd.grad(g, z, grad_outputs=u, retain_graph=True)[0].detach() for u in probes]

    def _mismatch(self, residual: Tensor, scale: Tensor, z: Tensor, where: str, form: str) -> None:
        tol = math.sqrt(torch.finfo(z.dtype).eps)
        if residual.abs().max() > tol * max(float(scale.abs().max()), torch.finfo(z.dtype).tiny):
            raise ValueError(
                f"{where}: loss_family='{self.family.value}', but the loss's Hessian in the logits of "
                f"shape {tuple(z.shape)} is not {form}; check the family, that output_logits= returns the "
                "tensor the loss is a function of (classes on the last dimension), or use "
                "fisher='empirical'."
            )

    def _cross_entropy_weights(self, outputs, z: Tensor, y: Tensor, n: int, where: str) -> Tensor:
        p = torch.softmax(z.detach(), dim=-1)
        spread = p * (1 - p)
        c = spread.argmax(dim=-1, keepdim=True)  # the class whose Hessian diagonal is largest
        u = torch.zeros_like(p).scatter_(-1, c, 1.0)
        (hu,) = self._hvp(outputs, z, y, n, [u], where)
        pc, sc = p.gather(-1, c), spread.gather(-1, c)
        w = torch.where(sc > 0, hu.gather(-1, c) / sc.clamp_min(torch.finfo(z.dtype).tiny), 0.0)
        self._mismatch(hu - w * pc * (u - p), hu, z, where, "Σ_t w_t (diag p_t − p_t p_tᵀ)")
        return self._nonnegative(w.squeeze(-1), z, where)

    def _mse_weights(self, outputs, z: Tensor, y: Tensor, n: int, where: str) -> Tensor:
        ones = torch.ones_like(z)
        signs = 1 - 2 * (torch.arange(z.numel(), device=z.device) % 2).reshape(z.shape).to(z.dtype)
        h1, h2 = self._hvp(outputs, z, y, n, [ones, signs], where)
        w = h1 / 2
        self._mismatch(h2 - 2 * w * signs, h1, z, where, "diagonal, diag(2 w)")
        return self._nonnegative(w, z, where)

    def _nonnegative(self, w: Tensor, z: Tensor, where: str) -> Tensor:
        if (w < -math.sqrt(torch.finfo(z.dtype).eps) * w.abs().max()).any():
            raise ValueError(
                f"{where}: the loss weighs some predictions negatively (its Hessian in the logits is not "
                "positive semi-definite); the true and exact Fisher need a convex loss. Use "
                "fisher='empirical'."
            )
        return w.clamp_min(0)

    # ------------------------------------------------------------------ output vectors
    def output_vectors(
        self, z: Tensor, w: Tensor, fisher: FisherType, generator
    ) -> tuple[int, Iterator[Tensor]]:
        """Vectors v (shaped like the logits) whose pull-backs Jᵀv form δ: one sampled vector
        (``"true"``), or the columns of a square root of the loss's Hessian in the logits
        (``"exact"``). Returns their number and an iterator over them."""
        f = z.detach()
        w = w.to(f.dtype)
        if self.family is EkfacLoss.CROSS_ENTROPY:
            p = torch.softmax(f, dim=-1)
            C = p.shape[-1]
            if fisher is FisherType.TRUE:
                labels = torch.multinomial(p.reshape(-1, C), 1, generator=generator).reshape(p.shape[:-1])
                return 1, iter([w.sqrt().unsqueeze(-1) * (p - F.one_hot(labels, C).to(p.dtype))])
            flat_p, flat_w = p.reshape(p.shape[0], -1, C), w.reshape(p.shape[0], -1)
            positions = [j for j in range(flat_w.shape[1]) if bool((flat_w[:, j] > 0).any())]
            eye = torch.eye(C, dtype=p.dtype, device=p.device)

            def exact() -> Iterator[Tensor]:
                for j in positions:
                    pj, wj = flat_p[:, j], flat_w[:, j : j + 1]
                    for c in range(C):
                        v = torch.zeros_like(flat_p)
                        v[:, j] = (wj * pj[:, c : c + 1]).sqrt() * (eye[c] - pj)
                        yield v.reshape(p.shape)

            return len(positions) * C, exact()
        if fisher is FisherType.TRUE:
            eps = torch.randn(f.shape, generator=generator, dtype=f.dtype, device=f.device)
            return 1, iter([(2 * w).sqrt() * eps])
        flat_w = w.reshape(f.shape[0], -1)
        elements = [k for k in range(flat_w.shape[1]) if bool((flat_w[:, k] > 0).any())]

        def exact_mse() -> Iterator[Tensor]:
            for k in elements:
                v = torch.zeros_like(flat_w)
                v[:, k] = (2 * flat_w[:, k]).sqrt()
                yield v.reshape(f.shape)

        return len(elements), exact_mse()


class OnLogits:
    """A built-in torch loss applied to the logits read from the model's output (a tensor as it is,
    a HuggingFace ``ModelOutput``'s ``.logits``, a tuple's first entry, or ``output_logits``), so
    that ``loss="cross_entropy"`` works for models that return output objects."""

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], spec: LossSpec):
        self.fn, self.spec = fn, spec

    def __call__(self, outputs: Any, y: Tensor) -> Tensor:
        return self.fn(self.spec.logits_of(outputs), y)


def parse_loss(loss: Any, loss_family: Any, output_logits: Any, fisher: FisherType) -> LossSpec:
    """The ``LossSpec`` of EkfacInfluence's ``loss``, ``loss_family`` and ``output_logits``.

    Raises:
        ValueError: an unknown loss name or family, a family that contradicts a built-in loss, or a
            true/exact Fisher without a family.
        TypeError: a loss or output_logits that is not callable.
    """
    family = None if loss_family is None else parse_enum(EkfacLoss, loss_family, "loss_family")
    builtin = {F.cross_entropy: EkfacLoss.CROSS_ENTROPY, F.mse_loss: EkfacLoss.MSE}
    if isinstance(loss, (str, EkfacLoss)) or loss in builtin:
        known = builtin[loss] if loss in builtin else parse_enum(EkfacLoss, loss, "loss")
        if family is not None and family is not known:
            raise ValueError(
                f"loss={known.value!r} and loss_family={family.value!r} contradict each other; the family "
                "of a built-in loss is its own."
            )
        fn = F.cross_entropy if known is EkfacLoss.CROSS_ENTROPY else F.mse_loss
        spec = LossSpec(fn, known, True, default_logits)
        spec.loss = OnLogits(fn, spec)
    elif callable(loss):
        spec = LossSpec(loss, family, False, default_logits)
    else:
        raise TypeError(
            "loss must be a callable loss(outputs, y) (the batch mean), 'cross_entropy' or 'mse'; "
            f"got {loss!r}."
        )
    if output_logits is not None:
        if not callable(output_logits):
            raise TypeError(f"output_logits must be a callable outputs -> Tensor; got {output_logits!r}.")
        spec.logits_of = output_logits
    if spec.family is None and fisher is not FisherType.EMPIRICAL:
        raise ValueError(
            f"fisher='{fisher.value}' samples from (or sums over) the model's predictive distribution and "
            f"needs the loss family of loss={getattr(loss, '__name__', loss)!r}: pass "
            "loss_family='cross_entropy' or 'mse' (see EkfacLoss), or use fisher='empirical', which needs "
            "only the loss."
        )
    return spec
