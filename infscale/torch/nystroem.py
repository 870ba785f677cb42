"""NystroemSketchInfluence: a randomized Nyström sketch of each curvature block,
inverted with the Woodbury identity."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from ..base import InfluenceMode
from .base import TorchInfluenceFunctionModel
from .layout import BlockMode, LossFunction, SecondOrderMode, _Block
from .preconditioner import nystroem_sketch

__all__ = ["NystroemSketchInfluence", "woodbury_solve", "woodbury_influences", "woodbury_self_influences"]


# ---------------------------------------------------------------- the Woodbury form of a low-rank model
# For a model that keeps ``eigenvalues`` σ (r_b,) and orthonormal ``eigenvectors`` U (p_b, r_b) of
# each block and λ > 0 in every block (NystroemSketchInfluence; ArnoldiInfluence(use_woodbury=True)):
#     (U diag(σ) Uᵀ + λI)⁻¹ = U diag(1 / (σ + λ)) Uᵀ + (I − UUᵀ) / λ
#                           = (1/λ) (I − U diag(σ / (σ + λ)) Uᵀ).


def woodbury_solve(U: Tensor, sigma: Tensor, lam: float, rhs: Tensor) -> Tensor:
    """(U diag(σ) Uᵀ + λI)⁻¹ applied to each row of rhs (k, p_b); U (p_b, r) orthonormal, λ > 0."""
    proj = rhs @ U
    return (rhs - proj @ U.T) / lam + (proj / (sigma + lam)) @ U.T


def _woodbury_scale(model: TorchInfluenceFunctionModel) -> Tensor:
    """1/(σ + λ) − 1/λ of every block's low-rank directions, blocks in order: (Σ r_b,)."""
    lam = model.regularization
    return torch.cat(
        [1.0 / (model.eigenvalues[b.name] + lam[b.name]) - 1.0 / lam[b.name] for b in model.layout.blocks]
    )


def woodbury_influences(model: TorchInfluenceFunctionModel, x_test, y_test, x, y, symmetric: bool) -> Tensor:
    """Up-mode influences through the low-rank structure, per block (P = Uᵀ g, d = 1/(σ+λ) − 1/λ)::

        g_testᵀ (UΣUᵀ + λI)⁻¹ g = (g_test · g) / λ + P_testᵀ diag(d) P

    The inner products g_test · g come from the factored gradients of nn.Linear layers
    (``GradientEngine.gram``) where that is cheaper than p numbers per pair; the projections P
    need products with the r vectors only. Same numbers as the factors (H + λI)⁻¹ g_test,
    without forming them. ``model._from_gradients`` must take per-sample gradients."""
    engine = model._engine
    test = engine.factored(x_test, y_test, model._chunk())
    train = test if symmetric else engine.factored(x, y, model._chunk())
    if not engine.inner_products_pay(test, train):
        return model._from_gradients(model._solve(engine.to_dense(test)), train)
    basis = model._block_rows(model.eigenvectors)
    projected_test = engine.products(basis, test)  # (Σ r, n_test)
    projected = projected_test if symmetric else engine.products(basis, train)
    out = (projected_test.T * _woodbury_scale(model)) @ projected
    for b in model.layout.blocks:
        out += engine.gram(test, train, b.slice) / model.regularization[b.name]
    return out


def woodbury_self_influences(
    model: TorchInfluenceFunctionModel, x: Tensor, y: Tensor, fallback: Callable[[Tensor, Tensor], Tensor]
) -> Tensor:
    """Σ_blocks ‖g‖² / λ + Σ_r d_r P_r² (see ``woodbury_influences``) from the factored gradients,
    or ``fallback(x, y)`` where those do not pay."""
    engine = model._engine
    gradients = engine.factored(x, y, model._chunk())
    if not engine.inner_products_pay(gradients):
        return fallback(x, y)
    projected = engine.products(model._block_rows(model.eigenvectors), gradients)  # (Σ r, n)
    out = _woodbury_scale(model) @ projected.square()
    for b in model.layout.blocks:
        out += engine.squared_norms(gradients, b.slice) / model.regularization[b.name]
    return out


class NystroemSketchInfluence(TorchInfluenceFunctionModel):
    """Influences through a randomized Nyström approximation H ≈ U diag(σ) Uᵀ of each block.

    At ``fit``, one pass over the training data multiplies each curvature block
    with a p_b × rank Gaussian test matrix Ω (all ``rank`` vectors in one pass);
    the sketch H Ω gives U (p_b × rank, orthonormal) and σ ≥ 0
    (Tropp et al. 2017, via ``nystroem_sketch``). The inverse uses the Woodbury identity:

        (U diag(σ) Uᵀ + λI)⁻¹ = U diag(1 / (σ + λ)) Uᵀ + (I − UUᵀ) / λ,

    so directions outside the sketch are kept, scaled by 1/λ (unlike
    ``ArnoldiInfluence``, which drops them). This needs λ > 0 in every block. The
    sketch approximates H from below (H − UΣUᵀ is PSD for a PSD H), so components
    outside the sketch are over-weighted when λ is small compared with the
    neglected eigenvalues; accuracy follows the decay of the spectrum.

    The Nyström approximation assumes a positive semi-definite matrix. The Hessian
    of a non-convex model is often indefinite: this is detected from the small
    core matrix Ωᵀ H Ω, a RuntimeWarning is issued and negative directions are
    dropped; use ``second_order_mode=SecondOrderMode.GAUSS_NEWTON`` (PSD for
    cross-entropy and MSE) in that case.

    Args:
        model, loss, block_structure, second_order_mode, gradient_chunk_size: see
            ``TorchInfluenceFunctionModel``.
        hessian_regularization: λ > 0, a float or a dict block name → float
            (required in every block).
        rank: sketch size per block (capped at the block size).
        seed: seed of the Gaussian test matrix.

    Raises:
        ValueError: rank < 1, or λ ≤ 0 in some block.
    """

    settings = TorchInfluenceFunctionModel.settings + ("rank", "seed")

    def __init__(
        self,
        model: nn.Module,
        loss: LossFunction,
        hessian_regularization: float | Mapping[str, float],
        rank: int = 10,
        block_structure: BlockMode | str | Mapping[str, Iterable[str]] = BlockMode.FULL,
        second_order_mode: SecondOrderMode | str = SecondOrderMode.HESSIAN,
        gradient_chunk_size: int | None = None,
        seed: int = 0,
    ):
        super().__init__(
            model, loss, hessian_regularization, block_structure, second_order_mode, gradient_chunk_size
        )
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an integer ≥ 1; got {rank!r}.")
        self._check_positive(self.regularization)
        self.rank = rank
        self.seed = seed
        self.eigenvalues: dict[str, Tensor] = {}
        self.eigenvectors: dict[str, Tensor] = {}
        self.core_eigenvalues: dict[str, Tensor] = {}

    @staticmethod
    def _check_positive(regularization: Mapping[str, float]) -> None:
        bad = {k: v for k, v in regularization.items() if not v > 0}
        if bad:
            raise ValueError(
                f"NystroemSketchInfluence needs hessian_regularization > 0 in every block (the Woodbury "
                f"inverse scales the complement of the sketch by 1/λ); got {bad}."
            )

    def _fit(self, data: Iterable) -> None:
        self.eigenvalues, self.eigenvectors, self.core_eigenvalues = {}, {}, {}
        for i, b in enumerate(self.layout.blocks):
            op = self._curvature_operator(data, b)
            captured: dict[str, Tensor] = {}

            def matmat(V: Tensor, op=op, captured=captured) -> Tensor:
                captured["omega"], captured["product"] = V, op.matmat(V)
                return captured["product"]

            rank = min(self.rank, op.size)
            U, sigma = nystroem_sketch(matmat, op.size, rank, self.dtype, self.device, self.seed + i)
            omega, product = captured["omega"].double(), captured["product"].double()
            core = omega @ product.T  # Ωᵀ H Ω (rank × rank)
            core_eigenvalues = torch.linalg.eigvalsh((core + core.T) / 2)
            self.core_eigenvalues[b.name] = core_eigenvalues
            top = core_eigenvalues.abs().max().item()
            noise = 100 * torch.finfo(self.dtype).eps * max(top, torch.finfo(self.dtype).tiny)
            if core_eigenvalues[0].item() < -noise:
                warnings.warn(
                    f"NystroemSketchInfluence: the curvature of block {b.name!r} is indefinite (the "
                    f"sketched core matrix has eigenvalue {core_eigenvalues[0].item():.3g}, largest "
                    f"{top:.3g}); the Nyström approximation assumes a positive semi-definite matrix and "
                    "drops the negative directions. Use second_order_mode=SecondOrderMode.GAUSS_NEWTON.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            self.eigenvalues[b.name] = sigma
            self.eigenvectors[b.name] = U

    def _solve_block(self, block: _Block, rhs: Tensor) -> Tensor:
        return woodbury_solve(
            self.eigenvectors[block.name], self.eigenvalues[block.name], self.regularization[block.name], rhs
        )

    def _influences(self, x_test, y_test, x, y, mode, symmetric) -> Tensor:
        if mode is not InfluenceMode.Up:
            return super()._influences(x_test, y_test, x, y, mode, symmetric)
        return woodbury_influences(self, x_test, y_test, x, y, symmetric)

    def _self_influences_up(self, x: Tensor, y: Tensor) -> Tensor:
        return woodbury_self_influences(self, x, y, super()._self_influences_up)

    def with_regularization(self, hessian_regularization) -> NystroemSketchInfluence:
        """A copy with another λ > 0 that reuses the sketch (no pass over the data)."""
        new = self._copy_with_regularization(hessian_regularization)
        self._check_positive(new.regularization)
        return new
