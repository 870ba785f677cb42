"""Every exception infscale raises on purpose, in one place.

Errors whose cause the user can fix (a bad argument, a λ too small for the curvature, a store
that is in the way, a multi-threaded Dask worker, ...) derive from :class:`UserFixableError`.
The ``infscale`` command maps exactly those to exit code 2 by their type; anything else is an
internal error (exit code 1). Each class also keeps the builtin base it always had
(``ValueError``, ``RuntimeError``, ``FileExistsError``), so ``except ValueError`` in user code
goes on working.

The classes are re-exported where they used to live (``infscale.base``, ``infscale.array``,
``infscale.parallel``, ``infscale.torch.direct``, ``infscale.torch.lissa``), so old imports work.

This module is framework-free: it imports neither torch nor dask nor zarr.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "UserFixableError",
    "UsageError",
    "NotFittedError",
    "UnsupportedInfluenceModeError",
    "NotPositiveDefiniteError",
    "LissaDivergenceError",
    "ThreadSafetyViolationError",
    "InvalidDimensionChunksError",
    "UnalignedChunksError",
    "StoreExistsError",
    "StoreMismatchError",
    "NonFiniteError",
    "is_user_fixable",
]


class UserFixableError(Exception):
    """Marker base: the message says what the user should change. The command exits with code 2."""


def is_user_fixable(error: BaseException) -> bool:
    """Whether ``error`` is one a user can fix (the command's exit code 2)."""
    return isinstance(error, UserFixableError)


class UsageError(UserFixableError):
    """A bad flag, factory, parameter or store given to the ``infscale`` command."""


class NotFittedError(UserFixableError, ValueError):
    """A method that needs a fitted model was called before ``fit``."""

    def __init__(self, cls: type, method_name: str, message: str | None = None):
        super().__init__(
            message
            or f"{cls.__name__}.{method_name}() was called before fit(): "
            f"call {cls.__name__}.fit(train_dataloader) first."
        )


class UnsupportedInfluenceModeError(UserFixableError, ValueError):
    """An influence mode that is neither ``"up"`` nor ``"perturbation"``."""

    def __init__(self, mode: Any, cls: type | None = None, method_name: str | None = None):
        where = f"{cls.__name__}.{method_name}(): " if cls and method_name else ""
        super().__init__(
            f"{where}unsupported influence mode {mode!r}; expected one of 'up', 'perturbation'."
        )


class NotPositiveDefiniteError(UserFixableError, ValueError):
    """The regularized curvature H + λI is not positive definite (Direct, Arnoldi, CG, EK-FAC).

    The message estimates the ``hessian_regularization`` that makes it positive definite.
    """


class LissaDivergenceError(UserFixableError, RuntimeError):
    """The LiSSA iteration diverged (non-finite or exploding iterates)."""


class ThreadSafetyViolationError(UserFixableError, RuntimeError):
    """A model that is not thread-safe was paired with a client whose workers run several threads."""

    def __init__(self, model_name: str, workers: dict[str, int], what_happened: str | None = None):
        listed = ", ".join(f"{address} ({n} threads)" for address, n in sorted(workers.items()))
        happened = what_happened or f"these Dask workers run more than one thread: {listed}"
        super().__init__(
            f"{model_name} is not thread-safe (is_thread_safe is False), but {happened}. Start the cluster "
            "with one thread per worker, e.g. Client(threads_per_worker=1) or `dask worker --nthreads 1`, "
            "or pass client=DisableClientSingleThreadCheck to skip this check (e.g. with the synchronous "
            "scheduler)."
        )
        self._state = (model_name, dict(workers), what_happened)

    def __reduce__(self):  # raised on a Dask worker, it travels back to the client pickled
        return (type(self), self._state)


class InvalidDimensionChunksError(UserFixableError, ValueError):
    """An input array is chunked along an axis other than the first (rows)."""

    def __init__(self, name: str, chunks: tuple):
        super().__init__(
            f"{name} must be chunked along its first axis (rows) only; got chunks {chunks}. "
            f"Rechunk the other axes into one chunk, e.g. {name}.rechunk({{i: -1 for i in range(1, "
            f"{name}.ndim)}})."
        )


class UnalignedChunksError(UserFixableError, ValueError):
    """Two arrays that are read row by row together have different row chunks."""

    def __init__(self, name_a: str, chunks_a: tuple, name_b: str, chunks_b: tuple):
        super().__init__(
            f"{name_a} and {name_b} must have the same row chunks; got {name_a}.chunks[0]={chunks_a} "
            f"and {name_b}.chunks[0]={chunks_b}. Rechunk one like the other, e.g. "
            f"{name_b} = {name_b}.rechunk({{0: {name_a}.chunks[0]}})."
        )


class StoreExistsError(UserFixableError, FileExistsError):
    """The target of ``to_zarr`` already holds data and neither overwrite nor resume was asked."""


class StoreMismatchError(UserFixableError, ValueError):
    """``resume=True`` against a store written for another computation."""


class NonFiniteError(UserFixableError, ValueError):
    """NaN or infinite values where numbers must be finite: in the data, the model's parameters,
    the loss, or a computed result. The message names where (which batch, rows or parameter).
    Nothing is written to a store once such a value is seen."""


__all__ += ["BatchFormatError", "FeatureShapeError", "ModelInputError", "TrainingModeError"]


class BatchFormatError(UserFixableError, ValueError, TypeError):
    """Data that infscale cannot read without guessing: a batch that is neither ``(x, y)`` nor a
    mapping with ``"labels"``, features that are neither a tensor nor a mapping of tensors, tensors
    whose numbers of rows differ, or a mapping where a query needs a tensor (perturbation mode).
    Also a ``TypeError``, as a wrong kind of argument was before."""


class FeatureShapeError(UserFixableError, ValueError):
    """Query features whose shape (or, for a mapping, keys) differ from those the model was fitted on."""


class ModelInputError(UserFixableError, ValueError):
    """The user's model or loss failed (or warned that it broadcasts) on the given data, checked once on
    the first batch at ``fit`` and on the first row of each new kind of query input. The message names
    the argument, its shape and dtype, and the original error (chained as ``__cause__``)."""


class TrainingModeError(UserFixableError, ValueError):
    """The model is in training mode and holds modules whose function differs in training mode
    (dropout, batch norm, or any module whose ``forward`` reads ``self.training``): influences need
    the deterministic function, so call ``model.eval()``. infscale never changes the model's mode."""


class UnsupportedCurvatureError(UserFixableError, ValueError):
    """The chosen ``second_order_mode`` needs derivatives PyTorch does not provide for a module of
    the model (``nn.EmbeddingBag`` has no Hessian- or Gauss-Newton-vector products). The message
    names the module and offers ``second_order_mode="empirical_fisher"``, which needs first-order
    gradients only."""


__all__.append("UnsupportedCurvatureError")
