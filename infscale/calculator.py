"""Map a fitted influence model over batches of data, one block at a time.

``SequentialInfluenceCalculator`` returns lazy chunk sequences
(``infscale.sequences``): nothing is computed until ``compute(aggregator=...)`` or
``to_zarr(...)``, and then only one test batch × train batch block (plus what is
cached within the memory budget) is held at a time.

Work done once: the factors (H + λI)⁻¹ ∇ℓ(z_test) of a test batch are computed
once and used against every training batch. The training side,
``model.train_representation(x, y, mode)`` (per-sample gradients for the torch
models), is cached across test batches as long as it fits in ``cache_bytes``.
When it does not fit, the calculator measures one batch of each side and takes
the loop order that recomputes the cheaper side (see ``loop_order``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from .base import SIGN_CONVENTION, InfluenceMode, numpy_dtype
from .errors import BatchFormatError, NotFittedError
from .grid_sides import FactorSide, Loader, LoaderSide, Side, nbytes
from .sequences import BlockSource, ChunkSource, LazyChunkSequence, NestedLazyChunkSequence

__all__ = ["SequentialInfluenceCalculator"]

_LOOP_ORDERS = ("auto", "test_outer", "train_outer")


class _InfluenceGrid(BlockSource):
    def __init__(self, calc, test: Side, train: Side, mode: InfluenceMode, feature_shape, attributes):
        self.calc = calc
        self.test = test
        self.train = train
        self.mode = mode
        self.feature_shape = tuple(feature_shape)
        self.dtype = calc._numpy_dtype()
        self._attributes = attributes
        #: how the last pass went: loop order, cached batches, estimated costs
        self.last_plan: dict[str, Any] = {}

    def row_sizes(self):
        return self.test.sizes()

    def col_sizes(self):
        return self.train.sizes()

    def attributes(self):
        return self._attributes

    def _block(self, factors, representation):
        return self.calc.model.influences_from_representation(factors, representation, self.mode)

    def iter_blocks(self, todo=None, row_major=False):
        rows, cols = self.row_sizes(), self.col_sizes()
        need = [[j for j in range(len(cols)) if todo is None or todo(i, j)] for i in range(len(rows))]
        need_rows = [i for i in range(len(rows)) if need[i]]
        if not need_rows:
            return
        need_cols = sorted({j for i in need_rows for j in need[i]})
        observer = self.input_observer
        self.test.observe = (lambda i, *inputs: observer("row", i, *inputs)) if observer else None
        self.train.observe = (lambda i, *inputs: observer("col", i, *inputs)) if observer else None
        order = "test_outer" if row_major else self.calc.loop_order
        pre_test: dict[int, Any] = {}
        pre_train: dict[int, Any] = {}
        plan: dict[str, Any] = {"cache_bytes": self.calc.cache_bytes}
        if order == "auto":
            order = self._choose_order(rows, cols, need_rows, need_cols, need, pre_test, pre_train, plan)
        plan["loop_order"] = order
        self.last_plan = plan
        if order == "test_outer":
            yield from self._loop(
                self.test, self.train, need_rows, lambda i: need[i], pre_test, pre_train, self._block, False
            )
        else:
            by_col: dict[int, list[int]] = {}
            for i in need_rows:
                for j in need[i]:
                    by_col.setdefault(j, []).append(i)
            yield from self._loop(
                self.train, self.test, need_cols, lambda j: by_col[j], pre_train, pre_test,
                lambda r, f: self._block(f, r), True,
            )  # fmt: skip

    def _choose_order(self, rows, cols, need_rows, need_cols, need, pre_test, pre_train, plan) -> str:
        """Measure one batch of each side; pick the order whose recomputation costs less."""
        i0 = need_rows[0]
        j0 = need[i0][0]
        start = time.perf_counter()
        pre_test[i0] = self.test.get(i0)
        t_factor = (time.perf_counter() - start) / rows[i0]
        start = time.perf_counter()
        pre_train[j0] = self.train.get(j0)
        t_repr = (time.perf_counter() - start) / cols[j0]
        b_factor = nbytes(pre_test[i0]) / rows[i0]
        b_repr = nbytes(pre_train[j0]) / cols[j0]

        def uncached(indices, sizes, per_sample):
            used, left = 0.0, 0
            for k in indices:
                size = sizes[k] * per_sample
                if used + size <= self.calc.cache_bytes:
                    used += size
                else:
                    left += sizes[k]
            return left

        extra_test_outer = (len(need_rows) - 1) * uncached(need_cols, cols, b_repr) * t_repr
        extra_train_outer = (len(need_cols) - 1) * uncached(need_rows, rows, b_factor) * t_factor
        plan.update(
            seconds_per_test_sample=t_factor,
            seconds_per_train_sample=t_repr,
            recompute_seconds_test_outer=extra_test_outer,
            recompute_seconds_train_outer=extra_train_outer,
        )
        return "train_outer" if extra_train_outer < extra_test_outer else "test_outer"

    def _loop(self, outer, inner, outer_idx, inner_for, pre_outer, pre_inner, block, swap):
        """Outer side computed once per batch; inner side cached within the budget, else recomputed."""
        budget = self.calc.cache_bytes
        cache: dict[int, Any] = {}
        used = 0
        for o, o_value in outer.iter(set(outer_idx), pre_outer):
            wanted = inner_for(o)
            missing = {k for k in wanted if k not in cache}
            stream = inner.iter(missing, pre_inner) if missing else iter(())
            for k in wanted:
                if k in cache:
                    value = cache[k]
                else:
                    got, value = next(stream)
                    assert got == k
                    size = nbytes(value)
                    if used + size <= budget:
                        cache[k] = value
                        used += size
                yield (k, o, block(o_value, value)) if swap else (o, k, block(o_value, value))
                del value
            self.last_plan["cached_batches"] = len(cache)
            self.last_plan["cached_bytes"] = used


class _ChunkMap(ChunkSource):
    """A flat source: ``compute(x, y)`` mapped over the batches of one loader."""

    def __init__(self, loader: Loader, compute, feature_shape, dtype, attributes):
        self.loader = loader
        self.compute = compute
        self.feature_shape = tuple(feature_shape)
        self.dtype = dtype
        self._attributes = attributes

    def chunk_sizes(self):
        return self.loader.sizes()

    def iter_chunks(self, todo=None):
        needed = {i for i in range(len(self.chunk_sizes())) if todo is None or todo(i)}
        observer = self.input_observer
        observe = (lambda i, *inputs: observer("row", i, *inputs)) if observer else None
        for i, x, y in self.loader.batches(needed, observe):
            yield i, self.compute(x, y)

    def attributes(self):
        return self._attributes


def _perturbation_shape(loader: Loader, mode: InfluenceMode) -> tuple:
    """The trailing shape of perturbation results (the training features'); () in up mode."""
    if mode is not InfluenceMode.Perturbation:
        return ()
    if loader.mapping:
        raise BatchFormatError(
            f"mode='perturbation' differentiates with respect to the features and needs one array x; "
            f"{loader.name} yields mappings of features (keys {list(loader.first_x)}). Use mode='up'."
        )
    return loader.feature_shape


class SequentialInfluenceCalculator:
    """Computes influences batch by batch in one process, lazily.

    Args:
        influence_function_model: a fitted ``InfluenceFunctionModel`` (e.g.
            ``CgInfluence(...).fit(train_loader)``).
        cache_bytes: memory budget (bytes) for reusing one side across the other:
            training representations (per-sample gradients) across test batches, or
            test factors across training batches. Default 1 GiB; 0 disables caching.
        loop_order: ``"auto"`` (default): test batches outside, training batches inside,
            unless the training side does not fit in ``cache_bytes`` and measuring one
            batch of each side shows that recomputing the test factors is cheaper;
            ``"test_outer"`` or ``"train_outer"`` force an order. Aggregators that need
            rows in order (anything but a ``BlockAggregator``) always get test_outer.

    Loaders are re-iterable sources of (x, y) batches that yield the same batches in
    the same order on every pass (a ``DataLoader`` with ``shuffle=False``). Their
    lengths come from ``len(loader.sampler)`` (or ``len(loader.dataset)``) and
    ``loader.batch_size``; a loader without them is counted by one extra pass over
    its data.

    Sign convention: ``influences`` are ∇ℓ(z_test)ᵀ (H + λI)⁻¹ ∇ℓ(z_train); positive
    means up-weighting the training point lowers the test loss (it helps).
    """

    def __init__(
        self,
        influence_function_model: Any,
        cache_bytes: int = 1 << 30,
        loop_order: str = "auto",
    ):
        for name in (
            "influence_factors",
            "train_representation",
            "influences_from_representation",
            "is_fitted",
        ):
            if not hasattr(influence_function_model, name):
                raise TypeError(
                    "influence_function_model must be an infscale InfluenceFunctionModel "
                    f"(it lacks {name}); got {type(influence_function_model).__name__}."
                )
        if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, (int, float)) or cache_bytes < 0:
            raise ValueError(f"cache_bytes must be a number of bytes ≥ 0; got {cache_bytes!r}.")
        if loop_order not in _LOOP_ORDERS:
            raise ValueError(f"loop_order must be one of {_LOOP_ORDERS}; got {loop_order!r}.")
        self.model = influence_function_model
        self.cache_bytes = cache_bytes
        self.loop_order = loop_order

    # ------------------------------------------------------------------ helpers
    def _require_fitted(self, method: str) -> None:
        if not self.model.is_fitted:
            raise NotFittedError(type(self.model), method)

    def _numpy_dtype(self) -> np.dtype | None:
        dtype = getattr(self.model, "dtype", None)
        return None if dtype is None else numpy_dtype(dtype)

    def _attributes(self, quantity: str, mode: InfluenceMode | None) -> dict[str, Any]:
        from ._version import __version__

        hyper = getattr(self.model, "hyperparameters", None)
        attributes = {
            "quantity": quantity,
            "method": type(self.model).__name__,
            "hyperparameters": hyper() if callable(hyper) else {},
            "sign_convention": SIGN_CONVENTION,
            "infscale_version": __version__,
        }
        if mode is not None:
            attributes["mode"] = mode.value
        fingerprint = getattr(self.model, "fingerprint", None)
        value = fingerprint() if callable(fingerprint) else None
        if value is not None:
            attributes["model_fingerprint"] = value
        return attributes

    def _mode(self, mode: Any, method: str) -> InfluenceMode:
        return InfluenceMode.parse(mode, type(self), method)

    # ------------------------------------------------------------------ queries
    def influence_factors(self, data_iterable: Iterable) -> LazyChunkSequence:
        """Lazy (H + λI)⁻¹ ∇ℓ(x, y) per batch: chunks of shape (batch, n_parameters)."""
        self._require_fitted("influence_factors")
        loader = Loader(data_iterable, "data_iterable")
        source = _ChunkMap(
            loader,
            self.model.influence_factors,
            (int(self.model.n_parameters),) if hasattr(self.model, "n_parameters") else (),
            self._numpy_dtype(),
            self._attributes("influence_factors", None),
        )
        return LazyChunkSequence(source)

    def influences(
        self,
        test_data_iterable: Iterable,
        train_data_iterable: Iterable,
        mode: InfluenceMode | str = InfluenceMode.Up,
    ) -> NestedLazyChunkSequence:
        """Lazy influences of every training batch on every test batch.

        Blocks have shape (test batch, train batch) in mode ``"up"`` and
        (test batch, train batch, *feature_shape) in ``"perturbation"``; the whole
        is (n_test, n_train[, *feature_shape]). Nothing is computed here.

        Raises:
            NotFittedError: the model is not fitted.
            ValueError: an empty loader, batches that are not (x, y), test and train
                inputs of different feature shapes, a shuffling loader, a bad mode.
        """
        self._require_fitted("influences")
        mode = self._mode(mode, "influences")
        test = Loader(test_data_iterable, "test_data_iterable")
        train = Loader(train_data_iterable, "train_data_iterable")
        if test.features != train.features:
            raise ValueError(
                f"test and train inputs must have the same feature shape; test_data_iterable yields "
                f"{test.features}, train_data_iterable yields {train.features}."
            )
        test_side = LoaderSide(test, self.model.influence_factors)
        train_side = LoaderSide(train, lambda x, y: self.model.train_representation(x, y, mode))
        feature = _perturbation_shape(train, mode)
        grid = _InfluenceGrid(
            self, test_side, train_side, mode, feature, self._attributes("influences", mode)
        )
        return NestedLazyChunkSequence(grid)

    def influences_from_factors(
        self,
        z_test_factors: Iterable,
        train_data_iterable: Iterable,
        mode: InfluenceMode | str = InfluenceMode.Up,
    ) -> NestedLazyChunkSequence:
        """Lazy influences from precomputed test factors.

        Args:
            z_test_factors: the chunks of test factors, each (batch, n_parameters): the
                lazy sequence of ``influence_factors`` (then only the needed chunks are
                computed), a list of tensors, one tensor, or a re-iterable of one-element
                batches such as ``DataLoader(TensorDataset(factors), batch_size=...)`` (what
                pyDVL users pass).

        Raises:
            TypeError: a chunk that is neither a 2-D tensor nor a one-element batch of one.
            train_data_iterable: the training loader.
            mode: ``"up"`` or ``"perturbation"``.
        """
        self._require_fitted("influences_from_factors")
        mode = self._mode(mode, "influences_from_factors")
        test_side = FactorSide(z_test_factors, "z_test_factors")
        train = Loader(train_data_iterable, "train_data_iterable")
        train_side = LoaderSide(train, lambda x, y: self.model.train_representation(x, y, mode))
        feature = _perturbation_shape(train, mode)
        grid = _InfluenceGrid(
            self, test_side, train_side, mode, feature, self._attributes("influences", mode)
        )
        return NestedLazyChunkSequence(grid)

    def self_influences(
        self, data_iterable: Iterable, mode: InfluenceMode | str = InfluenceMode.Up
    ) -> LazyChunkSequence:
        """Lazy diagonal of ``influences(data, data)``: chunks (batch,) in mode ``"up"``,
        (batch, *feature_shape) in ``"perturbation"``."""
        self._require_fitted("self_influences")
        mode = self._mode(mode, "self_influences")
        loader = Loader(data_iterable, "data_iterable")
        feature = _perturbation_shape(loader, mode)
        source = _ChunkMap(
            loader,
            lambda x, y: self.model.self_influences(x, y, mode),
            feature,
            self._numpy_dtype(),
            self._attributes("self_influences", mode),
        )
        return LazyChunkSequence(source)
