"""The ``infscale`` command: run (sync, local:2, TOML), top, info, resume after a kill, errors.

The model is a linear regression with mean squared error, in float64, so the
influences have a closed form: with per-sample gradient g_i = 2 (w·x_i + b − y_i) [x_i, 1]
and H = (2/n) Σ [x_i, 1][x_i, 1]ᵀ, influence(test t, train i) = g_tᵀ (H + λI)⁻¹ g_i.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import zarr

from infscale import errors
from infscale.cli import main, parse_param, report_error

LAMBDA = 1e-3
N_TRAIN, N_TEST, BATCH = 40, 20, 8

FIXTURE = textwrap.dedent(
    """
    import os
    import time

    import torch
    from torch import nn
    from torch.utils.data import Dataset, TensorDataset

    N_TRAIN, N_TEST = 40, 20


    def tensors():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(N_TRAIN + N_TEST, 3, generator=g, dtype=torch.float64)
        w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
        y = (x @ w + 0.3 * torch.randn(N_TRAIN + N_TEST, generator=g, dtype=torch.float64)).unsqueeze(1)
        return x, y


    def mse(outputs, targets):
        # (nn.functional.mse_loss trips torch.func's jvp-of-grad with a ZeroTensor error)
        return ((outputs - targets) ** 2).mean()


    def model():
        torch.manual_seed(0)
        m = nn.Linear(3, 1).double()
        with torch.no_grad():
            m.weight.copy_(torch.tensor([[0.8, -1.5, 0.2]], dtype=torch.float64))
            m.bias.fill_(0.1)
        return m, mse


    def data():
        x, y = tensors()
        return TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), TensorDataset(x[N_TRAIN:], y[N_TRAIN:])


    class SlowDataset(Dataset):
        def __init__(self, x, y, delay):
            self.x, self.y, self.delay = x, y, delay

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            time.sleep(self.delay)
            return self.x[i], self.y[i]


    def slow_data():
        x, y = tensors()
        delay = float(os.environ.get("FIXTURE_DELAY", "0"))
        return (
            TensorDataset(x[:N_TRAIN], y[:N_TRAIN]),
            SlowDataset(x[N_TRAIN:], y[N_TRAIN:], delay),
        )


    def not_a_tuple():
        return "model"


    def wrong_model():
        return 42, mse


    def wrong_data():
        return [1, 2, 3], [4]


    def broken():
        raise RuntimeError("the factory is broken")


    def mismatched_data():
        x, y = tensors()
        return TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), TensorDataset(x[N_TRAIN:, :2], y[N_TRAIN:])


    def concave_model():
        m, _ = model()
        return m, lambda outputs, targets: -mse(outputs, targets)  # negative definite Hessian


    def mse_model():
        m, _ = model()
        return m, nn.functional.mse_loss  # EK-FAC recognizes this loss


    def dead_feature_data():
        # feature 2 is always 0: the curvature has an exact zero eigenvalue (rank-deficient)
        x, y = tensors()
        x[:, 2] = 0.0
        return TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), TensorDataset(x[N_TRAIN:], y[N_TRAIN:])
    """
)


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("factories")
    (path / "cli_fixture.py").write_text(FIXTURE)
    sys.path.insert(0, str(path))
    yield path
    sys.path.remove(str(path))


@pytest.fixture(scope="module")
def truth(fixture_dir):
    """The closed-form influence matrix (n_test, n_train), float64."""
    import cli_fixture

    model, _ = cli_fixture.model()
    x, y = (t.numpy() for t in cli_fixture.tensors())
    w = model.weight.detach().numpy().ravel()
    b = float(model.bias.detach())
    feats = np.hstack([x, np.ones((len(x), 1))])
    grads = 2 * ((x @ w + b) - y[:, 0])[:, None] * feats
    tr, te = slice(0, N_TRAIN), slice(N_TRAIN, None)
    H = 2 * feats[tr].T @ feats[tr] / N_TRAIN
    return grads[te] @ np.linalg.solve(H + LAMBDA * np.eye(4), grads[tr].T)


def _run_args(out, *extra, model="cli_fixture:model", data="cli_fixture:data"):
    return [
        "run", "--model", model, "--data", data, "--method", "direct",
        "--param", f"hessian_regularization={LAMBDA}", "--batch-size", str(BATCH), "--out", str(out),
        "--no-progress", *extra,
    ]  # fmt: skip


def _error(capsys, argv) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err  # one clear line, no traceback
    assert "Traceback" not in captured.err
    return lines[0]


def test_run_sync_then_info_and_top(fixture_dir, truth, tmp_path, capsys):
    out = tmp_path / "result.zarr"
    assert main(_run_args(out, "--top-k", "3", "--self-influences")) == 0
    group = zarr.open_group(str(out), mode="r")
    np.testing.assert_allclose(group["influences"][:], truth, rtol=1e-8, atol=1e-10)
    assert group["influences"].chunks == (BATCH, BATCH)
    # self-influences: the diagonal of the train × train closed form
    import cli_fixture

    assert group["self_influences"].shape == (N_TRAIN,)
    assert group.attrs["method"] == "DirectInfluence"
    assert group.attrs["params"] == {"hessian_regularization": LAMBDA}
    # stored top-k against the ground truth ranking
    order = np.argsort(-truth, axis=1)
    np.testing.assert_array_equal(group["top_helpful_indices"][:], order[:, :3])
    np.testing.assert_array_equal(group["top_harmful_indices"][:], order[:, ::-1][:, :3])
    np.testing.assert_allclose(group["top_helpful_values"][:], np.take_along_axis(truth, order[:, :3], 1))
    del cli_fixture
    capsys.readouterr()

    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"influences: shape ({N_TEST}, {N_TRAIN}), chunks ({BATCH}, {BATCH})" in text
    assert "15 of 15 blocks done (100%), complete" in text
    assert "sign_convention" in text and "DirectInfluence" in text and "infscale_version" in text

    assert main(["top", str(out), "--test", "5", "-k", "4"]) == 0
    text = capsys.readouterr().out
    helpful = text.split("most helpful:")[1].split("most harmful:")[0]
    harmful = text.split("most harmful:")[1]
    got_helpful = [int(line.split()[1]) for line in helpful.strip().splitlines()[1:]]
    got_harmful = [int(line.split()[1]) for line in harmful.strip().splitlines()[1:]]
    assert got_helpful == list(order[5, :4])
    assert got_harmful == list(order[5, ::-1][:4])
    assert "positive = up-weighting" in text


def test_self_influences_match_closed_form(fixture_dir, tmp_path):
    import cli_fixture

    out = tmp_path / "s.zarr"
    assert main(_run_args(out, "--self-influences")) == 0
    model, _ = cli_fixture.model()
    x, y = (t.numpy()[:N_TRAIN] for t in cli_fixture.tensors())
    feats = np.hstack([x, np.ones((N_TRAIN, 1))])
    w, b = model.weight.detach().numpy().ravel(), float(model.bias.detach())
    grads = 2 * ((x @ w + b) - y[:, 0])[:, None] * feats
    H = 2 * feats.T @ feats / N_TRAIN
    expected = np.einsum("ip,ip->i", grads, np.linalg.solve(H + LAMBDA * np.eye(4), grads.T).T)
    np.testing.assert_allclose(zarr.open_group(str(out), mode="r")["self_influences"][:], expected, rtol=1e-8)


def test_run_from_toml_on_local_cluster_resuming_a_sync_run(fixture_dir, truth, tmp_path, capsys):
    """local:2 (two worker processes on 127.0.0.1), configured from a TOML file (a flag overrides
    it), finishing a store that a sync run left incomplete: the schedulers share the block markers."""
    out = tmp_path / "dask.zarr"
    assert main(_run_args(out)) == 0
    markers = out / "influences" / "_infscale_complete"
    for key in ("1.0", "1.1", "1.4", "2.3"):  # forget four blocks and wipe their data
        (markers / key).unlink()
    stored = zarr.open_array(str(out / "influences"), mode="r+")
    stored[8:16, 0:16] = 0.0
    stored[8:16, 32:40] = 0.0
    stored[16:, 24:32] = 0.0
    capsys.readouterr()
    config = tmp_path / "run.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            model = "cli_fixture:model"
            data = "cli_fixture:data"
            method = "direct"
            batch_size = {BATCH}
            out = "{out}"
            scheduler = "local:2"
            resume = true
            top_k = 2
            progress = false

            [params]
            hessian_regularization = {LAMBDA}
            """
        )
    )
    assert main(["run", "--config", str(config), "--top-k", "3"]) == 0
    text = capsys.readouterr().out
    assert "scheduler tcp://127.0.0.1:" in text and "dashboard http://127.0.0.1:" in text  # localhost only
    group = zarr.open_group(str(out), mode="r")
    np.testing.assert_allclose(group["influences"][:], truth, rtol=1e-8, atol=1e-10)
    assert group["top_helpful_indices"].shape == (N_TEST, 3)
    assert group.attrs["scheduler"] == "local:2"
    assert len(list(markers.iterdir())) == 15


def test_resume_after_kill(fixture_dir, truth, tmp_path, capsys):
    """SIGKILL a run mid-way; --resume computes the missing blocks and the store is complete and right."""
    out = tmp_path / "killed.zarr"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fixture_dir), os.environ.get("PYTHONPATH", "")]))
    env["FIXTURE_DELAY"] = "0.06"  # slow test data: rows of blocks arrive ~0.5 s apart
    args = _run_args(out, data="cli_fixture:slow_data")
    proc = subprocess.Popen(
        [sys.executable, "-m", "infscale.cli", *args],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    markers = out / "influences" / "_infscale_complete"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if markers.is_dir() and any(markers.iterdir()):
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done_before = len(list(markers.iterdir()))
    assert 0 < done_before < 15

    assert main(["info", str(out)]) == 0
    assert f"{done_before} of 15 blocks done" in capsys.readouterr().out
    done_keys = {m.name for m in markers.iterdir()}
    incomplete_row = next(r for r in range(3) if any(f"{r}.{c}" not in done_keys for c in range(5)))
    line = _error(capsys, ["top", str(out), "--test", str(incomplete_row * BATCH)])
    assert f"row {incomplete_row * BATCH} is not complete" in line and "--resume" in line

    # without --resume or --overwrite: refused, store untouched
    line = _error(capsys, _run_args(out, data="cli_fixture:slow_data"))
    assert "already exists" in line and "--resume" in line
    assert len(list(markers.iterdir())) == done_before

    assert main(_run_args(out, "--resume", "--top-k", "2", data="cli_fixture:slow_data")) == 0
    group = zarr.open_group(str(out), mode="r")
    assert len(list(markers.iterdir())) == 15
    np.testing.assert_allclose(group["influences"][:], truth, rtol=1e-8, atol=1e-10)
    assert group["top_helpful_indices"].shape == (N_TEST, 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


M, D = "cli_fixture:model", "cli_fixture:data"


@pytest.mark.parametrize(
    "extra, model, data, message",
    [
        ((), "no_such_module_xyz:model", D, "--model: cannot import module 'no_such_module_xyz'"),
        ((), "cli_fixture:nope", D, "--model: module 'cli_fixture' has no attribute 'nope'"),
        ((), "cli_fixture", D, "--model: expected package.module:function"),
        ((), "cli_fixture:not_a_tuple", D, "must return a tuple (model, loss); got a str"),
        ((), "cli_fixture:wrong_model", D, "returned a model of type int, not a torch.nn.Module"),
        ((), M, "cli_fixture:wrong_data", "expected a torch.utils.data.Dataset"),
        ((), M, "cli_fixture:broken", "cli_fixture:broken() raised RuntimeError: the factory"),
        ((), M, "cli_fixture:mismatched_data", "training inputs have shape (3,) but test inputs (2,)"),
        (("--param", "hessian_regularization=0"), "cli_fixture:concave_model", D, "is not positive definite"),
        (("--param", "rank"), M, D, "--param: expected key=value"),
        (("--param", "rnak=3"), M, D, "DirectInfluence has no parameter 'rnak'"),
        (
            ("--param", "hessian_regularization=-1"), M, D,
            "--param: DirectInfluence(hessian_regularization=-1) rejected",
        ),
        (("--method", "magic"), M, D, "unknown method 'magic'; available: direct"),
        (("--scheduler", "local:0"), M, D, "local:N needs a worker count"),
        (("--top-k", "0"), M, D, "--top-k: expected an integer ≥ 1"),
    ],
)  # fmt: skip
def test_errors_exit_2(fixture_dir, tmp_path, capsys, extra, model, data, message):
    line = _error(capsys, _run_args(tmp_path / "e.zarr", *extra, model=model, data=data))
    assert message in line, line


def test_unreachable_scheduler(fixture_dir, tmp_path, capsys):
    address = f"tcp://127.0.0.1:{_free_port()}"
    line = _error(capsys, _run_args(tmp_path / "u.zarr", "--scheduler", address, "--connect-timeout", "1"))
    assert f"the Dask scheduler at {address} does not answer" in line
    assert not (tmp_path / "u.zarr").exists()  # checked before anything is written


def test_store_errors_and_debug(fixture_dir, tmp_path, capsys):
    out = tmp_path / "x.zarr"
    assert main(_run_args(out)) == 0
    capsys.readouterr()
    line = _error(capsys, _run_args(out))
    assert f"{str(out)!r} already exists; pass --overwrite" in line
    assert main(_run_args(out, "--overwrite")) == 0
    line = _error(capsys, _run_args(out, "--overwrite", "--resume"))
    assert "exclude each other" in line
    # resume with another configuration is refused
    line = _error(capsys, _run_args(out, "--resume", "--batch-size", "4"))
    assert "another configuration" in line and "batch_size" in line
    assert "no zarr store at" in _error(capsys, ["info", str(tmp_path / "missing.zarr")])
    assert "out of range" in _error(capsys, ["top", str(out), "--test", str(N_TEST)])
    # --debug adds the traceback
    assert main(["info", str(tmp_path / "missing.zarr"), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_internal_error_exits_1(fixture_dir, tmp_path, capsys, monkeypatch):
    import infscale.app.pipeline as pipeline

    def boom(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(pipeline, "compute_into_group", boom)
    assert main(_run_args(tmp_path / "i.zarr")) == 1
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: a bug" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "text, expected",
    [
        ("rank=64", ("rank", 64)),
        ("hessian_regularization=1e-3", ("hessian_regularization", 1e-3)),
        ("progress=true", ("progress", True)),
        ("maxiter=none", ("maxiter", None)),
        ("block_structure=layer_wise", ("block_structure", "layer_wise")),
        ('hessian_regularization={"a": 0.1}', ("hessian_regularization", {"a": 0.1})),
    ],
)
def test_parse_param(text, expected):
    assert parse_param(text) == expected
    assert type(parse_param(text)[1]) is type(expected[1])


def test_method_lookup_maps_names_to_classes():
    import infscale.torch as it
    from infscale.cli import available_methods, resolve_method

    methods = available_methods()
    assert methods["direct"] is it.DirectInfluence and methods["cg"] is it.CgInfluence
    for short, cls in methods.items():
        assert resolve_method(short) == (short, cls)
        assert resolve_method(cls.__name__.upper()) == (short, cls)


# ------------------------------------------------------------------ exit codes by error type
# Every family of errors a user can fix (infscale.errors.UserFixableError) exits with 2, by its
# type: one test per family through the command where the command can reach it.


def _family_error(capsys, family: str, argv) -> str:
    line = _error(capsys, argv)
    assert f"error: {family}: " in line, line
    return line


def test_usage_error_exits_2(fixture_dir, tmp_path, capsys):
    line = _error(capsys, _run_args(tmp_path / "e.zarr", "--method", "magic"))
    assert line.startswith("infscale run: error: --method: unknown method 'magic'"), line


def test_not_positive_definite_exits_2_for_a_rank_deficient_model(fixture_dir, tmp_path, capsys):
    """DirectInfluence with λ = 0 where one input feature is always 0: H has an exact zero eigenvalue."""
    argv = _run_args(
        tmp_path / "n.zarr", "--param", "hessian_regularization=0", data="cli_fixture:dead_feature_data"
    )
    line = _family_error(capsys, "NotPositiveDefiniteError", argv)
    assert "hessian_regularization" in line


def test_ekfac_singular_curvature_exits_2(fixture_dir, tmp_path, capsys):
    """EK-FAC with λ = 0 on data with a dead input feature: its curvature is singular."""
    argv = _run_args(
        tmp_path / "k.zarr", "--method", "ekfac", "--param", "hessian_regularization=0",
        model="cli_fixture:mse_model", data="cli_fixture:dead_feature_data",
    )  # fmt: skip
    line = _family_error(capsys, "NotPositiveDefiniteError", argv)
    assert "hessian_regularization" in line


def test_lissa_divergence_exits_2(fixture_dir, tmp_path, capsys):
    """scale far below the largest curvature eigenvalue: the LiSSA iterates explode."""
    argv = _run_args(tmp_path / "l.zarr", "--method", "lissa", "--param", "scale=0.01")
    _family_error(capsys, "LissaDivergenceError", argv)


def test_thread_safety_violation_exits_2_before_writing(fixture_dir, tmp_path, capsys):
    """A scheduler whose worker runs two threads: the torch methods are not thread-safe."""
    from distributed import LocalCluster

    out = tmp_path / "t.zarr"
    with LocalCluster(
        n_workers=1,
        threads_per_worker=2,
        processes=False,
        protocol="tcp",
        host="127.0.0.1",
        dashboard_address=None,
    ) as cluster:
        line = _family_error(
            capsys, "ThreadSafetyViolationError", _run_args(out, "--scheduler", cluster.scheduler_address)
        )
    assert "(2 threads)" in line and "--nthreads 1" in line
    assert not out.exists()  # checked before the store is touched


def test_store_exists_and_mismatch_exit_2(fixture_dir, tmp_path, capsys):
    out = tmp_path / "s.zarr"
    assert main(_run_args(out)) == 0
    capsys.readouterr()
    line = _family_error(capsys, "StoreExistsError", _run_args(out))
    assert "already exists" in line
    line = _family_error(
        capsys, "StoreMismatchError", _run_args(out, "--resume", "--param", "hessian_regularization=0.5")
    )
    assert "another configuration" in line and "params" in line
    # --overwrite replaces only zarr stores: a folder of other files is left alone
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"not zarr")
    line = _family_error(capsys, "StoreExistsError", _run_args(other, "--overwrite"))
    assert "not a zarr store" in line and (other / "cat.jpg").exists()


def test_unsupported_influence_mode_exits_2(fixture_dir, tmp_path, capsys):
    """argparse limits --mode to its choices; a TOML file can still name another one."""
    config = tmp_path / "run.toml"
    config.write_text('mode = "sideways"\n')
    line = _family_error(
        capsys,
        "UnsupportedInfluenceModeError",
        ["run", "--config", str(config), *_run_args(tmp_path / "m.zarr")[1:]],
    )
    assert "'sideways'" in line and "'up', 'perturbation'" in line


def _instances() -> dict[type, BaseException]:
    return {
        errors.UsageError: errors.UsageError("--flag: bad"),
        errors.NotFittedError: errors.NotFittedError(int, "influences"),
        errors.UnsupportedInfluenceModeError: errors.UnsupportedInfluenceModeError("sideways"),
        errors.NotPositiveDefiniteError: errors.NotPositiveDefiniteError("use hessian_regularization ≥ 1"),
        errors.LissaDivergenceError: errors.LissaDivergenceError("raise scale"),
        errors.ThreadSafetyViolationError: errors.ThreadSafetyViolationError("M", {"tcp://w": 2}),
        errors.InvalidDimensionChunksError: errors.InvalidDimensionChunksError("x", ((2,), (1, 1))),
        errors.UnalignedChunksError: errors.UnalignedChunksError("x", (2,), "y", (1, 1)),
        errors.StoreExistsError: errors.StoreExistsError("exists"),
        errors.StoreMismatchError: errors.StoreMismatchError("mismatch"),
        errors.NonFiniteError: errors.NonFiniteError("x_test rows [3] hold NaN"),
        errors.BatchFormatError: errors.BatchFormatError("batch 0 is a tuple of 3; expected (x, y)"),
        errors.FeatureShapeError: errors.FeatureShapeError("x_test has 5 features; fitted on 4"),
        errors.ModelInputError: errors.ModelInputError("x (int64) could not go through the model"),
        errors.TrainingModeError: errors.TrainingModeError("call model.eval()"),
        errors.UnsupportedCurvatureError: errors.UnsupportedCurvatureError("use empirical_fisher"),
    }


def test_every_user_fixable_family_maps_to_2_by_type(capsys):
    """NotFittedError (the command always fits first) and the chunk errors (the command makes the
    chunks) cannot be reached through the command: their mapping is checked here, with all others."""
    instances = _instances()
    families = {
        c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.UserFixableError)
    }
    assert set(instances) == families - {errors.UserFixableError}  # a new family needs a case here
    for cls, error in instances.items():
        assert report_error("run", error) == 2, cls
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert ("internal error" not in err) and (
            cls is errors.UsageError or f"error: {cls.__name__}: " in err
        )


def test_mapping_is_by_type_not_by_message(capsys):
    """A plain ValueError that mentions hessian_regularization is an internal error (exit 1)."""
    assert report_error("run", ValueError("hessian_regularization is not positive definite")) == 1
    assert "internal error: ValueError" in capsys.readouterr().err

    class Mine(errors.UserFixableError):
        pass

    assert report_error("run", Mine("fix this")) == 2  # a subclass defined anywhere
    assert "error: Mine: fix this" in capsys.readouterr().err
