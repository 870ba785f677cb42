"""The results group that ``infscale run`` and ``infscale demo`` write, and how to read it back.

Layout (a zarr v3 group at ``OUT``)::

    OUT/                     group; attributes: the run's configuration
    OUT/influences           (n_test, n_train) float array, chunks (test batch, train batch);
                             attributes: method, hyperparameters, mode, sign convention, version
    OUT/self_influences      (n_train,)  (with self-influences)
    OUT/top_helpful_indices  (n_test, k) int64  (with top-k)
    OUT/top_helpful_values   (n_test, k)        largest influence first
    OUT/top_harmful_indices  (n_test, k) int64
    OUT/top_harmful_values   (n_test, k)        most negative first

Each influence array inside is written by ``to_zarr`` (or ``infscale.parallel.dask_to_zarr``) at
``OUT/<name>`` with its own completion markers; each top-k array carries the checksum of its
values, written last. Every zarr call goes through ``infscale.store``.

What ``prepare_group`` promises (see docs/cli.md, "Guarantees"):

- it never deletes a store infscale did not write (a group or array whose attributes name an
  infscale version, holding nothing but these arrays' metadata, chunks and markers);
- ``overwrite`` replaces such a store only when the new run's first block is ready
  (``PreparedGroup.before_first_write``), so a run that fails before leaves it as it was;
- a store infscale wrote that holds no finished block (a failed run's leftover) is reused
  without ``overwrite``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import StoreExistsError, StoreMismatchError, UsageError
from ..store import (
    array_completeness,
    attribute_differences,
    clear_store,
    create_group,
    holds_finished_blocks,
    open_group,
    open_node,
    open_zarr_store,
    ownership_problem,
    remove_temporary_keys,
    store_is_empty,
    write_group_array,
)

__all__ = [
    "INFLUENCES",
    "SELF_INFLUENCES",
    "TOP_ARRAYS",
    "RESUME_FREE",
    "ARRAYS",
    "array_url",
    "PreparedGroup",
    "prepare_group",
    "open_results",
    "completeness",
    "missing_row_blocks",
    "write_top_k",
]

#: Names of the arrays in the group.
INFLUENCES = "influences"
SELF_INFLUENCES = "self_influences"
TOP_ARRAYS = ("top_helpful_indices", "top_helpful_values", "top_harmful_indices", "top_harmful_values")
#: Every array the group may hold.
ARRAYS = (INFLUENCES, SELF_INFLUENCES, *TOP_ARRAYS)

#: Configuration keys that may change between a run and its resumption.
RESUME_FREE = ("scheduler", "device", "infscale_version", "top_k", "self_influences")


def array_url(url: str, name: str) -> str:
    """The path or URL of the array ``name`` inside the group at ``url``."""
    return str(url).rstrip("/") + "/" + name


def _open_store(url: str, flag: str):
    prefix = f"{flag}: " if flag else ""
    try:
        return open_zarr_store(url)
    except (TypeError, ValueError) as error:
        raise UsageError(f"{prefix}{error}") from error
    except Exception as error:  # e.g. an fsspec protocol that is not installed
        raise UsageError(f"{prefix}cannot open the store {url!r}: {type(error).__name__}: {error}") from error


def _is_empty(store, url: str, flag: str) -> bool:
    prefix = f"{flag}: " if flag else ""
    try:
        return store_is_empty(store, url)
    except NotADirectoryError as error:
        raise UsageError(f"{prefix}{error}") from error
    except Exception as error:
        raise UsageError(f"{prefix}cannot access {url!r}: {type(error).__name__}: {error}") from error


@dataclass
class PreparedGroup:
    """The results group of a run, as ``prepare_group`` left it.

    Attributes:
        url: where the group is.
        attributes: the run's configuration (the group's attributes).
        replace_pending: an old store infscale wrote is still at ``url`` (``overwrite``): the
            writer of the first array calls ``before_first_write`` when the new run's first block
            is ready, which replaces it; until then it is left exactly as it was.
    """

    url: str
    attributes: dict[str, Any] = field(default_factory=dict)
    replace_pending: bool = False

    def before_first_write(self) -> None:
        """Replace the old store by a new group with ``attributes`` (once; nothing to do when no
        replacement is pending). Its ownership is checked again first.

        Raises:
            StoreExistsError: since ``prepare_group``, someone put files infscale did not write there.
        """
        if not self.replace_pending:
            return
        store = _open_store(self.url, "--out")
        _check_ownership(store, self.url)
        clear_store(store)
        _create(store, self.url, self.attributes)
        self.replace_pending = False

    def open(self, writable: bool = False):
        """The zarr group at ``url`` (still the old one while a replacement is pending)."""
        return open_group(_open_store(self.url, "--out"), writable=writable)


def _check_ownership(store, url: str) -> None:
    problem = ownership_problem(store, ARRAYS)
    if problem is not None:
        raise StoreExistsError(
            f"--out: {url!r} holds {problem}; infscale only writes into, resumes or replaces stores it "
            "wrote itself. Choose another --out. Nothing was changed."
        )


def _create(store, url: str, attributes: dict[str, Any]):
    try:
        return create_group(store, attributes)
    except Exception as error:
        raise UsageError(
            f"--out: cannot write a zarr store at {url!r}: {type(error).__name__}: {error}"
        ) from error


def prepare_group(url: str, overwrite: bool, resume: bool, attributes: dict[str, Any]) -> PreparedGroup:
    """Make ``url`` ready for a run's results: create the group with the run's configuration as
    its attributes, reopen the group an interrupted run left there (``resume``), or plan the
    replacement of an old one (``overwrite``).

    Only stores infscale wrote are ever written into, resumed or replaced (see
    ``infscale.store.ownership_problem``); one of them holding no finished block (a failed run's
    leftover) is replaced now, without ``overwrite``. With ``overwrite``, a store holding results
    is left untouched here: ``PreparedGroup.before_first_write`` replaces it once the new run's
    first block is ready.

    Args:
        url: a local path or any fsspec URL.
        overwrite: replace a store of results infscale wrote at ``url``.
        resume: reopen it instead; the keys of ``attributes`` other than ``RESUME_FREE`` must
            equal the stored ones (those in ``RESUME_FREE`` are updated).
        attributes: the run configuration (JSON-able values); ``infscale_version`` is added
            unless given.

    Raises:
        UsageError: both ``overwrite`` and ``resume``; the store cannot be opened or written.
        StoreExistsError: ``url`` holds data infscale did not write (files, another tool's zarr
            store, an infscale store with files added), or results and neither flag is set.
        StoreMismatchError: ``resume`` against results written with another configuration, or a
            bare array instead of a results group.
    """
    from .._version import __version__

    if overwrite and resume:
        raise UsageError("--overwrite and --resume exclude each other; choose one.")
    attributes = {"infscale_version": __version__, **dict(attributes)}  # how infscale knows its stores
    store = _open_store(url, "--out")
    if not _is_empty(store, url, "--out"):
        _check_ownership(store, url)
        if holds_finished_blocks(store, ARRAYS):
            if resume:
                reopened = _reopen(store, url, attributes)
                remove_temporary_keys(store)  # a kill mid-write leaves zarr's *.partial files
                return PreparedGroup(url, reopened)
            if not overwrite:
                raise StoreExistsError(
                    f"--out: {url!r} already exists; pass --overwrite to replace it or --resume to "
                    "finish an interrupted run."
                )
            return PreparedGroup(url, attributes, replace_pending=True)
        clear_store(store)  # a failed run's leftover, with nothing finished: not the user's data
    _create(store, url, attributes)
    return PreparedGroup(url, attributes)


def _reopen(store, url: str, attributes: dict[str, Any]) -> dict[str, Any]:
    """Check and update the configuration of the group an interrupted run left; its attributes."""
    try:
        group = open_group(store, writable=True)
    except Exception as error:
        raise StoreMismatchError(
            f"--resume: {url!r} holds an array written by infscale, not the results group of "
            f"infscale run ({type(error).__name__}); use --overwrite or another --out."
        ) from error
    diff = attribute_differences(dict(group.attrs), attributes, ignore=RESUME_FREE)
    if diff:
        raise StoreMismatchError(
            f"--resume: {url!r} was written with another configuration ({'; '.join(diff)}); "
            "use --overwrite or another --out."
        )
    group.attrs.update({k: attributes[k] for k in RESUME_FREE if k in attributes})
    return dict(group.attrs)


def open_results(url: str):
    """(group or None, influences array) of a store written by ``run``/``demo``, or of a bare
    array written by ``to_zarr`` (then the group is None). Read-only.

    Raises:
        UsageError: nothing readable at ``url``, or a group without an ``influences`` array.
    """
    store = _open_store(url, "")
    if _is_empty(store, url, ""):
        raise UsageError(f"no zarr store at {url!r}.")
    try:
        kind, node = open_node(store)
    except Exception as error:
        raise UsageError(f"{url!r} is not a zarr store ({type(error).__name__}: {error}).") from error
    if kind == "group":
        if INFLUENCES not in node:
            raise UsageError(f"{url!r} is a zarr group without an {INFLUENCES!r} array; nothing to show.")
        return node, node[INFLUENCES]
    return None, node


def completeness(array) -> tuple[int, int, set[str] | None]:
    """(complete blocks, all blocks, keys of complete blocks) of an array written by infscale;
    an array written by other means counts as complete, with keys None."""
    return array_completeness(array)


def missing_row_blocks(array, row: int, keys: set[str] | None) -> list[int]:
    """Column block indices of the blocks holding matrix row ``row`` that are not complete
    (``keys`` from ``completeness``; None means all are)."""
    if keys is None:
        return []
    r = row // array.chunks[0]
    n_cols = -(-array.shape[1] // array.chunks[1])
    return [j for j in range(n_cols) if f"{r}.{j}" not in keys]


def write_top_k(url: str, k: int, progress: bool = True) -> None:
    """Read the stored influences block by block and store the ``k`` most helpful and harmful
    training points of every test point next to them (``TOP_ARRAYS``; memory O(n_test·k +
    one block)).

    Raises:
        UsageError: ``k`` < 1, the store is incomplete, or it holds perturbation-mode influences.
    """
    from tqdm.auto import tqdm

    from ..aggregators import TopKAggregator

    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise UsageError(f"--top-k: expected an integer ≥ 1; got {k!r}.")
    _, array = open_results(url)
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
    group = open_group(_open_store(url, "--out"), writable=True)
    for name in TOP_ARRAYS:
        value = np.asarray(getattr(result, name[len("top_") :]))
        if name.endswith("indices"):
            value = value.astype(np.int64)
        write_group_array(group, name, value, (bt, value.shape[1]), {"k": int(result.k)})
    group.attrs["top_k"] = int(result.k)
