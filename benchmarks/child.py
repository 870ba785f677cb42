"""One benchmark measurement in a fresh process: ``python child.py SPEC.json``.

Runs under either venv: infscale's (.venv) or the pyDVL yardstick's (.bench-venv); it imports
only the library named in the spec, torch and numpy. It loads the model (architecture spec +
state_dict) and data (tensors) that the parent saved, so that both libraries see the same numbers,
fits the method, computes the influences (in memory, sequentially to zarr, or on Dask), and writes

- ``<out>.json``: fit / query / total seconds (best of ``runs``: ``repeats`` when the first run took
  less than ``repeat_under_s``, else 1; each run refits), peak RSS of this process and of
  its children (Dask workers) in MiB, the RSS after loading (baseline), and an error if one occurred;
- ``<out>.npy``: the influences (or their first rows when the matrix is large), for agreement checks.

Library "floor" is plain torch: every needed per-sample gradient once, plus the final product.
"""

from __future__ import annotations

import inspect
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MIB = 1024.0  # ru_maxrss is in KiB on Linux


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / MIB


# ---------------------------------------------------------------------------- library adapters
def _filtered(cls, kwargs: dict) -> tuple[dict, list]:
    """Keep only the keyword arguments ``cls`` accepts (a method's optional settings differ)."""
    params = inspect.signature(cls).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return kwargs, []
    kept = {k: v for k, v in kwargs.items() if k in params}
    return kept, sorted(set(kwargs) - set(kept))


# pyDVL 0.10's class of each method (infscale's come from its registry, infscale.app.registry).
PYDVL_CLASS_NAMES = {
    "direct": "DirectInfluence",
    "cg": "CgInfluence",
    "lissa": "LissaInfluence",
    "arnoldi": "ArnoldiInfluence",
    "nystroem": "NystroemSketchInfluence",
    "inverse-harmonic-mean": "InverseHarmonicMeanInfluence",
    "ekfac": "EkfacInfluence",
}


# infscale's curvature names → pyDVL 0.10's: its GAUSS_NEWTON is the mean of per-sample gradient outer
# products, infscale's EMPIRICAL_FISHER (checked on the wide MLP: Pearson r 0.99999 between the two
# libraries' CG influences). pyDVL has no generalized Gauss-Newton matrix Jᵀ∇²ℓJ.
PYDVL_MODE_NAMES = {"hessian": "hessian", "empirical_fisher": "gauss_newton"}


def make_method(lib: str, method: str, model, loss, params: dict):
    """The influence model of ``lib`` for ``method`` (a name of infscale's registry) with the shared
    settings ``params`` (``regularization`` plus the method's own); returns (model, dropped settings).

    infscale: ``infscale.app.registry.make_influence_model``; a setting the class does not take is
    dropped (and reported), a method this installation lacks raises ModuleNotFoundError."""
    params = dict(params)
    reg = params.pop("regularization")
    if lib == "infscale":
        from infscale.app.registry import make_influence_model, resolve_method
        from infscale.errors import UsageError

        try:
            short, cls = resolve_method(method)
        except UsageError as error:  # not in this installation: reported as "not available"
            raise ModuleNotFoundError(str(error)) from error
        kwargs = {"hessian_regularization": reg, **params}
        if short == "ekfac":
            kwargs.setdefault("update_diagonal", True)
        kept, dropped = _filtered(cls, kwargs)
        return make_influence_model(short, model, loss, kept), dropped
    import pydvl.influence.torch as mod

    cls = getattr(mod, PYDVL_CLASS_NAMES[method])
    if method == "ekfac":  # pyDVL's EK-FAC takes no loss (cross-entropy) and the old keyword
        kept, _ = _filtered(cls, {"hessian_regularization": reg, "update_diagonal": True})
        return cls(model, **kept), []
    kwargs = {"regularization": reg, **params}
    if "second_order_mode" in kwargs:
        from pydvl.influence.torch.util import SecondOrderMode

        kwargs["second_order_mode"] = SecondOrderMode(PYDVL_MODE_NAMES[kwargs["second_order_mode"]])
    if method == "cg":
        kwargs.setdefault("solve_simultaneously", True)  # pyDVL's fastest CG: block CG
        kwargs.setdefault("warn_on_max_iteration", False)
    if method == "lissa":
        kwargs.setdefault("warn_on_max_iteration", False)
    kept, dropped = _filtered(cls, kwargs)
    return cls(model, loss, **kept), dropped


def calculators(lib: str):
    """(SequentialInfluenceCalculator, DaskInfluenceCalculator, util module) of ``lib``."""
    import importlib

    if lib == "pydvl":
        import pydvl.influence as base
        import pydvl.influence.torch.util as util

        return base.SequentialInfluenceCalculator, base.DaskInfluenceCalculator, util
    found = {}
    for module_name in ("infscale", "infscale.calculator", "infscale.parallel"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name in ("SequentialInfluenceCalculator", "DaskInfluenceCalculator"):
            if name not in found and hasattr(module, name):
                found[name] = getattr(module, name)
    import infscale.torch.util as util

    return found.get("SequentialInfluenceCalculator"), found.get("DaskInfluenceCalculator"), util


# ---------------------------------------------------------------------------- the floor
def floor_influences(model, loss, x_test, y_test, x_train, y_train, chunk: int):
    """Plain torch: per-sample gradients of every test and training point once, then G_test G_trainᵀ."""
    import torch
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def sample_loss(p, x, y):
        return loss(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))

    def grads(x, y):
        g = per_sample(params, x, y)
        return torch.cat([g[k].reshape(x.shape[0], -1) for k in params], dim=1)

    g_test = torch.cat(
        [grads(x_test[s : s + chunk], y_test[s : s + chunk]) for s in range(0, len(x_test), chunk)]
    )
    out = torch.empty(len(x_test), len(x_train), dtype=g_test.dtype)
    for s in range(0, len(x_train), chunk):
        out[:, s : s + chunk] = g_test @ grads(x_train[s : s + chunk], y_train[s : s + chunk]).T
    return out


# ---------------------------------------------------------------------------- one run
def warm_up(model, loss, x, y) -> None:
    """torch.func's first grad / vmap / jvp in a process imports and initializes modules (about
    2 s here). Both libraries use torch.func, so this is paid once, untimed, before any timing."""
    from torch.func import functional_call, grad, jvp, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def batch_loss(p, xb, yb):
        return loss(functional_call(model, p, (xb,)), yb)

    vmap(grad(lambda p, xi, yi: batch_loss(p, xi[None], yi[None])), in_dims=(None, 0, 0))(
        params, x[:2], y[:2]
    )
    jvp(lambda p: grad(batch_loss)(p, x[:2], y[:2]), (params,), (params,))


def bench_cluster(n_workers: int, lib: str):
    """(LocalCluster, Client) with the settings every Dask benchmark uses: worker processes with one
    thread each, no memory limit, one BLAS thread; the library is imported on each worker first
    (start-up, not timed). The caller closes both."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        memory_limit=0,
        env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    )
    client = Client(cluster)
    client.run(warm_worker, lib)
    return cluster, client


def warm_worker(lib: str) -> bool:
    """Run on each Dask worker before the timer starts: import the library and pay torch.func's
    one-time start-up there too (as ``warm_up`` does in the driver)."""
    import torch
    from torch.func import grad, vmap

    if lib == "infscale":
        import infscale.torch  # noqa: F401
    else:
        import pydvl.influence.torch  # noqa: F401
    w = torch.zeros(3)
    vmap(grad(lambda w, x: (w * x).sum() ** 2), in_dims=(None, 0))(w, torch.ones(2, 3))
    return True


def run(spec: dict) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(spec.get("threads", 2))
    import workloads

    work = Path(spec["workdir"])
    arch = json.loads((work / "arch.json").read_text())
    dtype = getattr(torch, arch["dtype"])
    model = workloads.build_model(arch["layers"], dtype)
    model.load_state_dict(torch.load(work / "model.pt", weights_only=True))
    for p in model.parameters():
        p.requires_grad_(True)
    loss = workloads.LOSSES[arch["loss"]]
    data = torch.load(work / spec.get("data", "data.pt"), weights_only=True)
    x_tr, y_tr, x_te, y_te = data["x_train"], data["y_train"], data["x_test"], data["y_test"]
    x_fit, y_fit = data.get("x_fit", x_tr), data.get("y_fit", y_tr)
    lib, method = spec["lib"], spec["method"]
    bs = spec.get("batch_size", len(x_tr))
    from torch.utils.data import DataLoader, TensorDataset

    fit_loader = DataLoader(TensorDataset(x_fit, y_fit), batch_size=spec.get("fit_batch_size", len(x_fit)))
    if lib != "floor":  # import the library before the baseline is taken
        if lib == "infscale":
            import infscale.torch  # noqa: F401
        else:
            import pydvl.influence.torch  # noqa: F401
    warm_up(model, loss, x_tr, y_tr)
    base_rss = rss_mib()
    result = {"base_rss_mib": base_rss, "dropped_settings": []}
    best = {"fit_s": float("inf"), "query_s": float("inf"), "total_s": float("inf")}
    out, runs = None, 0
    for k in range(spec.get("repeats", 1)):
        if k > 0 and best["total_s"] >= spec.get("repeat_under_s", float("inf")):
            break  # a long run is measured once: the noise is small next to it
        runs += 1
        t0 = time.perf_counter()
        if lib == "floor":
            t1 = time.perf_counter()
            out = floor_influences(model, loss, x_te, y_te, x_tr, y_tr, spec.get("chunk", 512))
        else:
            infl, dropped = make_method(lib, method, model, loss, spec.get("params", {}))
            result["dropped_settings"] = dropped
            infl = infl.fit(fit_loader)
            t1 = time.perf_counter()
            out = query(spec, lib, infl, x_tr, y_tr, x_te, y_te, bs)
        t2 = time.perf_counter()
        for key, value in (("fit_s", t1 - t0), ("query_s", t2 - t1), ("total_s", t2 - t0)):
            best[key] = min(best[key], value)
        if "_compute_s" in spec:  # Dask: the compute alone, cluster start-up excluded
            best["compute_s"] = min(best.get("compute_s", float("inf")), spec.pop("_compute_s"))
    result.update(best)
    result["runs"] = runs
    if out is not None:
        arr = out.detach().cpu().numpy() if hasattr(out, "detach") else np.asarray(out)
        keep_rows = spec.get("keep_rows")
        np.save(spec["out"] + ".npy", arr[:keep_rows] if keep_rows else arr)
        result["shape"] = list(np.shape(out))
    result["peak_rss_mib"] = peak_rss_mib()
    result["children_peak_rss_mib"] = peak_rss_mib(resource.RUSAGE_CHILDREN)
    return result


def query(spec, lib, infl, x_tr, y_tr, x_te, y_te, bs):
    """Influences as the spec's task says; returns what is compared (a tensor or array)."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    task = spec.get("task", "memory")
    if task == "memory":
        chunk = spec.get("train_chunk")  # for a method whose one-call query would not fit in memory
        if chunk:
            return torch.cat(
                [
                    infl.influences(x_te, y_te, x_tr[s : s + chunk], y_tr[s : s + chunk])
                    for s in range(0, len(x_tr), chunk)
                ],
                dim=1,
            )
        return infl.influences(x_te, y_te, x_tr, y_tr)
    if task == "self":
        if hasattr(infl, "self_influences"):
            return infl.self_influences(x_tr, y_tr)
        return torch.diagonal(infl.influences(x_tr, y_tr, x_tr, y_tr))
    seq_cls, dask_cls, util = calculators(lib)
    zarr_path = str(Path(spec["scratch"]) / f"{Path(spec['out']).name}.zarr")
    shutil.rmtree(zarr_path, ignore_errors=True)  # a repeat writes the store again
    import zarr

    test_bs = spec.get("test_batch_size", bs)
    if task == "sequential":
        if seq_cls is None:
            raise ModuleNotFoundError("SequentialInfluenceCalculator not available")
        calc = seq_cls(infl)
        lazy = calc.influences(
            DataLoader(TensorDataset(x_te, y_te), batch_size=test_bs),
            DataLoader(TensorDataset(x_tr, y_tr), batch_size=bs),
        )
        if spec.get("to_memory"):
            return lazy.compute(aggregator=util.NestedTorchCatAggregator())
        lazy.to_zarr(zarr_path, util.TorchNumpyConverter())
    elif task == "dask":
        if dask_cls is None:
            raise ModuleNotFoundError("DaskInfluenceCalculator not available")
        cluster, client = bench_cluster(spec.get("n_workers", 2), lib)
        try:
            da_x, da_y = util.torch_dataset_to_dask_array(TensorDataset(x_tr, y_tr), chunk_size=bs)
            da_xt, da_yt = util.torch_dataset_to_dask_array(TensorDataset(x_te, y_te), chunk_size=test_bs)
            converter = util.TorchNumpyConverter(device=torch.device("cpu"))
            calc = dask_cls(infl, converter=converter, client=client)
            t = time.perf_counter()
            calc.influences(da_xt, da_yt, da_x, da_y).to_zarr(zarr_path)
            spec["_compute_s"] = time.perf_counter() - t
        finally:
            client.close()
            cluster.close()
    else:
        raise ValueError(f"unknown task {task!r}")
    stored = zarr.open(zarr_path, mode="r")
    rows = spec.get("keep_rows") or stored.shape[0]
    return np.asarray(stored[:rows])


def run_job(spec: dict, first: bool) -> dict:
    spec.setdefault("scratch", tempfile.mkdtemp(prefix="bench-", dir=spec["workdir"]))
    try:
        result = run(spec)
        if not first:  # ru_maxrss only grows: a later job's peak includes the earlier jobs'
            result["rss_cumulative"] = True
    except ModuleNotFoundError as error:
        result = {"error": f"not available: {error}", "unavailable": True}
    except Exception as error:  # reported in the page, the suite goes on
        result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        result["peak_rss_mib"] = peak_rss_mib()
    Path(spec["out"] + ".json").write_text(json.dumps(result))
    return result


def main() -> int:
    """Run the job in SPEC.json, or each of its "jobs" in turn (sharing the imports)."""
    spec = json.loads(Path(sys.argv[1]).read_text())
    for k, job in enumerate(spec.get("jobs", [spec])):
        run_job(job, k == 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
