"""Influences on the models people actually train, against the independent float64 references.

Models (``real_models.py``): a tiny BERT (default SDPA attention, padded batches with attention masks),
a tiny GPT-2 language model (lm_head tied to the token embedding; a cache object in its outputs),
LSTM and GRU classifiers with default initial states, an Embedding and an EmbeddingBag text model and
an eval-mode BatchNorm CNN. Ground truth (``references.py``): one-sample autograd gradients, explicit
Hessian / Gauss-Newton matrices and a dense solve; nothing here is computed by infscale.

BERT and GPT-2 batches are dicts. The per-sample gradient engine takes them as they are; the influence
methods' input checks take tuple batches for now, so those tests wrap the model as ``model(x)`` with x
= (input_ids, attention_mask) stacked along dim 1, all batches padded to one width (padding is inert:
``test_references``). The dict-batch versions of those tests wait for dict batches in the methods.
"""

from __future__ import annotations

import pytest
import real_models as rm
import references as ref
import torch
from torch import Tensor, nn

from infscale.errors import UnsupportedCurvatureError
from infscale.torch import (
    ArnoldiInfluence,
    CgInfluence,
    DirectInfluence,
    InverseHarmonicMeanInfluence,
    LissaInfluence,
    NystroemSketchInfluence,
)
from infscale.torch.curvature import CurvatureOperator
from infscale.torch.functional import ParameterLayout, gradient_engine

torch.set_num_threads(1)
pytest.importorskip("transformers")

NAMES = ("bert", "gpt2", "lstm", "gru", "embedding", "embedding_bag", "batchnorm_cnn")
SECOND_ORDER = ("gauss_newton", "hessian")


class TokenPairs(nn.Module):
    """A HuggingFace model called as ``model(x)`` with x = (input_ids, attention_mask) stacked: (b, 2, T)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor):
        return self.inner(input_ids=x[:, 0], attention_mask=x[:, 1])


def _as_tuples(batches: list[dict], width: int) -> list[tuple[Tensor, Tensor]]:
    """Dict batches as (stacked ids and mask, labels), padded on the right to ``width``."""
    out = []
    for b in batches:
        pad = width - b["input_ids"].shape[1]
        x = torch.stack([b["input_ids"], b["attention_mask"]], dim=1)
        y = b["labels"]
        out.append(
            (nn.functional.pad(x, (0, pad)), nn.functional.pad(y, (0, pad), value=-100) if y.ndim == 2 else y)
        )
    return out


@pytest.fixture(scope="module")
def workloads() -> dict[str, rm.Workload]:
    """Every model; BERT and GPT-2 at the harness's small size (1 layer, hidden 4), also as dicts."""
    out = {}
    for name in NAMES:
        if name in ("bert", "gpt2"):
            w = rm.BUILDERS[name](layers=1, hidden=4)
            out[name + "_dict"] = w
            width = max(b["input_ids"].shape[1] for b in w.train + w.test)
            w = rm.Workload(
                TokenPairs(w.model), w.loss_fn, _as_tuples(w.train, width), _as_tuples(w.test, width)
            )
        else:
            w = rm.BUILDERS[name]()
        out[name] = w
    return out


class Truth:
    """Per-sample gradients and explicit curvatures of one workload, computed once."""

    def __init__(self, w: rm.Workload, name: str):
        self.w = w
        self.train_gradients = ref.per_sample_gradients(w.model, w.loss_fn, w.train)
        self.test_gradients = ref.per_sample_gradients(w.model, w.loss_fn, w.test)
        self.curvature: dict[str, Tensor] = {}
        if name != "embedding_bag":
            self.curvature["hessian"] = ref.hessian(w.model, w.loss_fn, w.train)
            self.curvature["gauss_newton"] = ref.gauss_newton(w.model, w.loss_fn, w.train)
        self.curvature["empirical_fisher"] = ref.empirical_fisher(self.train_gradients)

    def regularization(self, mode: str) -> float:
        """0.1 for a positive semi-definite curvature; for an indefinite one (the Hessians), 0.5 above
        its most negative eigenvalue, so that every method's system is positive definite."""
        smallest = float(torch.linalg.eigvalsh(self.curvature[mode])[0])
        return 0.1 if smallest > -1e-8 else 0.5 - smallest

    def influences(self, mode: str, lam: float) -> Tensor:
        return ref.influences(self.test_gradients, self.curvature[mode], self.train_gradients, lam)


@pytest.fixture(scope="module")
def truth(workloads) -> dict[str, Truth]:
    return {name: Truth(workloads[name], name) for name in NAMES}


def _xy(batches: list) -> tuple[Tensor, Tensor]:
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _influences(method, w: rm.Workload) -> Tensor:
    method.fit(w.train)
    return method.influences(*_xy(w.test), *_xy(w.train))


# ------------------------------------------------------------------------------ per-sample gradients


@pytest.mark.parametrize("name", NAMES)
def test_per_sample_gradients(workloads, truth, name):
    w = workloads[name]
    engine = gradient_engine(ParameterLayout(w.model), w.loss_fn)
    got = torch.cat([engine.gradients(*b, 4) for b in w.train])
    torch.testing.assert_close(got, truth[name].train_gradients, rtol=0, atol=1e-8)
    factored = torch.cat([engine.to_dense(engine.factored(*b, 4)) for b in w.train])
    torch.testing.assert_close(factored, truth[name].train_gradients, rtol=0, atol=1e-8)
    routes = engine.routes(*w.train[0])
    if name in ("bert", "gpt2", "embedding", "batchnorm_cnn"):
        assert set(routes.values()) == {"batched"}, routes  # no vmap at all
    if name in ("lstm", "gru"):
        assert {r for k, r in routes.items() if k.startswith("rnn.")} == {"loop"}


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_per_sample_gradients_of_dict_batches(workloads, name):
    """The engine takes the padded dict batches as they are (``model(**x)``, ``labels`` apart)."""
    w = workloads[name + "_dict"]
    engine = gradient_engine(ParameterLayout(w.model), w.loss_fn)
    expected = ref.per_sample_gradients(w.model, w.loss_fn, w.train)
    got = torch.cat([engine.gradients(*ref.split_batch(b), 4) for b in w.train])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-8)
    assert set(engine.routes(*ref.split_batch(w.train[0])).values()) == {"batched"}


def test_gpt2_tied_weight_is_counted_once(workloads, truth):
    """lm_head.weight is wte.weight: one parameter, whose gradient sums both uses."""
    model = workloads["gpt2"].model.inner
    assert model.lm_head.weight is model.transformer.wte.weight
    engine = gradient_engine(ParameterLayout(workloads["gpt2"].model), workloads["gpt2"].loss_fn)
    assert "inner.transformer.wte.weight" in engine.coverage.dense_names
    assert not any("lm_head" in n for n in engine.names)


# ------------------------------------------------------------------------------ exact methods


@pytest.mark.parametrize("mode", SECOND_ORDER)
@pytest.mark.parametrize("name", NAMES)
def test_direct_and_cg_match_the_exact_influences(workloads, truth, name, mode):
    w = workloads[name]
    if name == "embedding_bag":
        for cls in (DirectInfluence, CgInfluence):
            with pytest.raises(UnsupportedCurvatureError, match="empirical_fisher"):
                cls(w.model, w.loss_fn, 0.1, second_order_mode=mode).fit(w.train)
        return
    lam = truth[name].regularization(mode)
    expected = truth[name].influences(mode, lam)
    direct = DirectInfluence(w.model, w.loss_fn, lam, second_order_mode=mode)
    assert _rel(_influences(direct, w), expected) < 1e-6
    cg = CgInfluence(w.model, w.loss_fn, lam, second_order_mode=mode, rtol=1e-10, maxiter=500)
    assert _rel(_influences(cg, w), expected) < 1e-6


def test_embedding_bag_is_exact_with_the_empirical_fisher(workloads, truth):
    w, t = workloads["embedding_bag"], truth["embedding_bag"]
    expected = t.influences("empirical_fisher", 0.1)
    direct = DirectInfluence(w.model, w.loss_fn, 0.1, second_order_mode="empirical_fisher")
    assert _rel(_influences(direct, w), expected) < 1e-6
    cg = CgInfluence(w.model, w.loss_fn, 0.1, second_order_mode="empirical_fisher", rtol=1e-10, maxiter=500)
    assert _rel(_influences(cg, w), expected) < 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_arnoldi_and_nystroem_at_full_rank(workloads, truth, name):
    """Gauss-Newton (Hessian for Arnoldi on the models whose Hessian it can take)."""
    w, t = workloads[name], truth[name]
    mode = "empirical_fisher" if name == "embedding_bag" else "gauss_newton"
    p = t.train_gradients.shape[1]
    lam = 0.1
    expected = t.influences(mode, lam)
    nystroem = NystroemSketchInfluence(w.model, w.loss_fn, lam, rank=p, second_order_mode=mode)
    assert _rel(_influences(nystroem, w), expected) < 1e-6
    if name != "embedding_bag":
        mode = "hessian"
        lam = t.regularization(mode)
        expected = t.influences(mode, lam)
    arnoldi = ArnoldiInfluence(w.model, w.loss_fn, lam, rank=p, tol=1e-10, second_order_mode=mode)
    assert _rel(_influences(arnoldi, w), expected) < 1e-6


# ------------------------------------------------------------------------------ approximations


@pytest.mark.parametrize("name", ["bert", "gpt2", "lstm", "embedding_bag"])
def test_inverse_harmonic_mean_is_its_formula(workloads, truth, name):
    """G_test [(1/n) Σᵢ (gᵢgᵢᵀ + λI)⁻¹] G_trainᵀ with explicit inverses."""
    w, t = workloads[name], truth[name]
    lam = 0.5
    G = t.train_gradients
    eye = torch.eye(G.shape[1], dtype=G.dtype)
    inverse = sum(torch.linalg.inv(g[:, None] * g[None, :] + lam * eye) for g in G) / G.shape[0]
    expected = t.test_gradients @ inverse @ G.T
    ihm = InverseHarmonicMeanInfluence(w.model, w.loss_fn, lam)
    assert _rel(_influences(ihm, w), expected) < 1e-8


@pytest.mark.parametrize("name", ["bert", "lstm"])
def test_lissa_converges_to_the_exact_influences(workloads, truth, name):
    """One batch of all training points (a deterministic iteration), λ = 1: loose tolerance."""
    w, t = workloads[name], truth[name]
    mode = "gauss_newton"
    full = [_xy(w.train)]
    scale = float(torch.linalg.eigvalsh(t.curvature[mode])[-1]) * 1.1 + 1.0
    lissa = LissaInfluence(
        w.model, w.loss_fn, 1.0, maxiter=3000, scale=scale, rtol=1e-9, second_order_mode=mode
    )
    lissa.fit(full)
    got = lissa.influences(*_xy(w.test), *full[0])
    assert _rel(got, t.influences(mode, 1.0)) < 1e-4


# ------------------------------------------------------------------------------ kernels


def test_float32_lstm_gauss_newton_products(truth):
    """The oneDNN LSTM kernel of float32 CPU models has no forward-mode derivative: the products
    switch it off while they run (and back on after), and equal the float64 reference's."""
    w = rm.lstm_classifier(dtype=torch.float32)
    layout = ParameterLayout(w.model)
    op = CurvatureOperator(layout, w.loss_fn, w.train, layout.blocks[0], "gauss_newton", lambda a, c: (a, c))
    V = torch.randn(3, layout.n_parameters, generator=torch.Generator().manual_seed(0))
    before = torch.backends.mkldnn.enabled
    got = op.matmat(V)
    assert torch.backends.mkldnn.enabled == before
    expected = V.double() @ truth["lstm"].curvature["gauss_newton"].T
    assert _rel(got.double(), expected) < 1e-4


def test_attention_settings_are_restored_after_hessian_products(workloads):
    w = workloads["bert"]

    def settings():
        cuda = torch.backends.cuda
        return cuda.flash_sdp_enabled(), cuda.math_sdp_enabled(), torch.backends.mha.get_fastpath_enabled()

    before = settings()
    layout = ParameterLayout(w.model)
    op = CurvatureOperator(layout, w.loss_fn, w.train, layout.blocks[0], "hessian", lambda a, c: (a, c))
    op.matmat(torch.ones(1, layout.n_parameters, dtype=torch.float64))
    assert settings() == before


# ------------------------------------------------------------------------------ dict batches


@pytest.mark.parametrize("mode", SECOND_ORDER)
@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_dict_batches_direct_and_cg(workloads, truth, name, mode):
    """As ``test_direct_and_cg_match_the_exact_influences``, on the padded dict batches as they are
    (each batch its own width): influences against each training batch, side by side."""
    w = workloads[name + "_dict"]
    g_train = ref.per_sample_gradients(w.model, w.loss_fn, w.train)
    g_test = ref.per_sample_gradients(w.model, w.loss_fn, w.test)
    M = (
        ref.hessian(w.model, w.loss_fn, w.train)
        if mode == "hessian"
        else ref.gauss_newton(w.model, w.loss_fn, w.train)
    )
    lam = max(0.1, 0.5 - float(torch.linalg.eigvalsh(M)[0]))
    expected = ref.influences(g_test, M, g_train, lam)
    x_test, y_test = ref.split_batch(w.test[0])
    for method in (
        DirectInfluence(w.model, w.loss_fn, lam, second_order_mode=mode),
        CgInfluence(w.model, w.loss_fn, lam, second_order_mode=mode, rtol=1e-10, maxiter=500),
    ):
        method.fit(w.train)
        got = torch.cat([method.influences(x_test, y_test, *ref.split_batch(b)) for b in w.train], dim=1)
        assert _rel(got, expected) < 1e-6


# ------------------------------------------------------------------------------ perturbation, torch encoder


def test_perturbation_influences_of_the_lstm(workloads, truth):
    """∂/∂x_j [fᵢ · ∇θ ℓ(x_j, y_j)], fᵢ = (G + λI)⁻¹ ∇ℓ(z_test,i), by double backward on the model itself,
    one sample at a time (vmap cannot trace the LSTM's default initial state: infscale loops too)."""
    w, t = workloads["lstm"], truth["lstm"]
    lam = 0.1
    M = t.curvature["gauss_newton"]
    factors = torch.linalg.solve(M + lam * torch.eye(M.shape[0], dtype=M.dtype), t.test_gradients.T).T
    _, params = ref.trainable_parameters(w.model)
    x, y = _xy(w.train)
    expected = torch.zeros(factors.shape[0], *x.shape, dtype=x.dtype)
    for j in range(x.shape[0]):
        xj = x[j : j + 1].clone().requires_grad_(True)
        grads = torch.autograd.grad(w.loss_fn(w.model(xj), y[j : j + 1]), params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        for i in range(factors.shape[0]):
            expected[i, j] = torch.autograd.grad(factors[i] @ flat, xj, retain_graph=True)[0][0]
    direct = DirectInfluence(w.model, w.loss_fn, lam, second_order_mode="gauss_newton").fit(w.train)
    with pytest.warns(UserWarning, match="one sample at a time"):
        got = direct.influences(*_xy(w.test), x, y, mode="perturbation")
    assert _rel(got, expected) < 1e-8


class Encoder(nn.Module):
    """torch's own TransformerEncoder (MultiheadAttention: SDPA inside, out_proj used functionally)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(rm.VOCAB, 4, padding_idx=rm.PAD)
        layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(4, 3)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.encoder(self.embed(ids), src_key_padding_mask=ids == rm.PAD)
        return self.head(h[:, 0])


@pytest.mark.parametrize("mode", SECOND_ORDER)
def test_torch_transformer_encoder(workloads, mode):
    """Per-sample gradients and Direct influences equal the references, as for the HuggingFace models."""
    text = workloads["embedding"]
    torch.manual_seed(0)
    model = Encoder().double().eval()
    w = rm.Workload(model, text.loss_fn, text.train, text.test)
    g_train = ref.per_sample_gradients(model, w.loss_fn, w.train)
    engine = gradient_engine(ParameterLayout(model), w.loss_fn)
    torch.testing.assert_close(
        torch.cat([engine.gradients(*b, 4) for b in w.train]), g_train, rtol=0, atol=1e-8
    )
    M = (
        ref.hessian(model, w.loss_fn, w.train)
        if mode == "hessian"
        else ref.gauss_newton(model, w.loss_fn, w.train)
    )
    lam = max(0.1, 0.5 - float(torch.linalg.eigvalsh(M)[0]))
    expected = ref.influences(ref.per_sample_gradients(model, w.loss_fn, w.test), M, g_train, lam)
    direct = DirectInfluence(model, w.loss_fn, lam, second_order_mode=mode)
    assert _rel(_influences(direct, w), expected) < 1e-6
