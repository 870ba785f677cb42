"""The pipeline behind ``infscale run`` (and the demo): load the factories, build and fit the
method, and compute the influences into the results group, sequentially or on Dask.

- ``RunConfig``: everything ``infscale run`` takes (from flags and/or a TOML file);
- ``run_pipeline(config)``: the whole run;
- ``fit(infl_model, train_dataset, batch_size)``: fit on a non-shuffled loader;
- ``compute_into_group(infl_model, train, test, url, ComputeSettings(...), client=...)``: write
  the influences (and optionally self-influences and top-k) of a fitted model into a group made
  by ``prepare_group``; sequential without a client, on the client's Dask cluster with one.

Errors a user can fix keep their own types (``infscale.errors.UserFixableError``); only
failures to write the store (``OSError``) become ``UsageError`` here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError, UserFixableError
from .cluster import check_worker_imports, dask_client, describe_client, parse_scheduler
from .factories import load_data, load_model
from .registry import format_params, make_influence_model, resolve_method
from .results import INFLUENCES, SELF_INFLUENCES, PreparedGroup, array_url, prepare_group, write_top_k

__all__ = ["RunConfig", "ComputeSettings", "run_pipeline", "fit", "compute_into_group"]


@dataclass
class RunConfig:
    """Everything ``infscale run`` needs (from flags and/or a TOML file); see ``docs/cli.md``."""

    model: str | None = None
    data: str | None = None
    method: str = "cg"
    params: dict[str, Any] = field(default_factory=dict)
    mode: str = "up"
    batch_size: int = 64
    device: str = "cpu"
    out: str | None = None
    overwrite: bool = False
    resume: bool = False
    top_k: int | None = None
    self_influences: bool = False
    scheduler: str = "sync"
    connect_timeout: float = 10.0
    progress: bool = True


@dataclass(frozen=True)
class ComputeSettings:
    """How ``compute_into_group`` computes and stores.

    Attributes:
        mode: influence mode, ``"up"`` or ``"perturbation"``.
        batch_size: training rows per batch and per zarr chunk.
        test_batch_size: test rows per batch and chunk (default: ``batch_size``).
        device: torch device of the model.
        resume: finish the arrays of an interrupted run (only blocks not marked complete).
        self_influences: also store every training point's self-influence.
        top_k: also store the k most helpful and harmful training points per test point.
        progress: tqdm bars.
    """

    mode: str = "up"
    batch_size: int = 64
    test_batch_size: int | None = None
    device: str = "cpu"
    resume: bool = False
    self_influences: bool = False
    top_k: int | None = None
    progress: bool = True


def fit(infl_model: Any, train_dataset: Any, batch_size: int) -> Any:
    """Fit ``infl_model`` on ``train_dataset`` in batches of ``batch_size`` (not shuffled).

    Raises what the method's ``fit`` raises (e.g. ``NotPositiveDefiniteError``).
    """
    from torch.utils.data import DataLoader

    return infl_model.fit(DataLoader(train_dataset, batch_size=batch_size, shuffle=False))


@contextlib.contextmanager
def _writing() -> Iterator[None]:
    """Store failures that are not infscale's own errors (permissions, a full disk, an
    unreachable bucket) are the user's to fix: ``UsageError``."""
    try:
        yield
    except UserFixableError:
        raise
    except OSError as error:
        raise UsageError(f"cannot write the store: {error}") from error


def compute_into_group(
    infl_model: Any,
    train_dataset: Any,
    test_dataset: Any,
    url: str | PreparedGroup,
    settings: ComputeSettings | None = None,
    client: Any = None,
    log: Callable[[str], None] = print,
) -> None:
    """Write the influences of the fitted ``infl_model`` of ``test_dataset`` × ``train_dataset``
    (and, per ``settings``, the self-influences and the top-k) into the group at ``url``.

    Without ``client``: ``SequentialInfluenceCalculator.to_zarr`` in this process. With a
    ``distributed.Client``: ``DaskInfluenceCalculator`` on its cluster, every block gathered and
    written by this process (``infscale.parallel.dask_to_zarr``) with the same attributes and
    completion markers, so that a run can be resumed under either.

    ``url`` is the group's path or URL, or what ``prepare_group`` returned: with a replacement
    pending (``--overwrite``), the old store is replaced when the first influence block is ready.

    Raises:
        UserFixableError: e.g. ``StoreExistsError``/``StoreMismatchError`` from the arrays, the
            method's errors, ``ThreadSafetyViolationError`` from a multi-threaded worker.
        UsageError: the store cannot be written, ``top_k`` is invalid, or a Dask worker cannot
            import the modules the model needs.
    """
    settings = settings or ComputeSettings()
    target = url if isinstance(url, PreparedGroup) else PreparedGroup(str(url))
    url = target.url
    replace = target.before_first_write if target.replace_pending else None
    infl_url = array_url(url, INFLUENCES)
    self_url = array_url(url, SELF_INFLUENCES) if settings.self_influences else None
    if client is None:
        _sequential(infl_model, train_dataset, test_dataset, infl_url, self_url, settings, log, replace)
    else:
        _on_dask(infl_model, train_dataset, test_dataset, infl_url, self_url, settings, client, log, replace)
    if settings.top_k:
        log(f"top-{settings.top_k} helpful and harmful training points per test point → {url}/top_*")
        write_top_k(url, settings.top_k, progress=settings.progress)


def _sequential(infl_model, train_dataset, test_dataset, infl_url, self_url, settings, log, replace) -> None:
    from torch.utils.data import DataLoader

    from ..calculator import SequentialInfluenceCalculator
    from ..torch.util import TorchNumpyConverter

    converter = TorchNumpyConverter(settings.device)
    train_loader = DataLoader(train_dataset, batch_size=settings.batch_size, shuffle=False)
    test_loader = DataLoader(test_dataset, batch_size=settings.test_batch_size or settings.batch_size)
    calc = SequentialInfluenceCalculator(infl_model)
    options = {"resume": settings.resume, "progress": settings.progress}
    log(f"computing influences → {infl_url}")
    with _writing():
        influences = calc.influences(test_loader, train_loader, mode=settings.mode)
        # the writer calls it when the first block is ready: only then is an old store replaced
        influences.source.before_first_write = replace
        influences.to_zarr(infl_url, converter, overwrite=replace is not None, **options)
    if self_url:
        log(f"computing self-influences → {self_url}")
        with _writing():
            calc.self_influences(train_loader).to_zarr(self_url, converter, **options)


def _on_dask(infl_model, train_dataset, test_dataset, infl_url, self_url, settings, client, log, replace):
    from ..parallel import DaskInfluenceCalculator, dask_to_zarr
    from ..torch.util import TorchNumpyConverter, torch_dataset_to_dask_array

    calc = DaskInfluenceCalculator(infl_model, converter=TorchNumpyConverter(settings.device), client=client)
    dtype, test_batch = calc.dtype, settings.test_batch_size or settings.batch_size
    x, y = torch_dataset_to_dask_array(train_dataset, chunk_size=settings.batch_size, resulting_dtype=dtype)
    x_test, y_test = torch_dataset_to_dask_array(test_dataset, chunk_size=test_batch, resulting_dtype=dtype)
    options = {"client": client, "resume": settings.resume, "progress": settings.progress}
    log(f"computing influences on Dask ({describe_client(client)}) → {infl_url}")
    with _writing(), _worker_imports():
        influences = calc.influences(x_test, y_test, x, y, mode=settings.mode)
        attributes = calc.result_attributes("influences", settings.mode)
        dask_to_zarr(
            influences, infl_url, attributes=attributes, overwrite=replace is not None,
            before_first_write=replace, **options,
        )  # fmt: skip
    if self_url:
        log(f"computing self-influences on Dask → {self_url}")
        with _writing(), _worker_imports():
            attributes = calc.result_attributes("self_influences", "up")
            dask_to_zarr(calc.self_influences(x, y), self_url, attributes=attributes, **options)


@contextlib.contextmanager
def _worker_imports() -> Iterator[None]:
    """A worker that cannot import a module the pickled model or data need (the user's module
    is importable only where ``infscale run`` runs) is the user's to fix: ``UsageError``."""
    try:
        yield
    except ImportError as error:
        raise UsageError(
            f"--scheduler: a Dask worker cannot import {error.name or 'a module'!r} ({type(error).__name__}: "
            f"{error}); expected the modules of --model and --data to be importable on every worker "
            "(same code and environment, e.g. on its PYTHONPATH)."
        ) from error


def _check(config: RunConfig) -> str:
    """The influence mode's value, after checking what can be checked before any work.

    Raises:
        UsageError: a missing --model/--data/--out, a bad --top-k, --batch-size or --scheduler.
        UnsupportedInfluenceModeError: an unknown mode.
    """
    from ..base import InfluenceMode

    if not config.model:
        raise UsageError("--model is required (package.module:factory returning (model, loss)).")
    if not config.data:
        raise UsageError(
            "--data is required (package.module:factory returning (train_dataset, test_dataset))."
        )
    if not config.out:
        raise UsageError("--out is required (a path or URL for the zarr store).")
    mode = InfluenceMode.parse(config.mode).value
    if config.top_k is not None and config.top_k < 1:
        raise UsageError(f"--top-k: expected an integer ≥ 1; got {config.top_k}.")
    if config.top_k and mode != "up":
        raise UsageError("--top-k needs --mode up; perturbation influences have no ranking.")
    if config.batch_size < 1:
        raise UsageError(f"--batch-size: expected an integer ≥ 1; got {config.batch_size}.")
    parse_scheduler(config.scheduler)
    return mode


def run_pipeline(config: RunConfig, log: Callable[[str], None] = print) -> None:
    """``infscale run``: check the configuration, load the factories, build the method, connect
    to (or start) the Dask cluster, prepare the results group, fit, and compute into it.

    Order matters: an unavailable device, an unreachable scheduler, a multi-threaded worker for
    a model that is not thread-safe, or workers that cannot import the user's modules are
    reported before the store is touched or anything is fitted; an old store is replaced
    (``--overwrite``) only when the first new block is ready, after the fit.

    Raises:
        UserFixableError: anything the user can fix (``UsageError`` for the command's own checks;
            the library's errors, e.g. ``NotPositiveDefiniteError``, keep their types).
    """
    import infscale

    mode = _check(config)
    device = _device(config.device)
    short, cls = resolve_method(config.method)
    model, loss = load_model(config.model)
    train_ds, test_ds = load_data(config.data)
    infl_model = make_influence_model(short, model.to(device).eval(), loss, config.params)
    attributes = {
        "model": config.model, "data": config.data, "method": cls.__name__, "params": config.params,
        "mode": mode, "batch_size": config.batch_size, "n_train": len(train_ds), "n_test": len(test_ds),
        "scheduler": config.scheduler, "device": str(device), "top_k": config.top_k,
        "self_influences": config.self_influences, "infscale_version": infscale.__version__,
        # what the numbers depend on besides the settings: a resume with other data is refused
        # (the model's own fingerprint is recorded with each array)
        "train_data_digest": data_digest(train_ds, config.batch_size),
        "test_data_digest": data_digest(test_ds, config.batch_size),
    }  # fmt: skip
    settings = ComputeSettings(
        mode=mode, batch_size=config.batch_size, device=str(device), resume=config.resume,
        self_influences=config.self_influences, top_k=config.top_k, progress=config.progress,
    )  # fmt: skip
    kind, arg = parse_scheduler(config.scheduler)
    cluster = contextlib.nullcontext() if kind == "sync" else dask_client(kind, arg, config.connect_timeout)
    with cluster as client:
        if client is not None:  # before the store is touched or anything is fitted
            from ..parallel import check_thread_safety

            check_thread_safety(infl_model, client)
            flags = (("--model", config.model), ("--data", config.data))
            check_worker_imports(client, {flag: spec.split(":")[0].strip() for flag, spec in flags})
        target = prepare_group(config.out, config.overwrite, config.resume, attributes)
        log(f"fitting {cls.__name__}({format_params(config.params)}) on {len(train_ds)} training points")
        fit(infl_model, train_ds, config.batch_size)
        compute_into_group(infl_model, train_ds, test_ds, target, settings, client=client, log=log)
    log(f"done: {config.out} (infscale info {config.out}; infscale top {config.out} --test 0)")


def data_digest(dataset: Any, batch_size: int) -> str:
    """A hash of a dataset's samples, read once in this process batch by batch (the running hashes
    of ``infscale.store.input_digest``): recorded with the results so that ``--resume`` refuses
    data that changed since the run started, whichever scheduler computes the blocks."""
    import hashlib

    from torch.utils.data import DataLoader

    from ..store import input_digest

    total = hashlib.blake2b(digest_size=16)
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        total.update(input_digest(batch).encode())
    return total.hexdigest()


def _device(text: str):
    """The torch device ``--device`` names, after checking that a tensor can be made on it.

    Raises:
        UsageError: not a device name, or a device this machine (or this torch build) lacks.
    """
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise UsageError(f"--device: {error}") from error
    try:
        torch.empty(0, device=device)
    except Exception as error:  # AssertionError or RuntimeError, depending on the build
        available = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            available.append("mps")
        why = " ".join(str(error).split())
        raise UsageError(
            f"--device: {text!r} is not available here ({type(error).__name__}: {why}); "
            f"expected one of: {', '.join(available)}."
        ) from error
    return device
