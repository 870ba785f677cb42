"""Small, deterministic versions of the models people actually train, for exact influence tests.

Each builder returns a ``Workload`` — it unpacks as ``(model, loss_fn, train_batches, test_batches)`` —
with the model in eval mode, float64 by default, 12 training points in batches of 5, 4 and 3 and 5 test
points in one batch, and at most about 3,000 trainable parameters (nothing is frozen), so that the
explicit float64 p × p matrices of ``tests/torch/references.py`` are cheap. Nothing is downloaded: the
HuggingFace models are built from configs, the data are generated from a seed.

Conventions (those of infscale):

- a batch is a tuple ``(x, y)`` or a dict; a dict's targets are under ``"labels"``, which is not passed
  to the model: the rest is, as ``model(**x)``; a tensor ``x`` is passed as ``model(x)``;
- ``loss_fn(outputs, y)`` receives exactly what the model returns (a tensor, or a HuggingFace
  ``ModelOutput``) and returns the mean over the batch of the per-sample losses, so the loss of a
  one-sample batch is that sample's loss.

The models are trained a little (5 to 30 full-batch Adam steps, mean training loss about 0.1 to 0.8),
so that they sit neither at random initialization nor at an optimum: the Hessians are indefinite.
Dropout is 0 in every config, so training mode and eval mode compute the same function, except for the
BatchNorm CNN, whose running statistics are set by training and then frozen by eval mode.

Builders (``BUILDERS`` maps a name to each):

======================  =====================================================  ==========  ===========
name                    model                                                  batch       parameters
======================  =====================================================  ==========  ===========
``bert``                ``BertForSequenceClassification`` (2 layers, hidden    dict        1,650
                        8, 2 heads, SDPA attention), padded ``input_ids`` /
                        ``attention_mask`` of varying lengths, 2 classes
``gpt2``                ``GPT2LMHeadModel`` (2 layers, hidden 8, 2 heads,      dict        1,552
                        lm_head tied to wte), per-sequence shifted
                        next-token cross-entropy
``lstm`` / ``gru``      ``nn.LSTM`` / ``nn.GRU`` (3 → 6, batch_first, initial  tuple       285 / 219
                        state None) → last step → Linear(6, 3)
``embedding``           ``nn.Embedding(30, 8, padding_idx=0)`` → mean over     tuple       267
                        non-pad tokens → tanh → Linear(8, 3)
``embedding_bag``       ``nn.EmbeddingBag(30, 8, mode="mean",                  tuple       267
                        padding_idx=0)`` → tanh → Linear(8, 3); the same
                        function as ``embedding`` given the same weights
``batchnorm_cnn``       Conv2d → BatchNorm2d → tanh → Conv2d (stride 2) →      tuple       447
                        BatchNorm2d → tanh → Linear(54, 3), eval mode
======================  =====================================================  ==========  ===========

Known limits of these models that a library must live with (measured with torch 2.13, CPU):
- BERT and GPT-2 use ``F.scaled_dot_product_attention``; on CPU it dispatches to a flash kernel whose
  backward has no derivative, so double backward (Hessian-vector products) fails unless the MATH
  backend is chosen (``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``) or the model is built with
  ``attn_implementation="eager"``. First-order gradients work with the default.
- ``nn.EmbeddingBag``'s backward has no derivative (``_embedding_bag_backward``): no Hessian-vector
  products through it at all. Its twin ``embedding`` computes the same function with double backward.
- GPT-2 returns a ``CausalLMOutputWithCrossAttentions`` whose ``past_key_values`` is a cache object
  (``use_cache`` is True by default), not a tensor.
- GPT-2's ``Conv1D`` layers store their weight as (in, out), the transpose of ``nn.Linear``'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from references import call_model, n_samples, split_batch  # the batch convention, shared
from torch import Tensor, nn

N_TRAIN, N_TEST = 12, 5
TRAIN_BATCH_SIZES = (5, 4, 3)
VOCAB, PAD = 30, 0


class Workload(NamedTuple):
    """``(model, loss_fn, train_batches, test_batches)``: batches are lists of tuples or dicts."""

    model: nn.Module
    loss_fn: Callable[[Any, Tensor], Tensor]
    train: list
    test: list


# ------------------------------------------------------------------------------------------- losses
def classification_loss(outputs: Any, labels: Tensor) -> Tensor:
    """Mean cross-entropy of ``outputs`` (a (b, c) tensor, or a ModelOutput with ``.logits``)."""
    logits = outputs if isinstance(outputs, Tensor) else outputs["logits"]
    return nn.functional.cross_entropy(logits, labels)


def sequence_lm_loss(outputs: Any, labels: Tensor) -> Tensor:
    """Next-token cross-entropy of a causal LM: the logits at position t predict ``labels[:, t + 1]``;
    positions whose label is -100 (padding) are skipped. Mean over each sequence's predicted tokens,
    then mean over the sequences, so the loss of a one-sequence batch is that sequence's loss.

    outputs: a ModelOutput with ``.logits`` (b, T, V) or that tensor. labels: (b, T) int64.
    """
    logits = outputs if isinstance(outputs, Tensor) else outputs["logits"]
    logits, targets = logits[:, :-1], labels[:, 1:]
    per_token = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none"
    ).reshape(targets.shape)
    counts = (targets != -100).sum(dim=1)
    return (per_token.sum(dim=1) / counts).mean()


# ------------------------------------------------------------------------------------------- data
def _split_sizes(n: int) -> list[int]:
    return list(TRAIN_BATCH_SIZES) if n == N_TRAIN else [n]


def _padded_token_batches(ids: list[Tensor], labels: Tensor, sizes: list[int], lm: bool) -> list[dict]:
    """Dict batches, each padded (on the right, with PAD) to its own longest sequence."""
    out, s = [], 0
    for b in sizes:
        seqs = ids[s : s + b]
        width = max(len(q) for q in seqs)
        input_ids = torch.full((b, width), PAD, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for i, q in enumerate(seqs):
            input_ids[i, : len(q)] = q
            mask[i, : len(q)] = 1
        target = input_ids.masked_fill(mask == 0, -100) if lm else labels[s : s + b]
        out.append({"input_ids": input_ids, "attention_mask": mask, "labels": target})
        s += b
    return out


def _token_sequences(n: int, g: torch.Generator, min_len: int, max_len: int, first: int | None = None):
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g)
    seqs = [torch.randint(2, VOCAB, (int(k),), generator=g) for k in lengths]
    if first is not None:
        for q in seqs:
            q[0] = first
    return seqs


def _presence_labels(seqs: list[Tensor], classes: int) -> Tensor:
    """Label 1 (or 2) when token 2 (or 3) occurs (the later one wins), else 0; mod ``classes``."""
    y = torch.zeros(len(seqs), dtype=torch.long)
    for i, q in enumerate(seqs):
        if (q == 2).any():
            y[i] = 1
        if classes > 2 and (q == 3).any():
            y[i] = 2
    return y


def _tensor_batches(x: Tensor, y: Tensor, n_train: int) -> tuple[list, list]:
    train, s = [], 0
    for b in _split_sizes(n_train):
        train.append((x[s : s + b], y[s : s + b]))
        s += b
    return train, [(x[n_train:], y[n_train:])]


def _pad_ids(seqs: list[Tensor], width: int) -> Tensor:
    ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    for i, q in enumerate(seqs):
        ids[i, : len(q)] = q
    return ids


# ------------------------------------------------------------------------------------------- training
def _train(model: nn.Module, loss_fn, batches: list, steps: int, lr: float, seed: int) -> nn.Module:
    """Full-batch Adam on the mean training loss (batches weighted by size); returns model.eval()."""
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    total = sum(n_samples(split_batch(b)[0]) for b in batches)
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.0
        for batch in batches:
            x, y = split_batch(batch)
            loss = loss + loss_fn(call_model(model, x), y) * (n_samples(x) / total)
        loss.backward()
        opt.step()
    return model.eval()


# ------------------------------------------------------------------------------------------- builders
def tiny_bert(
    dtype: torch.dtype = torch.float64, seed: int = 0, layers: int = 2, hidden: int = 8, steps: int = 10
) -> Workload:
    """A BertForSequenceClassification (vocab 30, ``hidden``, ``layers``, 2 heads, intermediate
    2·hidden, 12 positions, default attention implementation) on sequences of 3–10 tokens starting
    with token 1 ([CLS]); label 1 when token 2 occurs. Batches: dicts {input_ids (b, T_batch),
    attention_mask (b, T_batch), labels (b,)}, each padded to its own longest sequence. Output:
    SequenceClassifierOutput; loss ``classification_loss``."""
    from transformers import BertConfig, BertForSequenceClassification

    g = torch.Generator().manual_seed(seed)
    seqs = _token_sequences(N_TRAIN + N_TEST, g, 3, 10, first=1)
    labels = _presence_labels(seqs, 2)
    batches = _padded_token_batches(seqs, labels, [*TRAIN_BATCH_SIZES, N_TEST], lm=False)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=12,
        type_vocab_size=1,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=PAD,
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config).to(dtype)
    train, test = batches[:-1], batches[-1:]
    return Workload(
        _train(model, classification_loss, train, steps, 0.02, seed), classification_loss, train, test
    )


def tiny_gpt2(
    dtype: torch.dtype = torch.float64, seed: int = 0, layers: int = 2, hidden: int = 8, steps: int = 30
) -> Workload:
    """A GPT2LMHeadModel (vocab 30, ``hidden``, ``layers``, 2 heads, inner 2·hidden, 12 positions,
    lm_head tied to the token embedding, default attention implementation) on sequences of 4–10
    tokens that count up by a per-sequence step (mod 28, ids 2..29). Batches: dicts {input_ids,
    attention_mask, labels = input_ids with -100 at padding}; loss ``sequence_lm_loss``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    g = torch.Generator().manual_seed(seed)
    n = N_TRAIN + N_TEST
    lengths = torch.randint(4, 11, (n,), generator=g)
    starts = torch.randint(0, VOCAB - 2, (n,), generator=g)
    steps_ = torch.randint(1, 4, (n,), generator=g)
    seqs = [2 + (starts[i] + steps_[i] * torch.arange(int(lengths[i]))) % (VOCAB - 2) for i in range(n)]
    batches = _padded_token_batches(seqs, torch.zeros(n), [*TRAIN_BATCH_SIZES, N_TEST], lm=True)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=hidden,
        n_layer=layers,
        n_head=2,
        n_inner=2 * hidden,
        n_positions=12,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=PAD,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).to(dtype)
    train, test = batches[:-1], batches[-1:]
    return Workload(_train(model, sequence_lm_loss, train, steps, 0.02, seed), sequence_lm_loss, train, test)


class RecurrentClassifier(nn.Module):
    """``cell`` (nn.LSTM or nn.GRU, input 3, hidden 6, batch_first, default None initial state) →
    the last time step's output → Linear(6, 3). x: (b, T, 3) → logits (b, 3)."""

    def __init__(self, cell: type[nn.Module]):
        super().__init__()
        self.rnn = cell(3, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _recurrent(cell: type[nn.Module], dtype: torch.dtype, seed: int, steps: int) -> Workload:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN + N_TEST, 7, 3, generator=g, dtype=torch.float64)
    y = (x[:, :, 0].sum(1) > 0).long() + (x[:, -2:, 1].sum(1) > 1).long()
    torch.manual_seed(seed)
    model = RecurrentClassifier(cell).to(dtype)
    train, test = _tensor_batches(x.to(dtype), y, N_TRAIN)
    return Workload(
        _train(model, classification_loss, train, steps, 0.05, seed), classification_loss, train, test
    )


def lstm_classifier(dtype: torch.dtype = torch.float64, seed: int = 0, steps: int = 8) -> Workload:
    """``RecurrentClassifier(nn.LSTM)`` on (b, 7, 3) float sequences, 3 classes; cross-entropy."""
    return _recurrent(nn.LSTM, dtype, seed, steps)


def gru_classifier(dtype: torch.dtype = torch.float64, seed: int = 0, steps: int = 8) -> Workload:
    """``RecurrentClassifier(nn.GRU)`` on (b, 7, 3) float sequences, 3 classes; cross-entropy."""
    return _recurrent(nn.GRU, dtype, seed, steps)


class EmbeddingClassifier(nn.Module):
    """nn.Embedding(30, 8, padding_idx=0) → mean over the non-pad tokens → tanh → Linear(8, 3).
    x: (b, T) int64 token ids, 0 = padding → logits (b, 3)."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 8, padding_idx=PAD)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        mask = (x != PAD).unsqueeze(-1).to(self.embedding.weight.dtype)
        pooled = (self.embedding(x) * mask).sum(1) / mask.sum(1)
        return self.head(torch.tanh(pooled))


class EmbeddingBagClassifier(nn.Module):
    """nn.EmbeddingBag(30, 8, mode="mean", padding_idx=0) → tanh → Linear(8, 3); x: (b, T) int64.
    Parameter names and shapes match ``EmbeddingClassifier`` (``embedding.weight``, ``head.*``), and
    with the same weights both compute the same function."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.EmbeddingBag(VOCAB, 8, mode="mean", padding_idx=PAD)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embedding(x)))


def _text(model_cls: type[nn.Module], dtype: torch.dtype, seed: int, steps: int) -> Workload:
    g = torch.Generator().manual_seed(seed)
    seqs = _token_sequences(N_TRAIN + N_TEST, g, 2, 9)
    y = _presence_labels(seqs, 3)
    ids = _pad_ids(seqs, 9)
    torch.manual_seed(seed)
    model = model_cls().to(dtype)
    train, test = _tensor_batches(ids, y, N_TRAIN)
    return Workload(
        _train(model, classification_loss, train, steps, 0.05, seed), classification_loss, train, test
    )


def embedding_text(dtype: torch.dtype = torch.float64, seed: int = 0, steps: int = 5) -> Workload:
    """``EmbeddingClassifier`` on token-id sequences of 2–8 tokens padded with 0 to 9; label 1 when
    token 2 occurs, 2 when token 3 occurs; cross-entropy. Batches: tuples (ids (b, 9), labels (b,))."""
    return _text(EmbeddingClassifier, dtype, seed, steps)


def embedding_bag_text(dtype: torch.dtype = torch.float64, seed: int = 0, steps: int = 5) -> Workload:
    """``EmbeddingBagClassifier`` on the data of ``embedding_text`` (same seed, same data)."""
    return _text(EmbeddingBagClassifier, dtype, seed, steps)


def batchnorm_cnn(dtype: torch.dtype = torch.float64, seed: int = 0, steps: int = 10) -> Workload:
    """Conv2d(1,4,3,pad 1) → BatchNorm2d(4) → tanh → Conv2d(4,6,3,stride 2,pad 1) → BatchNorm2d(6) →
    tanh → Flatten → Linear(54, 3) on (b, 1, 6, 6) images; trained in train mode (which sets the
    BatchNorm running statistics), returned in eval mode (which uses and freezes them). Cross-entropy."""
    g = torch.Generator().manual_seed(seed)
    n = N_TRAIN + N_TEST
    y = torch.arange(n) % 3
    x = torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64)
    x[y == 1, 0, :3] += 1.0  # class 1: bright top half, class 2: bright left half
    x[y == 2, 0, :, :3] += 1.0
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.Tanh(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.BatchNorm2d(6),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(54, 3),
    ).to(dtype)
    train, test = _tensor_batches(x.to(dtype), y, N_TRAIN)
    return Workload(
        _train(model, classification_loss, train, steps, 0.01, seed), classification_loss, train, test
    )


BUILDERS: dict[str, Callable[..., Workload]] = {
    "bert": tiny_bert,
    "gpt2": tiny_gpt2,
    "lstm": lstm_classifier,
    "gru": gru_classifier,
    "embedding": embedding_text,
    "embedding_bag": embedding_bag_text,
    "batchnorm_cnn": batchnorm_cnn,
}
