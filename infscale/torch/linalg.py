"""Small linear algebra the methods share, the one message for a curvature that is not positive
definite once regularized, and a Lanczos estimate of a matrix-free operator's extreme eigenvalues
(for that message, where the matrix is never formed)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import NotPositiveDefiniteError

__all__ = [
    "stack_rows",
    "suggested_regularization",
    "not_positive_definite",
    "cholesky",
    "numerically_singular",
    "SpectrumEstimate",
    "lanczos_extremes",
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
    where: str,
    what: str,
    regularization: float,
    smallest: float,
    largest: float,
    advice: str,
    estimated_by: str | None = None,
) -> NotPositiveDefiniteError:
    """The error for ``what`` (e.g. "the curvature of block 'model'") plus λ = ``regularization``
    that is not positive definite, given the curvature's extreme eigenvalues; the message says
    which ``hessian_regularization`` makes it so, then ``advice`` (what else the user may change).
    ``estimated_by`` (e.g. "12 Lanczos steps") marks the eigenvalues as estimates and says how."""
    singular = " (it is singular)" if smallest >= 0 else ""
    suggestion = suggested_regularization(smallest, largest)
    about = "about " if estimated_by else ""
    how = f" (estimated by {estimated_by})" if estimated_by else ""
    return NotPositiveDefiniteError(
        f"{where}: {what} plus hessian_regularization={regularization:g} is not positive "
        f"definite{singular}: the curvature's largest eigenvalue is {about}{largest:.4g} and its smallest "
        f"eigenvalue is {about}{smallest:.4g}{how}. Use hessian_regularization ≥ {suggestion:.3g}, "
        f"{advice}."
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


@dataclass(frozen=True)
class SpectrumEstimate:
    """Extreme eigenvalues of a symmetric operator estimated by ``lanczos_extremes``.

    ``smallest`` is the smallest Ritz value minus its residual bound (some eigenvalue lies within
    the bound of the Ritz value, so this leans towards the more negative side), ``largest`` the
    largest Ritz value plus its bound; ``steps`` products were made; ``converged`` says whether the
    smallest Ritz value met the tolerance (or the Krylov space became invariant)."""

    smallest: float
    largest: float
    steps: int
    converged: bool

    def describe(self) -> str:
        """For an error message, e.g. "12 Lanczos steps"."""
        note = "" if self.converged else ", not converged"
        return f"{self.steps} Lanczos steps{note}"


def lanczos_extremes(
    matmat: Callable[[Tensor], Tensor],
    start: Tensor,
    max_steps: int = 60,
    rtol: float = 1e-2,
    min_steps: int = 10,
    seed: int = 0,
) -> SpectrumEstimate:
    """Estimate the smallest and largest eigenvalues of the symmetric operator A by Lanczos with
    full reorthogonalization (one product with one vector per step).

    Args:
        matmat: V (k, p) → V Aᵀ (A applied to each row), in ``start``'s dtype and device.
        start: (p,) the starting direction, e.g. one along which A showed negative curvature; a
            seeded random tenth is mixed in so that no eigenvector is missed by construction.
        max_steps: at most this many products (and never more than p).
        rtol: stop once the residual bound of the smallest Ritz value is ≤ rtol times its size,
            after at least ``min_steps`` steps (a Ritz value may settle on an eigenvalue other than
            the smallest while the start holds little of the smallest's eigenvector: more steps
            give the Krylov space the chance to reach it), or when the Krylov space is invariant
            (then the Ritz values are eigenvalues).
        min_steps: see rtol.
        seed: seed of the random part of the start.

    Returns:
        A ``SpectrumEstimate``. The smallest Ritz value is never below A's smallest eigenvalue,
        so ``smallest`` subtracts the residual bound; in practice Lanczos finds the extreme
        eigenvalues first, but an eigenvalue the Krylov space has not reached cannot be bounded.
    """
    p = start.numel()
    g = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(p, generator=g, dtype=torch.float64).to(start.device)
    v = start.detach().reshape(-1).to(torch.float64)
    v = v / v.norm() if v.norm() > 0 else noise
    v = v + 0.1 * noise / noise.norm()
    v = v / v.norm()
    steps = min(max_steps, p)
    basis = torch.zeros(steps, p, dtype=torch.float64, device=start.device)
    alphas: list[float] = []
    betas: list[float] = []
    theta = torch.zeros(1, dtype=torch.float64)
    bounds = torch.zeros(1, dtype=torch.float64)
    converged = False
    for j in range(steps):
        basis[j] = v
        w = matmat(v.to(start.dtype)[None])[0].to(torch.float64)
        alpha = float(w @ v)
        alphas.append(alpha)
        w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)  # full reorthogonalization, twice
        w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = float(w.norm())
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        theta, S = torch.linalg.eigh(T)
        bounds = (beta * S[-1]).abs()  # |β_j s_j|: an eigenvalue of A lies this close to each θ
        scale = max(float(theta.abs().max()), torch.finfo(torch.float64).tiny)
        invariant = beta <= 1e-12 * scale
        settled = j + 1 >= min_steps and float(bounds[0]) <= rtol * max(abs(float(theta[0])), 1e-6 * scale)
        if invariant or settled:
            converged = True
            steps = j + 1
            break
        betas.append(beta)
        v = w / beta
    else:
        steps = len(alphas)
    return SpectrumEstimate(float(theta[0] - bounds[0]), float(theta[-1] + bounds[-1]), steps, converged)
