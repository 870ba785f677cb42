"""Every memory and chunk-size knob of the torch core, in one place.

Unit convention: a knob that bounds memory is a number of **bytes** and its name ends in
``_BYTES``; rows, samples and counts are plain counts and their names say what is counted
(``_ROWS``, ``_PAIRS``). Code turns a byte budget into a number of rows with ``rows_within``,
using the element size of the tensors involved, so a float64 model holds as many bytes at once
as a float32 one (half the rows).

Other modules read the knobs only through the functions below, which look them up at call time:
a test or a user may set them on this module (``infscale.torch.memory.MERGE_ROWS = 16``).
"""

from __future__ import annotations

from torch import Tensor

__all__ = [
    "GRADIENT_BYTES",
    "PRODUCT_BYTES",
    "ACCELERATOR_PRODUCT_BYTES",
    "GRAM_BYTES",
    "STORED_GRADIENT_BYTES",
    "MERGE_BYTES",
    "MERGE_ROWS",
    "PASS_ROWS",
    "SOLVE_ROWS",
    "VECTOR_SAMPLE_PAIRS",
    "rows_within",
    "default_chunk_size",
    "product_rows",
    "gram_rows",
    "merge_limits",
    "pass_rows",
    "solve_rows",
    "vector_chunk",
]

#: per-sample gradients held at once when no ``gradient_chunk_size`` is given (256 MiB)
GRADIENT_BYTES = 256 * 2**20
#: intermediates of products with factored gradients, on a CPU: cache-sized (16 MiB) ...
PRODUCT_BYTES = 2**24
#: ... and on an accelerator: 16× larger chunks, fewer kernel launches (256 MiB)
ACCELERATOR_PRODUCT_BYTES = 2**28
#: inner products of fit gradients with query points held at once (inverse harmonic mean; 128 MiB)
GRAM_BYTES = 2**27
#: training gradients the inverse harmonic mean keeps by default (1 GiB)
STORED_GRADIENT_BYTES = 2**30
#: consecutive loader batches smaller than MERGE_ROWS rows and MERGE_BYTES bytes of input are
#: concatenated before a curvature product: the mean curvature is the same (batches are weighted by
#: size) and small batches are overhead-bound (seed example, batches of 10: 12 autograd passes → 1)
MERGE_BYTES = 2**26
MERGE_ROWS = 1024
#: rows of one batched forward/backward of the per-sample gradient engine
PASS_ROWS = 1024
#: rows of stored training gradients used at once in an inverse-harmonic-mean solve
SOLVE_ROWS = 16_384
#: curvature products batch this many (vector, sample) pairs at once; measured on the digits MLP,
#: larger vmap batches run slower (cache), smaller ones add overhead
VECTOR_SAMPLE_PAIRS = 131_072


def rows_within(budget_bytes: int, row_bytes: int) -> int:
    """Rows of ``row_bytes`` bytes each that fit in ``budget_bytes``: at least 1."""
    return max(1, int(budget_bytes) // max(1, int(row_bytes)))


def default_chunk_size(n_parameters: int, itemsize: int, factor: int = 1) -> int:
    """Samples whose per-sample gradients (``factor`` vectors of ``n_parameters`` numbers of
    ``itemsize`` bytes each) fit in ``GRADIENT_BYTES``: at least 1."""
    return rows_within(GRADIENT_BYTES, n_parameters * itemsize * factor)


def product_rows(t: Tensor, numbers_per_row: int) -> int:
    """Rows of ``numbers_per_row`` numbers of ``t``'s dtype that fit in the product budget of ``t``'s
    device (``PRODUCT_BYTES`` on a CPU, ``ACCELERATOR_PRODUCT_BYTES`` elsewhere): at least 1."""
    budget = PRODUCT_BYTES if t.device.type == "cpu" else ACCELERATOR_PRODUCT_BYTES
    return rows_within(budget, numbers_per_row * t.element_size())


def gram_rows(width: int, itemsize: int) -> int:
    """Rows whose inner products with ``width`` other points (``itemsize`` bytes each) fit in
    ``GRAM_BYTES``: at least 1."""
    return rows_within(GRAM_BYTES, width * itemsize)


def merge_limits() -> tuple[int, int]:
    """(``MERGE_ROWS``, ``MERGE_BYTES``): how far consecutive small batches are concatenated."""
    return MERGE_ROWS, MERGE_BYTES


def pass_rows() -> int:
    """``PASS_ROWS``: rows of one batched forward/backward of the gradient engine."""
    return PASS_ROWS


def solve_rows() -> int:
    """``SOLVE_ROWS``: rows of stored training gradients used at once in a solve."""
    return SOLVE_ROWS


def vector_chunk(samples: int) -> int:
    """Vectors multiplied at once with the curvature of a batch of ``samples`` rows, so that
    ``VECTOR_SAMPLE_PAIRS`` (vector, sample) pairs are batched: at least 1."""
    return max(1, VECTOR_SAMPLE_PAIRS // max(1, samples))
