"""Factories for `infscale run` on a HuggingFace model and a dataset of dict samples (the way a
tokenized datasets.Dataset yields them: input_ids, attention_mask, labels, padded to one length)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

WIDTH = 8


class DictSamples(Dataset):
    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 30, (n, WIDTH), generator=g)
        lengths = torch.randint(3, WIDTH + 1, (n,), generator=g)
        self.mask = (torch.arange(WIDTH)[None, :] < lengths[:, None]).long()
        self.ids = self.ids * self.mask
        self.labels = (self.ids == 2).any(1).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=WIDTH, type_vocab_size=1, num_labels=2, pad_token_id=0,
    )  # fmt: skip
    model = BertForSequenceClassification(config).double().eval()
    return model, lambda out, y: F.cross_entropy(out.logits, y)


def data():
    return DictSamples(10, seed=1), DictSamples(4, seed=2)
