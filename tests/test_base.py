"""The framework-free contract: modes, errors and the default train representation."""

import pytest

from infscale import InfluenceFunctionModel, InfluenceMode, NotFittedError, UnsupportedInfluenceModeError


class Toy(InfluenceFunctionModel):
    """influences = Σ_features x_test · x_train (a dot product), enough to exercise the contract."""

    def __init__(self):
        self.fitted = False

    @property
    def is_fitted(self):
        return self.fitted

    @property
    def is_thread_safe(self):
        return True

    @property
    def n_parameters(self):
        return 1

    def fit(self, data):
        self.fitted = True
        return self

    def influence_factors(self, x, y):
        self._require_fitted("influence_factors")
        return x

    def influences_from_factors(self, z_test_factors, x, y, mode=InfluenceMode.Up):
        self._require_fitted("influences_from_factors")
        self._parse_mode(mode, "influences_from_factors")
        return [[sum(a * b for a, b in zip(f, t)) for t in x] for f in z_test_factors]

    def influences(self, x_test, y_test, x=None, y=None, mode=InfluenceMode.Up):
        self._require_fitted("influences")
        if (x is None) != (y is None):
            raise ValueError("give both x and y")
        return self.influences_from_factors(x_test, x_test if x is None else x, y, mode)

    def self_influences(self, x, y, mode=InfluenceMode.Up):
        return [sum(a * a for a in row) for row in x]


def test_mode_parsing():
    assert InfluenceMode.parse("up") is InfluenceMode.Up
    assert InfluenceMode.parse("perturbation") is InfluenceMode.Perturbation
    assert InfluenceMode.parse(InfluenceMode.Up) is InfluenceMode.Up
    assert InfluenceMode.Up == "up"  # a str enum: plain strings compare equal
    for bad in ("UP", "Up", "upweighting", "", None, 0, InfluenceMode):
        with pytest.raises(UnsupportedInfluenceModeError, match="expected one of 'up', 'perturbation'"):
            InfluenceMode.parse(bad)


def test_error_messages_name_class_and_method():
    e = NotFittedError(Toy, "influences")
    assert isinstance(e, ValueError)
    assert "Toy.influences() was called before fit()" in str(e) and "Toy.fit(" in str(e)
    e = UnsupportedInfluenceModeError("sideways", Toy, "influences")
    assert isinstance(e, ValueError)
    assert str(e).startswith("Toy.influences(): unsupported influence mode 'sideways'")


def test_contract_defaults():
    model = Toy()
    with pytest.raises(NotFittedError, match=r"Toy\.influences\(\)"):
        model.influences([[1.0]], [0])
    model.fit(None)
    x, y = [[1.0, 2.0], [0.0, 1.0]], [0, 1]
    representation = model.train_representation(x, y)
    assert representation == (x, y)  # the default: the data itself
    factors = model.influence_factors([[1.0, 1.0]], [0])
    assert model.influences_from_representation(factors, representation) == [[3.0, 1.0]]
    with pytest.raises(UnsupportedInfluenceModeError, match=r"Toy\.train_representation\(\)"):
        model.train_representation(x, y, mode="down")
    with pytest.raises(UnsupportedInfluenceModeError, match=r"Toy\.influences_from_factors\(\)"):
        model.influences_from_representation(factors, representation, mode="down")
