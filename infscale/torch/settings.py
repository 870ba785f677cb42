"""Declared settings: each configurable class lists, once, the attributes that determine its
numbers; ``hyperparameters()`` records them (the calculators store that record with every
result and compare it when a stored computation is resumed).

pyDVL 0.10 keywords: code written against pyDVL 0.10's influence API passes keywords that infscale
names differently (``regularization=``) or has no use for (CG's ``solve_simultaneously=``). They
are translated here, once for every method (``PYDVL_KEYWORDS``, applied by ``Configurable`` before
a method's ``__init__`` runs), so a method's signature keeps only infscale's own names. See
docs/migrating-from-pydvl.md.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import torch

__all__ = ["Configurable", "PYDVL_KEYWORDS", "PydvlKeyword", "encode_setting", "translate_pydvl_keywords"]


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


@dataclass(frozen=True)
class PydvlKeyword:
    """How infscale takes one keyword of pyDVL 0.10 that it does not have under that name.

    Attributes:
        target: the infscale keyword that receives the value (an alias), or None: the keyword
            changes nothing in infscale and is dropped after its value is checked to be a bool.
        why: one line for the documentation and the error messages.
    """

    target: str | None
    why: str


def _pydvl_regularization(value: Any) -> Any:
    """pyDVL's ``regularization``: None (its default) and a dict's None values mean no
    regularization, infscale's 0.0."""
    if value is None:
        return 0.0
    if isinstance(value, Mapping):
        return {k: 0.0 if v is None else v for k, v in value.items()}
    return value


_ALIAS_VALUES: dict[str, Callable[[Any], Any]] = {"regularization": _pydvl_regularization}

#: class name → pyDVL 0.10 keyword → how it is taken. A class also takes the keywords listed
#: under the names of the classes it derives from (every method takes ``regularization``).
PYDVL_KEYWORDS: dict[str, dict[str, PydvlKeyword]] = {
    "TorchInfluenceFunctionModel": {
        "regularization": PydvlKeyword(
            "hessian_regularization", "pyDVL 0.10's name for λ; None there means 0.0"
        ),
    },
    "CgInfluence": {
        "precompute_grad": PydvlKeyword(None, "stored but never read by pyDVL 0.10's CgInfluence"),
        "solve_simultaneously": PydvlKeyword(
            None, "infscale always solves all right-hand sides together, by block CG"
        ),
        "warn_on_max_iteration": PydvlKeyword(
            None, "infscale always warns (RuntimeWarning) when CG misses its tolerance"
        ),
    },
    "LissaInfluence": {
        "warn_on_max_iteration": PydvlKeyword(
            None, "infscale always warns (RuntimeWarning) when LiSSA reaches maxiter"
        ),
    },
    "ArnoldiInfluence": {
        "eigen_computation_on_gpu": PydvlKeyword(
            None, "infscale's Lanczos runs in torch on the model's device either way"
        ),
    },
}


def _keywords_of(cls: type) -> dict[str, PydvlKeyword]:
    """The pyDVL keywords ``cls`` takes: those of its own name and of its base classes."""
    table: dict[str, PydvlKeyword] = {}
    for klass in reversed(cls.__mro__):
        table.update(PYDVL_KEYWORDS.get(klass.__name__, {}))
    return table


def translate_pydvl_keywords(
    cls: type, signature: inspect.Signature, args: tuple, kwargs: dict[str, Any]
) -> dict[str, Any]:
    """``kwargs`` with the pyDVL 0.10 keywords of ``cls`` translated (``PYDVL_KEYWORDS``): an alias
    passes its value on under infscale's name, a keyword that changes nothing is dropped. Keywords
    that ``signature`` (the ``__init__``'s, with ``self``) names itself are left alone.

    Raises:
        TypeError: an alias given together with its infscale name (by keyword or position), e.g.
            both ``regularization`` and ``hessian_regularization``; a value that is not a bool for a
            keyword that changes nothing.
    """
    own = signature.parameters
    table = _keywords_of(cls)
    foreign = [k for k in kwargs if k not in own and k in table]
    if not foreign:
        return kwargs
    kwargs = dict(kwargs)
    given = {k: kwargs.pop(k) for k in foreign}
    bound = signature.bind_partial(*args, **kwargs).arguments  # what is given under infscale's names
    for name, value in given.items():
        keyword = table[name]
        if keyword.target is None:
            if not isinstance(value, bool):
                raise TypeError(
                    f"{cls.__name__}(): {name}= (a pyDVL 0.10 keyword that changes nothing here: "
                    f"{keyword.why}) must be True or False; got {value!r}."
                )
            continue
        if keyword.target in bound or keyword.target in kwargs:
            raise TypeError(
                f"{cls.__name__}(): {name}= ({keyword.why}) and {keyword.target}= set the same thing; "
                f"give one of them, not both; got {name}={value!r} and "
                f"{keyword.target}={bound.get(keyword.target, kwargs.get(keyword.target))!r}."
            )
        kwargs[keyword.target] = _ALIAS_VALUES.get(name, lambda v: v)(value)
    return kwargs


def _translating(init: Callable) -> Callable:
    """``init`` behind ``translate_pydvl_keywords`` (signature and docstring kept for help())."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        kwargs = translate_pydvl_keywords(type(self), signature, (self, *args), kwargs)
        init(self, *args, **kwargs)

    __init__._translates_pydvl_keywords = True  # type: ignore[attr-defined]
    return __init__


class Configurable:
    """Mixin: ``hyperparameters()`` from the class's one declaration of its settings, and
    pyDVL 0.10's keywords translated before a subclass's ``__init__`` runs.

    A subclass sets ``settings`` to the names of the attributes that determine its numbers (its
    full list, including inherited ones it keeps); each is recorded under its own name, encoded
    by ``encode_setting``. Each ``__init__`` a subclass defines is wrapped (``__init_subclass__``)
    so that it also takes the pyDVL 0.10 keywords of ``PYDVL_KEYWORDS``.
    """

    settings: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "_translates_pydvl_keywords", False):
            cls.__init__ = _translating(init)  # type: ignore[method-assign]

    def hyperparameters(self) -> dict[str, Any]:
        """The settings that determine the numbers, as a JSON-ready dict (recorded with stored
        results)."""
        return {name: encode_setting(getattr(self, name)) for name in self.settings}

    def fingerprint(self) -> str:
        """A short hash of the model's parameters and buffers (names, dtypes, shapes and values)
        and of ``hyperparameters()``: stores record it, and a resume that finds another one (a
        retrained model, other settings) is refused. Costs one read of the parameters."""
        digest = hashlib.blake2b(digest_size=12)
        digest.update(json.dumps(self.hyperparameters(), sort_keys=True, default=str).encode())
        model = self.model  # type: ignore[attr-defined]
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return digest.hexdigest()
