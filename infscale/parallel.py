"""Influences on Dask: lazy ``dask.array.Array`` results computed chunk by chunk, on
any scheduler (a ``distributed`` cluster, threads, or the synchronous scheduler).

Sign convention (as everywhere in infscale): ``influences`` returns
∇ℓ(z_test)ᵀ (H + λI)⁻¹ ∇ℓ(z_train), shape (n_test, n_train). Positive means that
up-weighting the training point lowers the test loss (it helps); removing training
point i changes the test loss by about ``+influence / n_train``. In perturbation mode
the result has shape (n_test, n_train, *input_feature_shape).

How the work is laid out (see ``docs/parallel.md``):

- the fitted model is pickled once, when the calculator is made, into one key of
  the task graph; every task that needs it depends on that key, so the scheduler
  ships it to each worker once, and if workers die the scheduler rebuilds it from
  the graph (a scattered future would be lost with the last worker holding it);
- one factor task per test chunk, one training-representation task (per-sample
  gradients, in up mode) per training chunk, and one cheap product task per
  (test chunk, training chunk) pair.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from .base import InfluenceFunctionModel, InfluenceMode, numpy_dtype
from .dask_tasks import (
    _arrays,
    _block_key,
    _factors_task,
    _graph_object,
    _lead,
    _product_task,
    _representation_task,
    _rows_key,
    _self_influences_task,
)
from .dask_threads import DisableClientSingleThreadCheck, check_thread_safety
from .dask_writer import BLOCK_AXES, dask_to_zarr
from .errors import (
    BatchFormatError,
    InvalidDimensionChunksError,
    NotFittedError,
    ThreadSafetyViolationError,
    UnalignedChunksError,
)

__all__ = [
    "DaskInfluenceCalculator",
    "DisableClientSingleThreadCheck",
    "dask_to_zarr",
    "check_thread_safety",
    "ThreadSafetyViolationError",
    "InvalidDimensionChunksError",
    "UnalignedChunksError",
]




# --------------------------------------------------------------- the calculator


class DaskInfluenceCalculator:
    """Maps an influence model over the chunks of dask arrays, in parallel.

    Every method returns a lazy ``dask.array.Array``: nothing runs until it is
    computed or stored (``.compute()``, ``.persist()``, ``.to_zarr(url)``), on
    whichever scheduler is active then (the client's cluster by default). Result
    chunks follow the inputs' row chunks; the dtype is the model's (a torch dtype
    is mapped to numpy's). Inputs must be chunked along their first axis only.

    The model and the converter are pickled when the calculator is made: results
    use that snapshot, which travels to each worker once per computation.

    Args:
        influence_function_model: a fitted ``InfluenceFunctionModel``.
        converter: turns numpy chunks into the model's tensors and back, e.g.
            ``infscale.torch.util.TorchNumpyConverter(device=torch.device("cpu"))``.
        client: a ``distributed.Client``, or the class ``DisableClientSingleThreadCheck``
            itself to skip the thread-safety check (a warning says so).

    Raises:
        NotFittedError: the model is not fitted.
        TypeError: the model, converter or client is of the wrong kind.
        ValueError: the client is closed.
        ThreadSafetyViolationError: the model is not thread-safe and some worker
            of the client runs more than one thread.

    Warns:
        UserWarning: when ``client`` is ``DisableClientSingleThreadCheck``.
    """

    def __init__(self, influence_function_model: InfluenceFunctionModel, converter: Any, client: Any):
        model = influence_function_model
        if not isinstance(model, InfluenceFunctionModel):
            raise TypeError(
                "influence_function_model must be an infscale InfluenceFunctionModel (e.g. CgInfluence); "
                f"got {type(model).__name__}."
            )
        for method in ("to_numpy", "from_numpy"):
            if not callable(getattr(converter, method, None)):
                raise TypeError(
                    "converter must have to_numpy() and from_numpy() methods, e.g. "
                    f"infscale.torch.util.TorchNumpyConverter(); got {type(converter).__name__}."
                )
        self.model = model
        self.converter = converter
        self.client = client
        if client is DisableClientSingleThreadCheck:
            warnings.warn(DisableClientSingleThreadCheck.warning_msg(), UserWarning, stacklevel=2)
        else:
            from distributed import Client

            if not isinstance(client, Client):
                raise TypeError(
                    "client must be a distributed.Client or the class DisableClientSingleThreadCheck "
                    f"itself; got {client!r}."
                )
            self._check_client_open()
            check_thread_safety(model, client)
        # after the workers' threads: the client is checked as documented whatever the model's state
        if not model.is_fitted:
            raise NotFittedError(
                type(model),
                "__init__",
                f"DaskInfluenceCalculator needs a fitted influence_function_model; this "
                f"{type(model).__name__} is not fitted: call "
                f"{type(model).__name__}.fit(train_dataloader) first.",
            )
        self.dtype = numpy_dtype(getattr(model, "dtype", np.float64))
        # (model, converter), pickled now into one key that every task depends on
        self._state = _graph_object(
            (model, converter),
            f"influence-model-{type(model).__name__}",
            check_threads=client is not DisableClientSingleThreadCheck,  # again when computed
        )

    # ------------------------------------------------------------ validation
    def _check_client_open(self) -> None:
        client = self.client
        if client is DisableClientSingleThreadCheck:
            return
        if client.status in ("closed", "closing", "failed"):
            raise ValueError(
                f"client is {client.status}: DaskInfluenceCalculator needs an open distributed.Client "
                "(create a new one, or pass client=DisableClientSingleThreadCheck to compute without one)."
            )

    def _check_array(self, array: Any, name: str, method: str) -> None:
        if not isinstance(array, da.Array):
            raise TypeError(
                f"DaskInfluenceCalculator.{method}(): {name} must be a dask.array.Array "
                "(e.g. from torch_dataset_to_dask_array or dask.array.from_array); "
                f"got {type(array).__name__}."
            )
        if array.ndim == 0:
            raise ValueError(
                f"DaskInfluenceCalculator.{method}(): {name} must have a row axis; got a scalar."
            )
        if any(np.isnan(c) for chunks in array.chunks for c in chunks):
            raise ValueError(
                f"DaskInfluenceCalculator.{method}(): {name} has unknown chunk sizes {array.chunks}; "
                f"call {name}.compute_chunk_sizes() first."
            )
        if any(len(chunks) > 1 for chunks in array.chunks[1:]):
            raise InvalidDimensionChunksError(name, array.chunks)

    def _check_pair(self, x: Any, y: Any, method: str, x_name: str = "x", y_name: str = "y") -> None:
        if isinstance(x, Mapping):  # features for model(**x): a dict of arrays with y's row chunks
            if not x:
                raise BatchFormatError(f"DaskInfluenceCalculator.{method}(): {x_name} is an empty dict.")
            for k, v in x.items():
                self._check_pair(v, y, method, f"{x_name}[{k!r}]", y_name)
            return
        self._check_array(x, x_name, method)
        self._check_array(y, y_name, method)
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"DaskInfluenceCalculator.{method}(): {x_name} and {y_name} must have the same number of "
                f"rows; got {x_name} of shape {x.shape} and {y_name} of shape {y.shape}."
            )
        if x.chunks[0] != y.chunks[0]:
            raise UnalignedChunksError(x_name, x.chunks[0], y_name, y.chunks[0])
        fitted = getattr(self.model, "_feature_shape", None)
        if fitted is not None and tuple(x.shape[1:]) != tuple(fitted):
            raise ValueError(
                f"DaskInfluenceCalculator.{method}(): {x_name} has feature shape {x.shape[1:]}, but the "
                f"model was fitted on inputs of feature shape {tuple(fitted)}."
            )

    def _check_perturbation(self, x: Any, mode: InfluenceMode, method: str) -> None:
        if mode is InfluenceMode.Perturbation and isinstance(x, Mapping):
            raise BatchFormatError(
                f"DaskInfluenceCalculator.{method}(): mode='perturbation' differentiates with respect to "
                "x and needs one array; got a dict of arrays. Use mode='up'."
            )

    def _parse_mode(self, mode: Any, method: str) -> InfluenceMode:
        return InfluenceMode.parse(mode, type(self), method)

    # ------------------------------------------------------------ graph pieces
    def _factor_tasks(self, x: da.Array, y: da.Array) -> tuple[str, dict]:
        name = "influence-factors-" + tokenize(self._state.key, [a.name for a in _arrays(x)], y.name)
        layer = {
            (name, i, 0): (
                _factors_task,
                self._state.key,
                self.dtype,
                _rows_key(x, i),
                _block_key(y, i),
            )
            for i in range(len(_lead(x).chunks[0]))
        }
        return name, layer

    def _product_array(
        self,
        factor_name: str,
        factor_layer: dict | None,
        factor_dependencies: list,
        test_chunks: tuple,
        x: da.Array,
        y: da.Array,
        mode: InfluenceMode,
    ) -> da.Array:
        token = tokenize(self._state.key, factor_name, [a.name for a in _arrays(x)], y.name, mode.value)
        rep_name = f"influence-train-representation-{token}"
        out_name = f"influences-{mode.value}-{token}"
        feature_zeros = (0,) * (x.ndim - 1) if mode is InfluenceMode.Perturbation else ()
        n_train_blocks = len(_lead(x).chunks[0])
        rep_layer = {
            (rep_name, j): (
                _representation_task,
                self._state.key,
                mode.value,
                _rows_key(x, j),
                _block_key(y, j),
            )
            for j in range(n_train_blocks)
        }
        out_layer = {
            (out_name, i, j, *feature_zeros): (
                _product_task,
                self._state.key,
                mode.value,
                self.dtype,
                (factor_name, i, 0),
                (rep_name, j),
            )
            for i in range(len(test_chunks))
            for j in range(n_train_blocks)
        }
        layers = {**(factor_layer or {}), **rep_layer, **out_layer}
        graph = HighLevelGraph.from_collections(
            out_name, layers, dependencies=[self._state, *_arrays(x), y, *factor_dependencies]
        )
        chunks = (test_chunks, _lead(x).chunks[0])
        if mode is InfluenceMode.Perturbation:
            chunks = chunks + tuple((d,) for d in x.shape[1:])
        return da.Array(graph, out_name, chunks, meta=np.empty((0,) * len(chunks), dtype=self.dtype))

    # ------------------------------------------------------------ queries
    def influence_factors(self, x: da.Array, y: da.Array) -> da.Array:
        """The factors (H + λI)⁻¹ ∇ℓ(x_i, y_i), lazily: shape (n, n_parameters), one
        task per row chunk of x.

        Raises:
            TypeError, ValueError, InvalidDimensionChunksError, UnalignedChunksError: bad input.
        """
        self._check_client_open()
        self._check_pair(x, y, "influence_factors")
        name, layer = self._factor_tasks(x, y)
        graph = HighLevelGraph.from_collections(name, layer, dependencies=[self._state, *_arrays(x), y])
        n_parameters = int(self.model.n_parameters)
        chunks = (_lead(x).chunks[0], (n_parameters,))
        return da.Array(graph, name, chunks, meta=np.empty((0, 0), dtype=self.dtype))

    def influences_from_factors(
        self,
        z_test_factors: da.Array,
        x: da.Array,
        y: da.Array,
        mode: InfluenceMode | str = InfluenceMode.Up,
    ) -> da.Array:
        """Influences of the training points (x, y) on the test points whose factors
        (from ``influence_factors``) are given, lazily.

        Shape (n_test, n_train) in up mode, (n_test, n_train, *feature_shape) in
        perturbation mode; chunks (factor row chunks, x row chunks[, full features]).
        The training side is computed once per chunk of x and reused for every
        factor chunk.

        Raises:
            TypeError, ValueError, InvalidDimensionChunksError, UnalignedChunksError,
            UnsupportedInfluenceModeError: bad input.
        """
        self._check_client_open()
        mode = self._parse_mode(mode, "influences_from_factors")
        self._check_array(z_test_factors, "z_test_factors", "influences_from_factors")
        n_parameters = int(self.model.n_parameters)
        if z_test_factors.ndim != 2 or z_test_factors.shape[1] != n_parameters:
            raise ValueError(
                "DaskInfluenceCalculator.influences_from_factors(): z_test_factors must have shape "
                f"(n_test, {n_parameters}); got {z_test_factors.shape}."
            )
        self._check_pair(x, y, "influences_from_factors")
        self._check_perturbation(x, mode, "influences_from_factors")
        factors = z_test_factors
        if factors.dtype != self.dtype:
            factors = factors.astype(self.dtype)
        return self._product_array(factors.name, None, [factors], factors.chunks[0], x, y, mode)

    def influences(
        self,
        x_test: da.Array,
        y_test: da.Array,
        x: da.Array | None = None,
        y: da.Array | None = None,
        mode: InfluenceMode | str = InfluenceMode.Up,
    ) -> da.Array:
        """Influences of training points (x, y) on test points (x_test, y_test), lazily.

        ``∇ℓ(z_test)ᵀ (H + λI)⁻¹ ∇ℓ(z_train)``: positive means up-weighting the
        training point lowers the test loss. Shape (n_test, n_train) in up mode,
        (n_test, n_train, *feature_shape) in perturbation mode; chunks follow the row
        chunks of x_test and x. With x and y both None the test set is taken against
        itself. Factors are computed once per test chunk, the training side once per
        training chunk, then one product per (test chunk, training chunk) pair.

        Raises:
            ValueError: only one of x, y given; lengths or feature shapes that differ;
                a closed client.
            InvalidDimensionChunksError, UnalignedChunksError, UnsupportedInfluenceModeError.
        """
        self._check_client_open()
        mode = self._parse_mode(mode, "influences")
        self._check_pair(x_test, y_test, "influences", "x_test", "y_test")
        if (x is None) != (y is None):
            given = "x" if x is not None else "y"
            raise ValueError(
                f"DaskInfluenceCalculator.influences(): only {given} was given; give both x and y, "
                "or neither to take the test set against itself."
            )
        if x is None:
            x, y = x_test, y_test
        else:
            self._check_pair(x, y, "influences")
            if isinstance(x, Mapping) or isinstance(x_test, Mapping):
                if not (isinstance(x, Mapping) and isinstance(x_test, Mapping) and set(x) == set(x_test)):
                    raise ValueError(
                        "DaskInfluenceCalculator.influences(): x_test and x must both be arrays or both "
                        "dicts of arrays with the same keys."
                    )
            elif x.shape[1:] != x_test.shape[1:]:
                raise ValueError(
                    f"DaskInfluenceCalculator.influences(): x_test has feature shape {x_test.shape[1:]} "
                    f"but x has feature shape {x.shape[1:]}; they must be the same."
                )
        self._check_perturbation(x, mode, "influences")
        factor_name, factor_layer = self._factor_tasks(x_test, y_test)
        return self._product_array(
            factor_name, factor_layer, [*_arrays(x_test), y_test], _lead(x_test).chunks[0], x, y, mode
        )

    def self_influences(
        self, x: da.Array, y: da.Array, mode: InfluenceMode | str = InfluenceMode.Up
    ) -> da.Array:
        """The diagonal of ``influences(x, y)``, lazily, one task per row chunk: shape (n,)
        in up mode, (n, *feature_shape) in perturbation mode.

        Raises:
            TypeError, ValueError, InvalidDimensionChunksError, UnalignedChunksError,
            UnsupportedInfluenceModeError: bad input.
        """
        self._check_client_open()
        mode = self._parse_mode(mode, "self_influences")
        self._check_pair(x, y, "self_influences")
        self._check_perturbation(x, mode, "self_influences")
        name = f"self-influences-{mode.value}-" + tokenize(
            self._state.key, [a.name for a in _arrays(x)], y.name
        )
        feature_zeros = (0,) * (x.ndim - 1) if mode is InfluenceMode.Perturbation else ()
        layer = {
            (name, i, *feature_zeros): (
                _self_influences_task,
                self._state.key,
                mode.value,
                self.dtype,
                _rows_key(x, i),
                _block_key(y, i),
            )
            for i in range(len(_lead(x).chunks[0]))
        }
        graph = HighLevelGraph.from_collections(name, layer, dependencies=[self._state, *_arrays(x), y])
        chunks = (_lead(x).chunks[0],)
        if mode is InfluenceMode.Perturbation:
            chunks = chunks + tuple((d,) for d in x.shape[1:])
        return da.Array(graph, name, chunks, meta=np.empty((0,) * len(chunks), dtype=self.dtype))

    def result_attributes(self, quantity: str, mode: InfluenceMode | str | None = None) -> dict[str, Any]:
        """The attributes ``SequentialInfluenceCalculator.to_zarr`` stores with a result (quantity,
        method, hyperparameters, sign convention, version, mode). Give them to ``dask_to_zarr`` so
        that either calculator can resume the other's store.

        Args:
            quantity: ``"influences"``, ``"self_influences"`` or ``"influence_factors"``.
            mode: the influence mode of the result (None for the factors).
        """
        from .calculator import SequentialInfluenceCalculator

        if quantity not in BLOCK_AXES:
            raise ValueError(f"quantity must be one of {tuple(BLOCK_AXES)}; got {quantity!r}.")
        parsed = None if mode is None else self._parse_mode(mode, "result_attributes")
        return SequentialInfluenceCalculator(self.model)._attributes(quantity, parsed)

    def __repr__(self) -> str:
        client = (
            "DisableClientSingleThreadCheck" if self.client is DisableClientSingleThreadCheck else self.client
        )
        return f"DaskInfluenceCalculator({type(self.model).__name__}, {self.converter!r}, client={client!r})"
