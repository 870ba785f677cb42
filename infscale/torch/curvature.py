"""Products with the curvature of the mean training loss: Hessian, generalized Gauss-Newton
matrix or empirical Fisher, as matrix-free products or as the explicit (dense) matrix of a block.

Second-order products run inside ``kernels.derivative_kernels`` (the MATH attention backend, RNN
kernels with the derivatives needed), with the user's settings restored afterwards. Inputs x are a
tensor or a mapping of tensors (``model(**x)``); outputs may be any pytree (a HuggingFace
``ModelOutput`` with a cache object): the Gauss-Newton products differentiate its floating tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from .capture import split_outputs
from .data import ToDevice, batch_size_of, call_model, device_batches, merged_batches, take_rows
from .factored import FactoredGradients
from .gradients import GradientEngine
from .kernels import check_curvature_support, derivative_kernels
from .layout import LossFunction, ParameterLayout, SecondOrderMode, _Block, parse_enum
from .memory import default_chunk_size, merge_limits, vector_chunk

__all__ = ["CurvatureOperator"]


def _jvp_with_target(fn, primal, tangent, y: Tensor):
    """The tangent output of ``fn(primal, y)`` along ``tangent``, y held fixed.

    A floating-point target rides along as a primal with an explicit zero tangent:
    some losses' forward-over-reverse formulas (e.g. ``mse_loss``) fail on the
    implicit zero tangent a constant target gets ("ZeroTensors are immutable").
    """
    if y.is_floating_point() or y.is_complex():
        return jvp(fn, (primal, y), (tangent, torch.zeros_like(y)))[1]
    return jvp(lambda p: fn(p, y), (primal,), (tangent,))[1]


def _linearized(outputs_of: Callable[[dict], Any], params: dict[str, Tensor], loss):
    """For Gauss-Newton products: (f, out, vjp_fn, loss_grad) with f(params) the model's floating
    output tensors (``capture.split_outputs``), out their detached values at ``params``, vjp_fn
    the vector-Jacobian product of f there, and loss_grad(out, y) the gradient of the loss in them."""
    rebuild: list = []

    def f(ps: dict[str, Tensor]) -> tuple[Tensor, ...]:
        tensors, back = split_outputs(outputs_of(ps))
        if not rebuild:
            rebuild.append(back)
        return tensors

    out, vjp_fn = vjp(f, params)
    out = tuple(o.detach() for o in out)

    def loss_of(tensors: tuple[Tensor, ...], y: Tensor) -> Tensor:
        return loss(rebuild[0](tensors), y)

    return f, out, vjp_fn, grad(loss_of)


class CurvatureOperator:
    """Products with the curvature of the mean training loss, restricted to one block.

    ``matmat(V)`` returns ``V Hᵀ`` for V of shape (k, p_block), i.e. each row of V
    multiplied by the curvature block. Every sample is weighted equally: batch
    results are weighted by batch size and divided by the number of samples, so
    a short last batch changes nothing.

    Args:
        layout: the parameter layout.
        loss: the loss function ``loss(outputs, targets)``, averaging over the batch.
        data: an iterable of batches (x, y, ...), re-iterated on every product.
        block: the block (default: the first, i.e. the whole model in FULL mode).
        mode: Hessian, Gauss-Newton or empirical Fisher.
        to_device: called on each (x, y) to move it to the model's device and dtype.
        vector_chunk: products with at most this many vectors at once.
        engine: the block's per-sample gradient engine (empirical Fisher), to share one across
            operators (it remembers which inputs passed its check); default: a new one.

    Raises:
        UnsupportedCurvatureError: Hessian or Gauss-Newton mode with a block that holds the weight of
            an ``nn.EmbeddingBag`` (PyTorch has neither derivative for it).
    """

    def __init__(
        self,
        layout: ParameterLayout,
        loss: LossFunction,
        data: Iterable,
        block: _Block,
        mode: SecondOrderMode,
        to_device: ToDevice,
        vector_chunk: int | None = None,
        engine: GradientEngine | None = None,
    ):
        self.layout = layout
        self.loss = loss
        self.data = data
        self.block = block
        self.mode = parse_enum(SecondOrderMode, mode, "second_order_mode")
        check_curvature_support(layout.model, layout.names(block), self.mode.value, "CurvatureOperator")
        self.to_device = to_device
        self.vector_chunk = vector_chunk
        self.params = layout.parameters(block)
        self.fixed = layout.fixed_state(block)
        self.n_products = 0  # number of passes over the data, for diagnostics
        if engine is None and self.mode is SecondOrderMode.EMPIRICAL_FISHER:
            engine = GradientEngine(layout, loss, block)
        self._engine = engine

    def _gradients(self, x, y: Tensor) -> tuple[GradientEngine, FactoredGradients | Tensor]:
        """The block's per-sample gradients of one batch (factored where the model allows)."""
        engine = self._engine
        return engine, engine.factored(x, y, default_chunk_size(engine.size, self.layout.dtype.itemsize))

    @property
    def size(self) -> int:
        return self.block.size

    def _batch_products(self, x, y: Tensor) -> Callable[[Tensor], Tensor]:
        """V (k, p_block) ↦ V Cᵀ for the curvature C of one batch's mean loss; the batch's
        graph is built once and reused for every chunk of vectors."""
        block, layout = self.block, self.layout
        model, fixed, loss = layout.model, self.fixed, self.loss
        if self.mode is SecondOrderMode.EMPIRICAL_FISHER:
            # (1/b) Gᵀ (G v): two products with the batch's per-sample gradients
            engine, G = self._gradients(x, y)
            b = batch_size_of(x)

            def fisher_products(V: Tensor) -> Tensor:
                return engine.weighted_sums(engine.products(V, G), G) / b

            return fisher_products
        if self.mode is SecondOrderMode.HESSIAN:
            # reverse over reverse: the vector-Jacobian product of the batch gradient
            def f(params):
                return loss(call_model(model, x, {**fixed, **params}), y)

            _, hvp = vjp(grad(f), self.params)

            def hessian_products(V: Tensor) -> Tensor:
                (res,) = vmap(hvp)(layout.unflatten(V, block))
                return layout.flatten(res, block, batch_dims=1)

            return hessian_products

        outputs, out, vjp_fn, loss_grad = _linearized(
            lambda params: call_model(model, x, {**fixed, **params}), self.params, loss
        )

        def gauss_newton_products(V: Tensor) -> Tensor:
            jv = vmap(lambda t: jvp(outputs, (self.params,), (t,))[1])(layout.unflatten(V, block))
            hjv = vmap(lambda u: _jvp_with_target(loss_grad, out, u, y))(jv)
            (res,) = vmap(vjp_fn)(hjv)
            return layout.flatten(res, block, batch_dims=1)

        return gauss_newton_products

    def _batches(self) -> Iterator[tuple]:
        """The non-empty (x, y) batches of the data, on the model's device; consecutive small
        batches are concatenated up to ``memory.MERGE_ROWS`` rows and ``memory.MERGE_BYTES`` bytes
        of input (the mean curvature is the same: every batch is weighted by its size)."""
        batches = device_batches(self.data, self.to_device)
        return merged_batches(batches, *merge_limits())

    def matmat(self, V: Tensor) -> Tensor:
        """Curvature times each row of V: (k, p_block) → (k, p_block)."""
        total = torch.zeros_like(V)
        n = 0
        for x, y in self._batches():
            b = batch_size_of(x)
            with derivative_kernels(self.layout.model, self._order):
                products = self._batch_products(x, y)
                chunk = self.vector_chunk or vector_chunk(b)
                for s in range(0, V.shape[0], chunk):
                    total[s : s + chunk] += b * products(V[s : s + chunk])
            n += b
        self.n_products += 1
        if n == 0:
            raise ValueError("the training data is empty: it yielded no samples.")
        return total / n

    @property
    def _order(self) -> int:
        """The order of the model's derivatives the products take: 1 for the empirical Fisher."""
        return 1 if self.mode is SecondOrderMode.EMPIRICAL_FISHER else 2

    def _unit_column_products(self, x, y: Tensor, j: int) -> Callable[[Tensor], Tensor]:
        """For one batch: V (k, numel_j), tangents that live in the block's parameter j only ↦
        their curvature products restricted to the rows of parameters j, j+1, …: (k, rows).

        Differentiation runs only back to parameter j, so later parameters' columns are
        cheap; the rows of earlier parameters follow from symmetry. The batch's graph is
        built once and reused for every chunk of vectors.
        """
        block, model, loss = self.block, self.layout.model, self.loss
        names = block.parameter_names
        name_j = names[j]
        rows = names[j:]
        shape_j = block.shapes[j]
        const = {**self.fixed, **{n: self.params[n] for n in names[:j]}}
        others = {n: self.params[n] for n in rows[1:]}
        p_j = self.params[name_j]

        def flat(d: Mapping[str, Tensor], batch_dims: int = 0) -> Tensor:
            return torch.cat([d[n].reshape(*d[n].shape[:batch_dims], -1) for n in rows], dim=-1)

        if self.mode is SecondOrderMode.HESSIAN:
            # reverse over reverse: the vector-Jacobian product of ∂L/∂θ_j over θ_j, θ_j+1, …
            def gradient_j(ps: dict[str, Tensor]) -> Tensor:
                def f(pj: Tensor) -> Tensor:
                    return loss(call_model(model, x, {**const, **ps, name_j: pj}), y)

                return grad(f)(ps[name_j])

            _, vjp_j = vjp(gradient_j, {**others, name_j: p_j})

            def hessian_rows(V: Tensor) -> Tensor:
                (res,) = vmap(vjp_j)(V.reshape(V.shape[0], *shape_j))
                return flat(res, batch_dims=1)

            return hessian_rows

        outputs_rows, out, vjp_fn, loss_grad = _linearized(
            lambda ps: call_model(model, x, {**const, **ps}), {**others, name_j: p_j}, loss
        )

        def outputs_j(pj):
            return outputs_rows({**others, name_j: pj})

        def gauss_newton_rows(V: Tensor) -> Tensor:
            jv = vmap(lambda t: jvp(outputs_j, (p_j,), (t,))[1])(V.reshape(V.shape[0], *shape_j))
            hjv = vmap(lambda u: _jvp_with_target(loss_grad, out, u, y))(jv)
            (res,) = vmap(vjp_fn)(hjv)
            return flat(res, batch_dims=1)

        return gauss_newton_rows

    def _dense_empirical_fisher(self, H: Tensor) -> Tensor:
        """(1/n) Σᵢ gᵢ gᵢᵀ accumulated into H, per-sample gradients a bounded chunk of rows at a time."""
        n = 0
        for x, y in self._batches():
            rows = default_chunk_size(H.shape[0], H.element_size())
            b = batch_size_of(x)
            for s in range(0, b, rows):
                engine, G = self._gradients(take_rows(x, slice(s, s + rows)), y[s : s + rows])
                G = engine.to_dense(G)
                H.addmm_(G.T, G)
            n += b
        self.n_products += 1
        if n == 0:
            raise ValueError("the training data is empty: it yielded no samples.")
        H /= n
        return (H + H.T) / 2

    def dense(self) -> Tensor:
        """The explicit (p_block, p_block) curvature matrix, symmetric.

        Built column group by column group, one group per parameter tensor with unit
        tangents in that parameter only; each group computes only the rows of its own
        and later parameters (the rest is the transpose of earlier groups), which skips
        most of the symmetric half's work.
        """
        block, layout = self.block, self.layout
        p = block.size
        H = torch.zeros(p, p, dtype=layout.dtype, device=layout.device)
        if self.mode is SecondOrderMode.EMPIRICAL_FISHER:
            return self._dense_empirical_fisher(H)
        columns = list(layout.offsets(block).values())
        n = 0
        for x, y in self._batches():
            b = batch_size_of(x)
            chunk = self.vector_chunk or vector_chunk(b)
            with derivative_kernels(layout.model, self._order):
                for j, numel in enumerate(block.numels):
                    o = columns[j].start
                    products = self._unit_column_products(x, y, j)
                    for s in range(0, numel, chunk):
                        e = min(s + chunk, numel)
                        V = torch.zeros(e - s, numel, dtype=layout.dtype, device=layout.device)
                        V[torch.arange(e - s), torch.arange(s, e)] = 1
                        H[o + s : o + e, o:] += b * products(V)
            n += b
        self.n_products += 1
        if n == 0:
            raise ValueError("the training data is empty: it yielded no samples.")
        H /= n
        for cols in columns:
            o, e = cols.start, cols.stop
            D = H[o:e, o:e]
            D.copy_((D + D.T) / 2)
            H[e:, o:e] = H[o:e, e:].T
        return H
