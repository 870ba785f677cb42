"""Ground truth for the linear datamodeling score (LDS) on the tiny BERT task of ``bert_task.py``.

Retrains the task's model on M random subsets of half the training set, K times each with different
minibatch orders (fixed seeds), and records each retrained model's loss on every test point; ``lds``
then scores any (n_test, n_train) influence matrix against the losses averaged over the K runs. No
infscale import: it runs in infscale's venv or in the kronfluence one.

    python benchmarks/lds_bert.py [--models 50] [--seeds 3] [--fraction 0.5] [--scores A.npy B.npy ...]

Outputs (benchmarks/results-kronfluence/): ``lds_bert.npz`` with ``subsets`` (M, n_train) bool,
``losses`` (M, K, n_test) float64, ``full_losses`` (n_test,) of the model trained on all data; and
``lds_bert.json`` with the settings, versions, timings, the noise of the ground truth (how well two
training runs on the same subsets agree) and the LDS of the given score files and of the
gradient-inner-product baseline.

Why K runs: with one run per subset, the minibatch order moves a test loss about as much as the
subset does (measured: the Spearman correlation across subsets between two runs' losses is 0.3 to 0.4
per test point), and the LDS of the same scores ranged from 0.07 to 0.2 between runs; averaging over
K = 3 runs steadies it.

Sign. infscale's influences are I[t, i] = ∇ℓ(z_t)ᵀ (H + λI)⁻¹ ∇ℓ(z_i): positive means up-weighting
training point i LOWERS test loss t. Training on a subset S instead of the full set removes the other
points (weight −1/n each), which changes the loss by about +(1/n) Σ_{i∉S} I[t, i] = const − (1/n)
Σ_{i∈S} I[t, i]. So the datamodel's predicted loss of test point t for subset S is −Σ_{i∈S} I[t, i]
(up to a positive factor and a constant, to which Spearman's rank correlation is blind), and the LDS
is the mean over test points of Spearman's correlation, across the M subsets, between that prediction
and the measured loss. Scores with the opposite convention (positive = harmful) give −LDS.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bert_task as B  # noqa: E402

RESULTS = HERE / "results-kronfluence"
SUBSET_SEED = 12345


def random_subsets(n_models: int, n_train: int, fraction: float, seed: int = SUBSET_SEED) -> np.ndarray:
    """(n_models, n_train) bool: row m marks a uniformly random subset of round(fraction·n_train) points."""
    rng = np.random.default_rng(seed)
    k = int(round(fraction * n_train))
    masks = np.zeros((n_models, n_train), dtype=bool)
    for m in range(n_models):
        masks[m, rng.choice(n_train, size=k, replace=False)] = True
    return masks


def shuffle_seed(m: int, k: int) -> int:
    """The minibatch-order seed of run k on subset m."""
    return 1_000_000 + 1000 * k + m


def retrain_losses(
    subsets: np.ndarray, data: dict, seeds: int = 1, init_seed: int = B.TRAINING["seed"]
) -> tuple[np.ndarray, list]:
    """(M, seeds, n_test) test losses of the task's model retrained on each subset ``seeds`` times, and
    the seconds per model. Every model starts from the same initialization (``init_seed``, the analysed
    model's); run k on subset m shuffles its minibatches with ``shuffle_seed(m, k)``; epochs, lr and
    batch size are ``bert_task.TRAINING``'s."""
    losses, seconds = np.zeros((len(subsets), seeds, len(data["test"]["labels"]))), []
    for k in range(seeds):
        for m, mask in enumerate(subsets):
            t0 = time.perf_counter()
            idx = np.flatnonzero(mask)
            model = B.train(B.build_model(init_seed), data["train"], indices=idx, seed=shuffle_seed(m, k))
            losses[m, k] = B.per_example_losses(model, data["test"])
            seconds.append(time.perf_counter() - t0)
    return losses, seconds


def run_agreement(losses: np.ndarray) -> float | None:
    """Mean over test points of the Spearman correlation across subsets between the losses of runs 0
    and 1 (``losses`` (M, K, n_test)): how much of a test loss the subset decides; None if K = 1."""
    from scipy.stats import spearmanr

    if losses.shape[1] < 2:
        return None
    return float(np.nanmean([spearmanr(losses[:, 0, t], losses[:, 1, t])[0] for t in range(losses.shape[2])]))


def lds(scores: np.ndarray, subsets: np.ndarray, losses: np.ndarray) -> tuple[float, np.ndarray]:
    """The linear datamodeling score of ``scores`` (n_test, n_train) in infscale's convention
    (positive = helpful) against retrained models: ``subsets`` (M, n_train) bool and their measured
    test ``losses`` (M, n_test), or (M, K, n_test) for K runs per subset (then averaged over K).
    Returns (mean over test points, per-test-point Spearman correlations (n_test,)) of the predicted
    loss −Σ_{i∈S} scores[t, i] with the measured loss.

    Raises ValueError when the shapes do not match."""
    from scipy.stats import spearmanr

    scores, subsets, losses = np.asarray(scores, np.float64), np.asarray(subsets, bool), np.asarray(losses)
    if losses.ndim == 3:
        losses = losses.mean(axis=1)
    if scores.ndim != 2 or subsets.shape[1] != scores.shape[1] or losses.shape != (len(subsets), len(scores)):
        raise ValueError(
            f"lds(): scores {scores.shape}, subsets {subsets.shape} and losses {losses.shape} do not match; "
            "expected (n_test, n_train), (M, n_train) and (M, n_test)"
        )
    predicted = -(subsets.astype(np.float64) @ scores.T)  # (M, n_test)
    per_test = np.array([spearmanr(predicted[:, t], losses[:, t])[0] for t in range(scores.shape[0])])
    return float(np.nanmean(per_test)), per_test


def gradient_inner_products(model, data: dict) -> np.ndarray:
    """(n_test, n_train) ∇ℓ_testᵀ ∇ℓ_train over all parameters, float64 (the λ → ∞ limit of influences,
    times λ): a baseline for the LDS that needs no curvature."""
    model = model.double().eval()
    params = [p for p in model.parameters()]

    def grads(split: dict) -> torch.Tensor:
        rows = []
        for i in range(len(split["labels"])):
            one = {k: v[i : i + 1] for k, v in split.items()}
            loss = B.loss_fn(model(**B.inputs(one)), one["labels"])
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
        return torch.stack(rows)

    return (grads(data["test"]) @ grads(data["train"]).T).numpy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=50, help="number of random subsets")
    parser.add_argument("--seeds", type=int, default=3, help="training runs per subset (minibatch orders)")
    parser.add_argument(
        "--fraction", type=float, default=0.5, help="subset size as a share of the training set"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--scores", nargs="*", default=[], help=".npy score files (n_test, n_train) to score")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    data = B.make_data()
    t0 = time.perf_counter()
    full, info = B.trained_model()  # saved to a temporary file
    full_seconds = time.perf_counter() - t0
    full_losses = B.per_example_losses(full, data["test"])
    same_as_yardstick = None
    yardstick_weights = out / "weights" / "bert.pt"
    if yardstick_weights.exists():
        other = B.load_model(yardstick_weights)
        same_as_yardstick = max(
            float((a - b).abs().max())
            for a, b in zip(full.state_dict().values(), other.state_dict().values())
        )

    subsets = random_subsets(args.models, B.N_TRAIN, args.fraction)
    t0 = time.perf_counter()
    losses, seconds = retrain_losses(subsets, data, args.seeds)
    retrain_seconds = time.perf_counter() - t0
    np.savez(out / "lds_bert.npz", subsets=subsets, losses=losses, full_losses=full_losses)

    scored = {}
    t0 = time.perf_counter()
    baseline = gradient_inner_products(full, data)
    scored["gradient inner products (baseline, no curvature)"] = lds(baseline, subsets, losses)[0]
    baseline_seconds = time.perf_counter() - t0
    for path in args.scores:
        scored[str(path)] = lds(np.load(path), subsets, losses)[0]
    if args.seeds > 1:  # what one run per subset would have measured
        scored["single run (run 0) per subset"] = {
            name: lds(np.load(name) if name in args.scores else baseline, subsets, losses[:, 0])[0]
            for name in [*args.scores, "gradient inner products (baseline, no curvature)"]
        }

    import transformers

    result = {
        "task": "benchmarks/bert_task.py",
        "n_train": B.N_TRAIN,
        "n_test": B.N_TEST,
        "models": args.models,
        "seeds": args.seeds,
        "trainings": args.models * args.seeds,
        "fraction": args.fraction,
        "subset_seed": SUBSET_SEED,
        "retraining": f"same initialization as the analysed model (seed {B.TRAINING['seed']}); run k on "
        f"subset m shuffles with seed 1_000_000 + 1000 k + m; {B.TRAINING}; LDS on the mean loss over runs",
        "threads": args.threads,
        "full_model": info,
        "full_model_seconds": full_seconds,
        "full_model_max_abs_difference_to_yardstick_weights": same_as_yardstick,
        "retrain_seconds_total": retrain_seconds,
        "retrain_seconds_per_model": {"mean": float(np.mean(seconds)), "max": float(np.max(seconds))},
        "test_loss_std_across_subsets_mean": float(losses.mean(1).std(0).mean()),
        "test_loss_std_across_runs_mean": float(losses.std(1).mean()) if args.seeds > 1 else None,
        "run_agreement": run_agreement(losses),
        "run_agreement_is": "mean over test points of Spearman(run 0 losses, run 1 losses) across subsets",
        "lds": scored,
        "baseline_seconds": baseline_seconds,
        "sign": "predicted loss of test t for subset S = −Σ_{i∈S} scores[t, i] (infscale's convention: "
        "positive = helpful); LDS = mean over t of Spearman(predicted, measured) across the subsets",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
        },
        "command": " ".join(["python benchmarks/lds_bert.py", *sys.argv[1:]]),
    }
    (out / "lds_bert.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({k: result[k] for k in ("retrain_seconds_total", "run_agreement", "lds")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
