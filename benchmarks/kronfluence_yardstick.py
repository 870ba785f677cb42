"""Kronfluence's EK-FAC and K-FAC on three workloads, as a yardstick for infscale (no infscale import).

Runs inside its own venv (kronfluence pins nothing that infscale needs, and must not see infscale):

    python3 -m venv .bench-venv-kronfluence
    .bench-venv-kronfluence/bin/pip install torch==2.13.0
    .bench-venv-kronfluence/bin/pip install torch==2.13.0 kronfluence "transformers>=4.40" scikit-learn
    .bench-venv-kronfluence/bin/pip uninstall -y torchvision   # see below
    .bench-venv-kronfluence/bin/python benchmarks/kronfluence_yardstick.py [--only mlp,cnn,bert]

kronfluence declares torchvision but never imports it; PyPI's torchvision build does not load against
the CPU torch ("operator torchvision::nms does not exist") and then breaks transformers' model imports,
so it is uninstalled.

Workloads (the very models infscale's benchmarks use; their weights are saved next to the results so
that infscale's side loads the same numbers):
  mlp   the digits MLP 64-32-10 (``workloads.digits_mlp``), 1437 train × 360 test;
  cnn   the digits CNN of ``benchmarks/cnn.py`` (definition copied: cnn.py imports infscale), same data;
  bert  the tiny BERT task of ``benchmarks/bert_task.py``, 256 train × 50 test, dict batches with masks.

For each workload, strategy (ekfac, kfac) and Fisher (kronfluence's default "true": labels sampled from
the model, torch seeded; and "empirical": the given labels): ``fit_all_factors`` and
``compute_pairwise_scores`` timed separately, at two explicit dampings (recorded; chosen relative to
the largest eigenvalue of the Gauss-Newton matrix in the tracked parameters, see
``dampings_chosen_as``). Writes to benchmarks/results-kronfluence/: ``<workload>.json`` (settings,
versions, timings, score summaries, conventions), ``<workload>_<strategy>_<fisher>_damping<k>.npy``
(float32 (n_test, n_train); digits: the first damping only, unless --save-all) and ``weights/<workload>.pt``.

Conventions (read from kronfluence 1.0.1's source, ``kronfluence/factor/config.py``, ``module/*``):
- Sign: the pairwise score is ∇m(z_test)ᵀ (F + λI)⁻¹ ∇ℓ(z_train), m = ``compute_measurement``. Here
  m is the test point's cross-entropy, so the scores have infscale's sign and meaning (positive:
  up-weighting the training point lowers the test loss); with kronfluence's other common measurement,
  the margin, the sign would flip.
- Damping: ``ScoreArguments.damping_factor`` is ABSOLUTE: it is added to every eigenvalue of each
  module's curvature block (None would mean 0.1 × the mean eigenvalue, a heuristic not used here).
- Scale of F: the per-sample gradients are those of each example's loss (``compute_train_loss``
  returns the batch SUM), and the EK-FAC eigenvalues are the MEAN over the N training examples of the
  squared rotated per-sample gradients: the Fisher of the MEAN training loss, the scale infscale's
  ``hessian_regularization`` refers to. So for EK-FAC, kronfluence ``damping_factor = λ`` equals
  infscale ``hessian_regularization = λ``.
- K-FAC: kronfluence divides both Kronecker factors A = Σ a aᵀ and S = Σ g gᵀ by the number of
  positions (examples × spatial locations for Conv2d, unmasked tokens for sequences); infscale's K-FAC
  sums A over positions per example and averages G over positions. For a layer that sees T positions
  per example, kronfluence's K-FAC eigenvalues are 1/T of infscale's: its block is F/T, and
  (F/T + λ)⁻¹ = T (F + T·λ)⁻¹, so that layer's kronfluence K-FAC scores at ``damping_factor = λ`` equal
  T times infscale's K-FAC at ``hessian_regularization = T·λ`` (the factor T was missing here at first;
  checked by the kronfluence benchmark section, Pearson r 1.0 on the digits CNN with the empirical
  Fisher). Identical for Linear layers on (b, d) inputs, T = 1. T per module is recorded in the JSON.
- Blocks: only nn.Linear and nn.Conv2d modules are tracked (their weights and biases); everything
  else (BERT's embeddings and LayerNorms) is held fixed and left out of the scores.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bert_task as B  # noqa: E402
import workloads as W  # noqa: E402

RESULTS = HERE / "results-kronfluence"
STRATEGIES = ("ekfac", "kfac")
FISHERS = ("true", "empirical")
GN_SHARES = (0.03, 0.003)  # damping as a share of the Gauss-Newton matrix's largest eigenvalue


# ------------------------------------------------------------------------------------- workloads
def digits_cnn(seed: int = 0) -> nn.Module:
    """The CNN of ``benchmarks/cnn.py`` (``cnn_workload(quick=False)``), trained the same way."""
    x_tr, y_tr, _, _ = W.digits_data()
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )
    return W.train(model, x_tr.reshape(-1, 1, 8, 8), y_tr, epochs=150, lr=0.01, seed=seed, weight_decay=1e-3)


class DictDataset(Dataset):
    """Rows of a dict of equal-length tensors, as dicts (the default collate stacks them back)."""

    def __init__(self, data: dict[str, Tensor]):
        self.data = data

    def __len__(self) -> int:
        return len(self.data["labels"])

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self.data.items()}


def load_workload(name: str, weights_dir: Path) -> dict:
    """{model (eval), train/test (Dataset), train_batch/test_batch (whole sets as one batch), dict_batches,
    positions: module → positions per example (None: computed from the data), weights}."""
    weights_dir.mkdir(parents=True, exist_ok=True)
    path = weights_dir / f"{name}.pt"
    t0 = time.perf_counter()
    if name == "mlp":
        model, _, (x_tr, y_tr, x_te, y_te) = W.digits_mlp()
        torch.save(model.state_dict(), path)
        train, test = TensorDataset(x_tr, y_tr), TensorDataset(x_te, y_te)
        batch_tr, batch_te = (x_tr, y_tr), (x_te, y_te)
        positions = {"0": 1, "2": 1}
        training = "workloads.digits_mlp(): Adam lr 0.01, 300 full-batch epochs, weight decay 1e-3, seed 0"
    elif name == "cnn":
        model = digits_cnn()
        torch.save(model.state_dict(), path)
        x_tr, y_tr, x_te, y_te = W.digits_data()
        x_tr, x_te = x_tr.reshape(-1, 1, 8, 8), x_te.reshape(-1, 1, 8, 8)
        train, test = TensorDataset(x_tr, y_tr), TensorDataset(x_te, y_te)
        batch_tr, batch_te = (x_tr, y_tr), (x_te, y_te)
        positions = {"0": 64, "2": 16, "5": 1}  # output locations of each layer per image
        training = "cnn.py cnn_workload(quick=False): Adam lr 0.01, 150 full-batch epochs, weight decay 1e-3"
    elif name == "bert":
        model, _ = B.trained_model(path)
        data = B.make_data()
        train, test = DictDataset(data["train"]), DictDataset(data["test"])
        batch_tr, batch_te = data["train"], data["test"]
        positions = None
        training = f"bert_task.train(): {B.TRAINING}"
    else:
        raise ValueError(f"unknown workload {name!r}; expected mlp, cnn or bert")
    return {
        "model": model.eval(),
        "train": train,
        "test": test,
        "train_batch": batch_tr,
        "test_batch": batch_te,
        "dict_batches": name == "bert",
        "positions": positions,
        "weights": str(path),
        "training": training,
        "train_seconds": time.perf_counter() - t0,
    }


def logits_of(model: nn.Module, batch) -> Tensor:
    if isinstance(batch, dict):
        return model(**B.inputs(batch)).logits
    return model(batch[0])


def labels_of(batch) -> Tensor:
    return batch["labels"] if isinstance(batch, dict) else batch[1]


# ------------------------------------------------------------------------------------- kronfluence task
def make_task(dict_batches: bool):
    from kronfluence.task import Task

    class ClassificationTask(Task):
        """Cross-entropy; the measurement is the query's loss (sign as infscale's)."""

        def compute_train_loss(self, batch, model, sample: bool = False) -> Tensor:
            logits = logits_of(model, batch)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1).flatten()
            else:
                y = labels_of(batch)
            return nn.functional.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model) -> Tensor:
            return nn.functional.cross_entropy(logits_of(model, batch), labels_of(batch), reduction="sum")

        def get_attention_mask(self, batch):
            return batch["attention_mask"] if dict_batches else None

    return ClassificationTask()


# ------------------------------------------------------------------------------------- curvature scale
def gauss_newton_top_eigenvalue(model: nn.Module, batch) -> float:
    """The largest eigenvalue of the Gauss-Newton matrix (1/N) Σ J_iᵀ (diag p_i − p_i p_iᵀ) J_i of the
    mean cross-entropy over ``batch`` in the TRACKED parameters (Linear / Conv2d weights and biases: all
    of the MLP's and CNN's, BERT's without embeddings and LayerNorms), float64, by Lanczos (scipy
    eigsh) on Gauss-Newton-vector products (torch.func jvp + vjp; attention on the SDPA MATH backend)."""
    from scipy.sparse.linalg import LinearOperator, eigsh
    from torch.func import functional_call, jvp, vjp
    from torch.nn.attention import SDPBackend, sdpa_kernel

    m = copy.deepcopy(model).double().eval()
    tracked = [
        (f"{mn}.{pn}" if mn else pn, p)
        for mn, mod in m.named_modules()
        if isinstance(mod, (nn.Linear, nn.Conv2d))
        for pn, p in mod.named_parameters()
    ]
    names = [n for n, _ in tracked]
    shapes = [p.shape for _, p in tracked]
    sizes = [p.numel() for _, p in tracked]
    theta0 = torch.cat([p.detach().reshape(-1) for _, p in tracked])
    if isinstance(batch, dict):
        x, kind = B.inputs(batch), "dict"
    else:
        x, kind = batch[0].double(), "tensor"
    n = len(labels_of(batch))

    def f(theta):  # the other parameters stay the module's own (functional_call, strict=False)
        params = {k: t.reshape(s) for k, t, s in zip(names, torch.split(theta, sizes), shapes)}
        out = functional_call(m, params, (), dict(x)) if kind == "dict" else functional_call(m, params, (x,))
        return out.logits if kind == "dict" else out

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        probs = torch.softmax(f(theta0), dim=-1)

    def matvec(v):
        v = torch.as_tensor(np.asarray(v).reshape(-1), dtype=torch.float64)
        with sdpa_kernel(SDPBackend.MATH):
            _, u = jvp(f, (theta0,), (v,))
            w = probs * u - probs * (probs * u).sum(-1, keepdim=True)
            _, pullback = vjp(f, theta0)
            (out,) = pullback(w / n)
        return out.detach().numpy()

    op = LinearOperator((theta0.numel(), theta0.numel()), matvec=matvec, dtype=np.float64)
    return float(eigsh(op, k=1, which="LA", tol=1e-6, return_eigenvectors=False)[0])


def token_positions(model: nn.Module, data: dict[str, Tensor]) -> dict[str, float]:
    """Mean number of positions per example that each tracked module of the BERT sees in
    kronfluence's count: unmasked tokens for (b, T, d) inputs, 1 for the pooler and classifier."""
    tokens = float(data["attention_mask"].sum(1).float().mean())
    return {
        name: (1.0 if name.startswith(("bert.pooler", "classifier")) else tokens)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear)
    }


def exact_empirical_fisher_scores(model: nn.Module, batch_tr, batch_te, damping: float) -> np.ndarray:
    """∇ℓ_testᵀ (F + λI)⁻¹ ∇ℓ_train with F the full (not block-diagonal) empirical Fisher (1/N) Gᵀ G of
    the tracked (Linear/Conv2d) parameters, in float64: a sanity check of kronfluence's sign and scale."""
    m = copy.deepcopy(model).double().eval()
    params = [p for mod in m.modules() if isinstance(mod, (nn.Linear, nn.Conv2d)) for p in mod.parameters()]

    def grads(batch) -> Tensor:
        rows = []
        n = len(labels_of(batch))
        for i in range(n):
            one = (
                {k: v[i : i + 1] for k, v in batch.items()}
                if isinstance(batch, dict)
                else (
                    batch[0][i : i + 1].double(),
                    batch[1][i : i + 1],
                )
            )
            loss = nn.functional.cross_entropy(logits_of(m, one), labels_of(one))
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
        return torch.stack(rows)

    g_tr, g_te = grads(batch_tr), grads(batch_te)
    fisher = g_tr.T @ g_tr / len(g_tr)
    eye = torch.eye(fisher.shape[0], dtype=fisher.dtype)
    return (g_te @ torch.linalg.solve(fisher + damping * eye, g_tr.T)).numpy()


# ------------------------------------------------------------------------------------- the runs
def run_workload(name: str, out_dir: Path, threads: int, save_all: bool) -> dict:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    wl = load_workload(name, out_dir / "weights")
    model = wl["model"]
    with torch.no_grad():
        logits = logits_of(model, wl["test_batch"])
        test_accuracy = float((logits.argmax(1) == labels_of(wl["test_batch"])).float().mean())
    t0 = time.perf_counter()
    lam_max = gauss_newton_top_eigenvalue(model, wl["train_batch"])
    t_eig = time.perf_counter() - t0
    dampings = [float(f"{share * lam_max:.2g}") for share in GN_SHARES]
    damping_note = (
        f"{GN_SHARES[0]:.1%} (cnn.py's first share) and {GN_SHARES[1]:.1%} of gauss_newton_lambda_max, the "
        "largest eigenvalue of the Gauss-Newton matrix of the mean training loss in the tracked parameters"
    )
    if name == "mlp":  # run_all.py's DIGITS_REG first, as in infscale's digits benchmarks
        dampings = [0.01, dampings[1]]
        damping_note = f"0.01 (run_all.DIGITS_REG) and {GN_SHARES[1]:.1%} of gauss_newton_lambda_max"
    n_train, n_test = len(wl["train"]), len(wl["test"])
    train_bs = 512 if n_train > 512 else n_train
    result = {
        "workload": name,
        "n_train": n_train,
        "n_test": n_test,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "training": wl["training"],
        "train_and_load_seconds": wl["train_seconds"],
        "test_accuracy": test_accuracy,
        "weights": os.path.relpath(wl["weights"], HERE.parent),
        "gauss_newton_lambda_max": lam_max,
        "gauss_newton_lambda_max_seconds": t_eig,
        "dampings": dampings,
        "dampings_chosen_as": damping_note,
        "threads": threads,
        "batch_sizes": {"fit": train_bs, "query": n_test, "train_in_query": train_bs},
        "runs": [],
    }
    positions = wl["positions"] or token_positions(model, wl["train_batch"])
    tracked = {
        n: sum(p.numel() for p in mod.parameters())
        for n, mod in model.named_modules()
        if isinstance(mod, (nn.Linear, nn.Conv2d))
    }
    result["tracked_modules"] = {
        n: {"parameters": k, "positions_per_example": positions[n]} for n, k in tracked.items()
    }
    result["tracked_parameters"] = sum(tracked.values())
    task = make_task(wl["dict_batches"])
    primary = {}
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in STRATEGIES:
            for fisher in FISHERS:
                tag = f"{strategy}_{fisher}"
                prepared = prepare_model(copy.deepcopy(model), task)
                analyzer = Analyzer(
                    analysis_name=f"{name}_{tag}",
                    model=prepared,
                    task=task,
                    cpu=True,
                    disable_tqdm=True,
                    output_dir=tmp,
                )
                factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=fisher == "empirical")
                torch.manual_seed(0)  # the sampled labels of the true Fisher
                t0 = time.perf_counter()
                analyzer.fit_all_factors(
                    factors_name=tag,
                    dataset=wl["train"],
                    per_device_batch_size=train_bs,
                    factor_args=factor_args,
                )
                fit_s = time.perf_counter() - t0
                run = {"strategy": strategy, "fisher": fisher, "fit_seconds": fit_s, "scores": []}
                for k, damping in enumerate(dampings):
                    score_args = ScoreArguments(damping_factor=damping)
                    t0 = time.perf_counter()
                    analyzer.compute_pairwise_scores(
                        scores_name=f"{tag}_{k}",
                        factors_name=tag,
                        query_dataset=wl["test"],
                        train_dataset=wl["train"],
                        per_device_query_batch_size=n_test,
                        per_device_train_batch_size=train_bs,
                        score_args=score_args,
                    )
                    query_s = time.perf_counter() - t0
                    scores = analyzer.load_pairwise_scores(f"{tag}_{k}")["all_modules"].numpy()
                    entry = {
                        "damping": damping,
                        "query_seconds": query_s,
                        "shape": list(scores.shape),
                        "mean": float(scores.mean()),
                        "std": float(scores.std()),
                    }
                    if k == 0 or save_all:
                        file = f"{name}_{tag}_damping{k}.npy"
                        np.save(out_dir / file, scores.astype(np.float32))
                        entry["file"] = file
                    if k == 0:
                        primary[tag] = scores
                    run["scores"].append(entry)
                run["factor_arguments"] = {k: str(v) for k, v in factor_args.__dict__.items()}
                run["score_arguments"] = {k: str(v) for k, v in score_args.__dict__.items()}
                result["runs"].append(run)
                print(
                    f"{name} {tag}: fit {fit_s:.2f}s, query {[e['query_seconds'] for e in run['scores']]}",
                    flush=True,
                )
    t0 = time.perf_counter()
    exact = exact_empirical_fisher_scores(model, wl["train_batch"], wl["test_batch"], dampings[0])
    pearson = {tag: W.pearson(s, exact) for tag, s in primary.items()}
    result["sanity_vs_exact_empirical_fisher"] = {
        "what": "Pearson r of each run's scores at the first damping with ∇ℓ_testᵀ (F + λI)⁻¹ ∇ℓ_train, "
        "F the full float64 empirical Fisher of the tracked parameters (not block-diagonal): positive and "
        "large confirms the sign and the damping scale",
        "pearson": pearson,
        "seconds": time.perf_counter() - t0,
    }
    result["agreement_at_first_damping"] = {
        f"{a} vs {b}": W.pearson(primary[a], primary[b])
        for i, a in enumerate(primary)
        for b in list(primary)[i + 1 :]
    }
    return result


def versions() -> dict:
    import kronfluence
    import sklearn
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "kronfluence": kronfluence.__version__,
        "transformers": transformers.__version__,
        "scikit-learn": sklearn.__version__,
        "numpy": np.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
    }


CONVENTIONS = {
    "sign": "kronfluence score = ∇m(z_test)ᵀ (F + λI)⁻¹ ∇ℓ(z_train) with m = the test point's "
    "cross-entropy (compute_measurement): same sign and meaning as infscale's influences() (positive = "
    "up-weighting the training point lowers the test loss). No conversion.",
    "damping": "ScoreArguments.damping_factor is absolute, added to every eigenvalue of each module's block.",
    "ekfac_conversion": "kronfluence EK-FAC damping_factor = λ  ⇔  infscale EkfacInfluence("
    "update_diagonal=True, hessian_regularization=λ): both regularize the Fisher of the MEAN training loss.",
    "kfac_conversion": "kronfluence K-FAC damping_factor = λ  ⇔  infscale EkfacInfluence("
    "update_diagonal=False) with hessian_regularization = {module: T_module · λ} and each module's "
    "influences (influences_by_layer) multiplied by T_module, T_module = positions_per_example in "
    "tracked_modules (kronfluence averages both Kronecker factors over positions, so its block is F/T; "
    "infscale sums A over an example's positions). T = 1 for Linear layers on (batch, features) inputs: "
    "then equal λ and equal scores.",
    "fisher": "'true' = kronfluence's default (one label per example sampled from the model, "
    "torch.manual_seed(0) before each fit) ⇔ infscale fisher='true' up to the random draws; 'empirical' = "
    "the given labels ⇔ infscale fisher='empirical' (deterministic: comparable exactly, up to "
    "kronfluence's float32 factors).",
    "blocks": "only nn.Linear / nn.Conv2d weights and biases are tracked (tracked_modules); other "
    "parameters (BERT embeddings, LayerNorms) are held fixed and do not enter the scores.",
    "dtypes": "kronfluence defaults: covariances, lambda, per-sample gradients, preconditioning and scores "
    "in float32, eigendecomposition in float64 (see factor_arguments / score_arguments).",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="mlp,cnn,bert", help="comma-separated workloads")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (infscale's benchmarks use 1)")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    parser.add_argument("--save-all", action="store_true", help="also save the scores at the second damping")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*GradScaler.*")  # kronfluence 1.0.1 on torch 2.13
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.only.split(","):
        t0 = time.perf_counter()
        result = run_workload(name, out, args.threads, args.save_all or name == "bert")
        result["versions"] = versions()
        result["conventions"] = CONVENTIONS
        result["total_seconds"] = time.perf_counter() - t0
        result["command"] = "python benchmarks/kronfluence_yardstick.py --only " + name
        (out / f"{name}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        print(f"{name}: done in {result['total_seconds']:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
