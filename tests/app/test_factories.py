"""infscale.app.factories: importing the user's factories and checking what they return."""

from __future__ import annotations

import textwrap

import pytest
import torch

from infscale.app.factories import load_data, load_factory, load_model
from infscale.errors import UsageError

MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.utils.data import Dataset, TensorDataset

    VALUE = 3

    class Make:
        @staticmethod
        def model():
            return nn.Linear(2, 1), nn.functional.mse_loss

    def model():
        return nn.Linear(2, 1), nn.functional.mse_loss

    def data():
        x = torch.zeros(5, 2)
        return TensorDataset(x, x[:, 0]), TensorDataset(x[:2], x[:2, 0])

    def three():
        return 1, 2, 3

    def no_loss():
        return nn.Linear(2, 1), "mse"

    def empty():
        one = TensorDataset(torch.zeros(1, 2), torch.zeros(1))
        return TensorDataset(torch.zeros(0, 2), torch.zeros(0)), one

    class Bare(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.zeros(2)  # not an (x, y) pair

    def bare():
        return Bare(), Bare()

    def broken():
        raise RuntimeError("the factory is broken")
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "user_factories.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_factories"


def test_load_factory_finds_functions_and_dotted_attributes(user_module):
    assert load_factory(f"{user_module}:model", "--model")()[0].in_features == 2
    assert load_factory(f"{user_module}:Make.model", "--model")()[0].out_features == 1


@pytest.mark.parametrize(
    "spec, message",
    [
        ("user_factories", "--model: expected package.module:function; got 'user_factories'"),
        ("a:b:c", "expected package.module:function"),
        (":model", "expected package.module:function"),
        ("no_such_module_xyz:f", "--model: cannot import module 'no_such_module_xyz' (ModuleNotFoundError"),
        ("user_factories:nope", "--model: module 'user_factories' has no attribute 'nope'"),
        ("user_factories:VALUE", "--model: 'user_factories:VALUE' is not callable (it is a int)"),
    ],
)
def test_load_factory_errors(user_module, spec, message):
    with pytest.raises(UsageError) as info:
        load_factory(spec, "--model")
    assert message in str(info.value)


def test_load_model_and_data_accept_what_they_should(user_module):
    model, loss = load_model(f"{user_module}:model")
    assert isinstance(model, torch.nn.Module) and loss is torch.nn.functional.mse_loss
    train, test = load_data(f"{user_module}:data")
    assert (len(train), len(test)) == (5, 2)


@pytest.mark.parametrize(
    "loader, name, message",
    [
        (load_model, "three", "must return a tuple (model, loss); got a tuple of 3 (int, int, int)"),
        (load_model, "data", "returned a model of type TensorDataset, not a torch.nn.Module"),
        (load_model, "no_loss", "returned a loss of type str, which is not callable"),
        (load_model, "broken", "--model: user_factories:broken() raised RuntimeError: the factory is broken"),
        (load_data, "three", "must return a tuple (train_dataset, test_dataset); got a tuple of 3"),
        (load_data, "model", "returned a train_dataset of type Linear; expected a torch.utils.data.Dataset"),
        (load_data, "empty", "returned an empty train_dataset"),
        (load_data, "bare", "items of train_dataset must be (x, y) pairs or mappings with 'labels'; item 0"),
    ],
)
def test_load_model_and_data_errors(user_module, loader, name, message):
    with pytest.raises(UsageError) as info:
        loader(f"{user_module}:{name}")
    assert message in str(info.value)
