"""K-FAC and EK-FAC influence: Kronecker-factored curvature per Linear / Conv2d layer.

For a layer with weight ``W`` (d_out × d_in) and bias ``b``, the per-sample gradient is the
outer product ``g = δ ãᵀ`` of the gradient ``δ`` of the per-sample loss with respect to the
layer's output and the layer input ``ã = [a, 1]`` (the 1 only when the layer has a bias). In
infscale's flat layout (``weight`` row-major, then ``bias``) the gradient of a layer is
``vec(g) = δ ⊗ ã`` and its Fisher block is approximated as

    F ≈ G ⊗ A,    A = E[ã ãᵀ],   G = E[δ δᵀ]                                   (K-FAC)

With the eigendecompositions ``A = Q_A Λ_A Q_Aᵀ`` and ``G = Q_G Λ_G Q_Gᵀ``, the inverse is
applied to a gradient matrix ``V`` (d_out × d_in) as ``Q_G [(Q_Gᵀ V Q_A) / (Λ + λ)] Q_Aᵀ``
with ``Λ_ij = Λ_G,i Λ_A,j`` (K-FAC) or, with ``update_diagonal=True`` (EK-FAC, George et al.
2018), ``Λ_ij = E[(Q_Gᵀ g Q_A)_ij²]`` fitted in a second pass over the data.

Conv2d layers use KFC (Grosse & Martens 2016): ``ã_t`` are the input patches (as
``torch.nn.functional.unfold`` extracts them, honouring padding, stride and dilation) at the
output locations t = 1..T, ``δ_t`` the output gradients there, the per-sample gradient is
``g = Σ_t δ_t ã_tᵀ``, and

    A = E[Σ_t ã_t ã_tᵀ]   (summed over locations),   G = E[Σ_t δ_t δ_tᵀ] / T   (averaged),

so that ``G ⊗ A`` approximates ``E[g gᵀ]`` under the paper's independence, spatial homogeneity
and spatially-uncorrelated-derivatives assumptions. Linear layers applied to inputs with extra
dimensions (e.g. sequences, (n, T, d)) follow the same convention with T the product of the
extra dimensions.

See docs/ekfac.md for the loss and Fisher conventions.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..base import InfluenceMode
from .base import TorchInfluenceFunctionModel
from .functional import _Block, _parse_enum, default_chunk_size, loader_batches, split_batch

__all__ = ["EkfacInfluence", "EkfacLoss", "FisherType"]

_FORMAT = "infscale.ekfac/1"


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


def _module_label(path: str, module: nn.Module) -> str:
    return f"{path!r} ({type(module).__name__})" if path else f"the model itself ({type(module).__name__})"


def _find_layers(model: nn.Module) -> tuple[list[_Layer], list[tuple[str, nn.Module, list[str], str]]]:
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
            elif isinstance(module, nn.Conv2d) and module.groups != 1:
                reason = f"groups={module.groups}; only Conv2d with groups=1 is supported"
        else:
            reason = "only torch.nn.Linear and torch.nn.Conv2d (groups=1) are supported"
        if reason is not None:
            unsupported.append((path, module, names, reason))
            continue
        has_bias = bias is not None and bias.requires_grad
        if isinstance(module, nn.Linear):
            kind, d_out, d_in = "linear", module.out_features, module.in_features
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


class EkfacInfluence(TorchInfluenceFunctionModel):
    """Influences with the (eigenvalue-corrected) Kronecker-factored curvature of each layer.

    One block per supported layer (``nn.Linear``, ``nn.Conv2d`` with groups=1), named by the
    layer's path in the model (``"root"`` if the model is a single layer); cross-layer curvature
    is dropped, and influences are the sum over layers. The curvature is the Fisher of ``loss``
    (see ``fisher``), which for cross-entropy and MSE in expectation equals the Gauss-Newton
    matrix of the **mean** training loss; the query gradients are gradients of the same loss
    with the given labels. Sign convention: ``influences = ∇ℓ(z_test)ᵀ (F + λI)⁻¹ ∇ℓ(z_train)``,
    positive means up-weighting the training point lowers the test loss (see ``infscale.base``).

    Args:
        model: a ``torch.nn.Module`` (in eval mode; each supported layer called once per forward).
        update_diagonal: True: EK-FAC (the diagonal in the Kronecker eigenbasis is fitted in a
            second pass). False: K-FAC (eigenvalues Λ_G,i Λ_A,j of the Kronecker product).
        hessian_regularization: λ ≥ 0 added to the curvature's diagonal: a float, or a dict
            block (layer path) → float.
        progress: show progress bars over the training batches during ``fit``.
        loss: ``"cross_entropy"`` (default) or ``"mse"`` (``EkfacLoss``; the two torch
            functions ``F.cross_entropy`` / ``F.mse_loss`` are accepted too).
        fisher: ``"true"`` (default; labels sampled from the model, seeded by ``seed``),
            ``"empirical"`` (the given labels) or ``"exact"`` (``FisherType``).
        seed: seed of the label sampling for ``fisher="true"``. Both passes of ``fit`` restart
            the generator, so they see the same labels when the data loader repeats its batches.
        skip_unsupported: False (default): a module with trainable parameters that is not a
            supported layer raises ValueError. True: such modules are left out (their parameters
            are held fixed and excluded from the influences) and listed in a warning.
        factor_dtype: dtype of the factors, eigenbases and all rotations (default float64).
            Results are returned in the model's dtype.
        gradient_chunk_size: queries are processed this many samples at a time (default: as
            many as fit in 256 MiB of per-sample gradients).

    Raises:
        ValueError: an unsupported module with trainable parameters (without
            ``skip_unsupported``), no supported layer, an unknown ``loss`` or ``fisher``.
    """

    def __init__(
        self,
        model: nn.Module,
        update_diagonal: bool = True,
        hessian_regularization: float | Mapping[str, float] = 0.0,
        progress: bool = False,
        loss: EkfacLoss | str = EkfacLoss.CROSS_ENTROPY,
        fisher: FisherType | str = FisherType.TRUE,
        seed: int = 0,
        skip_unsupported: bool = False,
        factor_dtype: torch.dtype = torch.float64,
        gradient_chunk_size: int | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        if loss is F.cross_entropy:
            loss = EkfacLoss.CROSS_ENTROPY
        elif loss is F.mse_loss:
            loss = EkfacLoss.MSE
        self.loss_type = _parse_enum(EkfacLoss, loss, "loss")
        self.fisher = _parse_enum(FisherType, fisher, "fisher")
        if not isinstance(factor_dtype, torch.dtype) or not factor_dtype.is_floating_point:
            raise ValueError(f"factor_dtype must be a floating torch.dtype; got {factor_dtype!r}.")
        layers, unsupported = _find_layers(model)
        if unsupported and not skip_unsupported:
            listing = "; ".join(
                f"module {_module_label(p, m)} with trainable parameters {names}: {why}"
                for p, m, names, why in unsupported
            )
            raise ValueError(
                f"EkfacInfluence: {listing}. Freeze such modules (requires_grad_(False)) or pass "
                "skip_unsupported=True to leave them out of the influences."
            )
        if not layers:
            raise ValueError(
                f"EkfacInfluence: model={type(model).__name__} has no supported layer with trainable "
                "parameters; K-FAC/EK-FAC needs at least one torch.nn.Linear or torch.nn.Conv2d "
                "(groups=1)."
            )
        self.skipped_modules = [(p or "<root>", type(m).__name__) for p, m, _, _ in unsupported]
        if unsupported:
            warnings.warn(
                "EkfacInfluence: leaving out modules it does not support; their parameters are held "
                "fixed and excluded from the influences: "
                + ", ".join(f"{_module_label(p, m)}" for p, m, _, _ in unsupported),
                stacklevel=2,
            )
        structure = {layer.block: [layer.weight] + ([layer.bias] if layer.bias else []) for layer in layers}
        # the base layout requires every trainable parameter to be in a block: hide the skipped
        # ones while it is built (they are then held fixed like frozen parameters)
        skipped = [p for _, m, _, _ in unsupported for p in m.parameters(recurse=False) if p.requires_grad]
        for p in skipped:
            p.requires_grad_(False)
        try:
            base_loss = F.cross_entropy if self.loss_type is EkfacLoss.CROSS_ENTROPY else F.mse_loss
            super().__init__(
                model, base_loss, hessian_regularization, structure, "gauss_newton", gradient_chunk_size
            )
        finally:
            for p in skipped:
                p.requires_grad_(True)
        self.update_diagonal = bool(update_diagonal)
        self.progress = progress
        self.seed = int(seed)
        self.skip_unsupported = skip_unsupported
        self.factor_dtype = factor_dtype
        self.layers: list[_Layer] = layers
        self._by_block = {layer.block: layer for layer in layers}
        self.eigenvectors_A: dict[str, Tensor] = {}
        self.eigenvalues_A: dict[str, Tensor] = {}
        self.eigenvectors_G: dict[str, Tensor] = {}
        self.eigenvalues_G: dict[str, Tensor] = {}
        self.diagonal: dict[str, Tensor] = {}  # EK-FAC: the fitted Λ (d_out, d_in) per layer
        self._denominators: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ settings
    def hyperparameters(self) -> dict[str, Any]:
        return {
            **super().hyperparameters(),
            "method": "ekfac" if self.update_diagonal else "kfac",
            "loss": self.loss_type.value,
            "fisher": self.fisher.value,
            "seed": self.seed,
            "factor_dtype": str(self.factor_dtype).removeprefix("torch."),
            "skipped_modules": [p for p, _ in self.skipped_modules],
        }

    # ------------------------------------------------------------------ label checks
    def _check_targets(self, y: Tensor, name: str, where: str) -> None:
        if self.loss_type is EkfacLoss.CROSS_ENTROPY:
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

    def _check_xy(self, x: Any, y: Any, method: str, x_name: str = "x", y_name: str = "y"):
        x, y = super()._check_xy(x, y, method, x_name, y_name)
        self._check_targets(y, y_name, f"{type(self).__name__}.{method}()")
        return x, y

    def _check_outputs(self, f: Tensor, y: Tensor | None, where: str) -> None:
        if self.loss_type is EkfacLoss.CROSS_ENTROPY:
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

    # ------------------------------------------------------------------ forward with hooks
    def _forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """Model outputs, and per layer its input patches ã (n, T, d_in) in the factor dtype and
        its output (in the autograd graph)."""
        inputs: dict[str, Tensor] = {}
        outputs: dict[str, Tensor] = {}

        def make_hook(layer: _Layer):
            def hook(module, args, output):
                if layer.block in outputs:
                    raise ValueError(
                        f"EkfacInfluence: layer {_module_label(layer.path, module)} is called more than "
                        "once per forward pass (shared weights); K-FAC/EK-FAC needs one call per layer."
                    )
                inputs[layer.block] = args[0].detach()
                outputs[layer.block] = output

            return hook

        handles = [layer.module.register_forward_hook(make_hook(layer)) for layer in self.layers]
        try:
            with torch.enable_grad():
                f = self.model(x)
        finally:
            for h in handles:
                h.remove()
        missing = [
            _module_label(layer.path, layer.module) for layer in self.layers if layer.block not in outputs
        ]
        if missing:
            raise ValueError(
                f"EkfacInfluence: layers {missing} were not called by the model's forward pass "
                "(their parameters are used some other way); freeze them or leave them out."
            )
        patches = {layer.block: self._patches(layer, inputs[layer.block]) for layer in self.layers}
        return f, patches, outputs

    def _patches(self, layer: _Layer, a: Tensor) -> Tensor:
        n = a.shape[0]
        m = layer.module
        if layer.kind == "linear":
            a = a.reshape(n, -1, m.in_features)
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

    def _capture(self, x: Tensor, y: Tensor | None, fisher: FisherType, generator=None, where: str = ""):
        """Per layer: input patches ã (n, T, d_in) and a list of output gradients δ (n, T, d_out),
        one per output vector (all in the factor dtype)."""
        f, patches, outputs = self._forward(x)
        self._check_outputs(f, y, where)
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

    # ------------------------------------------------------------------ fit
    def _batches(self, data: Iterable, desc: str):
        for batch in tqdm(loader_batches(data), desc=desc, disable=not self.progress):
            x, y = self._to_device(*split_batch(batch, "each batch of data"))
            self._check_targets(y, "the training labels", f"{type(self).__name__}.fit()")
            yield x, y

    def _generator(self):
        return torch.Generator(device=self.device).manual_seed(self.seed)

    def _fit(self, data: Iterable) -> None:
        fd, dev = self.factor_dtype, self.device
        A = {ly.block: torch.zeros(ly.d_in, ly.d_in, dtype=fd, device=dev) for ly in self.layers}
        G = {ly.block: torch.zeros(ly.d_out, ly.d_out, dtype=fd, device=dev) for ly in self.layers}
        locations = dict.fromkeys(A, 0)
        n, gen = 0, self._generator()
        for x, y in self._batches(data, "K-FAC factors"):
            patches, deltas = self._capture(x, y, self.fisher, gen, "EkfacInfluence.fit()")
            for ly in self.layers:
                a = patches[ly.block].flatten(0, 1)
                A[ly.block] += a.T @ a
                for d in deltas[ly.block]:
                    d = d.flatten(0, 1)
                    G[ly.block] += d.T @ d
                locations[ly.block] += patches[ly.block].shape[0] * patches[ly.block].shape[1]
            n += x.shape[0]
        if n == 0:
            raise ValueError("EkfacInfluence.fit(): the training data yielded no samples.")
        self.n_train = n
        for ly in self.layers:
            b = ly.block
            # A summed over locations, G averaged over them (KFC); for T = 1 both are plain means
            lam_a, q_a = torch.linalg.eigh(A[b] / n)
            lam_g, q_g = torch.linalg.eigh(G[b] / max(locations[b], 1))
            self.eigenvalues_A[b], self.eigenvectors_A[b] = lam_a.clamp_min(0), q_a
            self.eigenvalues_G[b], self.eigenvectors_G[b] = lam_g.clamp_min(0), q_g
        del A, G
        self.diagonal = {}
        if self.update_diagonal:
            diag = {ly.block: torch.zeros(ly.d_out, ly.d_in, dtype=fd, device=dev) for ly in self.layers}
            gen = self._generator()
            for x, y in self._batches(data, "EK-FAC diagonal"):
                patches, deltas = self._capture(x, y, self.fisher, gen, "EkfacInfluence.fit()")
                for ly in self.layers:
                    for d in deltas[ly.block]:
                        diag[ly.block] += self._rotated_squares(ly, d, patches[ly.block])
            self.diagonal = {b: v / n for b, v in diag.items()}
        self._denominators = {}

    def _rotated(self, layer: _Layer, d: Tensor, a: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Per-sample gradients Σ_t δ_t ã_tᵀ rotated into the eigenbasis: (n, d_out, d_in), in
        ``dtype`` (default: the factor dtype; the rotations are always in the factor dtype)."""
        q_g, q_a = self.eigenvectors_G[layer.block], self.eigenvectors_A[layer.block]
        T, do, di = a.shape[1], layer.d_out, layer.d_in
        dtype = dtype or self.factor_dtype
        if T * (do * do + di * di) <= do * di * (do + di):
            # rotate the vectors, then form the (sum of) outer products, never the gradient itself
            return torch.einsum("ntk,ntl->nkl", (d @ q_g).to(dtype), (a @ q_a).to(dtype))
        return (q_g.T @ torch.einsum("ntk,ntl->nkl", d, a) @ q_a).to(dtype)

    def _rotated_squares(self, layer: _Layer, d: Tensor, a: Tensor) -> Tensor:
        """Σ_n (Q_Gᵀ g_n Q_A)² for one output vector: (d_out, d_in)."""
        if a.shape[1] == 1:  # rank one per sample: the square is an outer product of squares
            u = (d[:, 0] @ self.eigenvectors_G[layer.block]).square()
            w = (a[:, 0] @ self.eigenvectors_A[layer.block]).square()
            return u.T @ w
        total = torch.zeros(layer.d_out, layer.d_in, dtype=a.dtype, device=a.device)
        chunk = default_chunk_size(layer.d_out * layer.d_in, a.element_size())
        for s in range(0, a.shape[0], chunk):
            total += self._rotated(layer, d[s : s + chunk], a[s : s + chunk]).square().sum(0)
        return total

    # ------------------------------------------------------------------ curvature model
    def _eigenvalues(self, block: str) -> Tensor:
        """Λ (d_out, d_in): the curvature's eigenvalues in the Kronecker eigenbasis."""
        if self.update_diagonal:
            return self.diagonal[block]
        return torch.outer(self.eigenvalues_G[block], self.eigenvalues_A[block])

    def _denominator(self, block: str, lam: float | None = None) -> Tensor:
        cache = lam is None
        if cache and block in self._denominators:
            return self._denominators[block]
        lam = self.regularization[block] if lam is None else float(lam)
        d = self._eigenvalues(block) + lam
        smallest = d.min().item()
        if not smallest > 0:
            raise ValueError(
                f"EkfacInfluence: the curvature of layer {block!r} plus hessian_regularization={lam:g} "
                f"is singular (smallest eigenvalue {smallest:.3g}); use hessian_regularization > 0."
            )
        if cache:
            self._denominators[block] = d
        return d

    def kronecker_factors(self) -> dict[str, dict[str, Tensor]]:
        """The factors A (d_in × d_in) and G (d_out × d_out) of every layer, rebuilt from their
        eigendecompositions (the model keeps only those): block → {"A": ..., "G": ...}."""
        self._require_fitted("kronecker_factors")
        out = {}
        for ly in self.layers:
            b = ly.block
            q_a, q_g = self.eigenvectors_A[b], self.eigenvectors_G[b]
            out[b] = {
                "A": (q_a * self.eigenvalues_A[b]) @ q_a.T,
                "G": (q_g * self.eigenvalues_G[b]) @ q_g.T,
            }
        return out

    def curvature_block(self, block: str) -> Tensor:
        """The explicit (p_block × p_block) curvature model of one layer in the flat layout,
        without regularization; for checks on small layers."""
        self._require_fitted("curvature_block")
        ly = self._layer(block)
        p = self.layout.block(block).size
        eye = torch.eye(p, dtype=self.factor_dtype, device=self.device)
        V = self._to_matrix(ly, eye)
        q_g, q_a = self.eigenvectors_G[block], self.eigenvectors_A[block]
        M = q_g @ ((q_g.T @ V @ q_a) * self._eigenvalues(block)) @ q_a.T
        return self._to_flat(ly, M)

    def _layer(self, block: str) -> _Layer:
        if block not in self._by_block:
            raise ValueError(f"block={block!r} is no layer of this model; layers are {list(self._by_block)}.")
        return self._by_block[block]

    # ------------------------------------------------------------------ layout ↔ matrices
    @staticmethod
    def _to_matrix(layer: _Layer, flat: Tensor) -> Tensor:
        """(k, p_block) in the flat layout → (k, d_out, d_in) gradient matrices [W | b]."""
        k = flat.shape[0]
        w = flat[:, : layer.n_weight].reshape(k, layer.d_out, -1)
        if layer.bias is None:
            return w
        return torch.cat([w, flat[:, layer.n_weight :].reshape(k, layer.d_out, 1)], dim=2)

    @staticmethod
    def _to_flat(layer: _Layer, M: Tensor) -> Tensor:
        k = M.shape[0]
        if layer.bias is None:
            return M.reshape(k, -1)
        return torch.cat([M[:, :, :-1].reshape(k, -1), M[:, :, -1]], dim=1)

    def _solve_block(self, block: _Block, rhs: Tensor) -> Tensor:
        ly = self._by_block[block.name]
        q_g, q_a = self.eigenvectors_G[block.name], self.eigenvectors_A[block.name]
        V = self._to_matrix(ly, rhs.to(self.factor_dtype))
        V = q_g @ ((q_g.T @ V @ q_a) / self._denominator(block.name)) @ q_a.T
        return self._to_flat(ly, V).to(rhs.dtype)

    # ------------------------------------------------------------------ gradients
    def _chunk(self) -> int:
        return self.gradient_chunk_size or default_chunk_size(
            self.n_parameters, torch.finfo(self.factor_dtype).bits // 8
        )

    def _layer_gradients(self, x: Tensor, y: Tensor, rotate: bool, dtype: torch.dtype | None = None):
        """Yields (start, {block: (n_chunk, d_out, d_in)}) per chunk: per-sample loss gradients
        as matrices, rotated into the eigenbasis if ``rotate``."""
        chunk = self._chunk()
        for s in range(0, x.shape[0], chunk):
            xs, ys = x[s : s + chunk], y[s : s + chunk]
            patches, deltas = self._capture(xs, ys, FisherType.EMPIRICAL, where=type(self).__name__)
            out = {}
            for ly in self.layers:
                d, a = deltas[ly.block][0], patches[ly.block]
                if rotate:
                    out[ly.block] = self._rotated(ly, d, a, dtype)
                else:
                    out[ly.block] = torch.einsum("ntk,ntl->nkl", d.to(dtype), a.to(dtype))
            yield s, out

    def _collect(
        self, x: Tensor, y: Tensor, rotate: bool, dtype: torch.dtype | None = None
    ) -> dict[str, Tensor]:
        dtype = dtype or self.factor_dtype
        parts: dict[str, list[Tensor]] = {ly.block: [] for ly in self.layers}
        for _, grads in self._layer_gradients(x, y, rotate, dtype):
            for b, g in grads.items():
                parts[b].append(g)
        return {
            ly.block: torch.cat(parts[ly.block])
            if parts[ly.block]
            else x.new_zeros((0, ly.d_out, ly.d_in), dtype=dtype)
            for ly in self.layers
        }

    def _gradients(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-sample gradients (n, p) in the flat layout, from one batched forward/backward
        (δ ãᵀ per layer) instead of a vmap over samples."""
        grads = self._collect(x, y, rotate=False, dtype=self.dtype)
        return torch.cat([self._to_flat(ly, grads[ly.block]) for ly in self.layers], dim=1)

    # ------------------------------------------------------------------ fast queries (up mode)
    def _influences(self, x_test, y_test, x, y, mode, symmetric) -> Tensor:
        if mode is not InfluenceMode.Up:
            return super()._influences(x_test, y_test, x, y, mode, symmetric)
        by_layer = self._rotated_influences(x_test, y_test, None if symmetric else (x, y))
        return sum(by_layer.values())

    def _rotated_influences(self, x_test, y_test, train, lams: Mapping[str, float] | None = None):
        """Per layer Σ_ij R_test,ij R_train,ij / (Λ_ij + λ), R the rotated gradients; the
        training side is streamed in chunks, so only n_test × p values are held at once."""
        test = self._collect(x_test, y_test, rotate=True, dtype=self.dtype)
        scaled = {}
        for ly in self.layers:
            b = ly.block
            d = self._denominator(b, None if lams is None else lams[b])
            scaled[b] = (test[b] / d.to(self.dtype)).flatten(1)
        if train is None:
            return {b: scaled[b] @ test[b].flatten(1).T for b in scaled}
        del test
        x, y = train
        out = {b: v.new_empty((v.shape[0], x.shape[0])) for b, v in scaled.items()}
        for s, grads in self._layer_gradients(x, y, rotate=True, dtype=self.dtype):
            for b, g in grads.items():
                out[b][:, s : s + g.shape[0]] = scaled[b] @ g.flatten(1).T
        return out

    def self_influences(self, x: Tensor, y: Tensor, mode: InfluenceMode | str = InfluenceMode.Up) -> Tensor:
        """The diagonal of ``influences(x, y)``: (n,) in up mode, (n, *feature_shape) in
        perturbation mode. Up mode works in the eigenbasis without solving."""
        self._require_fitted("self_influences")
        if self._parse_mode(mode, "self_influences") is not InfluenceMode.Up:
            return super().self_influences(x, y, mode)
        x, y = self._check_xy(x, y, "self_influences")
        total = torch.zeros(x.shape[0], dtype=self.factor_dtype, device=self.device)
        for s, grads in self._layer_gradients(x, y, rotate=True):
            for b, g in grads.items():
                total[s : s + g.shape[0]] += (g.square() / self._denominator(b)).flatten(1).sum(1)
        return total.to(self.dtype)

    # ------------------------------------------------------------------ per layer
    def influences_by_layer(
        self,
        x_test: Tensor,
        y_test: Tensor,
        x: Tensor | None = None,
        y: Tensor | None = None,
        mode: InfluenceMode | str = InfluenceMode.Up,
    ) -> dict[str, Tensor]:
        """``influences`` per layer: layer path → (n_test, n_train[, *feature_shape]); the
        total over layers equals ``influences``. Up mode works in the eigenbasis."""
        self._require_fitted("influences_by_layer")
        if self._parse_mode(mode, "influences_by_layer") is not InfluenceMode.Up:
            return self.influences_by_block(x_test, y_test, x, y, mode)
        if (x is None) != (y is None):
            self.influences(x_test, y_test, x, y, mode)  # raises the same error
        x_test, y_test = self._check_xy(x_test, y_test, "influences_by_layer", "x_test", "y_test")
        train = None if x is None else self._check_xy(x, y, "influences_by_layer")
        return {b: v.to(self.dtype) for b, v in self._rotated_influences(x_test, y_test, train).items()}

    def influence_factors_by_layer(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """``influence_factors`` split by layer: layer path → (n, p_layer) (weight row-major,
        then bias)."""
        return self.influence_factors_by_block(x, y)

    def influences_from_factors_by_layer(
        self,
        z_test_factors: Mapping[str, Tensor],
        x: Tensor,
        y: Tensor,
        mode: InfluenceMode | str = InfluenceMode.Up,
    ) -> dict[str, Tensor]:
        """``influences_from_factors`` per layer, from ``influence_factors_by_layer``."""
        return self.influences_from_factors_by_block(z_test_factors, x, y, mode)

    def explore_hessian_regularization(
        self, x: Tensor, y: Tensor, regularization_values: Sequence[float], by_layer: bool = True
    ) -> dict[float, dict[str, Tensor]] | dict[float, Tensor]:
        """Influences of (x, y) on themselves for several λ, from one gradient computation.

        The per-sample gradients are computed and rotated into the eigenbasis once; each λ
        then costs one division and one matrix product per layer.

        Returns:
            ``{λ: {layer path: (n, n)}}`` (``by_layer=True``, the default), or
            ``{λ: (n, n)}`` summed over layers.

        Raises:
            ValueError: a negative λ, or λ = 0 with a singular curvature.
        """
        self._require_fitted("explore_hessian_regularization")
        x, y = self._check_xy(x, y, "explore_hessian_regularization")
        values = [float(v) for v in regularization_values]
        for v in values:
            if not v >= 0:
                raise ValueError(
                    f"explore_hessian_regularization(): regularization_values must be ≥ 0; got {v}."
                )
        rotated = self._collect(x, y, rotate=True, dtype=self.dtype)
        flat = {b: r.flatten(1) for b, r in rotated.items()}
        result = {}
        for v in values:
            per = {}
            for b, r in flat.items():
                per[b] = (r / self._denominator(b, v).flatten().to(self.dtype)) @ r.T
            result[v] = per if by_layer else sum(per.values())
        return result

    def with_regularization(self, hessian_regularization: float | Mapping[str, float]) -> EkfacInfluence:
        """A copy with another λ that shares the fitted factors (no pass over the data)."""
        new = self._copy_with_regularization(hessian_regularization)
        new._denominators = {}
        return new

    # ------------------------------------------------------------------ save / load
    def save_factors(self, path: str | Path) -> None:
        """Write the fitted eigenbases, eigenvalues and (EK-FAC) diagonal to a safetensors file.

        The file also records the layers, their shapes and the settings that determine the
        factors (loss, fisher, update_diagonal, seed); ``load_factors`` checks them.
        """
        from safetensors.torch import save_file

        self._require_fitted("save_factors")
        tensors = {}
        for ly in self.layers:
            b = ly.block
            tensors[f"{b}/eigenvectors_A"] = self.eigenvectors_A[b]
            tensors[f"{b}/eigenvalues_A"] = self.eigenvalues_A[b]
            tensors[f"{b}/eigenvectors_G"] = self.eigenvectors_G[b]
            tensors[f"{b}/eigenvalues_G"] = self.eigenvalues_G[b]
            if self.update_diagonal:
                tensors[f"{b}/diagonal"] = self.diagonal[b]
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        meta = {
            "format": _FORMAT,
            "layers": {ly.block: [ly.kind, ly.d_out, ly.d_in] for ly in self.layers},
            "loss": self.loss_type.value,
            "fisher": self.fisher.value,
            "update_diagonal": self.update_diagonal,
            "seed": self.seed,
            "n_train": self.n_train,
            "feature_shape": list(self._feature_shape) if self._feature_shape is not None else None,
        }
        save_file(tensors, str(path), metadata={"infscale": json.dumps(meta)})

    def load_factors(self, path: str | Path) -> EkfacInfluence:
        """Load factors written by ``save_factors`` (for the same architecture and settings)
        and mark the model fitted. Returns self.

        Raises:
            ValueError: the file is not an infscale EK-FAC file, or its layers, shapes, loss,
                fisher or update_diagonal differ from this model's.
        """
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("infscale")
            meta = json.loads(raw) if raw else {}
            if meta.get("format") != _FORMAT:
                raise ValueError(f"load_factors(): {str(path)!r} is not an infscale EK-FAC factor file.")
            expected = {ly.block: [ly.kind, ly.d_out, ly.d_in] for ly in self.layers}
            if meta["layers"] != expected:
                raise ValueError(
                    f"load_factors(): the file's layers {meta['layers']} (kind, d_out, d_in) differ "
                    f"from this model's {expected}."
                )
            mine = {"loss": self.loss_type.value, "fisher": self.fisher.value}
            mine["update_diagonal"] = self.update_diagonal
            for key, value in mine.items():
                if meta[key] != value:
                    raise ValueError(
                        f"load_factors(): the factors were fitted with {key}={meta[key]!r}, but this "
                        f"model has {key}={value!r}; create it with the same setting."
                    )
            get = lambda k: fh.get_tensor(k).to(self.device, self.factor_dtype)  # noqa: E731
            for ly in self.layers:
                b = ly.block
                self.eigenvectors_A[b], self.eigenvalues_A[b] = (
                    get(f"{b}/eigenvectors_A"),
                    get(f"{b}/eigenvalues_A"),
                )
                self.eigenvectors_G[b], self.eigenvalues_G[b] = (
                    get(f"{b}/eigenvectors_G"),
                    get(f"{b}/eigenvalues_G"),
                )
                if self.update_diagonal:
                    self.diagonal[b] = get(f"{b}/diagonal")
        self.n_train = meta.get("n_train")
        shape = meta.get("feature_shape")
        self._feature_shape = tuple(shape) if shape is not None else None
        self._denominators = {}
        self._fitted = True
        return self

    def __copy__(self):
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._denominators = {}
        return new
