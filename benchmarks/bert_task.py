"""A tiny BERT text-classification task, built from a config and generated data (nothing downloaded).

Standalone: imports torch, numpy and transformers only (no infscale), so that the kronfluence
benchmark venv, the LDS retraining and infscale's side all build the very same task.

Data: sequences of 6 to 16 token ids (vocab 50; id 0 = padding, 1 = [CLS], always first). Tokens 2–6
are "positive", 7–11 "negative", 12–49 neutral; the label is 1 when the sequence holds more positive
than negative tokens, 0 when fewer, a coin flip on ties, and then 5% of the labels are flipped (label
noise, so that some training points are harmful). 256 training and 50 test sequences, padded on the
right to 16 with an attention mask. A batch is a dict {input_ids (b, 16), attention_mask (b, 16),
labels (b,)}: the model takes ``model(**{input_ids, attention_mask})``; ``loss_fn(outputs, labels)`` is
the mean cross-entropy of ``outputs.logits``.

Model: ``BertForSequenceClassification`` (hidden 16, 2 layers, 2 heads, intermediate 32, 16
positions, dropout 0, default attention implementation), 5,858 parameters, float32; trained with Adam
(lr 3e-3, batch 32, 12 epochs, seeded).

    python benchmarks/bert_task.py [--out PATH]   # train, report accuracy, save the weights
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

VOCAB, PAD, CLS, MAX_LEN = 50, 0, 1, 16
POSITIVE, NEGATIVE = range(2, 7), range(7, 12)
N_TRAIN, N_TEST = 256, 50
CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=MAX_LEN,
    type_vocab_size=1,
    num_labels=2,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    pad_token_id=PAD,
)
TRAINING = dict(epochs=12, lr=3e-3, batch_size=32, seed=0)
DATA_SEED = 0
DEFAULT_WEIGHTS = Path(tempfile.gettempdir()) / "infscale-bert-task.pt"


def make_data(seed: int = DATA_SEED) -> dict[str, dict[str, Tensor]]:
    """{"train": batch of all 256 training sequences, "test": all 50 test sequences}; each a dict
    {input_ids (n, 16) int64, attention_mask (n, 16) int64, labels (n,) int64}."""
    rng = np.random.default_rng(seed)
    n = N_TRAIN + N_TEST
    ids = np.zeros((n, MAX_LEN), dtype=np.int64)
    mask = np.zeros((n, MAX_LEN), dtype=np.int64)
    labels = np.zeros(n, dtype=np.int64)
    for i in range(n):
        length = int(rng.integers(6, MAX_LEN + 1))
        tokens = rng.integers(2, VOCAB, size=length - 1)
        ids[i, 0], ids[i, 1:length], mask[i, :length] = CLS, tokens, 1
        pos = np.isin(tokens, POSITIVE).sum()
        neg = np.isin(tokens, NEGATIVE).sum()
        labels[i] = 1 if pos > neg else 0 if pos < neg else int(rng.integers(0, 2))
    flip = rng.random(n) < 0.05
    labels[flip] = 1 - labels[flip]
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    whole = {"input_ids": t(ids), "attention_mask": t(mask), "labels": t(labels)}
    return {
        "train": {k: v[:N_TRAIN] for k, v in whole.items()},
        "test": {k: v[N_TRAIN:] for k, v in whole.items()},
    }


def build_model(seed: int = TRAINING["seed"], dtype: torch.dtype = torch.float32) -> nn.Module:
    """A freshly initialized ``BertForSequenceClassification`` from ``CONFIG`` (seeded)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**CONFIG)).to(dtype)


def loss_fn(outputs, labels: Tensor) -> Tensor:
    """Mean cross-entropy of ``outputs.logits`` (or of a logits tensor)."""
    logits = outputs if isinstance(outputs, Tensor) else outputs["logits"]
    return nn.functional.cross_entropy(logits, labels)


def inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The model's keyword arguments of a batch (everything but "labels")."""
    return {k: v for k, v in batch.items() if k != "labels"}


def batches(data: dict[str, Tensor], batch_size: int) -> list[dict[str, Tensor]]:
    """Consecutive dict batches of ``data`` (infscale's dict-batch convention)."""
    n = len(data["labels"])
    return [{k: v[s : s + batch_size] for k, v in data.items()} for s in range(0, n, batch_size)]


def train(
    model: nn.Module,
    data: dict[str, Tensor],
    indices: np.ndarray | None = None,
    epochs: int = TRAINING["epochs"],
    lr: float = TRAINING["lr"],
    batch_size: int = TRAINING["batch_size"],
    seed: int = TRAINING["seed"],
) -> nn.Module:
    """Adam on the mean loss over ``data`` (restricted to ``indices``), shuffled minibatches drawn
    from a generator seeded by ``seed``; returns ``model.eval()``."""
    idx = torch.arange(len(data["labels"])) if indices is None else torch.as_tensor(indices)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = idx[torch.randperm(len(idx), generator=g)]
        for s in range(0, len(perm), batch_size):
            b = perm[s : s + batch_size]
            opt.zero_grad()
            loss_fn(model(**{k: v[b] for k, v in inputs(data).items()}), data["labels"][b]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def per_example_losses(model: nn.Module, data: dict[str, Tensor]) -> np.ndarray:
    """(n,) float64 cross-entropy of every example of ``data``."""
    logits = model(**inputs(data)).logits
    return nn.functional.cross_entropy(logits, data["labels"], reduction="none").double().numpy()


@torch.no_grad()
def accuracy(model: nn.Module, data: dict[str, Tensor]) -> float:
    return float((model(**inputs(data)).logits.argmax(1) == data["labels"]).float().mean())


def trained_model(path: Path | str = DEFAULT_WEIGHTS) -> tuple[nn.Module, dict]:
    """Trains the task's model on all training data and saves {"state_dict", "config", "training"} to
    ``path``; returns (model in eval mode, info with accuracies, seconds and path)."""
    data = make_data()
    t0 = time.perf_counter()
    model = train(build_model(), data["train"])
    seconds = time.perf_counter() - t0
    torch.save({"state_dict": model.state_dict(), "config": CONFIG, "training": TRAINING}, path)
    info = {
        "path": str(path),
        "train_seconds": seconds,
        "train_accuracy": accuracy(model, data["train"]),
        "test_accuracy": accuracy(model, data["test"]),
        "n_parameters": sum(p.numel() for p in model.parameters()),
    }
    return model, info


def load_model(path: Path | str = DEFAULT_WEIGHTS, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model saved by ``trained_model`` (eval mode), in ``dtype``."""
    saved = torch.load(path, weights_only=True)
    if saved["config"] != CONFIG:
        raise ValueError(
            f"load_model(): {path} holds a model of config {saved['config']}, expected {CONFIG}."
        )
    model = build_model()
    model.load_state_dict(saved["state_dict"])
    return model.to(dtype).eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_WEIGHTS), help="where to save the trained weights")
    args = parser.parse_args()
    torch.set_num_threads(1)
    _, info = trained_model(args.out)
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
