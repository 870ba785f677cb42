"""The ``infscale`` command: ``demo``, ``run``, ``top`` and ``info``.

- ``infscale demo`` trains a small MLP on scikit-learn's digits with 10% flipped labels and
  shows what influence functions find (see ``infscale.demo``).
- ``infscale run`` computes the influences of a user's model (``--model pkg.mod:factory``)
  on a user's data (``--data pkg.mod:factory``) into a zarr store, sequentially or on Dask.
- ``infscale top STORE --test I`` prints the most helpful and harmful training points of one
  test point, reading only that row of blocks.
- ``infscale info STORE`` prints the shape, chunks, completeness and attributes of a store.

Errors a person can act on (bad factory, bad parameter, existing store, unreachable
scheduler, ...) print one line on stderr and exit with code 2; ``--debug`` adds the
traceback. Anything else is an internal error: exit code 1.

Store layout written by ``run`` and ``demo`` (a zarr v3 group at ``--out``)::

    OUT/                     group; attributes: the run's configuration
    OUT/influences           (n_test, n_train) float array, chunks (test batch, train batch);
                             attributes: method, hyperparameters, mode, sign convention, version
    OUT/self_influences      (n_train,) (only with --self-influences, and in the demo)
    OUT/top_helpful_indices  (n_test, k) int64   (only with --top-k K)
    OUT/top_helpful_values   (n_test, k)         largest influence first
    OUT/top_harmful_indices  (n_test, k) int64
    OUT/top_harmful_values   (n_test, k)         most negative first
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .app.registry import (
    METHODS,
    available_methods,
    format_params,
    make_influence_model,
    parse_param,
    parse_params,
    resolve_method,
)
from .errors import UsageError

__all__ = [
    "UsageError",
    "main",
    "METHODS",
    "available_methods",
    "resolve_method",
    "parse_param",
    "parse_params",
    "make_influence_model",
    "load_factory",
    "RunConfig",
    "run_pipeline",
]

#: Exit code for errors the user can act on (bad input); 1 is for internal errors.
USAGE_EXIT = 2

#: Group array names.
INFLUENCES = "influences"
SELF_INFLUENCES = "self_influences"
TOP_ARRAYS = ("top_helpful_indices", "top_helpful_values", "top_harmful_indices", "top_harmful_values")


# ====================================================================== factories
def load_factory(spec: str, flag: str) -> Callable:
    """Import ``package.module:function`` (the current directory is importable).

    Raises:
        UsageError: malformed spec, module not importable, no such attribute, not callable.
    """
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise UsageError(f"{flag}: expected package.module:function; got {spec!r}.")
    module_name, attr = (s.strip() for s in spec.split(":"))
    if not module_name or not attr:
        raise UsageError(f"{flag}: expected package.module:function; got {spec!r}.")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # the user's module: any failure on import is theirs to fix
        raise UsageError(
            f"{flag}: cannot import module {module_name!r} ({type(error).__name__}: {error})."
        ) from error
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise UsageError(f"{flag}: module {module_name!r} has no attribute {attr!r}.")
        target = getattr(target, part)
    if not callable(target):
        raise UsageError(f"{flag}: {spec!r} is not callable (it is a {type(target).__name__}).")
    return target


def _call_factory(spec: str, flag: str) -> Any:
    factory = load_factory(spec, flag)
    try:
        return factory()
    except Exception as error:
        raise UsageError(f"{flag}: {spec}() raised {type(error).__name__}: {error}") from error


def load_model(spec: str):
    """Call the ``--model`` factory; it must return ``(torch.nn.Module, loss callable)``."""
    from torch import nn

    result = _call_factory(spec, "--model")
    if not (isinstance(result, tuple) and len(result) == 2):
        raise UsageError(f"--model: {spec}() must return a tuple (model, loss); got {_describe(result)}.")
    model, loss = result
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"--model: {spec}() returned a model of type {type(model).__name__}, not a torch.nn.Module."
        )
    if not callable(loss):
        raise UsageError(
            f"--model: {spec}() returned a loss of type {type(loss).__name__}, which is not callable."
        )
    return model, loss


def load_data(spec: str):
    """Call the ``--data`` factory; it must return ``(train_dataset, test_dataset)``,
    torch ``Dataset``s with a length."""
    from torch.utils.data import Dataset

    result = _call_factory(spec, "--data")
    if not (isinstance(result, tuple) and len(result) == 2):
        raise UsageError(
            f"--data: {spec}() must return a tuple (train_dataset, test_dataset); got {_describe(result)}."
        )
    for name, ds in zip(("train_dataset", "test_dataset"), result):
        if not isinstance(ds, Dataset) or not hasattr(ds, "__len__"):
            raise UsageError(
                f"--data: {spec}() returned a {name} of type {type(ds).__name__}; expected a "
                "torch.utils.data.Dataset with __len__ (e.g. TensorDataset)."
            )
        if len(ds) == 0:
            raise UsageError(f"--data: {spec}() returned an empty {name}.")
    shapes = []
    for name, ds in zip(("train_dataset", "test_dataset"), result):
        try:
            item = ds[0]
        except Exception as error:
            raise UsageError(f"--data: {name}[0] raised {type(error).__name__}: {error}") from error
        if not isinstance(item, (tuple, list)) or len(item) < 2 or not hasattr(item[0], "shape"):
            raise UsageError(
                f"--data: the items of {name} must be (x, y) pairs of tensors; item 0 is {_describe(item)}."
            )
        shapes.append(tuple(item[0].shape))
    if shapes[0] != shapes[1]:
        raise UsageError(
            f"--data: training inputs have shape {shapes[0]} but test inputs {shapes[1]}; they must match."
        )
    return result


def _describe(value: Any) -> str:
    if isinstance(value, tuple):
        return f"a tuple of {len(value)} ({', '.join(type(v).__name__ for v in value)})"
    return f"a {type(value).__name__}"


# ====================================================================== stores
def _join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def _store(url: str):
    from .array import open_zarr_store

    try:
        return open_zarr_store(url)
    except (TypeError, ValueError) as error:
        raise UsageError(f"--out: {error}") from error
    except Exception as error:  # e.g. an fsspec protocol that is not installed
        raise UsageError(f"cannot open the store {url!r}: {type(error).__name__}: {error}") from error


def _is_empty(store) -> bool:
    from zarr.core.sync import sync

    if hasattr(store, "root"):
        root = store.root
        if root.is_file():
            raise UsageError(f"{root} is a file, not a directory for a zarr store.")
        return not root.exists() or not any(root.iterdir())
    return sync(store.is_empty(""))


def prepare_group(url: str, overwrite: bool, resume: bool, attributes: dict[str, Any]):
    """Create (or, with ``resume``, reopen) the zarr group at ``url``.

    Raises:
        UsageError: the store holds data and neither overwrite nor resume is set; both
            are set; resume against something that is not an infscale group, or one
            written with another configuration.
    """
    import zarr
    from zarr.core.sync import sync

    from .array import _jsonable

    if overwrite and resume:
        raise UsageError("--overwrite and --resume exclude each other; choose one.")
    store = _store(url)
    try:
        empty = _is_empty(store)
    except UsageError:
        raise
    except Exception as error:
        raise UsageError(f"--out: cannot access {url!r}: {type(error).__name__}: {error}") from error
    attributes = _jsonable(attributes)
    if not empty:
        if resume:
            try:
                group = zarr.open_group(store=store, mode="r+")
            except Exception as error:
                raise UsageError(
                    f"--resume: {url!r} holds data that is not an infscale store ({error}); "
                    "use --overwrite or another --out."
                ) from error
            stored = {k: group.attrs.get(k) for k in attributes}
            diff = [k for k in attributes if k not in _RESUME_FREE and stored[k] != attributes[k]]
            if diff:
                detail = "; ".join(f"{k}: stored {stored[k]!r}, now {attributes[k]!r}" for k in diff)
                raise UsageError(
                    f"--resume: {url!r} was written with another configuration ({detail}); "
                    "use --overwrite or another --out."
                )
            group.attrs.update({k: attributes[k] for k in _RESUME_FREE if k in attributes})
            return group
        if not overwrite:
            raise UsageError(
                f"--out: {url!r} already exists; pass --overwrite to replace it or --resume to "
                "finish an interrupted run."
            )
        sync(store.delete_dir(""))
    try:
        return zarr.open_group(store=store, mode="w", attributes=attributes)
    except Exception as error:
        raise UsageError(
            f"--out: cannot write a zarr store at {url!r}: {type(error).__name__}: {error}"
        ) from error


#: Configuration keys that may change between a run and its resumption.
_RESUME_FREE = ("scheduler", "device", "infscale_version", "top_k", "self_influences")


def open_results(url: str):
    """(group or None, influences array) of a store written by ``run``/``demo``, or of a
    bare array written by ``to_zarr``.

    Raises:
        UsageError: nothing readable at ``url``.
    """
    import zarr

    store = _store(url)
    try:
        empty = _is_empty(store)
    except UsageError:
        raise
    except Exception as error:
        raise UsageError(f"cannot access {url!r}: {type(error).__name__}: {error}") from error
    if empty:
        raise UsageError(f"no zarr store at {url!r}.")
    try:
        node = zarr.open(store=store, mode="r")
    except Exception as error:
        raise UsageError(f"{url!r} is not a zarr store ({type(error).__name__}: {error}).") from error
    if isinstance(node, zarr.Group):
        if INFLUENCES not in node:
            raise UsageError(f"{url!r} is a zarr group without an {INFLUENCES!r} array; nothing to show.")
        return node, node[INFLUENCES]
    return None, node


def _completed(array) -> set[str]:
    from .array import COMPLETE_PREFIX

    store, path = array.store, array.path

    async def collect():
        prefix = (path + "/" if path else "") + COMPLETE_PREFIX
        return [k[len(prefix) :] async for k in store.list_prefix(prefix)]

    from zarr.core.sync import sync

    return set(sync(collect()))


def completeness(array) -> tuple[int, int, set[str] | None]:
    """(complete blocks, all blocks, keys of complete blocks) of an array written by infscale.

    Arrays written by other means (no infscale attributes) count as complete, with keys None.
    """
    import math

    grid = [math.ceil(s / c) for s, c in zip(array.shape, array.chunks)]
    ndim = 2 if "n_train" in array.attrs else 1
    total = math.prod(grid[:ndim]) if array.shape else 1
    if "infscale_version" not in array.attrs and "n_test" not in array.attrs and "n" not in array.attrs:
        return total, total, None
    done = _completed(array)
    return len(done), total, done


# ====================================================================== pipeline
@dataclass
class RunConfig:
    """Everything ``infscale run`` needs (from flags and/or a TOML file)."""

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


def parse_scheduler(text: str) -> tuple[str, Any]:
    """``sync`` → ("sync", None); ``local:N`` → ("local", N); ``tcp://HOST:PORT`` → ("tcp", address).

    Raises:
        UsageError: anything else.
    """
    text = str(text).strip()
    if text in ("sync", "synchronous"):
        return "sync", None
    if text.startswith("local:"):
        try:
            n = int(text.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise UsageError(f"--scheduler: local:N needs a worker count N ≥ 1; got {text!r}.")
        return "local", n
    if text.startswith(("tcp://", "tls://")):
        return "tcp", text
    raise UsageError(f"--scheduler: expected sync, local:N or tcp://HOST:PORT; got {text!r}.")


@contextlib.contextmanager
def dask_client(kind: str, arg: Any, timeout: float = 10.0) -> Iterator[Any]:
    """A distributed.Client: a LocalCluster of ``arg`` single-threaded worker processes with
    scheduler and dashboard bound to 127.0.0.1 (``kind="local"``), or a connection to the
    scheduler at ``arg`` (``kind="tcp"``).

    Raises:
        UsageError: the scheduler does not answer within ``timeout`` seconds.
    """
    from distributed import Client, LocalCluster

    if kind == "local":
        cluster = LocalCluster(
            n_workers=arg,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            scheduler_port=0,
            dashboard_address="127.0.0.1:0",
            worker_dashboard_address="127.0.0.1:0",
        )
        client = Client(cluster)
        try:
            yield client
        finally:
            client.close()
            cluster.close()
        return
    try:
        client = Client(arg, timeout=timeout)
    except (OSError, TimeoutError) as error:
        raise UsageError(f"--scheduler: the Dask scheduler at {arg} does not answer ({error}).") from error
    try:
        yield client
    finally:
        client.close()


def compute_into_group(
    infl_model,
    train_dataset,
    test_dataset,
    url: str,
    *,
    mode: str = "up",
    batch_size: int = 64,
    test_batch_size: int | None = None,
    device: str = "cpu",
    resume: bool = False,
    scheduler: str = "sync",
    connect_timeout: float = 10.0,
    client: Any = None,
    self_influences: bool = False,
    top_k: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> None:
    """Write the influences of the fitted ``infl_model`` (and optionally the self-influences
    and the top-k) into the group at ``url`` (made by ``prepare_group``).

    With ``scheduler="sync"`` the blocks go through ``SequentialInfluenceCalculator.to_zarr``;
    with ``local:N`` or ``tcp://...`` through ``DaskInfluenceCalculator``, each block gathered
    and written by this process (so only this process needs access to the store), with the
    same completion markers, so that a run can be resumed under any scheduler.
    """
    from torch.utils.data import DataLoader

    from .torch.util import TorchNumpyConverter

    converter = TorchNumpyConverter(device)
    test_batch_size = test_batch_size or batch_size
    train_loader = DataLoader(train_dataset, batch_size=batch_size, shuffle=False)
    test_loader = DataLoader(test_dataset, batch_size=test_batch_size, shuffle=False)
    kind, arg = parse_scheduler(scheduler)
    infl_url = _join(url, INFLUENCES)
    self_url = _join(url, SELF_INFLUENCES)
    if kind == "sync":
        from .calculator import SequentialInfluenceCalculator

        calc = SequentialInfluenceCalculator(infl_model)
        log(f"computing influences → {infl_url}")
        _store_call(
            lambda: calc.influences(test_loader, train_loader, mode=mode).to_zarr(
                infl_url, converter, resume=resume, progress=progress
            )
        )
        if self_influences:
            log(f"computing self-influences → {self_url}")
            _store_call(
                lambda: calc.self_influences(train_loader).to_zarr(
                    self_url, converter, resume=resume, progress=progress
                )
            )
    else:
        with contextlib.nullcontext(client) if client else dask_client(kind, arg, connect_timeout) as client:
            where = f"scheduler {client.scheduler.address}, dashboard {client.dashboard_link}"
            log(f"computing influences on Dask ({scheduler}: {where}) → {infl_url}")
            _dask_to_zarr(
                infl_model, client, train_dataset, test_dataset, infl_url, mode, batch_size, test_batch_size,
                resume, progress, self_url if self_influences else None, device,
            )  # fmt: skip
    if top_k:
        log(f"top-{top_k} helpful and harmful training points per test point → {url}/top_*")
        write_top_k(url, top_k, progress=progress)


def _store_call(fn: Callable[[], Any]) -> Any:
    """Run a zarr write; store problems the user can fix become UsageError."""
    from .array import StoreExistsError, StoreMismatchError

    try:
        return fn()
    except (StoreExistsError, StoreMismatchError) as error:
        raise UsageError(str(error)) from error
    except OSError as error:
        raise UsageError(f"cannot write the store: {error}") from error


def _dask_to_zarr(
    infl_model, client, train_dataset, test_dataset, infl_url, mode, batch_size, test_batch_size,
    resume, progress, self_url, device="cpu",
) -> None:  # fmt: skip
    from .array import BlockSource, ChunkSource, LazyChunkSequence, NestedLazyChunkSequence
    from .parallel import DaskInfluenceCalculator
    from .torch.util import TorchNumpyConverter, torch_dataset_to_dask_array

    converter = TorchNumpyConverter(device)
    calc = DaskInfluenceCalculator(infl_model, converter=converter, client=client)
    dtype = calc.dtype
    x, y = torch_dataset_to_dask_array(train_dataset, chunk_size=batch_size, resulting_dtype=dtype)
    x_test, y_test = torch_dataset_to_dask_array(
        test_dataset, chunk_size=test_batch_size, resulting_dtype=dtype
    )

    class _DaskBlocks(BlockSource):
        def __init__(self, array):
            self.array = array
            self.feature_shape = tuple(array.shape[2:])
            self.dtype = dtype or array.dtype

        def row_sizes(self):
            return list(self.array.chunks[0])

        def col_sizes(self):
            return list(self.array.chunks[1])

        def iter_blocks(self, todo=None, row_major=False):
            yield from _gather_blocks(client, self.array, todo, 2)

        def attributes(self):
            return _calculator_attributes(infl_model, mode, "influences")

    class _DaskChunks(ChunkSource):
        def __init__(self, array):
            self.array = array
            self.feature_shape = tuple(array.shape[1:])
            self.dtype = dtype or array.dtype

        def chunk_sizes(self):
            return list(self.array.chunks[0])

        def iter_chunks(self, todo=None):
            for (i,), block in _gather_blocks(client, self.array, todo, 1):
                yield i, block

        def attributes(self):
            return _calculator_attributes(infl_model, "up", "self_influences")

    influences = calc.influences(x_test, y_test, x, y, mode=mode)
    nested = NestedLazyChunkSequence(_DaskBlocks(influences))
    _store_call(lambda: nested.to_zarr(infl_url, _Identity(), resume=resume, progress=progress))
    if self_url:
        flat = LazyChunkSequence(_DaskChunks(calc.self_influences(x, y)))
        _store_call(lambda: flat.to_zarr(self_url, _Identity(), resume=resume, progress=progress))


class _Identity:
    """A converter for blocks that are numpy arrays already."""

    def to_numpy(self, x):
        return x


def _gather_blocks(client, array, todo, ndim):
    """Compute the blocks of a dask array (those with ``todo(*index)``) on the cluster and
    yield ``(index..., block)`` as they finish, one gathered at a time."""
    import itertools

    from distributed import as_completed

    delayed = array.to_delayed()
    indices = [
        index
        for index in itertools.product(*(range(n) for n in delayed.shape[:ndim]))
        if todo is None or todo(*index)
    ]
    tasks = [delayed[index + (0,) * (delayed.ndim - ndim)] for index in indices]
    futures = dict(zip(client.compute(tasks), indices)) if tasks else {}
    for future in as_completed(list(futures)):
        index = futures.pop(future)
        block = future.result()
        future.release()
        yield (*index, block) if ndim == 2 else (index, block)


def _calculator_attributes(infl_model, mode: str, quantity: str) -> dict[str, Any]:
    """The attributes ``SequentialInfluenceCalculator`` records, so that a store written under
    one scheduler can be resumed under another."""
    from .base import InfluenceMode
    from .calculator import SequentialInfluenceCalculator

    return dict(SequentialInfluenceCalculator(infl_model)._attributes(quantity, InfluenceMode.parse(mode)))


def write_top_k(url: str, k: int, progress: bool = True) -> None:
    """Read the stored influences block by block and store the k most helpful and harmful
    training points of every test point next to them (memory O(n_test·k + one block)).

    Raises:
        UsageError: the store is not complete, or holds perturbation-mode influences.
    """
    import numpy as np
    import zarr
    from tqdm.auto import tqdm

    from .array import TopKAggregator

    group, array = open_results(url)
    if array.ndim != 2:
        raise UsageError(
            "--top-k needs mode 'up' (a 2-D influence matrix); perturbation mode has no ranking."
        )
    done, total, _ = completeness(array)
    if done < total:
        raise UsageError(f"--top-k: {url!r} is incomplete ({done} of {total} blocks); rerun with --resume.")
    n_test, n_train = array.shape
    bt, br = array.chunks
    agg = TopKAggregator(k)
    agg.reset()
    rows, cols = range(0, n_test, bt), range(0, n_train, br)
    with tqdm(total=len(rows) * len(cols), unit="block", desc="top-k", disable=not progress) as bar:
        for i, r in enumerate(rows):
            for j, c in enumerate(cols):
                agg.add_block(i, j, r, c, array[r : r + bt, c : c + br])
                bar.update(1)
    result = agg.result()
    out = zarr.open_group(store=_store(url), mode="r+")
    for name in TOP_ARRAYS:
        value = np.asarray(getattr(result, name[len("top_") :]))
        if name.endswith("indices"):
            value = value.astype(np.int64)
        out.create_array(
            name, shape=value.shape, chunks=(bt, value.shape[1]), dtype=value.dtype, overwrite=True
        )
        out[name][...] = value
        out[name].attrs.update({"k": int(result.k)})
    out.attrs["top_k"] = int(result.k)


def run_pipeline(config: RunConfig, log: Callable[[str], None] = print) -> None:
    """``infscale run``: load the factories, fit the method, write the store."""
    import infscale

    from .base import InfluenceMode

    if not config.model:
        raise UsageError("--model is required (package.module:factory returning (model, loss)).")
    if not config.data:
        raise UsageError(
            "--data is required (package.module:factory returning (train_dataset, test_dataset))."
        )
    if not config.out:
        raise UsageError("--out is required (a path or URL for the zarr store).")
    try:
        mode = InfluenceMode.parse(config.mode).value
    except ValueError as error:
        raise UsageError(f"--mode: {error}") from error
    if config.top_k is not None and (config.top_k < 1):
        raise UsageError(f"--top-k: expected an integer ≥ 1; got {config.top_k}.")
    if config.top_k and mode != "up":
        raise UsageError("--top-k needs --mode up; perturbation influences have no ranking.")
    if config.batch_size < 1:
        raise UsageError(f"--batch-size: expected an integer ≥ 1; got {config.batch_size}.")
    parse_scheduler(config.scheduler)  # fail early
    import torch

    try:
        device = torch.device(config.device)
    except RuntimeError as error:
        raise UsageError(f"--device: {error}") from error
    short, cls = resolve_method(config.method)
    model, loss = load_model(config.model)
    train_ds, test_ds = load_data(config.data)
    model = model.to(device).eval()
    infl_model = make_influence_model(short, model, loss, config.params)
    attributes = {
        "model": config.model,
        "data": config.data,
        "method": cls.__name__,
        "params": config.params,
        "mode": mode,
        "batch_size": config.batch_size,
        "n_train": len(train_ds),
        "n_test": len(test_ds),
        "scheduler": config.scheduler,
        "device": str(device),
        "top_k": config.top_k,
        "self_influences": config.self_influences,
        "infscale_version": infscale.__version__,
    }
    from torch.utils.data import DataLoader

    kind, arg = parse_scheduler(config.scheduler)
    # connect (or start the local cluster) before touching the store or fitting: an unreachable
    # scheduler is reported at once and leaves nothing behind
    with (
        contextlib.nullcontext()
        if kind == "sync"
        else dask_client(kind, arg, config.connect_timeout) as client
    ):
        prepare_group(config.out, config.overwrite, config.resume, attributes)
        log(f"fitting {cls.__name__}({format_params(config.params)}) on {len(train_ds)} training points")
        _fit(infl_model, DataLoader(train_ds, batch_size=config.batch_size, shuffle=False))
        compute_into_group(
            infl_model, train_ds, test_ds, config.out, mode=mode, batch_size=config.batch_size,
            device=str(device), resume=config.resume, scheduler=config.scheduler, client=client,
            self_influences=config.self_influences, top_k=config.top_k, progress=config.progress, log=log,
        )  # fmt: skip
    log(f"done: {config.out} (infscale info {config.out}; infscale top {config.out} --test 0)")


def _fit(infl_model, loader) -> None:
    """Fit; errors about the curvature (not positive definite, ...) are the user's to fix."""
    try:
        infl_model.fit(loader)
    except ValueError as error:
        if type(error).__name__ in ("NotPositiveDefiniteError",) or "hessian_regularization" in str(error):
            raise UsageError(str(error)) from error
        raise


# ====================================================================== config files
def _load_toml(path: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise UsageError(
                f"--config {path}: reading TOML on Python 3.10 needs the tomli package (pip install tomli)."
            ) from None
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as error:
        raise UsageError(f"--config: cannot read {path!r}: {error.strerror or error}.") from error
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"--config: {path!r} is not valid TOML: {error}.") from error


_CONFIG_KEYS = {
    "model": str, "data": str, "method": str, "params": dict, "mode": str, "batch_size": int, "device": str,
    "out": str, "overwrite": bool, "resume": bool, "top_k": int, "self_influences": bool, "scheduler": str,
    "connect_timeout": (int, float), "progress": bool,
}  # fmt: skip


def build_config(args: argparse.Namespace) -> RunConfig:
    """Flags over the TOML file (``--config``) over the defaults."""
    values: dict[str, Any] = {}
    if args.config:
        data = _load_toml(args.config)
        data = data.get("infscale", data)  # allow a [infscale] table or top-level keys
        for key, value in data.items():
            norm = key.replace("-", "_")
            if norm not in _CONFIG_KEYS:
                raise UsageError(
                    f"--config {args.config}: unknown key {key!r}; known keys: {', '.join(_CONFIG_KEYS)}."
                )
            expected = _CONFIG_KEYS[norm]
            if not isinstance(value, expected) or (
                expected in (int, (int, float)) and isinstance(value, bool)
            ):
                kind = "number" if isinstance(expected, tuple) else expected.__name__
                raise UsageError(f"--config {args.config}: {key} must be a {kind}; got {value!r}.")
            values[norm] = value
    for key in _CONFIG_KEYS:
        flag = getattr(args, key, None)
        if key == "params":
            continue
        if flag is not None:
            values[key] = flag
    params = dict(values.get("params", {}))
    params.update(parse_params(args.param))
    values["params"] = params
    return RunConfig(**values)


# ====================================================================== commands
def cmd_run(args: argparse.Namespace) -> int:
    config = build_config(args)
    run_pipeline(config, log=_log)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers: expected an integer ≥ 1; got {args.workers}.")
    run_demo(
        out=args.out,
        method=args.method,
        params=parse_params(args.param),
        workers=args.workers,
        size=args.size,
        progress=not args.no_progress,
    )
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    import numpy as np

    group, array = open_results(args.store)
    if array.ndim != 2:
        raise UsageError(
            f"{args.store!r} holds perturbation-mode influences (shape {array.shape}); top needs mode up."
        )
    n_test, n_train = array.shape
    i = args.test
    if not 0 <= i < n_test:
        raise UsageError(
            f"--test: index {i} is out of range; the store has {n_test} test points (0..{n_test - 1})."
        )
    if args.k < 1:
        raise UsageError(f"-k: expected an integer ≥ 1; got {args.k}.")
    done, total, keys = completeness(array)
    if keys is not None:
        r = i // array.chunks[0]
        n_cols = -(-n_train // array.chunks[1])
        missing = [j for j in range(n_cols) if f"{r}.{j}" not in keys]
        if missing:
            raise UsageError(
                f"row {i} is not complete in {args.store!r}: {len(missing)} of {n_cols} blocks missing; "
                "finish the run with infscale run ... --resume."
            )
    row = np.asarray(array[i, :], dtype=np.float64)  # reads only the chunks of this row
    k = min(args.k, n_train)
    order = np.argsort(-row, kind="stable")
    helpful, harmful = order[:k], order[::-1][:k]
    attrs = dict(array.attrs)
    print(
        f"test point {i} of {n_test} in {args.store} ({attrs.get('method', 'unknown method')}, "
        f"mode {attrs.get('mode', 'up')}, {n_train} training points)"
    )
    print("sign: positive = up-weighting the training point lowers this test loss (it helps);")
    print(f"      removing training point j changes this test loss by about +influence/{n_train}.")
    for title, idx in (("most helpful", helpful), ("most harmful", harmful)):
        print(f"{title}:")
        print(f"  {'rank':>4}  {'train index':>11}  {'influence':>12}")
        for rank, j in enumerate(idx, 1):
            print(f"  {rank:>4}  {int(j):>11}  {row[j]:>+12.5g}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    group, array = open_results(args.store)
    print(f"store: {args.store}")
    arrays = [(INFLUENCES if group is not None else "(root array)", array)]
    if group is not None:
        for name in (SELF_INFLUENCES, *TOP_ARRAYS):
            if name in group:
                arrays.append((name, group[name]))
    for name, arr in arrays:
        line = f"{name}: shape {tuple(arr.shape)}, chunks {tuple(arr.chunks)}, dtype {arr.dtype}"
        if name in (INFLUENCES, SELF_INFLUENCES, "(root array)"):
            done, total, keys = completeness(arr)
            state = "complete" if done >= total else "INCOMPLETE (finish with --resume)"
            line += f"; {done} of {total} blocks done ({100.0 * done / max(total, 1):.0f}%), {state}"
        print(line)
    print("attributes:")
    for key, value in dict(array.attrs).items():
        print(f"  {key}: {_short(value)}")
    if group is not None and group.attrs:
        print("run configuration:")
        for key, value in dict(group.attrs).items():
            print(f"  {key}: {_short(value)}")
    return 0


def _short(value: Any, limit: int = 12) -> str:
    """JSON of an attribute, with long lists cut to their first items and their length."""
    if isinstance(value, list) and len(value) > limit:
        head = json.dumps(value[:limit], default=str)[:-1]
        return f"{head}, ... ({len(value)} values)]"
    return json.dumps(value, default=str, ensure_ascii=False)


def _log(message: str) -> None:
    print(message, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infscale",
        description="Influence functions for PyTorch models at any scale.",
        epilog="Add --debug to any command to see the traceback of an error. Docs: docs/cli.md",
    )
    parser.add_argument("--version", action="version", version=f"infscale {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,run,top,info}")
    sub.required = True

    demo = sub.add_parser(
        "demo",
        help="train a digits MLP with 10%% flipped labels and show what influence finds",
        description="Train a small MLP on scikit-learn's digits after flipping 10%% of the training "
        "labels, compute influences into DIR/influences.zarr, print the findings and draw DIR/report.png.",
    )
    demo.add_argument("--out", default="demo-output", help="output directory (default: demo-output)")
    demo.add_argument(
        "--method", default="direct", help=f"influence method: {', '.join(METHODS)} (default: direct)"
    )
    demo.add_argument("--param", action="append", metavar="KEY=VALUE", help="method parameter (repeatable)")
    demo.add_argument(
        "--workers", type=int, default=None, help="use a local Dask cluster of N worker processes"
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument("--size", choices=("full", "small", "tiny"), default="full", help=argparse.SUPPRESS)
    demo.set_defaults(func=cmd_demo)

    run = sub.add_parser(
        "run",
        help="compute influences of your model on your data into a zarr store",
        description="Compute test × train influences of a user model into a zarr store. Flags override "
        "the values of --config FILE (TOML; keys as the flags with underscores, [params] table).",
    )
    run.add_argument("--config", metavar="FILE", help="TOML file with the settings below")
    run.add_argument("--model", metavar="PKG.MOD:FACTORY", help="factory returning (model, loss)")
    run.add_argument(
        "--data", metavar="PKG.MOD:FACTORY", help="factory returning (train_dataset, test_dataset)"
    )
    run.add_argument("--method", help=f"influence method: {', '.join(METHODS)} (default: cg)")
    run.add_argument("--param", action="append", metavar="KEY=VALUE", help="method parameter (repeatable)")
    run.add_argument("--mode", choices=("up", "perturbation"), help="influence mode (default: up)")
    run.add_argument(
        "--batch-size", type=int, metavar="N", help="rows per batch and per zarr chunk (default: 64)"
    )
    run.add_argument("--device", help="torch device (default: cpu)")
    run.add_argument("--out", metavar="PATH_OR_URL", help="zarr store to write (path, file://, s3://, ...)")
    run.add_argument("--overwrite", action="store_true", default=None, help="replace an existing store")
    run.add_argument("--resume", action="store_true", default=None, help="finish an interrupted run")
    run.add_argument(
        "--top-k", type=int, metavar="K", help="also store the K most helpful/harmful per test point"
    )
    run.add_argument(
        "--self-influences",
        action="store_true",
        default=None,
        help="also store every training point's self-influence",
    )
    run.add_argument(
        "--connect-timeout", type=float, metavar="SECONDS", help="wait this long for a tcp:// scheduler (10)"
    )
    run.add_argument("--scheduler", help="sync (default), local:N, or tcp://HOST:PORT of a Dask scheduler")
    run.add_argument(
        "--no-progress", dest="progress", action="store_false", default=None, help="no progress bars"
    )
    run.set_defaults(func=cmd_run)

    top = sub.add_parser("top", help="most helpful and harmful training points of one test point")
    top.add_argument("store", metavar="STORE", help="zarr store written by infscale run/demo (path or URL)")
    top.add_argument("--test", type=int, required=True, metavar="I", help="test point index")
    top.add_argument("-k", type=int, default=10, help="how many of each (default: 10)")
    top.set_defaults(func=cmd_top)

    info = sub.add_parser("info", help="shape, chunks, completeness and attributes of a store")
    info.add_argument("store", metavar="STORE", help="zarr store (path or URL)")
    info.set_defaults(func=cmd_info)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


class _Never(Exception):
    pass


def _actionable_errors() -> tuple[type[BaseException], ...]:
    """Library errors whose cause the user can fix (a λ too small for the curvature, a diverging
    LiSSA, Dask workers with several threads): reported like usage errors."""
    found: list[type[BaseException]] = []
    for module, name in (
        ("infscale.torch.direct", "NotPositiveDefiniteError"),
        ("infscale.torch.lissa", "LissaDivergenceError"),
        ("infscale.parallel", "ThreadSafetyViolationError"),
    ):
        if module in sys.modules:  # only what was used can have raised
            cls = getattr(sys.modules[module], name, None)
            if isinstance(cls, type):
                found.append(cls)
    return tuple(found) or (_Never,)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``infscale`` command. Returns the exit code: 0 success, 2 an error
    the user can act on (one line on stderr), 1 an internal error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        return int(exit_.code or 0)
    try:
        return int(args.func(args) or 0)
    except UsageError as error:
        if debug:
            traceback.print_exc()
        print(f"infscale {args.command}: error: {error}", file=sys.stderr)
        return USAGE_EXIT
    except _actionable_errors() as error:  # raised by the library; the user can fix the cause
        if debug:
            traceback.print_exc()
        print(f"infscale {args.command}: error: {type(error).__name__}: {error}", file=sys.stderr)
        return USAGE_EXIT
    except KeyboardInterrupt:
        print(f"infscale {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if debug:
            traceback.print_exc()
        print(
            f"infscale {args.command}: internal error: {type(error).__name__}: {error} "
            "(rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
