"""Reading data: batches of a loader as (x, y), and the features x themselves.

Features ``x`` are a tensor or a mapping of tensors (a dict, a HuggingFace ``BatchEncoding``), each
with the batch dimension first. A tensor is passed to the model positionally, ``model(x)``; a mapping
as keyword arguments, ``model(**x)`` (``call_model``). A batch of a loader is a tuple or list
``(x, y)``, or a mapping that holds the targets under ``"labels"`` (the HuggingFace convention):
``"labels"`` is split off as y and the rest is x (``split_batch``). Anything else is refused with
``BatchFormatError`` rather than guessed at: a tuple ``(x1, x2, y)`` could as well be
``(x, y, index)``.

The helpers below are the only places that look inside x, so the rest of the torch core handles a
mapping exactly like a tensor: ``batch_size_of``, ``take_rows``, ``to_device``, ``call_model``,
``map_features``, ``add_batch_dim``, ``cat_rows``, ``feature_nbytes``, ``describe``.

Every pass of the torch core over a data loader goes through ``device_batches``, which also refuses
NaN or infinite inputs (``NonFiniteError``) before anything is computed from them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset, default_collate

from ..errors import BatchFormatError, NonFiniteError

__all__ = [
    "Features",
    "LABELS",
    "batch_size_of",
    "take_rows",
    "to_device",
    "call_model",
    "map_features",
    "add_batch_dim",
    "cat_rows",
    "feature_nbytes",
    "feature_layout",
    "describe",
    "check_finite",
    "split_batch",
    "tensor_dataset_batches",
    "loader_batches",
    "device_batches",
    "merged_batches",
    "batch_sizes",
]

#: features: a tensor, or a mapping name → tensor (each with the batch dimension first)
Features = Tensor | Mapping[str, Tensor]

#: moves one (x, y) to the model's device and dtype
ToDevice = Callable[[Any, Tensor], tuple[Any, Tensor]]

#: the key under which a mapping batch holds its targets (HuggingFace's convention)
LABELS = "labels"

BATCH_ARGUMENT = "each batch of data"


# ------------------------------------------------------------------------------ features
def batch_size_of(x: Features) -> int:
    """The number of rows of x: dim 0 of the tensor, or of the mapping's first tensor (the
    mapping's tensors are checked to agree by ``_check_xy`` and ``split_batch``)."""
    if isinstance(x, Mapping):
        return int(next(iter(x.values())).shape[0]) if len(x) else 0
    return int(x.shape[0])


def map_features(fn: Callable[[Tensor], Any], x: Features) -> Any:
    """``fn`` applied to the tensor x, or to every value of the mapping x (a plain dict, in order)."""
    if isinstance(x, Mapping):
        return {k: fn(v) for k, v in x.items()}
    return fn(x)


def take_rows(x: Features, index: slice | int | Tensor) -> Features:
    """Rows ``index`` (a slice, or a 1-D index tensor) of x, or of each tensor of the mapping x.
    An integer index keeps the row dimension (rows i:i+1)."""
    if isinstance(index, int):
        index = slice(index, index + 1)
    return map_features(lambda t: t[index], x)


def add_batch_dim(x: Features) -> Features:
    """One sample (as ``vmap`` hands it over, no row dimension) as a batch of one."""
    return map_features(lambda t: t.unsqueeze(0), x)


def _tensor_to(t: Any, device: torch.device | None, dtype: torch.dtype | None) -> Tensor:
    t = torch.as_tensor(t)
    return t.to(device, dtype if dtype is not None and t.is_floating_point() else t.dtype)


def to_device(x: Features, device: torch.device | None, dtype: torch.dtype | None) -> Features:
    """x on ``device``; floating-point tensors in ``dtype``, the others (token ids, masks, labels)
    keep theirs. A mapping becomes a plain dict (so that ``torch.func`` can map over it)."""
    return map_features(lambda t: _tensor_to(t, device, dtype), x)


def call_model(model_fn: Callable | nn.Module, x: Features, state: Mapping[str, Tensor] | None = None) -> Any:
    """``model_fn(**x)`` for a mapping, ``model_fn(x)`` for a tensor. With ``state`` (name → tensor),
    ``model_fn`` must be an ``nn.Module`` and runs through ``torch.func.functional_call`` with that
    state (tied weights follow their source)."""
    if state is not None:
        if isinstance(x, Mapping):
            return torch.func.functional_call(model_fn, dict(state), (), dict(x))
        return torch.func.functional_call(model_fn, dict(state), (x,))
    return model_fn(**x) if isinstance(x, Mapping) else model_fn(x)


def feature_layout(x: Features) -> Any:
    """What must agree for rows of two batches to be concatenated: keys, trailing shapes, dtypes."""
    if isinstance(x, Mapping):
        return tuple((k, tuple(v.shape[1:]), v.dtype, v.device) for k, v in x.items())
    return (tuple(x.shape[1:]), x.dtype, x.device)


def cat_rows(parts: list[Features]) -> Features:
    """The rows of several batches of the same layout, concatenated (a mapping key by key)."""
    if isinstance(parts[0], Mapping):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def feature_nbytes(x: Features) -> int:
    """Bytes held by x (all tensors of a mapping)."""
    if isinstance(x, Mapping):
        return sum(feature_nbytes(v) for v in x.values())
    return int(x.element_size() * x.numel())


def describe(x: Any) -> str:
    """A short description of x for error messages: shapes and dtypes, key by key for a mapping."""
    if isinstance(x, Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {str(x.dtype).replace('torch.', '')}"
    if isinstance(x, Mapping):
        inner = ", ".join(
            f"{k!r}: {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}"
            if isinstance(v, Tensor)
            else f"{k!r}: {type(v).__name__}"
            for k, v in x.items()
        )
        return f"a mapping {{{inner}}}"
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"a {type(x).__name__} of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"a {type(x).__name__}"


def _rows_listed(bad: Tensor) -> str:
    rows = bad.nonzero().flatten().tolist()
    shown = ", ".join(map(str, rows[:10])) + (", …" if len(rows) > 10 else "")
    return f"rows [{shown}] ({len(rows)} of {bad.numel()})"


def check_finite(value: Features, name: str, where: str) -> None:
    """Raises ``NonFiniteError`` naming ``where``, ``name`` (the key of a mapping) and the rows,
    when a floating-point tensor of ``value`` holds NaN or ±inf. One ``isfinite().all()`` per
    tensor; the rows are located only on failure. Integer and boolean tensors pass."""
    items = value.items() if isinstance(value, Mapping) else [(None, value)]
    for key, t in items:
        if not isinstance(t, Tensor) or not (t.is_floating_point() or t.is_complex()):
            continue
        if bool(torch.isfinite(t).all()):
            continue
        label = name if key is None else f"{name}[{key!r}]"
        bad = ~torch.isfinite(t).reshape(t.shape[0], -1).all(dim=1) if t.ndim else ~torch.isfinite(t)
        raise NonFiniteError(
            f"{where}: {label} holds NaN or infinite values in {_rows_listed(bad.reshape(-1))}; "
            "expected finite numbers."
        )


# ------------------------------------------------------------------------------ batches
def _check_mapping(x: Mapping, argument: str) -> None:
    if not x:
        raise BatchFormatError(
            f"{argument}: the features are an empty mapping; expected tensors to pass as model(**x)."
        )
    rows = {}
    for k, v in x.items():
        if not isinstance(k, str):
            raise BatchFormatError(
                f"{argument}: the features have a key {k!r}; expected string keys (model(**x))."
            )
        if not isinstance(v, Tensor) or v.ndim == 0:
            raise BatchFormatError(
                f"{argument}: the features' {k!r} is {describe(v)}; expected a tensor with the batch "
                "dimension first."
            )
        rows[k] = v.shape[0]
    if len(set(rows.values())) > 1:
        raise BatchFormatError(
            f"{argument}: the features' tensors have different numbers of rows {rows}; expected the "
            "batch dimension first in each."
        )


def split_batch(batch: Any, argument: str = "batch") -> tuple[Features, Tensor]:
    """The (x, y) of a data loader batch: a tuple or list ``(x, y)``, or a mapping whose ``"labels"``
    are y and whose other entries are x (a dict, in order). x may itself be a mapping.

    Raises:
        BatchFormatError: naming ``argument``, for anything else: a tuple of another length (is
            ``(a, b, c)`` two inputs and a target, or an input, a target and an index?), a mapping
            without ``"labels"``, or a mapping's tensors with different numbers of rows.
    """
    if isinstance(batch, Mapping):
        if LABELS not in batch:
            raise BatchFormatError(
                f"{argument} is a mapping with keys {list(batch)} but no {LABELS!r}; infscale reads the "
                f"targets from batch[{LABELS!r}] (the HuggingFace convention) and passes the rest as "
                "model(**x), or reads (x, y) tuples."
            )
        x, y = {k: v for k, v in batch.items() if k != LABELS}, batch[LABELS]
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, y = batch
    else:
        length = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
        shapes = ""
        if isinstance(batch, (tuple, list)):
            shapes = " (" + "; ".join(describe(b) for b in batch) + ")"
        raise BatchFormatError(
            f"{argument} must be a pair (x, y) or a mapping with {LABELS!r}; got "
            f"{type(batch).__name__}{length}{shapes}. For a model with several inputs pass x as a "
            "dict (given as model(**x)); drop extra items such as indices in the dataset or collate_fn."
        )
    if isinstance(x, Mapping):
        _check_mapping(x, argument)
    return x, y


def tensor_dataset_batches(data: Iterable) -> list[tuple[Tensor, ...]] | None:
    """The batches of a sequential, default-collated DataLoader over a TensorDataset, as views
    (slices) of the dataset's tensors: the same values the loader yields, without the per-sample
    indexing and stacking of each pass. None for any other iterable (it is iterated as given)."""
    if not (
        isinstance(data, DataLoader)
        and type(data.dataset) is TensorDataset
        and type(data.sampler) is SequentialSampler
        and type(data.batch_sampler) is BatchSampler
        and data.collate_fn is default_collate
        and data.batch_size is not None
    ):
        return None
    tensors, size = data.dataset.tensors, data.batch_size
    n = len(data.dataset)
    stop = n - n % size if data.drop_last else n
    return [tuple(t[s : s + size] for t in tensors) for s in range(0, stop, size)]


def loader_batches(data: Iterable) -> Iterable:
    """The batches of ``data`` in order: slices of the tensors for a sequential DataLoader over a
    TensorDataset (``tensor_dataset_batches``), else ``data`` itself, iterated as given."""
    views = tensor_dataset_batches(data)
    return data if views is None else views


def device_batches(data: Iterable, to_device: ToDevice) -> Iterator[tuple[Features, Tensor]]:
    """One pass over ``data``: the (x, y) of every non-empty batch, moved by ``to_device``.

    Raises:
        BatchFormatError: a batch is neither (x, y) nor a mapping with "labels".
        NonFiniteError: a batch's floating-point x or y holds NaN or inf (checked before it is used).
    """
    for i, batch in enumerate(loader_batches(data)):
        x, y = to_device(*split_batch(batch, f"{BATCH_ARGUMENT} (batch {i})"))
        check_finite(x, "x", f"data batch {i}")
        check_finite(y, "y", f"data batch {i}")
        if batch_size_of(x):
            yield x, y


def merged_batches(
    batches: Iterable[tuple[Features, Tensor]], max_rows: int, max_bytes: int
) -> Iterator[tuple[Features, Tensor]]:
    """Consecutive batches concatenated while together they have at most ``max_rows`` rows and
    ``max_bytes`` bytes of input; a batch larger than that on its own passes as it is, and so do
    batches whose features differ in layout (token ids padded to another length)."""
    pending: list[tuple[Features, Tensor]] = []
    rows = nbytes = 0

    def merged() -> tuple[Features, Tensor]:
        if len(pending) == 1:
            return pending[0]
        return cat_rows([x for x, _ in pending]), torch.cat([y for _, y in pending])

    for x, y in batches:
        size, b = feature_nbytes(x), batch_size_of(x)
        if pending and (
            rows + b > max_rows
            or nbytes + size > max_bytes
            or (feature_layout(x), feature_layout(y))
            != (feature_layout(pending[0][0]), feature_layout(pending[0][1]))
        ):
            yield merged()
            pending, rows, nbytes = [], 0, 0
        pending.append((x, y))
        rows, nbytes = rows + b, nbytes + size
    if pending:
        yield merged()


def batch_sizes(data: Iterable) -> list[int]:
    """The number of rows of every batch of ``data`` (one pass; nothing is moved to a device)."""
    return [
        batch_size_of(split_batch(batch, f"{BATCH_ARGUMENT} (batch {i})")[0])
        for i, batch in enumerate(loader_batches(data))
    ]
