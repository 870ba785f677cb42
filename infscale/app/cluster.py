"""Dask clusters for the command: which scheduler a ``--scheduler`` text names, and a client
for it that is closed (with the cluster it started) on exit.

Dask is imported only when a client is made, so the command starts without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ..errors import UsageError

__all__ = ["parse_scheduler", "dask_client", "describe_client", "check_worker_imports"]


def parse_scheduler(text: str) -> tuple[str, Any]:
    """``sync`` (or ``synchronous``) → ("sync", None); ``local:N`` → ("local", N);
    ``tcp://HOST:PORT`` or ``tls://...`` → ("tcp", the address).

    Raises:
        UsageError: anything else, or ``local:N`` with N < 1.
    """
    text = str(text).strip()
    if text in ("sync", "synchronous"):
        return "sync", None
    if text.startswith("local:"):
        try:
            n = int(text.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise UsageError(f"--scheduler: local:N needs a worker count N ≥ 1; got {text!r}.")
        return "local", n
    if text.startswith(("tcp://", "tls://")):
        return "tcp", text
    raise UsageError(f"--scheduler: expected sync, local:N or tcp://HOST:PORT; got {text!r}.")


@contextlib.contextmanager
def dask_client(kind: str, arg: Any, timeout: float = 10.0) -> Iterator[Any]:
    """A ``distributed.Client`` for a parsed scheduler (see ``parse_scheduler``):

    - ``("local", N)``: a new ``LocalCluster`` of N single-threaded worker processes, with the
      scheduler, workers and dashboards bound to 127.0.0.1; closed on exit;
    - ``("tcp", address)``: a connection to a running scheduler, closed on exit.

    Raises:
        UsageError: the scheduler does not answer within ``timeout`` seconds.
        ValueError: ``kind`` is neither "local" nor "tcp".
    """
    if kind not in ("local", "tcp"):
        raise ValueError(f"dask_client: kind must be 'local' or 'tcp'; got {kind!r}.")
    from distributed import Client, LocalCluster

    if kind == "local":
        cluster = LocalCluster(
            n_workers=arg,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            scheduler_port=0,
            dashboard_address="127.0.0.1:0",
            worker_dashboard_address="127.0.0.1:0",
        )
        try:
            with Client(cluster) as client:
                yield client
        finally:
            cluster.close()
        return
    try:
        client = Client(arg, timeout=timeout)
    except (OSError, TimeoutError) as error:
        raise UsageError(f"--scheduler: the Dask scheduler at {arg} does not answer ({error}).") from error
    try:
        yield client
    finally:
        client.close()


def describe_client(client: Any) -> str:
    """``scheduler ADDRESS, dashboard LINK`` of a client, for the log."""
    return f"scheduler {client.scheduler.address}, dashboard {client.dashboard_link}"


def check_worker_imports(client: Any, modules: dict[str, str]) -> None:
    """Check that every worker of ``client`` can import ``modules`` (``{flag: module name}``): the
    user's factory modules, which the pickled model and data refer to by name.

    Raises:
        UsageError: naming the flag, the module, the worker and why it cannot import it.
    """
    failures = client.run(_import_errors, sorted(set(modules.values())))
    for address, errors in sorted(failures.items()):
        for module, message in sorted(errors.items()):
            flag = next(f for f, m in modules.items() if m == module)
            raise UsageError(
                f"{flag}: the Dask worker at {address} cannot import module {module!r} ({message}); expected "
                "it to be importable on every worker (the same code and environment: start the workers "
                "where the module is, or put it on their PYTHONPATH)."
            )


def _import_errors(modules: list[str]) -> dict[str, str]:
    """Runs on a worker: ``{module: "Error: message"}`` for each module it cannot import."""
    import importlib

    errors = {}
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as error:
            errors[module] = f"{type(error).__name__}: {' '.join(str(error).split())}"
    return errors
