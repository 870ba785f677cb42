"""Small helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from torch.func import functional_call

CE = nn.functional.cross_entropy


def loader(x: Tensor, y: Tensor, sizes: list[int]) -> list[tuple[Tensor, Tensor]]:
    """Consecutive batches (x, y) of the given sizes."""
    out, s = [], 0
    for b in sizes:
        out.append((x[s : s + b], y[s : s + b]))
        s += b
    return out


def rel(a: Tensor, b: Tensor) -> float:
    """‖a − b‖ / ‖b‖ (Frobenius)."""
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


def flat_forward(model: nn.Module):
    """The model as a function of one flat parameter vector: returns ((θ, x) ↦ model_θ(x), θ₀), θ the
    concatenation of all parameters in ``named_parameters`` order and θ₀ their current values."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def forward(theta: Tensor, x: Tensor) -> Tensor:
        parts = torch.split(theta, [s.numel() for s in shapes])
        return functional_call(model, {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}, (x,))

    return forward, theta0


@contextlib.contextmanager
def moto_s3(bucket: str):
    """A local moto S3 server (127.0.0.1, a free port) holding an empty ``bucket``; yields the fsspec
    storage options that reach it. Skips the test where s3fs or moto's server is not installed."""
    import pytest

    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    pytest.importorskip("flask")
    import boto3

    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }
    boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket=bucket)  # fmt: skip
    try:
        yield options
    finally:
        server.stop()
