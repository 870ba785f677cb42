"""The layer kinds of the batched path, and the fallbacks, against a plain autograd loop.

Every model here is checked by ``test_gradients.check``: dense and factored per-sample gradients and
every product with them equal a loop of one-sample ``torch.autograd.grad`` calls, and each parameter
takes the route stated (batched, vmap, or the per-sample loop).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_gradients import check, reference_gradients
from torch import nn

from infscale.torch.functional import ParameterLayout, gradient_engine


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


CE = nn.functional.cross_entropy


def labels(n: int, classes: int = 3, seed: int = 0):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


class GPT2Block(nn.Module):
    """HuggingFace Conv1D layers (weights stored (in, out)) over positions, then LayerNorm."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.up = Conv1D(12, 4)  # nf=12 outputs, nx=4 inputs
        self.down = Conv1D(4, 12)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.norm(x + self.down(torch.tanh(self.up(x))))
        return self.head(h.mean(dim=1))


def test_huggingface_conv1d_and_layer_norm():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = GPT2Block()
    assert model.up.weight.shape == (4, 12)
    x = torch.randn(6, 2, 4, generator=torch.Generator().manual_seed(1))
    engine = check(model, CE, x, labels(6), expect_factored=True)
    assert {layer.module for layer in engine.layers} == {model.up, model.down, model.head}


class Convolutions(nn.Module):
    """Conv1d and Conv2d with stride, dilation, 'same' and reflect padding: few output positions."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 24, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(1, 16, 3, stride=2, dilation=1, padding=1, padding_mode="reflect")
        self.c3 = nn.Conv2d(16, 16, 2, padding="same", dilation=2, bias=False)
        self.head = nn.Linear(24 + 16, 3)

    def forward(self, x):
        seq = x.flatten(2)[:, :2, :4]  # (n, 2, 4): a two-channel sequence
        a = torch.tanh(self.c1(seq)).mean(dim=2)
        b = torch.tanh(self.c3(torch.tanh(self.c2(x[:, :1])))).mean(dim=(2, 3))
        return self.head(torch.cat([a, b], dim=1))


def test_convolutions_with_stride_dilation_and_padding_modes():
    torch.manual_seed(1)
    x = torch.randn(7, 2, 3, 3, generator=torch.Generator().manual_seed(2))
    engine = check(Convolutions(), CE, x, labels(7), expect_factored=True)
    assert engine.coverage.uncovered == []


def test_grouped_convolution_takes_vmap():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3))
    x = torch.randn(5, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    check(model, CE, x, labels(5), expect_factored=True, routes={"0.weight": "vmap", "0.bias": "vmap"})


class Tokens(nn.Module):
    """Token and (broadcast) position embeddings, norms, a tied output layer: a tiny language model."""

    def __init__(self, vocab=11, width=6, positions=5):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width, padding_idx=0)
        self.positions = nn.Embedding(positions, width)
        self.norm = nn.LayerNorm(width, bias=False)
        self.rms = nn.RMSNorm(width)
        self.group = nn.GroupNorm(2, width)
        self.out = nn.Linear(width, vocab, bias=False)
        self.out.weight = self.tokens.weight  # tied: one parameter, two modules

    def forward(self, ids):
        where = torch.arange(ids.shape[1]).unsqueeze(0)  # (1, T): broadcast over the batch
        h = self.tokens(ids) + self.positions(where)
        h = self.rms(torch.tanh(self.norm(h)))
        h = self.group(h.transpose(1, 2)).transpose(1, 2)
        return self.out(h).mean(dim=1)


def test_embeddings_norms_broadcast_positions_and_tied_output():
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 11, (8, 5), generator=g)
    ids[:, -2:] = 0  # padding
    engine = check(Tokens(), CE, ids, labels(8, 11), expect_factored=False)
    assert engine.coverage.uncovered == []
    assert engine.coverage.dense_names == [
        "tokens.weight",
        "positions.weight",
        "norm.weight",
        "rms.weight",
        "group.weight",
        "group.bias",
    ]


def test_eval_batch_norm_is_batched():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3))
    x = torch.randn(9, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    check(model, CE, x, labels(9), expect_factored=True)


class Encoder(nn.Module):
    """torch's own TransformerEncoder: MultiheadAttention calls out_proj's weight functionally."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(self.encoder(self.embed(ids), src_key_padding_mask=ids == 0).mean(dim=1))


def test_torch_transformer_encoder():
    torch.manual_seed(5)
    model = Encoder().eval()
    ids = torch.randint(1, 10, (6, 4), generator=torch.Generator().manual_seed(6))
    ids[:3, -1] = 0
    attention = "encoder.layers.0.self_attn."
    routes = {
        attention + k: "vmap" for k in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
    }
    check(model, CE, ids, labels(6), expect_factored=False, routes=routes)


class Recurrent(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn = cell(3, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        out, _ = self.rnn(x)  # default initial state: vmap cannot trace it
        return self.head(out[:, -1])


@pytest.mark.parametrize("cell", [nn.RNN, nn.LSTM, nn.GRU])
def test_recurrent_layers_with_default_states_take_the_loop_with_one_warning(cell):
    torch.manual_seed(6)
    x = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(7))
    names = [n for n, _ in cell(3, 4).named_parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = check(
            Recurrent(cell),
            CE,
            x,
            labels(5),
            expect_factored=True,
            routes={f"rnn.{n}": "loop" for n in names},
        )
        engine.gradients(x, labels(5), 2)
    ours = [w for w in caught if "one sample at a time" in str(w.message)]
    assert len(ours) == 1 and "['rnn']" in str(ours[0].message)


class Unbatched(nn.Module):
    """``proj`` is applied to a constant table (leading dimension 4, not the batch): not a batch."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)
        self.register_buffer("table", torch.randn(4, 5, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        keys = self.proj(self.table)  # (4, 5)
        return self.head(torch.softmax(x @ keys.T, dim=1) @ keys)


def test_a_module_called_on_something_else_than_the_batch_takes_vmap():
    torch.manual_seed(7)
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(8))
    check(
        Unbatched(),
        CE,
        x,
        labels(6),
        expect_factored=False,
        routes={"proj.weight": "vmap", "proj.bias": "vmap"},
    )


def test_float32_models_stay_on_the_batched_path():
    """The check's float32 tolerance does not mistake rounding for a wrong gradient."""
    torch.manual_seed(8)
    model = GPT2Block().float() if _has_transformers() else Tokens().float()
    x = torch.randn(16, 3, 4, generator=torch.Generator().manual_seed(9)).float()
    if not _has_transformers():
        x = torch.randint(0, 11, (16, 5))
    y = labels(16, 3)
    engine = gradient_engine(ParameterLayout(model), CE)
    got = engine.gradients(x, y, 16)
    assert set(engine.routes(x, y).values()) == {"batched"}
    torch.testing.assert_close(got, reference_gradients(model, CE, x, y), rtol=1e-4, atol=1e-6)


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True
