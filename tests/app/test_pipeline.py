"""infscale.app.pipeline: `infscale run --method ekfac` against EkfacInfluence from Python, the
sequential and Dask paths of compute_into_group against the closed form of linear regression and
against each other (each resuming the other's store), and the checks before any work."""

from __future__ import annotations

import app_factories as fx
import numpy as np
import pytest
import torch
import zarr
from torch.nn import functional as F
from torch.utils.data import DataLoader

from infscale.app.pipeline import ComputeSettings, RunConfig, compute_into_group, fit, run_pipeline
from infscale.app.results import INFLUENCES, SELF_INFLUENCES, prepare_group
from infscale.cli import main
from infscale.errors import UnsupportedInfluenceModeError, UsageError
from infscale.torch import DirectInfluence, EkfacInfluence

LAMBDA, BATCH = 0.01, 8


def _ekfac_run(out, *params: str) -> np.ndarray:
    argv = [
        "run", "--model", "app_factories:mse_model", "--data", "app_factories:data", "--method", "ekfac",
        "--param", f"hessian_regularization={LAMBDA}", *params, "--batch-size", str(BATCH),
        "--out", str(out), "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    return zarr.open_group(str(out), mode="r")


def _ekfac_python(**kwargs) -> np.ndarray:
    model, _ = fx.mse_model()
    train, test = fx.data()
    infl = EkfacInfluence(model, loss=F.mse_loss, hessian_regularization=LAMBDA, **kwargs)
    infl.fit(DataLoader(train, batch_size=BATCH, shuffle=False))
    return infl.influences(*test.tensors, *train.tensors).numpy()


def test_run_ekfac_with_mse_loss_equals_the_python_api(tmp_path):
    group = _ekfac_run(tmp_path / "ekfac.zarr")
    expected = _ekfac_python()
    np.testing.assert_allclose(group[INFLUENCES][:], expected, rtol=1e-10, atol=1e-12)
    hyper = group[INFLUENCES].attrs["hyperparameters"]
    assert hyper["loss_type"] == "mse" and hyper["update_diagonal"] is True

    group = _ekfac_run(tmp_path / "kfac.zarr", "--param", "update_diagonal=false")
    expected_kfac = _ekfac_python(update_diagonal=False)
    np.testing.assert_allclose(group[INFLUENCES][:], expected_kfac, rtol=1e-10, atol=1e-12)
    assert group[INFLUENCES].attrs["hyperparameters"]["update_diagonal"] is False
    assert group.attrs["params"] == {"hessian_regularization": LAMBDA, "update_diagonal": False}
    assert not np.allclose(expected, expected_kfac, rtol=1e-3)  # the flag changes the numbers


def _mse(outputs, targets):
    return ((outputs - targets) ** 2).mean()


def _closed_form() -> tuple[np.ndarray, np.ndarray]:
    """Test × train influences and training self-influences of the linear regression:
    g_i = 2 (w·x_i + b − y_i) [x_i, 1], H = (2/n) Σ [x_i, 1][x_i, 1]ᵀ, influence = g_tᵀ (H + λI)⁻¹ g_i."""
    x, y = (t.numpy() for t in fx.tensors())
    model = fx.regression()
    w, b = model.weight.detach().numpy().ravel(), float(model.bias.detach())
    feats = np.hstack([x, np.ones((len(x), 1))])
    grads = 2 * ((x @ w + b) - y[:, 0])[:, None] * feats
    tr, te = slice(0, fx.N_TRAIN), slice(fx.N_TRAIN, None)
    solved = np.linalg.solve(2 * feats[tr].T @ feats[tr] / fx.N_TRAIN + LAMBDA * np.eye(4), grads[tr].T)
    return grads[te] @ solved, np.einsum("ip,pi->i", grads[tr], solved)


def _fitted_direct():
    train, test = fx.data()
    infl = DirectInfluence(fx.regression(), _mse, hessian_regularization=LAMBDA)
    assert fit(infl, train, BATCH) is infl and infl.is_fitted
    return infl, train, test


def test_compute_into_group_sequential_and_on_dask_resume_each_other(tmp_path):
    from distributed import Client

    influences, self_influences = _closed_form()
    infl, train, test = _fitted_direct()
    settings = ComputeSettings(
        batch_size=BATCH, test_batch_size=6, self_influences=True, top_k=2, progress=False
    )
    logs: list[str] = []
    seq = str(tmp_path / "seq.zarr")
    prepare_group(seq, overwrite=False, resume=False, attributes={"run": 1})
    compute_into_group(infl, train, test, seq, settings, log=logs.append)
    group = zarr.open_group(seq, mode="r")
    np.testing.assert_allclose(group[INFLUENCES][:], influences, rtol=1e-9)
    np.testing.assert_allclose(group[SELF_INFLUENCES][:], self_influences, rtol=1e-9)
    assert group[INFLUENCES].chunks == (6, BATCH) and group["top_helpful_indices"].shape == (fx.N_TEST, 2)
    assert any(line.startswith("computing influences → ") for line in logs)

    with Client(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as client:
        on_dask = str(tmp_path / "dask.zarr")
        prepare_group(on_dask, overwrite=False, resume=False, attributes={"run": 1})
        compute_into_group(infl, train, test, on_dask, settings, client=client, log=logs.append)
        dgroup = zarr.open_group(on_dask, mode="r")
        for name in (INFLUENCES, SELF_INFLUENCES, "top_helpful_indices"):
            np.testing.assert_allclose(dgroup[name][:], group[name][:], rtol=1e-12)
        assert dict(dgroup[INFLUENCES].attrs) == dict(group[INFLUENCES].attrs)  # the same attributes
        assert dict(dgroup[SELF_INFLUENCES].attrs) == dict(group[SELF_INFLUENCES].attrs)
        assert any("on Dask (scheduler " in line for line in logs)

        # Dask finishes a store the sequential path left incomplete ...
        _forget(tmp_path / "seq.zarr", ["0.1", "3.4"], ["2"])
        compute_into_group(infl, train, test, seq, _resume(settings), client=client, log=logs.append)
        np.testing.assert_allclose(zarr.open_group(seq, mode="r")[INFLUENCES][:], influences, rtol=1e-9)
        np.testing.assert_allclose(
            zarr.open_group(seq, mode="r")[SELF_INFLUENCES][:], self_influences, rtol=1e-9
        )
    # ... and the sequential path one that Dask left incomplete
    _forget(tmp_path / "dask.zarr", ["1.0", "2.3"], ["0", "4"])
    compute_into_group(infl, train, test, on_dask, _resume(settings), log=logs.append)
    np.testing.assert_allclose(zarr.open_group(on_dask, mode="r")[INFLUENCES][:], influences, rtol=1e-9)
    np.testing.assert_allclose(
        zarr.open_group(on_dask, mode="r")[SELF_INFLUENCES][:], self_influences, rtol=1e-9
    )


def _resume(settings: ComputeSettings) -> ComputeSettings:
    return ComputeSettings(**{**vars(settings), "resume": True})


def _forget(path, blocks: list[str], rows: list[str]) -> None:
    """Remove the markers of these influence blocks and self-influence chunks and wipe their data."""
    for name, keys in ((INFLUENCES, blocks), (SELF_INFLUENCES, rows)):
        array = zarr.open_array(str(path / name), mode="r+")
        for key in keys:
            (path / name / "_infscale_complete" / key).unlink()
            region = tuple(slice(int(k) * c, (int(k) + 1) * c) for k, c in zip(key.split("."), array.chunks))
            array[region] = 0.0


@pytest.mark.parametrize(
    "changes, error, message",
    [
        ({"model": None}, UsageError, "--model is required"),
        ({"data": ""}, UsageError, "--data is required"),
        ({"out": None}, UsageError, "--out is required"),
        ({"mode": "sideways"}, UnsupportedInfluenceModeError, "unsupported influence mode 'sideways'"),
        ({"top_k": 0}, UsageError, "--top-k: expected an integer ≥ 1; got 0"),
        ({"top_k": 3, "mode": "perturbation"}, UsageError, "--top-k needs --mode up"),
        ({"batch_size": 0}, UsageError, "--batch-size: expected an integer ≥ 1; got 0"),
        ({"scheduler": "threads"}, UsageError, "--scheduler: expected sync, local:N"),
        ({"device": "gpu:7"}, UsageError, "--device: "),
    ],
)
def test_run_pipeline_checks_before_any_work(tmp_path, changes, error, message):
    out = tmp_path / "never.zarr"
    config = RunConfig(
        model="app_factories:mse_model", data="app_factories:data", out=str(out), method="direct"
    )
    for key, value in changes.items():
        setattr(config, key, value)
    with pytest.raises(error) as info:
        run_pipeline(config, log=lambda line: None)
    assert message in str(info.value)
    assert not out.exists()


def test_run_config_defaults():
    config = RunConfig()
    assert (config.method, config.mode, config.batch_size, config.scheduler, config.progress) == (
        "cg", "up", 64, "sync", True,
    )  # fmt: skip
    assert RunConfig().params is not RunConfig().params  # no shared mutable default
    assert torch.get_default_dtype() == torch.float32  # the factories did not change it
