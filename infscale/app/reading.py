"""Reading a results store back, for ``infscale top`` and ``infscale info``: one test point's most
helpful and harmful training points, each array's completeness and, with ``verify``, the blocks
whose data are missing or damaged. Every line is made safe for a terminal (``printable``): a
store is data from elsewhere, and its attributes must not drive the terminal.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any

import numpy as np

from ..errors import UsageError
from ..store import verify_blocks, verify_group_array
from .results import INFLUENCES, SELF_INFLUENCES, TOP_ARRAYS, completeness, missing_row_blocks, open_results

__all__ = ["printable", "top_lines", "info_lines"]


def printable(text: str) -> str:
    """``text`` with every control or format character (ESC and the ANSI sequences it starts,
    C1 controls, bidirectional overrides, ...) written as ``\\xNN``/``\\uNNNN``, so that printing
    it cannot move the cursor, clear the screen or reorder what is shown. Newlines and tabs
    are escaped too: one value stays on one line."""
    out = []
    for char in text:
        if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp"):
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


def _short(value: Any, limit: int = 12) -> str:
    """JSON of an attribute, with long lists cut to their first items and their length."""
    if isinstance(value, list) and len(value) > limit:
        head = json.dumps(value[:limit], default=str, ensure_ascii=False)[:-1]
        return f"{head}, ... ({len(value)} values)]"
    return json.dumps(value, default=str, ensure_ascii=False)


def top_lines(url: str, test: int, k: int) -> list[str]:
    """The ``k`` most helpful and most harmful training points of test point ``test``, as the
    lines ``infscale top`` prints. Reads only the chunks of that row.

    Raises:
        UsageError: no results at ``url``, perturbation-mode influences, ``test`` out of range,
            ``k`` < 1, or a row with blocks that are not complete.
    """
    _, array = open_results(url)
    if array.ndim != 2:
        raise UsageError(
            f"{url!r} holds perturbation-mode influences (shape {array.shape}); top needs mode up."
        )
    n_test, n_train = array.shape
    if not 0 <= test < n_test:
        raise UsageError(
            f"--test: index {test} is out of range; the store has {n_test} test points (0..{n_test - 1})."
        )
    if k < 1:
        raise UsageError(f"-k: expected an integer ≥ 1; got {k}.")
    missing = missing_row_blocks(array, test, completeness(array)[2])
    if missing:
        n_cols = -(-n_train // array.chunks[1])
        raise UsageError(
            f"row {test} is not complete in {url!r}: {len(missing)} of {n_cols} blocks missing; "
            "finish the run with infscale run ... --resume."
        )
    row = np.asarray(array[test, :], dtype=np.float64)  # reads only the chunks of this row
    k = min(k, n_train)
    order = np.argsort(-row, kind="stable")
    attrs = dict(array.attrs)
    lines = [
        f"test point {test} of {n_test} in {url} ({attrs.get('method', 'unknown method')}, "
        f"mode {attrs.get('mode', 'up')}, {n_train} training points)",
        "sign: positive = up-weighting the training point lowers this test loss (it helps);",
        f"      removing training point j changes this test loss by about +influence/{n_train}.",
    ]
    for title, idx in (("most helpful", order[:k]), ("most harmful", order[::-1][:k])):
        lines += [f"{title}:", f"  {'rank':>4}  {'train index':>11}  {'influence':>12}"]
        lines += [f"  {rank:>4}  {int(j):>11}  {row[j]:>+12.5g}" for rank, j in enumerate(idx, 1)]
    return [printable(line) for line in lines]


def info_lines(url: str, verify: bool = False) -> tuple[list[str], int]:
    """What ``infscale info`` prints about the store at ``url`` — each array's shape, chunks,
    dtype and complete blocks, then the attributes — and how many blocks are damaged.

    A block counts as complete when its completion marker and its chunk both exist (temporary
    files of a write cut short never count). With ``verify``, every block recorded complete is
    read back and checked against its checksum (``infscale.store.verify_blocks``), and so is
    each top-k array; the damaged ones are listed, with what is wrong.

    Raises:
        UsageError: nothing readable at ``url``.
    """
    group, array = open_results(url)
    lines = [f"store: {url}"]
    arrays = [(INFLUENCES if group is not None else "(root array)", array)]
    if group is not None:
        arrays += [(name, group[name]) for name in (SELF_INFLUENCES, *TOP_ARRAYS) if name in group]
    damaged_total = 0
    for name, arr in arrays:
        line = f"{name}: shape {tuple(arr.shape)}, chunks {tuple(arr.chunks)}, dtype {arr.dtype}"
        damaged: dict[str, str] = {}
        if name in TOP_ARRAYS:
            problem = verify_group_array(arr) if verify else (
                None if "checksum" in arr.attrs else "incomplete (its write was cut short)"
            )
            if problem:
                damaged["all"] = problem
            line += "; " + (problem or ("verified" if verify else "complete"))
        else:
            done, total, keys = completeness(arr)
            state = "complete" if done >= total else "INCOMPLETE (finish with --resume)"
            line += f"; {done} of {total} blocks done ({100.0 * done / max(total, 1):.0f}%), {state}"
            if verify and keys is not None:
                damaged = verify_blocks(arr, arr.store, arr.path).damaged
                line += f"; verified: {len(damaged)} damaged" if damaged else "; verified: all good"
            elif verify:
                line += "; not verified (written without infscale's checksums)"
        lines.append(line)
        lines += [f"  damaged block {key}: {why}" for key, why in sorted(damaged.items()) if key != "all"]
        damaged_total += len(damaged)
    lines.append("attributes:")
    lines += [f"  {key}: {_short(value)}" for key, value in dict(array.attrs).items()]
    if group is not None and group.attrs:
        lines.append("run configuration:")
        lines += [f"  {key}: {_short(value)}" for key, value in dict(group.attrs).items()]
    return [printable(line) for line in lines], damaged_total
