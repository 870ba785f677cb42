"""Preconditioners for conjugate gradients: Jacobi and randomized Nyström."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor

from .settings import Configurable

__all__ = ["Preconditioner", "JacobiPreconditioner", "NystroemPreconditioner", "nystroem_sketch"]

MatMat = Callable[[Tensor], Tensor]


def nystroem_sketch(matmat: MatMat, size: int, rank: int, dtype, device, seed: int = 0):
    """Randomized Nyström approximation U diag(σ) Uᵀ of a PSD operator from one product
    with a (rank, size) Gaussian test matrix (Tropp et al. 2017, stable version).

    Returns (U of shape (size, rank), σ of shape (rank,)), σ descending.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(size, rank, generator=g, dtype=torch.float64).to(device, dtype)
    omega, _ = torch.linalg.qr(omega)
    Y = matmat(omega.T).T  # (size, rank) = A Ω
    Y64, omega64 = Y.double(), omega.double()
    shift = torch.finfo(dtype).eps * torch.linalg.norm(Y64)
    Y_shift = Y64 + shift * omega64
    C = omega64.T @ Y_shift
    C = (C + C.T) / 2
    L, info = torch.linalg.cholesky_ex(C)
    if info.item() != 0:  # indefinite operator: fall back to an eigen-decomposition of C
        evals, evecs = torch.linalg.eigh(C)
        keep = evals > evals.abs().max() * 1e-10
        B = Y_shift @ evecs[:, keep] / evals[keep].sqrt()
    else:
        B = torch.linalg.solve_triangular(L, Y_shift.T, upper=False).T
    U, s, _ = torch.linalg.svd(B, full_matrices=False)
    sigma = (s**2 - shift).clamp_min(0.0)
    return U.to(dtype), sigma.to(dtype)


class Preconditioner(Configurable, ABC):
    """Approximates (A + λI)⁻¹ for conjugate gradients; fitted once per curvature block.

    A subclass declares its ``settings`` (attribute names), which ``hyperparameters()`` records.
    """

    @abstractmethod
    def fit(self, matmat: MatMat, size: int, regularization: float, dtype, device) -> Preconditioner:
        """Fit on the operator A (given as products with rows), of dimension ``size``."""

    @abstractmethod
    def solve(self, rhs: Tensor) -> Tensor:
        """Apply the approximate inverse to each row of rhs (k, size)."""

    def with_regularization(self, regularization: float) -> Preconditioner:
        return self


class JacobiPreconditioner(Preconditioner):
    """Diagonal preconditioner 1 / (d + λ), d an estimate of diag(A) from one product with
    ``num_samples_estimator`` probe vectors (one pass over the data for all of them).

    With at least as many probes as the block has parameters, the probes are the unit vectors
    and d = diag(A) exactly. Otherwise they are Rademacher vectors v (entries ±1) and

        d_i = max(ĥ_i, ŝ_i / √N),   ĥ_i = mean_v v_i (Av)_i,   ŝ_i² = mean_v (Av)_i²,

    with N the number of probes: ĥ is Hutchinson's unbiased estimate of diag(A), whose error in
    entry i has standard deviation (Σ_{j≠i} A_ij² / N)^½ — the rest of row i, not the entry —
    and ŝ_i ≈ ‖A e_i‖ bounds that scale. An entry is never taken below the estimator's own noise
    scale: a plain Hutchinson estimate from one probe is negative for many entries of a
    curvature whose rows are not dominated by their diagonal (for N = 1, d_i = |ĥ_i|), which makes
    the preconditioner indefinite and conjugate gradients slower than without it.
    """

    settings = ("num_samples_estimator", "seed")

    def __init__(self, num_samples_estimator: int = 1, seed: int = 0):
        if num_samples_estimator < 1:
            raise ValueError(f"num_samples_estimator must be ≥ 1; got {num_samples_estimator}.")
        self.num_samples_estimator = num_samples_estimator
        self.seed = seed
        self.diagonal: Tensor | None = None

    def fit(self, matmat, size, regularization, dtype, device):
        n = self.num_samples_estimator
        if n >= size:  # the unit vectors: the exact diagonal for the same number of probes
            self.diagonal = torch.diagonal(matmat(torch.eye(size, dtype=dtype, device=device))).clone()
        else:
            g = torch.Generator(device="cpu").manual_seed(self.seed)
            v = (torch.randint(0, 2, (n, size), generator=g) * 2 - 1).to(device, dtype)
            Av = matmat(v)
            hutchinson = (v * Av).mean(0)
            noise = (Av.square().mean(0) / n).sqrt()
            self.diagonal = torch.maximum(hutchinson, noise)
        self.regularization = regularization
        return self

    def solve(self, rhs):
        d = self.diagonal + self.regularization
        d = torch.where(d.abs() > torch.finfo(d.dtype).tiny, d, torch.ones_like(d))
        return rhs / d


class NystroemPreconditioner(Preconditioner):
    """Randomized Nyström preconditioner (Frangella, Tropp & Udell 2023):
    P⁻¹ = (σ_r + λ) U (Σ + λI)⁻¹ Uᵀ + (I − UUᵀ), from one product with ``rank`` vectors."""

    settings = ("rank", "seed")

    def __init__(self, rank: int, seed: int = 0):
        if rank < 1:
            raise ValueError(f"rank must be ≥ 1; got {rank}.")
        self.rank = rank
        self.seed = seed

    def fit(self, matmat, size, regularization, dtype, device):
        rank = min(self.rank, size)
        self.U, self.sigma = nystroem_sketch(matmat, size, rank, dtype, device, self.seed)
        self.regularization = regularization
        return self

    def solve(self, rhs):
        lam = self.regularization
        proj = rhs @ self.U  # (k, r)
        scale = (self.sigma[-1] + lam) / (self.sigma + lam)
        return rhs - proj @ self.U.T + (proj * scale) @ self.U.T
