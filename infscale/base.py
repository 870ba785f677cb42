"""The framework-free contract every influence method implements.

Sign convention (the same everywhere in infscale)::

    influences(z_test, z_train) = ∇ℓ(z_test)ᵀ (H + λI)⁻¹ ∇ℓ(z_train)

with shape (n_test, n_train). A positive value means that up-weighting the
training point lowers the test loss: the training point *helps* that test
prediction. Removing training point i changes the test loss by about
``+influence / n_train``.

In perturbation mode the result is the derivative of that quantity with respect
to the training input, shape (n_test, n_train, *input_feature_shape).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import Enum
from typing import Any, Generic, TypeVar

import numpy as np

from .errors import NotFittedError, UnsupportedInfluenceModeError

__all__ = [
    "SIGN_CONVENTION",
    "InfluenceMode",
    "InfluenceFunctionModel",
    "NotFittedError",
    "UnsupportedInfluenceModeError",
    "numpy_dtype",
]

SIGN_CONVENTION = (
    "influences = grad_test^T (H + lambda I)^-1 grad_train, shape (n_test, n_train); "
    "positive: up-weighting the training point lowers the test loss (it helps); "
    "removing training point i changes the test loss by about +influence / n_train"
)

def numpy_dtype(dtype: Any) -> np.dtype:
    """The numpy dtype of a model's ``dtype`` attribute, numpy or torch (``torch.float32`` →
    ``float32``), without importing torch; float32 where numpy has no equivalent (bfloat16)."""
    try:
        return np.dtype(dtype)
    except TypeError:
        name = str(dtype).rsplit(".", 1)[-1]
        try:
            return np.dtype(name)
        except TypeError:
            return np.dtype(np.float32)


TensorType = TypeVar("TensorType")
DataLoaderType = TypeVar("DataLoaderType")


class InfluenceMode(str, Enum):
    """How the influence of a training point is measured.

    - ``up``: up-weighting the training point, result (n_test, n_train).
    - ``perturbation``: perturbing the training input, result
      (n_test, n_train, *input_feature_shape).

    Plain strings ``"up"`` and ``"perturbation"`` are accepted wherever a mode is.
    """

    Up = "up"
    Perturbation = "perturbation"

    @classmethod
    def parse(cls, mode: Any, owner: type | None = None, method_name: str | None = None) -> InfluenceMode:
        """Turn ``mode`` (an ``InfluenceMode`` or its string value) into an ``InfluenceMode``.

        Raises:
            UnsupportedInfluenceModeError: for anything else.
        """
        if isinstance(mode, InfluenceMode):
            return mode
        if isinstance(mode, str):
            for member in cls:
                if member.value == mode:
                    return member
        raise UnsupportedInfluenceModeError(mode, owner, method_name)


class InfluenceFunctionModel(Generic[TensorType, DataLoaderType], ABC):
    """Abstract influence function model.

    Subclasses are fitted on training data once (``fit``) and then answer
    queries. See the module docstring for the sign convention and shapes.
    """

    @property
    @abstractmethod
    def is_fitted(self) -> bool:
        """Whether ``fit`` has been called."""

    @property
    @abstractmethod
    def is_thread_safe(self) -> bool:
        """Whether several threads may call this model's query methods at once."""

    @property
    @abstractmethod
    def n_parameters(self) -> int:
        """The number of trainable parameters the influences are taken over."""

    @abstractmethod
    def fit(self, data: DataLoaderType) -> InfluenceFunctionModel:
        """Fit the curvature approximation on training data; returns ``self``."""

    def fingerprint(self) -> str | None:
        """A short hash of what the numbers depend on besides the data: the model's parameters
        and buffers and the influence model's settings. Stores record it, and a resume that
        finds another one is refused. The default (None) records nothing."""
        return None

    def _require_fitted(self, method_name: str) -> None:
        if not self.is_fitted:
            raise NotFittedError(type(self), method_name)

    def _parse_mode(self, mode: Any, method_name: str) -> InfluenceMode:
        return InfluenceMode.parse(mode, type(self), method_name)

    @abstractmethod
    def influence_factors(self, x: TensorType, y: TensorType) -> TensorType:
        """The factors (H + λI)⁻¹ ∇ℓ(x, y), one row per sample: shape (n, n_parameters)."""

    @abstractmethod
    def influences_from_factors(
        self,
        z_test_factors: TensorType,
        x: TensorType,
        y: TensorType,
        mode: InfluenceMode | str = InfluenceMode.Up,
    ) -> TensorType:
        """Influences of the training points (x, y) on the test points whose factors are given.

        Returns (n_test, n_train) in up mode, (n_test, n_train, *feature_shape) in
        perturbation mode.
        """

    def train_representation(
        self, x: TensorType, y: TensorType, mode: InfluenceMode | str = InfluenceMode.Up
    ) -> Any:
        """What the training side of ``influences_from_factors`` needs, computed once.

        Calculators call this once per training chunk and reuse the result for
        every test chunk (when it fits their memory budget). The default is the
        data itself; gradient-based models return per-sample gradients (or their
        projections) so that nothing is recomputed per (test, train) block pair.
        """
        self._parse_mode(mode, "train_representation")
        return (x, y)

    def influences_from_representation(
        self,
        z_test_factors: TensorType,
        representation: Any,
        mode: InfluenceMode | str = InfluenceMode.Up,
    ) -> TensorType:
        """``influences_from_factors`` from a ``train_representation`` made with the same mode."""
        x, y = representation
        return self.influences_from_factors(z_test_factors, x, y, mode)

    @abstractmethod
    def influences(
        self,
        x_test: TensorType,
        y_test: TensorType,
        x: TensorType | None = None,
        y: TensorType | None = None,
        mode: InfluenceMode | str = InfluenceMode.Up,
    ) -> TensorType:
        """Influences of training points (x, y) on test points (x_test, y_test).

        With ``x`` and ``y`` both None, the test set is taken against itself.
        Giving only one of them raises ``ValueError``.
        """

    @abstractmethod
    def self_influences(
        self, x: TensorType, y: TensorType, mode: InfluenceMode | str = InfluenceMode.Up
    ) -> TensorType:
        """The diagonal of ``influences(x, y)``: shape (n,) in up mode, (n, *feature_shape)
        in perturbation mode, computed without the off-diagonal entries."""
