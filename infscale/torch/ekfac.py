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

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..base import InfluenceMode
from .base import TorchInfluenceFunctionModel
from .data import batch_size_of, device_batches, take_rows
from .ekfac_factors import (
    EkfacLoss,
    FisherType,
    LayerCapture,
    _Layer,
    accumulate_diagonal,
    accumulate_factors,
    check_targets,
    find_layers,
    module_label,
    rotated,
    to_flat,
    to_matrix,
)
from .ekfac_io import read_factors, write_factors
from .layout import _Block, parse_enum
from .linalg import not_positive_definite, numerically_singular
from .memory import default_chunk_size

__all__ = ["EkfacInfluence", "EkfacLoss", "FisherType"]


def _loss_in_place_of_update_diagonal(update_diagonal: Any, loss: Any) -> tuple[bool, Any]:
    """(update_diagonal, loss): a loss given as the second positional argument (a string, an
    ``EkfacLoss`` or a callable such as ``F.mse_loss``) moves to ``loss`` and update_diagonal stays
    True; a bool (or 0/1) stays. Raises TypeError for anything else, or for a loss in both places."""
    if isinstance(update_diagonal, str) or callable(update_diagonal):
        if loss != EkfacLoss.CROSS_ENTROPY and loss != update_diagonal:
            raise TypeError(
                f"EkfacInfluence got the loss twice: {update_diagonal!r} as its second positional "
                f"argument (update_diagonal's place) and loss={loss!r}; give it once."
            )
        return True, update_diagonal
    try:
        if update_diagonal in (True, False):  # a bool, 0 or 1, numpy.bool_
            return bool(update_diagonal), loss
    except (TypeError, ValueError, RuntimeError):  # no single truth value, e.g. an array
        pass
    raise TypeError(
        "EkfacInfluence: update_diagonal (the second positional parameter) must be True (EK-FAC) or "
        f"False (K-FAC), or the loss; got {update_diagonal!r}."
    )


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
            The seed's second positional parameter; a loss given there (a string, an
            ``EkfacLoss`` or a callable, as in ``EkfacInfluence(model, F.mse_loss)``) is taken as
            ``loss``, and update_diagonal keeps its default True.
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
        TypeError: update_diagonal neither a bool nor a loss, or a loss both in its place and
            as a different ``loss=``.
        NotPositiveDefiniteError (at query): a layer's curvature model plus λ is singular to
            working precision; the message gives a λ that makes it invertible.
    """

    settings = TorchInfluenceFunctionModel.settings + (
        "update_diagonal",
        "loss_type",
        "fisher",
        "seed",
        "factor_dtype",
        "skipped_modules",
    )

    def __init__(
        self,
        model: nn.Module,
        update_diagonal: bool | EkfacLoss | str | Callable = True,
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
        update_diagonal, loss = _loss_in_place_of_update_diagonal(update_diagonal, loss)
        if loss is F.cross_entropy:
            loss = EkfacLoss.CROSS_ENTROPY
        elif loss is F.mse_loss:
            loss = EkfacLoss.MSE
        self.loss_type = parse_enum(EkfacLoss, loss, "loss")
        self.fisher = parse_enum(FisherType, fisher, "fisher")
        if not isinstance(factor_dtype, torch.dtype) or not factor_dtype.is_floating_point:
            raise ValueError(f"factor_dtype must be a floating torch.dtype; got {factor_dtype!r}.")
        layers, unsupported = find_layers(model)
        if unsupported and not skip_unsupported:
            listing = "; ".join(
                f"module {module_label(p, m)} with trainable parameters {names}: {why}"
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
                + ", ".join(f"{module_label(p, m)}" for p, m, _, _ in unsupported),
                stacklevel=2,
            )
        structure = {layer.block: [layer.weight] + ([layer.bias] if layer.bias else []) for layer in layers}
        # the skipped modules' parameters are held fixed like frozen ones (the model is not changed)
        skipped = [name for _, _, names, _ in unsupported for name in names]
        base_loss = F.cross_entropy if self.loss_type is EkfacLoss.CROSS_ENTROPY else F.mse_loss
        super().__init__(
            model,
            base_loss,
            hessian_regularization,
            structure,
            "gauss_newton",
            gradient_chunk_size,
            held_fixed=skipped,
        )
        self.update_diagonal = update_diagonal
        self.progress = progress
        self.seed = int(seed)
        self.skip_unsupported = skip_unsupported
        self.factor_dtype = factor_dtype
        self.layers: list[_Layer] = layers
        self._by_block = {layer.block: layer for layer in layers}
        self._capture = LayerCapture(self.layout, layers, self.loss_type, factor_dtype)
        self.eigenvectors_A: dict[str, Tensor] = {}
        self.eigenvalues_A: dict[str, Tensor] = {}
        self.eigenvectors_G: dict[str, Tensor] = {}
        self.eigenvalues_G: dict[str, Tensor] = {}
        self.diagonal: dict[str, Tensor] = {}  # EK-FAC: the fitted Λ (d_out, d_in) per layer
        self._denominators: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ label checks
    def _check_targets(self, y: Tensor, y_name: str, where: str) -> None:
        check_targets(self.loss_type, y, y_name, where)

    # ------------------------------------------------------------------ fit
    def _batches(self, data: Iterable, desc: str) -> Iterator[tuple[Tensor, Tensor]]:
        batches = device_batches(data, self._to_device)
        for x, y in tqdm(batches, desc=desc, disable=not self.progress):
            check_targets(self.loss_type, y, "the training labels", f"{type(self).__name__}.fit()")
            yield x, y

    def _generator(self):
        return torch.Generator(device=self.device).manual_seed(self.seed)

    def _fit(self, data: Iterable) -> None:
        where = "EkfacInfluence.fit()"
        n, A, G = accumulate_factors(
            self._capture, self._batches(data, "K-FAC factors"), self.fisher, self._generator(), where
        )
        if n == 0:
            raise ValueError("EkfacInfluence.fit(): the training data yielded no samples.")
        self.n_train = n
        for ly in self.layers:
            b = ly.block
            lam_a, q_a = torch.linalg.eigh(A[b])
            lam_g, q_g = torch.linalg.eigh(G[b])
            self.eigenvalues_A[b], self.eigenvectors_A[b] = lam_a.clamp_min(0), q_a
            self.eigenvalues_G[b], self.eigenvectors_G[b] = lam_g.clamp_min(0), q_g
        del A, G
        self.diagonal = {}
        if self.update_diagonal:
            diag = accumulate_diagonal(
                self._capture,
                self._batches(data, "EK-FAC diagonal"),
                self.fisher,
                self._generator(),
                where,
                self.eigenvectors_G,
                self.eigenvectors_A,
            )
            self.diagonal = {b: v / n for b, v in diag.items()}
        self._denominators = {}

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
        eigenvalues = self._eigenvalues(block)
        d = eigenvalues + lam
        if numerically_singular(d):
            raise not_positive_definite(
                "EkfacInfluence",
                f"the curvature of layer {block!r}",
                lam,
                eigenvalues.min().item(),
                eigenvalues.max().item(),
                "or larger: the Kronecker-factored curvature is positive semi-definite, so "
                "hessian_regularization > 0 makes it invertible, and one of the order of 1e-3 times "
                "the largest eigenvalue makes the influences less sensitive to noise",
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
        V = to_matrix(ly, eye)
        q_g, q_a = self.eigenvectors_G[block], self.eigenvectors_A[block]
        M = q_g @ ((q_g.T @ V @ q_a) * self._eigenvalues(block)) @ q_a.T
        return to_flat(ly, M)

    def _layer(self, block: str) -> _Layer:
        if block not in self._by_block:
            raise ValueError(f"block={block!r} is no layer of this model; layers are {list(self._by_block)}.")
        return self._by_block[block]

    def _solve_block(self, block: _Block, rhs: Tensor) -> Tensor:
        ly = self._by_block[block.name]
        q_g, q_a = self.eigenvectors_G[block.name], self.eigenvectors_A[block.name]
        V = to_matrix(ly, rhs.to(self.factor_dtype))
        V = q_g @ ((q_g.T @ V @ q_a) / self._denominator(block.name)) @ q_a.T
        return to_flat(ly, V).to(rhs.dtype)

    # ------------------------------------------------------------------ gradients
    def _chunk(self) -> int:
        """Samples per chunk: as many per-sample gradients in the factor dtype as fit in
        ``memory.GRADIENT_BYTES`` (or ``gradient_chunk_size``)."""
        return self.gradient_chunk_size or default_chunk_size(self.n_parameters, self.factor_dtype.itemsize)

    def _layer_gradients(self, x: Tensor, y: Tensor, rotate: bool, dtype: torch.dtype | None = None):
        """Yields (start, {block: (n_chunk, d_out, d_in)}) per chunk: per-sample loss gradients
        as matrices, rotated into the eigenbasis if ``rotate``."""
        chunk = self._chunk()
        dtype = dtype or self.factor_dtype
        for s in range(0, batch_size_of(x), chunk):
            xs, ys = take_rows(x, slice(s, s + chunk)), y[s : s + chunk]
            patches, deltas = self._capture.capture(xs, ys, FisherType.EMPIRICAL, where=type(self).__name__)
            out = {}
            for ly in self.layers:
                d, a = deltas[ly.block][0], patches[ly.block]
                if rotate:
                    q_g, q_a = self.eigenvectors_G[ly.block], self.eigenvectors_A[ly.block]
                    out[ly.block] = rotated(q_g, q_a, d, a, dtype)
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
            else y.new_zeros((0, ly.d_out, ly.d_in), dtype=dtype)
            for ly in self.layers
        }

    def _gradients(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-sample gradients (n, p) in the flat layout, from one batched forward/backward
        (δ ãᵀ per layer) instead of a vmap over samples."""
        grads = self._collect(x, y, rotate=False, dtype=self.dtype)
        return torch.cat([to_flat(ly, grads[ly.block]) for ly in self.layers], dim=1)

    def _train_gradients(self, x: Tensor, y: Tensor) -> Tensor:
        """The training side of ``_from_gradients``: this method's own dense gradients."""
        return self._gradients(x, y)

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
        out = {b: v.new_empty((v.shape[0], batch_size_of(x))) for b, v in scaled.items()}
        for s, grads in self._layer_gradients(x, y, rotate=True, dtype=self.dtype):
            for b, g in grads.items():
                out[b][:, s : s + g.shape[0]] = scaled[b] @ g.flatten(1).T
        return out

    def _self_influences_up(self, x: Tensor, y: Tensor) -> Tensor:
        """The diagonal of ``influences(x, y)`` in up mode, in the eigenbasis without solving."""
        total = torch.zeros(batch_size_of(x), dtype=self.factor_dtype, device=self.device)
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
            ValueError: a negative λ.
            NotPositiveDefiniteError: λ = 0 with a singular curvature.
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
    def _factor_names(self) -> tuple[str, ...]:
        diagonal = ("diagonal",) if self.update_diagonal else ()
        return ("eigenvectors_A", "eigenvalues_A", "eigenvectors_G", "eigenvalues_G") + diagonal

    def _factor_settings(self) -> dict[str, Any]:
        return {
            "loss": self.loss_type.value,
            "fisher": self.fisher.value,
            "update_diagonal": self.update_diagonal,
        }

    def save_factors(self, path: str | Path) -> None:
        """Write the fitted eigenbases, eigenvalues and (EK-FAC) diagonal to a safetensors file.

        The file also records the layers, their shapes and the settings that determine the
        factors (loss, fisher, update_diagonal, seed); ``load_factors`` checks them.
        """
        self._require_fitted("save_factors")
        shape = list(self._feature_shape) if self._feature_shape is not None else None
        record = {
            **self._factor_settings(),
            "seed": self.seed,
            "n_train": self.n_train,
            "feature_shape": shape,
        }
        write_factors(path, self.layers, {name: getattr(self, name) for name in self._factor_names()}, record)

    def load_factors(self, path: str | Path) -> EkfacInfluence:
        """Load factors written by ``save_factors`` (for the same architecture and settings)
        and mark the model fitted. Returns self.

        Raises:
            ValueError: the file is not an infscale EK-FAC file, or its layers, shapes, loss,
                fisher or update_diagonal differ from this model's.
        """
        names = self._factor_names()
        factors, meta = read_factors(
            path, self.layers, names, self._factor_settings(), self.device, self.factor_dtype
        )
        for name in names:
            getattr(self, name).update(factors[name])
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
