"""EK-FAC's layer kinds beyond Linear / Conv2d, against ground truth built independently with the float64
references of ``references.py`` (per-sample gradients by a loop of ``torch.autograd.grad``, the
Gauss-Newton matrix from explicit Jacobians):

- where the Kronecker model is exact: an embedding-only model with a per-token squared error (its
  Gauss-Newton matrix is diag(token counts)/n ⊗ (2/k) I, padding tokens excluded), so K-FAC and EK-FAC
  with ``fisher="exact"`` equal the Gauss-Newton block and their influences the exact ones;
- diagonal blocks (LayerNorm, BatchNorm in eval mode): the fitted diagonal is the diagonal of the
  Gauss-Newton block (``fisher="exact"``) or the mean squared per-sample gradient (``"empirical"``);
- for every Kronecker block, with ``fisher="exact"``, the EK-FAC diagonal is diag(Bᵀ GN B) with B the
  block's Kronecker eigenbasis (the basis is built here from the public eigenvectors);
- transformers' Conv1D equals the same model with an nn.Linear of transposed weight;
- a weight shared by an embedding and an output layer is one block, counted once, with exact
  gradients; the nearest Kronecker product against the SVD of the rearranged sum;
- the loss: a callable cross-entropy with ``loss_family`` equals the built-in one; the weights read
  from a per-sequence language-model loss; a family that does not fit the loss is named.
"""

from __future__ import annotations

import pytest
import real_models as rm
import references as ref
import torch
import torch.nn.functional as F
from ekfac_checks import assert_projected_gauss_newton
from torch import nn

from infscale.torch import EkfacInfluence
from infscale.torch.ekfac_factors import nearest_kronecker
from infscale.torch.ekfac_loss import EkfacLoss, FisherType, parse_loss

DT = torch.float64


# ---------------------------------------------------------------- Embedding: where the model is exact
class TokenRegression(nn.Module):
    """nn.Embedding(7, 3, padding_idx=0) applied to every token: (n, T) ids → (n, T, 3)."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(7, 3, padding_idx=0)

    def forward(self, x):
        return self.embedding(x)


def token_regression():
    torch.manual_seed(0)
    model = TokenRegression().to(DT)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 7, (9, 4), generator=g)
    ids[::3, -1] = 0  # some padding
    ids[:, 0] = torch.arange(9) % 3 + 1  # tokens 4..6 rarer than 1..3
    y = torch.randn(9, 4, 3, generator=g, dtype=DT)
    return model, [(ids[:5], y[:5]), (ids[5:], y[5:])], (ids[:3], y[:3])


def padding_ignored_mse(out, y):
    """Squared error over the positions whose mask (y's last channel) is 1, / (T · 3) per sample:
    the padded positions get weight 0, the others 1/(3T) (a callable of the "mse" family)."""
    target, real = y[..., :-1], y[..., -1:]
    return ((out - target).square() * real).sum((1, 2)).mean() / (target.shape[1] * target.shape[2])


@pytest.mark.parametrize("update_diagonal", [True, False])
@pytest.mark.parametrize("loss", ["mse", "padding_ignored"])
def test_embedding_with_squared_error_is_exactly_kronecker(update_diagonal, loss):
    """GN = diag(counts)/n ⊗ 2w I (padding tokens have no gradient, and with ``padding_ignored`` no
    loss either, which only leaving them out of G's locations gets right): the curvature block and
    the influences are exact."""
    model, train, (xt, yt) = token_regression()
    if loss == "padding_ignored":
        def masked(x, y):
            return torch.cat([y, (x != 0).unsqueeze(-1).to(y.dtype)], -1)

        train = [(x, masked(x, y)) for x, y in train]
        xt, yt = xt, masked(xt, yt)
    loss_fn = F.mse_loss if loss == "mse" else padding_ignored_mse
    lam = 1e-3
    ek = EkfacInfluence(model, update_diagonal, lam, loss=loss_fn, loss_family="mse", fisher="exact").fit(
        train
    )
    assert ek.covered_modules == [("embedding", "Embedding", "kronecker", "embedding")]
    assert "embedding" not in ek.eigenvectors_A  # the vocabulary side stays in the identity basis
    GN = ref.gauss_newton(model, loss_fn, train)
    torch.testing.assert_close(ek.curvature_block("embedding"), GN, rtol=1e-10, atol=1e-14)
    counts = torch.bincount(torch.cat([x for x, _ in train]).flatten(), minlength=7).to(DT)
    counts[0] = 0  # the padding index has no gradient
    torch.testing.assert_close(ek.kronecker_factors()["embedding"]["A"], torch.diag(counts / 9))
    expected = ref.exact_influences(model, loss_fn, train, [(xt, yt)], lam, "gauss_newton")
    x = torch.cat([x for x, _ in train])
    y = torch.cat([y for _, y in train])
    torch.testing.assert_close(ek.influences(xt, yt, x, y), expected, rtol=1e-8, atol=1e-12)


# ---------------------------------------------------------------- diagonal blocks
class NormOnly(nn.Module):
    """LayerNorm(4) over the features of every token, logits = the first token's output."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(x)[:, 0]


@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_layernorm_block_is_the_diagonal_of_the_gauss_newton_block(fisher):
    torch.manual_seed(0)
    model = NormOnly().to(DT)
    with torch.no_grad():
        model.norm.weight.add_(torch.randn(4, dtype=DT))
        model.norm.bias.add_(torch.randn(4, dtype=DT))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(10, 3, 4, generator=g, dtype=DT)
    y = torch.randint(0, 4, (10,), generator=g)
    train = [(x[:6], y[:6]), (x[6:], y[6:])]
    lam = 0.01
    ek = EkfacInfluence(model, hessian_regularization=lam, fisher=fisher).fit(train)
    assert ek.covered_modules == [("norm", "LayerNorm", "diagonal", "norm")]
    grads = ref.per_sample_gradients(model, F.cross_entropy, train)
    if fisher == "exact":
        M = torch.diag(torch.diagonal(ref.gauss_newton(model, F.cross_entropy, train)))
    else:
        M = torch.diag(grads.square().mean(0))
    torch.testing.assert_close(ek.curvature_block("norm"), M, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(ek.influences(x[:3], y[:3], x, y), ref.influences(grads[:3], M, grads, lam))
    kfac = EkfacInfluence(model, False, lam, fisher=fisher).fit(train)  # diagonal blocks: the same
    torch.testing.assert_close(kfac.curvature_block("norm"), M, rtol=1e-10, atol=1e-14)


def test_batchnorm_cnn_blocks_are_projected_gauss_newton():
    """Conv2d, BatchNorm2d (eval mode: diagonal blocks) and Linear of the real-models CNN."""
    model, loss, train, _ = rm.batchnorm_cnn()
    ek = EkfacInfluence(model, loss=loss, loss_family="cross_entropy", fisher="exact").fit(train)
    kinds = {path: how for path, _, how, _ in ek.covered_modules}
    assert kinds == {"0": "kronecker", "1": "diagonal", "3": "kronecker", "4": "diagonal", "7": "kronecker"}
    assert_projected_gauss_newton(ek, model, ref.gauss_newton(model, loss, train))
    x = torch.cat([b[0] for b in train])
    y = torch.cat([b[1] for b in train])
    torch.testing.assert_close(
        ek.train_representation(x, y), ref.per_sample_gradients(model, loss, train), rtol=1e-9, atol=1e-13
    )


def test_batchnorm_in_training_mode_is_rejected():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(DT)
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\).*eval mode"):
        EkfacInfluence(model)


# ---------------------------------------------------------------- Conv1D = transposed Linear
def test_conv1d_equals_linear_with_transposed_weight():
    from transformers.pytorch_utils import Conv1D

    class Pool(nn.Module):  # tokens (n, T, 3) → logits (n, 3)
        def forward(self, x):
            return x.mean(1)

    torch.manual_seed(0)
    conv = nn.Sequential(Conv1D(5, 4), nn.Tanh(), Conv1D(3, 5), Pool()).to(DT)
    lin = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), Pool()).to(DT)
    with torch.no_grad():
        for c, li in ((conv[0], lin[0]), (conv[2], lin[2])):
            li.weight.copy_(c.weight.T)
            li.bias.copy_(c.bias)

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 6, 4, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g)
    kw = dict(hessian_regularization=0.01, fisher="exact")
    for update_diagonal in (True, False):
        a = EkfacInfluence(conv, update_diagonal, **kw).fit([(x[:5], y[:5]), (x[5:], y[5:])])
        b = EkfacInfluence(lin, update_diagonal, **kw).fit([(x[:5], y[:5]), (x[5:], y[5:])])
        assert {k for _, k, *_ in a.covered_modules} == {"Conv1D"}
        torch.testing.assert_close(a.influences(x[:3], y[:3], x, y), b.influences(x[:3], y[:3], x, y))
        for k in ("0", "2"):
            fa, fb = a.kronecker_factors()[k], b.kronecker_factors()[k]
            torch.testing.assert_close(fa["A"], fb["A"])
            torch.testing.assert_close(fa["G"], fb["G"])
            if update_diagonal:  # [W; bᵀ] of Conv1D is [W | b] of Linear transposed
                torch.testing.assert_close(a.diagonal[k], b.diagonal[k].T)


# ---------------------------------------------------------------- a weight used by two modules
class TiedLM(nn.Module):
    """Embedding(11, 4) → tanh → Linear(4, 11) with the weight of the embedding: logits per token."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.head = nn.Linear(4, 11, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x)))


def test_tied_weight_is_one_block_with_exact_gradients_and_projected_gauss_newton():
    torch.manual_seed(0)
    model = TiedLM().to(DT)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 11, (9, 5), generator=g)
    labels = ids.clone()
    labels[::4, -2:] = -100
    train = [(ids[:5], labels[:5]), (ids[5:], labels[5:])]
    ek = EkfacInfluence(model, loss=rm.sequence_lm_loss, loss_family="cross_entropy", fisher="exact").fit(
        train
    )
    assert ek.layout.block_names == ["embed"] and ek.n_parameters == 44
    assert [(p, how, b) for p, _, how, b in ek.covered_modules] == [
        ("embed", "kronecker", "embed"),
        ("head", "kronecker", "embed"),
    ]
    torch.testing.assert_close(
        ek.train_representation(ids, labels),
        ref.per_sample_gradients(model, rm.sequence_lm_loss, train),
        rtol=1e-9,
        atol=1e-13,
    )
    assert_projected_gauss_newton(ek, model, ref.gauss_newton(model, rm.sequence_lm_loss, train))


def test_tied_weight_kfac_is_the_sum_of_its_uses_kronecker_terms():
    """K-FAC of the shared block: each use's factors built here by hand (exact Fisher; in this model the
    logits at token t depend on the embedding at t only), R ⊗ C = the nearest Kronecker product of
    their sum (SVD of the rearrangement), eigenvalues Σ_u diag(Q_Rᵀ R_u Q_R) ⊗ diag(Q_Cᵀ C_u Q_C)."""
    torch.manual_seed(0)
    model = TiedLM().to(DT)
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(0, 11, (7, 4), generator=g)
    labels = ids.clone()
    labels[::3, -1] = -100
    ek = EkfacInfluence(model, False, loss=rm.sequence_lm_loss, loss_family="cross_entropy", fisher="exact")
    ek.fit([(ids, labels)])
    n, T = ids.shape
    W = model.embed.weight.detach()
    e = W[ids]  # (n, T, d) embedding outputs
    h = torch.tanh(e)
    p = torch.softmax(h @ W.T, -1)  # (n, T, V)
    predicts = torch.zeros(n, T, dtype=DT)
    predicts[:, :-1] = (labels[:, 1:] != -100).to(DT)
    w = predicts / predicts.sum(1, keepdim=True)  # 1/m at the m positions that predict a token
    H = w[..., None, None] * (torch.diag_embed(p) - p[..., :, None] * p[..., None, :])  # (n, T, V, V)
    D = 1 - h.square()
    G_head = H.sum((0, 1)) / (n * T)
    G_embed = torch.einsum("ntd,vd,ntvu,ue,nte->de", D, W, H, W, D) / (n * T)
    A_head = torch.einsum("ntd,nte->de", h, h) / n
    A_embed = torch.diag(torch.bincount(ids.flatten(), minlength=11).to(DT)) / n
    rows, cols = [A_embed, G_head], [G_embed, A_head]  # the block is W as stored: (V, d)
    U, S, Vh = torch.linalg.svd(sum(torch.outer(r.reshape(-1), c.reshape(-1)) for r, c in zip(rows, cols)))
    factors = ek.kronecker_factors()["embed"]  # A: the vocabulary side (rows), G: the d side
    torch.testing.assert_close(
        torch.outer(factors["A"].reshape(-1), factors["G"].reshape(-1)),
        S[0] * torch.outer(U[:, 0], Vh[0]),
        rtol=1e-8,
        atol=1e-12,
    )
    q_r, q_c = ek.eigenvectors_A["embed"], ek.eigenvectors_G["embed"]
    expected = sum(
        torch.outer(torch.diagonal(q_r.T @ r @ q_r), torch.diagonal(q_c.T @ c @ q_c))
        for r, c in zip(rows, cols)
    )
    B = torch.einsum("ai,bj->ijab", q_r, q_c).reshape(-1, 44)  # basis matrices, row-major = flat layout
    torch.testing.assert_close(((B @ ek.curvature_block("embed")) * B).sum(1), expected.reshape(-1))


def test_nearest_kronecker_is_the_leading_singular_pair_of_the_rearrangement():
    g = torch.Generator().manual_seed(5)

    def psd(d):
        m = torch.randn(d, d, generator=g, dtype=DT)
        return m @ m.T

    rows, cols = [psd(3), torch.rand(3, generator=g, dtype=DT)], [psd(4), psd(4)]
    R, C = nearest_kronecker(rows, cols)
    dense_rows = [torch.diag(r) if r.ndim == 1 else r for r in rows]
    rearranged = sum(torch.outer(r.reshape(-1), c.reshape(-1)) for r, c in zip(dense_rows, cols))
    U, S, Vh = torch.linalg.svd(rearranged)
    best = S[0] * torch.outer(U[:, 0], Vh[0])
    torch.testing.assert_close(torch.outer(R.reshape(-1), C.reshape(-1)), best, rtol=1e-9, atol=1e-12)
    assert torch.linalg.eigvalsh(R).min() > -1e-12 and torch.linalg.eigvalsh(C).min() > -1e-12


# ---------------------------------------------------------------- the loss
@pytest.mark.parametrize("fisher", ["true", "exact", "empirical"])
def test_callable_cross_entropy_with_loss_family_equals_the_builtin(fisher):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(10, 4, generator=g, dtype=DT), torch.randint(0, 3, (10,), generator=g)
    train = [(x[:6], y[:6]), (x[6:], y[6:])]
    builtin = EkfacInfluence(model, fisher=fisher, hessian_regularization=0.01).fit(train)
    custom = EkfacInfluence(
        model,
        fisher=fisher,
        hessian_regularization=0.01,
        loss=lambda out, t: F.cross_entropy(out, t),
        loss_family="cross_entropy",
    ).fit(train)
    for name in ("eigenvalues_A", "eigenvalues_G", "diagonal"):
        for k, v in getattr(builtin, name).items():
            torch.testing.assert_close(getattr(custom, name)[k], v, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(custom.influences(x, y), builtin.influences(x, y), rtol=1e-8, atol=1e-12)


def test_weights_of_a_per_sequence_language_model_loss():
    """Read from one Hessian-vector product: 1/m_i at the m_i positions that predict a token."""
    g = torch.Generator().manual_seed(7)
    labels = torch.randint(0, 6, (3, 5), generator=g)
    labels[1, 3:] = -100
    labels[2, 2:] = -100
    z = torch.randn(3, 5, 6, generator=g, dtype=DT, requires_grad=True)
    spec = parse_loss(rm.sequence_lm_loss, "cross_entropy", None, FisherType.TRUE)
    w = spec.weights(z, z, labels, 3, "test")
    m = (labels[:, 1:] != -100).sum(1).to(DT)
    expected = torch.zeros(3, 5, dtype=DT)
    expected[:, :-1] = (labels[:, 1:] != -100).to(DT) / m[:, None]
    torch.testing.assert_close(w, expected, rtol=1e-10, atol=1e-12)
    assert spec.family is EkfacLoss.CROSS_ENTROPY


def test_a_family_that_does_not_fit_the_loss_is_named():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(DT)
    x, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    yf = torch.randn(6, 3, dtype=DT)
    with pytest.raises(ValueError, match="loss_family='cross_entropy'.*not Σ_t w_t"):
        EkfacInfluence(model, loss=lambda o, t: F.mse_loss(o, t), loss_family="cross_entropy").fit([(x, yf)])
    with pytest.raises(ValueError, match="loss_family='mse'.*not diagonal"):
        EkfacInfluence(model, loss=lambda o, t: F.cross_entropy(o, t), loss_family="mse").fit([(x, y)])
    with pytest.raises(ValueError, match="fisher='true'.*loss_family='cross_entropy' or 'mse'"):
        EkfacInfluence(model, loss=lambda o, t: F.cross_entropy(o, t))
    with pytest.raises(ValueError, match="contradict"):
        EkfacInfluence(model, loss=F.cross_entropy, loss_family="mse")
    with pytest.raises(ValueError, match="loss_family='hinge'"):
        EkfacInfluence(model, loss=F.cross_entropy, loss_family="hinge")
    # the empirical Fisher needs only the loss
    ek = EkfacInfluence(model, loss=lambda o, t: F.cross_entropy(o, t), fisher="empirical").fit([(x, y)])
    assert ek.loss_type is None and ek.is_fitted


def test_output_logits_reads_the_logits_from_any_output():
    torch.manual_seed(0)

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return {"scores": self.lin(x), "other": x}

    model = Pair().to(DT)
    x, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    ek = EkfacInfluence(
        model,
        loss=lambda o, t: F.cross_entropy(o["scores"], t),
        loss_family="cross_entropy",
        output_logits=lambda o: o["scores"],
        fisher="exact",
    ).fit([(x, y)])
    plain = EkfacInfluence(model.lin, fisher="exact").fit([(x, y)])
    torch.testing.assert_close(ek.diagonal["lin"], plain.diagonal["root"])
