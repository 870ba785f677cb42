"""Aggregators and lazy chunk sequences on their own, against brute force on random matrices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from infscale.array import (
    BlockAggregator,
    LazyChunkSequence,
    ListAggregator,
    MaxAggregator,
    MinAggregator,
    NestedLazyChunkSequence,
    NestedListAggregator,
    TopKAggregator,
    open_zarr_store,
)
from infscale.torch.util import (
    NestedTorchCatAggregator,
    TorchCatAggregator,
    TorchMaxAggregator,
    TorchMinAggregator,
    TorchNumpyConverter,
    TorchTopKAggregator,
)

ROWS, COLS = [4, 4, 2], [6, 6, 6, 3]


def random_matrix(seed=0):
    return torch.randn(
        sum(ROWS), sum(COLS), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


def blocks_of(full):
    """All blocks of ``full`` with their positions, in a shuffled order."""
    r_off, c_off = np.cumsum([0, *ROWS]), np.cumsum([0, *COLS])
    items = [
        (i, j, int(r_off[i]), int(c_off[j]), full[r_off[i] : r_off[i + 1], c_off[j] : c_off[j + 1]])
        for i in range(len(ROWS))
        for j in range(len(COLS))
    ]
    order = np.random.default_rng(1).permutation(len(items))
    return [items[k] for k in order]


def feed(aggregator: BlockAggregator, full):
    aggregator.reset()
    for item in blocks_of(full):
        aggregator.add_block(*item)
    return aggregator.result()


def rows_of(full):
    r_off, c_off = np.cumsum([0, *ROWS]), np.cumsum([0, *COLS])
    return [
        [full[r_off[i] : r_off[i + 1], c_off[j] : c_off[j + 1]] for j in range(len(COLS))]
        for i in range(len(ROWS))
    ]


@pytest.mark.parametrize("cls", [TopKAggregator, TorchTopKAggregator])
@pytest.mark.parametrize("k", [1, 3, 7, 100])
def test_top_k_in_any_block_order_equals_sorting(cls, k):
    full = random_matrix()
    f = full.numpy()
    for result in (feed(cls(k), full), cls(k)(iter(r) for r in rows_of(full))):
        kk = min(k, f.shape[1])
        assert result.k == kk
        np.testing.assert_array_equal(np.asarray(result.helpful_indices), np.argsort(-f, 1)[:, :kk])
        np.testing.assert_array_equal(np.asarray(result.harmful_indices), np.argsort(f, 1)[:, :kk])
        np.testing.assert_array_equal(np.asarray(result.helpful_values), -np.sort(-f, 1)[:, :kk])
        np.testing.assert_array_equal(np.asarray(result.harmful_values), np.sort(f, 1)[:, :kk])
    if cls is TorchTopKAggregator:
        assert isinstance(result.helpful_values, torch.Tensor)


def test_top_k_state_stays_k_wide():
    agg = TopKAggregator(2)
    agg.reset()
    wide = torch.randn(3, 500, dtype=torch.float64)
    for j in range(10):
        agg.add_block(0, j, 0, 500 * j, wide + j)
        (hv, hi), (lv, li) = agg._state[0]
        assert hv.shape == hi.shape == lv.shape == li.shape == (3, 2)
    result = agg.result()
    np.testing.assert_array_equal(result.helpful_indices[:, 0], 4500 + wide.argmax(1).numpy())
    np.testing.assert_array_equal(result.harmful_indices[:, 0], wide.argmin(1).numpy())


@pytest.mark.parametrize(
    "cls, pick, arg",
    [
        (MaxAggregator, np.max, np.argmax),
        (TorchMaxAggregator, np.max, np.argmax),
        (MinAggregator, np.min, np.argmin),
        (TorchMinAggregator, np.min, np.argmin),
    ],
)
def test_min_max_equal_brute_force(cls, pick, arg):
    full = random_matrix(3)
    result = feed(cls(), full)
    np.testing.assert_array_equal(np.asarray(result.values), pick(full.numpy(), axis=1))
    np.testing.assert_array_equal(np.asarray(result.indices), arg(full.numpy(), axis=1))


def test_cat_and_list_aggregators():
    full = random_matrix(4)
    assert torch.equal(feed(NestedTorchCatAggregator(), full), full)
    assert torch.equal(NestedTorchCatAggregator()(iter(r) for r in rows_of(full)), full)
    nested = feed(NestedListAggregator(), full)
    assert [len(r) for r in nested] == [4, 4, 4]
    assert torch.equal(torch.cat([torch.cat(r, 1) for r in nested]), full)
    chunks = [full[:4], full[4:]]
    assert torch.equal(TorchCatAggregator()(iter(chunks)), full)
    assert ListAggregator()(iter(chunks)) == chunks
    with pytest.raises(ValueError, match="no chunk"):
        TorchCatAggregator()(iter([]))
    with pytest.raises(ValueError, match="no block"):
        TopKAggregator(2).result()


def test_sequences_from_generator_factories(tmp_path):
    full = random_matrix(5)
    flat = LazyChunkSequence(lambda: iter([full[:4], full[4:8], full[8:]]))
    assert flat.chunk_sizes() == [4, 4, 2]
    assert torch.equal(flat.compute(TorchCatAggregator()), full)
    stored = flat.to_zarr(tmp_path / "flat.zarr", TorchNumpyConverter(), return_stored=True, progress=False)
    assert stored.shape == full.shape and stored.chunks == (4, sum(COLS))
    np.testing.assert_array_equal(stored[:], full.numpy())

    nested = NestedLazyChunkSequence(lambda: (iter(r) for r in rows_of(full)))
    assert nested.shape() == tuple(full.shape)
    assert torch.equal(nested.compute(NestedTorchCatAggregator()), full)
    stored = nested.to_zarr(
        tmp_path / "nested.zarr", TorchNumpyConverter(), return_stored=True, progress=False
    )
    assert stored.chunks == (4, 6)
    np.testing.assert_array_equal(zarr.open(str(tmp_path / "nested.zarr"), mode="r")[:], full.numpy())


def test_bad_arguments():
    with pytest.raises(TypeError, match="source"):
        LazyChunkSequence(3)
    with pytest.raises(ValueError, match="storage_options"):
        open_zarr_store("local/path.zarr", {"key": "x"})
    with pytest.raises(TypeError, match="path_or_url"):
        open_zarr_store("")
    with pytest.raises(ValueError, match=r"shape \(test batch, train batch\)"):
        TopKAggregator(1).add_block(0, 0, 0, 0, torch.zeros(2, 3, 4))
