"""One measurement of the kronfluence comparison in a fresh process: ``python kron_child.py SPEC.json``.

Runs under infscale's venv (lib "infscale") or the kronfluence yardstick's (``.bench-venv-kronfluence``,
lib "kronfluence"); it imports only the library its job names, so kronfluence never sees infscale. It
loads the model and data the parent saved (``workload.pt`` in the job's workdir: the digits MLP or CNN
as a pickled module, the tiny BERT as ``bert_task``'s state_dict), fits the method on the whole training
set, computes the whole test × train influence matrix, and writes

- ``<out>.json``: fit / query / total seconds, wall clock (``*_s``) and this process's CPU time
  (``*_cpu_s``: one torch thread, so about the computing time whatever else the machine runs), each the
  best of ``runs`` (``repeats`` when the first run took under ``repeat_under_s``; each run refits), the
  peak RSS, and an error if one occurred;
- ``<out>.npy``: the influences (n_test, n_train), float64.

A job: {lib, workdir, out, scratch, kind (mlp | cnn | bert), method (ekfac | kfac | cg | arnoldi |
nystroem), fisher (K-FAC / EK-FAC: true | empirical | exact), damping (λ), per_position (K-FAC in
kronfluence's convention: layer l at T_l·λ and its influences times T_l, T_l = ``positions[l]``),
tracked ("all", or "linear": every parameter outside nn.Linear / nn.Conv2d frozen, as kronfluence
holds them fixed), logits (wrap the BERT to return its logits tensor), float64 (model and inputs in
float64), seed (of the true Fisher's sampled labels; default 0), params (the method's other
settings), batch_size, threads, repeats, repeat_under_s}.
"""

from __future__ import annotations

import copy
import json
import resource
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from torch import nn  # noqa: E402


class Logits(nn.Module):
    """``model(**x).logits`` as a module (what kronfluence's task computes from a HF model's output)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **x):
        return self.model(**x).logits


def load_workload(workdir: Path) -> dict:
    """{kind, model (eval), x_train, y_train, x_test, y_test} as the parent saved them (x: a tensor, or
    for the BERT the dict of input_ids and attention_mask)."""
    saved = torch.load(workdir / "workload.pt", weights_only=False)
    if saved["kind"] == "bert":
        import bert_task as B

        model = B.build_model()
        model.load_state_dict(saved["state_dict"])
    else:
        model = saved["model"]
    return saved | {"model": model.eval()}


def freeze_all_but_linear(model: nn.Module) -> nn.Module:
    """Freeze every parameter outside nn.Linear / nn.Conv2d (embeddings, LayerNorms): kronfluence's set."""
    kept = {id(p) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in kept)
    return model


def loss_of(kind: str):
    if kind == "bert":
        import bert_task as B

        return B.loss_fn
    return nn.functional.cross_entropy


# ---------------------------------------------------------------------------- infscale
def infscale_run(job: dict, wl: dict):
    """(prepare, fit, query): nothing to prepare, the infscale method of ``job`` fitted on the training
    set, and its query."""
    import infscale.torch as IT

    model = copy.deepcopy(wl["model"])
    if job.get("tracked") == "linear":
        freeze_all_but_linear(model)
    prefix = ""
    if job.get("logits"):
        model, prefix = Logits(model), "model."
    x_tr, y_tr, x_te, y_te = wl["x_train"], wl["y_train"], wl["x_test"], wl["y_test"]
    bs = job["batch_size"]
    if wl["kind"] == "bert":
        n = len(y_tr)
        loader = [
            {**{k: v[s : s + bs] for k, v in x_tr.items()}, "labels": y_tr[s : s + bs]}
            for s in range(0, n, bs)
        ]
    else:
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_tr, y_tr), batch_size=bs)
    reg = job["damping"]
    if job.get("per_position"):
        reg = {prefix + name: t * job["damping"] for name, t in job["positions"].items()}
    method = job["method"]

    def fit(_):
        if method in ("ekfac", "kfac"):
            infl = IT.EkfacInfluence(
                model,
                update_diagonal=method == "ekfac",
                hessian_regularization=reg,
                fisher=job["fisher"],
                seed=job.get("seed", 0),
            )
        else:
            cls = {
                "cg": IT.CgInfluence,
                "arnoldi": IT.ArnoldiInfluence,
                "nystroem": IT.NystroemSketchInfluence,
            }
            infl = cls[method](
                model, loss_of(wl["kind"]), hessian_regularization=reg, **job.get("params", {})
            )
        return infl.fit(loader)

    def query(infl):
        if job.get("per_position"):  # kronfluence's K-FAC: layer l's influences at T_l·λ, times T_l
            by_layer = infl.influences_by_layer(x_te, y_te, x_tr, y_tr)
            scale = {prefix + name: t for name, t in job["positions"].items()}
            return sum(scale[name] * v.detach().double() for name, v in by_layer.items()).numpy()
        return infl.influences(x_te, y_te, x_tr, y_tr).detach().double().numpy()

    return lambda: None, fit, query


# ---------------------------------------------------------------------------- kronfluence
def kronfluence_run(job: dict, wl: dict):
    """(prepare, fit, query): a fresh model copy and output folder (untimed), kronfluence's
    ``prepare_model`` + ``Analyzer`` + ``fit_all_factors`` (its factors go to disk, as kronfluence
    always does), and ``compute_pairwise_scores`` + ``load_pairwise_scores``."""
    import kronfluence_yardstick as K
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from torch.utils.data import TensorDataset

    bert = wl["kind"] == "bert"
    if bert:
        train = K.DictDataset({**wl["x_train"], "labels": wl["y_train"]})
        test = K.DictDataset({**wl["x_test"], "labels": wl["y_test"]})
    else:
        train, test = TensorDataset(wl["x_train"], wl["y_train"]), TensorDataset(wl["x_test"], wl["y_test"])
    task = K.make_task(bert)
    bs, n_test = job["batch_size"], len(wl["y_test"])

    def prepare():  # untimed: a fresh copy (prepare_model wraps its modules in place), a fresh folder
        return copy.deepcopy(wl["model"]), tempfile.mkdtemp(dir=job["scratch"])

    def fit(prepared):
        model, tmp = prepared
        analyzer = Analyzer(
            analysis_name="run",
            model=prepare_model(model, task),
            task=task,
            cpu=True,
            disable_tqdm=True,
            output_dir=tmp,
        )
        torch.manual_seed(job.get("seed", 0))  # the sampled labels of the true Fisher
        args = FactorArguments(strategy=job["method"], use_empirical_fisher=job["fisher"] == "empirical")
        analyzer.fit_all_factors(factors_name="f", dataset=train, per_device_batch_size=bs, factor_args=args)
        return analyzer, tmp

    def query(fitted):
        analyzer, tmp = fitted
        analyzer.compute_pairwise_scores(
            scores_name="s",
            factors_name="f",
            query_dataset=test,
            train_dataset=train,
            per_device_query_batch_size=n_test,
            per_device_train_batch_size=bs,
            score_args=ScoreArguments(damping_factor=job["damping"]),
        )
        scores = analyzer.load_pairwise_scores("s")["all_modules"].double().numpy()
        shutil.rmtree(tmp, ignore_errors=True)
        return scores

    return prepare, fit, query


# ---------------------------------------------------------------------------- one job
def warm_up(wl: dict) -> None:
    """One untimed forward and backward pass (autograd's and the model's first-call costs)."""
    model = copy.deepcopy(wl["model"])
    x = {k: v[:2] for k, v in wl["x_train"].items()} if isinstance(wl["x_train"], dict) else wl["x_train"][:2]
    out = model(**x) if isinstance(x, dict) else model(x)
    loss_of(wl["kind"])(out, wl["y_train"][:2]).backward()


def in_float64(wl: dict) -> dict:
    """The workload in float64 (model and floating-point inputs; token ids, masks and labels stay)."""
    cast = lambda t: t.double() if t.is_floating_point() else t  # noqa: E731
    x_tr, x_te = wl["x_train"], wl["x_test"]
    if isinstance(x_tr, dict):
        return wl | {"model": wl["model"].double()}
    return wl | {"model": wl["model"].double(), "x_train": cast(x_tr), "x_test": cast(x_te)}


def run(job: dict) -> dict:
    import numpy as np

    torch.set_num_threads(job.get("threads", 1))
    wl = load_workload(Path(job["workdir"]))
    if job.get("float64"):
        wl = in_float64(wl)
    if job["lib"] == "infscale":
        # the infscale of this checkout (as run_all.py imports), not whichever one the venv installed
        sys.path.insert(1, str(HERE.parent))
        import infscale.torch  # noqa: F401  (imported before any timing, as kronfluence below)

        prepare, fit, query = infscale_run(job, wl)
    else:
        import kronfluence.analyzer  # noqa: F401

        prepare, fit, query = kronfluence_run(job, wl)
    warm_up(wl)
    keys = ("fit_s", "query_s", "total_s", "fit_cpu_s", "query_cpu_s", "total_cpu_s")
    best = dict.fromkeys(keys, float("inf"))
    values, runs = None, 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(job.get("repeats", 1)):
            if k > 0 and best["total_s"] >= job.get("repeat_under_s", float("inf")):
                break
            runs += 1
            prepared = prepare()
            t0, c0 = time.perf_counter(), time.process_time()
            fitted = fit(prepared)
            t1, c1 = time.perf_counter(), time.process_time()
            values = query(fitted)
            t2, c2 = time.perf_counter(), time.process_time()
            measured = (t1 - t0, t2 - t1, t2 - t0, c1 - c0, c2 - c1, c2 - c0)
            best = {key: min(best[key], value) for key, value in zip(keys, measured)}
    np.save(job["out"] + ".npy", np.asarray(values, dtype=np.float64))
    # kronfluence 1.0.1 on torch 2.13 warns about torch.cuda.amp.GradScaler on every run: left out
    said = list(dict.fromkeys(str(w.message)[:300] for w in caught if "GradScaler" not in str(w.message)))
    result = best | {"runs": runs, "shape": list(np.shape(values)), "peak_rss_mib": peak_rss_mib()}
    return result | ({"warnings": said[:5]} if said else {})


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> int:
    """Run each job of SPEC.json's "jobs" in turn (sharing the imports); one failing job is reported
    in its result and the others still run."""
    spec = json.loads(Path(sys.argv[1]).read_text())
    for job in spec["jobs"]:
        try:
            result = run(job)
        except Exception as error:  # noqa: BLE001 - reported on the page; the other jobs go on
            result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        Path(job["out"] + ".json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
