"""Fault injection: ``infscale run`` killed (SIGKILL) or interrupted (SIGINT) at deterministic
points of each phase — after the fit, after the k-th influence block, after the k-th
self-influence block, in the middle of the top-k — sequentially and on Dask, on a local path and
on S3 (a local moto server), then finished with ``--resume``.

Checked at the kill: every block the store records as complete holds its data (``infscale info``
counts exactly the blocks written, ``infscale info --verify`` finds no damage), a cut-short top-k
is reported as such, an old store replaced with ``--overwrite`` is untouched until the first new
block. Checked after the resume: the store is bit-identical (every file) to an uninterrupted run.

The kill points are hooks, not timers: the child script wraps the stores' ``set`` and the
pipeline's ``fit`` and sends itself the signal right after the event named in ``INFSCALE_FAULT``
(``influences:4:SIGKILL``: after the 4th influence block's completion marker is stored). A store
that marked a block complete before writing its data fails here at every kill point.

``make test`` runs a representative subset; ``test_random_fault_sequences`` (slow) draws kill
points, signals, schedulers and stores at random (seeded), with up to two kills per run. On two
worker processes the comparison is to 1e-12, not bit for bit: there, two uninterrupted runs already
differ in the last bit, depending on which worker computes which block.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr
from helpers import moto_s3
from test_cli import FIXTURE

from infscale.cli import main

N_TRAIN, N_TEST, BATCH, K = 40, 20, 8, 3  # 3 × 5 influence blocks, 5 self-influence blocks
N_BLOCKS = 15
TOP_ARRAYS = ("top_helpful_indices", "top_helpful_values", "top_harmful_indices", "top_harmful_values")

FACTORIES = FIXTURE  # test_cli's factories: a linear regression with a closed form

# The test-only wrapper: `python fault_child.py ARGS...` is `infscale ARGS...`, killed by the
# signal INFSCALE_FAULT names right after its event ("fit", "influences", "self_influences",
# "top": a completion marker stored, or a key of a top-k array) happened the given number of times.
CHILD = textwrap.dedent(
    """
    import collections
    import os
    import signal
    import sys

    del sys.path[0]  # as the `infscale` script: the script's folder is not searched first


    def install(fault):
        event, count, name = fault.split(":")
        count, sig, seen = int(count), getattr(signal, name), collections.Counter()

        def fire(what):
            seen[what] += 1
            if what == event and seen[what] == count:
                os.kill(os.getpid(), sig)

        import infscale.app.pipeline as pipeline
        from zarr.storage import FsspecStore, LocalStore

        from infscale.store import COMPLETE_PREFIX, is_temporary_key

        real_fit = pipeline.fit

        def fit(*args, **kwargs):
            result = real_fit(*args, **kwargs)
            fire("fit")
            return result

        pipeline.fit = fit
        for cls in (LocalStore, FsspecStore):
            def make(real):
                async def set_(self, key, value, *args, **kwargs):
                    await real(self, key, value, *args, **kwargs)
                    root = str(getattr(self, "root", None) or getattr(self, "path", "")).rstrip("/")
                    if key.startswith(COMPLETE_PREFIX) and not is_temporary_key(key):
                        fire(root.rsplit("/", 1)[-1])  # the array: influences or self_influences
                    elif key.startswith("top_"):
                        fire("top")
                return set_
            cls.set = make(cls.set)


    if __name__ == "__main__":
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if os.environ.get("INFSCALE_FAULT"):
            install(os.environ["INFSCALE_FAULT"])
        from infscale.cli import main

        sys.exit(main(sys.argv[1:]))
    """
)


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def scripts(tmp_path_factory):
    """The folder of the factories (importable here and by the children) and the child script."""
    folder = tmp_path_factory.mktemp("fault_scripts")
    (folder / "fault_factories.py").write_text(FACTORIES)
    (folder / "fault_child.py").write_text(CHILD)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))


@pytest.fixture(scope="module")
def cluster(scripts):
    """One in-process Dask worker with one thread (in-process workers would share one model
    between threads), reached by address: the killed child and the in-process resume connect to it."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, protocol="tcp", host="127.0.0.1",
        dashboard_address=None,
    ) as cluster:  # fmt: skip
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def s3(scripts):
    """A bucket on a local moto server; the children get the options from FSSPEC_S3, this process
    from fsspec's configuration (``infscale run`` takes no storage options)."""
    import fsspec.config

    with moto_s3("infscale-faults") as options:
        old = fsspec.config.conf.get("s3")
        fsspec.config.conf["s3"] = options
        try:
            yield options
        finally:
            if old is None:
                fsspec.config.conf.pop("s3", None)
            else:
                fsspec.config.conf["s3"] = old


@pytest.fixture(scope="module")
def references(scripts, tmp_path_factory):
    """Uninterrupted runs, made on first use: {(scheduler, lambda): path}."""
    folder = tmp_path_factory.mktemp("references")
    made: dict[tuple[str, float], Path] = {}

    def get(scheduler: str, lam: float = 0.01) -> Path:
        if (scheduler, lam) not in made:
            out = folder / f"ref-{len(made)}.zarr"
            assert main(_argv(out, scheduler, lam)) == 0
            made[(scheduler, lam)] = out
        return made[(scheduler, lam)]

    return get


# ------------------------------------------------------------------ helpers
def _argv(out, scheduler: str = "sync", lam: float = 0.01, *extra: str) -> list[str]:
    return [
        "run", "--model", "fault_factories:model", "--data", "fault_factories:data", "--method", "direct",
        "--param", f"hessian_regularization={lam}", "--batch-size", str(BATCH), "--self-influences",
        "--top-k", str(K), "--scheduler", scheduler, "--out", str(out), "--no-progress", *extra,
    ]  # fmt: skip


def _child(scripts: Path, argv: list[str], fault: str, cwd: Path, s3: dict | None = None):
    """Run the command in a new process (session) with ``fault`` armed; (exit code, stderr).
    Whatever the child started (the worker processes of ``local:N``) goes with its session."""
    path = os.pathsep.join(p for p in (str(scripts), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, INFSCALE_FAULT=fault, OMP_NUM_THREADS="1", PYTHONPATH=path)
    if s3 is not None:
        env["FSSPEC_S3"] = json.dumps(s3)
    process = subprocess.Popen(
        [sys.executable, str(scripts / "fault_child.py"), *argv], cwd=cwd, env=env, text=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        _, err = process.communicate(timeout=300)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the child's own session: its leftovers only
        except (ProcessLookupError, PermissionError):
            pass
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, err


def _files(url: str) -> dict[str, bytes]:
    """Every object under ``url`` (a local path or an s3:// URL) with its bytes."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()  # another process wrote there
    root = root.rstrip("/")
    return {path[len(root) :]: fs.cat_file(path) for path in sorted(fs.find(root))}


def _assert_same_files(url: str, reference: Path, exact: bool = True) -> None:
    """The store at ``url`` holds the same files as the reference, each with the same bytes.

    Not ``exact``: the same files, the same metadata (``zarr.json``), and values equal to 1e-12:
    on several worker processes, two uninterrupted runs already differ in the last bit (measured:
    1e-16 relative), depending on which worker computes which block; the checksums differ with them.
    """
    got, expected = _files(url), _files(str(reference))
    assert (sorted(got.keys() - expected.keys()), sorted(expected.keys() - got.keys())) == ([], [])
    if exact:
        assert sorted(k for k in got if got[k] != expected[k]) == []
        return
    def metadata(raw: bytes) -> dict:
        value = json.loads(raw)
        value.get("attributes", {}).pop("checksum", None)  # a top-k array's: of its values
        return value

    assert all(metadata(got[k]) == metadata(expected[k]) for k in got if k.endswith("zarr.json"))
    for name in ("influences", "self_influences", *TOP_ARRAYS):
        np.testing.assert_allclose(
            zarr.open_array(f"{url}/{name}", mode="r")[:],
            zarr.open_array(str(reference / name), mode="r")[:],
            rtol=1e-12,
        )


def _info(capsys, url: str, *flags: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["info", url, *flags])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _check_at_kill(capsys, out: str, event: str, count: int, sig: str) -> None:
    """What the store must say right after the kill: a complete block is one whose data are there."""
    if event == "fit":  # the group exists, nothing else
        assert "without an 'influences' array" in _info(capsys, out)[1]
        return
    code, text = _info(capsys, out, "--verify")
    lines = {line.split(":")[0]: line for line in text.splitlines()}
    if event == "top":  # the top-k was cut short: said so, the matrices are intact
        assert code == 2 and "incomplete (its write was cut short)" in text, text
        assert f"{N_BLOCKS} of {N_BLOCKS} blocks done" in lines["influences"] and "all good" in text
        return
    assert code == 0, text  # nothing marked complete lacks its data
    done = {"influences": f"{count} of {N_BLOCKS} blocks", "self_influences": f"{count} of 5 blocks"}[event]
    if sig == "SIGKILL":  # killed right after the count-th marker: exactly that many are done
        assert f"{done} done" in lines[event], text
    if event == "self_influences":
        assert f"{N_BLOCKS} of {N_BLOCKS} blocks done" in lines["influences"]


def _fault_case(scripts, capsys, tmp_path, out: str, scheduler: str, fault: str, reference: Path, s3=None):
    """Kill, check the store, resume in this process, compare every file with the reference."""
    event, count, sig = fault.split(":")
    code, err = _child(scripts, _argv(out, scheduler), fault, tmp_path, s3)
    if sig == "SIGKILL":
        assert code == -signal.SIGKILL, err
    else:  # SIGINT: the command stops where it is, keeps what is done, and says so
        assert code == 130 and "infscale run: interrupted" in err, err
    _check_at_kill(capsys, out, event, int(count), sig)
    resume = () if event == "fit" else ("--resume",)  # a failed run's leftover needs no flag
    assert main(_argv(out, scheduler, 0.01, *resume)) == 0
    _assert_same_files(out, reference)
    assert _info(capsys, out, "--verify")[0] == 0


# ------------------------------------------------------------------ the fast matrix
SEQUENTIAL = [
    "fit:1:SIGKILL",
    "influences:4:SIGKILL",
    "influences:6:SIGINT",
    "self_influences:2:SIGKILL",
    "top:7:SIGKILL",
]


@pytest.mark.parametrize("fault", SEQUENTIAL)
def test_sequential_killed_then_resumed_is_bit_identical(scripts, references, capsys, tmp_path, fault):
    out = str(tmp_path / "out.zarr")
    _fault_case(scripts, capsys, tmp_path, out, "sync", fault, references("sync"))


@pytest.mark.parametrize("fault", ["influences:5:SIGKILL", "self_influences:3:SIGINT"])
def test_dask_killed_then_resumed_is_bit_identical(scripts, references, cluster, capsys, tmp_path, fault):
    out = str(tmp_path / "out.zarr")
    _fault_case(scripts, capsys, tmp_path, out, cluster, fault, references(cluster))
    # the Dask path computes the same numbers as the sequential one
    for name in ("influences", "self_influences"):
        np.testing.assert_allclose(
            zarr.open_array(f"{out}/{name}", mode="r")[:],
            zarr.open_array(str(references("sync") / name), mode="r")[:], rtol=1e-12,
        )  # fmt: skip


def test_s3_killed_then_resumed_is_bit_identical(scripts, references, s3, capsys, tmp_path):
    out = "s3://infscale-faults/killed.zarr"
    _fault_case(scripts, capsys, tmp_path, out, "sync", "influences:2:SIGKILL", references("sync"), s3)


def test_a_killed_run_is_not_finished_by_accident(scripts, capsys, tmp_path):
    """After a kill: `top` refuses an incomplete row, a plain rerun refuses to touch the store."""
    out = tmp_path / "out.zarr"
    code, err = _child(scripts, _argv(out), "influences:7:SIGKILL", tmp_path)
    assert code == -signal.SIGKILL, err
    markers = out / "influences" / "_infscale_complete"
    before = {p.name: p.read_bytes() for p in markers.iterdir()}
    assert set(before) == {f"0.{j}" for j in range(5)} | {"1.0", "1.1"}  # test-outer, row by row
    capsys.readouterr()
    assert main(["top", str(out), "--test", str(BATCH)]) == 2
    assert f"row {BATCH} is not complete" in capsys.readouterr().err
    assert main(["top", str(out), "--test", "0"]) == 0  # row 0 is complete
    assert main(_argv(out)) == 2
    assert "already exists" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in markers.iterdir()} == before


@pytest.mark.parametrize("fault", ["fit:1:SIGKILL", "influences:2:SIGKILL"])
def test_overwrite_killed_keeps_the_old_store_until_the_first_new_block(
    scripts, references, capsys, tmp_path, fault
):
    """--overwrite killed after the fit: the old store is bit-identical; killed after the second
    new block: it was replaced, and --resume finishes the new run."""
    out = tmp_path / "out.zarr"
    assert main(_argv(out, "sync", 0.5)) == 0  # the old results, with another λ
    old = _files(str(out))
    code, err = _child(scripts, _argv(out, "sync", 0.01, "--overwrite"), fault, tmp_path)
    assert code == -signal.SIGKILL, err
    if fault.startswith("fit"):
        assert _files(str(out)) == old
        assert main(_argv(out, "sync", 0.01, "--overwrite")) == 0
    else:
        _check_at_kill(capsys, str(out), "influences", 2, "SIGKILL")
        assert main(_argv(out, "sync", 0.01, "--resume")) == 0
    _assert_same_files(str(out), references("sync"))


# ------------------------------------------------------------------ the randomized version
@pytest.fixture(scope="module")
def cluster_of_processes(scripts):
    """Two worker processes with one thread each (the workers import the factories by name)."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address="127.0.0.1:0", worker_dashboard_address="127.0.0.1:0",
    ) as cluster:  # fmt: skip
        yield cluster.scheduler_address


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("seed", range(8))
def test_random_fault_sequences(
    scripts, references, cluster, cluster_of_processes, s3, capsys, tmp_path, seed
):
    """Random kill points (any phase, any block), signals, schedulers (sync, one in-process worker,
    two worker processes, local:1) and stores (local, S3); up to two kills before the resume."""
    rng = random.Random(seed)
    scheduler = rng.choice(["sync", cluster, cluster_of_processes, "local:1"])
    on_s3 = rng.random() < 0.3
    out = f"s3://infscale-faults/random-{seed}.zarr" if on_s3 else str(tmp_path / "out.zarr")
    rounds = rng.choice([1, 2])
    print(f"seed {seed}: scheduler {scheduler}, store {out}, {rounds} kill(s)")
    for round_ in range(rounds):
        event = rng.choice(["fit", "influences", "self_influences", "top"])
        count = {"fit": 1, "influences": rng.randint(1, N_BLOCKS), "self_influences": rng.randint(1, 5),
                 "top": rng.randint(1, 20)}[event]  # fmt: skip
        sig = rng.choice(["SIGKILL", "SIGKILL", "SIGINT"])
        fault = f"{event}:{count}:{sig}"
        print(f"  round {round_}: {fault}")
        resume = ("--resume",) if round_ else ()
        argv = _argv(out, scheduler, 0.01, *resume)
        code, err = _child(scripts, argv, fault, tmp_path, s3 if on_s3 else None)
        if code == 0:  # the event came after the work this run still had to do
            break
        assert code == (-signal.SIGKILL if sig == "SIGKILL" else 130), err
        if round_ == 0:
            _check_at_kill(capsys, out, event, count, sig)
    assert main(_argv(out, scheduler, 0.01, "--resume")) == 0
    _assert_same_files(out, references(scheduler), exact=scheduler != cluster_of_processes)
