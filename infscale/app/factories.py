"""The user's factories: ``--model pkg.mod:function`` → (model, loss) and
``--data pkg.mod:function`` → (train_dataset, test_dataset).

Factories are imported, never unpickled from disk: like ``python -m``, ``--model`` and
``--data`` run the user's code. The current directory is importable, but *after* the installed
packages (appended to ``sys.path``, never put first), so a file in it named like a package
(a planted ``zarr.py`` or ``numpy.py``) never replaces that package; a user module that an
installed one shadows is named in the error. Everything wrong with the factories (not
importable, not callable, raising, returning the wrong types) is a ``UsageError`` naming the
flag, what was given and what was expected.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from ..errors import UsageError

__all__ = ["load_factory", "load_model", "load_data"]


def load_factory(spec: str, flag: str) -> Callable:
    """Import ``package.module:function`` (the current directory is importable, after the
    installed packages); ``function`` may be a dotted attribute path (``module:Class.method``).

    Raises:
        UsageError: malformed spec, module not importable (or shadowed by an installed one of the
            same name), no such attribute, not callable.
    """
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise UsageError(f"{flag}: expected package.module:function; got {spec!r}.")
    module_name, attr = (s.strip() for s in spec.split(":"))
    if not module_name or not attr:
        raise UsageError(f"{flag}: expected package.module:function; got {spec!r}.")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)  # last: a file here never shadows an installed package
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # the user's module: any failure on import is theirs to fix
        raise UsageError(
            f"{flag}: cannot import module {module_name!r} ({type(error).__name__}: {error})."
        ) from error
    _check_not_shadowed(module_name, cwd, flag)
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise UsageError(f"{flag}: module {module_name!r} has no attribute {attr!r}.")
        target = getattr(target, part)
    if not callable(target):
        raise UsageError(f"{flag}: {spec!r} is not callable (it is a {type(target).__name__}).")
    return target


def _check_not_shadowed(module_name: str, cwd: str, flag: str) -> None:
    """The user meant the module in the current directory, but an installed one of the same
    name came first on ``sys.path``: say so rather than run the wrong code.

    Raises:
        UsageError: ``cwd`` holds ``<top>.py`` or ``<top>/`` but ``<top>`` was imported from elsewhere.
    """
    top = module_name.split(".")[0]
    local = [p for p in (os.path.join(cwd, top + ".py"), os.path.join(cwd, top)) if os.path.exists(p)]
    origin = getattr(sys.modules.get(top), "__file__", None)
    if local and origin and not os.path.abspath(origin).startswith(os.path.join(cwd, "")):
        raise UsageError(
            f"{flag}: module {top!r} was imported from {origin}, not from {local[0]}: an installed "
            f"module of that name comes first. Rename {local[0]}."
        )


def _call_factory(spec: str, flag: str) -> Any:
    factory = load_factory(spec, flag)
    try:
        return factory()
    except Exception as error:
        raise UsageError(f"{flag}: {spec}() raised {type(error).__name__}: {error}") from error


def _describe(value: Any) -> str:
    if isinstance(value, tuple):
        return f"a tuple of {len(value)} ({', '.join(type(v).__name__ for v in value)})"
    return f"a {type(value).__name__}"


def load_model(spec: str):
    """Call the ``--model`` factory: it must return ``(torch.nn.Module, loss callable)``.

    Raises:
        UsageError: see ``load_factory``; the factory raised; anything but that pair.
    """
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


def _item_layout(spec: str, name: str, ds) -> str:
    """What item 0 of a dataset holds, as compared between the two datasets: a tensor's shape, or a
    mapping's keys (the HuggingFace way: a dict of tensors with the targets under ``"labels"``).

    Raises:
        UsageError: item 0 cannot be read, or is neither ``(x, y)`` nor a mapping with "labels".
    """
    from collections.abc import Mapping

    try:
        item = ds[0]
    except Exception as error:
        raise UsageError(f"--data: {name}[0] raised {type(error).__name__}: {error}") from error
    if isinstance(item, Mapping):
        if "labels" not in item:
            raise UsageError(
                f"--data: the items of {name} are mappings without 'labels' (keys {sorted(item)}); "
                "put the targets under 'labels' (the HuggingFace convention) or yield (x, y) pairs."
            )
        return f"mappings with keys {sorted(k for k in item if k != 'labels')}"
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise UsageError(
            f"--data: the items of {name} must be (x, y) pairs or mappings with 'labels'; item 0 is "
            f"{_describe(item)}."
        )
    x = item[0]
    if isinstance(x, Mapping):
        return f"mappings with keys {sorted(x)}"
    if not hasattr(x, "shape"):
        raise UsageError(
            f"--data: the x of {name}[0] is a {type(x).__name__}; expected a tensor or a mapping."
        )
    return f"of shape {tuple(x.shape)}"


def load_data(spec: str):
    """Call the ``--data`` factory: it must return ``(train_dataset, test_dataset)``, non-empty
    torch ``Dataset``s with a length whose items are ``(x, y)`` pairs (x a tensor, or a mapping of
    tensors passed to the model as keyword arguments) or mappings holding the targets under
    ``"labels"`` (HuggingFace samples), alike in both datasets. Samples are batched with torch's
    default collation, so token sequences must be padded to one length.

    Raises:
        UsageError: see ``load_factory``; the factory raised; anything else returned.
    """
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
    layouts = [_item_layout(spec, name, ds) for name, ds in zip(("train_dataset", "test_dataset"), result)]
    if layouts[0] != layouts[1]:
        raise UsageError(
            f"--data: training inputs are {layouts[0]} but test inputs {layouts[1]}; they must match."
        )
    return result
