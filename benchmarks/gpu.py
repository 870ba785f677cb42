"""GPU benchmark: the wide MLP of the approximations issue at its full size — influences of the first
500 test rows × the first 10,000 training rows, curvature fitted on all 10,000 — for every method on
one CUDA device, infscale and (when importable) pyDVL 0.10 side by side, plus the sequential
calculator to zarr.

    python benchmarks/gpu.py --out DIR [--lib infscale|pydvl|both] [--cap SECONDS] [--smoke]

``--smoke`` runs every code path on a tiny slice (on the CPU when there is no GPU) to check the script.

Each library runs in its own process (the model and data are trained/saved once, in DIR, so both
see the same numbers). Each method: one untimed warm-up of the CUDA kernels on a small slice, then
fit and query timed with ``torch.cuda.synchronize``; accuracy is Pearson r and mean top-10 overlap
against infscale's CG in float64 at rtol 1e-8. A run longer than ``--cap`` seconds is cut (SIGALRM)
and reported as such. Writes DIR/gpu-<lib>.json and, at the end, DIR/gpu.md.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import child  # noqa: E402
import workloads as W  # noqa: E402
from config import PYDVL_EKFAC_CHUNK, wide_settings  # noqa: E402
from page.format import LABEL  # noqa: E402

N_TRAIN, N_TEST = 10_000, 500
BATCH, TEST_BATCH = 1_000, 100
DEVICE = "cuda"
EPOCHS = 40
METHODS = ["cg", "arnoldi", "nystroem", "inverse-harmonic-mean", "ekfac", "lissa"]  # infscale registry names
CURVATURE = "empirical_fisher"  # the matrix pyDVL 0.10 calls GAUSS_NEWTON (see page.format.PYDVL_SEMANTICS)
SIZES = {"cg_maxiter_wide": 30, "lissa_maxiter_wide": 100}


class Cut(Exception):
    pass


def _alarm(signum, frame):
    raise Cut()


def prepare(out: Path) -> None:
    """Train the wide MLP (on the CPU, as the CPU benchmarks do) and save model and data."""
    if (out / "model.pt").exists():
        return
    model, _, (x_tr, y_tr, x_te, y_te) = W.wide_mlp(N_TRAIN, N_TEST, epochs=EPOCHS)
    torch.save(model.state_dict(), out / "model.pt")
    torch.save({"x": x_tr, "y": y_tr, "xt": x_te, "yt": y_te}, out / "data.pt")
    (out / "arch.json").write_text(json.dumps(W.architecture(model)))


def load(out: Path, dtype=torch.float32):
    model = W.build_model(json.loads((out / "arch.json").read_text()), dtype)
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    data = torch.load(out / "data.pt", weights_only=True)
    dev = torch.device(DEVICE)
    x, y = data["x"].to(dev, dtype), data["y"].to(dev)
    xt, yt = data["xt"].to(dev, dtype), data["yt"].to(dev)
    return model.to(dev), x, y, xt, yt


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    synchronize()
    t = time.perf_counter()
    result = fn()
    synchronize()
    return result, time.perf_counter() - t


def loader(x, y, bs):
    """A DataLoader over a TensorDataset (what both libraries take; tensors already on the device)."""
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(x, y), batch_size=bs)


def query(lib, method, infl, x, y, xt, yt):
    if lib == "pydvl" and method == "ekfac":  # one call would ask ~100 GB: chunks of training points
        c = PYDVL_EKFAC_CHUNK
        return torch.cat(
            [infl.influences(xt, yt, x[s : s + c], y[s : s + c]) for s in range(0, len(x), c)], 1
        )
    return infl.influences(xt, yt, x, y)


def run_method(lib, method, model, x, y, xt, yt, cap, curvature=CURVATURE):
    loss = torch.nn.functional.cross_entropy
    params = wide_settings(method, SIZES, curvature)
    fit_bs = 256 if method == "lissa" else BATCH

    def once(nx, nt):
        infl, _ = child.make_method(lib, method, model, loss, params)
        infl, fit_s = timed(lambda: infl.fit(loader(x[:nx], y[:nx], fit_bs)))
        out, query_s = timed(lambda: query(lib, method, infl, x[:nx], y[:nx], xt[:nt], yt[:nt]))
        return out, fit_s, query_s

    signal.signal(signal.SIGALRM, _alarm)
    try:
        signal.alarm(cap)
        once(min(1_000, N_TRAIN), 10)  # warm-up: CUDA kernels, cuBLAS handles, library imports
        out, fit_s, query_s = once(N_TRAIN, N_TEST)
        signal.alarm(0)
    except Cut:
        return {"cut_s": cap}
    except Exception as error:  # reported, the run goes on
        signal.alarm(0)
        return {"error": f"{type(error).__name__}: {error}"[:300]}
    return {"fit_s": fit_s, "query_s": query_s, "total_s": fit_s + query_s, "out": out}


def sequential(lib, model, x, y, xt, yt, out_dir, cap):
    """CG through the library's SequentialInfluenceCalculator into zarr (test batch 100, train 1,000)."""
    import shutil

    seq_cls, _, util = child.calculators(lib)
    params = wide_settings("cg", SIZES)
    path = str(out_dir / f"seq-{lib}.zarr")
    signal.signal(signal.SIGALRM, _alarm)
    try:
        signal.alarm(cap)
        infl, _ = child.make_method(lib, "cg", model, torch.nn.functional.cross_entropy, params)
        infl, fit_s = timed(lambda: infl.fit(loader(x, y, BATCH)))
        shutil.rmtree(path, ignore_errors=True)
        lazy = seq_cls(infl).influences(loader(xt, yt, TEST_BATCH), loader(x, y, BATCH))
        _, query_s = timed(lambda: lazy.to_zarr(path, util.TorchNumpyConverter()))
        signal.alarm(0)
    except Cut:
        return {"cut_s": cap}
    except Exception as error:
        signal.alarm(0)
        return {"error": f"{type(error).__name__}: {error}"[:300]}
    import zarr

    return {
        "fit_s": fit_s,
        "query_s": query_s,
        "total_s": fit_s + query_s,
        "out": zarr.open(path, mode="r")[:],
    }


def agreement(values, reference) -> dict:
    a, b = np.asarray(values, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    k = 10
    top = lambda m: np.argsort(-m, axis=1)[:, :k]  # noqa: E731
    overlap = np.mean([len(set(p) & set(q)) / k for p, q in zip(top(a), top(b))])
    return {"pearson": W.pearson(a, b), "top10": float(overlap)}


def run_lib(lib: str, out: Path, cap: int) -> None:
    if lib == "pydvl":
        import pydvl.influence.torch  # noqa: F401  (fails early when pyDVL is not importable)
    ref_path = out / "reference.npy"
    if not ref_path.exists():
        import infscale.torch as its

        model64, x, y, xt, yt = load(out, torch.float64)
        cg = its.CgInfluence(model64, torch.nn.functional.cross_entropy, 0.1, rtol=1e-8, atol=0.0,
                             maxiter=500, second_order_mode=CURVATURE)  # fmt: skip
        (ref, ref_s) = timed(lambda: cg.fit(loader(x, y, BATCH)).influences(xt, yt, x, y))
        np.save(ref_path, ref.cpu().numpy())
        print(f"reference (CG float64, rtol 1e-8): {ref_s:.1f} s", flush=True)
    reference = np.load(ref_path)
    model, x, y, xt, yt = load(out)
    results = {}
    jobs = [(m, m, CURVATURE) for m in METHODS]
    if lib == "infscale":  # the generalized Gauss-Newton matrix, which pyDVL 0.10 lacks
        jobs.insert(0, ("cg_gn", "cg", "gauss_newton"))
    for key, method, curvature in jobs:
        r = run_method(lib, method, model, x, y, xt, yt, cap, curvature)
        if "out" in r:
            r.update(agreement(r.pop("out").detach().cpu().numpy(), reference))
        results[key] = r
        print(lib, key, {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    r = sequential(lib, model, x, y, xt, yt, out, cap)
    if "out" in r:
        r.update(agreement(r.pop("out"), reference))
    results["sequential"] = r
    print(lib, "sequential", r, flush=True)
    if DEVICE == "cuda":
        results["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    results["device"] = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke run)"
    results["torch"] = torch.__version__
    (out / f"gpu-{lib}.json").write_text(json.dumps(results, indent=1))


def cell(r) -> str:
    if r is None:
        return "—"
    if "cut_s" in r:
        return f"> {r['cut_s']} s (cut)"
    if "error" in r:
        return "error"
    return f"{r['total_s']:.2f} s ({r['fit_s']:.2f} + {r['query_s']:.2f})"


def report(out: Path) -> str:
    res = {
        lib: json.loads(p.read_text())
        for lib in ("infscale", "pydvl")
        if (p := out / f"gpu-{lib}.json").exists()
    }
    ours, theirs = res.get("infscale", {}), res.get("pydvl", {})
    lines = [
        f"Device: {ours.get('device', '?')}, torch {ours.get('torch', '?')}. Wide MLP, {N_TEST} test × "
        f"{N_TRAIN:,} train, curvature fitted on all {N_TRAIN:,} training points (batches of {BATCH:,}), "
        'empirical Fisher (infscale `second_order_mode="empirical_fisher"`, pyDVL `GAUSS_NEWTON`: the '
        "same matrix), λ = 0.1, float32. Time = fit + query; r and top-10 against infscale CG in float64 "
        "(rtol 1e-8) with the same matrix. The first row uses infscale's generalized Gauss-Newton "
        "matrix instead (no pyDVL counterpart).",
        "",
        "| method | infscale | pyDVL 0.10 | speed-up | r infscale / pyDVL | top-10 infscale / pyDVL |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for method in ["cg_gn"] + METHODS + ["sequential"]:
        a, b = ours.get(method), theirs.get(method)
        speed = "—"
        if a and b and "total_s" in a:
            if "total_s" in b:
                speed = f"{b['total_s'] / a['total_s']:.1f}×"
            elif "cut_s" in b:
                speed = f"> {b['cut_s'] / a['total_s']:.1f}×"
        r = " / ".join(f"{x['pearson']:.3f}" if x and "pearson" in x else "—" for x in (a, b))
        t = " / ".join(f"{x['top10']:.2f}" if x and "top10" in x else "—" for x in (a, b))
        names = {"sequential": "Sequential → zarr (CG)", "cg_gn": "CG, Gauss-Newton Jᵀ∇²ℓJ (infscale only)"}
        name = names.get(method) or LABEL[method]
        lines.append(f"| {name} | {cell(a)} | {cell(b)} | {speed} | {r} | {t} |")
    lines.append("")
    peak = f"Peak CUDA memory allocated: infscale {ours.get('peak_cuda_mib', 0):,.0f} MiB"
    if "peak_cuda_mib" in theirs:
        peak += f", pyDVL {theirs['peak_cuda_mib']:,.0f} MiB"
    lines.append(peak + ".")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--lib", default="both", choices=["infscale", "pydvl", "both"])
    parser.add_argument("--cap", type=int, default=90, help="seconds per (library, method) before a cut")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, CPU when there is no GPU")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    global N_TRAIN, N_TEST, BATCH, TEST_BATCH, DEVICE, EPOCHS
    if args.smoke:
        N_TRAIN, N_TEST, BATCH, TEST_BATCH, EPOCHS = 300, 12, 100, 6, 1
        DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    elif not torch.cuda.is_available():
        print("gpu.py: no CUDA device; nothing to do (--smoke runs on the CPU).", file=sys.stderr)
        return 2
    prepare(args.out)
    if args.lib != "both":
        run_lib(args.lib, args.out, args.cap)
        return 0
    for lib in ("infscale", "pydvl"):  # one fresh process each
        cmd = [sys.executable, __file__, "--out", str(args.out), "--lib", lib, "--cap", str(args.cap)]
        cmd += ["--smoke"] if args.smoke else []
        code = subprocess.call(cmd)
        if code:
            print(f"gpu.py: the {lib} process exited with {code}", flush=True)
    text = report(args.out)
    (args.out / "gpu.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
