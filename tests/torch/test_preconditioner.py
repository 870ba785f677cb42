"""The CG preconditioners against their definitions (explicit float64 matrices), and the block
products they save on ill-conditioned problems, counted by wrapping the operator."""

import warnings

import pytest
import torch
from torch import nn

from infscale.torch import CgInfluence, JacobiPreconditioner, NystroemPreconditioner
from infscale.torch.cg import block_cg
from infscale.torch.curvature import CurvatureOperator
from infscale.torch.layout import ParameterLayout


class Recording:
    """An explicit matrix A as a row-wise operator V ↦ V Aᵀ that keeps the probes it was given and
    counts its products (one product = one call, whatever the number of rows)."""

    def __init__(self, A: torch.Tensor):
        self.A, self.probes, self.products = A, [], 0

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        self.probes.append(V.clone())
        self.products += 1
        return V @ self.A.T


class CountingLoader:
    """The training batches, counting the passes over them (a curvature product is one pass)."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


def _solve_matrix(preconditioner, size: int, dtype=torch.float64) -> torch.Tensor:
    """The matrix M⁻¹ a fitted preconditioner applies (its action on the unit vectors, as rows)."""
    return preconditioner.solve(torch.eye(size, dtype=dtype))


# ------------------------------------------------------------------------------ Jacobi


@pytest.mark.parametrize("lam", [0.7, 2.0])
def test_jacobi_with_as_many_probes_as_parameters_is_the_inverse_diagonal_of_the_explicit_hessian(
    untrained_mlp, untrained_mlp_curvature, lam
):
    """num_samples_estimator ≥ the block size: the unit vectors as probes, the exact diagonal of the
    library's Hessian operator, against the explicit float64 Hessian (torch.autograd.functional)."""
    p = untrained_mlp
    H = untrained_mlp_curvature["hessian"]
    layout = ParameterLayout(p.model)
    op = CurvatureOperator(layout, p.loss, p.loader(7), layout.blocks[0], "hessian", lambda a, b: (a, b))
    jacobi = JacobiPreconditioner(num_samples_estimator=H.shape[0]).fit(
        op.matmat, op.size, lam, torch.float64, torch.device("cpu")
    )
    assert torch.allclose(jacobi.diagonal, torch.diagonal(H), rtol=1e-10, atol=1e-12)
    expected = torch.diag(1.0 / (torch.diagonal(H) + lam))
    assert torch.allclose(_solve_matrix(jacobi, H.shape[0]), expected, rtol=1e-10, atol=0.0)
    assert op.n_products == 1  # all probes in one pass


def test_jacobi_hutchinson_estimate_follows_its_formula_and_stays_positive(untrained_mlp_curvature):
    """Fewer probes than parameters: d_i = max(mean v_i (Hv)_i, (mean (Hv)_i² / N)^½) from the probes
    it drew, computed here from the explicit Gauss-Newton matrix; the plain Hutchinson estimate is
    negative for many entries (an indefinite preconditioner), the floored one for none."""
    G = untrained_mlp_curvature["gauss_newton"]
    lam = 1e-3
    for n in (1, 3):
        operator = Recording(G)
        jacobi = JacobiPreconditioner(num_samples_estimator=n, seed=5).fit(
            operator, G.shape[0], lam, torch.float64, torch.device("cpu")
        )
        (V,) = operator.probes
        assert V.shape == (n, G.shape[0]) and bool((V.abs() == 1).all())  # Rademacher probes
        GV = V @ G
        hutchinson = (V * GV).mean(0)
        floor = (GV.square().mean(0) / n).sqrt()
        expected = torch.maximum(hutchinson, floor)
        assert torch.allclose(jacobi.diagonal, expected, rtol=1e-12, atol=1e-15)
        assert int((hutchinson + lam <= 0).sum()) >= 5  # what the floor is for
        assert bool((jacobi.diagonal > 0).all())
        assert torch.allclose(_solve_matrix(jacobi, G.shape[0]), torch.diag(1 / (expected + lam)), rtol=1e-12)
    # the floor shrinks like 1/√N: with many probes the estimate approaches the diagonal
    many = JacobiPreconditioner(num_samples_estimator=G.shape[0] - 1).fit(
        Recording(G), G.shape[0], lam, torch.float64, torch.device("cpu")
    )
    one = JacobiPreconditioner().fit(Recording(G), G.shape[0], lam, torch.float64, torch.device("cpu"))
    exact = torch.diagonal(G)
    assert (many.diagonal - exact).norm() < 0.5 * (one.diagonal - exact).norm()


# ------------------------------------------------------------------------------ Nyström


def _explicit_nystroem_inverse(A: torch.Tensor, omega: torch.Tensor, lam: float) -> torch.Tensor:
    """P⁻¹ = (σ_r + λ) U (Σ + λI)⁻¹ Uᵀ + (I − UUᵀ) for the Nyström approximation
    Â = (AΩ)(ΩᵀAΩ)⁻¹(AΩ)ᵀ = U Σ Uᵀ of rank r, Ω (p, r) the test matrix."""
    Y = A @ omega
    A_hat = Y @ torch.linalg.solve(omega.T @ Y, Y.T)
    A_hat = (A_hat + A_hat.T) / 2
    evals, evecs = torch.linalg.eigh(A_hat)
    r = omega.shape[1]
    sigma, U = evals[-r:].flip(0), evecs[:, -r:].flip(1)
    eye = torch.eye(A.shape[0], dtype=A.dtype)
    return (sigma[-1] + lam) * U @ torch.diag(1 / (sigma + lam)) @ U.T + eye - U @ U.T


@pytest.mark.parametrize("rank", [4, 12])
def test_nystroem_preconditioner_is_its_formula_on_the_explicit_gauss_newton_matrix(
    untrained_mlp_curvature, rank
):
    G = untrained_mlp_curvature["gauss_newton"]
    lam = 1e-2
    operator = Recording(G)
    nystroem = NystroemPreconditioner(rank=rank, seed=3).fit(
        operator, G.shape[0], lam, torch.float64, torch.device("cpu")
    )
    (omega_rows,) = operator.probes  # one product with all `rank` test vectors
    assert omega_rows.shape == (rank, G.shape[0])
    expected = _explicit_nystroem_inverse(G, omega_rows.T, lam)
    got = _solve_matrix(nystroem, G.shape[0])
    assert float((got - expected).norm() / expected.norm()) < 1e-8
    # the sketch's eigenvalues are those of the Nyström approximation, descending
    Y = G @ omega_rows.T
    top = torch.linalg.eigvalsh(Y @ torch.linalg.solve(omega_rows @ Y, Y.T))[-rank:].flip(0)
    assert torch.allclose(nystroem.sigma, top, rtol=1e-7, atol=1e-10)


def test_nystroem_of_full_rank_is_a_multiple_of_the_exact_inverse(untrained_mlp_curvature):
    """Rank = size: Â = A, so P⁻¹ = (σ_min + λ)(A + λI)⁻¹ whatever the test matrix."""
    G = untrained_mlp_curvature["gauss_newton"]
    p, lam = G.shape[0], 0.05
    H = G + 0.1 * torch.eye(p, dtype=G.dtype)  # positive definite: the sketch has full rank
    nystroem = NystroemPreconditioner(rank=p).fit(Recording(H), p, lam, torch.float64, torch.device("cpu"))
    smallest = torch.linalg.eigvalsh(H)[0]
    expected = (smallest + lam) * torch.linalg.inv(H + lam * torch.eye(p, dtype=G.dtype))
    got = _solve_matrix(nystroem, p)
    assert float((got - expected).norm() / expected.norm()) < 1e-8


# ------------------------------------------------------------------------------ products saved


def _badly_scaled_regression(d: int = 40, n: int = 200, spread: float = 2.0, seed: int = 0):
    """Linear regression, MSE, with correlated features whose scales span 10^±spread: the Hessian
    2 X̃ᵀX̃ / n (closed form) has condition number ≈ 1.6e8, its diagonally scaled version ≈ 30."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-spread, spread, d, dtype=torch.float64)
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, 1, generator=g)) * scales
    y = x @ torch.randn(d, 1, generator=g, dtype=torch.float64) + torch.randn(n, 1, generator=g)
    torch.manual_seed(seed)
    model = nn.Linear(d, 1).double()
    x_tilde = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], dim=1)
    return model, x, y, 2 * x_tilde.T @ x_tilde / n


def test_preconditioners_reduce_the_block_products_on_an_ill_conditioned_matrix():
    """block_cg on the closed-form Hessian of a badly scaled regression, products counted by
    wrapping the operator (each preconditioner's fit costs one more product)."""
    _, _, _, H = _badly_scaled_regression()
    p, lam = H.shape[0], 1e-6
    D = torch.diagonal(H).rsqrt()
    assert torch.linalg.cond(H) > 1e7 and torch.linalg.cond(D[:, None] * H * D) < 100
    B = torch.randn(3, p, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = torch.linalg.solve(H + lam * torch.eye(p, dtype=H.dtype), B.T).T

    def products(preconditioner) -> int:
        operator = Recording(H)
        if preconditioner is not None:
            preconditioner.fit(operator, p, lam, torch.float64, torch.device("cpu"))
        X, _, done, _ = block_cg(operator, B, lam, 1e-10, 0.0, 5000, preconditioner)
        assert bool(done.all())
        assert float((X - expected).norm() / expected.norm()) < 1e-4  # cond 1.6e8 × rtol 1e-10
        return operator.products

    plain = products(None)
    exact_jacobi = products(JacobiPreconditioner(num_samples_estimator=p))
    hutchinson_jacobi = products(JacobiPreconditioner())
    nystroem = products(NystroemPreconditioner(rank=10))
    assert exact_jacobi < plain / 3
    assert hutchinson_jacobi < plain / 2
    assert nystroem < plain


@pytest.mark.parametrize(
    "preconditioner",
    [JacobiPreconditioner(), JacobiPreconditioner(num_samples_estimator=41), NystroemPreconditioner(rank=10)],
    ids=["jacobi", "jacobi-exact", "nystroem"],
)
def test_cg_influence_applies_the_preconditioner(preconditioner):
    """Through CgInfluence: fewer passes over the training data than without, the same answer as
    the closed form."""
    model, x, y, H = _badly_scaled_regression()
    lam = 1e-6

    def solve(pre):
        data = CountingLoader([(x, y)])
        cg = CgInfluence(
            model, nn.functional.mse_loss, lam, rtol=1e-10, atol=0.0, maxiter=2000, preconditioner=pre
        )
        cg.fit(data)
        before = data.passes
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # converges
            factors = cg.influence_factors(x[:2], y[:2])
        return factors, data.passes - before

    x_tilde = torch.cat([x[:2], torch.ones(2, 1, dtype=x.dtype)], dim=1)
    gradients = 2 * (model(x[:2]).detach() - y[:2]) * x_tilde
    expected = torch.linalg.solve(H + lam * torch.eye(H.shape[0], dtype=H.dtype), gradients.T).T
    factors, passes = solve(preconditioner)
    _, plain_passes = solve(None)
    assert float((factors - expected).norm() / expected.norm()) < 1e-4
    assert passes < plain_passes
