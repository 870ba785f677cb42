"""The EK-FAC reference: infscale's K-FAC and EK-FAC next to kronfluence 1.0.1's (run in its own venv,
``.bench-venv-kronfluence``, through benchmarks/kron_child.py) on the tiny BERT (benchmarks/bert_task.py),
the digits CNN (sections/cnn.py's) and the digits MLP (workloads.digits_mlp), each against infscale's
CG with the Gauss-Newton matrix at the same λ (float64, tight tolerance): fit and query time (wall
clock and CPU), Pearson r and top-10 overlap. Publishes the BERT influence matrices for lds_bert.

Equal damping (the conventions of benchmarks/results-kronfluence/*.json, "conventions", corrected for
K-FAC): kronfluence's ``damping_factor`` is absolute on the Fisher of the mean loss, as infscale's
``hessian_regularization``, so EK-FAC runs at λ in both. kronfluence's K-FAC averages both Kronecker
factors over the T positions a layer sees per example (output locations of a Conv2d, unmasked tokens
of a sequence) where infscale sums A over them, so its K-FAC block is F/T: layer l's influences in
kronfluence's K-FAC at λ are T_l times infscale's K-FAC at T_l·λ. So infscale's K-FAC runs at λ (the
Fisher at λ, what the reference inverts) and, as the cross-check of the two implementations, in
kronfluence's convention next to kronfluence's at λ (``kfac_empirical_tl``).

The true Fisher (both libraries' default) samples a label per training point, so its accuracy varies
with the draw: EK-FAC with the true Fisher is also run with the seeds ``SEEDS`` in both libraries
(accuracy only, one run each), to tell a difference between the libraries from the draw's noise.
"""

from __future__ import annotations

import os
from pathlib import Path

import evaluation as E
import numpy as np
import torch
import workloads as W
from config import KRONFLUENCE_DAMPING, KRONFLUENCE_REFERENCE
from runner import ROOT, ensure_kronfluence_venv, log
from shared import Context, timing
from torch import nn

GOAL = (
    "infscale EK-FAC at least as accurate and at least 2× faster on the tiny BERT and the digits CNN, "
    "or the measured reason why not"
)
GOAL_WORKLOADS = ("bert", "cnn")
WORKLOADS = ("bert", "cnn", "mlp")
SEEDS = (1, 2, 3, 4)  # more draws of the true Fisher's sampled labels (seed 0: the main rows)
REFERENCE_CAP_S = 600  # CG in float64 at rtol 1e-10 on the CNN: 150 s at load 3 on 2 cores
BATCH = {"bert": 256, "cnn": 512, "mlp": 512}  # the fit and train-side query batch, both libraries

# (key, lib, method, fisher, per_position): the rows of every workload. kfac_empirical_tl is infscale's
# K-FAC in kronfluence's convention (layer l at T_l·λ, times T_l): the cross-check of the two K-FACs.
ROWS = [
    ("ekfac_exact", "infscale", "ekfac", "exact", False),
    ("ekfac_true", "infscale", "ekfac", "true", False),
    ("ekfac_empirical", "infscale", "ekfac", "empirical", False),
    ("kfac_exact", "infscale", "kfac", "exact", False),
    ("kfac_true", "infscale", "kfac", "true", False),
    ("kfac_empirical_tl", "infscale", "kfac", "empirical", True),
    ("ekfac_true", "kronfluence", "ekfac", "true", False),
    ("ekfac_empirical", "kronfluence", "ekfac", "empirical", False),
    ("kfac_true", "kronfluence", "kfac", "true", False),
    ("kfac_empirical", "kronfluence", "kfac", "empirical", False),
]
# BERT, infscale, on the whole model (Embedding and LayerNorm blocks included where EK-FAC supports
# them): the rows a user gets without adapting the model.
NATIVE_BERT_ROWS = ("ekfac_exact", "ekfac_true", "kfac_exact", "kfac_true")
# (infscale row, kronfluence row) that compute the same thing: the implementations' cross-check
CROSS = [
    ("ekfac_empirical", "ekfac_empirical"),
    ("kfac_empirical_tl", "kfac_empirical"),
    ("ekfac_true", "ekfac_true"),
]


def load() -> tuple[float, float, float] | None:
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def build(kind: str, small: bool, workdir: Path) -> dict:
    """The trained model and data of ``kind``, saved to ``workdir/workload.pt`` for the children."""
    import bert_task as B

    workdir.mkdir(parents=True, exist_ok=True)
    if kind == "bert":
        model, info = B.trained_model(workdir / "bert-weights.pt")
        data = B.make_data()
        tr, te = data["train"], data["test"]
        if small:
            tr, te = {k: v[:64] for k, v in tr.items()}, {k: v[:10] for k, v in te.items()}
        x_tr, y_tr, x_te, y_te = B.inputs(tr), tr["labels"], B.inputs(te), te["labels"]
        saved = {"state_dict": model.state_dict()}
        training = f"bert_task.train(): {B.TRAINING}"
    else:
        if kind == "mlp":
            model, _, (x_tr, y_tr, x_te, y_te) = W.digits_mlp()
            training = "workloads.digits_mlp(): Adam lr 0.01, 300 full-batch epochs, weight decay 1e-3"
        else:
            from sections.cnn import cnn_workload

            model, (x_tr, y_tr, x_te, y_te) = cnn_workload(quick=small)
            epochs = 40 if small else 150  # cnn_workload's quick / full training
            training = (
                f"sections/cnn.py cnn_workload(): Adam lr 0.01, {epochs} full-batch epochs, weight decay 1e-3"
            )
        if small:
            x_tr, y_tr, x_te, y_te = x_tr[:200], y_tr[:200], x_te[:20], y_te[:20]
        saved = {"model": model}
    torch.save(
        saved | {"kind": kind, "x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te},
        workdir / "workload.pt",
    )
    with torch.no_grad():
        out = model(**x_te) if kind == "bert" else model(x_te)
        logits = out.logits if kind == "bert" else out
    linear = [p for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) for p in m.parameters()]
    return {
        "model": model,
        "n_train": len(y_tr),
        "n_test": len(y_te),
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_params_linear": sum(p.numel() for p in linear),
        "test_accuracy": float((logits.argmax(1) == y_te).float().mean()),
        "training": training,
        "positions": positions(model, x_tr),
    }


def positions(model: nn.Module, x) -> dict[str, float]:
    """Positions per example that each Linear / Conv2d layer sees in kronfluence's count: output
    locations of a Conv2d; for a Linear on (b, L, d) the unmasked tokens when an attention mask of
    (b, L) is given (kronfluence counts those), else L; 1 for (b, d)."""
    mask = x.get("attention_mask") if isinstance(x, dict) else None
    found, hooks = {}, []

    def hook(name):
        def record(module, args, out):
            if isinstance(module, nn.Conv2d):
                found[name] = float(out.shape[-2] * out.shape[-1])
            elif args[0].dim() > 2 and mask is not None and args[0].shape[:-1] == mask.shape:
                found[name] = float(mask.sum()) / len(mask)
            else:
                found[name] = float(np.prod(args[0].shape[1:-1])) if args[0].dim() > 2 else 1.0

        return record

    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            hooks.append(m.register_forward_hook(hook(name)))
    with torch.no_grad():
        model(**x) if isinstance(x, dict) else model(x)
    for h in hooks:
        h.remove()
    return found


def agreements(values: np.ndarray | None, references: dict[str, np.ndarray]) -> dict:
    """{reference key: {"pearson", "top10"}} of ``values`` against each reference ({} when missing)."""
    if values is None or not np.all(np.isfinite(values)):
        return {}
    return {
        key: {"pearson": E.pearson(values, ref), "top10": E.topk_overlap(values, ref, 10)}
        for key, ref in references.items()
        if ref is not None and ref.shape == values.shape
    }


def measure(ctx: Context) -> dict:
    """Runs the section; returns its results as plain data (see docs/benchmarks-data/README.md)."""
    load_start = load()
    torch.set_num_threads(1)  # training too: the BERT's weights then equal the LDS ground truth's model
    kron_python, kron_version = ensure_kronfluence_venv()
    log(f"kronfluence yardstick: {kron_version}")
    workloads = []
    for kind in WORKLOADS:
        log(f"kronfluence vs infscale on {kind}")
        result, published = measure_workload(ctx, kind, kron_python)
        workloads.append(result)
        if kind == "bert":
            ctx.publish("kronfluence", bert=published)
    return {
        "goal_line": GOAL,
        "kronfluence": kron_version,
        "kronfluence_python": os.path.relpath(kron_python, ROOT) if kron_python else None,
        "threads": 1,
        "seeds": [0, *SEEDS],
        "load_start": load_start,
        "load_end": load(),
        "workloads": workloads,
    }


def measure_workload(ctx: Context, kind: str, kron_python: str | None) -> tuple[dict, dict]:
    """(the workload's results, what lds_bert needs: the influence matrices and where the workload is)."""
    R, wd = ctx.runner, ctx.runner.workdir / f"kron-{kind}"
    info = build(kind, ctx.mode == "smoke", wd)
    lam, bs = KRONFLUENCE_DAMPING[kind], BATCH[kind]
    base = {"threads": 1, "kind": kind, "damping": lam, "batch_size": bs, "positions": info["positions"]}
    trackings = ("all", "linear") if kind == "bert" else ("all",)
    # the reference: CG, Gauss-Newton, float64, tight tolerance (timed once: it is the yardstick)
    ref = base | {"method": "cg", "float64": True, "params": KRONFLUENCE_REFERENCE, "repeats": 1}
    ref_runs = R.run_jobs(
        "infscale",
        [(wd, ref | {"tracked": t}) for t in trackings],
        script="kron_child.py",
        cap_s=REFERENCE_CAP_S,
    )
    refs = dict(zip(trackings, ref_runs))
    ref_values = {t: r.get("values") for t, r in refs.items()}

    def bert_tracked(spec: dict, key: str) -> list[tuple[str, dict]]:
        """infscale: the whole model (BERT: as is, dict batches and HF outputs) and, for the BERT, also
        kronfluence's layers (the rest frozen; wrapped to return logits, as kronfluence's task does)."""
        out = [("all", spec | {"tracked": "all"})] if kind != "bert" or key in NATIVE_BERT_ROWS else []
        return out + ([("linear", spec | {"tracked": "linear", "logits": True})] if kind == "bert" else [])

    jobs, keys = [], []
    for key, lib, method, fisher, per_position in ROWS:
        spec = base | {"method": method, "fisher": fisher, "per_position": per_position}
        if lib == "infscale":
            for tracked, job in bert_tracked(spec, key):
                jobs.append((wd, job))
                keys.append((lib, key, tracked))
    results = dict(zip(keys, R.run_jobs("infscale", jobs, script="kron_child.py")))
    kron = [(key, base | {"method": m, "fisher": f}) for key, lib, m, f, _ in ROWS if lib == "kronfluence"]
    kron_runs = R.run_jobs(
        "kronfluence", [(wd, j) for _, j in kron], python=kron_python, script="kron_child.py"
    )
    k_tracked = "linear" if kind == "bert" else "all"  # kronfluence: its Linear / Conv2d layers
    results |= {("kronfluence", key, k_tracked): r for (key, _), r in zip(kron, kron_runs)}
    # the true Fisher's other draws: accuracy only
    true = base | {"method": "ekfac", "fisher": "true", "repeats": 1}
    spread_jobs = [(t, s, job | {"seed": s}) for s in SEEDS for t, job in bert_tracked(true, "ekfac_true")]
    spread_runs = R.run_jobs("infscale", [(wd, j) for *_, j in spread_jobs], script="kron_child.py")
    kron_spread = R.run_jobs(
        "kronfluence", [(wd, true | {"seed": s}) for s in SEEDS], python=kron_python, script="kron_child.py"
    )
    spread = {("infscale", t): {0: results.get(("infscale", "ekfac_true", t))} for t in trackings}
    spread[("kronfluence", k_tracked)] = {0: results.get(("kronfluence", "ekfac_true", k_tracked))}
    for (t, seed, _), r in zip(spread_jobs, spread_runs):
        spread[("infscale", t)][seed] = r
    for seed, r in zip(SEEDS, kron_spread):
        spread[("kronfluence", k_tracked)][seed] = r
    rows = [
        row_data(lib, key, tracked, r, lam, ref_values, kind) for (lib, key, tracked), r in results.items()
    ]
    values = {k: r.get("values") for k, r in results.items()}
    spreads = seed_spread(spread, ref_values)
    return {
        "name": kind,
        **{k: v for k, v in info.items() if k != "model"},
        "lambda": lam,
        "batch_size": bs,
        "references": [
            {"tracked": t, "method": "cg", "settings": KRONFLUENCE_REFERENCE, "run": timing(r)}
            for t, r in refs.items()
        ],
        "rows": rows,
        "cross_checks": cross_checks(values, kind),
        # BERT: how much leaving out the embeddings and LayerNorms changes the exact influences
        "linear_vs_all_reference": agreements(ref_values.get("linear"), {"all": ref_values["all"]}).get(
            "all"
        ),
        "seed_spread": spreads,
        "goal": goal(rows, spreads) if kind in GOAL_WORKLOADS else None,
    }, {"values": values, "references": ref_values, "lambda": lam, "workdir": wd, "rows": rows}


def row_data(lib: str, key: str, tracked: str, r: dict, lam: float, refs: dict, kind: str) -> dict:
    """One row as plain data: what ran, its run (times, or how it failed), its agreement with each
    reference."""
    spec = next(s for s in ROWS if s[0] == key and s[1] == lib)
    return {
        "key": key,
        "lib": lib,
        "method": spec[2],
        "fisher": spec[3],
        "damping": "T·λ, × T per layer" if spec[4] else lam,
        "tracked": tracked,
        "logits_wrapper": kind == "bert" and lib == "infscale" and tracked == "linear",
        "run": timing(r),
        "vs": agreements(r.get("values"), refs),
    }


def cross_checks(values: dict, kind: str) -> list[dict]:
    """Agreement between the infscale and kronfluence rows that compute the same thing (CROSS)."""
    out = []
    tracked = "linear" if kind == "bert" else "all"
    for a, b in CROSS:
        va, vb = values.get(("infscale", a, tracked)), values.get(("kronfluence", b, tracked))
        if va is not None and vb is not None:
            out.append(
                {
                    "infscale": a,
                    "kronfluence": b,
                    "pearson": E.pearson(va, vb),
                    "top10": E.topk_overlap(va, vb, 10),
                }
            )
    return out


def seed_spread(spread: dict, refs: dict) -> list[dict]:
    """EK-FAC with the true Fisher over the seeds: per (lib, tracked), the seeds that ran and their
    agreement with each reference ({ref: {"pearson": [...], "top10": [...]}})."""
    out = []
    for (lib, tracked), by_seed in spread.items():
        ran = {s: r["values"] for s, r in by_seed.items() if r and r.get("values") is not None}
        if not ran:
            continue
        vs = {ref: {"pearson": [], "top10": []} for ref in refs}
        for values in ran.values():
            for ref, a in agreements(values, refs).items():
                vs[ref]["pearson"].append(a["pearson"])
                vs[ref]["top10"].append(a["top10"])
        out.append({"lib": lib, "tracked": tracked, "seeds": list(ran), "vs": vs})
    return out


def goal(rows: list[dict], spreads: list[dict]) -> dict:
    """The issue's goal on one workload: infscale's EK-FAC (``fisher="exact"``, its most accurate and
    the one its other benchmarks use; on the whole model where that runs, else on kronfluence's layers)
    against kronfluence's EK-FAC (its default, the true Fisher), both against the reference on the
    parameters infscale's row covers; speed = kronfluence's time / infscale's (wall clock and CPU).
    Also the like-for-like comparison (infscale's EK-FAC with the true Fisher) and the seeds' spread."""

    def find(lib, key, tracked=None):
        for row in rows:
            if row["lib"] == lib and row["key"] == key and tracked in (None, row["tracked"]):
                if row["run"] and "error" not in row["run"]:
                    return row
        return None

    tracked = "all" if find("infscale", "ekfac_exact", "all") else "linear"
    mine, mine_true = find("infscale", "ekfac_exact", tracked), find("infscale", "ekfac_true", tracked)
    kron = find("kronfluence", "ekfac_true")
    if kron is None or mine is None or mine_true is None:
        return {"met": None, "why": "a run failed (see the rows)"}

    def versus(a, b):
        return {
            m: {"infscale": a["vs"].get(tracked, {}).get(m), "kronfluence": b["vs"].get(tracked, {}).get(m)}
            for m in ("pearson", "top10")
        }

    def speed(a):
        return {
            k: kron["run"][k] / a["run"][k] if a["run"].get(k) else None for k in ("total_s", "total_cpu_s")
        }

    accuracy = versus(mine, kron)
    as_accurate = all(
        a["infscale"] is not None and a["kronfluence"] is not None and a["infscale"] >= a["kronfluence"]
        for a in accuracy.values()
    )
    fast = speed(mine)
    twice = all(v is not None and v >= 2 for v in fast.values())
    seeds = {
        sp["lib"]: {m: [min(v), max(v)] for m, v in sp["vs"].get(tracked, {}).items() if v}
        for sp in spreads
        if sp["tracked"] == tracked or sp["lib"] == "kronfluence"
    }
    return {
        "reference": tracked,
        "infscale_row": {"key": mine["key"], "tracked": tracked},
        "accuracy": accuracy,
        "speed": fast,
        "true_fisher": {"accuracy": versus(mine_true, kron), "speed": speed(mine_true), "seed_range": seeds},
        "as_accurate": as_accurate,
        "twice_as_fast": twice,
        "met": as_accurate and twice,
    }
