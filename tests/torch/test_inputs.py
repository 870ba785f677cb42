"""Inputs of any shape: features as a tensor or a mapping of tensors (``model(**x)``), batches as
``(x, y)`` or HuggingFace-style mappings with "labels", and the models people train (tiny BERT and
GPT-2, token-id text models) against the independent float64 references of ``references.py``."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import real_models as rm
import references as ref
import torch
from torch import Tensor, nn

from infscale.errors import BatchFormatError
from infscale.torch import CgInfluence, DirectInfluence
from infscale.torch.data import (
    add_batch_dim,
    batch_size_of,
    call_model,
    cat_rows,
    feature_nbytes,
    merged_batches,
    split_batch,
    take_rows,
    to_device,
)

torch.set_num_threads(1)
LAM = 0.1


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------ the helpers
def test_batch_helpers_on_tensors_and_mappings():
    t = torch.arange(12.0).reshape(4, 3)
    m = {"ids": torch.arange(8).reshape(4, 2), "w": t}
    assert batch_size_of(t) == batch_size_of(m) == 4
    assert torch.equal(take_rows(t, slice(1, 3)), t[1:3])
    rows = take_rows(m, torch.tensor([3, 0]))
    assert torch.equal(rows["ids"], m["ids"][[3, 0]]) and torch.equal(rows["w"], t[[3, 0]])
    assert take_rows(m, 2)["w"].shape == (1, 3)  # an integer index keeps the row dimension
    assert add_batch_dim({"w": t[0]})["w"].shape == (1, 3)
    moved = to_device(m, torch.device("cpu"), torch.float64)
    assert type(moved) is dict and moved["w"].dtype == torch.float64 and moved["ids"].dtype == torch.int64
    assert feature_nbytes(m) == 8 * 8 + 12 * 4
    assert torch.equal(cat_rows([m, m])["ids"], torch.cat([m["ids"], m["ids"]]))


def test_call_model_passes_a_mapping_as_keywords():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1)

        def forward(self, a, b=None):
            return self.lin(a) * (1 if b is None else b)

    model = TwoInputs()
    a, b = torch.randn(3, 2), torch.randn(3, 1)
    torch.testing.assert_close(call_model(model, {"b": b, "a": a}), model.lin(a) * b)
    torch.testing.assert_close(call_model(model, a), model.lin(a))
    state = {"lin.weight": torch.zeros(1, 2), "lin.bias": torch.ones(1)}
    torch.testing.assert_close(call_model(model, {"a": a, "b": b}, state), b)


def test_split_batch_reads_labels_from_mappings_and_refuses_guesses():
    x, y = torch.zeros(3, 2), torch.zeros(3)
    got_x, got_y = split_batch({"input_ids": x, "labels": y})
    assert got_y is y and list(got_x) == ["input_ids"] and got_x["input_ids"] is x
    nested_x, _ = split_batch(({"a": x}, y))
    assert nested_x["a"] is x
    with pytest.raises(BatchFormatError, match="no 'labels'"):
        split_batch({"input_ids": x})
    with pytest.raises(BatchFormatError, match="length 3"):
        split_batch((x, x, y))
    with pytest.raises(BatchFormatError, match="different numbers of rows"):
        split_batch({"a": x, "b": torch.zeros(2, 2), "labels": y})


def test_a_batch_encoding_is_a_mapping():
    transformers = pytest.importorskip("transformers")
    enc = transformers.BatchEncoding({"input_ids": torch.ones(2, 3, dtype=torch.long)})
    x, y = split_batch({**enc, "labels": torch.zeros(2)})
    assert batch_size_of(enc) == 2 and list(x) == ["input_ids"]


def test_merged_batches_join_only_batches_of_one_layout():
    a = ({"ids": torch.zeros(2, 5, dtype=torch.long)}, torch.zeros(2))
    b = ({"ids": torch.ones(3, 5, dtype=torch.long)}, torch.ones(3))
    c = ({"ids": torch.ones(1, 7, dtype=torch.long)}, torch.ones(1))  # padded to another length
    out = list(merged_batches([a, b, c], max_rows=100, max_bytes=1 << 20))
    assert [batch_size_of(x) for x, _ in out] == [5, 1]
    assert torch.equal(out[0][0]["ids"][2:], b[0]["ids"]) and out[1][0]["ids"].shape == (1, 7)


# ------------------------------------------------------------------------------ dict features, exact
class DictMLP(nn.Module):
    """model(a=(n, 3), b=(n, 2)) = tanh-MLP of [a, b]; its twin TensorMLP takes cat([a, b])."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(5, 4)
        self.l2 = nn.Linear(4, 3)

    def forward(self, a, b):
        return self.l2(torch.tanh(self.l1(torch.cat([a, b], dim=1))))


class TensorMLP(DictMLP):
    def forward(self, x):
        return super().forward(x[:, :3], x[:, 3:])


@pytest.mark.parametrize("mode", ["hessian", "gauss_newton"])
def test_mapping_features_give_the_numbers_of_the_same_model_on_a_tensor(mode):
    """Second order through the curvature operator with model(**x): a model on {a, b} equals its
    twin on cat([a, b]), and both equal the explicit float64 reference."""
    lam = 1.0  # the random network's Hessian is indefinite
    torch.manual_seed(0)
    twin = TensorMLP().double()
    model = DictMLP().double()
    model.load_state_dict(twin.state_dict())
    x = torch.randn(14, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (14,))
    as_dict = [{"a": x[s : s + 4, :3], "b": x[s : s + 4, 3:], "labels": y[s : s + 4]} for s in (0, 4, 8)]
    as_tuple = [(x[s : s + 4], y[s : s + 4]) for s in (0, 4, 8)]
    loss = nn.functional.cross_entropy
    test_x = {"a": x[12:, :3], "b": x[12:, 3:]}
    got = DirectInfluence(model, loss, lam, second_order_mode=mode).fit(as_dict)
    influences = got.influences(test_x, y[12:], {"a": x[:12, :3], "b": x[:12, 3:]}, y[:12])
    reference = ref.exact_influences(twin, loss, as_tuple, [(x[12:], y[12:])], lam, mode)
    assert _rel(influences, reference) < 1e-10
    twin_numbers = DirectInfluence(twin, loss, lam, second_order_mode=mode).fit(as_tuple)
    assert _rel(twin_numbers.influences(x[12:], y[12:], x[:12], y[:12]), influences) < 1e-12
    cg = CgInfluence(model, loss, lam, second_order_mode=mode, rtol=1e-12, atol=0.0).fit(as_dict)
    assert _rel(cg.influences(test_x, y[12:], {"a": x[:12, :3], "b": x[:12, 3:]}, y[:12]), reference) < 1e-8


# ------------------------------------------------------------------------------ the real models
@pytest.fixture(scope="module")
def bert():
    pytest.importorskip("transformers")
    return rm.tiny_bert()


@pytest.fixture(scope="module")
def gpt2():
    pytest.importorskip("transformers")
    return rm.tiny_gpt2()


def _query(infl, workload):
    """Influences of every training batch on the test batch, each batch with its own padding."""
    x_test, y_test = ref.split_batch(workload.test[0])
    parts = [infl.influences(x_test, y_test, *ref.split_batch(b)) for b in workload.train]
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_empirical_fisher_on_hf_models_matches_the_reference(name, request):
    """Direct's empirical Fisher needs per-sample gradients only: with dict batches (input_ids,
    attention_mask, labels; padded per batch) it matches the explicit float64 reference."""
    w = request.getfixturevalue(name)
    infl = DirectInfluence(w.model, w.loss_fn, LAM, second_order_mode="empirical_fisher").fit(w.train)
    expected = ref.exact_influences(w.model, w.loss_fn, w.train, w.test, LAM, "empirical_fisher")
    assert _rel(_query(infl, w), expected) < 1e-6


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_every_query_takes_dict_features(name, request):
    w = request.getfixturevalue(name)
    infl = DirectInfluence(w.model, w.loss_fn, LAM, second_order_mode="empirical_fisher").fit(w.train)
    x_test, y_test = ref.split_batch(w.test[0])
    x, y = ref.split_batch(w.train[0])
    full = infl.influences(x_test, y_test, x, y)
    factors = infl.influence_factors(x_test, y_test)
    assert factors.shape == (batch_size_of(x_test), infl.n_parameters)
    assert _rel(infl.influences_from_factors(factors, x, y), full) < 1e-12
    symmetric = infl.influences(x_test, y_test)
    assert _rel(infl.self_influences(x_test, y_test), torch.diagonal(symmetric)) < 1e-10
    g_test = ref.per_sample_gradients(w.model, w.loss_fn, w.test)
    fisher = ref.empirical_fisher(ref.per_sample_gradients(w.model, w.loss_fn, w.train))
    assert _rel(factors, torch.linalg.solve(fisher + LAM * torch.eye(fisher.shape[0]), g_test.T).T) < 1e-6
    if name == "bert":  # a BatchEncoding is a mapping like any other
        from transformers import BatchEncoding

        assert _rel(infl.influences(BatchEncoding(x_test), y_test, BatchEncoding(x), y), full) < 1e-12
    with pytest.raises(BatchFormatError, match="perturbation"):
        infl.influences(x_test, y_test, x, y, mode="perturbation")


@pytest.mark.parametrize("mode", ["hessian", "gauss_newton"])
def test_second_order_on_a_token_id_model_matches_the_reference(mode):
    """The ``embedding`` text model (integer token ids in (x, y) tuples): Hessian and Gauss-Newton."""
    w = rm.embedding_text()
    expected = ref.exact_influences(w.model, w.loss_fn, w.train, w.test, LAM, mode)
    infl = DirectInfluence(w.model, w.loss_fn, LAM, second_order_mode=mode).fit(w.train)
    assert _rel(_query(infl, w), expected) < 1e-8


@dataclass
class Output:
    logits: Tensor
    note: str = ""


class StructuredOutputs(TensorMLP):
    """TensorMLP whose output is a tuple (logits, a string) or a dataclass holding the logits."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        logits = super().forward(x)
        return (logits, "a note") if self.kind == "tuple" else Output(logits, "a note")


def _structured_loss(outputs, y: Tensor) -> Tensor:
    if isinstance(outputs, Tensor):
        logits = outputs
    elif isinstance(outputs, tuple):
        assert outputs[1] == "a note"
        logits = outputs[0]
    else:
        assert isinstance(outputs, Output) and outputs.note == "a note"
        logits = outputs.logits
    return nn.functional.cross_entropy(logits, y)


@pytest.mark.parametrize("kind", ["tuple", "dataclass"])
@pytest.mark.parametrize("mode", ["hessian", "gauss_newton", "empirical_fisher"])
def test_the_loss_receives_what_the_model_returns(kind, mode):
    """Outputs that are not a tensor (a tuple with a string, a plain dataclass) reach the loss as
    they are, in every curvature mode (Gauss-Newton differentiates their floating tensors)."""
    torch.manual_seed(0)
    twin = TensorMLP().double()
    model = StructuredOutputs(kind).double()
    model.load_state_dict(twin.state_dict())
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    train = [(x[:7], y[:7]), (x[7:], y[7:])]
    got = DirectInfluence(model, _structured_loss, 1.0, second_order_mode=mode).fit(train)
    expected = ref.exact_influences(twin, nn.functional.cross_entropy, train, [(x[:3], y[:3])], 1.0, mode)
    assert _rel(got.influences(x[:3], y[:3], x, y), expected) < 1e-10
