"""Kernel choices that make a model's derivatives computable, switched on only while computing them.

Some fast kernels have no derivative of the order a computation needs:

- ``F.scaled_dot_product_attention`` (HuggingFace BERT/GPT-2, ``nn.MultiheadAttention``) dispatches to
  flash / memory-efficient kernels whose backward has no derivative: Hessian- and Gauss-Newton-vector
  products and mixed derivatives need the MATH backend.
- ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` take a fused inference fast path when no
  input requires grad (as under ``jvp``), which has no forward-mode derivative: it is switched off.
- Under ``vmap`` (per-sample gradients of modules the batched pass does not cover), the fused
  attention kernels have no batching rule: ``vmap_kernels`` selects the MATH backend there too.
- The oneDNN (mkldnn) LSTM kernel of float32 CPU models has no forward-mode derivative (Gauss-Newton
  products use ``jvp``); the cuDNN RNN kernels have no double backward, and their backward runs only in
  training mode (influences are taken in eval mode).

``derivative_kernels(model, order)`` selects kernels that have the derivatives for the duration of a
``with`` block and restores the user's settings afterwards: no user code changes.
``check_curvature_support`` raises a named error where no kernel exists (``nn.EmbeddingBag``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from ..errors import UnsupportedCurvatureError

__all__ = ["derivative_kernels", "needs_kernel_switch", "vmap_kernels", "check_curvature_support"]


@contextmanager
def _flag(module, name: str, value: bool) -> Iterator[None]:
    """Sets ``module.name`` to ``value`` (a torch.backends switch) and restores it afterwards."""
    previous = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, previous)


def _has_rnn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.RNNBase) for m in model.modules())


def needs_kernel_switch(model: nn.Module, order: int) -> bool:
    """Whether ``derivative_kernels(model, order)`` changes any setting (a caller on a hot path may
    skip it when not)."""
    return order >= 2 or (_has_rnn(model) and _on_cuda(model))


@contextmanager
def _no_mha_fastpath() -> Iterator[None]:
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


@contextmanager
def derivative_kernels(model: nn.Module, order: int) -> Iterator[None]:
    """Within the block, ``model``'s derivatives of ``order`` (1: gradients; 2: Hessian-, Gauss-Newton-
    vector products, mixed derivatives) are computable:

    - order 2: scaled-dot-product attention on the MATH backend (``torch.nn.attention.sdpa_kernel``),
      the fused transformer fast path off (``torch.backends.mha``); with RNN modules, oneDNN off
      (float32 forward-mode derivatives) and cuDNN off (double backward);
    - order 1: with RNN modules on a CUDA device, cuDNN off (its RNN backward needs training mode).

    The previous settings come back when the block ends, also on an error.
    """
    with ExitStack() as stack:
        rnn = _has_rnn(model)
        if order >= 2:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            stack.enter_context(_no_mha_fastpath())
            if rnn:
                stack.enter_context(_flag(torch.backends.mkldnn, "enabled", False))
        if rnn and (order >= 2 or _on_cuda(model)):
            stack.enter_context(_flag(torch.backends.cudnn, "enabled", False))
        yield


@contextmanager
def vmap_kernels() -> Iterator[None]:
    """Within the block, scaled-dot-product attention runs on the MATH backend, whose operations
    ``vmap`` batches (the fused kernels have no batching rule: vmap would loop over the samples
    inside, with a warning), and the fused transformer fast path is off. The previous settings come
    back afterwards."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), _no_mha_fastpath():
        yield


def _on_cuda(model: nn.Module) -> bool:
    return any(p.is_cuda for p in model.parameters())


def check_curvature_support(model: nn.Module, varying: Iterable[str], mode: str, where: str = "") -> None:
    """Raises ``UnsupportedCurvatureError`` when the curvature ``mode`` ("hessian" or
    "gauss_newton") needs a derivative PyTorch does not have for a parameter in ``varying``
    (names as in ``model.named_parameters()``): ``nn.EmbeddingBag``'s backward has no derivative
    (no Hessian-vector products) and its forward no forward-mode derivative (no Gauss-Newton-vector
    products). The empirical Fisher needs first-order gradients only and is always supported."""
    mode = getattr(mode, "value", mode)
    if mode not in ("hessian", "gauss_newton"):
        return
    names = {id(p): n for n, p in model.named_parameters()}
    wanted = set(varying)
    for module_name, m in model.named_modules():
        if isinstance(m, nn.EmbeddingBag) and names.get(id(m.weight)) in wanted:
            raise UnsupportedCurvatureError(
                f"{where + ': ' if where else ''}second_order_mode={mode!r} needs second derivatives through "
                f"nn.EmbeddingBag {module_name!r} (parameter {names[id(m.weight)]!r}), which PyTorch does "
                "not provide (its backward has no derivative, its forward no forward-mode derivative). "
                "Use second_order_mode='empirical_fisher', which needs first-order gradients only; or "
                "nn.Embedding followed by a sum or mean over the bag (the same function); or hold the "
                "weight fixed (requires_grad_(False))."
            )
