"""Thread safety on Dask: the torch methods are not thread-safe, so a model that says so
(``is_thread_safe`` False) must run on schedulers with one thread per worker.

Checked twice: when a ``DaskInfluenceCalculator`` is made (``check_thread_safety``, against its
client's workers), and again by every task when its graph is computed (``_check_threads_now``),
because a lazy result may be computed elsewhere: after its client closed, Dask falls back to its
threaded scheduler. Framework-free (no torch).
"""

from __future__ import annotations

import threading
from typing import Any

from .errors import ThreadSafetyViolationError

__all__ = ["DisableClientSingleThreadCheck", "check_thread_safety"]


class DisableClientSingleThreadCheck:
    """Pass this class itself (not an instance) as ``client`` to skip the thread-safety
    check, e.g. to compute with ``scheduler="synchronous"`` while debugging.

    With the check off, computing a non-thread-safe model on a multi-threaded
    scheduler (dask's default threaded scheduler included) can give wrong numbers.
    """

    @staticmethod
    def warning_msg() -> str:
        return (
            "DaskInfluenceCalculator: the thread-safety check is off "
            "(client=DisableClientSingleThreadCheck). "
            "If the model is not thread-safe, compute only with one thread per worker, e.g. "
            '.compute(scheduler="synchronous") or a Client(threads_per_worker=1).'
        )


def check_thread_safety(model: Any, client: Any) -> None:
    """Check that ``model`` may run on the workers of ``client`` (a ``distributed.Client``):
    a model that is not thread-safe (``is_thread_safe`` False) needs one thread per worker.
    Works on an unfitted model, so a program can check before fitting.

    Raises:
        ThreadSafetyViolationError: the model is not thread-safe and some worker runs more than
            one thread (the message lists them).
    """
    if getattr(model, "is_thread_safe", False):
        return
    multi = {address: int(n) for address, n in client.nthreads().items() if int(n) > 1}
    if multi:
        raise ThreadSafetyViolationError(type(model).__name__, multi)


def _threads_of_this_scheduler() -> tuple[str, int]:
    """(what runs the current task, how many threads it runs tasks in), from inside a task."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):  # not on a distributed worker
        worker = None
    if worker is not None:
        return f"the Dask worker at {worker.address}", int(worker.state.nthreads)
    import dask.threaded

    # Dask's local schedulers: only the threaded one runs tasks in a pool of threads (the
    # synchronous one runs them in the calling thread, "processes" one per process).
    me = threading.current_thread()
    pools = [dask.threaded.default_pool] + [
        pool for by_size in list(dask.threaded.pools.values()) for pool in list(by_size.values())
    ]
    for pool in pools:
        if pool is not None and me in getattr(pool, "_threads", ()):
            return "Dask's local threaded scheduler", int(getattr(pool, "_max_workers", 2))
    return "this thread", 1


def _check_threads_now(model: Any) -> None:
    """Raise ``ThreadSafetyViolationError`` if ``model`` is not thread-safe and the scheduler
    running the current task runs several threads (see ``_Unpickled``)."""
    if getattr(model, "is_thread_safe", False):
        return
    where, threads = _threads_of_this_scheduler()
    if threads <= 1:
        return
    if where.startswith("Dask's local"):
        happened = (
            f"the result was computed by {where} with {threads} threads: the distributed.Client the "
            "DaskInfluenceCalculator was made with was closed (or not used) when the result was computed. "
            "Compute while that client is open, or with .compute(scheduler='synchronous')"
        )
    else:
        happened = f"the result was computed by {where}, which runs {threads} threads"
    raise ThreadSafetyViolationError(type(model).__name__, {where: threads}, happened)
