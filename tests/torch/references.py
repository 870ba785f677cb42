"""Independent float64 references for influence functions on any model: no infscale code is used.

Everything here is computed the slow, obvious way, so that it can serve as ground truth:

- per-sample gradients: a Python loop of one-sample ``torch.autograd.grad`` calls on the model itself;
- the Hessian of the mean training loss: ``torch.autograd.functional.hessian`` of the loss as a function
  of the flat parameter vector (through ``torch.func.functional_call``); for modules without double
  backward (``nn.EmbeddingBag``) central differences of exact gradients instead;
- the generalized Gauss-Newton matrix (1/N) Σ_i J_iᵀ ∇²ℓ_i J_i, J_i the Jacobian of sample i's logits
  and ∇²ℓ_i the Hessian of its loss in those logits, one sample at a time;
- influences ``G_test (M + λI)⁻¹ G_trainᵀ``, shape (n_test, n_train): entry (j, i) is
  ∇ℓ(z_test_j)ᵀ (M + λI)⁻¹ ∇ℓ(z_train_i); positive = up-weighting training point i lowers test loss j.

Batch convention (infscale's): a batch is a tuple/list ``(x, y, ...)`` or a mapping; a mapping's targets
are under ``"labels"`` and the rest goes to the model as ``model(**x)``; a tensor x goes as ``model(x)``.
``loss_fn(outputs, y)`` receives what the model returns and gives the batch mean, so a one-sample
batch gives that sample's loss and the mean training loss is Σ_batches n_b · loss_b / N.

Parameters: the model's trainable parameters in ``named_parameters()`` order (which lists a tied
weight once), flattened and concatenated; p below is their total size. Attention runs on the SDPA MATH
backend inside the second-order references (the default CPU flash kernel has no double backward).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.functional import hessian as autograd_hessian
from torch.autograd.functional import jacobian as autograd_jacobian
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

# ------------------------------------------------------------------------------ batch convention


def split_batch(batch: Any) -> tuple[Any, Tensor]:
    """(x, y) of a batch: a mapping gives ({k: v for k ≠ "labels"}, batch["labels"]); a tuple or list
    gives its first two entries (further entries, such as indices, are ignored)."""
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    return batch[0], batch[1]


def call_model(model: nn.Module, x: Any, params: dict[str, Tensor] | None = None) -> Any:
    """``model(**x)`` for a mapping, else ``model(x)``; with ``params``, through ``functional_call``
    (tied weights follow their source: ``tie_weights=True``)."""
    if params is None:
        return model(**x) if isinstance(x, Mapping) else model(x)
    if isinstance(x, Mapping):
        return functional_call(model, params, (), dict(x))
    return functional_call(model, params, (x,))


def n_samples(x: Any) -> int:
    """The batch size: dim 0 of x, or of the mapping's first tensor."""
    if isinstance(x, Mapping):
        return int(next(iter(x.values())).shape[0])
    return int(x.shape[0])


def take(x: Any, i: int) -> Any:
    """The one-sample batch i (rows i:i+1 of x, or of each tensor of the mapping)."""
    if isinstance(x, Mapping):
        return {k: v[i : i + 1] for k, v in x.items()}
    return x[i : i + 1]


def samples(batches: list) -> Iterator[tuple[Any, Tensor]]:
    """Every sample of ``batches`` in order, as a one-sample (x_i, y_i) keeping its batch's padding."""
    for batch in batches:
        x, y = split_batch(batch)
        for i in range(n_samples(x)):
            yield take(x, i), y[i : i + 1]


# ------------------------------------------------------------------------------ flat parameters


def trainable_parameters(model: nn.Module) -> tuple[list[str], list[Tensor]]:
    """Names and tensors of the parameters with requires_grad, in ``named_parameters()`` order (a tied
    weight appears once, under its first name)."""
    pairs = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in pairs], [p for _, p in pairs]


def flat_parameters(model: nn.Module) -> tuple[Tensor, Callable[[Tensor], dict[str, Tensor]]]:
    """(θ₀, unflatten): θ₀ (p,) the detached concatenation of the trainable parameters, unflatten maps a
    (p,) vector to the {name: tensor} dict that ``call_model`` takes."""
    names, tensors = trainable_parameters(model)
    shapes, sizes = [t.shape for t in tensors], [t.numel() for t in tensors]
    theta0 = torch.cat([t.detach().reshape(-1) for t in tensors])

    def unflatten(theta: Tensor) -> dict[str, Tensor]:
        return {n: part.reshape(s) for n, part, s in zip(names, torch.split(theta, sizes), shapes)}

    return theta0, unflatten


def mean_loss_function(model: nn.Module, loss_fn, batches: list) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """(f, θ₀) with f(θ) the mean training loss Σ_b n_b · loss_fn(model_θ(x_b), y_b) / N, a scalar."""
    theta0, unflatten = flat_parameters(model)
    sizes = [n_samples(split_batch(b)[0]) for b in batches]
    total = sum(sizes)

    def f(theta: Tensor) -> Tensor:
        params = unflatten(theta)
        out = 0.0
        for batch, size in zip(batches, sizes):
            x, y = split_batch(batch)
            out = out + loss_fn(call_model(model, x, params), y) * (size / total)
        return out

    return f, theta0


# ------------------------------------------------------------------------------ first order


def per_sample_losses(model: nn.Module, loss_fn, batches: list) -> Tensor:
    """(N,) the loss of each sample (a one-sample batch each), in batch order."""
    with torch.no_grad():
        return torch.stack([loss_fn(call_model(model, x), y).detach() for x, y in samples(batches)])


def per_sample_gradients(model: nn.Module, loss_fn, batches: list) -> Tensor:
    """(N, p) the gradient of each sample's loss in the flat trainable parameters: one
    ``torch.autograd.grad`` of one one-sample batch at a time, on the model itself."""
    _, params = trainable_parameters(model)
    rows = []
    for x, y in samples(batches):
        grads = torch.autograd.grad(loss_fn(call_model(model, x), y), params, allow_unused=True)
        rows.append(
            torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])
        )
    return torch.stack(rows).detach()


# ------------------------------------------------------------------------------ curvature (p, p)


def hessian(model: nn.Module, loss_fn, batches: list, method: str = "autograd", eps: float = 1e-5) -> Tensor:
    """(p, p) the Hessian of the mean training loss.

    method "autograd": ``torch.autograd.functional.hessian`` (vectorized double backward), exact.
    method "differences": column j = (∇f(θ + ε e_j) − ∇f(θ − ε e_j)) / 2ε from exact first-order
    gradients, then symmetrized; error O(ε²) (about 1e-9 relative in float64 at ε = 1e-5). For models
    whose modules have no double backward (``nn.EmbeddingBag``).
    Raises ValueError for another method.
    """
    f, theta0 = mean_loss_function(model, loss_fn, batches)
    with sdpa_kernel(SDPBackend.MATH):
        if method == "autograd":
            return autograd_hessian(f, theta0, vectorize=True).detach()
        if method != "differences":
            raise ValueError(f"method must be 'autograd' or 'differences'; got {method!r}.")

        def grad(theta: Tensor) -> Tensor:
            theta = theta.detach().requires_grad_(True)
            return torch.autograd.grad(f(theta), theta)[0]

        cols = []
        for j in range(theta0.numel()):
            e = torch.zeros_like(theta0)
            e[j] = eps
            cols.append((grad(theta0 + e) - grad(theta0 - e)) / (2 * eps))
    H = torch.stack(cols, dim=1)
    return ((H + H.T) / 2).detach()


def logits_of(outputs: Any) -> Tensor:
    """The tensor the loss is a function of: the output itself, ``outputs["logits"]`` of a mapping
    (a HuggingFace ModelOutput), or the first entry of a tuple."""
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        return outputs["logits"]
    return outputs[0]


def with_logits(outputs: Any, logits: Tensor) -> Any:
    """``outputs`` with its logits (see ``logits_of``) replaced by ``logits``."""
    if isinstance(outputs, Tensor):
        return logits
    if isinstance(outputs, Mapping):
        return type(outputs)(**{**outputs, "logits": logits})
    return (logits, *outputs[1:])


def gauss_newton(model: nn.Module, loss_fn, batches: list, vectorize: bool = True) -> Tensor:
    """(p, p) the generalized Gauss-Newton matrix of the mean training loss,
    (1/N) Σ_i J_iᵀ A_i J_i, with J_i (k, p) the Jacobian of sample i's logits (flattened, k numbers,
    padding positions included) in θ and A_i (k, k) the Hessian of ``loss_fn`` of that one-sample batch
    in its logits. ``vectorize=False`` computes J_i with one backward per logit (for modules whose
    backward vmap cannot batch)."""
    theta0, unflatten = flat_parameters(model)
    p = theta0.numel()
    total = torch.zeros(p, p, dtype=theta0.dtype)
    n = 0
    with sdpa_kernel(SDPBackend.MATH):
        for x, y in samples(batches):
            with torch.no_grad():
                outputs0 = call_model(model, x)
            logits0 = logits_of(outputs0).detach()
            J = autograd_jacobian(
                lambda theta, x=x: logits_of(call_model(model, x, unflatten(theta))),
                theta0,
                vectorize=vectorize,
            ).reshape(-1, p)
            A = autograd_hessian(
                lambda z, y=y, o=outputs0: loss_fn(with_logits(o, z), y), logits0, vectorize=True
            ).reshape(J.shape[0], J.shape[0])
            total += J.T @ A @ J
            n += 1
    return (total / n).detach()


def empirical_fisher(train_gradients: Tensor) -> Tensor:
    """(p, p) the empirical Fisher (1/N) Gᵀ G of the (N, p) per-sample gradients."""
    return train_gradients.T @ train_gradients / train_gradients.shape[0]


# ------------------------------------------------------------------------------ influences


def influences(
    test_gradients: Tensor, curvature: Tensor, train_gradients: Tensor, regularization: float
) -> Tensor:
    """(n_test, n_train) G_test (M + λI)⁻¹ G_trainᵀ for G_test (n_test, p), M (p, p), G_train (n_train, p)
    and λ = ``regularization``, by a dense solve."""
    eye = torch.eye(curvature.shape[0], dtype=curvature.dtype)
    return test_gradients @ torch.linalg.solve(curvature + regularization * eye, train_gradients.T)


CURVATURES = ("hessian", "gauss_newton", "empirical_fisher")


def exact_influences(
    model: nn.Module,
    loss_fn,
    train: list,
    test: list,
    regularization: float,
    curvature: str = "hessian",
    **kw,
) -> Tensor:
    """(n_test, n_train) influences of every training sample on every test sample with M the explicit
    ``curvature`` ("hessian", "gauss_newton" or "empirical_fisher") of the mean training loss over
    ``train``; ``kw`` goes to ``hessian`` or ``gauss_newton``. Raises ValueError for another curvature."""
    g_train = per_sample_gradients(model, loss_fn, train)
    g_test = per_sample_gradients(model, loss_fn, test)
    if curvature == "hessian":
        M = hessian(model, loss_fn, train, **kw)
    elif curvature == "gauss_newton":
        M = gauss_newton(model, loss_fn, train, **kw)
    elif curvature == "empirical_fisher":
        M = empirical_fisher(g_train)
    else:
        raise ValueError(f"curvature must be one of {CURVATURES}; got {curvature!r}.")
    return influences(g_test, M, g_train, regularization)
