"""Shared fixtures: small float64 problems with independent ground truth.

Everything here is tiny (tens of parameters, tens of samples) so that explicit
Hessians from ``torch.autograd.functional`` are cheap and exact to float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

# The test problems are tiny: intra-op threads only add OpenMP synchronization, which on a
# shared, busy machine costs 10-20x per operation (measured: 17 ms vs 360 ms per small HVP).
torch.set_num_threads(1)


@dataclass
class Problem:
    model: nn.Module
    loss: object
    x: Tensor
    y: Tensor
    x_test: Tensor
    y_test: Tensor

    def loader(self, batch_size: int | None = None, kind: str = "tuple"):
        """Batches of the training data as tuples (x, y), lists [x, y] or longer tuples (x, y, idx)."""
        n = self.x.shape[0]
        bs = batch_size or n
        out = []
        for s in range(0, n, bs):
            xb, yb = self.x[s : s + bs], self.y[s : s + bs]
            if kind == "list":
                out.append([xb, yb])
            elif kind == "long":
                out.append((xb, yb, torch.arange(s, s + xb.shape[0])))
            else:
                out.append((xb, yb))
        return out


def trainable(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def flat_loss_fn(model: nn.Module, loss, x: Tensor, y: Tensor, names=None):
    """θ (flat, trainable parameters in named_parameters order) ↦ loss(model_θ(x), y)."""
    params = trainable(model)
    names = list(params) if names is None else names
    shapes = [params[n].shape for n in names]
    numels = [params[n].numel() for n in names]
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in names}

    def f(theta: Tensor) -> Tensor:
        parts = torch.split(theta, numels)
        state = {**fixed, **{n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}}
        return loss(functional_call(model, state, (x,)), y)

    theta0 = torch.cat([params[n].reshape(-1) for n in names])
    return f, theta0


def explicit_hessian(model, loss, x, y, names=None) -> Tensor:
    """The Hessian of the mean loss over (x, y) by torch.autograd.functional.hessian."""
    f, theta0 = flat_loss_fn(model, loss, x, y, names)
    return hessian(f, theta0, vectorize=True)


def explicit_gradients(model, loss, x, y, names=None) -> Tensor:
    """Per-sample gradients (n, p), one torch.autograd.functional.jacobian per sample."""
    rows = []
    for i in range(x.shape[0]):
        f, theta0 = flat_loss_fn(model, loss, x[i : i + 1], y[i : i + 1], names)
        rows.append(jacobian(f, theta0))
    return torch.stack(rows)


def explicit_gauss_newton(model, loss, x, y) -> Tensor:
    """Σ_i J_iᵀ ∇²_{o_i} L J_i: J_i the Jacobian of sample i's model output, L the batch loss
    (its Hessian in the outputs is block-diagonal over samples)."""
    params = trainable(model)
    names = list(params)
    shapes = [params[n].shape for n in names]
    numels = [params[n].numel() for n in names]
    theta0 = torch.cat([params[n].reshape(-1) for n in names])

    def out(theta):
        parts = torch.split(theta, numels)
        state = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        return functional_call(model, state, (x,))

    J = jacobian(out, theta0, vectorize=True)  # (n, c, p)
    o = out(theta0).detach()
    A = hessian(lambda o_: loss(o_, y), o, vectorize=True)  # (n, c, n, c)
    idx = torch.arange(x.shape[0])
    A_diag = A[idx, :, idx, :]  # (n, c, c): the per-sample blocks
    return torch.einsum("nci,ncd,ndj->ij", J, A_diag, J)


def relative_error(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def linreg_truth(problem: Problem, lam: float):
    """Closed forms for y ≈ w·x + b with MSE: per-sample gradients, Hessian, and the
    influence functions (up and perturbation) of ``problem``'s test set on its training set."""
    w = problem.model.weight.detach().reshape(-1)
    b = problem.model.bias.detach()
    d = w.numel()

    def tilde(x):
        return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)

    def residual(x, y):
        return x @ w + b - y.reshape(-1)

    def gradients(x, y):
        return 2 * residual(x, y)[:, None] * tilde(x)

    def perturbation(factors, x, y):  # ∂/∂x_j [f_i · g(x_j)] = 2[(f_i·x̃_j) w + r_j f_i[:d]]
        fx = factors @ tilde(x).T  # (k, n)
        r = residual(x, y)
        return 2 * (fx[:, :, None] * w + r[None, :, None] * factors[:, None, :d])

    xt = tilde(problem.x)
    H = 2 * xt.T @ xt / problem.x.shape[0]
    A = H + lam * torch.eye(d + 1, dtype=H.dtype)
    factors = torch.linalg.solve(A, gradients(problem.x_test, problem.y_test).T).T
    return SimpleNamespace(
        gradients=gradients, hessian=H, factors=factors, perturbation=perturbation, solve=A
    )


@pytest.fixture(scope="session")
def ground_truth():
    """Independent ground truth: explicit derivatives by torch.autograd.functional."""
    return SimpleNamespace(
        hessian=explicit_hessian,
        gradients=explicit_gradients,
        gauss_newton=explicit_gauss_newton,
        linreg=linreg_truth,
        relerr=relative_error,
    )


@pytest.fixture
def linreg() -> Problem:
    """Linear regression y ≈ w·x + b with MSE, float64, at a point that is not the optimum."""
    g = torch.Generator().manual_seed(0)
    d, n, m = 3, 12, 5
    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64))
        model.bias.fill_(0.3)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64) + 0.1 * torch.randn(
        n, 1, generator=g, dtype=torch.float64
    )
    x_test = torch.randn(m, d, generator=g, dtype=torch.float64)
    y_test = torch.randn(m, 1, generator=g, dtype=torch.float64)
    return Problem(model, nn.functional.mse_loss, x, y, x_test, y_test)


def _mlp_data(n: int, m: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 4, generator=g, dtype=torch.float64) * 1.5
    labels = torch.arange(n + m) % 3
    x = centers[labels] + torch.randn(n + m, 4, generator=g, dtype=torch.float64)
    return x[:n], labels[:n], x[n:], labels[n:]


@pytest.fixture(scope="session")
def trained_mlp_state():
    """A 4-6-3 tanh MLP trained with L-BFGS on cross-entropy (float64); state dict and data."""
    torch.manual_seed(0)
    x, y, x_test, y_test = _mlp_data(40, 7)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=60)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + 1e-2 * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return {k: v.clone() for k, v in model.state_dict().items()}, (x, y, x_test, y_test)


@pytest.fixture
def mlp(trained_mlp_state) -> Problem:
    """A fresh copy of the trained tanh MLP with its data (float64, cross-entropy)."""
    state, (x, y, x_test, y_test) = trained_mlp_state
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    model.load_state_dict(state)
    return Problem(model, nn.functional.cross_entropy, x, y, x_test, y_test)


def _untrained_mlp() -> Problem:
    torch.manual_seed(3)
    x, y, x_test, y_test = _mlp_data(30, 5, seed=1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return Problem(model, nn.functional.cross_entropy, x, y, x_test, y_test)


@pytest.fixture
def untrained_mlp() -> Problem:
    """A random (untrained) tanh MLP with cross-entropy, float64: its Hessian is indefinite."""
    return _untrained_mlp()


@pytest.fixture(scope="session")
def untrained_mlp_curvature() -> dict[str, Tensor]:
    """The explicit Hessian and Gauss-Newton matrix of ``untrained_mlp``'s mean training loss."""
    p = _untrained_mlp()
    return {
        "hessian": explicit_hessian(p.model, p.loss, p.x, p.y),
        "gauss_newton": explicit_gauss_newton(p.model, p.loss, p.x, p.y),
    }


# --------------------------------------------------------------------------------------------------
# The small classifier shared by the approximate methods' tests (Arnoldi, LiSSA, Nyström, inverse
# harmonic mean): one training run and one set of explicit float64 curvature matrices per session.


def explicit_loss_gradients(model: nn.Module, loss, x: Tensor, y: Tensor) -> Tensor:
    """Per-sample gradients (n, p) as one vectorized torch.autograd.functional.jacobian of the
    unreduced loss (``loss`` must accept ``reduction="none"``)."""
    f, theta0 = flat_loss_fn(model, lambda out, target: loss(out, target, reduction="none"), x, y)
    return jacobian(f, theta0, vectorize=True)


class SmallClassifier:
    """A 3-4-3 tanh MLP (31 parameters) trained by plain gradient descent on cross-entropy (float64),
    with 30 training and 10 test points. Its Hessian has eigenvalues from about -1e-2 to 0.7 (indefinite),
    its Gauss-Newton matrix spans about 1e-4 … 0.6. Unpacks as (model, x, y, x_test, y_test).

    The explicit curvature and per-sample gradients (torch.autograd.functional, independent of the
    library's products) are computed on first use and cached: treat them as read-only."""

    n_parameters = 31

    def __init__(self, n: int = 40, n_train: int = 30, seed: int = 0, steps: int = 300):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 3, generator=g, dtype=torch.float64)
        y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 0.8).long()
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
        params = list(model.parameters())
        for _ in range(steps):  # plain gradient descent (torch.optim imports are slow)
            grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)
            with torch.no_grad():
                for p, dp in zip(params, grads):
                    p -= 0.5 * dp
        self.model, self.loss = model, nn.functional.cross_entropy
        self.x, self.y, self.x_test, self.y_test = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
        self._cache: dict[str, Tensor] = {}

    def __iter__(self):
        return iter((self.model, self.x, self.y, self.x_test, self.y_test))

    def __getitem__(self, i: int):
        return tuple(self)[i]

    def gradients(self, x: Tensor, y: Tensor) -> Tensor:
        """Explicit per-sample loss gradients (n, 31) at (x, y)."""
        return explicit_loss_gradients(self.model, self.loss, x, y)

    def _cached(self, key: str, compute) -> Tensor:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    @property
    def train_gradients(self) -> Tensor:
        return self._cached("train_gradients", lambda: self.gradients(self.x, self.y))

    @property
    def test_gradients(self) -> Tensor:
        return self._cached("test_gradients", lambda: self.gradients(self.x_test, self.y_test))

    def curvature(self, mode: str) -> Tensor:
        """The explicit Hessian, Gauss-Newton matrix or empirical Fisher (31, 31) of the mean
        training loss (the last from the jacobian-per-sample gradients)."""
        if mode == "hessian":
            return self._cached(mode, lambda: explicit_hessian(self.model, self.loss, self.x, self.y))
        if mode == "gauss_newton":
            return self._cached(mode, lambda: explicit_gauss_newton(self.model, self.loss, self.x, self.y))
        if mode == "empirical_fisher":
            return self._cached(mode, lambda: self.train_gradients.T @ self.train_gradients / len(self.x))
        raise ValueError(f"mode must be 'hessian', 'gauss_newton' or 'empirical_fisher'; got {mode!r}.")

    def exact_influences(self, mode: str, regularization) -> Tensor:
        """G_test (C + Λ)⁻¹ G_trainᵀ with C the explicit curvature and Λ the block-diagonal
        regularization: a float λ for the whole model, or a dict over the layers {"0": λ0, "2": λ2}
        (a layer-wise model keeps only the diagonal blocks of C)."""
        C = self.curvature(mode)
        if isinstance(regularization, dict):
            A = torch.zeros_like(C)
            for sl, lam in ((slice(0, 16), regularization["0"]), (slice(16, 31), regularization["2"])):
                A[sl, sl] = C[sl, sl] + lam * torch.eye(sl.stop - sl.start, dtype=C.dtype)
        else:
            A = C + regularization * torch.eye(C.shape[0], dtype=C.dtype)
        return self.test_gradients @ torch.linalg.solve(A, self.train_gradients.T)


@pytest.fixture(scope="session")
def small_classifier() -> SmallClassifier:
    """The GD-trained 3-4-3 tanh MLP with 30 training and 10 test points (see ``SmallClassifier``);
    shared by the session: tests must not change its parameters."""
    return SmallClassifier()
