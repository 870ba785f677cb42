"""The checks every PyTorch method runs before it computes anything, each raising a named
``infscale.errors.UserFixableError`` with a one-line message (what was given, what was expected):

- ``check_eval_mode``: a model in training mode with (non-zero) dropout, batch norm or another
  module whose forward reads ``self.training`` is refused (``TrainingModeError``): its function is
  random or depends on the batch, and per-sample gradients of it are not the gradients of any fixed
  loss. infscale never calls ``model.eval()`` for the user.
- ``StateCheck``: NaN or ±inf in a parameter or buffer (``NonFiniteError``), re-checked only when a
  tensor was changed in place since the last check (``Tensor._version``).
- ``FeatureSpec`` / ``check_query``: the kind, keys and shapes of query features against those of
  the fit (``BatchFormatError``, ``FeatureShapeError``).
- ``probe``: the user's forward and loss on a few rows, without gradients, so that an error of the
  model or the loss (integer features for a float layer, float labels for cross-entropy, targets
  that the loss broadcasts) is reported with the argument's name, shape and dtype
  (``ModelInputError``), and a loss that is NaN or infinite is named with its rows.
- ``check_result``: NaN or ±inf in a query's result, named by the rows of the inputs that caused it.

Inputs are checked for NaN or inf by ``infscale.torch.data.check_finite``.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import (
    BatchFormatError,
    FeatureShapeError,
    ModelInputError,
    NonFiniteError,
    TrainingModeError,
    UserFixableError,
)
from .data import Features, batch_size_of, call_model, describe, take_rows

__all__ = [
    "training_sensitive_modules",
    "check_eval_mode",
    "StateCheck",
    "FeatureSpec",
    "check_query",
    "probe",
    "check_result",
    "input_signature",
    "require_tensor_features",
]

@functools.cache
def _reads_training(cls: type) -> bool:
    """Whether the ``forward`` of ``cls`` reads ``self.training`` (from the source, read once per
    class; a class without source is taken not to)."""
    forward = getattr(cls, "forward", None)
    try:
        source = inspect.getsource(forward)
    except Exception:  # noqa: BLE001 - no source, or a file that is not this code (exec'd snippets)
        return False
    return "self.training" in source


def _depends_on_mode(module: nn.Module) -> bool:
    """Whether the module computes another function in training mode: batch norm always; dropout,
    and torch's RNNs and multi-head attention (which read ``self.training`` for their dropout),
    unless their dropout probability is 0; any other module whose ``forward`` reads
    ``self.training``."""
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return True
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p > 0
    if isinstance(module, (nn.RNNBase, nn.MultiheadAttention)):
        return float(module.dropout) > 0
    return _reads_training(type(module))


def training_sensitive_modules(model: nn.Module) -> list[str]:
    """Names of the modules in training mode whose function depends on it (``_depends_on_mode``);
    the root module is named by its class."""
    return [
        name or type(model).__name__
        for name, module in model.named_modules()
        if module.training and _depends_on_mode(module)
    ]


def check_eval_mode(model: nn.Module, where: str) -> None:
    """Raises ``TrainingModeError`` when ``training_sensitive_modules(model)`` is not empty."""
    names = training_sensitive_modules(model)
    if names:
        listed = ", ".join(
            f"{n!r} ({type(model.get_submodule(n)).__name__ if n != type(model).__name__ else n})"
            for n in names[:3]
        )
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        raise TrainingModeError(
            f"{where}: the model is in training mode, where its modules {listed}{more} compute another "
            "(random or batch-dependent) function; influences need the deterministic one: call "
            "model.eval() first (infscale does not change the model's mode)."
        )


class StateCheck:
    """Checks the model's floating-point parameters and buffers for NaN or ±inf, once per state:
    a tensor changed in place since the last check (its ``_version``) or a new tensor triggers a
    new check. One ``isfinite().all()`` per tensor, one host sync."""

    def __init__(self) -> None:
        self._checked: tuple | None = None

    def __call__(self, model: nn.Module, where: str) -> None:
        tensors = [
            (kind, name, t)
            for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers()))
            for name, t in named
            if t.is_floating_point() or t.is_complex()
        ]
        try:
            key: tuple | None = tuple((id(t), t._version) for _, _, t in tensors)
        except RuntimeError:  # inference tensors have no version counter: check every time
            key = None
        if key is not None and key == self._checked:
            return
        if tensors:
            device = tensors[0][2].device
            with torch.no_grad():
                finite = torch.stack([torch.isfinite(t).all().to(device) for _, _, t in tensors])
            if not bool(finite.all()):
                bad = [f"{kind} {name!r}" for (kind, name, _), ok in zip(tensors, finite.tolist()) if not ok]
                more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
                raise NonFiniteError(
                    f"{where}: the model's {', '.join(bad[:3])}{more} hold NaN or infinite values; "
                    "expected finite numbers (did training diverge?)."
                )
        self._checked = key


# ------------------------------------------------------------------------------ features


@dataclass(frozen=True)
class FeatureSpec:
    """What query features must share with those of the fit: tensor or mapping, the keys, and per
    tensor its number of dimensions and, for a floating-point tensor, its whole feature shape.
    Integer and boolean tensors (token ids, attention masks) may differ in length from batch to
    batch (padding), so only their number of dimensions must match."""

    mapping: bool
    tensors: tuple[tuple[str | None, tuple[int, ...], bool], ...]

    @classmethod
    def of(cls, x: Features) -> FeatureSpec:
        items = x.items() if isinstance(x, Mapping) else [(None, x)]
        return cls(
            isinstance(x, Mapping),
            tuple((k, tuple(t.shape[1:]), t.is_floating_point()) for k, t in items),
        )

    @property
    def feature_shape(self) -> tuple[int, ...] | None:
        """The feature shape of a tensor; None for a mapping."""
        return None if self.mapping else self.tensors[0][1]

    def describe(self) -> str:
        if not self.mapping:
            return f"inputs of feature shape {self.tensors[0][1]}"
        inner = ", ".join(f"{k!r}: (n, {', '.join(map(str, s))})" for k, s, _ in self.tensors)
        return "a mapping {" + inner + "}"


def _check_rows(x: Any, y: Any, where: str, x_name: str, y_name: str) -> None:
    if isinstance(x, Mapping):
        if not x:
            raise BatchFormatError(
                f"{where}: {x_name} is an empty mapping; expected tensors for model(**{x_name})."
            )
        for k, v in x.items():
            if not isinstance(k, str) or not isinstance(v, Tensor):
                raise BatchFormatError(
                    f"{where}: {x_name} must map strings to torch.Tensors; got {k!r}: {type(v).__name__}."
                )
    elif not isinstance(x, Tensor):
        raise BatchFormatError(
            f"{where}: {x_name} must be a torch.Tensor or a mapping of them (e.g. a BatchEncoding); "
            f"got {type(x).__name__}."
        )
    if not isinstance(y, Tensor):
        raise BatchFormatError(f"{where}: {y_name} must be a torch.Tensor; got {type(y).__name__}.")
    tensors = list(x.values()) if isinstance(x, Mapping) else [x]
    rows = {t.shape[0] if t.ndim else None for t in tensors}
    if y.ndim == 0 or None in rows or len(rows) != 1 or y.shape[0] not in rows:
        raise BatchFormatError(
            f"{where}: {x_name} and {y_name} must have the same number of rows; got {x_name} "
            f"({describe(x)}) and {y_name} of shape {tuple(y.shape)}."
        )


def check_query(x: Any, y: Any, fitted: FeatureSpec | None, where: str, x_name: str, y_name: str) -> None:
    """Checks the kind and rows of a query's (x, y) and, once fitted, their features against ``fitted``.

    Raises:
        BatchFormatError: x is neither a tensor nor a mapping of tensors, y not a tensor, or their
            numbers of rows differ.
        FeatureShapeError: the features differ from those of the fit (see ``FeatureSpec``).
    """
    _check_rows(x, y, where, x_name, y_name)
    if fitted is None:
        return
    given = FeatureSpec.of(x)
    if given.mapping != fitted.mapping or {k for k, *_ in given.tensors} != {k for k, *_ in fitted.tensors}:
        raise FeatureShapeError(
            f"{where}: {x_name} is {describe(x)}, but the model was fitted on {fitted.describe()}."
        )
    _check_tensors(given, fitted, where, x_name)


def _check_tensors(given: FeatureSpec, fitted: FeatureSpec, where: str, x_name: str) -> None:
    expected = {k: (shape, floating) for k, shape, floating in fitted.tensors}
    for key, shape, _ in given.tensors:
        want, floating = expected[key]
        if len(shape) != len(want) or (floating and shape != want):
            label = x_name if key is None else f"{x_name}[{key!r}]"
            raise FeatureShapeError(
                f"{where}: {label} has feature shape {shape}, but the model was fitted on inputs of "
                f"feature shape {want}."
            )


def require_tensor_features(x: Features, where: str, x_name: str) -> None:
    """Perturbation mode differentiates with respect to x: it needs one floating-point tensor
    (``BatchFormatError`` otherwise)."""
    if not (isinstance(x, Tensor) and x.is_floating_point()):
        raise BatchFormatError(
            f"{where}: mode='perturbation' differentiates with respect to {x_name} and needs a "
            f"floating-point tensor; got {describe(x)}. Use mode='up'."
        )


def input_signature(x: Features, y: Tensor) -> tuple:
    """The kind of a query's inputs the model and loss were probed on: keys, trailing shapes, dtypes."""
    items = sorted(x.items()) if isinstance(x, Mapping) else [(None, x)]
    return (
        tuple((k, tuple(t.shape[1:]), t.dtype) for k, t in items),
        (tuple(y.shape[1:]), y.dtype),
        str(y.device),
    )


# ------------------------------------------------------------------------------ the user's code


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _broadcasts(w: warnings.WarningMessage) -> bool:
    """torch's losses (mse, l1, smooth l1, huber, ...) warn, then broadcast, on mismatched targets."""
    text = str(w.message)
    return "target size" in text and "different to the input size" in text


def _row_losses(model: nn.Module, loss: Callable, x: Features, y: Tensor) -> Tensor:
    with torch.no_grad():
        values = [loss(call_model(model, take_rows(x, i)), y[i : i + 1]) for i in range(batch_size_of(x))]
    return torch.stack([torch.as_tensor(v).reshape(()) for v in values])


def probe(
    model: nn.Module,
    loss: Callable,
    x: Features,
    y: Tensor,
    where: str,
    x_name: str,
    y_name: str,
    rows: int | None = None,
) -> None:
    """Runs ``loss(model(x), y)`` on the first ``rows`` rows (all by default) without gradients.

    Raises:
        ModelInputError: the model or the loss raised (the message names both arguments with their
            shapes and dtypes and quotes the error, which is chained), torch warned that the loss
            broadcasts the targets, or the loss is not a scalar (the batch mean).
        NonFiniteError: the loss is NaN or infinite; the message names the rows of x where it is.
    """
    xs, ys = (x, y) if rows is None else (take_rows(x, slice(0, rows)), y[:rows])
    given = f"{x_name} ({describe(x)}) and {y_name} ({describe(y)})"
    if rows is not None:
        given += f", run on the first {rows} row{'s' if rows > 1 else ''}"
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = loss(call_model(model, xs), ys)
        except UserFixableError:
            raise
        except Exception as error:
            raise ModelInputError(
                f"{where}: the model or the loss failed on {given}: {_first_line(error)}"
            ) from error
    for w in caught:
        if _broadcasts(w):
            raise ModelInputError(
                f"{where}: the loss broadcasts {y_name} against the model's output on {given} (torch: "
                f"{' '.join(str(w.message).split())}); give targets of the output's shape."
            )
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not isinstance(value, Tensor) or value.ndim != 0:
        got = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
        raise ModelInputError(
            f"{where}: loss(outputs, {y_name}) must return the batch mean, a scalar tensor; got {got} "
            f"on {given} (reduction='none'?)."
        )
    if not bool(torch.isfinite(value)):
        bad = ~torch.isfinite(_row_losses(model, loss, x, y))
        rows_ = bad.nonzero().flatten().tolist()
        raise NonFiniteError(
            f"{where}: the loss is NaN or infinite on rows {rows_[:10]}{' …' if len(rows_) > 10 else ''} "
            f"of {x_name} ({len(rows_)} of {bad.numel()}), although the inputs and parameters are finite."
        )


# ------------------------------------------------------------------------------ results


def _bad_along(bad: Tensor, dim: int) -> list[int]:
    """Indices along ``dim`` where every value is bad."""
    moved = bad.movedim(dim, 0)
    return moved.reshape(moved.shape[0], -1).all(dim=1).nonzero().flatten().tolist()


def check_result(values: Tensor, where: str, row_name: str, col_name: str | None = None) -> Tensor:
    """Returns ``values`` if finite, else raises ``NonFiniteError`` naming the rows (dim 0, inputs
    ``row_name``) and columns (dim 1, inputs ``col_name``) whose every value is NaN or infinite:
    with finite inputs and parameters, those are the points where the loss or its gradient is not
    finite. Every value bad points at the fitted curvature instead."""
    if bool(torch.isfinite(values).all()):
        return values
    bad = ~torch.isfinite(values)
    if bool(bad.all()) and values.numel() > 1:
        raise NonFiniteError(
            f"{where}: every value of the result is NaN or infinite although the inputs and parameters are "
            "finite: the fitted curvature (or its inverse) is not finite, e.g. the training loss is NaN or "
            "infinite on some batch; refit after fixing the loss or the data."
        )
    parts = []
    for dim, name in ((0, row_name), (1, col_name)):
        if name is not None and values.ndim > dim:
            found = _bad_along(bad, dim)
            if found:
                parts.append(f"rows {found[:10]}{' …' if len(found) > 10 else ''} of {name}")
    what = " and ".join(parts) if parts else f"{int(bad.sum())} entries"
    raise NonFiniteError(
        f"{where}: the result is NaN or infinite for {what}: the loss or its gradient is not finite there, "
        "although the inputs and parameters are."
    )
