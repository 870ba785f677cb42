"""EkfacInfluence (K-FAC / EK-FAC) against ground truth built independently:

- the Kronecker factors A and G against brute-force sums of per-sample outer products, with layer
  inputs and output gradients taken from a hand-rolled forward pass (conv patches cut out by
  explicit loops, not ``unfold``);
- the EK-FAC diagonal against the explicit diagonal of the projected second moments of per-sample
  gradients from ``torch.func`` (``per_sample_gradients``);
- for a single sample, the identity E_{y~p}[δδᵀ] ⊗ ããᵀ = Jᵀ (∇²_f ℓ) J: the K-FAC (and EK-FAC)
  block with ``fisher="exact"`` equals the Gauss-Newton block built from the Jacobian of the outputs
  (``torch.autograd.functional.jacobian``); with ``fisher="empirical"`` it equals g gᵀ;
- linear regression with MSE, where the Kronecker model is exact for any number of samples: influences
  against the closed form;
- the solve against an explicit (G ⊗ A + λI)⁻¹.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from infscale.base import NotFittedError
from infscale.torch import DirectInfluence, EkfacInfluence
from infscale.torch.functional import per_sample_gradients

DT = torch.float64


def mlp(bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5, bias=bias), nn.Tanh(), nn.Linear(5, 3, bias=bias)).to(DT)


def cnn(seed=0):
    """Conv2d with padding and stride 2, Conv2d without bias, Linear with bias: a mixed model."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, stride=2),
        nn.Tanh(),
        nn.Conv2d(3, 2, 2, bias=False, dilation=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).to(DT)


def data(model_name, n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 4) if model_name == "mlp" else (n, 2, 6, 6)
    x = torch.randn(*shape, generator=g, dtype=DT)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


MODELS = {"mlp_bias": lambda: mlp(True), "mlp_nobias": lambda: mlp(False), "cnn": cnn}


def make(name):
    model = MODELS[name]()
    x, y = data("mlp" if name.startswith("mlp") else "cnn")
    return model, x, y


def loader(x, y, batch_size=5):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


# ---------------------------------------------------------------- brute force helpers
def explicit_patches(m: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """Layer inputs (T, d_in[+1]) of one sample, conv patches cut out by loops."""
    if isinstance(m, nn.Linear):
        rows = a.reshape(-1, m.in_features)
    else:
        (kh, kw), (sh, sw), (dh, dw), (ph, pw) = m.kernel_size, m.stride, m.dilation, m.padding
        ap = F.pad(a, (pw, pw, ph, ph))[0]
        H, W = ap.shape[1:]
        Ho, Wo = (H - dh * (kh - 1) - 1) // sh + 1, (W - dw * (kw - 1) - 1) // sw + 1
        rows = torch.stack(
            [
                ap[
                    :, i * sh : i * sh + dh * (kh - 1) + 1 : dh, j * sw : j * sw + dw * (kw - 1) + 1 : dw
                ].reshape(-1)
                for i in range(Ho)
                for j in range(Wo)
            ]
        )
    if m.bias is not None:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)
    return rows


def layer_terms(model: nn.Sequential, x1: torch.Tensor, label: torch.Tensor):
    """Per supported layer (in order): patches (T, d_in) and output gradients (T, d_out) of one
    sample's cross-entropy loss with the given label, from a hand-rolled forward pass."""
    h, inputs, leaves = x1.unsqueeze(0), [], []
    for m in model:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            inputs.append((m, h.detach()))
            s = m(h)
            z = torch.zeros_like(s, requires_grad=True)  # ∂ℓ/∂z = ∂ℓ/∂s
            leaves.append(z)
            h = s + z
        else:
            h = m(h)
    loss = F.cross_entropy(h, label.reshape(1))
    grads = torch.autograd.grad(loss, leaves)
    out = []
    for (m, a), d in zip(inputs, grads):
        d = d.reshape(1, -1) if isinstance(m, nn.Linear) else d[0].reshape(d.shape[1], -1).T
        out.append((explicit_patches(m, a), d))
    return out, h.detach()[0]


def to_matrix(m: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """Flat layer gradient (weight row-major, then bias) → (d_out, d_in[+1])."""
    d_out = m.weight.shape[0]
    n_w = m.weight.numel()
    W = g[:n_w].reshape(d_out, -1)
    return torch.cat([W, g[n_w:].reshape(d_out, 1)], 1) if m.bias is not None else W


def layer_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


# ---------------------------------------------------------------- factors
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_factors_match_brute_force(name, fisher):
    model, x, y = make(name)
    ek = EkfacInfluence(model, fisher=fisher).fit(loader(x, y))
    n, C = x.shape[0], 3
    names = layer_names(model)
    A = {k: 0.0 for k in names}
    G = {k: 0.0 for k in names}
    T = {}
    for i in range(n):
        terms, logits = layer_terms(model, x[i], y[i])
        p = torch.softmax(logits, 0)
        for k, (a, _) in zip(names, terms):
            A[k] = A[k] + a.T @ a
            T[k] = a.shape[0]
        # empirical: the given label; exact: every label c, weighted by its probability p_c
        labels = [(y[i], 1.0)] if fisher == "empirical" else [(torch.tensor(c), p[c]) for c in range(C)]
        for label, weight in labels:
            terms, _ = layer_terms(model, x[i], label)
            for k, (_, d) in zip(names, terms):
                G[k] = G[k] + weight * d.T @ d
    factors = ek.kronecker_factors()
    for k in names:
        torch.testing.assert_close(factors[k]["A"], A[k] / n, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(factors[k]["G"], G[k] / (n * T[k]), rtol=1e-9, atol=1e-12)


def test_true_fisher_is_seeded_and_converges_to_exact():
    model, x, y = make("mlp_bias")
    xr, yr = x.repeat(200, 1), y.repeat(200)
    fits = [EkfacInfluence(model, fisher="true", seed=s).fit(loader(xr, yr, 600)) for s in (0, 0, 1)]
    G = [f.kronecker_factors()["2"]["G"] for f in fits]
    torch.testing.assert_close(G[0], G[1])
    assert not torch.allclose(G[0], G[2])
    exact = EkfacInfluence(model, fisher="exact").fit(loader(x, y)).kronecker_factors()["2"]["G"]
    assert torch.linalg.norm(G[0] - exact) < 0.1 * torch.linalg.norm(exact)


@pytest.mark.parametrize("name", list(MODELS))
def test_ekfac_diagonal_is_projected_second_moment(name):
    model, x, y = make(name)
    ek = EkfacInfluence(model, fisher="empirical").fit(loader(x, y))
    g = per_sample_gradients(ek.layout, F.cross_entropy, x, y)
    modules = dict(model.named_modules())
    for k in layer_names(model):
        q_g, q_a = ek.eigenvectors_G[k], ek.eigenvectors_A[k]
        G = torch.stack([to_matrix(modules[k], gi) for gi in g[:, ek.layout.block(k).slice]])
        expected = (q_g.T @ G @ q_a).square().mean(0)
        torch.testing.assert_close(ek.diagonal[k], expected, rtol=1e-9, atol=1e-14)


def test_ekfac_diagonal_exact_fisher_sums_over_labels():
    model, x, y = make("cnn")
    ek = EkfacInfluence(model, fisher="exact").fit(loader(x, y))
    p = torch.softmax(model(x), 1).detach()
    modules = dict(model.named_modules())
    for k in layer_names(model):
        q_g, q_a = ek.eigenvectors_G[k], ek.eigenvectors_A[k]
        expected = 0.0
        for c in range(3):
            g = per_sample_gradients(ek.layout, F.cross_entropy, x, torch.full_like(y, c))
            G = torch.stack([to_matrix(modules[k], gi) for gi in g[:, ek.layout.block(k).slice]])
            expected = expected + (p[:, c, None, None] * (q_g.T @ G @ q_a).square()).mean(0)
        torch.testing.assert_close(ek.diagonal[k], expected, rtol=1e-9, atol=1e-14)


# ---------------------------------------------------------------- exact cases
def gauss_newton_block(model, x1, names, loss):
    params = dict(model.named_parameters())

    def f(*ps):
        return functional_call(model, {**params, **dict(zip(names, ps))}, (x1.unsqueeze(0),)).reshape(-1)

    J = torch.autograd.functional.jacobian(f, tuple(params[n].detach() for n in names))
    out = f(*(params[n].detach() for n in names)).detach()
    k = out.shape[0]
    J = torch.cat([j.reshape(k, -1) for j in J], 1)
    if loss == "cross_entropy":
        p = torch.softmax(out, 0)
        H = torch.diag(p) - torch.outer(p, p)
    else:
        H = (2 / k) * torch.eye(k, dtype=DT)
    return J.T @ H @ J


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("update_diagonal", [True, False])
def test_single_sample_kronecker_model_is_exact_gauss_newton(bias, loss, update_diagonal):
    model = mlp(bias)
    x, y = data("mlp", n=1)
    if loss == "mse":
        y = torch.randn(1, 3, dtype=DT)
    ek = EkfacInfluence(model, update_diagonal=update_diagonal, loss=loss, fisher="exact").fit(loader(x, y))
    for k in layer_names(model):
        names = list(ek.layout.block(k).parameter_names)
        torch.testing.assert_close(
            ek.curvature_block(k), gauss_newton_block(model, x[0], names, loss), rtol=1e-8, atol=1e-12
        )


@pytest.mark.parametrize("update_diagonal", [True, False])
def test_single_sample_empirical_fisher_is_outer_product_of_gradient(update_diagonal):
    model = mlp(True)
    x, y = data("mlp", n=1)
    ek = EkfacInfluence(model, update_diagonal=update_diagonal, fisher="empirical").fit(loader(x, y))
    g = per_sample_gradients(ek.layout, F.cross_entropy, x, y)[0]
    for k in layer_names(model):
        gk = g[ek.layout.block(k).slice]
        torch.testing.assert_close(ek.curvature_block(k), torch.outer(gk, gk), rtol=1e-8, atol=1e-12)


def test_single_sample_influences_match_direct_gauss_newton_layer_wise():
    model = mlp(True)
    x, y = data("mlp", n=1)
    xt, yt = data("mlp", n=4, seed=5)
    lam = 0.05
    ek = EkfacInfluence(model, hessian_regularization=lam, fisher="exact").fit(loader(x, y))
    direct = DirectInfluence(
        model, F.cross_entropy, lam, block_structure="layer_wise", second_order_mode="gauss_newton"
    ).fit(loader(x, y))
    torch.testing.assert_close(
        ek.influences(xt, yt, x, y), direct.influences(xt, yt, x, y), rtol=1e-8, atol=1e-12
    )
    torch.testing.assert_close(ek.influences(xt, yt), direct.influences(xt, yt), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("update_diagonal", [True, False])
def test_linear_regression_mse_matches_closed_form(update_diagonal):
    """One Linear layer with MSE: G = (2/k) I exactly, so the Kronecker model is the exact Hessian."""
    g = torch.Generator().manual_seed(3)
    n, d, k, lam = 40, 3, 2, 1e-3
    X = torch.randn(n, d, generator=g, dtype=DT)
    Y = torch.randn(n, k, generator=g, dtype=DT)
    model = nn.Linear(d, k).to(DT)
    ek = EkfacInfluence(
        model, update_diagonal=update_diagonal, loss="mse", fisher="exact", hessian_regularization=lam
    )
    ek.fit(loader(X, Y, 16))
    Xt = torch.cat([X, torch.ones(n, 1, dtype=DT)], 1)
    # parameters in the flat layout: weight (k, d) row-major, then bias (k)
    W = torch.cat([model.weight.detach(), model.bias.detach()[:, None]], 1)
    R = Xt @ W.T - Y  # residuals (n, k)
    grads_mat = (2 / k) * R[:, :, None] * Xt[:, None, :]  # (n, k, d+1)
    grads = torch.cat([grads_mat[:, :, :d].reshape(n, -1), grads_mat[:, :, d]], 1)
    A = Xt.T @ Xt / n
    H = torch.kron((2 / k) * torch.eye(k, dtype=DT), A)  # on [W|b] row-major
    perm = [o * (d + 1) + i for o in range(k) for i in range(d)] + [o * (d + 1) + d for o in range(k)]
    H = H[perm][:, perm]
    expected = grads[:5] @ torch.linalg.solve(H + lam * torch.eye(H.shape[0], dtype=DT), grads.T)
    torch.testing.assert_close(ek.influences(X[:5], Y[:5], X, Y), expected, rtol=1e-8, atol=1e-12)


# ---------------------------------------------------------------- solve and query paths
def test_kfac_solve_matches_explicit_kronecker_inverse():
    model, x, y = make("cnn")
    lam = 0.01
    ek = EkfacInfluence(model, update_diagonal=False, fisher="empirical", hessian_regularization=lam)
    ek.fit(loader(x, y))
    modules = dict(model.named_modules())
    g = per_sample_gradients(ek.layout, F.cross_entropy, x, y)
    total = 0.0
    for k, fac in ek.kronecker_factors().items():
        m = modules[k]
        d_out, d_in = fac["G"].shape[0], fac["A"].shape[0]
        K = torch.kron(fac["G"], fac["A"])  # on the gradient matrix [W|b], row-major
        n_w = m.weight.numel()
        w_cols = d_in - (m.bias is not None)
        perm = [o * d_in + i for o in range(d_out) for i in range(w_cols)]
        if m.bias is not None:
            perm += [o * d_in + d_in - 1 for o in range(d_out)]
        assert len(perm) == n_w + (d_out if m.bias is not None else 0)
        K = K[perm][:, perm]
        gk = g[:, ek.layout.block(k).slice]
        total = total + gk[:3] @ torch.linalg.solve(K + lam * torch.eye(K.shape[0], dtype=DT), gk.T)
    torch.testing.assert_close(ek.influences(x[:3], y[:3], x, y), total, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("update_diagonal", [True, False])
def test_query_paths_agree(update_diagonal):
    model, x, y = make("cnn")
    xt, yt = x[:3], y[:3]
    ek = EkfacInfluence(
        model, update_diagonal=update_diagonal, hessian_regularization=0.01, gradient_chunk_size=5
    )
    ek.fit(loader(x, y))
    g = per_sample_gradients(ek.layout, F.cross_entropy, x, y)
    torch.testing.assert_close(ek._gradients(x, y), g, rtol=1e-9, atol=1e-12)
    factors = ek.influence_factors(xt, yt)
    full = ek.influences(xt, yt, x, y)
    tol = dict(rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(full, factors @ g.T, **tol)
    torch.testing.assert_close(ek.influences_from_factors(factors, x, y), full, **tol)
    rep = ek.train_representation(x, y)
    torch.testing.assert_close(ek.influences_from_representation(factors, rep), full, **tol)
    sym = ek.influences(x, y)
    torch.testing.assert_close(ek.self_influences(x, y), torch.diagonal(sym), **tol)
    by_layer = ek.influences_by_layer(xt, yt, x, y)
    assert list(by_layer) == ["0", "2", "5"]
    torch.testing.assert_close(sum(by_layer.values()), full, **tol)
    by_factors = ek.influences_from_factors_by_layer(ek.influence_factors_by_layer(xt, yt), x, y)
    for k in by_layer:
        torch.testing.assert_close(by_factors[k], by_layer[k], **tol)
    sweep = ek.explore_hessian_regularization(x, y, [0.01, 0.5])
    for lam, per in sweep.items():
        ref = ek.with_regularization(lam).influences_by_layer(x, y)
        for k in ref:
            torch.testing.assert_close(per[k], ref[k], **tol)
    totals = ek.explore_hessian_regularization(x, y, [0.5], by_layer=False)
    torch.testing.assert_close(totals[0.5], ek.with_regularization(0.5).influences(x, y), **tol)


def test_perturbation_mode_matches_finite_differences():
    model, _, _ = make("mlp_bias")
    x, y = data("mlp", n=6)
    ek = EkfacInfluence(model, hessian_regularization=0.01).fit(loader(x, y))
    xt, yt, xs, ys = x[:2], y[:2], x[2:4], y[2:4]
    pert = ek.influences(xt, yt, xs, ys, mode="perturbation")
    assert pert.shape == (2, 2, 4)
    factors = ek.influence_factors(xt, yt)
    eps = 1e-6
    fd = torch.zeros_like(pert)
    for j in range(4):
        e = torch.zeros_like(xs)
        e[:, j] = eps
        up = ek.influences_from_factors(factors, xs + e, ys)
        down = ek.influences_from_factors(factors, xs - e, ys)
        fd[:, :, j] = (up - down) / (2 * eps)
    torch.testing.assert_close(pert, fd, rtol=1e-6, atol=1e-9)
    by_layer = ek.influences_by_layer(xt, yt, xs, ys, mode="perturbation")
    torch.testing.assert_close(sum(by_layer.values()), pert, rtol=1e-8, atol=1e-12)
    self_pert = ek.self_influences(xs, ys, mode="perturbation")
    assert self_pert.shape == (2, 4)


def test_kfac_and_ekfac_share_the_basis_and_ekfac_is_closer_to_the_fisher():
    """In the common eigenbasis, EK-FAC's diagonal is the Frobenius-optimal one, so its distance to
    the (empirical) Fisher block is at most K-FAC's."""
    model, x, y = make("cnn")
    kw = dict(fisher="empirical", hessian_regularization=0.01)
    ek = EkfacInfluence(model, update_diagonal=True, **kw).fit(loader(x, y))
    kf = EkfacInfluence(model, update_diagonal=False, **kw).fit(loader(x, y))
    g = per_sample_gradients(ek.layout, F.cross_entropy, x, y)
    for k in layer_names(model):
        torch.testing.assert_close(ek.eigenvectors_A[k], kf.eigenvectors_A[k])
        gk = g[:, ek.layout.block(k).slice]
        fisher = gk.T @ gk / x.shape[0]
        err_ek = torch.linalg.norm(ek.curvature_block(k) - fisher)
        err_kf = torch.linalg.norm(kf.curvature_block(k) - fisher)
        assert err_ek <= err_kf * (1 + 1e-12)
    assert not torch.allclose(ek.influences(x, y), kf.influences(x, y))


# ---------------------------------------------------------------- save / load
def test_save_and_load_factors_roundtrip(tmp_path):
    model, x, y = make("cnn")
    ek = EkfacInfluence(model, hessian_regularization=0.01).fit(loader(x, y))
    path = tmp_path / "factors.safetensors"
    ek.save_factors(path)
    loaded = EkfacInfluence(model, hessian_regularization=0.01).load_factors(path)
    assert loaded.is_fitted and loaded.n_train == x.shape[0]
    for name in ("eigenvectors_A", "eigenvalues_A", "eigenvectors_G", "eigenvalues_G", "diagonal"):
        for k, v in getattr(ek, name).items():
            assert torch.equal(getattr(loaded, name)[k], v)
    torch.testing.assert_close(
        loaded.influences(x[:3], y[:3], x, y), ek.influences(x[:3], y[:3], x, y), rtol=1e-12, atol=1e-14
    )
    with pytest.raises(ValueError, match="fisher='true'.*fisher='empirical'"):
        EkfacInfluence(model, fisher="empirical").load_factors(path)
    with pytest.raises(ValueError, match="layers"):
        EkfacInfluence(mlp()).load_factors(path)
    with pytest.raises(NotFittedError):
        EkfacInfluence(model).save_factors(tmp_path / "other.safetensors")


# ---------------------------------------------------------------- bad input
class Scale(nn.Module):
    """An elementwise scale EK-FAC has no model for (not a registered diagonal type)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, dtype=DT))

    def forward(self, x):
        return x * self.weight


def test_unsupported_layer_is_named():
    model = nn.Sequential(nn.Linear(4, 5), Scale(5), nn.Linear(5, 3)).to(DT)
    with pytest.raises(ValueError, match=r"'1' \(Scale\).*skip_unsupported=True"):
        EkfacInfluence(model)


def test_skip_unsupported_leaves_the_module_out():
    model = nn.Sequential(nn.Linear(4, 5), Scale(5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    x, y = data("mlp")
    with pytest.warns(UserWarning, match=r"'1' \(Scale\)"):
        ek = EkfacInfluence(model, skip_unsupported=True, hessian_regularization=0.01)
    assert all(p.requires_grad for p in model.parameters())  # the user's model is left as it was
    assert ek.layout.block_names == ["0", "3"]
    assert ek.n_parameters == 4 * 5 + 5 + 5 * 3 + 3
    assert ek.skipped_modules == [("1", "Scale")]
    ek.fit(loader(x, y))
    model[1].requires_grad_(False)  # the same, with the module frozen by hand
    frozen = EkfacInfluence(model, hessian_regularization=0.01).fit(loader(x, y))
    torch.testing.assert_close(ek.influences(x[:3], y[:3], x, y), frozen.influences(x[:3], y[:3], x, y))


def test_no_supported_layer():
    with pytest.raises(ValueError, match="no supported layer"):
        EkfacInfluence(nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten()), skip_unsupported=True)
    with pytest.raises(ValueError, match=r"Conv1d"):
        EkfacInfluence(nn.Sequential(nn.Conv1d(2, 3, 3)))


def test_grouped_conv_is_unsupported():
    with pytest.raises(ValueError, match="groups=2"):
        EkfacInfluence(nn.Sequential(nn.Conv2d(2, 4, 3, groups=2)))


def test_regression_loss_with_class_labels():
    model, x, y = make("mlp_bias")
    ek = EkfacInfluence(model, loss="mse")
    with pytest.raises(ValueError, match="loss='mse' is a regression loss.*int64"):
        ek.fit(loader(x, y))
    ek.fit(loader(x, torch.randn(x.shape[0], 3, dtype=DT)))
    with pytest.raises(ValueError, match="y_test.*loss='mse'|loss='mse'.*y_test"):
        ek.influences(x, y)
    with pytest.raises(ValueError, match="shaped like the model's outputs|model or the loss failed"):
        EkfacInfluence(model, loss="mse").fit(loader(x, torch.randn(x.shape[0], 2, dtype=DT)))


def test_bad_arguments():
    model, x, y = make("mlp_bias")
    with pytest.raises(ValueError, match="loss='hinge'"):
        EkfacInfluence(model, loss="hinge")
    with pytest.raises(ValueError, match="fisher='fake'"):
        EkfacInfluence(model, fisher="fake")
    with pytest.raises(ValueError, match="cross_entropy.*integer class labels"):
        EkfacInfluence(model).fit(loader(x, torch.randn(x.shape[0], dtype=DT)))
    with pytest.raises(NotFittedError):
        EkfacInfluence(model).influences(x, y)
    ek = EkfacInfluence(model, update_diagonal=False, fisher="empirical").fit(loader(x[:1], y[:1]))
    with pytest.raises(ValueError, match="singular.*hessian_regularization > 0"):
        ek.influences(x, y)
    with pytest.raises(ValueError, match="≥ 0"):
        ek.explore_hessian_regularization(x, y, [-1.0])


def test_layer_called_twice_is_one_block_with_its_calls_as_locations():
    """A Linear applied twice per forward pass: one block, both calls' (δ, ã) are locations of one
    per-sample gradient (K-FAC-expand); gradients and the EK-FAC diagonal are exact."""
    lin = nn.Linear(3, 3).to(DT)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, generator=g, dtype=DT), torch.tensor([0, 1, 2, 0, 1, 2])
    ek = EkfacInfluence(model, fisher="empirical").fit(loader(x, y, 4))
    assert ek.layout.block_names == ["0"]
    g = per_sample_gradients(ek.layout, F.cross_entropy, x, y)
    torch.testing.assert_close(ek._gradients(x, y), g, rtol=1e-9, atol=1e-12)
    G = torch.stack([to_matrix(lin, gi) for gi in g])
    expected = (ek.eigenvectors_G["0"].T @ G @ ek.eigenvectors_A["0"]).square().mean(0)
    torch.testing.assert_close(ek.diagonal["0"], expected, rtol=1e-9, atol=1e-14)


@pytest.mark.slow
def test_digits_mlp_ekfac_agrees_with_direct_gauss_newton():
    """Quality, not exactness (covered above): EK-FAC vs the exact Gauss-Newton influences of the
    digits MLP at λ = 0.03 (the largest Gauss-Newton eigenvalue is about 0.18). ~10 s."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from workloads import digits_mlp, pearson

    model, loss, (xtr, ytr, xte, yte) = digits_mlp()
    dl = DataLoader(TensorDataset(xtr, ytr), batch_size=512)
    direct = DirectInfluence(model, loss, 0.03, second_order_mode="gauss_newton").fit(dl)
    expected = direct.influences(xte[:50], yte[:50], xtr, ytr)
    for fisher in ("true", "exact"):
        ek = EkfacInfluence(model, hessian_regularization=0.03, fisher=fisher).fit(dl)
        assert pearson(ek.influences(xte[:50], yte[:50], xtr, ytr), expected) >= 0.9


@pytest.mark.parametrize("kind", ["conv_same_reflect_dilated", "linear_on_sequences"])
def test_more_layer_shapes_give_exact_gradients_and_consistent_influences(kind):
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(4)
    if kind == "conv_same_reflect_dilated":
        conv = nn.Conv2d(2, 3, 3, padding="same", padding_mode="reflect", dilation=2)
        model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(3 * 36, 3)).to(DT)
        x = torch.randn(7, 2, 6, 6, generator=g, dtype=DT)
    else:  # a Linear applied at 5 positions: the KFC convention with T = 5
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(15, 3)).to(DT)
        x = torch.randn(7, 5, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (7,), generator=g)
    ek = EkfacInfluence(model, hessian_regularization=0.01, fisher="empirical").fit(loader(x, y))
    grads = per_sample_gradients(ek.layout, F.cross_entropy, x, y)
    torch.testing.assert_close(ek._gradients(x, y), grads, rtol=1e-9, atol=1e-12)
    expected = ek.influence_factors(x[:2], y[:2]) @ grads.T
    torch.testing.assert_close(ek.influences(x[:2], y[:2], x, y), expected, rtol=1e-8, atol=1e-12)
    # the first layer's diagonal is the projected second moment of the exact per-sample gradients
    first = ek.layout.blocks[0]
    m = dict(model.named_modules())[first.name]
    G = torch.stack([to_matrix(m, gi) for gi in grads[:, first.slice]])
    q_g, q_a = ek.eigenvectors_G[first.name], ek.eigenvectors_A[first.name]
    torch.testing.assert_close(
        ek.diagonal[first.name], (q_g.T @ G @ q_a).square().mean(0), rtol=1e-9, atol=1e-14
    )


# ---------------------------------------------------------------- singular curvature, the user's model
@pytest.mark.parametrize("update_diagonal", [True, False])
def test_singular_curvature_raises_not_positive_definite_with_a_working_lambda(update_diagonal):
    """An input feature that is 0 in every sample: the first layer's A has a zero eigenvalue, so its
    curvature model (K-FAC: Λ_G ⊗ Λ_A; EK-FAC: the projected second moments, which vanish along that
    direction) is singular. With λ = 0 a query raises NotPositiveDefiniteError, and the λ the message
    suggests gives the influences of an explicit solve with the layer's curvature model."""
    from infscale.errors import NotPositiveDefiniteError

    model, x, y = make("mlp_bias")
    x = x.clone()
    x[:, 2] = 0.0
    ek = EkfacInfluence(model, update_diagonal=update_diagonal, fisher="empirical").fit(loader(x, y))
    for query in (
        lambda m: m.influences(x[:3], y[:3], x, y),
        lambda m: m.self_influences(x, y),
        lambda m: m.influence_factors(x, y),
        lambda m: m.explore_hessian_regularization(x, y, [0.0]),
    ):
        with pytest.raises(NotPositiveDefiniteError, match="layer '0'.*singular") as info:
            query(ek)
    message = str(info.value)
    assert "hessian_regularization=0 " in message
    suggested = float(re.search(r"hessian_regularization ≥ (\S+),", message).group(1))
    assert suggested > 0
    fixed = ek.with_regularization(suggested)
    g = per_sample_gradients(ek.layout, F.cross_entropy, x, y)
    expected = 0.0
    for b in ek.layout.blocks:
        C = fixed.curvature_block(b.name) + suggested * torch.eye(b.size, dtype=DT)
        expected = expected + g[:3, b.slice] @ torch.linalg.solve(C, g[:, b.slice].T)
    torch.testing.assert_close(fixed.influences(x[:3], y[:3], x, y), expected, rtol=1e-6, atol=0.0)


class WatchedParameter(nn.Parameter):
    """A parameter that logs every change of its requires_grad flag."""

    changes: list = []

    def requires_grad_(self, requires_grad: bool = True):
        WatchedParameter.changes.append(requires_grad)
        return super().requires_grad_(requires_grad)

    def __setattr__(self, name, value):
        if name == "requires_grad":
            WatchedParameter.changes.append(value)
        super().__setattr__(name, value)


def test_ekfac_leaves_every_user_parameter_alone():
    """A model with a module EK-FAC leaves out (Scale, skip_unsupported=True), a frozen layer and an
    eval-mode batch norm (a diagonal block): building, fitting and querying never touch a parameter's
    requires_grad (not even for a moment), its value or its .grad, nor a buffer."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6), Scale(6), nn.Tanh(), nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)
    ).to(DT)
    model[3].requires_grad_(False)
    model.eval()
    for module in (model[0], model[1]):
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, WatchedParameter(p.detach().clone(), requires_grad=p.requires_grad))
    WatchedParameter.changes.clear()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    values = {n: t.detach().clone() for n, t in model.state_dict().items()}
    x, y = data("mlp", n=10)
    with pytest.warns(UserWarning, match="Scale"):
        ek = EkfacInfluence(model, skip_unsupported=True, hessian_regularization=0.01)
    assert WatchedParameter.changes == []  # the test can see a flip (the old code flipped here)
    ek.fit(loader(x, y))
    ek.influences(x[:2], y[:2], x, y)
    ek.influences(x[:2], y[:2], x[:3], y[:3], mode="perturbation")
    ek.self_influences(x, y)
    assert WatchedParameter.changes == []
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(after[n], v) for n, v in values.items())
    assert ek.layout.block_names == ["0", "4", "5"]  # Scale and the frozen layer are held fixed
