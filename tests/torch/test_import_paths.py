"""Old import paths (used in docs, tests and users' code) keep giving the same objects.

The package's shape itself (line limits, boxes, cycles) is checked in tests/test_layering.py.
"""

from __future__ import annotations

import infscale.torch


def test_old_import_paths_give_the_new_objects():
    from infscale.torch import curvature, data, gradients, layout, linalg, memory, perturbation
    from infscale.torch import functional as old

    assert old.ParameterLayout is layout.ParameterLayout
    assert old.BlockMode is layout.BlockMode and old.SecondOrderMode is layout.SecondOrderMode
    assert old.CurvatureOperator is curvature.CurvatureOperator
    assert old.split_batch is data.split_batch and old.loader_batches is data.loader_batches
    assert old.per_sample_gradients is gradients.per_sample_gradients
    assert old.gradient_engine is gradients.gradient_engine
    assert old.perturbation_influences is perturbation.perturbation_influences
    assert old.self_perturbation_influences is perturbation.self_perturbation_influences
    assert old.block_regularization is layout.block_regularization
    assert old.default_chunk_size is memory.default_chunk_size
    assert old.stack_rows is linalg.stack_rows
    assert old.MERGE_ROWS == memory.MERGE_ROWS and old.DEFAULT_GRADIENT_MEMORY == memory.GRADIENT_BYTES
    for name in old.__all__:
        assert hasattr(old, name), name
    for name in infscale.torch.__all__:
        assert hasattr(infscale.torch, name), name


def test_old_framework_free_paths_give_the_new_objects():
    from infscale import aggregators, array, errors, sequences, store

    assert array.TopKAggregator is aggregators.TopKAggregator
    assert array.NestedLazyChunkSequence is sequences.NestedLazyChunkSequence
    assert array.StoreExistsError is errors.StoreExistsError is store.StoreExistsError
    assert array.completed_blocks is store.completed_blocks
    from infscale.base import NotFittedError
    from infscale.parallel import ThreadSafetyViolationError
    from infscale.torch.direct import NotPositiveDefiniteError
    from infscale.torch.lissa import LissaDivergenceError

    assert NotFittedError is errors.NotFittedError
    assert ThreadSafetyViolationError is errors.ThreadSafetyViolationError
    assert NotPositiveDefiniteError is errors.NotPositiveDefiniteError
    assert LissaDivergenceError is errors.LissaDivergenceError
