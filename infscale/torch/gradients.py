"""Per-sample gradients that do not depend on vmap tracing the user's forward.

Routes, per parameter, fastest first:

1. **batched** (``infscale.torch.batched``, kinds in ``infscale.torch.layer_kinds``): one batched
   forward with hooks on the covered modules (``nn.Linear`` at any number of positions, HuggingFace
   ``Conv1D``, ``nn.Conv1d``/``nn.Conv2d``, ``nn.Embedding``, ``LayerNorm``/``RMSNorm``/``GroupNorm``,
   eval-mode ``BatchNorm``) and one backward; a transformer built from these needs no vmap, and
   data-dependent control flow in its forward (attention masks, HuggingFace's checks) is fine.
   Linear-like weights stay factored (``FactoredGradients``): the product of test factors with
   training gradients is ``Σ_t δᵢₜᵀ F aᵢₜ`` and the (n, p) matrix of training gradients is never formed.
2. **vmap**: ``vmap(grad)`` for the parameters of modules of other kinds (only those parameters vary).
3. **loop**: plain autograd on one sample at a time, for models vmap cannot trace (RNNs with default
   initial states, HuggingFace models); slow, announced once by a warning naming the modules.

Correctness check, once per input signature (feature shapes, dtypes, device): for every batched
parameter, sample 0's gradient must equal the plain autograd gradient of the batch of one (catches
samples that interact), and the sum over the batch must equal the plain gradient of the summed loss
(catches a parameter also used outside its modules). A parameter failing either takes the vmap
route; a vmap result failing the sample-0 comparison, or vmap raising, the loop. A parameter held by
several covered modules (tied weights: GPT-2's ``lm_head`` and ``wte``) gets the sum of their parts.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .batched import Captured, Coverage, _LinearLayer, capture, plain_batch_gradient
from .capture import loop_gradients, vmap_gradients
from .data import batch_size_of, feature_layout, take_rows
from .factored import (
    FactoredGradients,
    _form_weight_gradients,  # noqa: F401  (importable from here, as before)
    weight_gradients,
    weight_gradients_into,
    weight_squared_norms,
)
from .factored_ops import FactoredProducts
from .kernels import derivative_kernels, needs_kernel_switch, vmap_kernels
from .layout import LossFunction, ParameterLayout, _Block
from .memory import default_chunk_size, pass_rows

__all__ = ["GradientEngine", "FactoredGradients", "gradient_engine", "per_sample_gradients"]


def _slice_or_index(positions: list[int]) -> slice | Tensor:
    if positions and positions == list(range(positions[0], positions[0] + len(positions))):
        return slice(positions[0], positions[0] + len(positions))
    return torch.tensor(positions, dtype=torch.long)


_TRAINING_SENSITIVE = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)


@dataclass(frozen=True)
class _Verdict:
    """The check's outcome for one input signature."""

    failed: frozenset[str] = frozenset()  # batched parameters whose gradients differed: vmap (or loop)
    loop: frozenset[str] = frozenset()  # vmap parameters whose gradients differed: the loop
    rows: int = 0  # samples in the checked batch (one sample cannot show samples that interact)
    expanded: bool = False  # whether the checked pass expanded a broadcast output


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-10, torch.float32: 1e-3}.get(dtype, 2e-2)


def _differ(got: Tensor, expected: Tensor, scale: Tensor | float, tol: float) -> bool:
    return bool((got - expected).norm() > tol * (scale + expected.norm()) + torch.finfo(got.dtype).tiny)


class GradientEngine(FactoredProducts):
    """Per-sample gradients and factor products for the parameters of a layout (or of one block).

    Positions in the flat vector are the layout's (``ParameterLayout.offsets``). Parameter values
    are read from the layout at every call, so the engine always sees the model's current values.
    Inputs x are a tensor (``model(x)``) or a mapping of tensors (``model(**x)``).

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
        self.offsets = layout.offsets(block)
        self.size = block.size if block else layout.n_parameters
        self.coverage = Coverage.of(self.model, self.names, self.offsets)
        self.layers: list[_LinearLayer] = self.coverage.layers
        factored = set(self.coverage.factored_names)
        self.rest = [n for n in self.names if n not in factored]
        positions = [i for n in self.rest for i in range(self.offsets[n].start, self.offsets[n].stop)]
        self.rest_index = _slice_or_index(positions)
        self.rest_index_list = positions
        self.rest_columns: dict[str, slice] = {}
        start = 0
        for n in self.rest:
            width = self.offsets[n].stop - self.offsets[n].start
            self.rest_columns[n] = slice(start, start + width)
            start += width
        self._verdicts: dict[tuple, _Verdict] = {}  # input signature → the check's outcome
        self._vmap_error: str | None = None  # why vmap could not trace the model, once it failed
        self._loss_vmap = True  # whether vmap can take the loss of one sample
        self._warned: set[str] = set()
        self._switch_kernels = needs_kernel_switch(self.model, 1)  # (RNNs on CUDA)

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

    @property
    def batched_ok(self) -> bool:
        """Whether the batched pass covers some parameter of this model in its current mode."""
        return bool(self.coverage.modules) and self._batched_allowed()

    def _kernels(self):
        """The kernel context of first-order derivatives (``kernels.derivative_kernels``)."""
        return derivative_kernels(self.model, 1) if self._switch_kernels else nullcontext()

    def _batched_allowed(self) -> bool:
        if not self.coverage.modules:
            return False
        # batch norm in training mode mixes samples, dropout draws masks: not a per-sample function
        # (dropout with p = 0, as in HuggingFace configs fine-tuned without it, changes nothing)
        return not any(
            m.training and not (isinstance(m, nn.modules.dropout._DropoutNd) and m.p == 0)
            for m in self.model.modules()
            if isinstance(m, _TRAINING_SENSITIVE)
        )

    # ---------------------------------------------------------------- fallbacks
    def _warn_loop(self, names: list[str], reason: str) -> None:
        modules = sorted({n.rsplit(".", 1)[0] if "." in n else n for n in names} - self._warned)
        if modules:
            self._warned.update(modules)
            warnings.warn(
                f"infscale: per-sample gradients of the parameters of {modules} are computed one sample "
                f"at a time (slow): {reason}",
                stacklevel=4,
            )

    def _vmap(self, names: list[str], x: Any, y: Tensor) -> dict[str, Tensor]:
        """Per-sample gradients of ``names`` by vmap(grad), the other parameters held fixed."""
        params = self.parameters
        varying = {k: params[k] for k in names}
        fixed = {**self.fixed, **{k: p for k, p in params.items() if k not in varying}}
        with vmap_kernels(), warnings.catch_warnings():
            # an operation without a batching rule (nn.EmbeddingBag's) is looped over inside vmap:
            # slower, the same values, nothing the user can change
            warnings.filterwarnings("ignore", "There is a performance drop", UserWarning)
            return vmap_gradients(self.model, self.loss, varying, fixed, x, y)

    def _vmap_failed(self, error: Exception) -> None:
        self._vmap_error = f"vmap(grad) cannot trace the model ({str(error).splitlines()[0][:200]})"

    def _fallback_into(
        self,
        out: Tensor,
        columns: Mapping[str, slice],
        names: list[str],
        x: Any,
        y: Tensor,
        chunk: int,
        verdict: _Verdict,
    ) -> None:
        """Writes the per-sample gradients of ``names`` into ``out[:, columns[name]]``: by vmap(grad),
        or by the per-sample loop where vmap fails or the check found it wrong."""
        if not names:
            return
        n = batch_size_of(x)
        params = self.parameters
        loop = [k for k in names if k in verdict.loop or self._vmap_error is not None]
        traced = [k for k in names if k not in loop]
        if traced:
            try:
                for s in range(0, n, chunk):
                    g = self._vmap(traced, take_rows(x, slice(s, s + chunk)), y[s : s + chunk])
                    for k in traced:
                        out[s : s + chunk, columns[k]] = g[k].reshape(g[k].shape[0], -1)
            except Exception as error:  # noqa: BLE001 - vmap cannot trace this model: the loop can
                self._vmap_failed(error)
                loop += traced
        if loop:
            reason = self._vmap_error or "vmap(grad) gives other values than autograd for them"
            self._warn_loop(loop, reason)
            varying = {k: params[k] for k in loop}
            fixed = {**self.fixed, **{k: p for k, p in params.items() if k not in varying}}
            g = loop_gradients(self.model, self.loss, varying, fixed, x, y)
            for k in loop:
                out[:, columns[k]] = g[k].reshape(n, -1)

    # ---------------------------------------------------------------- batched path
    def _signature(self, x: Any, y: Tensor) -> tuple:
        return (feature_layout(x), tuple(y.shape[1:]), y.dtype)

    def _capture(self, x: Any, y: Tensor, with_total: bool) -> Captured:
        cap = capture(
            self.model,
            self.loss,
            self.coverage,
            self.parameters,
            self.fixed,
            x,
            y,
            with_total,
            self._loss_vmap,
        )
        self._loss_vmap = cap.loss_vmap
        return cap

    def _fill_dense(self, cap: Captured, out: Tensor, columns: Mapping[str, slice]) -> None:
        """Writes the batched dense parameters' gradients into ``out[:, columns[name]]``."""
        for name in self.coverage.dense_names:
            out[:, columns[name]] = 0
        for use in self.coverage.dense:
            if id(use.module) not in cap.bad:
                cap.add_dense(use, {k: out[:, columns[n]] for k, n in use.names.items()})

    def _layer_gradient_into(self, out: Tensor, layer: _LinearLayer, a: Tensor, d: Tensor) -> None:
        n = a.shape[0]
        if layer.weight_index is not None:
            weight_gradients_into(out[:, layer.weight_index].view(n, layer.rows, layer.cols), a, d)
        if layer.bias_index is not None:
            torch.sum(layer.bias_factor(a, d), dim=1, out=out[:, layer.bias_index])

    def _verify(
        self, x: Any, y: Tensor, cap: Captured, dense: Tensor, columns: Mapping[str, slice], bad: set[str]
    ) -> _Verdict:
        """The check (module docstring) for the batch x, whose dense batched gradients are in
        ``dense[:, columns[name]]``."""
        params, fixed, tol = self.parameters, self.fixed, _tolerance(self._dtype)
        reference = loop_gradients(self.model, self.loss, params, fixed, take_rows(x, slice(0, 1)), y[:1])
        reference = {k: v[0].reshape(-1) for k, v in reference.items()}
        total = cap.total
        if total is None:
            total = plain_batch_gradient(self.model, self.loss, params, fixed, x, y)
        total = {k: v.reshape(-1) for k, v in total.items()}
        failed = set(bad)
        checks: list[tuple[str, Tensor, Tensor, Tensor]] = []  # (name, sample 0, batch sum, Σᵢ‖gᵢ‖)
        for layer in self.layers:
            if id(layer.module) in cap.bad:
                continue
            a, d = cap.factors(layer, self._dtype)
            if layer.weight is not None:
                first = weight_gradients(a[:1], d[:1]).reshape(-1)
                summed = (d.reshape(-1, layer.rows).T @ a.reshape(-1, layer.cols)).reshape(-1)
                checks.append((layer.weight, first, summed, weight_squared_norms(a, d).sqrt().sum()))
            if layer.bias is not None:
                b = layer.bias_factor(a, d).sum(dim=1)
                checks.append((layer.bias, b[0], b.sum(dim=0), b.norm(dim=1).sum()))
        for name in self.coverage.dense_names:
            if name not in bad:
                g = dense[:, columns[name]]
                checks.append((name, g[0], g.sum(dim=0), g.norm(dim=1).sum()))
        # rounding relative to the whole gradient, for parameters whose gradient is zero in exact
        # arithmetic (an attention key's bias: softmax ignores a constant shift)
        floor_first = tol * 1e-2 * torch.cat(list(reference.values())).norm()
        floor_sum = tol * 1e-2 * sum(float(c[3]) for c in checks)
        for name, first, summed, scale in checks:
            if _differ(first, reference[name], first.norm() + floor_first / tol, tol) or _differ(
                summed, total[name], scale + floor_sum / tol, tol
            ):
                failed.add(name)
        loop: set[str] = set()
        traced = [k for k in self.names if k in failed or k in self.coverage.uncovered]
        if traced and self._vmap_error is None:
            try:
                g = self._vmap(traced, take_rows(x, slice(0, 2)), y[:2])
            except Exception as error:  # noqa: BLE001 - vmap cannot trace this model: the loop can
                self._vmap_failed(error)
            else:
                loop = {
                    k for k in traced if _differ(g[k][0].reshape(-1), reference[k], reference[k].norm(), tol)
                }
        return _Verdict(frozenset(failed), frozenset(loop), cap.n, cap.expanded)

    def _unchecked(self, signature: tuple, x: Any, expanded: bool) -> bool:
        """Whether a batch like x needs the check: its signature was never checked, or only on one
        sample (which cannot show samples that interact), or without the broadcast outputs this pass
        expanded (the expansion itself must be shown harmless)."""
        verdict = self._verdicts.get(signature)
        return (
            verdict is None
            or (verdict.rows < 2 and batch_size_of(x) >= 2)
            or (expanded and not verdict.expanded)
        )

    def _verdict(
        self, signature: tuple, x: Any, y: Tensor, cap: Captured, dense: Tensor, columns, bad: set[str]
    ) -> _Verdict:
        """The check's outcome for this batch: remembered for its signature, or found now."""
        if self._unchecked(signature, x, cap.expanded):
            self._verdicts[signature] = self._verify(x, y, cap, dense, columns, bad)
        return self._verdicts[signature]

    def _batched_into(self, out: Tensor, x: Any, y: Tensor, chunk: int) -> None:
        """All per-sample gradients of x into ``out`` (n, size): batched where the check allows."""
        if not self._batched_allowed():
            self._fallback_into(out, self.offsets, self.names, x, y, chunk, _Verdict())
            return
        signature = self._signature(x, y)
        cap = self._capture(x, y, with_total=self._unchecked(signature, x, False))
        bad = self.coverage.bad_names(cap)
        for layer in self.layers:
            if id(layer.module) not in cap.bad:
                self._layer_gradient_into(out, layer, *cap.factors(layer, self._dtype))
        self._fill_dense(cap, out, self.offsets)
        verdict = self._verdict(signature, x, y, cap, out, self.offsets, bad)
        uncovered = set(self.coverage.uncovered)
        fallback = [k for k in self.names if k in uncovered or k in verdict.failed or k in bad]
        self._fallback_into(out, self.offsets, fallback, x, y, chunk, verdict)

    # ---------------------------------------------------------------- public
    def gradients(self, x: Any, y: Tensor, chunk_size: int) -> Tensor:
        """Per-sample gradients, (n, size). ``chunk_size``: samples per vmap call of the fallback."""
        n, rows_per_pass = batch_size_of(x), pass_rows()
        out = torch.empty(n, self.size, dtype=self._dtype, device=self.layout.device)
        with self._kernels():
            if 0 < n <= rows_per_pass:  # one pass (the common case): no slicing
                self._batched_into(out, x, y, chunk_size)
                return out
            for s in range(0, n, rows_per_pass):
                rows = slice(s, s + rows_per_pass)
                self._batched_into(out[rows], take_rows(x, rows), y[rows], chunk_size)
        return out

    def routes(self, x: Any, y: Tensor) -> dict[str, str]:
        """name → how its per-sample gradients come for inputs like x: "batched", "vmap" or "loop"
        (runs the check on the first two samples if inputs like x have not been seen)."""
        if self._batched_allowed() and self._unchecked(self._signature(x, y), x, False):
            self.gradients(take_rows(x, slice(0, 2)), y[:2], 2)
        verdict = self._verdicts.get(self._signature(x, y), _Verdict())
        fallback = (
            set(self.coverage.uncovered) | verdict.failed if self._batched_allowed() else set(self.names)
        )
        loop = verdict.loop if self._vmap_error is None else set(self.names)
        return {k: "batched" if k not in fallback else "loop" if k in loop else "vmap" for k in self.names}

    def factored(self, x: Any, y: Tensor, chunk_size: int) -> FactoredGradients | Tensor:
        """Per-sample gradients in factored form, or dense (n, size) where the factored form doesn't
        apply or isn't smaller (then the caller gets the same values)."""
        n, rows_per_pass = batch_size_of(x), pass_rows()
        if not n or not self.layers or not self._batched_allowed():
            return self.gradients(x, y, chunk_size)
        rest = torch.zeros(n, len(self.rest_index_list), dtype=self._dtype, device=self.layout.device)
        parts: list[list[tuple[Tensor, Tensor]]] = []
        factored_names = self.coverage.factored_names
        uncovered = set(self.coverage.uncovered)
        with self._kernels():
            for s in range(0, n, rows_per_pass):
                rows = slice(s, s + rows_per_pass)
                xs, ys = (x, y) if n <= rows_per_pass else (take_rows(x, rows), y[rows])
                signature = self._signature(xs, ys)
                cap = self._capture(xs, ys, with_total=self._unchecked(signature, xs, False))
                bad = self.coverage.bad_names(cap)
                self._fill_dense(cap, rest[rows], self.rest_columns)
                verdict = self._verdict(signature, xs, ys, cap, rest[rows], self.rest_columns, bad)
                if any(k in verdict.failed or k in bad for k in factored_names):
                    return self.gradients(x, y, chunk_size)
                parts.append([cap.factors(layer, self._dtype) for layer in self.layers])
                positions = [a.shape[1] for a, _ in parts[-1]]
                if positions != [a.shape[1] for a, _ in parts[0]]:
                    return self.gradients(x, y, chunk_size)
                if (
                    s == 0
                    and len(self.rest_index_list)
                    + sum(a.shape[1] * (a.shape[2] + d.shape[2]) for a, d in parts[0])
                    >= self.size
                ):  # many positions per sample: the dense form is smaller
                    return self.gradients(x, y, chunk_size)
                fallback = [k for k in self.rest if k in uncovered or k in verdict.failed or k in bad]
                self._fallback_into(rest[rows], self.rest_columns, fallback, xs, ys, chunk_size, verdict)
        items: list[Tensor] = [rest]
        for k in range(len(self.layers)):
            items.append(torch.cat([p[k][0] for p in parts]) if len(parts) > 1 else parts[0][k][0])
            items.append(torch.cat([p[k][1] for p in parts]) if len(parts) > 1 else parts[0][k][1])
        return FactoredGradients(items)


def gradient_engine(
    layout: ParameterLayout, loss: LossFunction, block: _Block | None = None
) -> GradientEngine:
    """The per-sample gradient engine of the layout's parameters (of one block, if given)."""
    return GradientEngine(layout, loss, block)


def per_sample_gradients(
    layout: ParameterLayout,
    loss: LossFunction,
    x: Any,
    y: Tensor,
    chunk_size: int | None = None,
    block: _Block | None = None,
) -> Tensor:
    """Per-sample gradients ∇_θ ℓ(x_i, y_i), shape (n, p) (p of the block if given).

    Covered layers come from one batched forward/backward; other parameters from ``vmap(grad)``
    in chunks of ``chunk_size`` samples (default: ``memory.default_chunk_size``), so memory stays
    bounded by chunk_size · (p + activations), or, where vmap cannot trace the model, from a loop.
    """
    engine = GradientEngine(layout, loss, block)
    itemsize = layout.dtype.itemsize
    chunk = chunk_size or default_chunk_size(engine.size, itemsize)
    return engine.gradients(x, y, chunk)
