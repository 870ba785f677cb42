"""Declared settings: every method records exactly the settings it declares, as JSON, so that a stored
result can be compared with a later computation."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from infscale.torch import (
    ArnoldiInfluence,
    BlockMode,
    CgInfluence,
    DirectInfluence,
    EkfacInfluence,
    InverseHarmonicMeanInfluence,
    JacobiPreconditioner,
    LissaInfluence,
    NystroemPreconditioner,
    NystroemSketchInfluence,
    SecondOrderMode,
)
from infscale.torch.settings import encode_setting

CE = nn.functional.cross_entropy


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


METHODS = {
    "direct": lambda m: DirectInfluence(m, CE, 0.1, block_structure="LAYER_WISE"),
    "cg": lambda m: CgInfluence(m, CE, 0.1, preconditioner=NystroemPreconditioner(rank=3), maxiter=7),
    "lissa": lambda m: LissaInfluence(m, CE, 0.1, scale=50.0, dampen=0.1),
    "arnoldi": lambda m: ArnoldiInfluence(m, CE, 0.1, rank=4, second_order_mode="gauss_newton"),
    "nystroem": lambda m: NystroemSketchInfluence(m, CE, {"model": 0.2}, rank=5, seed=3),
    "ihm": lambda m: InverseHarmonicMeanInfluence(m, CE, 0.1),
    "ekfac": lambda m: EkfacInfluence(m, update_diagonal=False, fisher="exact", factor_dtype=torch.float32),
}

EXPECTED = {
    "direct": {
        "hessian_regularization": 0.1,
        "block_structure": "layer_wise",
        "second_order_mode": "hessian",
    },
    "cg": {
        "hessian_regularization": 0.1,
        "block_structure": "full",
        "second_order_mode": "hessian",
        "rtol": 1e-7,
        "atol": 1e-7,
        "maxiter": 7,
        "preconditioner": {"class": "NystroemPreconditioner", "rank": 3, "seed": 0},
    },
    "lissa": {
        "hessian_regularization": 0.1,
        "block_structure": "full",
        "second_order_mode": "hessian",
        "maxiter": 1000,
        "dampen": 0.1,
        "scale": 50.0,
        "rtol": 1e-4,
    },
    "arnoldi": {
        "hessian_regularization": 0.1,
        "block_structure": "full",
        "second_order_mode": "gauss_newton",
        "rank": 4,
        "krylov_dimension": None,
        "tol": 1e-4,
        "max_iter": None,
        "block_size": None,
        "seed": 0,
        "use_woodbury": False,
    },
    "nystroem": {
        "hessian_regularization": {"model": 0.2},
        "block_structure": "full",
        "second_order_mode": "hessian",
        "rank": 5,
        "seed": 3,
    },
    "ihm": {"hessian_regularization": 0.1, "block_structure": "full"},
    "ekfac": {
        "hessian_regularization": 0.0,
        "block_structure": {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]},
        "second_order_mode": "gauss_newton",
        "update_diagonal": False,
        "loss_type": "cross_entropy",
        "fisher": "exact",
        "seed": 0,
        "factor_dtype": "float32",
        "skipped_modules": [],
    },
}


@pytest.mark.parametrize("method", list(METHODS))
def test_hyperparameters_are_the_declared_settings_as_json(method):
    infl = METHODS[method](model())
    record = infl.hyperparameters()
    assert list(record) == list(type(infl).settings)
    assert record == EXPECTED[method]
    assert json.loads(json.dumps(record)) == record


def test_encode_setting():
    assert encode_setting(BlockMode.LAYER_WISE) == "layer_wise"
    assert encode_setting(SecondOrderMode.EMPIRICAL_FISHER) == "empirical_fisher"
    assert encode_setting(torch.bfloat16) == "bfloat16"
    assert encode_setting({"a": (1, 2.5), 3: [None, True]}) == {"a": [1, 2.5], "3": [None, True]}
    assert encode_setting(JacobiPreconditioner(2, seed=1)) == {
        "class": "JacobiPreconditioner",
        "num_samples_estimator": 2,
        "seed": 1,
    }
    with pytest.raises(TypeError, match="recordable.*object"):
        encode_setting(object())


def test_fingerprint_follows_parameters_buffers_and_settings(tmp_path):
    """A retrained model (one parameter nudged) or a changed buffer or setting gives another
    fingerprint; a resume of a store written with the first is refused, naming the model."""
    import numpy as np
    from torch.utils.data import DataLoader, TensorDataset

    from infscale import SequentialInfluenceCalculator
    from infscale.errors import StoreMismatchError
    from infscale.torch import DirectInfluence
    from infscale.torch.util import TorchNumpyConverter

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    model = model.double().eval()
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randint(0, 2, (12,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    loss = torch.nn.functional.cross_entropy
    first = DirectInfluence(model, loss, 0.5).fit(loader)
    assert first.fingerprint() == DirectInfluence(model, loss, 0.5).fingerprint()
    assert first.fingerprint() != DirectInfluence(model, loss, 0.6).fingerprint()
    path = tmp_path / "s.zarr"
    lazy = SequentialInfluenceCalculator(first).influences(loader, loader)
    lazy.to_zarr(str(path), TorchNumpyConverter(), progress=False)
    before = sorted(p.name for p in path.rglob("*"))
    retrained = copy.deepcopy(model)
    with torch.no_grad():
        retrained[0].weight[0, 0] += 1e-6
    with pytest.raises(StoreMismatchError, match="model's parameters or buffers changed"):
        calc = SequentialInfluenceCalculator(DirectInfluence(retrained, loss, 0.5).fit(loader))
        calc.influences(loader, loader).to_zarr(str(path), TorchNumpyConverter(), resume=True, progress=False)
    assert sorted(p.name for p in path.rglob("*")) == before
    other_buffer = copy.deepcopy(model)
    other_buffer[1].running_mean += 1.0
    assert DirectInfluence(other_buffer, loss, 0.5).fingerprint() != first.fingerprint()
    assert np.isfinite(first.influences(x, y).numpy()).all()
