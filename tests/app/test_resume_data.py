"""`infscale run --resume` refuses data that changed since the run started (same shapes), whichever
scheduler computes the blocks: the group records a digest of each dataset."""

from __future__ import annotations

import textwrap

import pytest

from infscale.cli import main

FACTORIES = textwrap.dedent(
    """
    import os

    import torch
    from torch import nn
    from torch.utils.data import TensorDataset


    def model():
        torch.manual_seed(0)
        return nn.Linear(3, 1).double(), nn.functional.mse_loss


    def data():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(30, 3, generator=g, dtype=torch.float64)
        y = torch.randn(30, 1, generator=g, dtype=torch.float64)
        if "INFSCALE_TEST_CHANGED_ROW" in os.environ:  # one row nudged: same shapes, other data
            x[int(os.environ["INFSCALE_TEST_CHANGED_ROW"])] += 1.0
        return TensorDataset(x[:20], y[:20]), TensorDataset(x[20:], y[20:])
    """
)


@pytest.mark.parametrize("row, side", [(3, "train_data_digest"), (25, "test_data_digest")])
def test_resume_with_changed_data_is_refused(tmp_path, monkeypatch, capsys, row, side):
    (tmp_path / "resume_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("INFSCALE_TEST_CHANGED_ROW", raising=False)
    out = tmp_path / "r.zarr"
    args = [
        "run", "--model", "resume_factories:model", "--data", "resume_factories:data", "--method", "direct",
        "--param", "hessian_regularization=0.1", "--batch-size", "5", "--out", str(out), "--no-progress",
    ]  # fmt: skip
    assert main(args) == 0
    assert main([*args, "--resume"]) == 0  # the same data: nothing to refuse
    capsys.readouterr()
    monkeypatch.setenv("INFSCALE_TEST_CHANGED_ROW", str(row))
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert side in err and "StoreMismatchError" in err
