"""The ``infscale`` command: run (sync, local:1, TOML), top, info (--verify), resume, and what it
prints from a store (escaped). Errors and exit codes: test_cli_errors.py; kills: test_faults.py.

The model is a linear regression with mean squared error, in float64, so the
influences have a closed form: with per-sample gradient g_i = 2 (w·x_i + b − y_i) [x_i, 1]
and H = (2/n) Σ [x_i, 1][x_i, 1]ᵀ, influence(test t, train i) = g_tᵀ (H + λI)⁻¹ g_i.
"""

from __future__ import annotations

import shutil
import sys
import textwrap

import numpy as np
import pytest
import zarr

from infscale.cli import main, parse_param

LAMBDA = 1e-3
N_TRAIN, N_TEST, BATCH = 40, 20, 8

FIXTURE = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

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
    """local:1 (a worker process on 127.0.0.1), configured from a TOML file (a flag overrides it),
    finishing a store that a sync run left incomplete: the schedulers share the block markers."""
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
            scheduler = "local:1"
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
    assert group.attrs["scheduler"] == "local:1"
    assert len(list(markers.iterdir())) == 15


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


# ------------------------------------------------------------------ verify, repair, print safely
TEMPORARY = "0123456789abcdef0123456789abcdef.partial"  # how zarr names a write cut short


def _chunk(out, name: str, key: str):
    return out.joinpath(name, "c", *key.split("."))


@pytest.mark.parametrize("scheduler", ["sync", "dask"])
def test_info_verify_finds_damage_and_resume_repairs_it(fixture_dir, truth, tmp_path, capsys, scheduler):
    out = tmp_path / "d.zarr"
    extra = ("--self-influences", "--top-k", "3")
    assert main(_run_args(out, *extra)) == 0
    names = ("influences", "self_influences", "top_helpful_indices", "top_helpful_values")
    before = {name: zarr.open_array(str(out / name), mode="r")[:] for name in names}
    _chunk(out, "influences", "1.2").unlink()  # deleted
    for name, key in (("influences", "2.0"), ("self_influences", "3")):  # truncated
        _chunk(out, name, key).write_bytes(_chunk(out, name, key).read_bytes()[:5])
    _chunk(out, "top_helpful_values", "1.0").unlink()
    # leftovers of writes cut short never count: a marker and a chunk of a block never finished
    (out / "influences" / "_infscale_complete" / f"9.{TEMPORARY}").write_text("{}")
    (out / "influences" / "c" / "0" / f"9.{TEMPORARY}").write_bytes(b"\0")

    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    lines = {line.split(":")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "14 of 15 blocks done" in lines["influences"]  # a block whose chunk is gone is not done
    assert "5 of 5 blocks done" in lines["self_influences"]  # truncated: found by --verify only

    assert main(["info", str(out), "--verify"]) == 2
    captured = capsys.readouterr()
    text = captured.out
    assert "damaged block 1.2: chunk missing" in text and "damaged block 2.0: unreadable" in text
    assert "damaged block 3: unreadable" in text
    assert "top_helpful_values" in text and "checksum mismatch" in text
    assert "--verify: 4 damaged block(s)" in captured.err and "--resume" in captured.err

    if scheduler == "sync":
        assert main(_run_args(out, *extra, "--resume")) == 0
    else:  # the Dask path (dask_to_zarr) verifies and repairs the same way
        from distributed import LocalCluster

        with LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, protocol="tcp", host="127.0.0.1",
            dashboard_address=None,
        ) as cluster:  # fmt: skip
            assert main(_run_args(out, *extra, "--resume", "--scheduler", cluster.scheduler_address)) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--verify"]) == 0
    assert "damaged" not in capsys.readouterr().out
    for name in names:
        np.testing.assert_allclose(zarr.open_array(str(out / name), mode="r")[:], before[name], rtol=1e-12)
    np.testing.assert_allclose(before["influences"], truth, rtol=1e-8, atol=1e-10)


def test_a_store_cannot_drive_the_terminal(fixture_dir, tmp_path, capsys):
    """Attributes and keys of a store come from whoever wrote it: `info`, `top` and error messages
    print their control characters escaped (no screen clearing, colours, titles or reordering)."""
    out = tmp_path / "e.zarr"
    assert main(_run_args(out)) == 0
    array = zarr.open_array(str(out / "influences"), mode="r+")
    array.attrs.update({"method": "\x1b[2J\x1b[31mEvil", "note\x1b]0;title\x07": "bidi \u202e and C1 \x9b"})
    zarr.open_group(str(out), mode="r+").attrs["model"] = "\x1b[2J"
    raw = ("\x1b", "\x07", "\x9b", "\u202e")

    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert not any(c in text for c in raw)
    assert "note\\x1b]0;title\\x07" in text and "\\u202e" in text and "\\x9b" in text
    assert main(["top", str(out), "--test", "0"]) == 0
    text = capsys.readouterr().out
    assert not any(c in text for c in raw) and "(\\x1b[2J\\x1b[31mEvil, mode up" in text

    (out / "influences" / "c" / "\x1b[2J").write_text("mine")  # a file of someone else's
    assert main(_run_args(out, "--overwrite")) == 2
    err = capsys.readouterr().err
    assert not any(c in err for c in raw) and "influences/c/\\x1b[2J" in err


def test_resume_after_a_kill_while_the_self_influences_were_being_created(fixture_dir, tmp_path, capsys):
    """Killed while zarr wrote the self-influences' metadata: the folder holds only a temporary
    file. That is no data: --resume creates the array and finishes, and so would a plain rerun."""
    out = tmp_path / "s.zarr"
    assert main(_run_args(out, "--self-influences")) == 0
    expected = zarr.open_array(str(out / "self_influences"), mode="r")[:]
    for keep in (True, False):
        shutil.rmtree(out / "self_influences")
        (out / "self_influences").mkdir()
        (out / "self_influences" / f"zarr.{TEMPORARY}").write_text('{"zarr_fo')
        if keep:  # an empty chunk folder too, as a kill between mkdir and write leaves
            (out / "self_influences" / "c").mkdir()
        assert main(_run_args(out, "--self-influences", "--resume")) == 0
        np.testing.assert_array_equal(zarr.open_array(str(out / "self_influences"), mode="r")[:], expected)


def test_resume_removes_temporary_files_a_kill_left_in_the_group(fixture_dir, tmp_path):
    """Killed while zarr rewrote the group's metadata (the top-k phase updates it): a *.partial file
    is left at the group's root; the resumed store holds exactly what an uninterrupted run's does."""
    out = tmp_path / "s.zarr"
    assert main(_run_args(out, "--top-k", "2")) == 0
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    (out / f"zarr.{TEMPORARY}").write_text('{"zarr_fo')
    assert main(_run_args(out, "--top-k", "2", "--resume")) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == before
