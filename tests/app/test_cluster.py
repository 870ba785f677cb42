"""infscale.app.cluster: reading --scheduler, and clients for it."""

from __future__ import annotations

import socket
import sys

import pytest

from infscale.app.cluster import dask_client, describe_client, parse_scheduler
from infscale.errors import UsageError


@pytest.mark.parametrize(
    "text, expected",
    [
        ("sync", ("sync", None)),
        (" synchronous ", ("sync", None)),
        ("local:1", ("local", 1)),
        ("local:12", ("local", 12)),
        ("tcp://10.0.0.5:8786", ("tcp", "tcp://10.0.0.5:8786")),
        ("tls://host:8786", ("tcp", "tls://host:8786")),
    ],
)
def test_parse_scheduler(text, expected):
    assert parse_scheduler(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("local:0", "local:N needs a worker count N ≥ 1; got 'local:0'"),
        ("local:two", "local:N needs a worker count"),
        ("threads", "expected sync, local:N or tcp://HOST:PORT; got 'threads'"),
        ("10.0.0.5:8786", "expected sync, local:N or tcp://HOST:PORT"),
    ],
)
def test_parse_scheduler_errors(text, message):
    with pytest.raises(UsageError) as info:
        parse_scheduler(text)
    assert message in str(info.value) and str(info.value).startswith("--scheduler: ")


def test_parsing_does_not_import_dask():
    """The command starts without Dask: only making a client imports it."""
    import subprocess

    code = (
        "import sys, infscale.cli, infscale.app.cluster as c; c.parse_scheduler('local:2'); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed', 'zarr', 'torch')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_dask_client_errors():
    with pytest.raises(ValueError, match="kind must be 'local' or 'tcp'; got 'sync'"):
        with dask_client("sync", None):
            pass
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: nobody answers
        with pytest.raises(UsageError, match=f"the Dask scheduler at {address} does not answer"):
            with dask_client("tcp", address, timeout=0.5):
                pass


def test_describe_client():
    class Fake:
        class scheduler:
            address = "tcp://127.0.0.1:1"

        dashboard_link = "http://127.0.0.1:2/status"

    assert describe_client(Fake()) == "scheduler tcp://127.0.0.1:1, dashboard http://127.0.0.1:2/status"
