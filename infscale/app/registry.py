"""The method registry: short names of the influence methods and how to build one by name.

One list serves the command line, the demo and the benchmarks. Methods are constructed as
``cls(model, loss=loss, **params)``: the loss goes by keyword because ``EkfacInfluence``'s
second positional parameter is ``update_diagonal`` (the seed's signature).
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import UsageError

__all__ = [
    "METHODS",
    "available_methods",
    "resolve_method",
    "parse_param",
    "parse_params",
    "make_influence_model",
    "format_params",
]

#: Short method names → class names in ``infscale.torch`` (looked up lazily: only the
#: classes that exist in this installation are offered).
METHODS: dict[str, str] = {
    "direct": "DirectInfluence",
    "cg": "CgInfluence",
    "lissa": "LissaInfluence",
    "arnoldi": "ArnoldiInfluence",
    "nystroem": "NystroemSketchInfluence",
    "inverse-harmonic-mean": "InverseHarmonicMeanInfluence",
    "ekfac": "EkfacInfluence",
}

#: Other accepted spellings.
_ALIASES = {
    "nystroem-sketch": "nystroem",
    "nystroemsketch": "nystroem",
    "datainf": "inverse-harmonic-mean",
    "ihm": "inverse-harmonic-mean",
    "inverse_harmonic_mean": "inverse-harmonic-mean",
}


def available_methods() -> dict[str, type]:
    """Short name → class, for the methods of ``METHODS`` that ``infscale.torch`` exports
    (imported on first use, not when the command starts)."""
    torch_pkg = importlib.import_module("infscale.torch")
    return {
        name: getattr(torch_pkg, cls_name)
        for name, cls_name in METHODS.items()
        if hasattr(torch_pkg, cls_name)
    }


def resolve_method(name: str) -> tuple[str, type]:
    """The (short name, class) of a method given by short name or class name (any case).

    Raises:
        UsageError: unknown name; the message lists the methods available.
    """
    methods = available_methods()
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key in methods:
        return key, methods[key]
    for short, cls in methods.items():
        if cls.__name__.lower() == key:
            return short, cls
    listing = ", ".join(f"{s} ({c.__name__})" for s, c in methods.items())
    raise UsageError(f"--method: unknown method {name!r}; available: {listing}.")


def parse_param(text: str) -> tuple[str, Any]:
    """``"key=value"`` → (key, typed value).

    Values are read as JSON where that works (``64`` → int, ``0.01`` / ``1e-3`` → float,
    ``true``/``false`` → bool, ``null``/``none`` → None, ``[1, 2]``, ``{"a": 1}``);
    anything else stays a string (``block_structure=layer_wise``).

    Raises:
        UsageError: no ``=``, or an empty or invalid key.
    """
    if "=" not in text:
        raise UsageError(f"--param: expected key=value (e.g. --param rank=64); got {text!r}.")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key.isidentifier():
        raise UsageError(f"--param: {key!r} in {text!r} is not a valid parameter name.")
    return key, _typed(value.strip())


def _typed(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    low = value.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    try:
        return json.loads(value)
    except ValueError:
        return value


def parse_params(items: Sequence[str] | None) -> dict[str, Any]:
    """Several ``--param key=value`` → dict (a later key wins)."""
    return dict(parse_param(item) for item in items or ())


def make_influence_model(method: str, model: Any, loss: Callable, params: dict[str, Any] | None = None):
    """An (unfitted) influence model of the named method with keyword ``params``.

    Raises:
        UsageError: unknown method, a parameter the method does not take (the message
            lists those it takes), or a value it rejects.
    """
    short, cls = resolve_method(method)
    params = dict(params or {})
    signature = inspect.signature(cls.__init__)
    accepted = [p for p in signature.parameters if p not in ("self", "model", "loss")]
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    unknown = [k for k in params if k not in accepted]
    if unknown and not takes_kwargs:
        raise UsageError(
            f"--param: {cls.__name__} has no parameter {', '.join(map(repr, unknown))}; "
            f"it takes: {', '.join(accepted)}."
        )
    try:
        return cls(model, loss=loss, **params)
    except (TypeError, ValueError) as error:
        raise UsageError(f"--param: {cls.__name__}({format_params(params)}) rejected: {error}") from error


def format_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in params.items())
