"""EkfacInfluence's positional signature: the seed's second positional parameter is update_diagonal,
and a loss given there (``EkfacInfluence(model, F.mse_loss)``) is taken as the loss instead of being
bound to update_diagonal in silence. Checked against closed forms of single-layer models."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from infscale.torch import EkfacInfluence, EkfacLoss

DT = torch.float64


def _flat(per_sample: torch.Tensor) -> torch.Tensor:
    """(n, k, d+1) gradients [∂W | ∂b] of nn.Linear(d, k) → infscale's flat layout (weight row-major,
    then bias): (n, k·d + k)."""
    n, k, d1 = per_sample.shape
    return torch.cat([per_sample[:, :, : d1 - 1].reshape(n, -1), per_sample[:, :, d1 - 1]], dim=1)


def _flat_matrix(M: torch.Tensor, k: int, d: int) -> torch.Tensor:
    """A matrix on vec([W|b]) (row-major, (k, d+1)) permuted to the flat layout."""
    perm = [o * (d + 1) + i for o in range(k) for i in range(d)] + [o * (d + 1) + d for o in range(k)]
    return M[perm][:, perm]


def _regression(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    n, d, k = 40, 3, 2
    x = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.randn(n, k, generator=g, dtype=DT)
    torch.manual_seed(seed)
    return nn.Linear(d, k).to(DT), x, y


def _regression_influences(model: nn.Linear, x, y, lam: float) -> torch.Tensor:
    """Closed form for MSE on one Linear layer: per-sample gradients (2/k) r x̃ᵀ, Hessian
    (2/k) I ⊗ E[x̃x̃ᵀ]; influences of the first 5 rows on all rows."""
    n, d = x.shape
    k = model.out_features
    xt = torch.cat([x, torch.ones(n, 1, dtype=DT)], dim=1)
    W = torch.cat([model.weight.detach(), model.bias.detach()[:, None]], dim=1)
    residuals = xt @ W.T - y
    grads = _flat((2 / k) * residuals[:, :, None] * xt[:, None, :])
    H = _flat_matrix(torch.kron((2 / k) * torch.eye(k, dtype=DT), xt.T @ xt / n), k, d)
    return grads[:5] @ torch.linalg.solve(H + lam * torch.eye(H.shape[0], dtype=DT), grads.T)


@pytest.mark.parametrize("loss", [F.mse_loss, "mse", EkfacLoss.MSE], ids=["function", "string", "enum"])
def test_a_loss_as_second_positional_argument_is_the_loss(loss):
    model, x, y = _regression()
    lam = 1e-3
    ek = EkfacInfluence(model, loss, lam, fisher="exact").fit([(x[:16], y[:16]), (x[16:], y[16:])])
    assert ek.loss_type is EkfacLoss.MSE
    assert ek.update_diagonal is True  # keeps its default
    assert ek.hyperparameters()["update_diagonal"] is True
    expected = _regression_influences(model, x, y, lam)
    torch.testing.assert_close(ek.influences(x[:5], y[:5], x, y), expected, rtol=1e-8, atol=1e-12)


def _softmax_regression(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n, d, c = 30, 4, 3
    x = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.randint(0, c, (n,), generator=g)
    torch.manual_seed(seed)
    return nn.Linear(d, c).to(DT), x, y


def _kronecker_influences(model: nn.Linear, x, y, lam: float, eigenvalue_corrected: bool) -> torch.Tensor:
    """Empirical Fisher of cross-entropy on one Linear layer, closed form: per-sample gradient δ x̃ᵀ with
    δ = softmax(logits) − onehot(y); K-FAC: G ⊗ A with A = E[x̃x̃ᵀ], G = E[δδᵀ]; EK-FAC: the same
    eigenbasis Q_G ⊗ Q_A with eigenvalues E[(Q_Gᵀ δ x̃ᵀ Q_A)²]. Influences of the first 5 rows on all."""
    n, d = x.shape
    c = model.out_features
    xt = torch.cat([x, torch.ones(n, 1, dtype=DT)], dim=1)
    delta = torch.softmax(model(x).detach(), dim=1) - F.one_hot(y, c).to(DT)
    per_sample = delta[:, :, None] * xt[:, None, :]  # (n, c, d+1)
    A, G = xt.T @ xt / n, delta.T @ delta / n
    la, qa = torch.linalg.eigh(A)
    lg, qg = torch.linalg.eigh(G)
    if eigenvalue_corrected:
        eigenvalues = (qg.T @ per_sample @ qa).square().mean(0)  # (c, d+1)
    else:
        eigenvalues = lg[:, None] * la[None, :]
    Q = torch.kron(qg, qa)  # on vec([W|b]) row-major
    curvature = _flat_matrix(Q @ torch.diag(eigenvalues.reshape(-1)) @ Q.T, c, d)
    grads = _flat(per_sample)
    return grads[:5] @ torch.linalg.solve(curvature + lam * torch.eye(curvature.shape[0], dtype=DT), grads.T)


def test_update_diagonal_false_is_kfac_by_keyword_and_by_position():
    model, x, y = _softmax_regression()
    lam = 1e-2
    kfac = _kronecker_influences(model, x, y, lam, eigenvalue_corrected=False)
    ekfac = _kronecker_influences(model, x, y, lam, eigenvalue_corrected=True)
    assert float((kfac - ekfac).norm() / ekfac.norm()) > 1e-3  # the two models differ here
    for made in (
        EkfacInfluence(model, update_diagonal=False, hessian_regularization=lam, fisher="empirical"),
        EkfacInfluence(model, False, lam, fisher="empirical"),
        EkfacInfluence(model, False, lam, loss=F.cross_entropy, fisher="empirical"),
    ):
        assert made.update_diagonal is False
        got = made.fit([(x, y)]).influences(x[:5], y[:5], x, y)
        torch.testing.assert_close(got, kfac, rtol=1e-8, atol=1e-12)
    for made in (
        EkfacInfluence(model, hessian_regularization=lam, fisher="empirical"),
        EkfacInfluence(model, F.cross_entropy, lam, fisher="empirical"),  # the loss in its place: EK-FAC
    ):
        assert made.update_diagonal is True
        got = made.fit([(x, y)]).influences(x[:5], y[:5], x, y)
        torch.testing.assert_close(got, ekfac, rtol=1e-8, atol=1e-12)


def test_a_loss_in_both_places_or_a_value_that_is_neither_raises_type_error():
    model, _, _ = _softmax_regression()
    with pytest.raises(TypeError, match=r"loss twice.*mse_loss.*loss=<function cross_entropy"):
        EkfacInfluence(model, F.mse_loss, loss=F.cross_entropy)
    with pytest.raises(
        TypeError, match=r"update_diagonal .*must be True \(EK-FAC\) or False \(K-FAC\).*None"
    ):
        EkfacInfluence(model, None)
    with pytest.raises(TypeError, match=r"update_diagonal.*got 2"):
        EkfacInfluence(model, 2)
    # a callable of unknown curvature in the loss's place is the loss: the sampled Fisher then
    # asks for its family, the empirical Fisher needs nothing more
    absolute = lambda outputs, targets: (outputs - targets).abs().mean()  # noqa: E731
    with pytest.raises(ValueError, match=r"needs the loss family of loss="):
        EkfacInfluence(model, absolute)
    assert EkfacInfluence(model, absolute, fisher="empirical").update_diagonal is True
    # the same loss in both places is no conflict
    assert EkfacInfluence(model, "mse", loss=EkfacLoss.MSE).loss_type is EkfacLoss.MSE
