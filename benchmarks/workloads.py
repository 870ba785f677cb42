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
    x_tr, x_te, y_tr, y_te = train_test_split(X, y, random_state=0)
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
        n_samples=52000, n_features=128, n_informative=32, n_redundant=32, n_classes=10,
        n_clusters_per_class=2, random_state=0,
    )
    x_tr, x_te, y_tr, y_te = train_test_split(X, y, test_size=2000, random_state=0)
    mean, std = x_tr[:10000].mean(0), x_tr[:10000].std(0) + 1e-12
    f = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return f(x_tr[:n_train]), torch.tensor(y_tr[:n_train]), f(x_te[:n_test]), torch.tensor(y_te[:n_test])


def wide_mlp(n_train=10_000, n_test=500, epochs=40, seed=0):
    """MLP 128-256-256-10 with tanh (≈101k parameters), trained 40 epochs with Adam."""
    x_tr, y_tr, x_te, y_te = wide_pool(n_train, n_test)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(128, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)
    )
    train(model, x_tr[:10000], y_tr[:10000], epochs=epochs, lr=1e-3, batch_size=128, seed=seed)
    return model, nn.functional.cross_entropy, (x_tr, y_tr, x_te, y_te)


def pearson(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def relative_error(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
