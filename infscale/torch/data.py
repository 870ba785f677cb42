"""Reading training data: the batches of a loader, as (x, y) on the model's device.

Every pass of the torch core over a data loader goes through ``device_batches``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset, default_collate

__all__ = [
    "split_batch",
    "tensor_dataset_batches",
    "loader_batches",
    "device_batches",
    "merged_batches",
    "batch_sizes",
]

#: moves one (x, y) to the model's device and dtype
ToDevice = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]

BATCH_ARGUMENT = "each batch of data"


def split_batch(batch, argument: str = "batch") -> tuple[Tensor, Tensor]:
    """The (x, y) of a data loader batch: a tuple or list whose first two items are x and y.

    Raises:
        ValueError: naming ``argument``, when the batch is not such a tuple or list.
    """
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(
        f"{argument} must be a tuple or list (x, y, ...) of tensors; got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        + "."
    )


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


def device_batches(data: Iterable, to_device: ToDevice) -> Iterator[tuple[Tensor, Tensor]]:
    """One pass over ``data``: the (x, y) of every non-empty batch, moved by ``to_device``.

    Raises:
        ValueError: a batch is not a tuple or list (x, y, ...).
    """
    for batch in loader_batches(data):
        x, y = to_device(*split_batch(batch, BATCH_ARGUMENT))
        if x.shape[0]:
            yield x, y


def merged_batches(
    batches: Iterable[tuple[Tensor, Tensor]], max_rows: int, max_bytes: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """Consecutive batches concatenated while together they have at most ``max_rows`` rows and
    ``max_bytes`` bytes of input; a batch larger than that on its own passes as it is."""
    pending: list[tuple[Tensor, Tensor]] = []
    rows = nbytes = 0

    def merged() -> tuple[Tensor, Tensor]:
        if len(pending) == 1:
            return pending[0]
        return torch.cat([x for x, _ in pending]), torch.cat([y for _, y in pending])

    for x, y in batches:
        size = x.element_size() * x.numel()
        if pending and (rows + x.shape[0] > max_rows or nbytes + size > max_bytes):
            yield merged()
            pending, rows, nbytes = [], 0, 0
        pending.append((x, y))
        rows, nbytes = rows + x.shape[0], nbytes + size
    if pending:
        yield merged()


def batch_sizes(data: Iterable) -> list[int]:
    """The number of rows of every batch of ``data`` (one pass; nothing is moved to a device)."""
    return [split_batch(batch, BATCH_ARGUMENT)[0].shape[0] for batch in loader_batches(data)]
