"""The ``infscale`` command's errors: one line on stderr and exit code 2 for every mistake a user
can fix (by the error's type), naming the argument, what was given and what was expected; exit
code 1 for anything else. Also: what the command refuses to import or run.
"""

from __future__ import annotations

import socket
import sys

import pytest
from test_cli import FIXTURE, _error, _run_args

from infscale import errors
from infscale.cli import main, report_error


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    """The factories of test_cli (cli_fixture.py), importable."""
    path = tmp_path_factory.mktemp("factories")
    (path / "cli_fixture.py").write_text(FIXTURE)
    sys.path.insert(0, str(path))
    yield path
    sys.path.remove(str(path))


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
        ((), M, "cli_fixture:mismatched_data", "inputs are of shape (3,) but test inputs of shape (2,)"),
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


def test_thread_safety_violation_exits_2_before_fitting_or_writing(
    fixture_dir, tmp_path, capsys, monkeypatch
):
    """A scheduler whose worker runs two threads: the torch methods are not thread-safe. Said before
    the fit (which may take hours) and before the store is touched."""
    from distributed import LocalCluster

    import infscale.app.pipeline as pipeline

    fits = []
    monkeypatch.setattr(pipeline, "fit", lambda *args: fits.append(args))
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
    assert not out.exists() and fits == []  # checked before the store is touched or anything fitted


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
    assert "not a zarr store written by infscale" in line and (other / "cat.jpg").exists()


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


# ------------------------------------------------------------------ devices, workers, imports
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_a_device_this_machine_lacks_exits_2_before_anything(fixture_dir, tmp_path, capsys, device):
    out = tmp_path / "d.zarr"
    line = _error(capsys, _run_args(out, "--device", device))
    assert f"--device: {device!r} is not available here" in line and "expected one of: cpu" in line
    assert "internal error" not in line and not out.exists()


def test_a_worker_that_cannot_import_the_users_module_exits_2(tmp_path, capsys, monkeypatch):
    """The factory module is importable only from the driver's directory: the command says which
    flag, module and worker, before fitting; compute_into_group says so too if it gets that far."""
    from distributed import Client, LocalCluster

    from infscale.app.pipeline import ComputeSettings, compute_into_group, fit
    from infscale.app.results import prepare_group
    from infscale.torch import DirectInfluence

    # the worker process starts here, where there is no such module
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster, Client(cluster) as client:  # fmt: skip
        here = tmp_path / "driver_only"
        here.mkdir()
        (here / "driver_only_fixture.py").write_text(FIXTURE)
        monkeypatch.chdir(here)  # the command finds the module in its current directory
        out = tmp_path / "w.zarr"
        argv = _run_args(
            out, "--scheduler", cluster.scheduler_address,
            model="driver_only_fixture:model", data="driver_only_fixture:data",
        )  # fmt: skip
        line = _error(capsys, argv)
        assert line.startswith("infscale run: error: --model: the Dask worker at tcp://127.0.0.1:")
        assert "cannot import module 'driver_only_fixture' (ModuleNotFoundError" in line
        assert "importable on every worker" in line and not out.exists()

        import driver_only_fixture as fx

        model, loss = fx.model()
        train, test = fx.data()
        infl = fit(DirectInfluence(model, loss, hessian_regularization=0.1), train, 8)
        target = prepare_group(str(out), overwrite=False, resume=False, attributes={})
        with pytest.raises(errors.UsageError, match="a Dask worker cannot import 'driver_only_fixture'"):
            settings = ComputeSettings(batch_size=8, progress=False)
            compute_into_group(infl, train, test, target, settings, client)


PLANTED = "open({name!r} + '.imported', 'w').close()\nraise SystemExit('planted {name} was imported')\n"


def test_files_in_the_current_directory_never_replace_installed_packages(fixture_dir, tmp_path):
    """A zarr.py and a numpy.py planted where `infscale run` is started are not imported (the user's
    module there still is); the command is started as its console script does (no '' on sys.path)."""
    import subprocess

    (tmp_path / "users_model.py").write_text(FIXTURE)
    for name in ("zarr", "numpy", "torch", "dask"):
        (tmp_path / f"{name}.py").write_text(PLANTED.format(name=name))
    out = tmp_path / "p.zarr"
    script = "import sys; del sys.path[0]; from infscale.cli import main; sys.exit(main(sys.argv[1:]))"
    run = subprocess.run(
        [sys.executable, "-c", script, *_run_args(out, model="users_model:model", data="users_model:data")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert not list(tmp_path.glob("*.imported"))
    assert (out / "influences" / "zarr.json").exists()


def test_a_users_module_shadowed_by_an_installed_one_is_named(tmp_path, capsys, monkeypatch):
    (tmp_path / "zarr.py").write_text("def model():\n    pass\n")
    monkeypatch.chdir(tmp_path)
    line = _error(capsys, _run_args(tmp_path / "s.zarr", model="zarr:model", data="zarr:data"))
    assert "--model: module 'zarr' was imported from " in line and "Rename " in line


def _files(path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_failed_run_keeps_the_old_store_and_does_not_block_the_rerun(fixture_dir, tmp_path, capsys):
    out = tmp_path / "o.zarr"
    assert main(_run_args(out)) == 0
    old = _files(out)
    singular = ("--param", "hessian_regularization=0")
    # --overwrite, but the fit fails (λ = 0 on a rank-deficient curvature): the old results stay
    line = _error(capsys, _run_args(out, "--overwrite", *singular, data="cli_fixture:dead_feature_data"))
    assert "NotPositiveDefiniteError" in line and _files(out) == old
    # a first run that fails leaves a store without finished blocks: the corrected rerun needs no flag
    new = tmp_path / "n.zarr"
    _error(capsys, _run_args(new, *singular, data="cli_fixture:dead_feature_data"))
    assert (new / "zarr.json").exists()
    assert main(_run_args(new)) == 0
    # a folder of the user's files is never replaced
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("notes")
    (mine / "sub" / "data.csv").write_text("a,b\n1,2\n")
    line = _family_error(capsys, "StoreExistsError", _run_args(mine, "--overwrite"))
    assert "not a zarr store written by infscale" in line
    assert _files(mine) == {"notes.txt": b"notes", "sub/data.csv": b"a,b\n1,2\n"}
