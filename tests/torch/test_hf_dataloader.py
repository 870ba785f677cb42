"""Every method fitted from a plain DataLoader of dict samples (the HuggingFace way: a dataset of
dicts, a collator that pads each batch to its longest sequence) on a tiny BERT with the default
attention implementation, against the explicit float64 Gauss-Newton reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import real_models as rm  # noqa: E402
import references as ref  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from infscale.torch import (  # noqa: E402
    ArnoldiInfluence,
    CgInfluence,
    DirectInfluence,
    EkfacInfluence,
    InverseHarmonicMeanInfluence,
    LissaInfluence,
    NystroemSketchInfluence,
)

LAM = 0.5


def pad_collate(samples: list[dict]) -> dict:
    """What transformers' DataCollatorWithPadding does: pad each batch to its longest sequence."""
    width = max(len(s["input_ids"]) for s in samples)

    def pad(t, value):
        return torch.cat([t, t.new_full((width - len(t),), value)])

    return {
        "input_ids": torch.stack([pad(s["input_ids"], rm.PAD) for s in samples]),
        "attention_mask": torch.stack([pad(torch.ones_like(s["input_ids"]), 0) for s in samples]),
        "labels": torch.stack([s["labels"] for s in samples]),
    }


def samples_of(batches: list[dict]) -> list[dict]:
    out = []
    for b in batches:
        for ids, mask, label in zip(b["input_ids"], b["attention_mask"], b["labels"]):
            out.append({"input_ids": ids[mask.bool()], "labels": label})
    return out


@pytest.fixture(scope="module")
def bert():
    w = rm.tiny_bert()
    loader = DataLoader(samples_of(w.train), batch_size=5, collate_fn=pad_collate)
    batches = list(loader)
    expected = ref.exact_influences(w.model, w.loss_fn, batches, w.test, LAM, "gauss_newton")
    return w, loader, batches, expected


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


GN = {"second_order_mode": "gauss_newton"}
METHODS = {  # name: (constructor, relative tolerance against the exact answer, or None: Pearson r ≥ 0.9)
    "direct": (lambda m, l: DirectInfluence(m, l, LAM, **GN), 1e-6),
    "cg": (lambda m, l: CgInfluence(m, l, LAM, rtol=1e-10, atol=1e-12, **GN), 1e-6),
    # the Gauss-Newton matrix of 12 samples × 2 classes has rank ≤ 24 < 64: the low-rank methods are exact
    "arnoldi": (lambda m, l: ArnoldiInfluence(m, l, LAM, rank=64, **GN), 1e-6),
    "nystroem": (lambda m, l: NystroemSketchInfluence(m, l, LAM, rank=64, **GN), 1e-6),
    # LiSSA's mini-batch iteration leaves a noise floor (docs/methods.md): 3e-3 measured here
    "lissa": (lambda m, l: LissaInfluence(m, l, LAM, maxiter=400, scale=20.0, rtol=1e-8, **GN), 1e-2),
    "ihm": (lambda m, l: InverseHarmonicMeanInfluence(m, l, LAM), None),
    "ekfac": (
        lambda m, l: EkfacInfluence(m, loss=l, loss_family="cross_entropy", hessian_regularization=LAM),
        None,
    ),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_fits_on_a_dataloader_of_dict_batches(bert, name):
    w, loader, batches, expected = bert
    make, tolerance = METHODS[name]
    infl = make(w.model, w.loss_fn).fit(loader)
    test = w.test[0]
    x_test = {k: v for k, v in test.items() if k != "labels"}
    got = torch.cat(
        [infl.influences(x_test, test["labels"], {k: v for k, v in b.items() if k != "labels"}, b["labels"])
         for b in batches],
        dim=1,
    )  # fmt: skip
    assert got.shape == expected.shape and bool(torch.isfinite(got).all())
    if tolerance is not None:
        error = float(torch.linalg.norm(got - expected) / torch.linalg.norm(expected))
        assert error < tolerance, error
    else:  # approximations of the curvature (IHM, EK-FAC): the ranking agrees
        assert _pearson(got, expected) >= 0.9


def test_ekfac_builtin_loss_reads_the_logits_of_an_output_object(bert):
    """``loss="cross_entropy"`` (EK-FAC's default) on a model returning a SequenceClassifierOutput:
    the built-in loss is applied to ``.logits``, the same numbers as the explicit callable."""
    w, loader, batches, _ = bert
    by_name = EkfacInfluence(w.model, hessian_regularization=LAM, fisher="exact").fit(loader)
    by_callable = EkfacInfluence(
        w.model, loss=w.loss_fn, loss_family="cross_entropy", hessian_regularization=LAM, fisher="exact"
    ).fit(loader)
    test = w.test[0]
    x_test = {k: v for k, v in test.items() if k != "labels"}
    assert torch.allclose(
        by_name.influences(x_test, test["labels"]), by_callable.influences(x_test, test["labels"]), rtol=1e-10
    )
