"""The independent references of ``references.py`` and the models of ``real_models.py``, checked against
mathematics that shares no code with them: closed forms for linear models, finite differences on the
models themselves (parameters perturbed in place, no functional_call), an exact re-fit for the sign."""

from __future__ import annotations

import pytest
import real_models as rm
import references as ref
import torch
from torch import Tensor, nn

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def workloads() -> dict[str, rm.Workload]:
    """Every builder's workload, plus a 1-layer, hidden-4 BERT and GPT-2 for the second-order checks."""
    out = {name: build() for name, build in rm.BUILDERS.items()}
    out["bert_small"] = rm.tiny_bert(layers=1, hidden=4)
    out["gpt2_small"] = rm.tiny_gpt2(layers=1, hidden=4)
    return out


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _mean_loss(model: nn.Module, loss_fn, batches: list) -> Tensor:
    losses = [
        loss_fn(ref.call_model(model, x), y) * ref.n_samples(x) for x, y in map(ref.split_batch, batches)
    ]
    return sum(losses) / sum(ref.n_samples(ref.split_batch(b)[0]) for b in batches)


def _at_shift(model: nn.Module, direction: Tensor, eps: float, compute):
    """``compute(params)`` with the parameters shifted in place to θ₀ + ε·direction (restored after)."""
    _, params = ref.trainable_parameters(model)
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, d in zip(params, torch.split(direction, [p.numel() for p in params])):
            p.add_(eps * d.reshape(p.shape))
    try:
        return compute(params)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def _loss_with_shift(model: nn.Module, loss_fn, batches: list, direction: Tensor, eps: float) -> Tensor:
    """The mean loss over ``batches`` at θ₀ + ε·direction."""
    with torch.no_grad():
        return _at_shift(model, direction, eps, lambda params: _mean_loss(model, loss_fn, batches))


def _gradient_with_shift(model, loss_fn, batches, direction: Tensor, eps: float) -> Tensor:
    """The gradient of the mean loss at θ₀ + ε·direction by plain backward on the shifted model."""

    def grad(params):
        grads = torch.autograd.grad(_mean_loss(model, loss_fn, batches), params)
        return torch.cat([g.reshape(-1) for g in grads])

    return _at_shift(model, direction, eps, grad)


# ---------------------------------------------------------------------------- closed forms


def _linear_regression(dict_batches: bool = False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64) + 0.3 * torch.randn(
        10, 1, generator=g, dtype=torch.float64
    )
    torch.manual_seed(0)
    linear = nn.Linear(3, 1).double()
    if dict_batches:

        class Keyword(nn.Module):
            def __init__(self):
                super().__init__()
                self.linear = linear

            def forward(self, features):
                return self.linear(features)

        model = Keyword()
        batches = [{"features": x[s:e], "labels": y[s:e]} for s, e in ((0, 4), (4, 7), (7, 10))]
    else:
        model = linear
        batches = [(x[s:e], y[s:e]) for s, e in ((0, 4), (4, 7), (7, 10))]
    return model, nn.functional.mse_loss, batches, x, y


@pytest.mark.parametrize("dict_batches", [False, True])
def test_hessian_and_gauss_newton_of_linear_regression_are_2XtX_over_n(dict_batches):
    model, loss, batches, x, _ = _linear_regression(dict_batches)
    xt = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)  # θ = (w, b) in parameter order
    truth = 2 * xt.T @ xt / len(x)  # mean of (xᵀw + b − y)²
    assert _rel(ref.hessian(model, loss, batches), truth) < 1e-12
    assert _rel(ref.gauss_newton(model, loss, batches), truth) < 1e-12
    assert _rel(ref.hessian(model, loss, batches, method="differences"), truth) < 1e-8


def test_per_sample_gradients_of_linear_regression_closed_form():
    model, loss, batches, x, y = _linear_regression()
    xt = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    residual = model(x).detach() - y
    assert _rel(ref.per_sample_gradients(model, loss, batches), 2 * residual * xt) < 1e-12


def test_gauss_newton_equals_hessian_for_logits_linear_in_the_parameters():
    """Logits linear in θ (a ModelOutput-returning linear softmax model on dict batches): the loss is
    convex in θ with Hessian exactly Jᵀ ∇²ℓ J."""
    from transformers.modeling_outputs import SequenceClassifierOutput

    class Softmax(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, features):
            return SequenceClassifierOutput(logits=self.linear(features))

    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=g)
    torch.manual_seed(1)
    model = Softmax().double()
    batches = [{"features": x[:5], "labels": y[:5]}, {"features": x[5:], "labels": y[5:]}]
    H = ref.hessian(model, rm.classification_loss, batches)
    assert _rel(ref.gauss_newton(model, rm.classification_loss, batches), H) < 1e-12
    # and the closed form: (1/N) Σ (diag(s) − s sᵀ) ⊗ x̃ x̃ᵀ with θ = (W row-major, b)
    s = torch.softmax(model.linear(x), dim=1).detach()
    truth = torch.zeros(15, 15, dtype=torch.float64)
    for i in range(9):
        a = torch.diag(s[i]) - torch.outer(s[i], s[i])
        truth[:12, :12] += torch.kron(a, torch.outer(x[i], x[i]))
        truth[:12, 12:] += torch.kron(a, x[i][:, None])
        truth[12:, :12] += torch.kron(a, x[i][None, :])
        truth[12:, 12:] += a
    assert _rel(H, truth / 9) < 1e-12


def test_influence_sign_by_exact_reweighting():
    """Ridge regression re-solved in closed form with training point j up-weighted by ε: the test loss
    changes by −ε · influence[t, j] to first order (positive influence = helpful)."""
    model, loss, batches, x, y = _linear_regression()
    lam, n = 0.1, len(x)
    xt = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], dim=1)
    g = torch.Generator().manual_seed(5)
    x_test = torch.randn(3, 3, generator=g, dtype=torch.float64)
    y_test = torch.randn(3, 1, generator=g, dtype=torch.float64)

    def optimum(weights: Tensor) -> Tensor:  # argmin (1/n) Σ w_i (x̃_iᵀθ − y_i)² + (λ/2)|θ|²
        a = 2 * xt.T @ (weights[:, None] * xt) / n + lam * torch.eye(4, dtype=x.dtype)
        return torch.linalg.solve(a, 2 * xt.T @ (weights[:, None] * y) / n).reshape(-1)

    theta = optimum(torch.ones(n, dtype=torch.float64))
    with torch.no_grad():
        model.weight.copy_(theta[:3].reshape(1, 3))
        model.bias.copy_(theta[3:])
    test = [(x_test, y_test)]
    scores = ref.exact_influences(model, loss, batches, test, lam)
    xt_test = torch.cat([x_test, torch.ones(3, 1, dtype=x.dtype)], dim=1)
    eps = 1e-6
    for j in (0, 6):
        w = torch.ones(n, dtype=torch.float64)
        w[j] += eps * n  # ε added to point j's weight in the mean loss
        plus, minus = optimum(w), optimum(2 - w)
        d_loss = (((xt_test @ plus)[:, None] - y_test) ** 2 - ((xt_test @ minus)[:, None] - y_test) ** 2) / (
            2 * eps
        )
        assert torch.allclose(d_loss.reshape(-1), -scores[:, j], rtol=1e-6, atol=1e-10)


# ---------------------------------------------------------------------------- the real models


@pytest.mark.parametrize("name", list(rm.BUILDERS))
def test_per_sample_gradients_match_finite_differences(workloads, name):
    model, loss, train, test = workloads[name]
    G = ref.per_sample_gradients(model, loss, test)
    g = torch.Generator().manual_seed(2)
    x, y = ref.split_batch(test[0])
    for i in (0, ref.n_samples(x) - 1):
        sample = (
            [{**ref.take(x, i), "labels": y[i : i + 1]}]
            if isinstance(x, dict)
            else [(ref.take(x, i), y[i : i + 1])]
        )
        for _ in range(2):
            v = torch.randn(G.shape[1], generator=g, dtype=torch.float64)
            eps = 1e-6
            fd = (
                _loss_with_shift(model, loss, sample, v, eps) - _loss_with_shift(model, loss, sample, v, -eps)
            ) / (2 * eps)
            assert abs(float(G[i] @ v) - float(fd)) < 1e-6 * max(1.0, abs(float(fd)))


@pytest.mark.parametrize("name", ["bert_small", "gpt2_small", "lstm", "gru", "batchnorm_cnn"])
def test_hessian_vector_products_match_differences_of_gradients(workloads, name):
    """H v against (∇L(θ + εv) − ∇L(θ − εv)) / 2ε, the gradients by plain backward on the model with its
    default attention kernel."""
    model, loss, train, _ = workloads[name]
    H = ref.hessian(model, loss, train)
    assert torch.allclose(H, H.T, atol=1e-12)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    v /= v.norm()
    eps = 1e-5  # measured: relative error 4e-11 … 6e-10 over these models
    fd = (
        _gradient_with_shift(model, loss, train, v, eps) - _gradient_with_shift(model, loss, train, v, -eps)
    ) / (2 * eps)
    assert _rel(H @ v, fd) < 1e-7


@pytest.mark.parametrize("name", ["bert_small", "gpt2_small", "lstm", "embedding_bag"])
def test_gauss_newton_is_symmetric_positive_semidefinite_and_differs_from_hessian(workloads, name):
    model, loss, train, _ = workloads[name]
    M = ref.gauss_newton(model, loss, train)
    assert torch.allclose(M, M.T, atol=1e-12)
    eig = torch.linalg.eigvalsh(M)
    assert eig.min() > -1e-10 * eig.max()
    if name != "embedding_bag":
        H = ref.hessian(model, loss, train)
        assert torch.linalg.eigvalsh(H).min() < -1e-6  # not at an optimum: the Hessian is indefinite
        assert _rel(M, H) > 1e-3


def test_embedding_bag_equals_its_embedding_twin_and_its_differences_hessian_is_exact(workloads):
    bag, loss, train, _ = workloads["embedding_bag"]
    twin = rm.EmbeddingClassifier().double().eval()
    twin.load_state_dict(bag.state_dict())
    x = torch.cat([b[0] for b in train])
    assert torch.allclose(bag(x), twin(x), atol=1e-13)
    with pytest.raises(RuntimeError, match="embedding_bag_backward"):
        ref.hessian(bag, loss, train)  # no double backward through nn.EmbeddingBag
    assert _rel(ref.hessian(bag, loss, train, method="differences"), ref.hessian(twin, loss, train)) < 1e-7


def test_gpt2_lm_head_is_tied_and_listed_once(workloads):
    model = workloads["gpt2"].model
    assert model.lm_head.weight is model.transformer.wte.weight
    names, tensors = ref.trainable_parameters(model)
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names
    assert sum(t.numel() for t in tensors) == sum(
        p.numel() for p in {id(p): p for p in model.parameters()}.values()
    )
    theta0, unflatten = ref.flat_parameters(model)
    x, _ = ref.split_batch(workloads["gpt2"].test[0])
    shifted = theta0.clone()
    shifted[: 30 * 8] += 0.1  # wte only: through the tie, lm_head moves too
    tied = ref.call_model(model, x, unflatten(shifted))["logits"]
    with torch.no_grad():
        saved = model.transformer.wte.weight.clone()
        model.transformer.wte.weight.add_(0.1)
        in_place = model(**x).logits
        model.transformer.wte.weight.copy_(saved)
    assert torch.allclose(tied, in_place, atol=1e-12)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_padding_is_inert_and_the_attention_mask_matters(workloads, name):
    """A sample's gradient from its padded batch equals the one from its unpadded sequence. Without the
    attention mask (all ones) BERT's differs; GPT-2's does not: with right padding its causal attention
    never sees the padding, and the loss skips it through the -100 labels."""
    model, loss, train, _ = workloads[name]
    x, y = ref.split_batch(train[0])
    lengths = x["attention_mask"].sum(1)
    i = int(torch.argmin(lengths))  # the most padded sample
    k = int(lengths[i])
    assert k < x["input_ids"].shape[1]
    padded = {**ref.take(x, i), "labels": y[i : i + 1]}
    alone = (
        {k_: v[:, :k] for k_, v in padded.items()}
        if name == "gpt2"
        else {
            "input_ids": padded["input_ids"][:, :k],
            "attention_mask": padded["attention_mask"][:, :k],
            "labels": padded["labels"],
        }
    )
    unmasked = {**padded, "attention_mask": torch.ones_like(padded["attention_mask"])}
    g_padded, g_alone, g_unmasked = (
        ref.per_sample_gradients(model, loss, [b]) for b in (padded, alone, unmasked)
    )
    assert _rel(g_padded, g_alone) < 1e-10
    if name == "bert":
        assert _rel(g_unmasked, g_alone) > 1e-3
    else:
        assert _rel(g_unmasked, g_alone) < 1e-10


@pytest.mark.parametrize("name", list(rm.BUILDERS))
def test_builders_are_deterministic_small_and_the_loss_is_a_per_sample_mean(workloads, name):
    model, loss, train, test = workloads[name]
    again = rm.BUILDERS[name]()
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), again.model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    theta0, _ = ref.flat_parameters(model)
    assert theta0.dtype == torch.float64 and theta0.numel() <= 3000 and not model.training
    assert [ref.n_samples(ref.split_batch(b)[0]) for b in train] == [5, 4, 3]
    f, _ = ref.mean_loss_function(model, loss, train)
    assert torch.allclose(ref.per_sample_losses(model, loss, train).mean(), f(theta0), atol=1e-13)
    theta = theta0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(theta), theta)
    assert torch.allclose(ref.per_sample_gradients(model, loss, train).mean(0), grad, atol=1e-13)
