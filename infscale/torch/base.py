"""What every PyTorch influence method shares: input checks, per-sample gradients, block
structure, settings, and turning factors into influences.

Extension points (hooks). A method subclasses ``TorchInfluenceFunctionModel`` and

must implement
    ``_fit(data)``: fit on the training data (an iterable of (x, y, ...) batches), and
    ``_solve_block(block, rhs)``: apply the (approximate) inverse of the regularized curvature
    block to each row of ``rhs`` (k, p_block).

may declare (class attributes)
    ``settings``: the attribute names that determine its numbers (its full list, once);
        ``hyperparameters()`` records them. Default: λ, block structure, second-order mode.
    ``_default_block_regularization``: λ of the blocks a dict ``hessian_regularization``
        leaves out. Default 0.0.
    ``_train_gradients_are_gradients``: whether ``_train_gradients`` returns per-sample
        gradients (dense or factored), so that a symmetric query may reuse the test gradients
        as training gradients. Default True; a method that projects them sets False.

may override (methods; each default is documented where it is defined)
    ``_gradients(x, y)``: dense per-sample gradients (n, p). Default: the gradient engine.
    ``_train_gradients(x, y)``: the training side of ``_from_gradients``. Default: per-sample
        gradients, factored where the model allows (``GradientEngine.factored``).
    ``_from_gradients(factors, train)``: influences from factors and ``_train_gradients``.
        Default: ``GradientEngine.products``.
    ``_influences(x_test, y_test, x, y, mode, symmetric)``: a query, after the checks. Default:
        factors by ``_solve``, then ``_from_gradients`` (up) or the mixed derivatives (perturbation).
    ``_self_influences_up(x, y)``: gᵢᵀ (H + λI)⁻¹ gᵢ. Default: from ``_solve``.
    ``_chunk()``: samples per chunk of per-sample gradients. Default: ``gradient_chunk_size``, or
        as many as fit in ``memory.GRADIENT_BYTES``.
    ``_check_xy(x, y, ...)``: input checks (extend, calling super()).
    ``_check_targets(y, y_name, where)``: a method's own target checks, run before the probe of
        the model and loss (``validation.probe``). Default: none.

The gradient engine (``self._engine``, every trainable parameter; ``_block_engine(block)`` per
block) is built once in ``__init__`` and reads the parameters' current values at every call.
Nothing here changes the user's model.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..base import InfluenceFunctionModel, InfluenceMode
from .curvature import CurvatureOperator
from .data import Features, check_finite, loader_batches, split_batch, to_device
from .gradients import FactoredGradients, GradientEngine
from .layout import (
    BlockMode,
    LossFunction,
    ParameterLayout,
    SecondOrderMode,
    _Block,
    block_regularization,
    parse_enum,
)
from .memory import default_chunk_size
from .perturbation import perturbation_influences, self_perturbation_influences
from .settings import Configurable
from .validation import (
    FeatureSpec,
    StateCheck,
    check_eval_mode,
    check_query,
    check_result,
    input_signature,
    probe,
    require_tensor_features,
)

__all__ = ["TorchInfluenceFunctionModel"]


class TorchInfluenceFunctionModel(Configurable, InfluenceFunctionModel[Tensor, Iterable]):
    """Base class of the PyTorch influence methods.

    Args:
        model: a ``torch.nn.Module``; influences are taken over its trainable
            parameters (``requires_grad=True``); frozen ones are held fixed.
        loss: ``loss(outputs, targets)`` averaging over the batch, e.g.
            ``torch.nn.functional.cross_entropy``.
        hessian_regularization: λ ≥ 0 added to the curvature's diagonal; a float,
            or a dict block name → float (blocks left out get 0.0).
        block_structure: ``BlockMode.FULL`` (default), ``LAYER_WISE``,
            ``PARAMETER_WISE``, or an ordered mapping block name → parameter names.
            Off-diagonal curvature blocks are dropped; influences are the sum over blocks.
        second_order_mode: ``SecondOrderMode.HESSIAN`` (default) or ``GAUSS_NEWTON``.
        gradient_chunk_size: per-sample gradients are computed this many samples
            at a time (default: as many as fit in 256 MiB, ``memory.GRADIENT_BYTES``).
        held_fixed: names of trainable parameters to hold fixed as if frozen (for methods that
            support only some modules); their ``requires_grad`` is left as it is.
    """

    settings: ClassVar[tuple[str, ...]] = ("hessian_regularization", "block_structure", "second_order_mode")
    _default_block_regularization: ClassVar[float] = 0.0
    _train_gradients_are_gradients: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        loss: LossFunction,
        hessian_regularization: float | Mapping[str, float] = 0.0,
        block_structure: BlockMode | str | Mapping[str, Iterable[str]] = BlockMode.FULL,
        second_order_mode: SecondOrderMode | str = SecondOrderMode.HESSIAN,
        gradient_chunk_size: int | None = None,
        *,
        held_fixed: Iterable[str] = (),
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        if not callable(loss):
            raise TypeError(f"loss must be callable as loss(outputs, targets); got {loss!r}.")
        if gradient_chunk_size is not None and gradient_chunk_size < 1:
            raise ValueError(f"gradient_chunk_size must be ≥ 1 or None; got {gradient_chunk_size}.")
        if isinstance(block_structure, Mapping):  # a mapping of lists, read once
            block_structure = {
                str(k): [v] if isinstance(v, str) else list(v) for k, v in block_structure.items()
            }
        else:
            block_structure = parse_enum(BlockMode, block_structure, "block_structure")
        self.model = model
        self.loss = loss
        self.layout = ParameterLayout(model, block_structure, held_fixed)
        self.block_structure = block_structure
        self.second_order_mode = parse_enum(SecondOrderMode, second_order_mode, "second_order_mode")
        self.hessian_regularization = hessian_regularization
        self.regularization = block_regularization(
            self.layout, hessian_regularization, self._default_block_regularization
        )
        self.gradient_chunk_size = gradient_chunk_size
        # per-sample gradients of every trainable parameter, and of each block (one engine each:
        # an engine remembers whether the batched nn.Linear path applies to this model)
        self._engine = GradientEngine(self.layout, loss)
        self._block_engines = {
            b.name: self._engine if len(self.layout.blocks) == 1 else GradientEngine(self.layout, loss, b)
            for b in self.layout.blocks
        }
        self._fitted = False
        self._feature_shape: tuple[int, ...] | None = None  # of tensor features; None for a mapping
        self._feature_spec: FeatureSpec | None = None
        self._state_check = StateCheck()
        self._probed: set[tuple] = set()  # kinds of query inputs the model and loss ran on
        self.n_train: int | None = None

    # ------------------------------------------------------------------ contract
    @property
    def is_fitted(self) -> bool:
        return self._fitted

    @property
    def is_thread_safe(self) -> bool:
        # torch.func.functional_call swaps the module's parameters while it runs:
        # two threads sharing one module would see each other's swaps.
        return False

    @property
    def n_parameters(self) -> int:
        return self.layout.n_parameters

    @property
    def dtype(self) -> torch.dtype:
        return self.layout.dtype

    @property
    def device(self) -> torch.device:
        return self.layout.device

    def fit(self, data: Iterable) -> TorchInfluenceFunctionModel:
        """Fit on the training data: an iterable of batches ``(x, y)`` or mappings with "labels",
        x a tensor or a mapping of tensors (``infscale.torch.data``), e.g. a DataLoader. Returns self.

        Raises: ValueError (empty data), TypeError (not iterable), and before computing anything
        BatchFormatError, TrainingModeError, NonFiniteError, ModelInputError (``validation``).
        """
        where = self._where("fit")
        self._check_model(where)
        try:
            first = next(iter(loader_batches(data)))
        except StopIteration:
            raise ValueError("data (the training data loader) is empty: it yielded no batch.") from None
        except TypeError:
            raise TypeError(
                f"data must be an iterable of (x, y) batches, e.g. a DataLoader; got {type(data).__name__}."
            ) from None
        x, y = self._to_device(*split_batch(first, "each batch of data (batch 0)"))
        check_finite(x, "x", f"{where} data batch 0")
        check_finite(y, "y", f"{where} data batch 0")
        self._check_targets(y, "the training labels", where)
        probe(self.model, self.loss, x, y, f"{where} on data batch 0", "x", "y")
        self._feature_spec = FeatureSpec.of(x)
        self._feature_shape = self._feature_spec.feature_shape
        self._probed = {input_signature(x, y)}
        self._fit(data)
        self._fitted = True
        return self

    def _fit(self, data: Iterable) -> None:
        """Hook (required): fit on the training data."""
        raise NotImplementedError

    def _solve_block(self, block: _Block, rhs: Tensor) -> Tensor:
        """Hook (required): (H_block + λ_block I)⁻¹ applied to each row of rhs (k, p_block)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    def _to_device(self, x: Features, y: Tensor) -> tuple[Features, Tensor]:
        """(x, y) on the model's device; floating-point tensors in the model's dtype."""
        return to_device(x, self.device, self.dtype), to_device(y, self.device, self.dtype)

    def _fitted_spec(self) -> FeatureSpec | None:
        if self._feature_spec is None and self._feature_shape is not None:  # e.g. a loaded model
            return FeatureSpec(False, ((None, tuple(self._feature_shape), True),))
        return self._feature_spec

    def _check_xy(self, x: Any, y: Any, method: str, x_name: str = "x", y_name: str = "y"):
        """Hook: checks a query's (x, y) (``infscale.torch.validation``: kinds, rows and features,
        eval mode, finite parameters and inputs, the model and loss on the first row of each new kind
        of input) and moves them to the model's device and dtype. Extend via super()."""
        where = self._where(method)
        check_query(x, y, self._fitted_spec(), where, x_name, y_name)
        self._check_model(where)
        x, y = self._to_device(x, y)
        check_finite(x, x_name, where)
        check_finite(y, y_name, where)
        self._check_targets(y, y_name, where)
        signature = input_signature(x, y)
        if signature not in self._probed and y.shape[0]:
            probe(self.model, self.loss, x, y, where, x_name, y_name, rows=1)
            self._probed.add(signature)
        return x, y

    def _check_model(self, where: str) -> None:
        check_eval_mode(self.model, where)
        self._state_check(self.model, where)

    def _check_targets(self, y: Tensor, y_name: str, where: str) -> None:
        """Hook: a method's own checks of the targets, before the model and loss run on them."""

    def _tensor_features(self, x: Features, mode: InfluenceMode, method: str, x_name: str = "x") -> None:
        if mode is InfluenceMode.Perturbation:
            require_tensor_features(x, self._where(method), x_name)

    def _block_engine(self, block: _Block) -> GradientEngine:
        """The per-sample gradient engine of one block's parameters (``self._engine`` when the
        block holds every trainable parameter)."""
        return self._block_engines[block.name]

    def _curvature_operator(self, data: Iterable, block: _Block, mode=None) -> CurvatureOperator:
        return CurvatureOperator(
            self.layout,
            self.loss,
            data,
            block,
            mode or self.second_order_mode,
            self._to_device,
            engine=self._block_engine(block),
        )

    def _chunk(self) -> int:
        """Hook: samples per chunk of per-sample gradients. Default: ``gradient_chunk_size``, or as
        many gradients in the model's dtype as fit in ``memory.GRADIENT_BYTES``."""
        return self.gradient_chunk_size or default_chunk_size(self.n_parameters, self.dtype.itemsize)

    def _gradients(self, x: Tensor, y: Tensor) -> Tensor:
        """Hook: dense per-sample gradients (n, p). Default: the gradient engine."""
        return self._engine.gradients(x, y, self._chunk())

    def _block_rows(self, columns: Mapping[str, Tensor]) -> Tensor:
        """Each block's (p_block, r_block) vectors as rows of the full parameter space, zero
        outside the block: (Σ r_block, p), blocks in order."""
        rows = torch.zeros(
            sum(columns[b.name].shape[1] for b in self.layout.blocks),
            self.n_parameters,
            dtype=self.dtype,
            device=self.device,
        )
        r = 0
        for b in self.layout.blocks:
            V = columns[b.name]
            rows[r : r + V.shape[1], b.slice] = V.T
            r += V.shape[1]
        return rows

    def _solve(self, gradients: Tensor) -> Tensor:
        return torch.cat([self._solve_block(b, gradients[:, b.slice]) for b in self.layout.blocks], dim=1)

    def _from_gradients(self, factors: Tensor, train_gradients: Tensor | FactoredGradients) -> Tensor:
        """Hook: influences (k, n) of factors (k, p) with ``_train_gradients``. Default:
        ``factors @ gradientsᵀ`` by the engine (factored gradients never formed)."""
        return self._engine.products(factors, train_gradients)

    def _perturbation(self, factors: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return perturbation_influences(self.layout, self.loss, factors, x, y, self.gradient_chunk_size)

    # ------------------------------------------------------------------ queries
    def influence_factors(self, x: Tensor, y: Tensor) -> Tensor:
        """(H + λI)⁻¹ ∇ℓ(x_i, y_i) for every sample: shape (n, n_parameters)."""
        self._require_fitted("influence_factors")
        x, y = self._check_xy(x, y, "influence_factors")
        return check_result(self._solve(self._gradients(x, y)), self._where("influence_factors"), "x")

    def influences_from_factors(
        self, z_test_factors: Tensor, x: Tensor, y: Tensor, mode: InfluenceMode | str = InfluenceMode.Up
    ) -> Tensor:
        """Influences of training points (x, y) given the test factors.

        Returns (n_test, n_train) in up mode, (n_test, n_train, *feature_shape) in
        perturbation mode.
        """
        self._require_fitted("influences_from_factors")
        mode = self._parse_mode(mode, "influences_from_factors")
        self._tensor_features(x, mode, "influences_from_factors")
        x, y = self._check_xy(x, y, "influences_from_factors")
        factors = self._check_factors(z_test_factors, "influences_from_factors")
        if mode is InfluenceMode.Up:
            result = self._from_gradients(factors, self._train_gradients(x, y))
        else:
            result = self._perturbation(factors, x, y)
        return check_result(result, self._where("influences_from_factors"), "z_test_factors", "x")

    def train_representation(self, x: Tensor, y: Tensor, mode: InfluenceMode | str = InfluenceMode.Up):
        """Per-sample training gradients (up mode; a ``Tensor`` (n, ·)), or the checked
        (x, y) (perturbation mode), for ``influences_from_representation``."""
        self._require_fitted("train_representation")
        mode = self._parse_mode(mode, "train_representation")
        self._tensor_features(x, mode, "train_representation")
        x, y = self._check_xy(x, y, "train_representation")
        if mode is InfluenceMode.Up:
            return self._train_gradients(x, y)
        return (x, y)

    def influences_from_representation(
        self, z_test_factors: Tensor, representation, mode: InfluenceMode | str = InfluenceMode.Up
    ) -> Tensor:
        """Influences from test factors and a ``train_representation`` made with the same mode."""
        self._require_fitted("influences_from_representation")
        mode = self._parse_mode(mode, "influences_from_representation")
        factors = self._check_factors(z_test_factors, "influences_from_representation")
        if mode is InfluenceMode.Up:
            if not isinstance(representation, (Tensor, FactoredGradients)):
                raise ValueError(
                    f"{type(self).__name__}.influences_from_representation(): the representation "
                    "was made in perturbation mode, but mode is 'up'."
                )
            result = self._from_gradients(factors, representation)
        else:
            if isinstance(representation, (Tensor, FactoredGradients)):
                raise ValueError(
                    f"{type(self).__name__}.influences_from_representation(): the representation "
                    "was made in up mode, but mode is 'perturbation'."
                )
            x, y = representation
            result = self._perturbation(factors, x, y)
        where = self._where("influences_from_representation")
        return check_result(result, where, "z_test_factors", "the representation's training points")

    def _train_gradients(self, x: Tensor, y: Tensor) -> Tensor | FactoredGradients:
        """Hook: the training side of ``_from_gradients``. Default: per-sample gradients, in
        factored form where that is smaller and faster (``GradientEngine.factored``). A method
        that returns something else (a projection) sets ``_train_gradients_are_gradients = False``."""
        return self._engine.factored(x, y, self._chunk())

    def _check_factors(self, factors: Any, method: str) -> Tensor:
        if not isinstance(factors, Tensor) or factors.ndim != 2 or factors.shape[1] != self.n_parameters:
            shape = tuple(factors.shape) if isinstance(factors, Tensor) else type(factors).__name__
            raise ValueError(
                f"{type(self).__name__}.{method}(): z_test_factors must be a tensor of shape "
                f"(n_test, {self.n_parameters}); got {shape}."
            )
        check_finite(factors, "z_test_factors", self._where(method))
        return factors.to(self.device, self.dtype)

    def _where(self, method: str) -> str:
        return f"{type(self).__name__}.{method}()"

    def influences(
        self,
        x_test: Tensor,
        y_test: Tensor,
        x: Tensor | None = None,
        y: Tensor | None = None,
        mode: InfluenceMode | str = InfluenceMode.Up,
    ) -> Tensor:
        """Influences of training points (x, y) on test points (x_test, y_test).

        ``∇ℓ(z_test)ᵀ (H + λI)⁻¹ ∇ℓ(z_train)``: positive means up-weighting the
        training point lowers the test loss. Shape (n_test, n_train) in up mode,
        (n_test, n_train, *feature_shape) in perturbation mode. With x and y both
        None the test set is taken against itself.

        Raises:
            NotFittedError, UnsupportedInfluenceModeError, ValueError (only one of
            x, y given; mismatched lengths or feature shapes).
        """
        self._require_fitted("influences")
        mode = self._parse_mode(mode, "influences")
        x_test, y_test = self._check_xy(x_test, y_test, "influences", "x_test", "y_test")
        if (x is None) != (y is None):
            given = "x" if x is not None else "y"
            raise ValueError(
                f"{type(self).__name__}.influences(): only {given} was given; give both x and y, "
                "or neither to take the test set against itself."
            )
        symmetric = x is None
        self._tensor_features(x_test if symmetric else x, mode, "influences", "x_test" if symmetric else "x")
        if not symmetric:
            x, y = self._check_xy(x, y, "influences")
        result = self._influences(x_test, y_test, x, y, mode, symmetric)
        return check_result(result, self._where("influences"), "x_test", "x_test" if symmetric else "x")

    def _influences(self, x_test, y_test, x, y, mode, symmetric) -> Tensor:
        """Hook: a query after the checks. Default: factors by ``_solve``, then ``_from_gradients``
        (up; the test gradients serve as training gradients for a symmetric query when
        ``_train_gradients_are_gradients``) or the mixed derivatives (perturbation)."""
        test_gradients = self._gradients(x_test, y_test)
        factors = self._solve(test_gradients)
        if mode is InfluenceMode.Up:
            if symmetric and self._train_gradients_are_gradients:
                return self._from_gradients(factors, test_gradients)
            return self._from_gradients(
                factors, self._train_gradients(x_test if symmetric else x, y_test if symmetric else y)
            )
        if symmetric:
            x, y = x_test, y_test
        return self._perturbation(factors, x, y)

    def self_influences(self, x: Tensor, y: Tensor, mode: InfluenceMode | str = InfluenceMode.Up) -> Tensor:
        """The diagonal of ``influences(x, y)`` without the rest: (n,) in up mode,
        (n, *feature_shape) in perturbation mode."""
        self._require_fitted("self_influences")
        mode = self._parse_mode(mode, "self_influences")
        self._tensor_features(x, mode, "self_influences")
        x, y = self._check_xy(x, y, "self_influences")
        if mode is InfluenceMode.Up:
            result = self._self_influences_up(x, y)
        else:
            factors = self._solve(self._gradients(x, y))
            result = self_perturbation_influences(
                self.layout, self.loss, factors, x, y, self.gradient_chunk_size
            )
        return check_result(result, self._where("self_influences"), "x")

    def _self_influences_up(self, x: Tensor, y: Tensor) -> Tensor:
        """Hook: gᵢᵀ (H + λI)⁻¹ gᵢ for each row, (n,). Default: from ``_solve``; a method may use
        its inverse's structure."""
        gradients = self._gradients(x, y)
        return (self._solve(gradients) * gradients).sum(dim=1)

    # ------------------------------------------------------------------ per block
    def influence_factors_by_block(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """``influence_factors`` split by block: name → (n, p_block)."""
        factors = self.influence_factors(x, y)
        return {b.name: factors[:, b.slice] for b in self.layout.blocks}

    def influences_from_factors_by_block(
        self,
        z_test_factors: Mapping[str, Tensor],
        x: Tensor,
        y: Tensor,
        mode: InfluenceMode | str = InfluenceMode.Up,
    ) -> dict[str, Tensor]:
        """``influences_from_factors`` per block; the total is the sum over blocks."""
        self._require_fitted("influences_from_factors_by_block")
        mode = self._parse_mode(mode, "influences_from_factors_by_block")
        self._tensor_features(x, mode, "influences_from_factors_by_block")
        x, y = self._check_xy(x, y, "influences_from_factors_by_block")
        names = self.layout.block_names
        if not isinstance(z_test_factors, Mapping) or set(z_test_factors) != set(names):
            got = (
                sorted(z_test_factors)
                if isinstance(z_test_factors, Mapping)
                else type(z_test_factors).__name__
            )
            raise ValueError(
                f"{type(self).__name__}.influences_from_factors_by_block(): z_test_factors must be "
                f"a dict with the blocks {names}; got {got}."
            )
        result = {}
        if mode is InfluenceMode.Up:
            gradients = self._gradients(x, y)
            for b in self.layout.blocks:
                result[b.name] = z_test_factors[b.name].to(self.device, self.dtype) @ gradients[:, b.slice].T
            return result
        for b in self.layout.blocks:
            padded = torch.zeros(
                z_test_factors[b.name].shape[0], self.n_parameters, dtype=self.dtype, device=self.device
            )
            padded[:, b.slice] = z_test_factors[b.name]
            result[b.name] = self._perturbation(padded, x, y)
        return result

    def influences_by_block(
        self,
        x_test: Tensor,
        y_test: Tensor,
        x: Tensor | None = None,
        y: Tensor | None = None,
        mode: InfluenceMode | str = InfluenceMode.Up,
    ) -> dict[str, Tensor]:
        """``influences`` per block: name → (n_test, n_train[, *feature_shape]).
        The total over blocks equals ``influences``."""
        if (x is None) != (y is None):
            self.influences(x_test, y_test, x, y, mode)  # raises the same error
        factors = self.influence_factors_by_block(x_test, y_test)
        if x is None:
            x, y = x_test, y_test
        return self.influences_from_factors_by_block(factors, x, y, mode)

    # ------------------------------------------------------------------ λ sweep
    def with_regularization(self, hessian_regularization: float | Mapping[str, float]):
        """A copy with another regularization, reusing the fitted decomposition.

        Only methods that can do this cheaply implement it.
        """
        raise NotImplementedError(
            f"{type(self).__name__} cannot change its regularization without refitting; "
            "create a new model instead."
        )

    def _copy_with_regularization(self, hessian_regularization):
        self._require_fitted("with_regularization")
        new = copy.copy(self)
        new.hessian_regularization = hessian_regularization
        new.regularization = block_regularization(
            self.layout, hessian_regularization, self._default_block_regularization
        )
        return new
