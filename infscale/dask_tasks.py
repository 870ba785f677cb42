"""The pieces of the Dask calculator's task graphs: block keys of (dict) features, the pickled
model as one graph key, and the module-level task functions the workers run.

Framework-free: tasks reach torch only through the pickled model and converter.
"""

from __future__ import annotations

import pickle
import uuid
from collections.abc import Mapping
from typing import Any

import cloudpickle
import dask
import dask.array as da
import numpy as np
from dask.delayed import Delayed

from .dask_threads import _check_threads_now

__all__: list[str] = []


def _block_key(array: da.Array, row_block: int) -> tuple:
    return (array.name, row_block) + (0,) * (array.ndim - 1)


def _lead(x: Any) -> da.Array:
    """The array whose rows stand for x's: x, or the first array of a dict of features."""
    return next(iter(x.values())) if isinstance(x, Mapping) else x


def _rows_key(x: Any, i: int) -> Any:
    """The task argument of row block i of x: its block key; a dict of block keys for a dict of arrays."""
    if isinstance(x, Mapping):
        return (dict, [[k, _block_key(a, i)] for k, a in x.items()])
    return _block_key(x, i)


def _arrays(x: Any) -> list:
    return list(x.values()) if isinstance(x, Mapping) else [x]


class _Unpickled:
    """An object unpickled from ``blob`` on a worker: unpacks like the object (a tuple).

    Pickling it (when the scheduler moves it to another worker) sends ``blob`` again, never the
    live object, which a task in another thread of the sending worker may be using: a torch
    model in the middle of a forward pass carries that pass's hooks and reparametrized
    tensors, and a copy taken then fails on the receiving worker (measured: KeyError on a
    forward-hook record).

    With ``check_threads``, every task that unpacks it first checks that the scheduler running
    it uses one thread, if the model (the first item) is not thread-safe: the check made when the
    calculator was built no longer holds when the graph is computed elsewhere (after its client
    closed, Dask falls back to its threaded scheduler).
    """

    __slots__ = ("blob", "value", "check_threads")

    def __init__(self, blob: bytes, check_threads: bool = False):
        self.blob = blob
        self.value = pickle.loads(blob)
        self.check_threads = check_threads

    def __reduce__(self):
        return (_Unpickled, (self.blob, self.check_threads))

    def __iter__(self):
        if self.check_threads:
            _check_threads_now(self.value[0])
        return iter(self.value)

    def __sizeof__(self) -> int:  # what dask counts for memory: about twice the pickled size
        return 2 * len(self.blob)


def _unpickle(blob: bytes, check_threads: bool = False) -> _Unpickled:
    return _Unpickled(blob, check_threads)


def _graph_object(obj: Any, name: str, check_threads: bool = False) -> Delayed:
    """``obj`` as one key of a task graph, for every task that needs it to depend on.

    The object is pickled once, now (a snapshot), into a bytes key; a second key
    unpickles it where it is first needed (an ``_Unpickled``: tasks unpack it like the
    object, and moving it to another worker sends the snapshot's bytes, not the live
    object). The scheduler moves it to each worker once, never needs the object's
    libraries itself, and can rebuild it from the graph if every worker holding it dies
    (unlike a scattered future).
    """
    token = uuid.uuid4().hex
    blob = dask.delayed(cloudpickle.dumps(obj), name=f"{name}-pickle-{token}", pure=True, traverse=False)
    return dask.delayed(_unpickle, pure=True)(blob, check_threads, dask_key_name=f"{name}-{token}")


# --------------------------------------------------------------- task functions
# Module-level functions (pickled by reference; this module does not import torch, so
# neither does the scheduler). Each takes (model, converter) as its first argument:
# the scheduler replaces that key with the object on the worker.


def _to_host(obj: Any, converter: Any) -> Any:
    """Tensors (possibly in tuples/lists) → numpy arrays, so that dask can size and ship them."""
    if isinstance(obj, np.ndarray):
        return obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_host(o, converter) for o in obj)
    return converter.to_numpy(obj) if hasattr(obj, "detach") else obj


def _from_host(obj: Any, converter: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return converter.from_numpy(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_from_host(o, converter) for o in obj)
    return obj


def _call(bundle: tuple, *args: Any) -> Any:
    """``bundle[0](*bundle[1:], *args)``: runs a function that travelled inside a pickled key."""
    function, *bound = bundle
    return function(*bound, *args)


def _factors_task(state, dtype, x, y):
    model, converter = state
    factors = model.influence_factors(converter.from_numpy(x), converter.from_numpy(y))
    return np.asarray(converter.to_numpy(factors), dtype=dtype)


def _representation_task(state, mode, x, y):
    model, converter = state
    representation = model.train_representation(converter.from_numpy(x), converter.from_numpy(y), mode)
    return _to_host(representation, converter)


def _product_task(state, mode, dtype, factors, representation):
    model, converter = state
    values = model.influences_from_representation(
        converter.from_numpy(factors), _from_host(representation, converter), mode
    )
    return np.asarray(converter.to_numpy(values), dtype=dtype)


def _self_influences_task(state, mode, dtype, x, y):
    model, converter = state
    values = model.self_influences(converter.from_numpy(x), converter.from_numpy(y), mode)
    return np.asarray(converter.to_numpy(values), dtype=dtype)
