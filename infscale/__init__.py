"""infscale: influence functions for PyTorch models at any scale.

Sign convention: ``influences()`` returns ∇ℓ(z_test)ᵀ (H + λI)⁻¹ ∇ℓ(z_train), shape
(n_test, n_train). Positive means up-weighting that training point lowers the test
loss (it helps); removing training point i changes the test loss by about
``+influence / n_train``.

The Dask names (``DaskInfluenceCalculator``, ...) are resolved on first use, so importing
infscale (and starting the ``infscale`` command) does not import dask.array.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__
from .base import SIGN_CONVENTION, InfluenceFunctionModel, InfluenceMode
from .calculator import SequentialInfluenceCalculator
from .errors import (
    BatchFormatError,
    FeatureShapeError,
    InvalidDimensionChunksError,
    ModelInputError,
    NonFiniteError,
    NotFittedError,
    NotPositiveDefiniteError,
    StoreExistsError,
    StoreMismatchError,
    ThreadSafetyViolationError,
    TrainingModeError,
    UnalignedChunksError,
    UnsupportedCurvatureError,
    UnsupportedInfluenceModeError,
    UserFixableError,
)

#: Names resolved lazily (module that defines them).
_LAZY = {
    "DaskInfluenceCalculator": "infscale.parallel",
    "DisableClientSingleThreadCheck": "infscale.parallel",
    "dask_to_zarr": "infscale.parallel",
}

__all__ = [
    "DaskInfluenceCalculator",
    "DisableClientSingleThreadCheck",
    "dask_to_zarr",
    "InvalidDimensionChunksError",
    "ThreadSafetyViolationError",
    "UnalignedChunksError",
    "SIGN_CONVENTION",
    "InfluenceFunctionModel",
    "InfluenceMode",
    "NotFittedError",
    "NotPositiveDefiniteError",
    "SequentialInfluenceCalculator",
    "StoreExistsError",
    "StoreMismatchError",
    "UnsupportedInfluenceModeError",
    "UserFixableError",
    "BatchFormatError",
    "FeatureShapeError",
    "ModelInputError",
    "NonFiniteError",
    "TrainingModeError",
    "UnsupportedCurvatureError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'infscale' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
