"""Nothing wrong in silence: every method refuses, with a named ``UserFixableError`` and a one-line
message, what would otherwise give wrong numbers or a 20-frame traceback: NaN/inf in data,
parameters, buffers or the loss; a model in training mode with dropout or batch norm; data that the
user's model or loss cannot take; batches whose format would have to be guessed."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from infscale.errors import (
    BatchFormatError,
    FeatureShapeError,
    ModelInputError,
    NonFiniteError,
    TrainingModeError,
    UserFixableError,
)
from infscale.torch import (
    ArnoldiInfluence,
    CgInfluence,
    DirectInfluence,
    EkfacInfluence,
    InverseHarmonicMeanInfluence,
    LissaInfluence,
    NystroemSketchInfluence,
)

torch.set_num_threads(1)
DT = torch.float64
CE = nn.functional.cross_entropy
LAM = 2.0  # the random networks' Hessians are indefinite
SIZES = (4, 4, 3)  # batch 2 has a size no other batch (or merge of batches) has

METHODS = {
    "direct": lambda m, loss: DirectInfluence(m, loss, LAM),
    "cg": lambda m, loss: CgInfluence(m, loss, LAM, maxiter=3),
    "lissa": lambda m, loss: LissaInfluence(m, loss, LAM, maxiter=3),
    "arnoldi": lambda m, loss: ArnoldiInfluence(m, loss, LAM, rank=2),
    "nystroem": lambda m, loss: NystroemSketchInfluence(m, loss, LAM, rank=2),
    "inverse_harmonic_mean": lambda m, loss: InverseHarmonicMeanInfluence(m, loss, LAM),
    "ekfac": lambda m, loss: EkfacInfluence(m, hessian_regularization=LAM),
}


def mlp(*middle: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), *middle, nn.Tanh(), nn.Linear(5, 3)).to(DT)


def data(n: int = sum(SIZES), seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 2, (n,), generator=g)


def batches(x: Tensor, y: Tensor) -> list[tuple[Tensor, Tensor]]:
    out, s = [], 0
    for b in SIZES:
        out.append((x[s : s + b], y[s : s + b]))
        s += b
    return out


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text and isinstance(error.value, UserFixableError)
    return text


class RowSizes:
    """Forward pre-hook recording the number of rows of every plain tensor input the model sees."""

    def __init__(self, model: nn.Module):
        self.seen: set[int] = set()
        model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        if args and isinstance(args[0], Tensor) and args[0].ndim == 2:
            self.seen.add(args[0].shape[0])


# ------------------------------------------------------------------------------ NaN and inf
@pytest.mark.parametrize("method", METHODS)
def test_nan_in_a_training_batch_is_named_before_the_model_sees_it(method):
    model = mlp()
    rows = RowSizes(model)
    x, y = data()
    x[9, 2] = float("nan")  # batch 2, row 1
    with pytest.raises(NonFiniteError) as error:  # CG and LiSSA read the data at the first query
        METHODS[method](model, CE).fit(batches(x, y)).influences(x[:2], y[:2], x[:2], y[:2])
    assert "data batch 2" in one_line(error) and "rows [1]" in str(error.value)
    assert not rows.seen & {3, 11}  # neither batch 2 nor a merge holding it reached the model


@pytest.mark.parametrize("method", METHODS)
def test_nan_in_query_inputs_and_parameters_is_named(method):
    model = mlp()
    x, y = data()
    infl = METHODS[method](model, CE).fit(batches(x, y))
    x_test, y_test = data(6, seed=1)
    x_test[2, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"influences\(\): x_test .*rows \[2\]") as error:
        infl.influences(x_test, y_test, x, y)
    one_line(error)
    x_test[2, 0] = 0.0
    with torch.no_grad():
        model[2].weight[1, 1] = float("nan")  # in place, after fit: seen by the next query
    with pytest.raises(NonFiniteError, match="parameter '2.weight'"):
        infl.self_influences(x_test, y_test)
    with pytest.raises(NonFiniteError, match="parameter '2.weight'"):
        METHODS[method](model, CE).fit(batches(x, y))


def test_nan_targets_buffers_and_mapping_features_are_named():
    x, y = data()
    target = torch.randn(x.shape[0], 3, dtype=DT)
    target[5, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"data batch 1: y .*rows \[1\]"):
        DirectInfluence(mlp(), nn.functional.mse_loss, LAM).fit(batches(x, target))
    model = mlp(nn.BatchNorm1d(5)).eval()
    model[1].running_var[3] = float("inf")
    with pytest.raises(NonFiniteError, match="buffer '1.running_var'"):
        DirectInfluence(model, CE, LAM).fit(batches(x, y))

    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, features, scale):
            return self.net(features) * scale

    features = {"features": x, "scale": torch.ones(x.shape[0], 1, dtype=DT)}
    infl = DirectInfluence(DictModel(), CE, LAM).fit([{**features, "labels": y}])
    features["scale"][4, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"x\['scale'\] .*rows \[4\]"):
        infl.self_influences(features, y)


def _spiky_loss(outputs: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy, but infinite for every sample labelled 2."""
    return CE(outputs, y) * torch.where(y == 2, float("inf"), 1.0).mean()


def test_a_loss_that_is_not_finite_for_some_rows_is_named():
    x, y = data()
    bad = y.clone()
    bad[2] = 2
    with pytest.raises(NonFiniteError, match=r"loss is NaN or infinite on rows \[2\] of x") as error:
        DirectInfluence(mlp(), _spiky_loss, LAM).fit(batches(x, bad))
    one_line(error)
    infl = DirectInfluence(mlp(), _spiky_loss, LAM).fit(batches(x, y))
    x_test, y_test = data(6, seed=1)
    y_test[3] = 2  # row 0 is fine: found in the result, not by the probe of the first row
    with pytest.raises(NonFiniteError, match=r"rows \[3\] of x_test"):
        infl.influences(x_test, y_test, x, y)
    with pytest.raises(NonFiniteError, match=r"rows \[3\] of x"):
        infl.self_influences(x_test, y_test)
    with pytest.raises(NonFiniteError, match=r"rows \[3\] of x"):
        infl.influence_factors(x_test, y_test)


# ------------------------------------------------------------------------------ training mode
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("module", ["dropout", "batchnorm"])
def test_training_mode_dropout_or_batch_norm_is_refused(method, module):
    model = mlp(nn.Dropout(0.3) if module == "dropout" else nn.BatchNorm1d(5, affine=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = data()
    with pytest.raises(TrainingModeError, match=r"'1' \((Dropout|BatchNorm1d)\).*model\.eval\(\)") as error:
        METHODS[method](model, CE).fit(batches(x, y))
    one_line(error)
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    infl = METHODS[method](model.eval(), CE).fit(batches(x, y))  # eval mode: accepted
    model.train()
    with pytest.raises(TrainingModeError):
        infl.influences(x[:2], y[:2], x, y)


def test_training_mode_is_fine_without_such_modules_and_detected_in_forward_code():
    x, y = data()
    model = mlp()
    assert model.training
    DirectInfluence(model, CE, LAM).fit(batches(x, y))  # a plain MLP in train mode

    class Noisy(nn.Module):
        def forward(self, h):
            return h + 0.1 * torch.randn_like(h) if self.training else h

    with pytest.raises(TrainingModeError, match=r"'1' \(Noisy\)"):
        DirectInfluence(mlp(Noisy()), CE, LAM).fit(batches(x, y))
    DirectInfluence(mlp(nn.Dropout(0.0)), CE, LAM).fit(batches(x, y))  # dropout 0: the same function

    class Recurrent(nn.Module):
        def __init__(self, dropout: float):
            super().__init__()
            self.rnn = nn.GRU(4, 3, num_layers=2, dropout=dropout, batch_first=True)

        def forward(self, h):
            return self.rnn(h)[0][:, -1]

    sequences = torch.randn(6, 2, 4, dtype=DT)
    DirectInfluence(Recurrent(0.0).to(DT), CE, LAM).fit([(sequences, y[:6])])  # cuDNN needs train mode
    with pytest.raises(TrainingModeError, match=r"'rnn' \(GRU\)"):
        DirectInfluence(Recurrent(0.2).to(DT), CE, LAM).fit([(sequences, y[:6])])
    model = mlp(nn.Dropout(0.3)).eval()  # the decision's premise: eval mode is deterministic
    first = DirectInfluence(model, CE, LAM).fit(batches(x, y)).influences(x[:3], y[:3], x, y)
    second = DirectInfluence(model, CE, LAM).fit(batches(x, y)).influences(x[:3], y[:3], x, y)
    assert torch.equal(first, second)


# ------------------------------------------------------------------------------ the user's model and loss
def test_integer_features_for_a_float_model_are_named():
    x, y = data()
    expected = r"data batch 0.*x \(a tensor of shape \(4, 4\) and dtype int64\)"
    with pytest.raises(ModelInputError, match=expected):
        DirectInfluence(mlp(), CE, LAM).fit(batches(x.long(), y))
    infl = DirectInfluence(mlp(), CE, LAM).fit(batches(x, y))
    with pytest.raises(ModelInputError, match=r"x_test \(.*int64\).*RuntimeError") as error:
        infl.influences(x[:3].long(), y[:3], x, y)
    one_line(error)
    assert isinstance(error.value.__cause__, RuntimeError)  # torch's error is kept, not swallowed


def test_float_labels_for_cross_entropy_are_named():
    x, y = data()
    with pytest.raises(ModelInputError, match=r"y \(a tensor of shape \(4,\) and dtype float64\)"):
        CgInfluence(mlp(), CE, LAM).fit(batches(x, y.to(DT)))


def test_targets_the_loss_would_broadcast_are_refused():
    x, _ = data()
    model = nn.Sequential(nn.Linear(4, 1)).to(DT)
    target = torch.randn(x.shape[0], dtype=DT)  # (n,) against outputs (n, 1)
    with pytest.raises(ModelInputError, match="broadcasts y") as error:
        DirectInfluence(model, nn.functional.mse_loss, LAM).fit(batches(x, target))
    one_line(error)
    infl = DirectInfluence(model, nn.functional.mse_loss, LAM).fit(batches(x, target[:, None]))
    with pytest.raises(ModelInputError, match="broadcasts y_test"):
        infl.influences(x[:3], target[:3], x, target[:, None])


def test_features_of_another_width_are_named():
    x, y = data()
    infl = DirectInfluence(mlp(), CE, LAM).fit(batches(x, y))
    with pytest.raises(FeatureShapeError, match=r"x_test has feature shape \(5,\).*\(4,\)") as error:
        infl.influences(torch.zeros(3, 5, dtype=DT), y[:3], x, y)
    one_line(error)
    # token ids may be padded to another length; a model that cannot take it is named by the probe
    token_model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3)).to(DT)
    ids = torch.randint(0, 10, (6, 3))
    infl = DirectInfluence(token_model, CE, LAM).fit([(ids, y[:6])])
    with pytest.raises(ModelInputError, match=r"x_test \(a tensor of shape \(2, 4\) and dtype int64\)"):
        infl.influences(torch.randint(0, 10, (2, 4)), y[:2], ids, y[:6])

    class Keywords(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, features, ids):
            return self.net(features) + ids[:, :1]

    features = {"features": x[:6], "ids": ids}
    infl = DirectInfluence(Keywords(), CE, LAM).fit([{**features, "labels": y[:6]}])
    with pytest.raises(FeatureShapeError, match=r"x\['features'\] has feature shape \(3,\)"):
        infl.self_influences({"features": x[:6, :3], "ids": ids}, y[:6])
    with pytest.raises(FeatureShapeError, match="fitted on a mapping"):
        infl.self_influences({"features": x[:6]}, y[:6])
    infl.self_influences({"features": x[:2], "ids": torch.randint(0, 10, (2, 5))}, y[:2])  # padding


def test_other_errors_and_warnings_of_the_users_code_are_not_swallowed():
    x, y = data()

    class Broken(nn.Module):
        def forward(self, h):
            raise ZeroDivisionError("a bug in the model")

    with pytest.raises(ModelInputError, match="ZeroDivisionError: a bug in the model") as error:
        DirectInfluence(mlp(Broken()), CE, LAM).fit(batches(x, y))
    assert isinstance(error.value.__cause__, ZeroDivisionError)

    class Chatty(nn.Module):
        calls = 0

        def forward(self, h):
            Chatty.calls += 1
            if Chatty.calls == 1:  # only in its first call: the probe's
                warnings.warn("a note from the model", UserWarning, stacklevel=1)
            return h

    with pytest.warns(UserWarning, match="a note from the model"):
        DirectInfluence(mlp(Chatty()), CE, LAM).fit(batches(x, y))
    with pytest.raises(ModelInputError, match="scalar.*reduction='none'"):
        DirectInfluence(mlp(), lambda o, t: CE(o, t, reduction="none"), LAM).fit(batches(x, y))


# ------------------------------------------------------------------------------ batch formats
def test_batches_and_features_that_would_need_a_guess_are_refused():
    x, y = data()
    with pytest.raises(BatchFormatError, match="length 3") as error:
        DirectInfluence(mlp(), CE, LAM).fit([(x, x, y)])
    one_line(error)
    with pytest.raises(BatchFormatError, match="no 'labels'"):
        DirectInfluence(mlp(), CE, LAM).fit([{"input": x, "target": y}])
    infl = DirectInfluence(mlp(), CE, LAM).fit(batches(x, y))
    with pytest.raises(BatchFormatError, match="same number of rows"):
        infl.influences(x[:3], y[:2], x, y)
    with pytest.raises(TypeError, match="torch.Tensor or a mapping"):  # also a TypeError, as before
        infl.self_influences(x.tolist(), y)
    with pytest.raises(FeatureShapeError, match="mapping"):
        infl.self_influences({"x": x}, y)
    token_model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3)).to(DT)
    ids = torch.randint(0, 10, (6, 3))
    infl = DirectInfluence(token_model, CE, LAM).fit([(ids, y[:6])])
    with pytest.raises(BatchFormatError, match="perturbation.*floating-point tensor"):
        infl.influences(ids, y[:6], ids, y[:6], mode="perturbation")
