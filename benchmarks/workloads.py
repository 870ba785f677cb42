"""Shared benchmark workloads: the digits MLP and the wide MLP (same data and
models for infscale and for pyDVL). Deterministic; nothing is downloaded."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def digits_data():
    """scikit-learn digits, standardized: 1437 train / 360 test (train_test_split random_state=0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(X, y, test_size=0.2, random_state=0)
    scaler = StandardScaler().fit(x_tr)
    f = lambda a: torch.tensor(scaler.transform(a), dtype=torch.float32)  # noqa: E731
    return f(x_tr), torch.tensor(y_tr), f(x_te), torch.tensor(y_te)


def train(model, x, y, epochs=200, lr=0.01, batch_size=None, seed=0, weight_decay=0.0):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = x.shape[0]
    bs = batch_size or n
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g) if bs < n else torch.arange(n)
        for s in range(0, n, bs):
            idx = perm[s : s + bs]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def digits_mlp(seed=0):
    """The digits MLP 64-32-10 with tanh, trained full-batch with Adam."""
    x_tr, y_tr, x_te, y_te = digits_data()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    train(model, x_tr, y_tr, epochs=300, lr=0.01, seed=seed, weight_decay=1e-3)
    return model, nn.functional.cross_entropy, (x_tr, y_tr, x_te, y_te)


def wide_pool(n_train=10_000, n_test=500):
    """make_classification pool of 52,000 rows split 50,000/2,000; standardized on the first
    10,000 training rows. Returns the first n_train training and n_test test rows."""
    from sklearn.datasets import make_classification
    from sklearn.model_selection import train_test_split

    X, y = make_classification(
        n_samples=52000,
        n_features=128,
        n_informative=32,
        n_redundant=32,
        n_classes=10,
        n_clusters_per_class=2,
        random_state=0,
    )
    x_tr, x_te, y_tr, y_te = train_test_split(X, y, test_size=2000, random_state=0)
    mean, std = x_tr[:10000].mean(0), x_tr[:10000].std(0) + 1e-12
    f = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return f(x_tr[:n_train]), torch.tensor(y_tr[:n_train]), f(x_te[:n_test]), torch.tensor(y_te[:n_test])


def wide_mlp(n_train=10_000, n_test=500, epochs=40, seed=0):
    """MLP 128-256-256-10 with tanh (≈101k parameters), trained 40 epochs with Adam."""
    x_tr, y_tr, x_te, y_te = wide_pool(n_train, n_test)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(128, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
    train(model, x_tr[:10000], y_tr[:10000], epochs=epochs, lr=1e-3, batch_size=128, seed=seed)
    return model, nn.functional.cross_entropy, (x_tr, y_tr, x_te, y_te)


def pearson(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def relative_error(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---------------------------------------------------------------------------- models as plain data
# A model travels to the benchmark subprocesses (infscale's venv and pyDVL's) as an architecture
# spec (JSON) plus a state_dict, so that both libraries load exactly the same numbers.


def architecture(model: nn.Module) -> list:
    """The spec of an nn.Sequential of Linear / Tanh / ReLU layers (see ``build_model``)."""
    spec = []
    for layer in model if isinstance(model, nn.Sequential) else [model]:
        if isinstance(layer, nn.Linear):
            spec.append(["linear", layer.in_features, layer.out_features, layer.bias is not None])
        elif isinstance(layer, nn.Tanh):
            spec.append(["tanh"])
        elif isinstance(layer, nn.ReLU):
            spec.append(["relu"])
        else:
            raise ValueError(f"architecture(): unsupported layer {type(layer).__name__}")
    return spec


def build_model(spec: list, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """Rebuild the nn.Sequential described by ``architecture``."""
    layers = []
    for entry in spec:
        if entry[0] == "linear":
            layers.append(nn.Linear(entry[1], entry[2], bias=entry[3]))
        elif entry[0] == "tanh":
            layers.append(nn.Tanh())
        elif entry[0] == "relu":
            layers.append(nn.ReLU())
        else:
            raise ValueError(f"build_model(): unknown layer {entry[0]!r}")
    return nn.Sequential(*layers).to(dtype).eval()


def bce_loss(outputs, targets):
    """Binary cross-entropy on one logit per sample, averaged over the batch."""
    return nn.functional.binary_cross_entropy_with_logits(outputs.squeeze(-1), targets.to(outputs.dtype))


LOSSES = {"ce": nn.functional.cross_entropy, "bce": bce_loss}


# ---------------------------------------------------------------------------- further workloads
def flipped_digits(fraction=0.1, seed=0):
    """The digits data with ``fraction`` of the training labels replaced by another class.

    Returns (x_tr, y_noisy, x_te, y_te, flipped) where flipped is a bool mask over the training set.
    """
    x_tr, y_tr, x_te, y_te = digits_data()
    g = np.random.default_rng(seed)
    n = len(y_tr)
    idx = g.choice(n, size=int(round(fraction * n)), replace=False)
    y_noisy = y_tr.clone()
    y_noisy[idx] = (y_tr[idx] + torch.as_tensor(g.integers(1, 10, size=len(idx)))) % 10
    flipped = np.zeros(n, dtype=bool)
    flipped[idx] = True
    return x_tr, y_noisy, x_te, y_te, flipped


def digits_mlp_on(x, y, seed=0, epochs=300):
    """The digits MLP architecture trained as ``digits_mlp`` on other data (subsets, noisy labels)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    return train(model, x, y, epochs=epochs, lr=0.01, seed=seed, weight_decay=1e-3)


def binary_datasets():
    """Two binary classification problems from scikit-learn's bundled data, standardized, float64:
    name → (x_tr, y_tr, x_te, y_te) with y in {0., 1.}."""
    from sklearn.datasets import load_breast_cancer, load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    out = {}
    X, y = load_breast_cancer(return_X_y=True)
    out["breast_cancer"] = (X, y)
    X, y = load_digits(return_X_y=True)
    keep = (y == 1) | (y == 7)  # the two digits a linear model confuses most among the easy pairs
    out["digits 1 vs 7"] = (X[keep], (y[keep] == 7).astype(np.float64))
    result = {}
    for name, (X, y) in out.items():
        x_tr, x_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
        scaler = StandardScaler().fit(x_tr)
        t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
        result[name] = (t(scaler.transform(x_tr)), t(y_tr), t(scaler.transform(x_te)), t(y_te))
    return result


def seed_problem():
    """The data and model of ../shared/checks/seed_examples.py ``make_problem`` (None when absent)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "shared" / "checks" / "seed_examples.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("seed_examples", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model, loss, train_set, test_set = module.make_problem()
    return model, loss, (*train_set.tensors, *test_set.tensors)
