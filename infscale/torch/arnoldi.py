"""ArnoldiInfluence: the top eigenpairs of each curvature block by block Lanczos,
inverted on their span."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..base import InfluenceMode
from .base import TorchInfluenceFunctionModel
from .data import batch_size_of, take_rows
from .factored import FactoredGradients
from .layout import BlockMode, LossFunction, SecondOrderMode, _Block
from .linalg import not_positive_definite
from .nystroem import woodbury_influences, woodbury_self_influences, woodbury_solve

__all__ = ["ArnoldiInfluence", "lanczos_eigenpairs", "LanczosResult"]

MatMat = Callable[[Tensor], Tensor]


@dataclass
class LanczosResult:
    """Ritz pairs of a symmetric operator.

    Attributes:
        eigenvalues: (r,), ordered by decreasing magnitude.
        eigenvectors: (size, r), orthonormal columns.
        residuals: (r,) ‖A v − σ v‖ of each pair (exact: from the stored products).
        converged: whether every residual is ≤ tol · max |σ|.
        n_products: number of block products with the operator (passes over the data).
        krylov_dimension: dimension of the Krylov space that was built.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    converged: bool
    n_products: int
    krylov_dimension: int


def _orthonormal_columns(W: Tensor, reference: float) -> Tensor:
    """Orthonormal basis of span(W), dropping directions with singular value ≤ 100·eps·reference."""
    if W.shape[1] == 0:
        return W
    U, s, _ = torch.linalg.svd(W, full_matrices=False)
    threshold = 100 * torch.finfo(W.dtype).eps * max(reference, torch.finfo(W.dtype).tiny)
    return U[:, s > threshold]


def lanczos_eigenpairs(
    matmat: MatMat,
    size: int,
    rank: int,
    dtype: torch.dtype,
    device: torch.device | str,
    krylov_dimension: int | None = None,
    tol: float = 1e-4,
    max_iter: int | None = None,
    block_size: int | None = None,
    seed: int = 0,
) -> LanczosResult:
    """The ``rank`` eigenpairs of largest magnitude of a symmetric operator A (size × size),
    by block Lanczos with full reorthogonalization and Rayleigh-Ritz.

    Each iteration multiplies A with a block of ``block_size`` vectors at once (one
    pass over the data for the whole block). The Krylov basis Q and the products AQ
    are kept, so T = Qᵀ A Q and the residuals ‖A v − σ v‖ of the Ritz pairs are exact
    without extra products. Stops when every residual is ≤ tol · max|σ|, when the
    basis reaches ``krylov_dimension`` vectors, after ``max_iter`` block products,
    or when the Krylov space becomes invariant (then the pairs are exact).

    Args:
        matmat: V (k, size) → V Aᵀ (k, size), i.e. A applied to each row.
        size: dimension of A.
        rank: number of eigenpairs wanted (capped at size).
        krylov_dimension: most basis vectors kept (default min(size, max(10·rank, 128))).
            Memory is 2 · size · krylov_dimension numbers.
        tol: relative residual tolerance (raised to 100·eps of the dtype).
        max_iter: most block products (default: until krylov_dimension).
        block_size: vectors per product (default: rank).
        seed: seed of the random start block.

    Returns:
        A ``LanczosResult``.
    """
    rank = min(rank, size)
    m_max = min(size, krylov_dimension or max(10 * rank, 128))
    m_max = max(m_max, rank)
    b = min(block_size or rank, m_max)
    tol = max(tol, 100 * torch.finfo(dtype).eps)
    g = torch.Generator(device="cpu").manual_seed(seed)
    start = torch.randn(size, b, generator=g, dtype=torch.float64).to(device, dtype)
    Q, _ = torch.linalg.qr(start)
    basis: list[Tensor] = []
    products: list[Tensor] = []
    n_products = 0
    converged = False
    while True:
        AQ = matmat(Q.T).T
        n_products += 1
        basis.append(Q)
        products.append(AQ)
        Q_all = torch.cat(basis, dim=1)
        AQ_all = torch.cat(products, dim=1)
        T = (Q_all.T @ AQ_all).double()
        T = (T + T.T) / 2
        evals, evecs = torch.linalg.eigh(T)
        order = torch.argsort(evals.abs(), descending=True)[:rank]
        sigma = evals[order]
        Y = evecs[:, order].to(dtype)
        V = Q_all @ Y
        residuals = torch.linalg.norm(AQ_all @ Y - V * sigma.to(dtype), dim=0)
        scale = evals.abs().max().item() if evals.numel() else 0.0
        m = Q_all.shape[1]
        converged = m >= rank and bool((residuals <= tol * max(scale, torch.finfo(dtype).tiny)).all())
        if converged or m >= m_max or (max_iter is not None and n_products >= max_iter):
            break
        W = AQ - Q_all @ (Q_all.T @ AQ)
        W = W - Q_all @ (Q_all.T @ W)  # twice is enough (Giraud et al. 2005)
        Q = _orthonormal_columns(W, scale if scale > 0 else 1.0)[:, : m_max - m]
        if Q.shape[1] == 0:  # invariant subspace: the Ritz pairs are exact eigenpairs
            converged = m >= rank or m == size
            break
        Q = Q - Q_all @ (Q_all.T @ Q)
        Q, _ = torch.linalg.qr(Q)
    return LanczosResult(sigma.to(dtype), V, residuals, converged, n_products, m)


class ArnoldiInfluence(TorchInfluenceFunctionModel):
    """Influences through a low-rank eigendecomposition of each curvature block.

    At ``fit``, the ``rank`` eigenpairs (σ, v) of largest magnitude of each
    curvature block are found by block Lanczos on curvature-matrix products
    (``lanczos_eigenpairs``). The inverse is the *truncated* one,

        (H + λI)⁻¹ ≈ V diag(1 / (σ + λ)) Vᵀ,

    i.e. gradient components outside the span of the top eigenvectors are
    dropped (not scaled by 1/λ). This keeps the directions in which the loss
    curves most: those where (H + λI)⁻¹ is *smallest*; it is exact when ``rank``
    equals the block size. After ``fit`` queries never touch the training data,
    and influences go through projections G V (n × rank): training gradients
    are projected chunk by chunk, so ``train_representation`` is (n, Σ rank_b).

    With ``use_woodbury=True`` (pyDVL 0.10's keyword) the same eigenpairs are
    inverted with the Woodbury identity instead, as ``NystroemSketchInfluence``
    does with its sketch:

        (V diag(σ) Vᵀ + λI)⁻¹ = V diag(1 / (σ + λ)) Vᵀ + (I − VVᵀ) / λ,

    i.e. the inverse of the low-rank approximation plus λI: directions outside
    the span are kept, scaled by 1/λ. This needs λ > 0 in every block; queries
    then take the per-sample training gradients (``train_representation`` is
    (n, p), or factored), not their projections.

    Args:
        model, loss, hessian_regularization, block_structure, second_order_mode,
            gradient_chunk_size: see ``TorchInfluenceFunctionModel``.
        rank: eigenpairs per block (capped at the block size).
        krylov_dimension: most Lanczos basis vectors per block (default
            min(p_b, max(10·rank, 128))); memory 2 · p_b · krylov_dimension.
        tol: stop when every Ritz residual ‖Hv − σv‖ ≤ tol · max|σ|.
        max_iter: most block products (passes over the data) per block.
        block_size: Lanczos vectors per product (default: rank).
        seed: seed of the random start.
        use_woodbury: invert V diag(σ) Vᵀ + λI (Woodbury) instead of truncating
            to the span of V (see above). Recorded in ``hyperparameters()``.

    Also takes pyDVL 0.10's ``regularization=`` (for hessian_regularization)
    and ``eigen_computation_on_gpu=`` (no effect: Lanczos runs in torch on the
    model's device); see ``settings.PYDVL_KEYWORDS``.

    Raises:
        ValueError: rank < 1, krylov_dimension < rank, tol ≤ 0, max_iter < 1,
            use_woodbury with λ ≤ 0 in some block.
        NotPositiveDefiniteError (at fit / with_regularization): some σ + λ ≤ 0,
            i.e. the Hessian has a negative eigenvalue among the top ones;
            use SecondOrderMode.GAUSS_NEWTON or a larger λ.

    Warns:
        RuntimeWarning when Lanczos stops before the tolerance, with the worst
        relative residual.
    """

    settings = TorchInfluenceFunctionModel.settings + (
        "rank",
        "krylov_dimension",
        "tol",
        "max_iter",
        "block_size",
        "seed",
        "use_woodbury",
    )
    # training gradients are projected onto the eigenvectors (``_train_gradients``)
    _train_gradients_are_gradients = False

    def __init__(
        self,
        model: nn.Module,
        loss: LossFunction,
        hessian_regularization: float | Mapping[str, float] = 0.0,
        rank: int = 10,
        krylov_dimension: int | None = None,
        tol: float = 1e-4,
        max_iter: int | None = None,
        block_structure: BlockMode | str | Mapping[str, Iterable[str]] = BlockMode.FULL,
        second_order_mode: SecondOrderMode | str = SecondOrderMode.HESSIAN,
        gradient_chunk_size: int | None = None,
        block_size: int | None = None,
        seed: int = 0,
        use_woodbury: bool = False,
    ):
        super().__init__(
            model, loss, hessian_regularization, block_structure, second_order_mode, gradient_chunk_size
        )
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an integer ≥ 1; got {rank!r}.")
        if krylov_dimension is not None and krylov_dimension < rank:
            raise ValueError(
                f"krylov_dimension must be ≥ rank={rank} or None; got krylov_dimension={krylov_dimension}."
            )
        if not tol > 0:
            raise ValueError(f"tol must be > 0; got {tol}.")
        if max_iter is not None and max_iter < 1:
            raise ValueError(f"max_iter must be ≥ 1 or None; got {max_iter}.")
        if block_size is not None and block_size < 1:
            raise ValueError(f"block_size must be ≥ 1 or None; got {block_size}.")
        if not isinstance(use_woodbury, bool):
            raise TypeError(f"use_woodbury must be True or False; got {use_woodbury!r}.")
        self.use_woodbury = use_woodbury
        # the Woodbury form needs the per-sample gradients, not their projections
        self._train_gradients_are_gradients = use_woodbury
        self._check_woodbury(self.regularization)
        self.rank = rank
        self.krylov_dimension = krylov_dimension
        self.tol = tol
        self.max_iter = max_iter
        self.block_size = block_size
        self.seed = seed
        self.eigenvalues: dict[str, Tensor] = {}
        self.eigenvectors: dict[str, Tensor] = {}
        self.lanczos: dict[str, LanczosResult] = {}

    def _fit(self, data: Iterable) -> None:
        self.eigenvalues, self.eigenvectors, self.lanczos = {}, {}, {}
        for i, b in enumerate(self.layout.blocks):
            op = self._curvature_operator(data, b)
            result = lanczos_eigenpairs(
                op.matmat,
                op.size,
                self.rank,
                self.dtype,
                self.device,
                self.krylov_dimension,
                self.tol,
                self.max_iter,
                self.block_size,
                self.seed + i,
            )
            if not result.converged:
                scale = result.eigenvalues.abs().max().clamp_min(torch.finfo(self.dtype).tiny)
                worst = (result.residuals.max() / scale).item()
                warnings.warn(
                    f"ArnoldiInfluence: Lanczos for block {b.name!r} stopped after {result.n_products} "
                    f"products with a {result.krylov_dimension}-dimensional Krylov space before reaching "
                    f"tol={self.tol:g}: worst relative residual {worst:.3g}. Raise krylov_dimension or "
                    "max_iter, or loosen tol.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            self.lanczos[b.name] = result
            self.eigenvalues[b.name] = result.eigenvalues
            self.eigenvectors[b.name] = result.eigenvectors
        self._check_definite(self.regularization)

    def _check_definite(self, regularization: Mapping[str, float]) -> None:
        for name, sigma in self.eigenvalues.items():
            lam = regularization[name]
            shifted = sigma + lam
            if bool((shifted <= 0).any()):
                raise not_positive_definite(
                    "ArnoldiInfluence",
                    f"the curvature of block {name!r} (its top {sigma.numel()} eigenvalues)",
                    lam,
                    sigma.min().item(),
                    sigma.abs().max().item(),
                    "or second_order_mode=SecondOrderMode.GAUSS_NEWTON (positive semi-definite)",
                )

    def _check_woodbury(self, regularization: Mapping[str, float]) -> None:
        bad = {k: v for k, v in regularization.items() if not v > 0}
        if self.use_woodbury and bad:
            raise ValueError(
                "ArnoldiInfluence(use_woodbury=True) needs hessian_regularization > 0 in every block "
                f"(the Woodbury inverse scales the complement of the eigenvectors by 1/λ); got {bad}. "
                "Give λ > 0, or use_woodbury=False for the inverse on the span of the eigenvectors."
            )

    def _solve_block(self, block: _Block, rhs: Tensor) -> Tensor:
        if self.use_woodbury:
            return woodbury_solve(
                self.eigenvectors[block.name],
                self.eigenvalues[block.name],
                self.regularization[block.name],
                rhs,
            )
        V = self.eigenvectors[block.name]
        scale = 1.0 / (self.eigenvalues[block.name] + self.regularization[block.name])
        return ((rhs @ V) * scale) @ V.T

    # influences through the eigenbasis: (n_test × r) · (r × n_train)
    def _project(self, vectors: Tensor) -> Tensor:
        return torch.cat([vectors[:, b.slice] @ self.eigenvectors[b.name] for b in self.layout.blocks], dim=1)

    def _train_gradients(self, x: Tensor, y: Tensor) -> Tensor | FactoredGradients:
        if self.use_woodbury:  # per-sample gradients, factored where the model allows
            return super()._train_gradients(x, y)
        chunk = self._chunk()
        basis = self._block_rows(self.eigenvectors)
        parts = []
        for s in range(0, batch_size_of(x), chunk):
            gradients = self._engine.factored(take_rows(x, slice(s, s + chunk)), y[s : s + chunk], chunk)
            if isinstance(gradients, FactoredGradients):  # never forms the (chunk, p) gradients
                parts.append(self._engine.products(basis, gradients).T)
            else:
                parts.append(self._project(gradients))
        if not parts:
            return basis.new_zeros((0, basis.shape[0]))
        return torch.cat(parts)

    def _influences(self, x_test, y_test, x, y, mode, symmetric) -> Tensor:
        if self.use_woodbury and mode is InfluenceMode.Up:
            return woodbury_influences(self, x_test, y_test, x, y, symmetric)
        if self.use_woodbury:
            return super()._influences(x_test, y_test, x, y, mode, symmetric)
        if symmetric and mode is InfluenceMode.Up:  # project the test gradients once, reuse them
            gradients = self._gradients(x_test, y_test)
            return self._from_gradients(self._solve(gradients), self._project(gradients))
        return super()._influences(x_test, y_test, x, y, mode, symmetric)

    def _from_gradients(self, factors: Tensor, train_gradients: Tensor | FactoredGradients) -> Tensor:
        if self.use_woodbury:  # factors leave the span: the full products with the gradients
            return super()._from_gradients(factors, train_gradients)
        # factors lie in the span of the eigenvectors, so factors · g = (factors V)(Vᵀ g)
        return self._project(factors) @ train_gradients.T

    def _self_influences_up(self, x: Tensor, y: Tensor) -> Tensor:
        if self.use_woodbury:
            return woodbury_self_influences(self, x, y, super()._self_influences_up)
        return super()._self_influences_up(x, y)

    def with_regularization(self, hessian_regularization) -> ArnoldiInfluence:
        """A copy with another λ that reuses the eigenpairs (no pass over the data)."""
        new = self._copy_with_regularization(hessian_regularization)
        new._check_woodbury(new.regularization)
        new._check_definite(new.regularization)
        return new
