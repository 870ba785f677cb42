"""DirectInfluence: the explicit curvature matrix, factorized once."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from ..errors import NotPositiveDefiniteError
from .base import TorchInfluenceFunctionModel
from .layout import BlockMode, LossFunction, SecondOrderMode, _Block
from .linalg import cholesky, not_positive_definite

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
            L = cholesky(H + lam * torch.eye(H.shape[0], dtype=H.dtype, device=H.device))
            if L is None:
                eigenvalues = torch.linalg.eigvalsh(H)
                raise not_positive_definite(
                    "DirectInfluence.fit()",
                    f"the curvature of block {name!r}",
                    lam,
                    eigenvalues[0].item(),
                    eigenvalues[-1].item(),
                    "or second_order_mode=SecondOrderMode.GAUSS_NEWTON, which is positive "
                    "semi-definite for cross-entropy and MSE",
                )
            self._cholesky[name] = L

    def _solve_block(self, block: _Block, rhs: Tensor) -> Tensor:
        return torch.cholesky_solve(rhs.T, self._cholesky[block.name]).T

    def with_regularization(self, hessian_regularization) -> DirectInfluence:
        """A copy with another λ that reuses the explicit curvature (no new pass over the data)."""
        new = self._copy_with_regularization(hessian_regularization)
        new._factorize()
        return new
