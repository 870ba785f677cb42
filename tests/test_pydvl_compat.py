"""Drop-in for pyDVL 0.10 users: its keywords, the crashes its users met, and a pyDVL-style script
run with only its imports rewritten; numbers against explicit float64 references
(tests/torch/references.py) or closed forms built here."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from infscale import DaskInfluenceCalculator, NotFittedError, ThreadSafetyViolationError
from infscale.torch import (
    ArnoldiInfluence,
    BlockMode,
    CgInfluence,
    DirectInfluence,
    EkfacInfluence,
    InverseHarmonicMeanInfluence,
    LissaInfluence,
    NystroemSketchInfluence,
    SecondOrderMode,
)
from infscale.torch.settings import PYDVL_KEYWORDS
from infscale.torch.util import TorchNumpyConverter, torch_dataset_to_dask_array

sys.path.insert(0, str(Path(__file__).parent / "torch"))
import references as R  # noqa: E402

CE = nn.functional.cross_entropy
REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def no_warnings_from_infscale():
    """Fails if a warning comes from infscale or the test (third-party deprecations are left alone)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    ours = [w for w in caught if "site-packages" not in w.filename]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]


def rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


# ---------------------------------------------------------------------------- regularization=


def test_regularization_alias_gives_the_explicit_influences(small_classifier):
    model, x, y, xt, yt = small_classifier
    data = [(x, y)]
    exact = small_classifier.exact_influences("gauss_newton", 0.05)
    with no_warnings_from_infscale():  # an alias, not a deprecation: no warning at all
        direct = DirectInfluence(model, CE, regularization=0.05, second_order_mode="gauss_newton").fit(data)
        cg = CgInfluence(
            model, CE, regularization=0.05, rtol=1e-12, atol=1e-14, second_order_mode="gauss_newton"
        ).fit(data)
    assert rel(direct.influences(xt, yt, x, y), exact) < 1e-10
    assert rel(cg.influences(xt, yt, x, y), exact) < 1e-8
    assert direct.hyperparameters()["hessian_regularization"] == 0.05


@pytest.mark.parametrize(
    "make",
    [
        lambda m, **kw: DirectInfluence(m, CE, **kw),
        lambda m, **kw: CgInfluence(m, CE, **kw),
        lambda m, **kw: LissaInfluence(m, CE, **kw),
        lambda m, **kw: ArnoldiInfluence(m, CE, **kw),
        lambda m, **kw: NystroemSketchInfluence(m, CE, **kw),
        lambda m, **kw: InverseHarmonicMeanInfluence(m, CE, **kw),
        lambda m, **kw: EkfacInfluence(m, **kw),
    ],
    ids=["direct", "cg", "lissa", "arnoldi", "nystroem", "ihm", "ekfac"],
)
def test_every_method_takes_regularization_and_refuses_both_names(small_classifier, make):
    model = small_classifier.model
    with no_warnings_from_infscale():
        infl = make(model, regularization=0.25)
    assert infl.hessian_regularization == 0.25
    assert set(infl.regularization.values()) == {0.25}
    with pytest.raises(TypeError, match=r"regularization=.*hessian_regularization=.*not both"):
        make(model, regularization=0.25, hessian_regularization=0.25)


def test_both_names_by_position_and_keyword_is_an_error(small_classifier):
    with pytest.raises(TypeError, match=r"got regularization=0\.2 and hessian_regularization=0\.1"):
        CgInfluence(small_classifier.model, CE, 0.1, regularization=0.2)


def test_pydvl_none_regularization_means_zero(small_classifier):
    model = small_classifier.model
    assert DirectInfluence(model, CE, regularization=None).regularization == {"model": 0.0}
    pydvl_dict = {"0": None, "2": 0.5}
    layer_wise = DirectInfluence(model, CE, regularization=pydvl_dict, block_structure="layer_wise")
    assert layer_wise.regularization == {"0": 0.0, "2": 0.5}
    with pytest.raises(ValueError, match="hessian_regularization"):  # infscale's own name keeps its checks
        DirectInfluence(model, CE, hessian_regularization=None)


# ---------------------------------------------------------------------------- pyDVL-only keywords

#: every keyword of pyDVL 0.10's signatures, with values a pyDVL user writes
PYDVL_CALLS = {
    "DirectInfluence": dict(
        regularization=0.1, block_structure=BlockMode.FULL, second_order_mode=SecondOrderMode.HESSIAN
    ),
    "CgInfluence": dict(
        regularization=0.1, rtol=1e-4, atol=1e-6, maxiter=None, progress=False, precompute_grad=False,
        preconditioner=None, solve_simultaneously=True, warn_on_max_iteration=True,
        block_structure=BlockMode.FULL, second_order_mode=SecondOrderMode.HESSIAN,
    ),
    "LissaInfluence": dict(
        regularization=0.1, maxiter=1000, dampen=0.0, scale=10.0, rtol=1e-4, progress=False,
        warn_on_max_iteration=False, block_structure=BlockMode.FULL,
        second_order_mode=SecondOrderMode.HESSIAN,
    ),
    "ArnoldiInfluence": dict(
        regularization=0.1, rank=10, krylov_dimension=None, tol=1e-6, max_iter=None,
        eigen_computation_on_gpu=False, block_structure=BlockMode.FULL,
        second_order_mode=SecondOrderMode.HESSIAN, use_woodbury=False,
    ),
    "EkfacInfluence": dict(update_diagonal=False, hessian_regularization=0.1, progress=False),
    "NystroemSketchInfluence": dict(
        regularization=0.1, rank=10, block_structure=BlockMode.FULL, second_order_mode=SecondOrderMode.HESSIAN
    ),
    "InverseHarmonicMeanInfluence": dict(regularization=0.1, block_structure=BlockMode.FULL),
}  # fmt: skip

CLASSES = {
    c.__name__: c
    for c in (
        DirectInfluence, CgInfluence, LissaInfluence, ArnoldiInfluence, EkfacInfluence,
        NystroemSketchInfluence, InverseHarmonicMeanInfluence,
    )
}  # fmt: skip


@pytest.mark.parametrize("name", list(PYDVL_CALLS))
def test_pydvl_signatures_are_accepted_by_keyword(small_classifier, name):
    cls = CLASSES[name]
    args = () if name == "EkfacInfluence" else (CE,)
    with no_warnings_from_infscale():
        infl = cls(small_classifier.model, *args, **PYDVL_CALLS[name])
    assert infl.hessian_regularization == 0.1


def test_no_op_keywords_change_no_number(small_classifier):
    model, x, y, xt, yt = small_classifier
    exact = small_classifier.exact_influences("gauss_newton", 0.05)
    kw = dict(regularization=0.05, rtol=1e-12, atol=1e-14, second_order_mode="gauss_newton")
    for flags in (
        dict(precompute_grad=True, solve_simultaneously=False, warn_on_max_iteration=False),
        dict(precompute_grad=False, solve_simultaneously=True, warn_on_max_iteration=True),
    ):
        cg = CgInfluence(model, CE, **kw, **flags).fit([(x, y)])
        assert cg.hyperparameters() == CgInfluence(model, CE, **kw).hyperparameters()
        assert rel(cg.influences(xt, yt, x, y), exact) < 1e-8
    gpu = dict(eigen_computation_on_gpu=True)
    arnoldi = ArnoldiInfluence(
        model, CE, regularization=0.05, rank=31, second_order_mode="gauss_newton", **gpu
    )
    arnoldi.fit([(x, y)])
    assert rel(arnoldi.influences(xt, yt, x, y), exact) < 1e-8


def test_no_op_keywords_take_only_booleans_and_only_where_pydvl_has_them(small_classifier):
    model = small_classifier.model
    with pytest.raises(TypeError, match=r"solve_simultaneously=.*True or False; got 'yes'"):
        CgInfluence(model, CE, solve_simultaneously="yes")
    # a keyword of another pyDVL method is not taken silently
    with pytest.raises(TypeError, match="precompute_grad"):
        DirectInfluence(model, CE, precompute_grad=True)
    with pytest.raises(TypeError, match="eigen_computation_on_gpu"):
        NystroemSketchInfluence(model, CE, 0.1, eigen_computation_on_gpu=False)


def test_the_keyword_table_names_only_real_infscale_keywords():
    import inspect

    for cls_name, table in PYDVL_KEYWORDS.items():
        for keyword, how in table.items():
            if how.target is not None:
                assert how.target in inspect.signature(DirectInfluence.__init__).parameters, keyword
            if cls_name in CLASSES:
                assert keyword not in inspect.signature(CLASSES[cls_name].__init__).parameters, keyword


# ---------------------------------------------------------------------------- nn.Linear attributes


def mismatched_linear_model() -> nn.Module:
    """nn.Linear(6, 3) whose weight was replaced by a (6, 3) one: F.linear maps 3 → 6 features,
    while in_features says 6 and out_features says 3."""
    torch.manual_seed(0)
    first = nn.Linear(6, 3)
    first.weight = nn.Parameter(torch.randn(6, 3) * 0.7)
    first.bias = nn.Parameter(torch.randn(6) * 0.1)
    return nn.Sequential(first, nn.Tanh(), nn.Linear(6, 2)).double()


def mismatched_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = (x[:, 0] - x[:, 2] > 0).long()
    return x[:8], y[:8], x[8:], y[8:]


LAM_LINEAR = 0.5

MISMATCH_METHODS = {
    "direct": lambda m: DirectInfluence(m, CE, LAM_LINEAR, second_order_mode="gauss_newton"),
    "cg": lambda m: CgInfluence(m, CE, LAM_LINEAR, rtol=1e-12, atol=1e-14, second_order_mode="gauss_newton"),
    "lissa": lambda m: LissaInfluence(
        m, CE, LAM_LINEAR, maxiter=3000, scale=4.0, rtol=1e-13, second_order_mode="gauss_newton"
    ),
    "arnoldi": lambda m: ArnoldiInfluence(m, CE, LAM_LINEAR, rank=38, second_order_mode="gauss_newton"),
    "nystroem": lambda m: NystroemSketchInfluence(
        m, CE, LAM_LINEAR, rank=38, second_order_mode="gauss_newton"
    ),
}


@pytest.mark.parametrize("method", list(MISMATCH_METHODS))
def test_linear_with_attributes_that_disagree_with_its_weight(method):
    model = mismatched_linear_model()
    assert (model[0].in_features, model[0].out_features) == (6, 3)
    x, y, xt, yt = mismatched_data()
    infl = MISMATCH_METHODS[method](model).fit([(x, y)])  # one full batch: LiSSA is deterministic
    exact = R.exact_influences(model, CE, [(x, y)], [(xt, yt)], LAM_LINEAR, curvature="gauss_newton")
    assert rel(infl.influences(xt, yt, x, y), exact) < (1e-9 if method == "lissa" else 1e-8)
    g_train = R.per_sample_gradients(model, CE, [(x, y)])
    assert rel(infl._gradients(x, y), g_train) < 1e-12


def test_linear_with_attributes_that_disagree_inverse_harmonic_mean():
    model = mismatched_linear_model()
    x, y, xt, yt = mismatched_data()
    g_train = R.per_sample_gradients(model, CE, [(x, y)])
    g_test = R.per_sample_gradients(model, CE, [(xt, yt)])
    eye = torch.eye(g_train.shape[1], dtype=torch.float64)
    inverse = sum(torch.linalg.inv(torch.outer(g, g) + LAM_LINEAR * eye) for g in g_train) / len(g_train)
    ihm = InverseHarmonicMeanInfluence(model, CE, LAM_LINEAR).fit([(x, y)])
    assert rel(ihm.influences(xt, yt, x, y), g_test @ inverse @ g_train.T) < 1e-10


def test_linear_with_attributes_that_disagree_ekfac_equals_the_well_built_model():
    model = mismatched_linear_model()
    x, y, xt, yt = mismatched_data()
    rebuilt = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(model(x), rebuilt(x))
    kw = dict(hessian_regularization=0.1, fisher="exact", update_diagonal=True)
    a = EkfacInfluence(model, **kw).fit([(x, y)]).influences(xt, yt, x, y)
    b = EkfacInfluence(rebuilt, **kw).fit([(x, y)]).influences(xt, yt, x, y)
    assert rel(a, b) < 1e-12


# ---------------------------------------------------------------------------- EK-FAC's unsupported layers


@pytest.mark.parametrize(
    "model, label",
    [
        (nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(12, 2)), r"'0' \(Conv1d\)"),
        (
            nn.Sequential(nn.Linear(8, 8), nn.Unflatten(1, (1, 2, 2, 2)), nn.Conv3d(1, 2, 1)),
            r"'2' \(Conv3d\)",
        ),
    ],
)
def test_ekfac_names_an_unsupported_conv_and_the_supported_layers_at_construction(model, label):
    with pytest.raises(ValueError, match=label) as error:
        EkfacInfluence(model)
    message = str(error.value)
    assert "torch.nn.Linear and torch.nn.Conv2d (groups=1)" in message
    assert "skip_unsupported=True" in message


# ---------------------------------------------------------------------------- datasets without len()


class NoLenDataset(Dataset):
    """Indexable like a map-style dataset, without ``__len__``; counts its reads."""

    def __init__(self, x, y):
        self.x, self.y, self.reads = x, y, 0

    def __getitem__(self, i):
        self.reads += 1
        if i >= self.x.shape[0]:
            raise IndexError(i)
        return self.x[i], self.y[i]


def test_torch_dataset_to_dask_array_infers_the_size_of_a_dataset_without_len():
    x, y = torch.randn(7, 2, dtype=torch.float64), torch.arange(7)
    data = NoLenDataset(x, y)
    da_x, da_y = torch_dataset_to_dask_array(data, chunk_size=3, resulting_dtype=np.float64)
    assert da_x.shape == (7, 2) and da_x.chunks[0] == (3, 3, 1)
    np.testing.assert_array_equal(da_x.compute(), x.numpy())
    np.testing.assert_array_equal(da_y.compute(), y.numpy())


def test_torch_dataset_to_dask_array_total_size_reads_only_sample_zero():
    data = NoLenDataset(torch.randn(7, 2), torch.arange(7))
    da_x, _ = torch_dataset_to_dask_array(data, chunk_size=3, total_size=5)
    assert data.reads == 1 and da_x.shape == (5, 2)
    inferred = NoLenDataset(torch.randn(7, 2), torch.arange(7))
    torch_dataset_to_dask_array(inferred, chunk_size=3)
    assert inferred.reads == 1 + 8  # sample 0, then one pass to the IndexError


def test_torch_dataset_to_dask_array_empty_dataset_without_len():
    with pytest.raises((ValueError, IndexError)):
        torch_dataset_to_dask_array(NoLenDataset(torch.zeros(0, 2), torch.zeros(0)), chunk_size=3)


# ---------------------------------------------------------------------------- DaskInfluenceCalculator


def test_dask_calculator_checks_the_workers_threads_before_fitting():
    from distributed import Client

    unfitted = DirectInfluence(nn.Linear(2, 2).double(), CE, 0.1)
    converter = TorchNumpyConverter()
    client = Client(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None)
    try:
        with pytest.raises(ThreadSafetyViolationError, match="2 threads"):
            DaskInfluenceCalculator(unfitted, converter, client)
    finally:
        client.close()
    client = Client(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None)
    try:
        with pytest.raises(NotFittedError, match="not fitted"):
            DaskInfluenceCalculator(unfitted, converter, client)
    finally:
        client.close()


# ---------------------------------------------------------------------------- a pyDVL 0.10 script

PYDVL_SCRIPT = '''
"""Influence analysis written against pyDVL 0.10."""
import sys

import numpy as np
import torch
import zarr
from distributed import Client
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from pydvl.influence import DaskInfluenceCalculator, SequentialInfluenceCalculator
from pydvl.influence.torch import ArnoldiInfluence, CgInfluence
from pydvl.influence.torch.util import (
    NestedTorchCatAggregator,
    TorchCatAggregator,
    TorchNumpyConverter,
    torch_dataset_to_dask_array,
)


class RowDataset(Dataset):
    """Rows read one at a time; no __len__."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __getitem__(self, i):
        if i >= len(self.x):
            raise IndexError(i)
        return self.x[i], self.y[i]


def main(out_dir):
    torch.manual_seed(0)
    x = torch.randn(40, 4, dtype=torch.float64)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()
    x_train, y_train, x_test, y_test = x[:30], y[:30], x[30:], y[30:]
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    for _ in range(200):  # gradient descent
        model.zero_grad()
        nn.functional.cross_entropy(model(x_train), y_train).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.5 * p.grad
    model.eval()
    loss = nn.functional.cross_entropy
    train_loader = DataLoader(TensorDataset(x_train, y_train), batch_size=10)
    test_loader = DataLoader(TensorDataset(x_test, y_test), batch_size=5)

    infl_model = CgInfluence(
        model,
        loss,
        regularization=0.05,  # above the Hessian's most negative eigenvalue (about -0.014)
        rtol=1e-10,
        atol=1e-12,
        maxiter=200,
        precompute_grad=False,
        solve_simultaneously=True,
        warn_on_max_iteration=False,
    )
    infl_model = infl_model.fit(train_loader)

    infl_calc = SequentialInfluenceCalculator(infl_model)
    lazy_influences = infl_calc.influences(test_loader, train_loader)
    stored = lazy_influences.to_zarr(zarr.storage.MemoryStore(), TorchNumpyConverter(), return_stored=True)
    sequential = np.asarray(stored[:])

    z_test_factors = infl_calc.influence_factors(test_loader).compute(aggregator=TorchCatAggregator())
    factor_loader = DataLoader(TensorDataset(z_test_factors), batch_size=5)
    from_factors = infl_calc.influences_from_factors(factor_loader, train_loader)
    from_factors = from_factors.compute(aggregator=NestedTorchCatAggregator()).numpy()

    client = Client(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None)
    try:
        da_x, da_y = torch_dataset_to_dask_array(
            RowDataset(x_train, y_train), chunk_size=10, resulting_dtype=np.float64
        )
        da_x_test, da_y_test = torch_dataset_to_dask_array(
            RowDataset(x_test, y_test), chunk_size=5, resulting_dtype=np.float64
        )
        dask_calc = DaskInfluenceCalculator(infl_model, TorchNumpyConverter(), client)
        parallel = dask_calc.influences(da_x_test, da_y_test, da_x, da_y).compute()
    finally:
        client.close()

    arnoldi = ArnoldiInfluence(
        model,
        loss,
        regularization=0.1,
        rank=6,
        tol=1e-10,
        eigen_computation_on_gpu=False,
        use_woodbury=True,
    )
    arnoldi = arnoldi.fit(train_loader)
    woodbury = arnoldi.influences(x_test, y_test, x_train, y_train).numpy()

    torch.save(model.state_dict(), f"{out_dir}/model.pt")
    np.savez(
        f"{out_dir}/results.npz",
        x=x.numpy(),
        y=y.numpy(),
        sequential=sequential,
        from_factors=from_factors,
        parallel=parallel,
        woodbury=woodbury,
    )


if __name__ == "__main__":
    main(sys.argv[1])
'''


def test_a_pydvl_script_runs_with_only_its_imports_rewritten(tmp_path):
    script = PYDVL_SCRIPT.replace("pydvl.influence", "infscale")
    assert "pydvl" not in script and script.count("infscale") == 3
    (tmp_path / "analysis.py").write_text(textwrap.dedent(script))
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    run = subprocess.run(
        [sys.executable, "analysis.py", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Warning" not in run.stderr, run.stderr

    # the explicit float64 reference, from the model and data the script used
    out = np.load(tmp_path / "results.npz")
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    model.load_state_dict(torch.load(tmp_path / "model.pt"))
    x, y = torch.from_numpy(out["x"]), torch.from_numpy(out["y"])
    train, test = [(x[:30], y[:30])], [(x[30:], y[30:])]
    g_train, g_test = R.per_sample_gradients(model, CE, train), R.per_sample_gradients(model, CE, test)
    H = R.hessian(model, CE, train)
    exact = R.influences(g_test, H, g_train, 0.05)
    for name in ("sequential", "from_factors", "parallel"):
        assert out[name].shape == (10, 30), name
        assert rel(out[name], exact) < 1e-8, name

    # ArnoldiInfluence(use_woodbury=True): (V diag(σ) Vᵀ + λI)⁻¹ from the top 6 eigenpairs of H
    evals, evecs = torch.linalg.eigh(H)
    order = torch.argsort(evals.abs(), descending=True)
    assert evals[order[5]].abs() > 1.05 * evals[order[6]].abs()  # a gap: the top 6 are well defined
    V, sigma = evecs[:, order[:6]], evals[order[:6]]
    eye = torch.eye(H.shape[0], dtype=torch.float64)
    inverse = V @ torch.diag(1 / (sigma + 0.1)) @ V.T + (eye - V @ V.T) / 0.1
    assert rel(out["woodbury"], g_test @ inverse @ g_train.T) < 1e-8
