"""Small linear algebra the methods share, and the one message for a curvature that is not
positive definite once regularized."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import NotPositiveDefiniteError

__all__ = [
    "stack_rows",
    "suggested_regularization",
    "not_positive_definite",
    "cholesky",
    "numerically_singular",
]

#: the suggested λ exceeds the one that just makes the matrix positive semi-definite by this
#: fraction of the spectrum's scale (the largest |eigenvalue|), so that it is invertible with room
_MARGIN = 1e-6


def stack_rows(rows: Sequence[Tensor]) -> Tensor:
    """The rows of several (k_i, p) tensors in order: (Σ k_i, p)."""
    return torch.cat(list(rows), dim=0)


def suggested_regularization(smallest: float, largest: float) -> float:
    """A λ that makes a symmetric matrix with extreme eigenvalues ``smallest`` and ``largest``
    positive definite once added to its diagonal: 10 % above −smallest (when negative), plus
    1e-6 of the spectrum's scale max(|smallest|, |largest|) (1e-6 for an all-zero spectrum)."""
    scale = max(abs(smallest), abs(largest))
    return max(0.0, -smallest) * 1.1 + _MARGIN * (scale if scale > 0 else 1.0)


def not_positive_definite(
    where: str, what: str, regularization: float, smallest: float, largest: float, advice: str
) -> NotPositiveDefiniteError:
    """The error for ``what`` (e.g. "the curvature of block 'model'") plus λ = ``regularization``
    that is not positive definite, given the curvature's extreme eigenvalues; the message says
    which ``hessian_regularization`` makes it so, then ``advice`` (what else the user may change)."""
    singular = " (it is singular)" if smallest >= 0 else ""
    suggestion = suggested_regularization(smallest, largest)
    return NotPositiveDefiniteError(
        f"{where}: {what} plus hessian_regularization={regularization:g} is not positive "
        f"definite{singular}: the curvature's largest eigenvalue is {largest:.4g} and its smallest "
        f"eigenvalue is {smallest:.4g}. Use hessian_regularization ≥ {suggestion:.3g}, {advice}."
    )


def cholesky(A: Tensor) -> Tensor | None:
    """The lower Cholesky factor of the symmetric matrix A, or None when A is not positive definite."""
    L, info = torch.linalg.cholesky_ex(A)
    return L if info.item() == 0 else None


def numerically_singular(eigenvalues: Tensor) -> bool:
    """Whether a symmetric matrix with these eigenvalues is singular to working precision: its
    smallest eigenvalue is ≤ size · eps · its largest |eigenvalue| (an eigenvalue that rounding
    alone could have made, the inverse of which would be noise)."""
    top = eigenvalues.abs().max()
    floor = eigenvalues.numel() * torch.finfo(eigenvalues.dtype).eps * top
    return not bool(eigenvalues.min() > floor)
