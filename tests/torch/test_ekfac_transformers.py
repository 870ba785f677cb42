"""EK-FAC on tiny real transformers (``real_models.py``: BertForSequenceClassification, GPT-2 LM with the
embedding tied to the output layer and a per-sequence loss) against the independent float64 references
of ``references.py``:

- every trainable parameter is covered (nothing skipped), the tied GPT-2 weight once;
- the per-sample gradients EK-FAC computes equal a loop of ``torch.autograd.grad``;
- with ``fisher="exact"`` every block's EK-FAC diagonal is diag(Bᵀ GN B) of the explicit Gauss-Newton
  block (B its Kronecker eigenbasis): this checks the output-gradient pull-backs, the per-token weights
  of the language-model loss, the tied weight (both uses, and their cross terms), embeddings with
  broadcast position ids, Conv1D and padding at once;
- the token mask: A of the position embedding is the count of real tokens per position;
- the true Fisher of the language model converges to the exact one;
- Pearson r of the influences against ``exact_influences(..., "gauss_newton")`` and against the
  block-diagonal Gauss-Newton matrix on EK-FAC's own blocks;
- the GPT-2 example of docs/ekfac.md runs.

Until dict batches exist (hf-inputs branch) the HuggingFace models are wrapped in ``TokenModel``, which
takes x = stack([input_ids, attention_mask], 1) as one integer tensor; all batches are padded to one
width, because infscale checks that x has one feature shape.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import real_models as rm
import references as ref
import torch
from ekfac_checks import assert_projected_gauss_newton, block_indices
from torch import Tensor, nn

from infscale.torch import EkfacInfluence

torch.set_num_threads(1)
WIDTH = 10


class TokenModel(nn.Module):
    """A HuggingFace model called as ``model(input_ids=x[:, 0], attention_mask=x[:, 1], **kw)``."""

    def __init__(self, model: nn.Module, **kw):
        super().__init__()
        self.model = model
        self.kw = kw

    def forward(self, x: Tensor):
        return self.model(input_ids=x[:, 0], attention_mask=x[:, 1], **self.kw)


def tuple_batches(batches: list[dict], lm: bool) -> list[tuple[Tensor, Tensor]]:
    """Dict batches → (stack([ids, mask], 1), labels), right-padded to WIDTH."""
    out = []
    for b in batches:
        pad = WIDTH - b["input_ids"].shape[1]
        ids = nn.functional.pad(b["input_ids"], (0, pad), value=rm.PAD)
        mask = nn.functional.pad(b["attention_mask"], (0, pad))
        out.append((torch.stack([ids, mask], 1), ids.masked_fill(mask == 0, -100) if lm else b["labels"]))
    return out


class Case:
    """A wrapped model with its batches and the references, computed once."""

    def __init__(self, name: str, **kw):
        w = rm.BUILDERS[name](**kw)
        lm = name == "gpt2"
        self.raw = w
        self.model = TokenModel(w.model, **({"use_cache": False} if lm else {}))
        self.loss = w.loss_fn
        self.train, self.test = tuple_batches(w.train, lm), tuple_batches(w.test, lm)
        self.x = torch.cat([x for x, _ in self.train])
        self.y = torch.cat([y for _, y in self.train])
        self.xt, self.yt = self.test[0]
        self.gn = ref.gauss_newton(self.model, self.loss, self.train)
        self.g_train = ref.per_sample_gradients(self.model, self.loss, self.train)
        self.g_test = ref.per_sample_gradients(self.model, self.loss, self.test)
        self.top = float(torch.linalg.eigvalsh(self.gn)[-1])

    def ekfac(self, **kw) -> EkfacInfluence:
        kw = {"loss": self.loss, "loss_family": "cross_entropy", "token_mask": lambda x: x[:, 1], **kw}
        return EkfacInfluence(self.model, **kw).fit(self.train)


@pytest.fixture(scope="module")
def cases() -> dict[str, Case]:
    # BERT: seed 2, 15 steps (train loss 0.31): the default 10-step BERT has a Gauss-Newton matrix of
    # numerical rank one, where any method (even plain gradient dot products) reaches r = 1.0.
    return {"bert": Case("bert", seed=2, steps=15), "gpt2": Case("gpt2")}


def pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


# ---------------------------------------------------------------- coverage and gradients
@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_every_trainable_parameter_is_covered_and_gradients_are_exact(cases, name):
    case = cases[name]
    ek = case.ekfac(fisher="empirical")
    assert ek.skipped_modules == []
    trainable = [n for n, p in case.model.named_parameters() if p.requires_grad]
    assert sorted(ek.layout.names()) == sorted(trainable)  # each once, the tied GPT-2 weight too
    assert ek.n_parameters == sum(p.numel() for p in case.model.parameters())
    how = {cls: kind for _, cls, kind, _ in ek.covered_modules}
    expected = {"Embedding": "kronecker", "LayerNorm": "diagonal"}
    expected.update(
        {"Linear": "kronecker"} if name == "bert" else {"Conv1D": "kronecker", "Linear": "kronecker"}
    )
    assert how == expected
    if name == "gpt2":
        tied = [(p, b) for p, _, _, b in ek.covered_modules if b == "model.transformer.wte"]
        assert tied == [
            ("model.transformer.wte", "model.transformer.wte"),
            ("model.lm_head", "model.transformer.wte"),
        ]
    torch.testing.assert_close(ek.train_representation(case.x, case.y), case.g_train, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_exact_fisher_diagonal_is_the_projected_gauss_newton_block(cases, name):
    case = cases[name]
    ek = case.ekfac(fisher="exact", update_diagonal=True)
    assert_projected_gauss_newton(ek, case.model, case.gn)


def test_token_mask_keeps_padding_out_of_the_factors(cases):
    """GPT-2's position embedding: A = diag(number of real tokens at each position) / n with the mask;
    without it every padded position counts too."""
    case = cases["gpt2"]
    real = case.x[:, 1].sum(0).to(torch.float64)  # sequences with a real token at position t
    n = case.x.shape[0]
    masked = case.ekfac(fisher="empirical", update_diagonal=False).kronecker_factors()
    A = torch.zeros(12, dtype=torch.float64)
    A[:WIDTH] = real / n
    torch.testing.assert_close(masked["model.transformer.wpe"]["A"], torch.diag(A))
    unmasked = case.ekfac(fisher="empirical", update_diagonal=False, token_mask=None).kronecker_factors()
    A[:WIDTH] = 1.0
    torch.testing.assert_close(unmasked["model.transformer.wpe"]["A"], torch.diag(A))


def test_language_model_true_fisher_converges_to_the_exact_one(cases):
    """One sampled next token per position and sequence: unbiased, but heavy-tailed for a confident
    model (a rarely sampled token contributes much), so it takes the data 160 times (error 4%; 17% at
    10 or 40 times, 9% as the mean over 200 seeds of the data once)."""
    case = cases["gpt2"]
    many = [(x.repeat(160, 1, 1), y.repeat(160, 1)) for x, y in case.train]
    kw = dict(
        loss=case.loss, loss_family="cross_entropy", update_diagonal=False, token_mask=lambda x: x[:, 1]
    )
    true = EkfacInfluence(case.model, fisher="true", seed=1, **kw).fit(many).kronecker_factors()
    exact = EkfacInfluence(case.model, fisher="exact", **kw).fit(case.train).kronecker_factors()
    for block in ("model.transformer.h.0.mlp.c_fc", "model.transformer.h.1.attn.c_attn"):
        G, G_exact = true[block]["G"], exact[block]["G"]
        assert torch.linalg.norm(G - G_exact) < 0.1 * torch.linalg.norm(G_exact)


# ---------------------------------------------------------------- agreement with the Gauss-Newton influences
@pytest.mark.parametrize("name", ["bert", "gpt2"])
@pytest.mark.parametrize("fisher", ["exact", "true", "empirical"])
@pytest.mark.parametrize("update_diagonal", [True, False], ids=["ekfac", "kfac"])
def test_influences_agree_with_gauss_newton(cases, name, fisher, update_diagonal):
    """Against the block-diagonal Gauss-Newton matrix on EK-FAC's blocks (what a per-block method can
    reach) at λ = 0.01 λ_max, where plain gradient dot products reach only r = 0.44 (BERT) / 0.56
    (GPT-2); against the full one at λ = 0.2 λ_max, where the dropped cross-block curvature matters
    less (block-diagonal GN itself: r = 0.97 / 0.98)."""
    case = cases[name]
    for rel, block_diagonal, r_min in ((0.01, True, 0.95), (0.2, False, 0.9)):
        lam = rel * case.top
        ek = case.ekfac(fisher=fisher, update_diagonal=update_diagonal, hessian_regularization=lam)
        curvature = case.gn
        if block_diagonal:
            curvature = torch.zeros_like(case.gn)
            for b in ek.layout.blocks:
                idx = block_indices(ek, case.model, b.name)
                curvature[idx[:, None], idx] = case.gn[idx[:, None], idx]
        expected = ref.influences(case.g_test, curvature, case.g_train, lam)
        r = pearson(ek.influences(case.xt, case.yt, case.x, case.y), expected)
        assert r >= r_min, (rel, block_diagonal, r)


# ---------------------------------------------------------------- dict batches and the docs example
def test_dict_batches_equal_the_wrapped_model(cases):
    case = cases["gpt2"]
    ek = EkfacInfluence(
        case.raw.model, loss=case.loss, loss_family="cross_entropy", hessian_regularization=1.0,
        fisher="exact",  # no sampled labels: the two runs pad their batches to different widths
    )
    ek.fit(case.raw.train)  # the attention mask of each dict batch is the token mask
    wrapped = case.ekfac(hessian_regularization=1.0, fisher="exact")
    batch = case.raw.test[0]
    x = {k: v for k, v in batch.items() if k != "labels"}
    xt, yt = tuple_batches([batch], lm=True)[0]
    torch.testing.assert_close(
        ek.influences(x, batch["labels"], x, batch["labels"]), wrapped.influences(xt, yt, xt, yt)
    )


def test_docs_gpt2_example_runs():
    text = (Path(__file__).resolve().parents[2] / "docs" / "ekfac.md").read_text()
    (code,) = re.findall(r"```python\n(# A tiny GPT-2.*?)```", text, flags=re.S)
    namespace: dict = {}
    exec(compile(code, "docs/ekfac.md", "exec"), namespace)
    scores = namespace["scores"]
    assert scores.shape == (1, namespace["n_docs"]) and torch.isfinite(scores).all()
