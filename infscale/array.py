"""Old home of the aggregators, lazy chunk sequences and zarr helpers; kept as re-exports.

New code imports from ``infscale.aggregators``, ``infscale.sequences`` and ``infscale.store``.
"""

from .aggregators import (
    BlockAggregator,
    ExtremumResult,
    ListAggregator,
    MaxAggregator,
    MinAggregator,
    NestedListAggregator,
    NestedSequenceAggregator,
    SequenceAggregator,
    TopKAggregator,
    TopKResult,
)
from .errors import StoreExistsError, StoreMismatchError
from .sequences import BlockSource, ChunkSource, LazyChunkSequence, NestedLazyChunkSequence
from .store import COMPLETE_PREFIX, _jsonable, completed_blocks, open_zarr_store

__all__ = [
    "SequenceAggregator",
    "NestedSequenceAggregator",
    "BlockAggregator",
    "ListAggregator",
    "NestedListAggregator",
    "MinAggregator",
    "MaxAggregator",
    "TopKAggregator",
    "ExtremumResult",
    "TopKResult",
    "ChunkSource",
    "BlockSource",
    "LazyChunkSequence",
    "NestedLazyChunkSequence",
    "StoreExistsError",
    "StoreMismatchError",
    "COMPLETE_PREFIX",
    "open_zarr_store",
    "completed_blocks",
    "_jsonable",
]
