"""infscale: influence functions for PyTorch models at any scale.

Sign convention: ``influences()`` returns ∇ℓ(z_test)ᵀ (H + λI)⁻¹ ∇ℓ(z_train), shape
(n_test, n_train). Positive means up-weighting that training point lowers the test
loss (it helps); removing training point i changes the test loss by about
``+influence / n_train``.
"""

from .base import (
    SIGN_CONVENTION,
    InfluenceFunctionModel,
    InfluenceMode,
    NotFittedError,
    UnsupportedInfluenceModeError,
)
from .calculator import SequentialInfluenceCalculator
from .parallel import (
    DaskInfluenceCalculator,
    DisableClientSingleThreadCheck,
    InvalidDimensionChunksError,
    ThreadSafetyViolationError,
    UnalignedChunksError,
)

__version__ = "0.1.0"

__all__ = [
    "DaskInfluenceCalculator",
    "DisableClientSingleThreadCheck",
    "InvalidDimensionChunksError",
    "ThreadSafetyViolationError",
    "UnalignedChunksError",
    "SIGN_CONVENTION",
    "InfluenceFunctionModel",
    "InfluenceMode",
    "NotFittedError",
    "SequentialInfluenceCalculator",
    "UnsupportedInfluenceModeError",
    "__version__",
]
