"""torch.func derivatives against closed forms (linear regression with MSE) and explicit
float64 matrices from torch.autograd.functional."""

import pytest
import torch
from torch import nn

from infscale.errors import BatchFormatError
from infscale.torch.functional import (
    BlockMode,
    CurvatureOperator,
    ParameterLayout,
    SecondOrderMode,
    block_regularization,
    per_sample_gradients,
    perturbation_influences,
    self_perturbation_influences,
    split_batch,
)


def identity(x, y):
    return x, y


def test_per_sample_gradients_closed_form(linreg, ground_truth):
    layout = ParameterLayout(linreg.model)
    expected = ground_truth.linreg(linreg, 0.0).gradients(linreg.x, linreg.y)
    for chunk in (None, 1, 5):  # chunking changes nothing
        got = per_sample_gradients(layout, linreg.loss, linreg.x, linreg.y, chunk_size=chunk)
        assert got.dtype == torch.float64
        assert ground_truth.relerr(got, expected) < 1e-12


@pytest.mark.parametrize("mode", [SecondOrderMode.HESSIAN, SecondOrderMode.GAUSS_NEWTON])
def test_curvature_of_linear_regression_closed_form(linreg, ground_truth, mode):
    # MSE on a linear model: Hessian and Gauss-Newton matrix are both 2/n Σ x̃ x̃ᵀ
    layout = ParameterLayout(linreg.model)
    H = ground_truth.linreg(linreg, 0.0).hessian
    op = CurvatureOperator(layout, linreg.loss, linreg.loader(5), layout.blocks[0], mode, identity)
    assert ground_truth.relerr(op.dense(), H) < 1e-12
    V = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert ground_truth.relerr(op.matmat(V), V @ H) < 1e-12


def test_mixed_derivatives_closed_form(linreg, ground_truth):
    layout = ParameterLayout(linreg.model)
    closed = ground_truth.linreg(linreg, 0.0)
    factors = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = closed.perturbation(factors, linreg.x, linreg.y)
    for n_factors in (1, 4):  # reverse mode (few factors) and forward mode (more factors than features)
        got = perturbation_influences(layout, linreg.loss, factors[:n_factors], linreg.x, linreg.y)
        assert got.shape == (n_factors, linreg.x.shape[0], 3)
        assert ground_truth.relerr(got, expected[:n_factors]) < 1e-12
    # self version: factor i against sample i
    f = torch.randn(linreg.x.shape[0], 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = self_perturbation_influences(layout, linreg.loss, f, linreg.x, linreg.y, chunk_size=5)
    full = closed.perturbation(f, linreg.x, linreg.y)
    diag = full[torch.arange(f.shape[0]), torch.arange(f.shape[0])]
    assert ground_truth.relerr(got, diag) < 1e-12


@pytest.mark.parametrize("mode", ["hessian", "gauss_newton"])
def test_dense_equals_explicit_blocks(untrained_mlp, untrained_mlp_curvature, ground_truth, mode):
    """dense() (column groups per parameter, symmetric half skipped) against explicit matrices,
    over batches of unequal size, for every block structure; matmat with the identity too."""
    p = untrained_mlp
    full = untrained_mlp_curvature[mode]
    data = p.loader(17)  # 17 + 13
    for blocks, chunk in (
        (BlockMode.FULL, 7),
        (BlockMode.LAYER_WISE, None),
        (BlockMode.PARAMETER_WISE, None),
    ):
        layout = ParameterLayout(p.model, blocks)
        for b in layout.blocks:
            op = CurvatureOperator(layout, p.loss, data, b, mode, identity, vector_chunk=chunk)
            D = op.dense()
            expected = full[b.slice, b.slice]
            assert torch.equal(D, D.T)
            assert ground_truth.relerr(D, expected) < 1e-12, (blocks, b.name)
        eye = torch.eye(b.size, dtype=torch.float64)
        assert ground_truth.relerr(op.matmat(eye), expected) < 1e-12


def test_layout_blocks_of_nested_modules():
    from collections import OrderedDict

    model = nn.Sequential(OrderedDict(enc=nn.Sequential(nn.Linear(3, 4), nn.Tanh()), head=nn.Linear(4, 2)))
    assert ParameterLayout(model, BlockMode.LAYER_WISE).block_names == ["enc.0", "head"]
    assert ParameterLayout(model, "parameter_wise").block_names == [
        "enc.0.weight",
        "enc.0.bias",
        "head.weight",
        "head.bias",
    ]
    layout = ParameterLayout(model, {"a": ["head.weight", "enc.0.bias"], "b": ["enc.0.weight", "head.bias"]})
    assert layout.block_names == ["a", "b"]
    assert [b.size for b in layout.blocks] == [8 + 4, 12 + 2]
    assert layout.n_parameters == 26


def test_layout_errors():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="'nope'.*not have"):
        ParameterLayout(model, {"a": ["nope"]})
    with pytest.raises(ValueError, match="twice"):
        ParameterLayout(model, {"a": ["0.weight", "0.bias"], "b": ["0.weight", "1.weight", "1.bias"]})
    with pytest.raises(ValueError, match="leaves out"):
        ParameterLayout(model, {"a": ["0.weight", "0.bias"]})
    with pytest.raises(ValueError, match="block_structure='diagonal'"):
        ParameterLayout(model, "diagonal")
    model[0].requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        ParameterLayout(model, {"a": ["0.weight", "1.weight", "1.bias"]})
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        ParameterLayout(model)


def test_block_regularization():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    layout = ParameterLayout(model, BlockMode.LAYER_WISE)
    assert block_regularization(layout, 0.5) == {"0": 0.5, "1": 0.5}
    assert block_regularization(layout, {"1": 2.0}) == {"0": 0.0, "1": 2.0}
    with pytest.raises(ValueError, match=r"\['2'\].*blocks are \['0', '1'\]"):
        block_regularization(layout, {"2": 1.0})
    with pytest.raises(ValueError, match="must be ≥ 0"):
        block_regularization(layout, -1.0)
    with pytest.raises(ValueError, match="float or a dict"):
        block_regularization(layout, "big")


def test_split_batch():
    x, y = torch.zeros(2, 3), torch.zeros(2)
    assert split_batch((x, y))[0] is x
    with pytest.raises(BatchFormatError, match="length 3"):  # (x1, x2, y) or (x, y, index)?
        split_batch([x, y, "extra"])
    with pytest.raises(ValueError, match="got Tensor"):
        split_batch(x)
    with pytest.raises(ValueError, match="length 1"):
        split_batch((x,))


def test_empty_data_raises():
    model = nn.Linear(2, 1).double()
    layout = ParameterLayout(model)
    op = CurvatureOperator(layout, nn.functional.mse_loss, [], layout.blocks[0], "hessian", identity)
    with pytest.raises(ValueError, match="empty"):
        op.matmat(torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="empty"):
        op.dense()


def test_small_batches_are_merged_without_changing_the_mean_curvature(mlp, ground_truth, monkeypatch):
    """Consecutive small batches are concatenated (up to MERGE_ROWS rows) before a product; a DataLoader
    over a TensorDataset is read as slices. The products equal the explicit Hessian either way."""
    from torch.utils.data import DataLoader, TensorDataset

    import infscale.torch.memory as F

    p = mlp
    H = ground_truth.hessian(p.model, p.loss, p.x, p.y)
    layout = ParameterLayout(p.model)
    V = torch.randn(3, H.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    monkeypatch.setattr(F, "MERGE_ROWS", 16)
    for data in (p.loader(7), DataLoader(TensorDataset(p.x, p.y), batch_size=7)):  # 40 = 5·7 + 5
        op = CurvatureOperator(layout, p.loss, data, layout.blocks[0], "hessian", identity)
        assert [x.shape[0] for x, _ in op._batches()] == [14, 14, 12]
        assert ground_truth.relerr(op.matmat(V), V @ H) < 1e-12
    monkeypatch.setattr(F, "MERGE_ROWS", 1)  # nothing merged
    op = CurvatureOperator(layout, p.loss, p.loader(7), layout.blocks[0], "hessian", identity)
    assert [x.shape[0] for x, _ in op._batches()] == [7, 7, 7, 7, 7, 5]
    assert ground_truth.relerr(op.matmat(V), V @ H) < 1e-12


def test_batches_beyond_the_merge_threshold_are_weighted_by_size(ground_truth):
    """At the default knobs, batches of 1024, 1024, 26 and 26 rows reach the curvature as 1024, 1024 and
    52 rows (the two small ones merged, the large ones not), and each is weighted by its size: the
    products and the dense matrix equal the explicit float64 Hessian of the mean loss over all 2100
    rows (an unweighted mean of the three batch Hessians would not)."""
    from infscale.torch.memory import MERGE_ROWS

    assert MERGE_ROWS == 1024
    g = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(2100, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (2100,), generator=g)
    x[2048:] *= 3.0  # the last rows' curvature differs from the rest
    sizes = [1024, 1024, 26, 26]
    starts = [0, 1024, 2048, 2074]
    data = [(x[s : s + n], y[s : s + n]) for s, n in zip(starts, sizes)]
    loss = nn.functional.cross_entropy
    H = ground_truth.hessian(model, loss, x, y)
    layout = ParameterLayout(model)
    op = CurvatureOperator(layout, loss, data, layout.blocks[0], "hessian", identity)
    assert [b.shape[0] for b, _ in op._batches()] == [1024, 1024, 52]
    V = torch.randn(5, H.shape[0], generator=g, dtype=torch.float64)
    assert ground_truth.relerr(op.matmat(V), V @ H) < 1e-12
    assert ground_truth.relerr(op.dense(), H) < 1e-12
    unweighted = (
        sum(
            ground_truth.hessian(model, loss, x[s : s + n], y[s : s + n])
            for s, n in [(0, 1024), (1024, 1024), (2048, 52)]
        )
        / 3
    )
    assert ground_truth.relerr(unweighted, H) > 1e-3  # the check above can tell the two apart
