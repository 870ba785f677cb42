"""CgInfluence: matrix-free conjugate gradients on curvature-vector products."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from ..errors import NotPositiveDefiniteError
from .base import TorchInfluenceFunctionModel
from .curvature import CurvatureOperator
from .layout import BlockMode, LossFunction, SecondOrderMode, _Block
from .linalg import lanczos_extremes, not_positive_definite
from .preconditioner import Preconditioner

__all__ = ["CgInfluence", "block_cg"]


def _orthonormal_basis(M: Tensor, rtol: float) -> Tensor:
    """An orthonormal basis of the row span of M (k, p), as rows, dropping the rows
    that are (numerically) linear combinations of the earlier ones.

    Householder QR (cheap): the basis is orthonormal to working precision whatever M's
    conditioning, so the projected system P(A + λI)Pᵀ stays as well conditioned as
    A + λI. Plain QR does not reveal rank, so when some |R_ii| falls below rtol times the
    largest (M is numerically rank deficient) the basis comes from an SVD instead,
    keeping the singular directions above rtol times the largest.
    """
    if M.shape[0] == 0:
        return M
    Q, R = torch.linalg.qr(M.T)
    d = R.diagonal().abs()
    top = d.max()
    if not top > 0:
        return M[:0]
    if bool((d > rtol * top).all()):
        return Q.T.contiguous()
    U, s, _ = torch.linalg.svd(M.T, full_matrices=False)
    return U[:, s > rtol * s[0]].T.contiguous()


def _projected_solver(PQ: Tensor, scale: float):
    """A function M ↦ PQ⁻¹ M for the symmetric projected matrix PQ: Cholesky when it is
    positive definite (always, for A + λI positive definite), LU otherwise; None when PQ has an
    eigenvalue that is negative beyond rounding: below −10 · size · eps · ``scale``, the largest
    curvature seen so far (the rounding of the products is relative to A's scale, not PQ's)."""
    L, info = torch.linalg.cholesky_ex(PQ)
    if info.item() == 0:
        return lambda M: torch.cholesky_solve(M, L)
    evals = torch.linalg.eigvalsh(PQ)
    scale = max(scale, evals.abs().max().item())
    if evals[0].item() < -10 * PQ.shape[0] * torch.finfo(PQ.dtype).eps * scale:
        return None
    return lambda M: torch.linalg.solve(PQ, M)


def _negative_curvature(
    matmat, P: Tensor, PQ: Tensor, regularization: float, where: str, what: str, advice: str
) -> NotPositiveDefiniteError:
    """The NotPositiveDefiniteError for a block of search directions P (rows, orthonormal) whose
    projected matrix PQ = P (A + λI) Pᵀ is not positive definite, with A's extreme eigenvalues
    estimated by Lanczos on A, started from the direction of PQ's most negative eigenvalue. That
    eigenvalue minus λ is a Rayleigh quotient of A, an upper bound of its smallest eigenvalue."""
    evals, evecs = torch.linalg.eigh(PQ)
    direction = evecs[:, 0] @ P
    seen = evals[0].item() - regularization
    estimate = lanczos_extremes(matmat, direction)
    return not_positive_definite(
        where,
        what,
        regularization,
        min(estimate.smallest, seen),
        estimate.largest,
        advice,
        estimated_by=f"{estimate.describe()} after conjugate gradients met the Rayleigh quotient "
        f"{seen + regularization:.3g} of the regularized matrix",
    )


def block_cg(
    matmat,
    rhs: Tensor,
    regularization: float,
    rtol: float,
    atol: float,
    maxiter: int,
    preconditioner: Preconditioner | None = None,
    *,
    where: str = "block_cg",
    what: str = "the matrix",
    advice: str = "or check the matrix",
):
    """Solve (A + λI) x_i = b_i for all rows b_i of B (k, p) at once with breakdown-free block CG.

    Each iteration makes one product of A with a block of at most k search
    directions (one pass over the training data for all right-hand sides);
    right-hand sides that have converged stop contributing new directions, and
    search directions that become linearly dependent are dropped (Ji & Li 2017).
    The search directions are kept orthonormal, so the small projected systems
    are solved by Cholesky. Everything is stored row-wise (one row per
    right-hand side or direction), the layout ``matmat`` takes.

    A + λI must be positive definite. Each block of search directions P shows whether it is on
    the Krylov space explored: when P (A + λI) Pᵀ has an eigenvalue below zero (beyond rounding),
    the solve stops with NotPositiveDefiniteError, A's extreme eigenvalues estimated by a few
    Lanczos steps on A started from that direction (``linalg.lanczos_extremes``), and the message
    gives a λ that makes A + λI positive definite. A solve that converges before meeting negative
    curvature returns the solution of the (possibly indefinite) system.

    Args:
        matmat: V (m, p) → V Aᵀ, A applied to each row.
        where, what, advice: the error's place, the name of A (e.g. "the curvature of block
            'model'") and what else the user may change.

    Returns (X of shape (k, p), relative residuals (k,), converged mask (k,), iterations).

    Raises:
        NotPositiveDefiniteError: A + λI has negative curvature along a block of search directions.
    """
    X = torch.zeros_like(rhs)
    b_norm = torch.linalg.norm(rhs, dim=1)
    tol = torch.maximum(rtol * b_norm, torch.full_like(b_norm, atol))
    R = rhs.clone()
    done = b_norm <= tol

    def precondition(R):
        return preconditioner.solve(R) if preconditioner is not None else R

    orth_rtol = torch.finfo(rhs.dtype).eps * 10
    it = 0
    scale = 0.0  # the largest |Rayleigh quotient| of A + λI seen: the scale of rounding in PQ
    if not bool(done.all()):
        active = (~done).nonzero().squeeze(1)
        all_active = active.numel() == R.shape[0]
        P = _orthonormal_basis(precondition(R if all_active else R[active]), orth_rtol)
        while it < maxiter and P.shape[0] > 0:
            it += 1
            Q = matmat(P) + regularization * P
            PQ = P @ Q.T
            PQ = (PQ + PQ.T) / 2
            scale = max(scale, PQ.diagonal().abs().max().item())
            solve = _projected_solver(PQ, scale)
            if solve is None:
                raise _negative_curvature(matmat, P, PQ, regularization, where, what, advice)
            R_a = R if all_active else R[active]
            alpha = solve(P @ R_a.T)  # (m, k_active)
            if all_active:
                X.addmm_(alpha.T, P)
                R.addmm_(alpha.T, Q, alpha=-1)
            else:
                X.index_add_(0, active, alpha.T @ P)
                R.index_add_(0, active, alpha.T @ Q, alpha=-1)
            done = torch.linalg.norm(R, dim=1) <= tol
            if bool(done.all()):
                break
            active = (~done).nonzero().squeeze(1)
            all_active = active.numel() == R.shape[0]
            Z = precondition(R if all_active else R[active])
            beta = solve(Q @ Z.T)  # (m, k_active)
            P = _orthonormal_basis(torch.addmm(Z, beta.T, P, alpha=-1), orth_rtol)
    residual = torch.linalg.norm(R, dim=1) / torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm))
    return X, residual, done, it


class CgInfluence(TorchInfluenceFunctionModel):
    """Influences with (H + λI)⁻¹ applied by conjugate gradients, never forming H.

    All right-hand sides of a query (every test gradient) are solved together by
    block CG: one pass over the training data per iteration serves every test
    point, and in exact arithmetic at most ⌈p / k⌉ iterations are needed for k
    right-hand sides. Test gradients are computed once per query.

    Args:
        model, loss, hessian_regularization, block_structure, second_order_mode,
            gradient_chunk_size: see ``TorchInfluenceFunctionModel``.
        rtol: stop a right-hand side b when ‖b − (H+λI)x‖ ≤ max(rtol‖b‖, atol).
        atol: absolute tolerance, see rtol.
        maxiter: at most this many iterations (default: the block's dimension).
        preconditioner: a ``JacobiPreconditioner``, ``NystroemPreconditioner``, or None.
        progress: unused, accepted for compatibility.

    Warns:
        RuntimeWarning when some right-hand sides miss the tolerance, with their
        number, the worst relative residual and what to change.
    """

    #: the preconditioner is recorded with its own settings, e.g. {"class": "NystroemPreconditioner",
    #: "rank": 10, "seed": 0}, so that a resume with another preconditioner is detected
    settings = TorchInfluenceFunctionModel.settings + ("rtol", "atol", "maxiter", "preconditioner")

    def __init__(
        self,
        model: nn.Module,
        loss: LossFunction,
        hessian_regularization: float | Mapping[str, float] = 0.0,
        rtol: float = 1e-7,
        atol: float = 1e-7,
        maxiter: int | None = None,
        preconditioner: Preconditioner | None = None,
        block_structure: BlockMode | str | Mapping[str, Iterable[str]] = BlockMode.FULL,
        second_order_mode: SecondOrderMode | str = SecondOrderMode.HESSIAN,
        gradient_chunk_size: int | None = None,
        progress: bool = False,
    ):
        super().__init__(
            model, loss, hessian_regularization, block_structure, second_order_mode, gradient_chunk_size
        )
        if not rtol > 0 or not atol >= 0:
            raise ValueError(f"rtol must be > 0 and atol ≥ 0; got rtol={rtol}, atol={atol}.")
        if maxiter is not None and maxiter < 1:
            raise ValueError(f"maxiter must be ≥ 1 or None; got {maxiter}.")
        if preconditioner is not None and not isinstance(preconditioner, Preconditioner):
            raise TypeError(
                "preconditioner must be a JacobiPreconditioner, NystroemPreconditioner or None; "
                f"got {type(preconditioner).__name__}."
            )
        self.rtol, self.atol, self.maxiter = rtol, atol, maxiter
        self.preconditioner = preconditioner
        self.progress = progress
        self._operators: dict[str, CurvatureOperator] = {}
        self._preconditioners: dict[str, Preconditioner] = {}

    def _fit(self, data: Iterable) -> None:
        self._operators = {b.name: self._curvature_operator(data, b) for b in self.layout.blocks}
        self._preconditioners = {}
        if self.preconditioner is not None:
            for b in self.layout.blocks:
                op = self._operators[b.name]
                self._preconditioners[b.name] = copy.deepcopy(self.preconditioner).fit(
                    op.matmat, op.size, self.regularization[b.name], self.dtype, self.device
                )

    def _solve_block(self, block: _Block, rhs: Tensor) -> Tensor:
        if rhs.shape[0] == 0:
            return rhs.clone()
        op = self._operators[block.name]
        maxiter = self.maxiter or max(op.size, 10)
        X, residual, done, iterations = block_cg(
            op.matmat,
            rhs,
            self.regularization[block.name],
            self.rtol,
            self.atol,
            maxiter,
            self._preconditioners.get(block.name),
            where="CgInfluence",
            what=f"the curvature of block {block.name!r}",
            advice="or second_order_mode=SecondOrderMode.GAUSS_NEWTON (positive semi-definite)",
        )
        if not bool(done.all()):
            missed = int((~done).sum())
            warnings.warn(
                f"CgInfluence: {missed} of {rhs.shape[0]} right-hand sides of block {block.name!r} "
                f"missed the tolerance (rtol={self.rtol:g}, atol={self.atol:g}) after {iterations} "
                f"iterations; worst relative residual {residual.max().item():.3g}. Raise maxiter, "
                "raise hessian_regularization, loosen rtol/atol, or add a preconditioner "
                "(NystroemPreconditioner(rank=...)).",
                RuntimeWarning,
                stacklevel=4,
            )
        return X

    def with_regularization(self, hessian_regularization) -> CgInfluence:
        """A copy with another λ (CG keeps no decomposition; preconditioners are refitted lazily)."""
        new = self._copy_with_regularization(hessian_regularization)
        new._preconditioners = {k: copy.copy(p) for k, p in self._preconditioners.items()}
        for k, p in new._preconditioners.items():
            p.regularization = new.regularization[k]
        return new
