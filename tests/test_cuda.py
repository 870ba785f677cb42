"""The CUDA paths: every method, the batched gradient path, both calculators and the command on a GPU,
against ground truth computed on the CPU in float64 by torch.autograd.functional (independent of the
library). Skipped where no CUDA device is present (CI has none); on a GPU machine run
``pytest tests/test_cuda.py``."""

from __future__ import annotations

import copy
import sys

import dask.array as da
import numpy as np
import pytest
import torch
import zarr
from helpers import CE, loader, rel
from torch import nn

from infscale import DaskInfluenceCalculator, DisableClientSingleThreadCheck, SequentialInfluenceCalculator
from infscale.torch import (
    ArnoldiInfluence,
    CgInfluence,
    DirectInfluence,
    EkfacInfluence,
    InverseHarmonicMeanInfluence,
    LissaInfluence,
    NystroemSketchInfluence,
)
from infscale.torch.util import NestedTorchCatAggregator, TorchNumpyConverter

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
LAM = 1e-2


def to_cuda(small_classifier):
    """A copy of the small classifier's model and data on the GPU (float64)."""
    model, x, y, xt, yt = small_classifier
    return copy.deepcopy(model).to(CUDA), x.to(CUDA), y.to(CUDA), xt.to(CUDA), yt.to(CUDA)


METHODS = {  # exact at these settings (full rank, tight tolerances) except LiSSA (1e-3)
    "direct": (lambda m, mode: DirectInfluence(m, CE, LAM, second_order_mode=mode), 1e-8),
    "cg": (lambda m, mode: CgInfluence(m, CE, LAM, rtol=1e-12, atol=0.0, maxiter=500, second_order_mode=mode),
           1e-7),
    "arnoldi": (lambda m, mode: ArnoldiInfluence(m, CE, LAM, rank=31, second_order_mode=mode), 1e-6),
    "nystroem": (lambda m, mode: NystroemSketchInfluence(m, CE, LAM, rank=31, second_order_mode=mode), 1e-6),
    "lissa": (lambda m, mode: LissaInfluence(m, CE, LAM, maxiter=3000, scale=1.0, rtol=1e-9,
                                             second_order_mode=mode), 1e-3),
}  # fmt: skip
FIT_BATCHES = {"lissa": [30]}  # LiSSA converges on full batches (cycled unequal batches add noise)


@pytest.mark.parametrize("mode", ["gauss_newton", "empirical_fisher"])  # PSD: Nyström applies too
@pytest.mark.parametrize("method", list(METHODS))
def test_methods_on_cuda_match_the_explicit_curvature(small_classifier, method, mode):
    make, tolerance = METHODS[method]
    model, x, y, xt, yt = to_cuda(small_classifier)
    fitted = make(model, mode).fit(loader(x, y, FIT_BATCHES.get(method, [13, 10, 7])))
    got = fitted.influences(xt, yt, x, y)
    assert got.device.type == "cuda" and got.dtype == torch.float64
    exact = small_classifier.exact_influences(mode, LAM)
    assert rel(got.cpu(), exact) < tolerance
    for how in ("up", "perturbation"):  # factors → influences stays on the GPU in both modes
        factors = fitted.influence_factors(xt, yt)
        assert factors.device.type == "cuda"
        from_factors = fitted.influences_from_factors(factors, x[:5], y[:5], mode=how)
        assert from_factors.device.type == "cuda"
    assert rel(fitted.influences_from_factors(factors.cpu(), x, y).cpu(), exact) < tolerance  # CPU factors


def test_hessian_mode_on_cuda(small_classifier):
    model, x, y, xt, yt = to_cuda(small_classifier)
    direct = DirectInfluence(model, CE, LAM).fit(loader(x, y, [16, 14]))
    assert (
        rel(direct.influences(xt, yt, x, y).cpu(), small_classifier.exact_influences("hessian", LAM)) < 1e-8
    )
    G = small_classifier.train_gradients
    H = small_classifier.curvature("hessian") + LAM * torch.eye(31, dtype=torch.float64)
    exact_self = torch.einsum("ip,ip->i", G, torch.linalg.solve(H, G.T).T)
    assert rel(direct.self_influences(x, y).cpu(), exact_self) < 1e-8


def test_inverse_harmonic_mean_on_cuda(small_classifier):
    model, x, y, xt, yt = to_cuda(small_classifier)
    ihm = InverseHarmonicMeanInfluence(model, CE, LAM).fit(loader(x, y, [13, 10, 7]))
    G, Gt = small_classifier.train_gradients, small_classifier.test_gradients
    P = sum(torch.linalg.inv(torch.outer(g, g) + LAM * torch.eye(31, dtype=torch.float64)) for g in G) / len(
        G
    )
    got = ihm.influences(xt, yt, x, y)
    assert got.device.type == "cuda"
    assert rel(got.cpu(), Gt @ P @ G.T) < 1e-9


def test_ekfac_on_cuda_equals_ekfac_on_cpu(small_classifier):
    """EK-FAC is an approximation: the GPU must compute the same approximation as the CPU."""
    model, x, y, xt, yt = small_classifier
    cpu = EkfacInfluence(copy.deepcopy(model), hessian_regularization=LAM, fisher="exact")
    cpu = cpu.fit(loader(x, y, [13, 10, 7])).influences(xt, yt, x, y)
    gpu_model, gx, gy, gxt, gyt = to_cuda(small_classifier)
    gpu = EkfacInfluence(gpu_model, hessian_regularization=LAM, fisher="exact")
    gpu = gpu.fit(loader(gx, gy, [13, 10, 7])).influences(gxt, gyt, gx, gy)
    assert gpu.device.type == "cuda"
    assert rel(gpu.cpu(), cpu) < 1e-9


def wider_problem(dtype):
    """A 16-64-64-5 tanh MLP (5.6k parameters) and 300 points: enough for the batched Linear path."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (300,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 5))
    return model.double(), x, y


def test_batched_gradients_on_cuda_float32_against_float64_jacobian():
    """The per-sample gradients (and their products with factors) that the batched Linear path takes
    on the GPU, in float32, against one float64 jacobian per sample on the CPU."""
    from conftest import explicit_loss_gradients

    model64, x, y = wider_problem(torch.float64)
    exact = explicit_loss_gradients(model64, CE, x[:40], y[:40])  # (40, p)
    model32 = copy.deepcopy(model64).float().to(CUDA)
    direct_like = CgInfluence(model32, CE, 1.0, maxiter=5)  # any fitted model exposes the gradients
    direct_like.fit(loader(x.float().to(CUDA), y.to(CUDA), [150, 150]))
    rep = direct_like.train_representation(x[:40].float().to(CUDA), y[:40].to(CUDA))
    factors = torch.randn(7, exact.shape[1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = direct_like.influences_from_representation(factors.float().to(CUDA), rep)
    assert got.dtype == torch.float32 and got.device.type == "cuda"
    assert rel(got.double().cpu(), factors @ exact.T) < 1e-5


def test_sequential_calculator_to_zarr_on_cuda(small_classifier, tmp_path):
    model, x, y, xt, yt = to_cuda(small_classifier)
    fitted = DirectInfluence(model, CE, LAM, second_order_mode="gauss_newton").fit(loader(x, y, [30]))
    calc = SequentialInfluenceCalculator(fitted)
    cpu_x, cpu_y = small_classifier.x, small_classifier.y  # CPU loaders: the model moves each batch
    lazy = calc.influences(loader(small_classifier.x_test, small_classifier.y_test, [4, 4, 2]),
                           loader(cpu_x, cpu_y, [8, 8, 8, 6]))  # fmt: skip
    stored = lazy.to_zarr(str(tmp_path / "i.zarr"), TorchNumpyConverter(), return_stored=True, progress=False)
    exact = small_classifier.exact_influences("gauss_newton", LAM).numpy()
    np.testing.assert_allclose(stored[:], exact, rtol=1e-8, atol=1e-12)
    in_memory = lazy.compute(aggregator=NestedTorchCatAggregator())
    assert in_memory.device.type == "cuda"


@pytest.mark.parametrize("cluster", ["synchronous", "processes"])
def test_dask_calculator_on_cuda(small_classifier, cluster):
    model, x, y, xt, yt = to_cuda(small_classifier)
    fitted = DirectInfluence(model, CE, LAM, second_order_mode="gauss_newton").fit(loader(x, y, [30]))
    arrays = [da.from_array(t.numpy(), chunks=(7,) + t.shape[1:]) for t in small_classifier[1:]]
    dx, dy, dxt, dyt = arrays
    exact = small_classifier.exact_influences("gauss_newton", LAM).numpy()
    converter = TorchNumpyConverter(device=CUDA)
    if cluster == "synchronous":
        with pytest.warns(UserWarning, match="check"):
            calc = DaskInfluenceCalculator(fitted, converter, DisableClientSingleThreadCheck)
        got = calc.influences(dxt, dyt, dx, dy).compute(scheduler="synchronous")
    else:  # two worker processes, each with its own CUDA context on the same GPU
        from distributed import Client, LocalCluster

        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as lc, Client(lc) as client:
            calc = DaskInfluenceCalculator(fitted, converter, client)
            got = calc.influences(dxt, dyt, dx, dy).compute()
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, exact, rtol=1e-8, atol=1e-12)


def test_command_runs_on_cuda(tmp_path, monkeypatch):
    """``infscale run --device cuda`` on the closed-form linear regression of the command's tests."""
    import test_cli

    (tmp_path / "cli_fixture.py").write_text(test_cli.FIXTURE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("cli_fixture", None)
    import cli_fixture

    out = tmp_path / "r.zarr"
    assert test_cli.main(test_cli._run_args(out, "--device", "cuda")) == 0
    model, _ = cli_fixture.model()
    x, y = (t.numpy() for t in cli_fixture.tensors())
    w, b = model.weight.detach().numpy().ravel(), float(model.bias.detach())
    feats = np.hstack([x, np.ones((len(x), 1))])
    grads = 2 * ((x @ w + b) - y[:, 0])[:, None] * feats
    tr, te = slice(0, test_cli.N_TRAIN), slice(test_cli.N_TRAIN, None)
    H = 2 * feats[tr].T @ feats[tr] / test_cli.N_TRAIN
    exact = grads[te] @ np.linalg.solve(H + test_cli.LAMBDA * np.eye(4), grads[tr].T)
    np.testing.assert_allclose(zarr.open_group(str(out), mode="r")["influences"][:], exact, rtol=1e-8)
