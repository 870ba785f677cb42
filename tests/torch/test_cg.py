"""CgInfluence (block CG) against closed forms and DirectInfluence; preconditioners; warnings; the
NotPositiveDefiniteError (with a sufficient λ) on negative curvature."""

import copy
import re
import warnings

import pytest
import references
import torch
from real_models import batchnorm_cnn

from infscale.torch import (
    CgInfluence,
    DirectInfluence,
    JacobiPreconditioner,
    NotPositiveDefiniteError,
    NystroemPreconditioner,
    SecondOrderMode,
)
from infscale.torch.cg import block_cg

LAM = 1e-3


@pytest.mark.parametrize("symmetric", [False, True])
def test_linear_regression_closed_form(linreg, ground_truth, symmetric):
    p = linreg
    closed = ground_truth.linreg(p, LAM)
    model = CgInfluence(p.model, p.loss, LAM, rtol=1e-12, atol=0.0).fit(p.loader(5))
    x, y = (p.x_test, p.y_test) if symmetric else (p.x, p.y)
    kwargs = {} if symmetric else {"x": x, "y": y}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # converges: no warning
        up = model.influences(p.x_test, p.y_test, **kwargs)
        pert = model.influences(p.x_test, p.y_test, mode="perturbation", **kwargs)
    assert ground_truth.relerr(up, closed.factors @ closed.gradients(x, y).T) < 1e-6
    assert ground_truth.relerr(pert, closed.perturbation(closed.factors, x, y)) < 1e-6
    own = torch.linalg.solve(closed.solve, closed.gradients(x, y).T).T
    assert ground_truth.relerr(model.self_influences(x, y), (own * closed.gradients(x, y)).sum(1)) < 1e-6


def _small_lambda(H):
    evals = torch.linalg.eigvalsh(H)
    lam = 1e-3 * evals[-1].item() + max(0.0, -evals[0].item())
    assert lam < 0.01 * evals[-1].item()
    return lam


def test_mlp_cg_against_direct(mlp, ground_truth):
    p = mlp
    lam = _small_lambda(ground_truth.hessian(p.model, p.loss, p.x, p.y))
    direct = DirectInfluence(p.model, p.loss, lam).fit(p.loader(13))
    cg = CgInfluence(p.model, p.loss, lam, rtol=1e-10, atol=0.0).fit(p.loader(13))
    expected = direct.influences(p.x_test, p.y_test, p.x, p.y)
    assert ground_truth.relerr(cg.influences(p.x_test, p.y_test, p.x, p.y), expected) < 1e-5
    g_test = ground_truth.gradients(p.model, p.loss, p.x_test, p.y_test)
    g_train = ground_truth.gradients(p.model, p.loss, p.x, p.y)
    assert ground_truth.relerr(expected, g_test @ g_train.T / lam) > 0.5  # curvature matters
    # more right-hand sides than a CG pass would need: the training set against itself
    assert ground_truth.relerr(cg.self_influences(p.x, p.y), direct.self_influences(p.x, p.y)) < 1e-5


@pytest.mark.parametrize(
    "preconditioner", [JacobiPreconditioner(), JacobiPreconditioner(3), NystroemPreconditioner(rank=8)]
)
def test_preconditioners_converge_to_the_same_answer(mlp, ground_truth, preconditioner):
    p = mlp
    lam = 0.01
    direct = DirectInfluence(p.model, p.loss, lam, second_order_mode="gauss_newton").fit(p.loader())
    cg = CgInfluence(
        p.model,
        p.loss,
        lam,
        rtol=1e-10,
        atol=0.0,
        preconditioner=preconditioner,
        second_order_mode="gauss_newton",
    ).fit(p.loader(11))
    got = cg.influences(p.x_test, p.y_test, p.x, p.y)
    assert ground_truth.relerr(got, direct.influences(p.x_test, p.y_test, p.x, p.y)) < 1e-6


def test_gauss_newton_against_explicit(untrained_mlp, untrained_mlp_curvature, ground_truth):
    p = untrained_mlp
    G = untrained_mlp_curvature["gauss_newton"]
    cg = CgInfluence(
        p.model, p.loss, 1e-2, rtol=1e-10, atol=0.0, second_order_mode=SecondOrderMode.GAUSS_NEWTON
    )
    cg.fit(p.loader(8))
    g_test = ground_truth.gradients(p.model, p.loss, p.x_test, p.y_test)
    g_train = ground_truth.gradients(p.model, p.loss, p.x, p.y)
    expected = torch.linalg.solve(G + 1e-2 * torch.eye(G.shape[0], dtype=G.dtype), g_test.T).T @ g_train.T
    assert ground_truth.relerr(cg.influences(p.x_test, p.y_test, p.x, p.y), expected) < 1e-6


def test_non_convergence_warning(mlp):
    p = mlp
    cg = CgInfluence(p.model, p.loss, 1e-4, rtol=1e-12, atol=0.0, maxiter=1).fit(p.loader())
    with pytest.warns(RuntimeWarning) as record:
        cg.influences(p.x_test[:3], p.y_test[:3])
    message = str(record[0].message)
    assert re.search(r"3 of 3 right-hand sides of block 'model' missed the tolerance", message)
    assert "after 1 iterations" in message
    worst = float(re.search(r"worst relative residual (\S+)\.", message).group(1))
    assert 1e-12 < worst < 1
    for advice in ("maxiter", "hessian_regularization", "rtol", "NystroemPreconditioner"):
        assert advice in message


def test_with_regularization_equals_refit(mlp, ground_truth):
    p = mlp
    cg = CgInfluence(p.model, p.loss, 0.05, rtol=1e-10, atol=0.0, preconditioner=NystroemPreconditioner(5))
    cg.fit(p.loader())
    swept = cg.with_regularization(0.2)
    refit = CgInfluence(p.model, p.loss, 0.2, rtol=1e-10, atol=0.0).fit(p.loader())
    got, expected = swept.influences(p.x_test, p.y_test), refit.influences(p.x_test, p.y_test)
    assert ground_truth.relerr(got, expected) < 1e-8
    assert cg.regularization["model"] == 0.05


def test_block_cg_on_an_explicit_matrix():
    """Many right-hand sides, some zero, some equal (linearly dependent), float64."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(torch.logspace(-3, 1, 30, dtype=torch.float64)) @ Q.T
    B = torch.randn(12, 30, generator=g, dtype=torch.float64)
    B[3] = 0.0
    B[5] = 2 * B[4]
    X, residual, done, iterations = block_cg(lambda V: V @ A, B, 0.01, 1e-11, 0.0, 100)
    expected = torch.linalg.solve(A + 0.01 * torch.eye(30, dtype=torch.float64), B.T).T
    assert bool(done.all()) and iterations <= 30
    assert float((X - expected).norm() / expected.norm()) < 1e-10
    assert torch.equal(X[3], torch.zeros(30, dtype=torch.float64))
    assert float(residual.max()) <= 1e-11


def test_bad_arguments(mlp):
    p = mlp
    with pytest.raises(ValueError, match="rtol must be > 0"):
        CgInfluence(p.model, p.loss, rtol=0.0)
    with pytest.raises(ValueError, match="maxiter must be ≥ 1"):
        CgInfluence(p.model, p.loss, maxiter=0)
    with pytest.raises(TypeError, match="preconditioner must be"):
        CgInfluence(p.model, p.loss, preconditioner="jacobi")


def test_preconditioner_settings_are_recorded_and_a_resume_with_another_rank_is_refused(linreg, tmp_path):
    """hyperparameters() records the preconditioner with its own settings, so a store written with
    NystroemPreconditioner(rank=2) refuses to be resumed by a model with rank=3 (it would mix blocks of
    two different computations), while the same settings resume."""
    from infscale import SequentialInfluenceCalculator
    from infscale.errors import StoreMismatchError
    from infscale.torch.util import TorchNumpyConverter

    p = linreg

    def model(preconditioner):
        return CgInfluence(p.model, p.loss, LAM, preconditioner=preconditioner).fit(p.loader(5))

    rank2, rank3 = model(NystroemPreconditioner(rank=2)), model(NystroemPreconditioner(rank=3))
    assert rank2.hyperparameters()["preconditioner"] == {
        "class": "NystroemPreconditioner",
        "rank": 2,
        "seed": 0,
    }
    assert rank2.hyperparameters() != rank3.hyperparameters()
    assert model(None).hyperparameters()["preconditioner"] is None
    jacobi = model(JacobiPreconditioner(num_samples_estimator=4)).hyperparameters()["preconditioner"]
    assert jacobi == {"class": "JacobiPreconditioner", "num_samples_estimator": 4, "seed": 0}

    test = [(p.x_test, p.y_test)]
    path = str(tmp_path / "influences.zarr")
    conv = TorchNumpyConverter()

    def write(infl, **kwargs):
        lazy = SequentialInfluenceCalculator(infl).influences(test, p.loader(5))
        return lazy.to_zarr(path, conv, progress=False, return_stored=True, **kwargs)

    stored = write(rank2)
    with pytest.raises(StoreMismatchError, match="rank"):
        write(rank3, resume=True)
    again = write(model(NystroemPreconditioner(rank=2)), resume=True)
    assert (again[...] == stored[...]).all()


# ------------------------------------------------------------------------------ indefinite H + λI


def _reported(message: str) -> tuple[float, float]:
    """(the smallest eigenvalue the message reports, the hessian_regularization it suggests)."""
    smallest = float(
        re.search(r"smallest eigenvalue is about (\S+) \(estimated by \d+ Lanczos", message).group(1)
    )
    suggested = float(re.search(r"hessian_regularization ≥ (\S+),", message).group(1))
    return smallest, suggested


@pytest.mark.parametrize("lam", [0.0, 1e-3, 0.5])
def test_indefinite_hessian_raises_with_a_sufficient_lambda(
    untrained_mlp, untrained_mlp_curvature, ground_truth, lam
):
    """A random tanh MLP: its Hessian (explicit, float64, torch.autograd.functional.hessian) has
    eigenvalues down to about -0.65. Below that λ, CG meets negative curvature and raises with a
    Lanczos estimate; the suggested λ exceeds -λ_min, and with it CG converges to the explicit solve."""
    p = untrained_mlp
    H = untrained_mlp_curvature["hessian"]
    smallest = torch.linalg.eigvalsh(H)[0].item()
    assert smallest + lam < 0  # H + λI is indefinite
    cg = CgInfluence(p.model, p.loss, lam, rtol=1e-10, atol=0.0).fit(p.loader(13))
    with pytest.raises(NotPositiveDefiniteError) as info:
        cg.influences(p.x_test, p.y_test, p.x, p.y)
    message = str(info.value)
    assert "CgInfluence" in message and "block 'model'" in message and "GAUSS_NEWTON" in message
    estimate, suggested = _reported(message)
    assert estimate == pytest.approx(smallest, rel=0.02)
    assert -smallest < suggested < 1.2 * -smallest  # sufficient, and not far above what is needed

    fixed = CgInfluence(p.model, p.loss, suggested, rtol=1e-10, atol=0.0).fit(p.loader(13))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # converges: no warning
        got = fixed.influences(p.x_test, p.y_test, p.x, p.y)
    g_test = ground_truth.gradients(p.model, p.loss, p.x_test, p.y_test)
    g_train = ground_truth.gradients(p.model, p.loss, p.x, p.y)
    A = H + suggested * torch.eye(H.shape[0], dtype=H.dtype)
    assert ground_truth.relerr(got, g_test @ torch.linalg.solve(A, g_train.T)) < 1e-6


def test_gauss_newton_of_the_same_model_does_not_raise(untrained_mlp):
    p = untrained_mlp
    cg = CgInfluence(p.model, p.loss, 1e-3, rtol=1e-10, atol=0.0, second_order_mode="gauss_newton")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        cg.fit(p.loader()).influences(p.x_test, p.y_test, p.x, p.y)


def test_rounding_on_a_singular_gauss_newton_matrix_is_not_negative_curvature(untrained_mlp, ground_truth):
    """float32, 10 samples: the Gauss-Newton matrix has rank ≤ 20 of 51 (explicit float64 matrix), so
    at λ = 0 the search directions reach its null space, where the projected curvature is rounding
    noise of either sign (about -2e-9 against a largest eigenvalue of 1.4). That is no evidence of
    negative curvature: CG does not raise, it warns that it missed the tolerance."""
    p = untrained_mlp
    x, y = p.x[:10], p.y[:10]
    G = ground_truth.gauss_newton(p.model, p.loss, x, y)
    assert int((torch.linalg.eigvalsh(G) > 1e-12).sum()) <= 20
    model32 = copy.deepcopy(p.model).float()
    cg = CgInfluence(model32, p.loss, 0.0, rtol=1e-6, atol=0.0, maxiter=300, second_order_mode="gauss_newton")
    with pytest.warns(RuntimeWarning, match="missed the tolerance"):
        cg.fit([(x.float(), y)]).influence_factors(p.x_test.float(), p.y_test)


def test_indefinite_hessian_of_a_small_cnn_raises_with_a_sufficient_lambda():
    """The same on a Conv2d/BatchNorm CNN (447 parameters): explicit float64 Hessian by
    torch.autograd.functional.hessian (tests/torch/references.py)."""
    model, loss, train, test = batchnorm_cnn()
    H = references.hessian(model, loss, train)
    smallest = torch.linalg.eigvalsh(H)[0].item()
    lam = 1e-3
    assert smallest + lam < 0
    x_test, y_test = test[0][0], test[0][1]
    with pytest.raises(NotPositiveDefiniteError) as info:
        CgInfluence(model, loss, lam, rtol=1e-10, atol=0.0).fit(train).influence_factors(x_test, y_test)
    _, suggested = _reported(str(info.value))
    assert suggested > -smallest
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = (
            CgInfluence(model, loss, suggested, rtol=1e-10, atol=0.0)
            .fit(train)
            .influence_factors(x_test, y_test)
        )
    G = references.per_sample_gradients(model, loss, [(x_test, y_test)])
    expected = torch.linalg.solve(H + suggested * torch.eye(H.shape[0], dtype=H.dtype), G.T).T
    assert float((got - expected).norm() / expected.norm()) < 1e-6


def test_block_cg_raises_on_an_explicit_indefinite_matrix():
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    evals = torch.linspace(-0.3, 2.0, 40, dtype=torch.float64)
    A = Q @ torch.diag(evals) @ Q.T
    B = torch.randn(3, 40, generator=g, dtype=torch.float64)
    with pytest.raises(NotPositiveDefiniteError, match="the matrix plus hessian_regularization=0.01") as info:
        block_cg(lambda V: V @ A, B, 0.01, 1e-10, 0.0, 200)
    estimate, suggested = _reported(str(info.value))
    assert estimate == pytest.approx(-0.3, rel=0.02) and suggested > 0.3
    X, _, done, _ = block_cg(lambda V: V @ A, B, suggested, 1e-10, 0.0, 200)
    expected = torch.linalg.solve(A + suggested * torch.eye(40, dtype=A.dtype), B.T).T
    assert bool(done.all()) and float((X - expected).norm() / expected.norm()) < 1e-8
