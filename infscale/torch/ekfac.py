"""K-FAC and EK-FAC influence: Kronecker-factored curvature per layer, diagonal per norm layer.

For a layer whose per-sample gradient is the matrix ``g = Σ_t δ_t ã_tᵀ`` (output gradients δ and
inputs ã = [a, 1] at the layer's locations t: one for an MLP layer, tokens, or conv patches) the
curvature block is approximated as

    F ≈ G ⊗ A,    A = E[Σ_t ã_t ã_tᵀ],   G = E[Σ_t δ_t δ_tᵀ] / T                      (K-FAC / KFC)

With the eigendecompositions ``A = Q_A Λ_A Q_Aᵀ`` and ``G = Q_G Λ_G Q_Gᵀ``, the inverse is applied
to a gradient matrix ``V`` as ``Q_G [(Q_Gᵀ V Q_A) / (Λ + λ)] Q_Aᵀ`` with ``Λ_ij = Λ_G,i Λ_A,j``
(K-FAC) or, with ``update_diagonal=True`` (EK-FAC, George et al. 2018), ``Λ_ij = E[(Q_Gᵀ g Q_A)_ij²]``
fitted in a second pass over the data.

Layers (``ekfac_layers``): nn.Linear, transformers' Conv1D (a transposed Linear), nn.Conv2d (KFC
patches) and nn.Embedding (one-hot inputs: A = diag(token counts)/n, kept in the identity basis)
are Kronecker blocks; a weight shared by several modules (GPT-2's tied ``wte`` / ``lm_head``) is one
block whose uses' Kronecker terms are summed. LayerNorm, GroupNorm, RMSNorm and BatchNorm (eval mode)
are diagonal blocks: ``Λ = E[g²]`` of their per-sample gradients, for K-FAC and EK-FAC alike.

The loss and the Fisher (``ekfac_loss``): any ``loss(outputs, y)``; the true and exact Fisher read
the loss family's curvature in the logits. See docs/ekfac.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..base import InfluenceMode
from .base import TorchInfluenceFunctionModel
from .data import batch_size_of, device_batches, take_rows
from .ekfac_factors import (
    Capture,
    accumulate_diagonal,
    accumulate_factors,
    eigenbases,
    rotated,
)
from .ekfac_io import FactorFile
from .ekfac_layers import KRONECKER_LAYERS, Block, find_blocks, module_label, to_flat, to_matrix
from .ekfac_loss import EkfacLoss, FisherType, parse_loss
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


class EkfacInfluence(FactorFile, TorchInfluenceFunctionModel):
    """Influences with the (eigenvalue-corrected) Kronecker-factored curvature of each layer.

    One block per modelled parameter group (see ``covered_modules``), named by the path of the
    module that owns it (``"root"`` for the model itself); cross-block curvature is dropped, and
    influences are the sum over blocks. The curvature is the Fisher of ``loss`` (see ``fisher``),
    which for cross-entropy and MSE families in expectation equals the Gauss-Newton matrix of the
    **mean** training loss; the query gradients are gradients of the same loss with the given
    labels. Sign convention: ``influences = ∇ℓ(z_test)ᵀ (F + λI)⁻¹ ∇ℓ(z_train)``, positive means
    up-weighting the training point lowers the test loss (see ``infscale.base``).

    Args:
        model: a ``torch.nn.Module`` in eval mode.
        update_diagonal: True: EK-FAC (the diagonal in the Kronecker eigenbasis is fitted in a
            second pass). False: K-FAC (eigenvalues Λ_G,i Λ_A,j of the Kronecker product).
        hessian_regularization: λ ≥ 0 added to the curvature's diagonal: a float, or a dict
            block → float.
        progress: show progress bars over the training batches during ``fit``.
        loss: ``loss(outputs, y)``, the batch mean of per-sample losses, as for every method; or
            ``"cross_entropy"`` (default) / ``"mse"`` (``EkfacLoss``), i.e. ``F.cross_entropy`` /
            ``F.mse_loss``.
        fisher: ``"true"`` (default; labels sampled from the model, seeded by ``seed``),
            ``"empirical"`` (the given labels; needs nothing but ``loss``) or ``"exact"``.
        seed: seed of the label sampling for ``fisher="true"``. Both passes of ``fit`` restart
            the generator, so they see the same labels when the data loader repeats its batches.
        skip_unsupported: False (default): a module with trainable parameters that EK-FAC cannot
            model raises ValueError. True: such modules are left out (their parameters are held
            fixed and excluded from the influences) and listed in a warning.
        factor_dtype: dtype of the factors, eigenbases and all rotations (default float64).
            Results are returned in the model's dtype.
        gradient_chunk_size: queries are processed this many samples at a time (default: as
            many as fit in 256 MiB of per-sample gradients).
        loss_family: for a callable ``loss`` with ``fisher="true"`` or ``"exact"``:
            ``"cross_entropy"`` or ``"mse"`` (``EkfacLoss``), the form of its curvature in the logits
            (see ``infscale.torch.ekfac_loss``). Inferred for the built-in losses.
        output_logits: ``outputs -> Tensor``, the logits the loss family applies to (classes on the
            last dimension). Default: the output itself, ``outputs["logits"]`` / ``.logits`` of a
            ModelOutput, or the first entry of a tuple.
        token_mask: ``x -> (n, T)`` tensor, nonzero at real tokens; masked tokens are left out of the
            factors A and G of layers applied to sequences of length T. Default: ``x["attention_mask"]``
            of a mapping ``x``, else no mask.
        diagonal_modules: more module classes to model as diagonal blocks (elementwise-affine
            modules whose forward is a function of their first argument, samples independent).

    Attributes (after construction): ``covered_modules`` (path, class name, "kronecker" or
    "diagonal", block) for every module whose parameters are modelled; ``skipped_modules``
    (path, class name) of those left out.

    Raises:
        ValueError: an unsupported module with trainable parameters (without
            ``skip_unsupported``), no modelled parameter, an unknown ``loss``, ``loss_family`` or
            ``fisher``, or a true/exact Fisher for a callable loss without ``loss_family``.
        NotPositiveDefiniteError (at query): a block's curvature model plus λ is singular to
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
        update_diagonal: bool = True,
        hessian_regularization: float | Mapping[str, float] = 0.0,
        progress: bool = False,
        loss: Callable[[Any, Tensor], Tensor] | EkfacLoss | str = EkfacLoss.CROSS_ENTROPY,
        fisher: FisherType | str = FisherType.TRUE,
        seed: int = 0,
        skip_unsupported: bool = False,
        factor_dtype: torch.dtype = torch.float64,
        gradient_chunk_size: int | None = None,
        *,
        loss_family: EkfacLoss | str | None = None,
        output_logits: Callable[[Any], Tensor] | None = None,
        token_mask: Callable[[Any], Tensor] | None = None,
        diagonal_modules: Sequence[type] = (),
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        update_diagonal, loss = _loss_in_place_of_update_diagonal(update_diagonal, loss)
        self.fisher = parse_enum(FisherType, fisher, "fisher")
        self.spec = parse_loss(loss, loss_family, output_logits, self.fisher)
        self.loss_type = self.spec.family
        if not isinstance(factor_dtype, torch.dtype) or not factor_dtype.is_floating_point:
            raise ValueError(f"factor_dtype must be a floating torch.dtype; got {factor_dtype!r}.")
        blocks, unsupported = find_blocks(model, tuple(diagonal_modules))
        if unsupported and not skip_unsupported:
            listing = "; ".join(
                f"module {module_label(p, m)} with trainable parameters {names}: {why}"
                for p, m, names, why in unsupported
            )
            raise ValueError(
                f"EkfacInfluence: {listing}. Freeze such modules (requires_grad_(False)) or pass "
                "skip_unsupported=True to leave them out of the influences."
            )
        if not blocks:
            raise ValueError(
                f"EkfacInfluence: model={type(model).__name__} has no supported layer with trainable "
                f"parameters; K-FAC/EK-FAC models {KRONECKER_LAYERS}."
            )
        self.skipped_modules = [(p or "<root>", type(m).__name__) for p, m, _, _ in unsupported]
        self.covered_modules = [
            (u.path or "<root>", type(u.module).__name__, b.model, b.name) for b in blocks for u in b.uses
        ]
        if unsupported:
            warnings.warn(
                "EkfacInfluence: leaving out modules it does not support; their parameters are held "
                "fixed and excluded from the influences: "
                + ", ".join(f"{module_label(p, m)}" for p, m, _, _ in unsupported),
                stacklevel=2,
            )
        # the skipped modules' parameters are held fixed like frozen ones (the model is not changed)
        skipped = [name for _, _, names, _ in unsupported for name in names]
        super().__init__(
            model,
            self.spec.loss,
            hessian_regularization,
            {b.name: b.params for b in blocks},
            "gauss_newton",
            gradient_chunk_size,
            held_fixed=skipped,
        )
        self.update_diagonal = bool(update_diagonal)
        self.progress = progress
        self.seed = int(seed)
        self.skip_unsupported = skip_unsupported
        self.factor_dtype = factor_dtype
        self.blocks: list[Block] = blocks
        self._by_block = {b.name: b for b in blocks}
        self._capture = Capture(self.layout, blocks, self.spec, factor_dtype, token_mask)
        self.eigenvectors_A: dict[str, Tensor] = {}  # absent for an identity basis (embeddings)
        self.eigenvalues_A: dict[str, Tensor] = {}
        self.eigenvectors_G: dict[str, Tensor] = {}
        self.eigenvalues_G: dict[str, Tensor] = {}
        self.diagonal: dict[str, Tensor] = {}  # Λ (rows, cols) where it is not Λ_G ⊗ Λ_A
        self._denominators: dict[str, Tensor] = {}

    @property
    def layers(self) -> list[Block]:
        """The Kronecker blocks (the former name of ``blocks`` when only Linear/Conv2d existed)."""
        return [b for b in self.blocks if b.model == "kronecker"]

    # ------------------------------------------------------------------ label checks
    def _check_targets(self, y: Tensor, y_name: str, where: str) -> None:
        self.spec.check_targets(y, y_name, where)

    # ------------------------------------------------------------------ fit
    def _batches(self, data: Iterable, desc: str) -> Iterator[tuple[Any, Tensor]]:
        batches = device_batches(data, self._to_device)
        for x, y in tqdm(batches, desc=desc, disable=not self.progress):
            self.spec.check_targets(y, "the training labels", f"{type(self).__name__}.fit()")
            yield x, y

    def _generator(self):
        return torch.Generator(device=self.device).manual_seed(self.seed)

    def _fit(self, data: Iterable) -> None:
        where = "EkfacInfluence.fit()"
        factors = accumulate_factors(
            self._capture, self._batches(data, "K-FAC factors"), self.fisher, self._generator(), where
        )
        if factors.n == 0:
            raise ValueError("EkfacInfluence.fit(): the training data yielded no samples.")
        self.n_train = factors.n
        bases, shared = eigenbases(self.blocks, factors)
        for store in (self.eigenvectors_A, self.eigenvalues_A, self.eigenvectors_G, self.eigenvalues_G):
            store.clear()
        for name, (q_r, l_r, q_c, l_c) in bases.items():
            (q_a, l_a, q_g, l_g) = (
                (q_r, l_r, q_c, l_c) if self._by_block[name].transposed else (q_c, l_c, q_r, l_r)
            )
            for store, value in ((self.eigenvectors_A, q_a), (self.eigenvectors_G, q_g)):
                if value is not None:
                    store[name] = value
            self.eigenvalues_A[name], self.eigenvalues_G[name] = l_a, l_g
        del factors.A, factors.G
        self.diagonal = {**factors.second_moments, **({} if self.update_diagonal else shared)}
        if self.update_diagonal:
            diag = accumulate_diagonal(
                self._capture,
                self._batches(data, "EK-FAC diagonal"),
                self.fisher,
                self._generator(),
                where,
                {b: self._bases(b) for b in bases},
            )
            self.diagonal.update({b: v / factors.n for b, v in diag.items()})
        self._denominators = {}

    # ------------------------------------------------------------------ curvature model
    def _bases(self, block: str) -> tuple[Tensor | None, Tensor | None]:
        """(Q_rows, Q_cols) of a block's matrix; None is the identity."""
        q_a, q_g = self.eigenvectors_A.get(block), self.eigenvectors_G.get(block)
        if self._by_block[block].model == "diagonal":
            return None, None
        return (q_a, q_g) if self._by_block[block].transposed else (q_g, q_a)

    def _eigenvalues(self, block: str) -> Tensor:
        """Λ (rows, cols): the curvature's eigenvalues in the block's eigenbasis."""
        if block in self.diagonal:
            return self.diagonal[block]
        l_a, l_g = self.eigenvalues_A[block], self.eigenvalues_G[block]
        return torch.outer(l_a, l_g) if self._by_block[block].transposed else torch.outer(l_g, l_a)

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
        """The factors A (activation side) and G (gradient side) of every Kronecker block, rebuilt
        from their eigendecompositions: block → {"A": ..., "G": ...}. For a weight shared by several
        modules they are the nearest Kronecker product of the sum of its uses' terms, named after
        its first use."""
        self._require_fitted("kronecker_factors")
        out = {}
        for b in self.layers:
            sides = {}
            for key, vectors, values in (
                ("A", self.eigenvectors_A, self.eigenvalues_A),
                ("G", self.eigenvectors_G, self.eigenvalues_G),
            ):
                q = vectors.get(b.name)
                sides[key] = torch.diag(values[b.name]) if q is None else (q * values[b.name]) @ q.T
            out[b.name] = sides
        return out

    def _rotate(self, block: str, V: Tensor, back: bool = False) -> Tensor:
        q_r, q_c = self._bases(block)
        if q_r is not None:
            V = (q_r if back else q_r.T) @ V
        if q_c is not None:
            V = V @ (q_c.T if back else q_c)
        return V

    def curvature_block(self, block: str) -> Tensor:
        """The explicit (p_block × p_block) curvature model of one block in the flat layout,
        without regularization; for checks on small blocks."""
        self._require_fitted("curvature_block")
        b = self._block(block)
        p = self.layout.block(block).size
        V = to_matrix(b, torch.eye(p, dtype=self.factor_dtype, device=self.device))
        M = self._rotate(block, self._rotate(block, V) * self._eigenvalues(block), back=True)
        return to_flat(b, M)

    def _block(self, block: str) -> Block:
        if block not in self._by_block:
            raise ValueError(f"block={block!r} is no block of this model; blocks are {list(self._by_block)}.")
        return self._by_block[block]

    def _solve_block(self, block: _Block, rhs: Tensor) -> Tensor:
        b = self._by_block[block.name]
        V = self._rotate(block.name, to_matrix(b, rhs.to(self.factor_dtype)))
        V = self._rotate(block.name, V / self._denominator(block.name), back=True)
        return to_flat(b, V).to(rhs.dtype)

    # ------------------------------------------------------------------ gradients
    def _chunk(self) -> int:
        """Samples per chunk: as many per-sample gradients in the factor dtype as fit in
        ``memory.GRADIENT_BYTES`` (or ``gradient_chunk_size``)."""
        return self.gradient_chunk_size or default_chunk_size(self.n_parameters, self.factor_dtype.itemsize)

    def _layer_gradients(self, x: Any, y: Tensor, rotate: bool, dtype: torch.dtype | None = None):
        """Yields (start, {block: (n_chunk, rows, cols)}) per chunk: per-sample loss gradients
        as block matrices, rotated into the eigenbasis if ``rotate``."""
        chunk = self._chunk()
        dtype = dtype or self.factor_dtype
        capture = self._capture
        for s in range(0, batch_size_of(x), chunk):
            batch = capture.forward(take_rows(x, slice(s, s + chunk)))
            empirical = capture.deltas(batch, y[s : s + chunk], FisherType.EMPIRICAL, None, "EkfacInfluence")
            _, deltas = next(empirical)
            out = {}
            for b in self.blocks:
                if b.model == "diagonal":
                    out[b.name] = capture.diagonal_gradients(b, batch, deltas).to(dtype).unsqueeze(1)
                else:
                    terms = capture.terms(b, capture.activations(b, batch), deltas, batch.n)
                    out[b.name] = rotated(*(self._bases(b.name) if rotate else (None, None)), terms, dtype)
            yield s, out

    def _collect(
        self, x: Any, y: Tensor, rotate: bool, dtype: torch.dtype | None = None
    ) -> dict[str, Tensor]:
        dtype = dtype or self.factor_dtype
        parts: dict[str, list[Tensor]] = {b.name: [] for b in self.blocks}
        for _, grads in self._layer_gradients(x, y, rotate, dtype):
            for b, g in grads.items():
                parts[b].append(g)
        return {
            b.name: torch.cat(parts[b.name])
            if parts[b.name]
            else torch.zeros((0, b.rows, b.cols), dtype=dtype, device=self.device)
            for b in self.blocks
        }

    def _gradients(self, x: Any, y: Tensor) -> Tensor:
        """Per-sample gradients (n, p) in the flat layout, from one batched forward/backward
        (Σ_t r_t c_tᵀ per Kronecker block) instead of a vmap over samples."""
        grads = self._collect(x, y, rotate=False, dtype=self.dtype)
        return torch.cat([to_flat(b, grads[b.name]) for b in self.blocks], dim=1)

    def _train_gradients(self, x: Any, y: Tensor) -> Tensor:
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
        for b in self._by_block:
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

    def __copy__(self):
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._denominators = {}
        return new
