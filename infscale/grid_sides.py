"""The two sides of an influence grid: re-iterable loaders of (x, y) batches with their sizes,
and what each side yields per batch (computed from a loader, or factors given by the user).

A batch is a tuple or list ``(x, y)``, or a mapping whose ``"labels"`` are y and whose other
entries are x (the HuggingFace convention); x is an array/tensor or a mapping of them, each with
the batch dimension first. Used by ``SequentialInfluenceCalculator``; framework-free (batches are
arrays or tensors).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from .errors import BatchFormatError
from .sequences import ChunkSource, LazyChunkSequence

__all__ = ["Loader", "Side", "LoaderSide", "FactorSide", "nbytes", "rows_of", "features_of"]

LABELS = "labels"


def nbytes(obj: Any) -> int:
    """Memory held by a representation: tensors, arrays, and containers of them."""
    if hasattr(obj, "element_size") and hasattr(obj, "numel"):
        return int(obj.element_size() * obj.numel())
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, (tuple, list)):
        return sum(nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(nbytes(o) for o in obj.values())
    return sys.getsizeof(obj)


def rows_of(x: Any) -> int:
    """The number of rows of x: dim 0 of an array, or of a mapping's first array."""
    if isinstance(x, Mapping):
        return int(next(iter(x.values())).shape[0])
    return int(x.shape[0])


def _floating(a: Any) -> bool:
    if hasattr(a, "is_floating_point"):  # a torch tensor
        return bool(a.is_floating_point())
    return np.dtype(a.dtype).kind in "fc"


def features_of(x: Any) -> Any:
    """What must match between test and training inputs (as the torch models check it): the feature
    shape of a floating-point array, the number of feature dimensions of an integer one (token ids
    may be padded to other lengths), and for a mapping the same per key."""

    def one(a: Any) -> Any:
        return tuple(a.shape[1:]) if _floating(a) else f"{len(a.shape) - 1}-d integer features"

    if isinstance(x, Mapping):
        return {k: one(v) for k, v in x.items()}
    return one(x)


def _split(batch: Any, name: str, index: int) -> tuple[Any, Any]:
    if isinstance(batch, Mapping) and LABELS in batch:
        x, y = {k: v for k, v in batch.items() if k != LABELS}, batch[LABELS]
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, y = batch
    else:
        what = f"a {type(batch).__name__}" + (
            f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
        )
        if isinstance(batch, Mapping):
            what += f" with keys {list(batch)} and no {LABELS!r}"
        raise BatchFormatError(
            f"{name} must yield (x, y) batches; batch {index} is {what} (a mapping batch holds its "
            f"targets under {LABELS!r})."
        )
    arrays = list(x.values()) if isinstance(x, Mapping) else [x]
    if not arrays or any(not hasattr(a, "shape") or len(a.shape) == 0 for a in arrays):
        raise BatchFormatError(
            f"{name} must yield (x, y) batches of arrays, x an array or a mapping of arrays; x of batch "
            f"{index} is {type(x).__name__}."
        )
    if len({a.shape[0] for a in arrays}) > 1:
        rows = {k: v.shape[0] for k, v in x.items()}
        raise BatchFormatError(
            f"{name}: the arrays of x in batch {index} have different numbers of rows {rows}."
        )
    return x, y


class Loader:
    """A re-iterable loader of (x, y) batches with its batch sizes."""

    def __init__(self, loader: Any, name: str):
        if isinstance(loader, (str, bytes)) or not isinstance(loader, Iterable):
            raise TypeError(
                f"{name} must be a re-iterable of (x, y) batches, e.g. a DataLoader; "
                f"got {type(loader).__name__}."
            )
        if iter(loader) is loader:
            raise TypeError(
                f"{name} is a one-shot iterator ({type(loader).__name__}); the calculator passes over "
                "the data more than once, so give a DataLoader or a list of batches."
            )
        if type(getattr(loader, "sampler", None)).__name__ == "RandomSampler":
            raise ValueError(
                f"{name} shuffles (shuffle=True); every pass must yield the same batches in the same "
                "order, so use shuffle=False."
            )
        self.loader = loader
        self.name = name
        self._sizes: list[int] | None = None
        try:
            first = next(iter(loader))
        except StopIteration:
            raise ValueError(f"{name} is empty: it yielded no batch.") from None
        self.first_x, _ = _split(first, name, 0)
        self.mapping = isinstance(self.first_x, Mapping)
        #: the feature shape of array inputs (for perturbation results); None for a mapping
        self.feature_shape = None if self.mapping else tuple(self.first_x.shape[1:])
        self.features = features_of(self.first_x)

    def sizes(self) -> list[int]:
        """Rows per batch: from ``len(loader.sampler)`` (or ``len(loader.dataset)``) and
        ``loader.batch_size`` when the loader has them, else by one pass over the data."""
        if self._sizes is None:
            self._sizes = self._sizes_from_lengths()
            if self._sizes is None:
                self._sizes = [rows_of(_split(b, self.name, i)[0]) for i, b in enumerate(self.loader)]
        return self._sizes

    def _sizes_from_lengths(self) -> list[int] | None:
        b = getattr(self.loader, "batch_size", None)
        if not isinstance(b, int) or b < 1:
            return None
        n = None
        for attr in ("sampler", "dataset"):
            try:
                n = len(getattr(self.loader, attr))
                break
            except (TypeError, AttributeError, NotImplementedError):
                continue
        if n is None:
            return None
        sizes = [b] * (n // b)
        if n % b and not getattr(self.loader, "drop_last", False):
            sizes.append(n % b)
        return sizes

    def batches(self, needed: set[int], observe=None) -> Iterator[tuple[int, Any, Any]]:
        """(index, x, y) of the needed batches, in order; stops after the last needed one.

        ``observe(index, x, y)``, when given, sees every batch read on the way (the needed
        ones and those before them), before anything is computed from it."""
        sizes = self.sizes()
        remaining = set(needed)
        for i, batch in enumerate(self.loader):
            if not remaining:
                return
            if observe is not None:
                observe(i, *_split(batch, self.name, i))
            if i not in remaining:
                continue
            x, y = _split(batch, self.name, i)
            if i >= len(sizes) or rows_of(x) != sizes[i]:
                expected = sizes[i] if i < len(sizes) else "no batch"
                raise RuntimeError(
                    f"{self.name} yielded {rows_of(x)} rows as batch {i}, expected {expected}: every "
                    "pass over a loader must yield the same batches."
                )
            remaining.discard(i)
            yield i, x, y
        if remaining:
            raise RuntimeError(
                f"{self.name} ended before batch {min(remaining)}: it yielded fewer batches than before."
            )


class Side:
    """One side of the grid: yields (index, value) for the needed batches in order."""

    #: ``observe(index, x, y)`` for each batch of inputs read (see ``Loader.batches``)
    observe = None

    def sizes(self) -> list[int]:
        raise NotImplementedError

    def iter(self, needed: set[int], prefetched: dict[int, Any]) -> Iterator[tuple[int, Any]]:
        raise NotImplementedError

    def get(self, index: int) -> Any:
        return next(self.iter({index}, {}))[1]


class LoaderSide(Side):
    def __init__(self, loader: Loader, compute):
        self.loader = loader
        self.compute = compute

    def sizes(self):
        return self.loader.sizes()

    def iter(self, needed, prefetched):
        remaining = set(needed)
        loading = remaining - set(prefetched)
        batches = self.loader.batches(loading, self.observe) if loading else iter(())
        for i in sorted(remaining):
            if i in prefetched:
                yield i, prefetched.pop(i)
            else:
                j, x, y = next(batches)
                assert j == i
                yield i, self.compute(x, y)


class FactorSide(Side):
    """Test factors given by the user: a lazy chunk sequence, a list of tensors, or any re-iterable."""

    def __init__(self, factors: Any, name: str):
        self.name = name
        if isinstance(factors, LazyChunkSequence):
            self.source: ChunkSource | None = factors.source
            self.items = None
        else:
            self.source = None
            if isinstance(factors, (str, bytes)) or not isinstance(factors, Iterable):
                raise TypeError(f"{name} must be an iterable of factor chunks; got {type(factors).__name__}.")
            if hasattr(factors, "shape") and len(factors.shape) == 2:
                factors = [factors]  # a single chunk
            if iter(factors) is factors:
                factors = list(factors)
            self.items = factors
        self._sizes: list[int] | None = None

    def _chunk(self, item: Any, index: int) -> Any:
        """A factor chunk: a tensor/array, or what a DataLoader over a TensorDataset of factors
        yields (a one-element list or tuple holding it)."""
        if isinstance(item, (list, tuple)) and len(item) == 1:
            item = item[0]
        if not hasattr(item, "shape") or len(item.shape) != 2:
            what = (
                f"a {type(item).__name__} of length {len(item)}"
                if isinstance(item, (list, tuple))
                else f"of shape {tuple(item.shape)}" if hasattr(item, "shape") else f"a {type(item).__name__}"
            )
            raise TypeError(
                f"{self.name}: chunk {index} is {what}; expected a 2-D tensor (batch, n_parameters) "
                "or a one-element batch holding one (as a DataLoader over a TensorDataset yields)."
            )
        return item

    def sizes(self):
        if self._sizes is None:
            if self.source is not None:
                self._sizes = list(self.source.chunk_sizes())
            else:
                self._sizes = [int(self._chunk(f, i).shape[0]) for i, f in enumerate(self.items)]
            if not self._sizes:
                raise ValueError(f"{self.name} is empty: it holds no factor chunk.")
        return self._sizes

    def iter(self, needed, prefetched):
        remaining = set(needed)
        if self.source is not None:
            loading = remaining - set(prefetched)
            chunks = self.source.iter_chunks(lambda i: i in loading) if loading else iter(())
            for i in sorted(remaining):
                if i in prefetched:
                    yield i, prefetched.pop(i)
                else:
                    while True:
                        j, chunk = next(chunks)
                        if j == i:
                            break
                    yield i, chunk
            return
        for i, chunk in enumerate(self.items):
            if not remaining:
                return
            if i in remaining:
                remaining.discard(i)
                yield i, prefetched.pop(i) if i in prefetched else self._chunk(chunk, i)
