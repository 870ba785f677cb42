"""`infscale run` with a factory returning a HuggingFace model and datasets of dict samples."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

pytest.importorskip("transformers")

HERE = Path(__file__).resolve().parent


@pytest.fixture
def factories(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    sys.modules.pop("hf_factories", None)
    import hf_factories

    return hf_factories


@pytest.mark.parametrize("scheduler", ["sync", "local:1"])
def test_run_on_a_hf_model_with_dict_samples(factories, tmp_path, monkeypatch, scheduler):
    from torch.utils.data import DataLoader

    from infscale.cli import main
    from infscale.torch import DirectInfluence

    monkeypatch.chdir(HERE)
    out = tmp_path / "hf.zarr"
    args = [
        "run", "--model", "hf_factories:bert", "--data", "hf_factories:data", "--method", "direct",
        "--param", "hessian_regularization=0.5", "--param", "second_order_mode=gauss_newton",
        "--batch-size", "4", "--out", str(out), "--scheduler", scheduler, "--no-progress",
    ]  # fmt: skip
    assert main(args) == 0
    stored = zarr.open_group(str(out), mode="r")["influences"][:]

    model, loss = factories.bert()
    train, test = factories.data()
    infl = DirectInfluence(model, loss, 0.5, second_order_mode="gauss_newton")
    infl.fit(DataLoader(train, batch_size=4))
    x = {"input_ids": train.ids, "attention_mask": train.mask}
    x_test = {"input_ids": test.ids, "attention_mask": test.mask}
    expected = infl.influences(x_test, test.labels, x, train.labels).numpy()
    assert stored.shape == (4, 10)
    np.testing.assert_allclose(stored, expected, rtol=1e-8, atol=1e-12)
    assert torch.isfinite(torch.from_numpy(stored)).all()
