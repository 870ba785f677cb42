"""infscale.app.registry: method names, typed parameters, and building a method by keyword."""

from __future__ import annotations

import pytest
from torch import nn
from torch.nn import functional as F

import infscale.torch as it
from infscale.app.registry import (
    METHODS,
    available_methods,
    make_influence_model,
    parse_param,
    parse_params,
    resolve_method,
)
from infscale.errors import UsageError


def test_every_method_resolves_by_short_name_class_name_and_alias():
    methods = available_methods()
    assert set(methods) == set(METHODS)  # every class of the table exists in infscale.torch
    for short, cls in methods.items():
        assert cls is getattr(it, METHODS[short])
        assert resolve_method(short) == (short, cls)
        assert resolve_method(f"  {cls.__name__.lower()} ") == (short, cls)
    assert resolve_method("datainf")[1] is it.InverseHarmonicMeanInfluence
    assert resolve_method("Nystroem-Sketch")[1] is it.NystroemSketchInfluence


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(
        UsageError, match=r"--method: unknown method 'magic'; available: direct \(DirectInfluence\)"
    ):
        resolve_method("magic")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("rank=64", ("rank", 64)),
        ("x= 1e-3 ", ("x", 1e-3)),
        ("flag=FALSE", ("flag", False)),
        ("maxiter=null", ("maxiter", None)),
        ("mode=layer_wise", ("mode", "layer_wise")),
        ("lam=[1, 2]", ("lam", [1, 2])),
        ("s==x", ("s", "=x")),
    ],
)
def test_parse_param_types_values(text, expected):
    assert parse_param(text) == expected
    assert type(parse_param(text)[1]) is type(expected[1])


@pytest.mark.parametrize(
    "text, message", [("rank", "expected key=value"), ("1x=3", "not a valid parameter name")]
)
def test_parse_param_errors(text, message):
    with pytest.raises(UsageError, match=message):
        parse_param(text)


def test_parse_params_later_key_wins():
    assert parse_params(["a=1", "b=2", "a=3"]) == {"a": 3, "b": 2}
    assert parse_params(None) == {}


def test_ekfac_gets_the_loss_by_keyword():
    """EkfacInfluence's second positional parameter is update_diagonal: passed positionally, the loss
    would become update_diagonal and the loss type would stay the default (cross-entropy)."""
    model = nn.Linear(3, 1).double()
    infl = make_influence_model("ekfac", model, F.mse_loss)
    assert infl.loss_type.value == "mse" and infl.update_diagonal is True
    infl = make_influence_model("EkfacInfluence", model, F.mse_loss, {"update_diagonal": False})
    assert infl.loss_type.value == "mse" and infl.update_diagonal is False


def test_make_influence_model_checks_parameters():
    model = nn.Linear(3, 1).double()
    direct = make_influence_model("direct", model, F.mse_loss, {"hessian_regularization": 0.5})
    assert isinstance(direct, it.DirectInfluence) and direct.hessian_regularization == 0.5
    with pytest.raises(
        UsageError, match=r"DirectInfluence has no parameter 'rnak'; it takes: hessian_regularization"
    ):
        make_influence_model("direct", model, F.mse_loss, {"rnak": 3})
    with pytest.raises(UsageError, match=r"--param: DirectInfluence\(hessian_regularization=-1\) rejected"):
        make_influence_model("direct", model, F.mse_loss, {"hessian_regularization": -1})
