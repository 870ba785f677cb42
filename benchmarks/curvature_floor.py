"""The cost of the curvature products alone, in plain torch.func, for the two digits-MLP methods
whose work is almost all curvature products: LiSSA and the Nyström sketch (no library imported).

    .venv/bin/python benchmarks/curvature_floor.py

Same workload and settings as the suite's digits section (benchmarks/run_all.py): the digits MLP
(2,410 parameters), Hessian, λ = 0.01, 360 test × 1437 training points.

- LiSSA: 200 iterations h ← b + (1 − λ/s) h − H_t h / s (s = 0.5) for the 360 test gradients at once,
  H_t the Hessian of the t-th batch of 256 rows (cycling through the loader), each product one
  reverse-over-reverse Hessian-vector product (``vjp`` of ``grad``, ``vmap`` over the vectors):
  what both libraries do, without any checks, copies or bookkeeping.
- Nyström: one product of the Hessian of all 1437 rows with 64 vectors (the sketch), without the
  small linear algebra around it and without the query's gradients.

Best of 3, after a warm-up. Prints one JSON line; the results are in docs/benchmarks-extra.md.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch.func import functional_call, grad, vjp, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))

import child  # noqa: E402
import workloads as W  # noqa: E402


def best_of(fn, runs: int = 3) -> float:
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> dict:
    torch.set_num_threads(2)
    model, loss, (x_tr, y_tr, x_te, y_te) = W.digits_mlp()
    child.warm_up(model, loss, x_tr, y_tr)
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = list(params)

    def batch_loss(p, x, y):
        return loss(functional_call(model, p, (x,)), y)

    def hessian_products(x, y, V):  # V (k, p) → (k, p)
        _, hvp = vjp(lambda p: grad(batch_loss)(p, x, y), params)
        parts, s = {}, 0
        for n in names:
            k = params[n].numel()
            parts[n] = V[:, s : s + k].reshape(V.shape[0], *params[n].shape)
            s += k
        out = vmap(hvp)(parts)[0]
        return torch.cat([out[n].reshape(V.shape[0], -1) for n in names], dim=1)

    per_sample = vmap(grad(lambda p, x, y: batch_loss(p, x[None], y[None])), in_dims=(None, 0, 0))
    g = per_sample(params, x_te, y_te)
    b = torch.cat([g[n].reshape(len(x_te), -1) for n in names], dim=1)  # (360, p)
    batches = [(x_tr[s : s + 256], y_tr[s : s + 256]) for s in range(0, len(x_tr), 256)]
    mean_batch = len(x_tr) / len(batches)
    lam, scale = 0.01, 0.5

    def lissa():
        h = b.clone()
        for t in range(200):
            x, y = batches[t % len(batches)]
            h = b + (1 - lam / scale) * h - (x.shape[0] / mean_batch) * hessian_products(x, y, h) / scale
        return h / scale

    omega = torch.linalg.qr(torch.randn(b.shape[1], 64, dtype=torch.float64))[0].float()

    def sketch():
        return hessian_products(x_tr, y_tr, omega.T)

    hessian_products(*batches[0], b)  # warm-up of the product at these shapes
    sketch()
    return {
        "lissa_200_products_s": best_of(lissa),
        "one_product_256_rows_360_vectors_s": best_of(lambda: hessian_products(*batches[0], b), 7),
        "nystroem_sketch_s": best_of(sketch, 7),
    }


if __name__ == "__main__":
    print(json.dumps(main()), flush=True)
