"""Declared settings: each configurable class lists, once, the attributes that determine its
numbers; ``hyperparameters()`` records them (the calculators store that record with every
result and compare it when a stored computation is resumed).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any, ClassVar

import torch

__all__ = ["Configurable", "encode_setting"]


def encode_setting(value: Any) -> Any:
    """A JSON-ready form of a setting: enum members by value, dtypes by name (``"float64"``),
    mappings and sequences element by element, and an object with its own ``hyperparameters()``
    (a preconditioner) as ``{"class": its class name, **its settings}``.

    Raises:
        TypeError: a value of another type (a declared setting must be recordable).
    """
    if isinstance(value, Enum):
        return value.value
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, Mapping):
        return {str(k): encode_setting(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_setting(v) for v in value]
    if callable(getattr(value, "hyperparameters", None)):
        return {"class": type(value).__name__, **value.hyperparameters()}
    raise TypeError(f"a setting must be recordable as JSON; got {type(value).__name__}: {value!r}.")


class Configurable:
    """Mixin: ``hyperparameters()`` from the class's one declaration of its settings.

    A subclass sets ``settings`` to the names of the attributes that determine its numbers (its
    full list, including inherited ones it keeps); each is recorded under its own name, encoded
    by ``encode_setting``.
    """

    settings: ClassVar[tuple[str, ...]] = ()

    def hyperparameters(self) -> dict[str, Any]:
        """The settings that determine the numbers, as a JSON-ready dict (recorded with stored
        results)."""
        return {name: encode_setting(getattr(self, name)) for name in self.settings}
