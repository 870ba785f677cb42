"""pyDVL 0.10's calculators on the workload of the suite's calculators section, without the suite's
150 s cap (one run each, about ten minutes): wide MLP, CG (pyDVL GAUSS_NEWTON = the empirical Fisher,
λ 0.1, rtol 1e-4, atol 1e-7, maxiter 30, block CG) fitted on the first 2,000 training rows, 500 test ×
10,000 train, test batches of 100, training batches of 1,000, written to zarr.

    .bench-venv/bin/python benchmarks/pydvl_calculators_uncapped.py sequential|dask

Prints one JSON line: fit, compute (graph, compute and store; for Dask the cluster start-up and the
workers' warm-up excluded, as in the suite) and total seconds, and saves the first 20 rows of the
matrix next to the temporary store. Runs in pyDVL's venv (made by ``make bench``); the results are in
docs/benchmarks-extra.md.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

import child  # noqa: E402
import workloads as W  # noqa: E402
from config import SIZES, wide_settings  # noqa: E402


def main(which: str) -> dict:
    torch.set_num_threads(2)
    model, loss, (x, y, xt, yt) = W.wide_mlp(10_000, 500)
    fit = DataLoader(TensorDataset(x[:2000], y[:2000]), batch_size=2000)
    infl, _ = child.make_method("pydvl", "cg", model, loss, wide_settings("cg", SIZES["full"]))
    seq_cls, dask_cls, util = child.calculators("pydvl")
    path = tempfile.mkdtemp() + "/influences.zarr"
    t0 = time.perf_counter()
    infl = infl.fit(fit)
    if which == "sequential":
        lazy = seq_cls(infl).influences(
            DataLoader(TensorDataset(xt, yt), batch_size=100),
            DataLoader(TensorDataset(x, y), batch_size=1000),
        )
        t1 = time.perf_counter()
        lazy.to_zarr(path, util.TorchNumpyConverter())
        t2 = time.perf_counter()
    else:
        cluster, client = child.bench_cluster(2, "pydvl")
        try:
            da_x, da_y = util.torch_dataset_to_dask_array(TensorDataset(x, y), chunk_size=1000)
            da_xt, da_yt = util.torch_dataset_to_dask_array(TensorDataset(xt, yt), chunk_size=100)
            converter = util.TorchNumpyConverter(device=torch.device("cpu"))
            calc = dask_cls(infl, converter=converter, client=client)
            t1 = time.perf_counter()
            calc.influences(da_xt, da_yt, da_x, da_y).to_zarr(path)
            t2 = time.perf_counter()
        finally:
            client.close()
            cluster.close()
    import zarr

    np.save(Path(path).parent / "first_rows.npy", np.asarray(zarr.open(path, mode="r")[:20]))
    return {"which": which, "fit_s": t1 - t0, "compute_s": t2 - t1, "total_s": t2 - t0, "store": path}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])), flush=True)
