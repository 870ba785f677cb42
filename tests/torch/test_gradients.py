"""The per-sample gradient engine against a plain autograd loop, one sample at a time.

The batched path must give exactly the per-sample gradients of a batch of one, and must step
aside (falling back to vmap for the parameters concerned) whenever the batched pass would differ:
a parameter used outside its module, samples that interact, training-mode batch norm.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from infscale.torch import DirectInfluence
from infscale.torch.functional import ParameterLayout, gradient_engine
from infscale.torch.gradients import FactoredGradients, _form_weight_gradients


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def reference_gradients(model, loss, x, y):
    """(n, p) by autograd, one sample at a time, trainable parameters in named order."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        value = loss(model(x[i : i + 1]), y[i : i + 1])
        rows.append(
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params, allow_unused=False)])
        )
    return torch.stack(rows)


def check(model, loss, x, y, expect_factored: bool, routes: dict[str, str] | None = None):
    """The engine's dense and factored gradients and every product against the autograd loop;
    ``expect_factored``: whether ``factored`` keeps the factored form; ``routes``: the expected
    route of some parameters (the others: "batched")."""
    engine = gradient_engine(ParameterLayout(model), loss)
    reference = reference_gradients(model, loss, x, y)
    dense = engine.gradients(x, y, chunk_size=3)
    torch.testing.assert_close(dense, reference, rtol=1e-10, atol=1e-12)
    factors = torch.randn(4, engine.size)
    factored = engine.factored(x, y, chunk_size=3)
    torch.testing.assert_close(
        engine.products(factors, factored), factors @ reference.T, rtol=1e-10, atol=1e-12
    )
    assert isinstance(factored, FactoredGradients) is expect_factored
    expected_routes = {n: "batched" for n, p in model.named_parameters() if p.requires_grad}
    assert engine.routes(x, y) == {**expected_routes, **(routes or {})}
    weights = torch.randn(3, x.shape[0])
    torch.testing.assert_close(engine.weighted_sums(weights, factored), weights @ reference)
    torch.testing.assert_close(engine.squared_norms(factored), (reference**2).sum(dim=1))
    # restricted to the columns of one parameter group (as a block of a block-diagonal method)
    layout = ParameterLayout(model, "layer_wise")
    for block in layout.blocks:
        cols = block.slice
        expected = torch.zeros_like(engine.weighted_sums(weights, factored))
        expected[:, cols] = weights @ reference[:, cols]
        torch.testing.assert_close(engine.weighted_sums(weights, factored, cols), expected)
        torch.testing.assert_close(engine.squared_norms(factored, cols), (reference[:, cols] ** 2).sum(dim=1))
        torch.testing.assert_close(
            engine.products(factors, factored, cols), factors[:, cols] @ reference[:, cols].T
        )
    if isinstance(factored, FactoredGradients):
        torch.testing.assert_close(engine.products(factors, factored.rows(2, 5)), factors @ reference[2:5].T)
    # inner products of per-sample gradients, factored against factored, dense or a subset
    left = factored.rows(0, 4) if isinstance(factored, FactoredGradients) else factored[:4]
    torch.testing.assert_close(engine.gram(left, factored), reference[:4] @ reference.T)
    torch.testing.assert_close(engine.gram(factored, reference[:4]), reference @ reference[:4].T)
    torch.testing.assert_close(engine.gram(reference[:4], factored), reference[:4] @ reference.T)
    for block in layout.blocks:
        cols = block.slice
        torch.testing.assert_close(
            engine.gram(left, factored, cols), reference[:4, cols] @ reference[:, cols].T
        )
    return engine


def data(n=11, d=5, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def test_mlp_with_and_without_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6, bias=False), nn.Tanh(), nn.Linear(6, 3))
    x, y = data()
    engine = check(model, nn.functional.cross_entropy, x, y, expect_factored=True)
    assert engine.rest == []  # every parameter through the batched path


def test_regression_loss_with_float_targets():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    x, _ = data()
    y = torch.randn(x.shape[0], 2)
    check(model, nn.functional.mse_loss, x, y, expect_factored=True)


class Sequence(nn.Module):
    """A linear layer over positions (n, T, d), called twice, then pooled."""

    def __init__(self, width=16):
        super().__init__()
        self.embed = nn.Linear(5, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        h = torch.tanh(self.embed(x))  # (n, T, width)
        h = torch.tanh(self.mix(h))
        h = torch.tanh(self.mix(h))  # the same layer again
        return self.head(h.mean(dim=1))


def test_positions_and_repeated_calls():
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(9, 3, 5, generator=g), torch.randint(0, 3, (9,), generator=g)
    check(Sequence(), nn.functional.cross_entropy, x, y, expect_factored=True)


class Positions(nn.Module):
    """Linear layers over 3 positions, each called once: 5 → 32 → 32, then pooled → 3."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(5, 32)
        self.mix = nn.Linear(32, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.mix(torch.tanh(self.embed(x)))).mean(dim=1))


def test_positions_with_inner_products_of_factors():
    """``mix`` at 3 positions: the inner product of two weight gradients from their factors
    (T²·(in + out) = 576 ≤ in·out = 1024 numbers per pair); ``embed`` (5 → 32) forms them."""
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(9, 3, 5, generator=g), torch.randint(0, 3, (9,), generator=g)
    engine = check(Positions(), nn.functional.cross_entropy, x, y, expect_factored=True)
    factored = engine.factored(x, y, chunk_size=4)
    dense = reference_gradients(engine.model, engine.loss, x, y)
    assert engine.gram_width(factored) < engine.gram_width(dense) == engine.size


def test_many_positions_fall_back_to_the_smaller_dense_form():
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(5, 40, 5, generator=g), torch.randint(0, 3, (5,), generator=g)
    engine = gradient_engine(ParameterLayout(Sequence(width=4)), nn.functional.cross_entropy)
    factored = engine.factored(x, y, chunk_size=2)
    assert not isinstance(factored, FactoredGradients)  # 40 positions: (in + out)·T > in·out
    torch.testing.assert_close(factored, reference_gradients(engine.model, engine.loss, x, y))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def test_convolution_is_batched_through_unfolded_patches():
    """16 output positions: the factored form ((in + out)·T per sample) is larger than the dense
    one, so ``factored`` gives the dense gradients; every parameter comes from the batched pass."""
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(7, 1, 4, 4, generator=g), torch.randint(0, 3, (7,), generator=g)
    engine = check(ConvNet(), nn.functional.cross_entropy, x, y, expect_factored=False)
    assert engine.coverage.uncovered == []


def test_frozen_parameters():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    model[0].requires_grad_(False)  # a whole frozen layer
    model[2].weight.requires_grad_(False)  # a frozen weight with a trainable bias
    x, y = data()
    check(model, nn.functional.cross_entropy, x, y, expect_factored=True)


class OutsideUse(nn.Module):
    """fc.weight is also used outside fc's forward: the batched path would miss that use."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        h = torch.tanh(nn.functional.linear(h, self.fc.weight))
        return self.head(h)


def test_a_weight_used_outside_its_module_is_detected():
    """Only fc.weight leaves the batched path (its batch sum misses the outside use)."""
    torch.manual_seed(5)
    x, y = data()
    check(
        OutsideUse(), nn.functional.cross_entropy, x, y, expect_factored=False, routes={"fc.weight": "vmap"}
    )


class OutsideUseLater(nn.Module):
    """fc.weight is used outside fc only for samples whose first feature is positive (not sample 0):
    the comparison of sample 0 cannot see it; the batch sum must."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        gate = (x[:, :1] > 0).to(x.dtype)
        return self.head(h + gate * torch.tanh(nn.functional.linear(h, self.fc.weight)))


def test_an_outside_use_that_sample_0_does_not_make_is_detected_by_the_batch_sum():
    torch.manual_seed(5)
    x, y = data()
    x[0, 0] = -1.0
    assert (x[1:, 0] > 0).any()
    check(
        OutsideUseLater(),
        nn.functional.cross_entropy,
        x,
        y,
        expect_factored=False,
        routes={"fc.weight": "vmap"},
    )


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(5, 16)
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.b.weight = self.a.weight  # one parameter in two modules
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(torch.tanh(self.embed(x)))))))


def test_tied_weights_are_the_sum_of_their_modules_parts():
    torch.manual_seed(6)
    x, y = data()
    engine = check(Tied(), nn.functional.cross_entropy, x, y, expect_factored=True)
    assert "a.weight" in engine.rest  # the shared weight is not factored: dense, from both modules
    assert "a.weight" in engine.coverage.dense_names


class BatchCentering(nn.Module):
    """Samples interact: each input is centred on the batch mean (a batch of one: zero)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(x - x.mean(dim=0, keepdim=True) + 0.5 * x)


def test_interacting_samples_are_detected():
    torch.manual_seed(7)
    x, y = data()
    routes = {"fc.weight": "vmap", "fc.bias": "vmap"}
    check(BatchCentering(), nn.functional.cross_entropy, x, y, expect_factored=False, routes=routes)


def test_a_check_on_one_sample_is_repeated_on_a_batch():
    """One sample cannot show samples that interact: a batch of the same signature is checked again."""
    torch.manual_seed(7)
    x, y = data()
    model = BatchCentering()
    engine = gradient_engine(ParameterLayout(model), nn.functional.cross_entropy)
    engine.gradients(x[:1], y[:1], 4)
    torch.testing.assert_close(engine.gradients(x, y, 4), reference_gradients(model, engine.loss, x, y))
    assert set(engine.routes(x, y).values()) == {"vmap"}


class SummedQuery(nn.Module):
    """``proj`` runs on a (1, 5) parameter: its output is expanded to one row per sample, which the
    ``.sum(0)`` after it does not tolerate. The check must see that (also after a one-sample batch)."""

    def __init__(self):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 5))
        self.proj = nn.Linear(5, 5)
        self.head = nn.Linear(1, 3)

    def forward(self, x):
        k = torch.tanh(self.proj(self.query)).sum(0)  # (5,)
        return self.head((x @ k).unsqueeze(1))


def test_an_expanded_output_the_model_does_not_tolerate_is_caught():
    torch.manual_seed(8)
    x, y = data()
    model = SummedQuery()
    engine = gradient_engine(ParameterLayout(model), nn.functional.cross_entropy)
    engine.gradients(x[:1], y[:1], 4)
    torch.testing.assert_close(engine.gradients(x, y, 4), reference_gradients(model, engine.loss, x, y))
    assert engine.routes(x, y)["proj.weight"] == "vmap"


def test_training_mode_batch_norm_never_takes_the_batched_path():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    engine = gradient_engine(ParameterLayout(model), nn.functional.cross_entropy)
    assert not engine._batched_allowed()
    x, y = data()
    assert set(engine.routes(x, y).values()) == {"vmap"}
    model.eval()
    assert engine._batched_allowed()
    check(model, nn.functional.cross_entropy, x, y, expect_factored=True)


def test_training_mode_dropout_without_dropping_stays_on_the_batched_path():
    model = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.0), nn.Tanh(), nn.Linear(4, 3)).train()
    x, y = data()
    check(model, nn.functional.cross_entropy, x, y, expect_factored=True)
    model[1].p = 0.5  # now it draws masks: no per-sample function to take gradients of
    assert not gradient_engine(ParameterLayout(model), nn.functional.cross_entropy)._batched_allowed()


def test_influences_through_the_factored_path_match_dense_gradients():
    """End to end: DirectInfluence's influences (factored training gradients) equal the
    explicit ∇ℓ_testᵀ (H + λI)⁻¹ ∇ℓ_train with an autograd Hessian."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = data(n=20)
    x_test, y_test = data(n=6, seed=1)
    loss = nn.functional.cross_entropy
    params = dict(model.named_parameters())
    names = list(params)
    shapes = [params[n].shape for n in names]
    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])

    def total(flat):
        state, s = {}, 0
        for n, shape in zip(names, shapes):
            state[n] = flat[s : s + shape.numel()].reshape(shape)
            s += shape.numel()
        return loss(torch.func.functional_call(model, state, (x,)), y)

    H = torch.autograd.functional.hessian(total, flat0)
    lam = 1.0  # the random network's Hessian is indefinite (smallest eigenvalue ≈ -0.56)
    expected = reference_gradients(model, loss, x_test, y_test) @ torch.linalg.solve(
        H + lam * torch.eye(H.shape[0]), reference_gradients(model, loss, x, y).T
    )
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)
    infl = DirectInfluence(model, loss, hessian_regularization=lam).fit(loader)
    torch.testing.assert_close(infl.influences(x_test, y_test, x, y), expected, rtol=1e-8, atol=1e-10)
    representation = infl.train_representation(x, y)
    assert isinstance(representation, FactoredGradients)
    factors = infl.influence_factors(x_test, y_test)
    torch.testing.assert_close(
        infl.influences_from_representation(factors, representation), expected, rtol=1e-8, atol=1e-10
    )
    with pytest.raises(ValueError, match="up mode"):
        infl.influences_from_representation(factors, representation, mode="perturbation")


@pytest.mark.parametrize("k", [2, 300])
def test_few_and_many_factors_take_either_contraction(k):
    """Few factors contract with the factored form; many factors on a narrow layer form the
    per-sample weight gradients chunk by chunk. Both equal the explicit products and sums."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(6, 40), nn.Tanh(), nn.Linear(40, 3))
    many = k > 100
    for layer in (model[0], model[2]):  # which contraction each layer takes
        assert _form_weight_gradients(k, 1, layer.in_features, layer.out_features) is many
    g = torch.Generator().manual_seed(10)
    x, y = torch.randn(13, 6, generator=g), torch.randint(0, 3, (13,), generator=g)
    engine = gradient_engine(ParameterLayout(model), nn.functional.cross_entropy)
    reference = reference_gradients(model, engine.loss, x, y)
    factored = engine.factored(x, y, chunk_size=4)
    assert isinstance(factored, FactoredGradients)
    factors = torch.randn(k, engine.size, generator=g)
    weights = torch.randn(k, 13, generator=g)
    torch.testing.assert_close(engine.products(factors, factored), factors @ reference.T)
    torch.testing.assert_close(engine.weighted_sums(weights, factored), weights @ reference)


def test_the_check_runs_once_per_input_signature(monkeypatch):
    """The check (sample 0 against autograd on a batch of one, the batch sum against the plain batch
    gradient) runs the first time inputs of a feature shape, dtype and device come; later calls with
    the same signature reuse the verdict, and the values stay those of the one-sample autograd loop."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    loss = nn.functional.cross_entropy
    engine = gradient_engine(ParameterLayout(model), loss)
    checks = []
    original = engine._verify
    monkeypatch.setattr(engine, "_verify", lambda *a: checks.append(1) or original(*a))
    for n in (5, 7, 5):
        x, y = torch.randn(n, 3), torch.randint(0, 2, (n,))
        got = engine.to_dense(engine.factored(x, y, 64))
        assert torch.allclose(got, reference_gradients(model, loss, x, y), rtol=1e-10, atol=1e-12)
    assert len(checks) == 1
    soft = torch.softmax(torch.randn(4, 2), dim=1)  # class probabilities: another target signature
    engine.factored(torch.randn(4, 3), soft, 64)
    assert len(checks) == 2


def test_an_engine_shipped_to_another_process_still_works():
    """Dask workers get a pickled copy: nothing in the engine may be keyed by the old objects' ids."""
    import pickle

    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3))
    engine = pickle.loads(pickle.dumps(gradient_engine(ParameterLayout(model), nn.functional.cross_entropy)))
    x, y = data()
    expected = reference_gradients(engine.model, engine.loss, x, y)
    torch.testing.assert_close(engine.gradients(x, y, 4), expected)
    assert set(engine.routes(x, y).values()) == {"batched"}
