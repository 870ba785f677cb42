"""DirectInfluence: the explicit curvature matrix, factorized once."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from ..errors import NotPositiveDefiniteError
from .base import TorchInfluenceFunctionModel
from .functional import BlockMode, LossFunction, SecondOrderMode, _Block

__all__ = ["DirectInfluence", "NotPositiveDefiniteError"]


class DirectInfluence(TorchInfluenceFunctionModel):
    """Exact influences from the explicit curvature matrix (H + λI), Cholesky-factorized once.

    At ``fit`` the (block-diagonal) curvature of the mean training loss is
    built from Hessian- (or Gauss-Newton-) vector products with the unit vectors,
    then factorized; every query reuses the factorization. Memory is p² per
    block, so this is for models up to some ten thousand parameters.

    See ``TorchInfluenceFunctionModel`` for the arguments.

    Raises (at fit):
        NotPositiveDefiniteError: H + λI is not positive definite; the message gives
            the smallest eigenvalue and a regularization that fixes it.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: LossFunction,
        hessian_regularization: float | Mapping[str, float] = 0.0,
        block_structure: BlockMode | str | Mapping[str, Iterable[str]] = BlockMode.FULL,
        second_order_mode: SecondOrderMode | str = SecondOrderMode.HESSIAN,
        gradient_chunk_size: int | None = None,
    ):
        super().__init__(
            model, loss, hessian_regularization, block_structure, second_order_mode, gradient_chunk_size
        )
        self.curvature: dict[str, Tensor] = {}
        self._cholesky: dict[str, Tensor] = {}

    def _fit(self, data: Iterable) -> None:
        self.curvature = {b.name: self._curvature_operator(data, b).dense() for b in self.layout.blocks}
        self._factorize()

    def _factorize(self) -> None:
        self._cholesky = {}
        for name, H in self.curvature.items():
            lam = self.regularization[name]
            A = H + lam * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
            L, info = torch.linalg.cholesky_ex(A)
            if info.item() != 0:
                smallest = torch.linalg.eigvalsh(H)[0].item()
                suggestion = max(0.0, -smallest) * 1.1 + 1e-6 * max(1.0, abs(smallest))
                raise NotPositiveDefiniteError(
                    f"DirectInfluence.fit(): the curvature of block {name!r} plus "
                    f"hessian_regularization={lam:g} is not positive definite: the curvature's "
                    f"smallest eigenvalue is {smallest:.4g}. Use hessian_regularization ≥ "
                    f"{suggestion:.3g}, or second_order_mode=SecondOrderMode.GAUSS_NEWTON, "
                    "which is positive semi-definite for cross-entropy and MSE."
                )
            self._cholesky[name] = L

    def _solve_block(self, block: _Block, rhs: Tensor) -> Tensor:
        return torch.cholesky_solve(rhs.T, self._cholesky[block.name]).T

    def with_regularization(self, hessian_regularization) -> DirectInfluence:
        """A copy with another λ that reuses the explicit curvature (no new pass over the data)."""
        new = self._copy_with_regularization(hessian_regularization)
        new._factorize()
        return new
