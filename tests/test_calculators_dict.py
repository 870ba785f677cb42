"""Both calculators with features that are mappings (``model(**x)``): a tiny BERT with dict batches
(input_ids, attention_mask, labels). The sequential calculator, to zarr and in memory, and the Dask
calculator (a dict of dask arrays with the row chunks of y) give the in-memory model's numbers, which
``tests/torch/test_inputs.py`` checks against an explicit float64 reference."""

from __future__ import annotations

import sys
from pathlib import Path

import dask
import numpy as np
import pytest
import torch
import zarr
from torch import nn
from torch.utils.data import DataLoader

from infscale import DaskInfluenceCalculator, DisableClientSingleThreadCheck, SequentialInfluenceCalculator
from infscale.errors import BatchFormatError
from infscale.torch import DirectInfluence
from infscale.torch.util import (
    NestedTorchCatAggregator,
    TorchCatAggregator,
    TorchNumpyConverter,
    torch_dataset_to_dask_array,
)

sys.path.insert(0, str(Path(__file__).parent / "torch"))
import real_models as rm  # noqa: E402
import references as ref  # noqa: E402

LAM = 0.1
WIDTH = 10  # the longest sequence of the tiny BERT's data
KEYS = ("input_ids", "attention_mask")


@pytest.fixture(scope="module")
def bert():
    """The tiny BERT, fitted (empirical Fisher: first order only), and its data as one list of
    samples padded to one length (what a tokenizer with padding='max_length' gives)."""
    pytest.importorskip("transformers")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    w = rm.tiny_bert()
    infl = DirectInfluence(w.model, w.loss_fn, LAM, second_order_mode="empirical_fisher").fit(w.train)
    samples = []
    for batch in [*w.train, *w.test]:
        for i in range(batch["labels"].shape[0]):
            length = int(batch["attention_mask"][i].sum())
            sample = {k: batch[k][i, :length] for k in ("input_ids", "attention_mask")}
            samples.append({**sample, "labels": batch["labels"][i]})
    yield w, infl, samples
    torch.set_num_threads(threads)


def _pad(samples: list[dict], width: int | None = None) -> dict:
    """A batch of samples padded (with 0) to ``width``, default the batch's longest sequence (what
    a tokenizer with padding='max_length', or a padding collate function, gives)."""
    width = width or max(len(s["input_ids"]) for s in samples)
    out = {k: torch.stack([nn.functional.pad(s[k], (0, width - len(s[k]))) for s in samples]) for k in KEYS}
    return {**out, "labels": torch.stack([s["labels"] for s in samples])}


def _in_memory(infl, test_batches, train_batches):
    return torch.cat(
        [
            torch.cat(
                [infl.influences(*ref.split_batch(t), *ref.split_batch(b)) for b in train_batches], dim=1
            )
            for t in test_batches
        ]
    )


def test_sequential_calculator_with_dict_batches(bert, tmp_path):
    """Batches padded each to its own length, as lists and as DataLoaders over dict samples."""
    w, infl, samples = bert
    calc = SequentialInfluenceCalculator(infl)
    expected = _in_memory(infl, w.test, w.train)
    lazy = calc.influences(w.test, w.train)
    torch.testing.assert_close(
        lazy.compute(aggregator=NestedTorchCatAggregator()), expected, rtol=1e-12, atol=0
    )
    # to zarr: batches of one size (the last may be smaller), each padded by the collate function
    train_loader = DataLoader(samples[:12], batch_size=5, collate_fn=_pad)
    test_loader = DataLoader(samples[12:], batch_size=3, collate_fn=_pad)
    lazy = calc.influences(test_loader, train_loader)
    lazy.to_zarr(tmp_path / "influences.zarr", TorchNumpyConverter(), progress=False)
    stored = zarr.open_array(tmp_path / "influences.zarr", mode="r")[...]
    expected_loaders = _in_memory(infl, list(test_loader), list(train_loader))
    np.testing.assert_allclose(stored, expected_loaders.numpy(), rtol=1e-12)
    assert _rel(expected_loaders, expected) < 1e-10  # padding is masked: the same numbers
    self_values = calc.self_influences(w.train).compute(TorchCatAggregator())
    torch.testing.assert_close(
        self_values,
        torch.cat([infl.self_influences(*ref.split_batch(b)) for b in w.train]),
        rtol=1e-12,
        atol=0,
    )
    factors = calc.influence_factors(w.test)
    from_factors = calc.influences_from_factors(factors, w.train).compute(
        aggregator=NestedTorchCatAggregator()
    )
    assert _rel(from_factors, expected) < 1e-10
    # default collation of dict samples of one length gives dict batches with "labels"
    padded = [{k: v[0] for k, v in _pad([s], WIDTH).items()} for s in samples]
    train_loader = DataLoader(padded[:12], batch_size=5)
    got = calc.influences(w.test, train_loader).compute(aggregator=NestedTorchCatAggregator())
    assert _rel(got, expected) < 1e-10
    with pytest.raises(BatchFormatError, match="perturbation"):
        calc.influences(w.test, w.train, mode="perturbation")


def test_dask_calculator_with_a_dict_of_arrays(bert):
    w, infl, samples = bert
    padded = [{k: v[0] for k, v in _pad([s], WIDTH).items()} for s in samples]
    x, y = torch_dataset_to_dask_array(padded[:12], chunk_size=5)
    x_test, y_test = torch_dataset_to_dask_array(padded[12:], chunk_size=3)
    assert set(x) == {"input_ids", "attention_mask"} and x["input_ids"].shape == (12, WIDTH)
    assert x["input_ids"].chunks[0] == x["attention_mask"].chunks[0] == y.chunks[0] == (5, 5, 2)
    with pytest.warns(UserWarning, match="thread-safety check is off"):
        calc = DaskInfluenceCalculator(infl, TorchNumpyConverter(), DisableClientSingleThreadCheck)
    train_batches = [_pad(samples[s : min(s + 5, 12)], WIDTH) for s in (0, 5, 10)]
    test_batches = [_pad(samples[12:], WIDTH)]
    expected = _in_memory(infl, test_batches, train_batches)
    with dask.config.set(scheduler="synchronous"):
        influences, self_values, factors = dask.compute(
            calc.influences(x_test, y_test, x, y),
            calc.self_influences(x, y),
            calc.influence_factors(x_test, y_test),
        )
        from_factors = calc.influences_from_factors(calc.influence_factors(x_test, y_test), x, y).compute()
    np.testing.assert_allclose(influences, expected.numpy(), rtol=1e-12)
    assert _rel(torch.from_numpy(from_factors), expected) < 1e-10
    self_expected = torch.cat([infl.self_influences(*ref.split_batch(b)) for b in train_batches])
    np.testing.assert_allclose(self_values, self_expected.numpy(), rtol=1e-12)
    factors_expected = infl.influence_factors(*ref.split_batch(test_batches[0]))
    assert _rel(torch.from_numpy(factors), factors_expected) < 1e-12
    assert _rel(expected, _in_memory(infl, w.test, w.train)) < 1e-10  # padding is masked
    with pytest.raises(BatchFormatError, match="perturbation"):
        calc.influences(x_test, y_test, x, y, mode="perturbation")


@pytest.mark.filterwarnings("ignore:Sending large graph")  # DirectInfluence holds two p × p matrices
def test_dask_dict_features_on_a_distributed_client(bert):
    """The dict of block keys in each task resolves on distributed's scheduler too."""
    distributed = pytest.importorskip("distributed")
    w, infl, samples = bert
    padded = [{k: v[0] for k, v in _pad([s], WIDTH).items()} for s in samples]
    x, y = torch_dataset_to_dask_array(padded[:12], chunk_size=4)
    with distributed.Client(
        processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None
    ) as client:
        calc = DaskInfluenceCalculator(infl, TorchNumpyConverter(), client)
        got = calc.influences(x, y).compute()
    train = _pad(samples[:12], WIDTH)
    np.testing.assert_allclose(got, infl.influences(*ref.split_batch(train)).numpy(), rtol=1e-12)


def test_samples_of_different_lengths_are_named(bert):
    _, _, samples = bert
    ragged = [{k: v[0] for k, v in _pad([s], WIDTH).items()} for s in samples[:4]]
    ragged[2] = {k: (v[:7] if v.ndim else v) for k, v in ragged[2].items()}
    x, _ = torch_dataset_to_dask_array(ragged, chunk_size=4)
    with pytest.raises(BatchFormatError, match=r"\['input_ids'\] of row 2 has shape \(7,\).*pad"):
        x["input_ids"].compute(scheduler="synchronous")


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())
