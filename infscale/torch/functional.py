"""The former home of the torch core; now re-exports only, so that old imports keep working.

The code lives in small modules with one job each:

- ``layout``: ``SecondOrderMode``, ``BlockMode``, ``ParameterLayout``, ``block_regularization``
- ``data``: ``split_batch``, ``loader_batches``, ``device_batches``
- ``memory``: every memory and chunk knob (``default_chunk_size``, ``MERGE_ROWS``, …)
- ``gradients``: ``GradientEngine``, ``per_sample_gradients``, ``gradient_engine``
- ``curvature``: ``CurvatureOperator``
- ``perturbation``: ``perturbation_influences``, ``self_perturbation_influences``
- ``linalg``: ``stack_rows`` and the not-positive-definite message

The constants below are copies: to change a knob, set it on ``infscale.torch.memory``.
"""

from __future__ import annotations

from .curvature import CurvatureOperator, _jvp_with_target
from .data import device_batches, loader_batches, split_batch, tensor_dataset_batches
from .gradients import FactoredGradients, GradientEngine, gradient_engine, per_sample_gradients
from .layout import (
    BlockMode,
    LossFunction,
    ParameterLayout,
    SecondOrderMode,
    _Block,
    _parse_enum,
    block_regularization,
    parse_enum,
)
from .linalg import stack_rows
from .memory import GRADIENT_BYTES, VECTOR_SAMPLE_PAIRS, default_chunk_size, merge_limits
from .perturbation import perturbation_influences, self_perturbation_influences

__all__ = [
    "BlockMode",
    "SecondOrderMode",
    "ParameterLayout",
    "LossFunction",
    "per_sample_gradients",
    "perturbation_influences",
    "self_perturbation_influences",
    "CurvatureOperator",
    "split_batch",
    "loader_batches",
    "tensor_dataset_batches",
    "device_batches",
    "block_regularization",
    "default_chunk_size",
    "gradient_engine",
    "parse_enum",
    "stack_rows",
    "GradientEngine",
    "FactoredGradients",
    "_Block",
    "_parse_enum",
    "_jvp_with_target",
]

#: former names of the memory knobs (copies; see ``infscale.torch.memory``)
DEFAULT_GRADIENT_MEMORY = GRADIENT_BYTES
VECTORS_TIMES_SAMPLES = VECTOR_SAMPLE_PAIRS
MERGE_ROWS, MERGE_BYTES = merge_limits()
