"""The layers EK-FAC models and the Kronecker factors it fits from them.

Layer discovery (``find_layers``: ``nn.Linear`` and ``nn.Conv2d`` with groups=1), the per-sample
quantities of each layer from one batched forward/backward (``LayerCapture``: input patches ã and
output gradients δ), and the passes over the data that accumulate the factors A = E[ã ãᵀ] and
G = E[δ δᵀ] (``accumulate_factors``) and the EK-FAC diagonal in their eigenbasis
(``accumulate_diagonal``). See ``infscale.torch.ekfac`` for the model and docs/ekfac.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .capture import capture_layer_calls, live_state
from .data import batch_size_of
from .layout import ParameterLayout
from .memory import default_chunk_size

__all__ = ["EkfacLoss", "FisherType", "find_layers", "LayerCapture"]


class EkfacLoss(str, Enum):
    """The training loss, which fixes both the gradients and the curvature.

    - ``CROSS_ENTROPY``: ``torch.nn.functional.cross_entropy``; outputs (n, C) logits,
      integer class labels (n,).
    - ``MSE``: ``torch.nn.functional.mse_loss`` with its default ``reduction="mean"``: the
      per-sample loss is ``mean_k (f_k(x) - y_k)²`` over the k output elements, so its Hessian
      with respect to the outputs is ``(2/k) I``. Float targets shaped like the outputs.
    """

    CROSS_ENTROPY = "cross_entropy"
    MSE = "mse"


class FisherType(str, Enum):
    """How the output gradients δ that form G (and the EK-FAC diagonal) are drawn.

    - ``TRUE``: labels sampled from the model's predictive distribution (seeded): a class
      y ~ softmax(f(x)) for cross-entropy, y ~ N(f(x), (k/2) I) for MSE. In expectation this is
      the Gauss-Newton matrix of the loss (the (k/2) variance makes it so for ``mse_loss``'s
      1/k scaling). One sample per training point.
    - ``EMPIRICAL``: the given labels (the empirical Fisher, E[∇ℓ ∇ℓᵀ]).
    - ``EXACT``: the expectation over the predictive distribution computed exactly, by
      back-propagating the k columns of a square root of the output Hessian (k = number of
      classes or outputs; k backward passes per batch). Equals the Gauss-Newton matrix, so for
      a single sample the K-FAC model of a Linear layer is exact.
    """

    TRUE = "true"
    EMPIRICAL = "empirical"
    EXACT = "exact"


@dataclass
class _Layer:
    path: str  # module path in the model ("" for the model itself)
    block: str  # block name in the parameter layout
    module: nn.Module
    kind: str  # "linear" | "conv2d"
    weight: str  # full parameter names
    bias: str | None
    d_out: int
    d_in: int  # columns of the gradient matrix, including the bias column

    @property
    def n_weight(self) -> int:
        return self.d_out * (self.d_in - (self.bias is not None))


def module_label(path: str, module: nn.Module) -> str:
    return f"{path!r} ({type(module).__name__})" if path else f"the model itself ({type(module).__name__})"


def find_layers(model: nn.Module) -> tuple[list[_Layer], list[tuple[str, nn.Module, list[str], str]]]:
    """Supported layers, and (path, module, trainable parameter names, reason) of the others."""
    layers, unsupported = [], []
    for path, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        trainable = [n for n, p in own.items() if p.requires_grad]
        if not trainable:
            continue
        prefix = f"{path}." if path else ""
        names = [prefix + n for n in trainable]
        reason = None
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            weight = own.get("weight")
            bias = own.get("bias")
            if weight is None or not weight.requires_grad:
                reason = "its weight is frozen but its bias is trainable; freeze both or neither"
            elif isinstance(module, nn.Linear) and weight.ndim != 2:
                reason = f"its weight has shape {tuple(weight.shape)}; EK-FAC needs a 2-d (out, in) weight"
            elif isinstance(module, nn.Conv2d) and module.groups != 1:
                reason = f"groups={module.groups}; only Conv2d with groups=1 is supported"
        else:
            reason = (
                f"EK-FAC has no Kronecker factors for torch.nn.{type(module).__name__}; the supported "
                "layers are torch.nn.Linear and torch.nn.Conv2d (groups=1)"
            )
        if reason is not None:
            unsupported.append((path, module, names, reason))
            continue
        has_bias = bias is not None and bias.requires_grad
        if isinstance(module, nn.Linear):
            # the weight's shape (out, in) is what F.linear runs with, whatever in/out_features say
            kind, (d_out, d_in) = "linear", own["weight"].shape
        else:
            kind = "conv2d"
            d_out = module.out_channels
            d_in = module.in_channels * math.prod(module.kernel_size)
        layers.append(
            _Layer(
                path=path,
                block=path or "root",
                module=module,
                kind=kind,
                weight=prefix + "weight",
                bias=prefix + "bias" if has_bias else None,
                d_out=d_out,
                d_in=d_in + has_bias,
            )
        )
    return layers, unsupported


# ---------------------------------------------------------------- checks
def check_targets(loss_type: EkfacLoss, y: Tensor, name: str, where: str) -> None:
    """Raises ValueError when ``y`` are no targets of ``loss_type``."""
    if loss_type is EkfacLoss.CROSS_ENTROPY:
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


def check_outputs(loss_type: EkfacLoss, f: Tensor, y: Tensor | None, where: str) -> None:
    """Raises ValueError when model outputs ``f`` don't fit ``loss_type`` (and targets ``y``)."""
    if loss_type is EkfacLoss.CROSS_ENTROPY:
        if f.ndim != 2:
            raise ValueError(
                f"{where}: loss='cross_entropy' needs model outputs of shape (n, n_classes); "
                f"got {tuple(f.shape)}."
            )
    elif y is not None and f.shape != y.shape:
        raise ValueError(
            f"{where}: loss='mse' needs targets shaped like the model's outputs; outputs have shape "
            f"{tuple(f.shape)}, targets {tuple(y.shape)}."
        )


# ---------------------------------------------------------------- flat layout ↔ matrices
def to_matrix(layer: _Layer, flat: Tensor) -> Tensor:
    """(k, p_block) in the flat layout → (k, d_out, d_in) gradient matrices [W | b]."""
    k = flat.shape[0]
    w = flat[:, : layer.n_weight].reshape(k, layer.d_out, -1)
    if layer.bias is None:
        return w
    return torch.cat([w, flat[:, layer.n_weight :].reshape(k, layer.d_out, 1)], dim=2)


def to_flat(layer: _Layer, M: Tensor) -> Tensor:
    """(k, d_out, d_in) gradient matrices [W | b] → (k, p_block) in the flat layout."""
    k = M.shape[0]
    if layer.bias is None:
        return M.reshape(k, -1)
    return torch.cat([M[:, :, :-1].reshape(k, -1), M[:, :, -1]], dim=1)


# ---------------------------------------------------------------- per-sample quantities
class LayerCapture:
    """Per layer, from one batched forward/backward (``capture.capture_layer_calls``): the input
    patches ã (n, T, d_in) and the output gradients δ (n, T, d_out), in ``factor_dtype``. The
    parameters pass as detached copies: the model is not changed."""

    def __init__(self, layout: ParameterLayout, layers: list[_Layer], loss_type: EkfacLoss, factor_dtype):
        self.layout = layout
        self.layers = layers
        self.loss_type = loss_type
        self.factor_dtype = factor_dtype

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """Model outputs, and per layer its input patches ã (n, T, d_in) in the factor dtype and
        its output (in the autograd graph)."""
        state = live_state(self.layout.parameters(), self.layout.fixed_state())
        f, records = capture_layer_calls(self.layout.model, [ly.module for ly in self.layers], state, x)
        missing = []
        for layer, calls in zip(self.layers, records):
            if len(calls) > 1:
                raise ValueError(
                    f"EkfacInfluence: layer {module_label(layer.path, layer.module)} is called more than "
                    "once per forward pass (shared weights); K-FAC/EK-FAC needs one call per layer."
                )
            if not calls:
                missing.append(module_label(layer.path, layer.module))
        if missing:
            raise ValueError(
                f"EkfacInfluence: layers {missing} were not called by the model's forward pass "
                "(their parameters are used some other way); freeze them or leave them out."
            )
        patches = {
            ly.block: self._patches(ly, calls[0][0].detach()) for ly, calls in zip(self.layers, records)
        }
        outputs = {ly.block: calls[0][1] for ly, calls in zip(self.layers, records)}
        return f, patches, outputs

    def _patches(self, layer: _Layer, a: Tensor) -> Tensor:
        n = a.shape[0]
        m = layer.module
        if layer.kind == "linear":
            a = a.reshape(n, -1, m.weight.shape[1])
        else:
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
                a = F.pad(a, m._reversed_padding_repeated_twice, mode=mode)
                padding = 0
            else:
                padding = m.padding
            a = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)
            a = a.transpose(1, 2)  # (n, T, C·kh·kw), channel-major as in weight.reshape(d_out, -1)
        a = a.to(self.factor_dtype)
        if layer.bias is not None:
            a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
        return a

    def _output_gradient(self, layer: _Layer, d: Tensor) -> Tensor:
        n = d.shape[0]
        if layer.kind == "linear":
            d = d.reshape(n, -1, layer.d_out)
        else:
            d = d.reshape(n, layer.d_out, -1).transpose(1, 2)
        return d.to(self.factor_dtype)

    def _output_vectors(self, f: Tensor, y: Tensor | None, fisher: FisherType, generator) -> list[Tensor]:
        """Vectors v (like f) with δ = J_sᵀ v: the gradient of each sample's loss with respect to
        the outputs (given or sampled labels), or the columns of a square root of its Hessian."""
        f = f.detach()
        if self.loss_type is EkfacLoss.CROSS_ENTROPY:
            p = torch.softmax(f, dim=1)
            if fisher is FisherType.EXACT:
                eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
                return [p[:, c : c + 1].sqrt() * (eye[c] - p) for c in range(p.shape[1])]
            if fisher is FisherType.TRUE:
                y = torch.multinomial(p, 1, generator=generator).squeeze(1)
            return [p - F.one_hot(y, p.shape[1]).to(p.dtype)]
        k = f[0].numel() if f.shape[0] else 1
        if fisher is FisherType.EXACT:
            flat = f.reshape(f.shape[0], -1)
            eye = torch.eye(k, dtype=f.dtype, device=f.device)
            return [(math.sqrt(2 / k) * eye[c]).expand_as(flat).reshape(f.shape) for c in range(k)]
        if fisher is FisherType.TRUE:
            eps = torch.randn(f.shape, generator=generator, dtype=f.dtype, device=f.device)
            return [math.sqrt(2 / k) * eps]
        return [(2 / k) * (f - y)]

    def capture(self, x: Tensor, y: Tensor | None, fisher: FisherType, generator=None, where: str = ""):
        """Per layer: input patches ã (n, T, d_in) and a list of output gradients δ (n, T, d_out),
        one per output vector (all in the factor dtype)."""
        f, patches, outputs = self.forward(x)
        check_outputs(self.loss_type, f, y, where)
        vectors = self._output_vectors(f, y, fisher, generator)
        layer_outputs = [outputs[layer.block] for layer in self.layers]
        deltas: dict[str, list[Tensor]] = {layer.block: [] for layer in self.layers}
        for i, v in enumerate(vectors):
            grads = torch.autograd.grad(
                f, layer_outputs, grad_outputs=v, retain_graph=i < len(vectors) - 1, allow_unused=True
            )
            for layer, g, s in zip(self.layers, grads, layer_outputs):
                g = torch.zeros_like(s) if g is None else g
                deltas[layer.block].append(self._output_gradient(layer, g))
        return patches, deltas


# ---------------------------------------------------------------- passes over the data
def accumulate_factors(
    capture: LayerCapture, batches: Iterable[tuple[Tensor, Tensor]], fisher: FisherType, generator, where: str
) -> tuple[int, dict[str, Tensor], dict[str, Tensor]]:
    """One pass: the number of samples n and, per layer, A = Σ ã ãᵀ / n (summed over locations)
    and G = Σ δ δᵀ / (number of locations) (averaged over them: KFC; for T = 1 both are means)."""
    device, fd = capture.layout.device, capture.factor_dtype
    A = {ly.block: torch.zeros(ly.d_in, ly.d_in, dtype=fd, device=device) for ly in capture.layers}
    G = {ly.block: torch.zeros(ly.d_out, ly.d_out, dtype=fd, device=device) for ly in capture.layers}
    locations = dict.fromkeys(A, 0)
    n = 0
    for x, y in batches:
        patches, deltas = capture.capture(x, y, fisher, generator, where)
        for ly in capture.layers:
            a = patches[ly.block].flatten(0, 1)
            A[ly.block] += a.T @ a
            for d in deltas[ly.block]:
                d = d.flatten(0, 1)
                G[ly.block] += d.T @ d
            locations[ly.block] += patches[ly.block].shape[0] * patches[ly.block].shape[1]
        n += batch_size_of(x)
    if n:
        A = {b: v / n for b, v in A.items()}
        G = {b: v / max(locations[b], 1) for b, v in G.items()}
    return n, A, G


def rotated(q_g: Tensor, q_a: Tensor, d: Tensor, a: Tensor, dtype: torch.dtype) -> Tensor:
    """Per-sample gradients Σ_t δ_t ã_tᵀ rotated into the eigenbasis (Q_Gᵀ g Q_A): (n, d_out, d_in),
    in ``dtype`` (the rotations run in the dtype of the eigenvectors)."""
    T, do, di = a.shape[1], q_g.shape[0], q_a.shape[0]
    if T * (do * do + di * di) <= do * di * (do + di):
        # rotate the vectors, then form the (sum of) outer products, never the gradient itself
        return torch.einsum("ntk,ntl->nkl", (d @ q_g).to(dtype), (a @ q_a).to(dtype))
    return (q_g.T @ torch.einsum("ntk,ntl->nkl", d, a) @ q_a).to(dtype)


def rotated_squares(q_g: Tensor, q_a: Tensor, d: Tensor, a: Tensor) -> Tensor:
    """Σ_n (Q_Gᵀ g_n Q_A)² for one output vector: (d_out, d_in)."""
    if a.shape[1] == 1:  # rank one per sample: the square is an outer product of squares
        return (d[:, 0] @ q_g).square().T @ (a[:, 0] @ q_a).square()
    total = torch.zeros(q_g.shape[0], q_a.shape[0], dtype=a.dtype, device=a.device)
    chunk = default_chunk_size(q_g.shape[0] * q_a.shape[0], a.element_size())
    for s in range(0, a.shape[0], chunk):
        total += rotated(q_g, q_a, d[s : s + chunk], a[s : s + chunk], a.dtype).square().sum(0)
    return total


def accumulate_diagonal(
    capture: LayerCapture,
    batches: Iterable[tuple[Tensor, Tensor]],
    fisher: FisherType,
    generator,
    where: str,
    eigenvectors_G: dict[str, Tensor],
    eigenvectors_A: dict[str, Tensor],
) -> dict[str, Tensor]:
    """One pass: per layer Σ_n (Q_Gᵀ g_n Q_A)², summed over the samples and output vectors (the
    EK-FAC diagonal times n)."""
    device, fd = capture.layout.device, capture.factor_dtype
    diag = {ly.block: torch.zeros(ly.d_out, ly.d_in, dtype=fd, device=device) for ly in capture.layers}
    for x, y in batches:
        patches, deltas = capture.capture(x, y, fisher, generator, where)
        for ly in capture.layers:
            q_g, q_a = eigenvectors_G[ly.block], eigenvectors_A[ly.block]
            for d in deltas[ly.block]:
                diag[ly.block] += rotated_squares(q_g, q_a, d, patches[ly.block])
    return diag
