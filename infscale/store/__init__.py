"""The one place that touches zarr: opening stores, writing blocks with completion markers,
resuming, verifying, and reading back what is complete.

Layout of an array written by infscale (a zarr v3 array at the root of its store)::

    zarr.json, c/...                 the array, one chunk per block; unwritten floats are NaN
    _infscale_complete/<i>[.<j>]     a marker per block, written after its chunk is stored:
                                     JSON with the block's checksum and its inputs' digests

- ``opening``: paths, URLs, zarr Store objects and fsspec mappers → a zarr store;
- ``markers``: which blocks are done, checksums, input digests, verification;
- ``writer``: creating, replacing (safely) and resuming arrays block by block;
- ``groups``: the results group of the command (several arrays) and what of it is done.

Framework-free: blocks arrive as numpy arrays through a converter.
"""

from ..errors import StoreExistsError, StoreMismatchError
from .groups import (
    array_completed_blocks,
    array_completeness,
    attribute_differences,
    clear_store,
    create_group,
    holds_finished_blocks,
    holds_zarr,
    open_group,
    open_node,
    ownership_problem,
    remove_temporary_keys,
    store_keys,
    verify_group_array,
    write_group_array,
)
from .markers import (
    COMPLETE_PREFIX,
    VerifyReport,
    block_digest,
    completed_blocks,
    input_digest,
    verify_blocks,
)
from .opening import _jsonable, is_temporary_key, open_zarr_store, store_is_empty
from .writer import _Layout, _offsets, _regular_chunk, _write_blocks

__all__ = [
    "StoreExistsError",
    "StoreMismatchError",
    "COMPLETE_PREFIX",
    "open_zarr_store",
    "completed_blocks",
    "store_is_empty",
    "verify_blocks",
    "VerifyReport",
    "block_digest",
    "input_digest",
    "_jsonable",
    "_Layout",
    "_offsets",
    "_regular_chunk",
    "_write_blocks",
    "holds_zarr",
    "clear_store",
    "create_group",
    "open_group",
    "open_node",
    "write_group_array",
    "array_completed_blocks",
    "array_completeness",
    "attribute_differences",
    "store_keys",
    "ownership_problem",
    "holds_finished_blocks",
    "is_temporary_key",
    "verify_group_array",
    "remove_temporary_keys",
]
