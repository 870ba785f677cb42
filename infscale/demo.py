"""``infscale demo``: what influence functions find in a dataset with flipped labels.

The demo, deterministic and without any download:

1. loads scikit-learn's bundled digits (8×8 images, 10 classes), splits them into
   training and test points, and flips the labels of 10% of the training points
   (each to another, random class; seeded);
2. trains a small MLP (64-32-10, tanh) full-batch with Adam;
3. fits an influence method (default ``DirectInfluence``, exact) and computes the
   test × train influences into ``OUT/influences.zarr`` with the sequential calculator
   (or a local Dask cluster with ``workers``), plus every training point's
   self-influence;
4. prints, for a few test images, their most helpful and most harmful training
   points, and how many flipped labels the largest self-influences find, next to
   what inspecting points at random would find;
5. draws ``OUT/report.png``.

Sign convention: influence = ∇ℓ(z_test)ᵀ (H + λI)⁻¹ ∇ℓ(z_train); positive means
up-weighting the training point lowers the test loss (it helps).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "DemoSize",
    "SIZES",
    "DemoData",
    "DemoResult",
    "load_data",
    "train_model",
    "run_demo",
    "draw_report",
]


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is: ``None`` means all the digits."""

    n_train: int | None
    n_test: int | None
    hidden: int
    epochs: int
    train_batch: int
    test_batch: int


#: ``full`` is what ``make demo`` runs; the others are for tests.
SIZES = {
    "full": DemoSize(None, None, 32, 300, 256, 64),
    "small": DemoSize(600, 120, 16, 150, 128, 32),
    "tiny": DemoSize(200, 24, 8, 60, 64, 8),
}

#: Method parameters the demo uses unless ``--param`` says otherwise (only those a
#: method accepts are passed).
DEMO_PARAMS: dict[str, Any] = {
    "hessian_regularization": 0.01,
    "second_order_mode": "gauss_newton",  # positive semi-definite: λ > 0 makes it invertible
    "rank": 50,
}

FLIP_FRACTION = 0.1
N_SHOW = 3  # test images in the report
K_SHOW = 3  # helpful / harmful training images per test image
SIGN_LINE = (
    "sign: influence = ∇ℓ(test)ᵀ (H + λI)⁻¹ ∇ℓ(train); positive = the training point helps "
    "(up-weighting it lowers the test loss), negative = it harms; removing training point i "
    "changes the test loss by about +influence / n_train."
)


@dataclass
class DemoData:
    """Digits with flipped training labels. Images are (n, 64) floats in [0, 1]."""

    x_train: Any
    y_train: Any  # the labels the model is trained on (10% flipped)
    y_train_true: np.ndarray
    flipped: np.ndarray  # bool (n_train,)
    x_test: Any
    y_test: Any


@dataclass
class DemoResult:
    """What the demo found (returned for tests and notebooks)."""

    out: str
    store: str
    report: str
    n_train: int
    n_test: int
    n_flipped: int
    test_accuracy: float
    shown: list[int]
    found: dict[float, int]  # fraction inspected → flipped labels found
    curve: tuple[np.ndarray, np.ndarray]
    n_axes: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def load_data(size: DemoSize, seed: int = 0) -> DemoData:
    """scikit-learn digits (scaled to [0, 1]), a 75/25 split (random_state=0), the first
    ``n_train``/``n_test`` points, and 10% of the training labels flipped to another class."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(X / 16.0, y, test_size=0.25, random_state=0)
    x_tr, y_tr = x_tr[: size.n_train], y_tr[: size.n_train]
    x_te, y_te = x_te[: size.n_test], y_te[: size.n_test]
    rng = np.random.default_rng(seed)
    n = len(y_tr)
    flip_idx = rng.choice(n, size=int(round(FLIP_FRACTION * n)), replace=False)
    noisy = y_tr.copy()
    noisy[flip_idx] = (y_tr[flip_idx] + rng.integers(1, 10, size=len(flip_idx))) % 10
    flipped = np.zeros(n, dtype=bool)
    flipped[flip_idx] = True
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return DemoData(f(x_tr), torch.tensor(noisy), y_tr, flipped, f(x_te), torch.tensor(y_te))


def train_model(data: DemoData, size: DemoSize, seed: int = 0, progress: bool = True):
    """A 64-hidden-10 tanh MLP trained full-batch with Adam (deterministic)."""
    import torch
    from torch import nn
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, size.hidden), nn.Tanh(), nn.Linear(size.hidden, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.02, weight_decay=1e-3)
    for _ in tqdm(range(size.epochs), desc="training", unit="epoch", disable=not progress, leave=False):
        opt.zero_grad()
        nn.functional.cross_entropy(model(data.x_train), data.y_train).backward()
        opt.step()
    return model.eval(), nn.functional.cross_entropy


def _method_params(cls: type, given: dict[str, Any]) -> dict[str, Any]:
    accepted = inspect.signature(cls.__init__).parameters
    params = {k: v for k, v in DEMO_PARAMS.items() if k in accepted}
    params.update(given)
    return params


def choose_tests(predicted: np.ndarray, y_test: np.ndarray, n: int = N_SHOW) -> list[int]:
    """The first misclassified test point (if any), then correctly classified ones of
    classes not yet shown, in index order."""
    chosen: list[int] = []
    wrong = np.flatnonzero(predicted != y_test)
    if len(wrong):
        chosen.append(int(wrong[0]))
    for i in range(len(y_test)):
        if len(chosen) >= n:
            break
        if i not in chosen and predicted[i] == y_test[i] and y_test[i] not in {y_test[c] for c in chosen}:
            chosen.append(i)
    return chosen[:n]


def recovery_curve(self_influences: np.ndarray, flipped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inspecting training points by decreasing self-influence: (fraction inspected,
    fraction of the flipped labels found), both starting at 0."""
    order = np.argsort(-self_influences, kind="stable")
    found = np.concatenate([[0], np.cumsum(flipped[order])])
    n = len(order)
    return np.arange(n + 1) / n, found / max(int(flipped.sum()), 1)


@contextlib.contextmanager
def _torch_threads(n: int):
    """Small matrices run fastest on one thread (and do not fight other processes for cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_demo(
    out: str = "demo-output",
    method: str = "direct",
    params: dict[str, Any] | None = None,
    workers: int | None = None,
    size: str | DemoSize = "full",
    progress: bool = True,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run the demo; see the module docstring. Returns what it found.

    Raises:
        infscale.errors.UsageError: unknown method or bad parameters.
    """
    with _torch_threads(1):
        return _run_demo(out, method, params, workers, size, progress, seed, log)


def _run_demo(out, method, params, workers, size, progress, seed, log) -> DemoResult:
    import torch
    from torch.utils.data import TensorDataset

    import infscale

    from .app.cluster import dask_client
    from .app.pipeline import ComputeSettings, compute_into_group, fit
    from .app.registry import make_influence_model, resolve_method
    from .app.results import SELF_INFLUENCES, open_results, prepare_group

    start = time.perf_counter()
    log = log or (lambda message: print(message, flush=True))
    size = SIZES[size] if isinstance(size, str) else size
    short, cls = resolve_method(method)
    params = _method_params(cls, dict(params or {}))

    data = load_data(size, seed)
    n_train, n_test = len(data.y_train), len(data.y_test)
    n_flipped = int(data.flipped.sum())
    log(
        f"infscale demo: scikit-learn digits, {n_train} training / {n_test} test images; "
        f"{n_flipped} training labels ({100 * FLIP_FRACTION:.0f}%) flipped to another class (seed {seed})."
    )
    model, loss = train_model(data, size, seed, progress)
    with torch.no_grad():
        predicted = model(data.x_test).argmax(1).numpy()
        train_fit = (model(data.x_train).argmax(1) == data.y_train).float().mean().item()
    y_test = data.y_test.numpy()
    accuracy = float((predicted == y_test).mean())
    log(
        f"trained MLP 64-{size.hidden}-10 ({size.epochs} epochs): test accuracy {100 * accuracy:.1f}%, "
        f"agreement with the noisy training labels {100 * train_fit:.1f}%."
    )

    infl_model = make_influence_model(short, model, loss, params)
    train_ds = TensorDataset(data.x_train, data.y_train)
    test_ds = TensorDataset(data.x_test, data.y_test)
    t_fit = time.perf_counter()
    fit(infl_model, train_ds, size.train_batch)
    log(
        f"fitted {cls.__name__}({', '.join(f'{k}={v!r}' for k, v in params.items())}) in "
        f"{time.perf_counter() - t_fit:.1f} s ({infl_model.n_parameters} parameters)."
    )

    os.makedirs(out, exist_ok=True)
    store = os.path.join(out, "influences.zarr")
    target = prepare_group(  # an old demo store is replaced when the first new block is ready
        store,
        overwrite=True,
        resume=False,
        attributes={
            "demo": "digits with flipped labels",
            "method": cls.__name__,
            "params": params,
            "mode": "up",
            "n_train": n_train,
            "n_test": n_test,
            "train_labels": data.y_train.tolist(),
            "true_train_labels": data.y_train_true.tolist(),
            "flipped": np.flatnonzero(data.flipped).tolist(),
            "test_labels": y_test.tolist(),
            "scheduler": f"local:{workers}" if workers else "sync",
            "infscale_version": infscale.__version__,
        },
    )
    settings = ComputeSettings(
        batch_size=size.train_batch, test_batch_size=size.test_batch, self_influences=True, top_k=10,
        progress=progress,
    )  # fmt: skip
    with dask_client("local", workers) if workers else contextlib.nullcontext() as client:
        compute_into_group(infl_model, train_ds, test_ds, target, settings, client=client, log=log)
    group, stored = open_results(store)
    influences = np.asarray(stored[:], dtype=np.float64)
    self_infl = np.asarray(group[SELF_INFLUENCES][:], dtype=np.float64)

    log("")
    log(SIGN_LINE)
    log(f"scale: influences here range over [{influences.min():.3g}, {influences.max():.3g}].")
    labels = data.y_train.numpy()
    shown = choose_tests(predicted, y_test)

    def describe(j: int) -> str:
        note = f", flipped from {data.y_train_true[j]}" if data.flipped[j] else ""
        return f"#{j} (label {labels[j]}{note}) {influences_row[j]:+.3g}"

    for t in shown:
        influences_row = influences[t]
        order = np.argsort(-influences_row, kind="stable")
        verdict = "correct" if predicted[t] == y_test[t] else "WRONG"
        log(f"\ntest image #{t}: label {y_test[t]}, predicted {predicted[t]} ({verdict})")
        log("  most helpful: " + "; ".join(describe(j) for j in order[:K_SHOW]))
        log("  most harmful: " + "; ".join(describe(j) for j in order[::-1][:K_SHOW]))

    fractions, recovered = recovery_curve(self_infl, data.flipped)
    found: dict[float, int] = {}
    log(f"\nhunting the {n_flipped} flipped labels: inspect training points by decreasing self-influence")
    order = np.argsort(-self_infl, kind="stable")
    for frac in (0.1, 0.2):
        k = int(round(frac * n_train))
        hits = int(data.flipped[order[:k]].sum())
        found[frac] = hits
        chance = n_flipped * k / n_train
        log(
            f"  top {100 * frac:.0f}% ({k} points): {hits} of {n_flipped} flipped labels found "
            f"({100 * hits / max(n_flipped, 1):.0f}%); inspecting at random would find {chance:.1f} "
            f"({100 * k / n_train:.0f}%)."
        )

    report = os.path.join(out, "report.png")
    n_axes = draw_report(
        report, data, predicted, influences, shown, (fractions, recovered), found, cls.__name__
    )
    seconds = time.perf_counter() - start
    log(f"\nwrote {store} (infscale info {store}) and {report} in {seconds:.0f} s.")
    return DemoResult(
        out=out, store=store, report=report, n_train=n_train, n_test=n_test, n_flipped=n_flipped,
        test_accuracy=accuracy, shown=shown, found=found, curve=(fractions, recovered), n_axes=n_axes,
        seconds=seconds, extra={"method": cls.__name__, "params": params},
    )  # fmt: skip


def _fmt(value: float) -> str:
    return f"{value:+.0f}" if abs(value) >= 10 else f"{value:+.2g}"


def draw_report(
    path: str,
    data: DemoData,
    predicted: np.ndarray,
    influences: np.ndarray,
    shown: list[int],
    curve: tuple[np.ndarray, np.ndarray],
    found: dict[float, int],
    method_name: str,
) -> int:
    """Draw the report (matplotlib, Agg): one row per shown test image (the image, its
    ``K_SHOW`` most helpful and ``K_SHOW`` most harmful training images, labelled; flipped
    labels in red), and the curve "fraction of flipped labels found vs fraction of data
    inspected". Returns the number of axes drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.gridspec import GridSpec

    n_rows = len(shown)
    n_cols = 1 + 2 * K_SHOW
    fig = Figure(figsize=(1.25 * n_cols + 0.4, 1.55 * n_rows + 3.4), dpi=80)
    # columns: test image, gap, K_SHOW helpful, gap, K_SHOW harmful
    widths = [1, 0.3] + [1] * K_SHOW + [0.3] + [1] * K_SHOW
    gs = GridSpec(n_rows + 1, len(widths), figure=fig, height_ratios=[1] * n_rows + [2.0],
                  width_ratios=widths, hspace=0.8, wspace=0.15, top=0.82, bottom=0.08)  # fmt: skip
    x_train = data.x_train.numpy().reshape(-1, 8, 8)
    x_test = data.x_test.numpy().reshape(-1, 8, 8)
    labels = data.y_train.numpy()
    y_test = data.y_test.numpy()
    red = "#c0392b"

    def image(ax, img, title, color="black", frame=None):
        ax.imshow(img, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=7.5, color=color)
        if frame:
            for spine in ax.spines.values():
                spine.set_edgecolor(frame)
                spine.set_linewidth(2.5)

    n_axes = 0
    header_axes = {}
    for r, t in enumerate(shown):
        row = influences[t]
        order = np.argsort(-row, kind="stable")
        ok = predicted[t] == y_test[t]
        ax = fig.add_subplot(gs[r, 0])
        image(ax, x_test[t], f"test #{t}\nlabel {y_test[t]}, pred {predicted[t]}", "black" if ok else red)
        n_axes += 1
        for c, j in enumerate(list(order[:K_SHOW]) + list(order[::-1][:K_SHOW])):
            ax = fig.add_subplot(gs[r, 2 + c + (c >= K_SHOW)])
            if r == 0:
                header_axes[c] = ax
            flipped = bool(data.flipped[j])
            note = f"label {labels[j]}" + (f" FLIPPED\n(true {data.y_train_true[j]})" if flipped else "\n")
            image(
                ax,
                x_train[j],
                f"#{j} {_fmt(row[j])}\n{note}",
                red if flipped else "black",
                red if flipped else None,
            )
            n_axes += 1
    for c, text, color in (
        (0, "most helpful training images →", "#1e7b34"),
        (K_SHOW, "most harmful training images →", red),
    ):
        if c in header_axes:
            box = header_axes[c].get_position()
            fig.text(box.x0, box.y1 + 0.075, text, fontsize=9, color=color)

    ax = fig.add_subplot(gs[n_rows, :])
    fractions, recovered = curve
    ax.plot(fractions, recovered, color="#1f5fa8", lw=2, label=f"by self-influence ({method_name})")
    ax.plot([0, 1], [0, 1], color="gray", ls="--", lw=1, label="random order (chance)")
    n_flipped = int(data.flipped.sum())
    for frac, hits in found.items():
        ax.plot([frac], [hits / max(n_flipped, 1)], "o", color="#1f5fa8")
        ax.annotate(f"{hits}/{n_flipped} at {100 * frac:.0f}%", (frac, hits / max(n_flipped, 1)),
                    textcoords="offset points", xytext=(8, -12), fontsize=8)  # fmt: skip
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("fraction of training data inspected (largest self-influence first)")
    ax.set_ylabel("fraction of flipped\nlabels found")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    n_axes += 1
    fig.suptitle(
        f"infscale demo: digits, {len(labels)} training images, {n_flipped} labels flipped; "
        "influence > 0 helps the test prediction",
        fontsize=10,
    )
    FigureCanvasAgg(fig)  # the Agg canvas: no display, no global pyplot state
    fig.savefig(path, dpi=80)
    return n_axes
