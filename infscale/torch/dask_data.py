"""Lazy dask arrays over a torch ``Dataset``: chunks are read on the workers, when computed."""

from __future__ import annotations

import operator
import uuid
from collections.abc import Mapping
from typing import Any

import dask.array as da
import numpy as np
import torch
from dask.highlevelgraph import HighLevelGraph

from ..dask_tasks import _call, _graph_object
from ..errors import BatchFormatError

__all__ = ["torch_dataset_to_dask_array"]


def _parts(sample: Any) -> tuple[Any, ...]:
    """A dataset sample as its components: (x, y, ...), a lone tensor, or for a mapping with
    "labels" (x, labels) with x the rest of the mapping; any component may be a mapping."""
    if isinstance(sample, Mapping):
        if "labels" in sample:
            return ({k: v for k, v in sample.items() if k != "labels"}, sample["labels"])
        return (sample,)
    return tuple(sample) if isinstance(sample, (tuple, list)) else (sample,)


def _leaves(sample: Any) -> list[tuple[tuple[int, str | None], torch.Tensor]]:
    """((component, key), tensor) for every tensor of a sample, in order (key None: not a mapping)."""
    out = []
    for c, part in enumerate(_parts(sample)):
        items = part.items() if isinstance(part, Mapping) else [(None, part)]
        out.extend(((c, k), torch.as_tensor(v).detach()) for k, v in items)
    return out


def _components(sample: Any) -> tuple[torch.Tensor, ...]:
    """A dataset sample as a tuple of tensors, mappings flattened key by key (see ``_leaves``)."""
    return tuple(t for _, t in _leaves(sample))


def _read_rows(dataset: Any, start: int, stop: int, dtypes: tuple[np.dtype, ...]) -> tuple[np.ndarray, ...]:
    """Rows start..stop-1 of the dataset, one stacked numpy array per tensor of a sample.

    Raises:
        BatchFormatError: a tensor's shape differs from that of the same tensor in row ``start``
            (e.g. token ids of unpadded lengths).
    """
    samples = [_leaves(dataset[i]) for i in range(start, stop)]
    out = []
    for k, dtype in enumerate(dtypes):
        (c, key), first = samples[0][k]
        for i, s in enumerate(samples):
            if s[k][1].shape != first.shape:
                label = f"component {c}" + ("" if key is None else f" [{key!r}]")
                raise BatchFormatError(
                    f"torch_dataset_to_dask_array: {label} of row {start + i} has shape "
                    f"{tuple(s[k][1].shape)}, but row {start} has {tuple(first.shape)}; a dask array needs "
                    "one shape per row: pad every sample to one length (e.g. padding='max_length')."
                )
        stacked = torch.stack([s[k][1] for s in samples]).cpu().numpy()
        out.append(stacked.astype(dtype, copy=False))
    return tuple(out)


def _count_rows(dataset: Any) -> int:
    """The number of rows of a dataset without ``len()``: the first i for which ``dataset[i]``
    raises IndexError (the end of a map-style dataset; StopIteration is taken the same way).
    Reads every sample once."""
    n = 0
    while True:
        try:
            dataset[n]
        except (IndexError, StopIteration):
            return n
        n += 1


def torch_dataset_to_dask_array(
    dataset: Any,
    chunk_size: int,
    total_size: int | None = None,
    resulting_dtype: Any = np.float32,
) -> tuple[da.Array | dict[str, da.Array], ...]:
    """One lazy dask array per tensor of a dataset's samples (a dict of them per mapping), chunked
    along rows.

    Nothing is read when the arrays are made, except sample 0 (for shapes and
    dtypes). Each chunk of ``chunk_size`` rows is one task that indexes the dataset
    on the worker that computes it, shared by all components. The dataset object is
    pickled once, now, into one key of the graph and shipped to each worker once
    (for a dataset that reads from storage, that is just its handle; an in-memory
    dataset travels whole). A sample ``(x, y)`` gives ``(da_x, da_y)``.

    Mappings (features for ``model(**x)``): a sample that is a mapping with ``"labels"``
    gives ``({key: da_array}, da_labels)``, and a component that is a mapping gives a dict
    of arrays, all with the same row chunks (one read task serves them all), which
    ``DaskInfluenceCalculator`` takes as x. Every sample must have the same shape per key:
    pad token ids to one length.

    Args:
        dataset: anything with ``dataset[i]`` → a tensor, a tuple of tensors (or
            numbers), or a mapping (of tensors, with "labels" for the targets); a tuple's
            components may be mappings; a ``torch.utils.data.Dataset``.
        chunk_size: rows per chunk (the last chunk may be shorter).
        total_size: use only the first ``total_size`` rows. Default: the dataset's
            ``len()``; for a dataset without one, the number of rows found by reading
            ``dataset[0]``, ``dataset[1]``, ... until IndexError (or StopIteration), which
            reads every sample once, now, on this machine: give total_size to avoid it.
        resulting_dtype: dtype of the floating-point tensors; integer and boolean
            tensors (e.g. class labels) keep their own dtype.

    Returns:
        A tuple with one entry per component of a sample: a ``dask.array.Array`` of shape
        (n, *component_shape), or for a mapping a dict key → such an array.

    Raises:
        ValueError: chunk_size < 1, total_size < 1 or beyond the dataset's length, or
            an empty dataset.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer; got {chunk_size!r}.")
    try:
        length = len(dataset)
    except TypeError:
        length = None
    if total_size is None:
        total_size = length if length is not None else _count_rows(dataset)
        if total_size < 1:
            raise ValueError(f"dataset ({type(dataset).__name__}) is empty: it has no sample 0.")
    if total_size < 1 or (length is not None and total_size > length):
        raise ValueError(
            f"total_size must be between 1 and the dataset's length ({length}); got {total_size}."
        )
    leaves = _leaves(dataset[0])
    first = tuple(t for _, t in leaves)
    dtypes = tuple(
        np.dtype(resulting_dtype) if t.is_floating_point() else t.cpu().numpy().dtype for t in first
    )
    token = uuid.uuid4().hex
    # the dataset and its reader travel in one pickled key: the scheduler never imports torch
    reader = _graph_object((_read_rows, dataset), "torch-dataset")
    read_name = f"torch-dataset-read-{token}"
    starts = list(range(0, total_size, chunk_size))
    row_chunks = tuple(min(chunk_size, total_size - s) for s in starts)
    read_layer = {
        (read_name, b): (_call, reader.key, s, s + n, dtypes)
        for b, (s, n) in enumerate(zip(starts, row_chunks))
    }
    read_graph = HighLevelGraph.from_collections(read_name, read_layer, dependencies=[reader])
    arrays = []
    for k, (tensor, dtype) in enumerate(zip(first, dtypes)):
        name = f"torch-dataset-component{k}-{token}"
        zeros = (0,) * tensor.ndim
        layer = {(name, b, *zeros): (operator.getitem, (read_name, b), k) for b in range(len(starts))}
        graph = HighLevelGraph(
            {**read_graph.layers, name: layer},
            {**read_graph.dependencies, name: {read_name}},
        )
        chunks = (row_chunks,) + tuple((d,) for d in tensor.shape)
        arrays.append(da.Array(graph, name, chunks, meta=np.empty((0,) * (tensor.ndim + 1), dtype=dtype)))
    components: list[Any] = []
    for ((c, key), _), array in zip(leaves, arrays):  # regroup the arrays of a mapping into a dict
        if key is None:
            components.append(array)
        else:
            if len(components) == c:
                components.append({})
            components[c][key] = array
    return tuple(components)
