"""Derivatives with torch.func: per-sample gradients, mixed derivatives, and
curvature-vector products (Hessian or generalized Gauss-Newton) of the mean
training loss.

All functions work on a ``ParameterLayout``: the trainable parameters of a
model, grouped into ordered blocks, each block flattened into one contiguous
slice of a flat vector. Frozen parameters (``requires_grad=False``) and buffers
are held fixed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vjp, vmap
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset, default_collate

from .gradients import FactoredGradients, GradientEngine

__all__ = [
    "BlockMode",
    "SecondOrderMode",
    "ParameterLayout",
    "LossFunction",
    "per_sample_gradients",
    "perturbation_influences",
    "self_perturbation_influences",
    "CurvatureOperator",
    "split_batch",
    "loader_batches",
]

LossFunction = Callable[[Tensor, Tensor], Tensor]

#: bytes of per-sample gradients held at once when no chunk size is given
DEFAULT_GRADIENT_MEMORY = 256 * 2**20
#: curvature products batch this many (vector, sample) pairs at once; measured on
#: the digits MLP, larger vmap batches run slower (cache), smaller ones add overhead
VECTORS_TIMES_SAMPLES = 131_072
#: consecutive loader batches smaller than this many rows (and bytes of input) are concatenated
#: before a curvature product: the mean curvature is the same (batches are weighted by size) and
#: small batches are overhead-bound (seed example, batches of 10: 12 autograd passes → 1 per product)
MERGE_ROWS = 1024
MERGE_BYTES = 2**26


class SecondOrderMode(str, Enum):
    """Which curvature matrix stands for H.

    - ``HESSIAN``: the Hessian of the mean training loss.
    - ``GAUSS_NEWTON``: the generalized Gauss-Newton matrix Jᵀ ∇²_out ℓ J averaged
      over samples; positive semi-definite for convex losses (cross-entropy, MSE).
    - ``EMPIRICAL_FISHER``: the mean of the per-sample gradient outer products
      (1/n) Σᵢ ∇ℓᵢ ∇ℓᵢᵀ; positive semi-definite for any loss, and the cheapest: its
      products need only per-sample gradients. At a well-fitted model its eigenvalues are
      small (the gradients are), so λ weighs more than with the other two. (pyDVL 0.10
      calls this matrix ``GAUSS_NEWTON``.)
    """

    HESSIAN = "hessian"
    GAUSS_NEWTON = "gauss_newton"
    EMPIRICAL_FISHER = "empirical_fisher"


class BlockMode(str, Enum):
    """How the parameters are grouped into blocks of a block-diagonal curvature.

    - ``FULL``: one block with every trainable parameter (no approximation).
    - ``LAYER_WISE``: one block per module that owns parameters.
    - ``PARAMETER_WISE``: one block per parameter tensor.
    """

    FULL = "full"
    LAYER_WISE = "layer_wise"
    PARAMETER_WISE = "parameter_wise"


def _parse_enum(enum_cls, value, argument: str):
    if isinstance(value, enum_cls):
        return value
    for member in enum_cls:
        if value == member.value or (isinstance(value, str) and value.lower() == member.name.lower()):
            return member
    valid = ", ".join(f"{enum_cls.__name__}.{m.name}" for m in enum_cls)
    raise ValueError(f"{argument}={value!r} is not supported; expected one of {valid}.")


@dataclass(frozen=True)
class _Block:
    name: str
    parameter_names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    numels: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return sum(self.numels)

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.size)


class ParameterLayout:
    """The trainable parameters of a model, grouped into ordered blocks.

    The flat parameter vector is the concatenation of the blocks in order; each
    block is the concatenation of its parameters, flattened.

    Args:
        model: the model.
        block_structure: a ``BlockMode`` (or its value) or an ordered mapping
            block name → parameter names (as in ``model.named_parameters()``).

    Raises:
        ValueError: the model has no trainable parameters; a mapping names an
            unknown or frozen parameter, names one twice, or leaves one out.
    """

    def __init__(self, model: nn.Module, block_structure=BlockMode.FULL):
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not trainable:
            raise ValueError(
                f"model={type(model).__name__} has no trainable parameters "
                "(every parameter has requires_grad=False); influences need at least one."
            )
        self.model = model
        groups = self._groups(model, trainable, block_structure)
        blocks, offset = [], 0
        for name, names in groups.items():
            shapes = tuple(trainable[n].shape for n in names)
            numels = tuple(trainable[n].numel() for n in names)
            blocks.append(_Block(name, tuple(names), shapes, numels, offset))
            offset += sum(numels)
        self.blocks: tuple[_Block, ...] = tuple(blocks)
        self.n_parameters = offset
        first = next(iter(trainable.values()))
        self.dtype = first.dtype
        self.device = first.device

    @staticmethod
    def _groups(model, trainable, block_structure) -> dict[str, list[str]]:
        if isinstance(block_structure, Mapping):
            seen: dict[str, str] = {}
            groups = {}
            all_names = {n for n, _ in model.named_parameters()}
            for block, names in block_structure.items():
                names = [names] if isinstance(names, str) else list(names)
                if not names:
                    raise ValueError(f"block_structure[{block!r}] is empty; every block needs a parameter.")
                for n in names:
                    if n not in all_names:
                        raise ValueError(
                            f"block_structure[{block!r}] names parameter {n!r}, which the model does "
                            f"not have; parameters are {sorted(all_names)}."
                        )
                    if n not in trainable:
                        raise ValueError(
                            f"block_structure[{block!r}] names parameter {n!r}, which is frozen "
                            "(requires_grad=False)."
                        )
                    if n in seen:
                        raise ValueError(
                            f"block_structure names parameter {n!r} twice (blocks {seen[n]!r} and {block!r})."
                        )
                    seen[n] = block
                groups[str(block)] = names
            missing = [n for n in trainable if n not in seen]
            if missing:
                raise ValueError(
                    f"block_structure leaves out trainable parameters {missing}; put each in a block, "
                    "or freeze it with requires_grad_(False)."
                )
            return groups
        mode = _parse_enum(BlockMode, block_structure, "block_structure")
        if mode is BlockMode.FULL:
            return {"model": list(trainable)}
        if mode is BlockMode.PARAMETER_WISE:
            return {n: [n] for n in trainable}
        groups = {}
        for n in trainable:
            module = n.rsplit(".", 1)[0] if "." in n else n
            groups.setdefault(module, []).append(n)
        return groups

    @property
    def block_names(self) -> list[str]:
        return [b.name for b in self.blocks]

    def block(self, name: str) -> _Block:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(name)

    def parameters(self, block: _Block | None = None) -> dict[str, Tensor]:
        """Detached trainable parameters (of one block, or all) by name."""
        params = dict(self.model.named_parameters())
        names = block.parameter_names if block else [n for b in self.blocks for n in b.parameter_names]
        return {n: params[n].detach() for n in names}

    def fixed_state(self, block: _Block | None = None) -> dict[str, Tensor]:
        """Everything held fixed in a functional call: buffers, frozen parameters,
        and (for a block) the trainable parameters outside it."""
        varying = set(block.parameter_names) if block else {n for b in self.blocks for n in b.parameter_names}
        state = {n: p.detach() for n, p in self.model.named_parameters() if n not in varying}
        state.update({n: b for n, b in self.model.named_buffers()})
        return state

    def flatten(
        self, tensors: Mapping[str, Tensor], block: _Block | None = None, batch_dims: int = 0
    ) -> Tensor:
        """Concatenate ``tensors`` (in layout order) into (*batch, p)."""
        names = block.parameter_names if block else [n for b in self.blocks for n in b.parameter_names]
        return torch.cat([tensors[n].reshape(*tensors[n].shape[:batch_dims], -1) for n in names], dim=-1)

    def unflatten(self, flat: Tensor, block: _Block | None = None) -> dict[str, Tensor]:
        """Split (*batch, p) into a dict of (*batch, *param_shape)."""
        blocks = [block] if block else list(self.blocks)
        out, start = {}, 0
        batch = flat.shape[:-1]
        for b in blocks:
            for n, shape, numel in zip(b.parameter_names, b.shapes, b.numels):
                out[n] = flat[..., start : start + numel].reshape(*batch, *shape)
                start += numel
        return out


def split_batch(batch, argument: str = "batch") -> tuple[Tensor, Tensor]:
    """The (x, y) of a data loader batch: a tuple or list whose first two items are x and y."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(
        f"{argument} must be a tuple or list (x, y, ...) of tensors; got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        + "."
    )


def tensor_dataset_batches(data: Iterable) -> list[tuple[Tensor, ...]] | None:
    """The batches of a sequential, default-collated DataLoader over a TensorDataset, as views
    (slices) of the dataset's tensors: the same values the loader yields, without the per-sample
    indexing and stacking of each pass. None for any other iterable (it is iterated as given)."""
    if not (
        isinstance(data, DataLoader)
        and type(data.dataset) is TensorDataset
        and type(data.sampler) is SequentialSampler
        and type(data.batch_sampler) is BatchSampler
        and data.collate_fn is default_collate
        and data.batch_size is not None
    ):
        return None
    tensors, size = data.dataset.tensors, data.batch_size
    n = len(data.dataset)
    stop = n - n % size if data.drop_last else n
    return [tuple(t[s : s + size] for t in tensors) for s in range(0, stop, size)]


def loader_batches(data: Iterable) -> Iterable:
    """The batches of ``data`` in order: slices of the tensors for a sequential DataLoader over a
    TensorDataset (``tensor_dataset_batches``), else ``data`` itself, iterated as given."""
    views = tensor_dataset_batches(data)
    return data if views is None else views


def _jvp_with_target(fn, primal, tangent, y: Tensor):
    """The tangent output of ``fn(primal, y)`` along ``tangent``, y held fixed.

    A floating-point target rides along as a primal with an explicit zero tangent:
    some losses' forward-over-reverse formulas (e.g. ``mse_loss``) fail on the
    implicit zero tangent a constant target gets ("ZeroTensors are immutable").
    """
    if y.is_floating_point() or y.is_complex():
        return jvp(fn, (primal, y), (tangent, torch.zeros_like(y)))[1]
    return jvp(lambda p: fn(p, y), (primal,), (tangent,))[1]


def _single_sample_loss(layout: ParameterLayout, loss: LossFunction, block=None):
    model = layout.model

    def sample_loss(params: dict[str, Tensor], fixed: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, {**fixed, **params}, (x.unsqueeze(0),))
        return loss(out, y.unsqueeze(0))

    return sample_loss


def default_chunk_size(n_parameters: int, itemsize: int, factor: int = 1) -> int:
    return max(1, DEFAULT_GRADIENT_MEMORY // max(1, n_parameters * itemsize * factor))


def gradient_engine(
    layout: ParameterLayout, loss: LossFunction, block: _Block | None = None
) -> GradientEngine:
    """The per-sample gradient engine of the layout's parameters (of one block, if given)."""
    names = list(block.parameter_names) if block else [n for b in layout.blocks for n in b.parameter_names]
    return GradientEngine(layout.model, loss, names, layout.parameters(block), layout.fixed_state(block))


def per_sample_gradients(
    layout: ParameterLayout,
    loss: LossFunction,
    x: Tensor,
    y: Tensor,
    chunk_size: int | None = None,
    block: _Block | None = None,
) -> Tensor:
    """Per-sample gradients ∇_θ ℓ(x_i, y_i), shape (n, p) (p of the block if given).

    ``nn.Linear`` layers come from one batched forward/backward (see
    ``infscale.torch.gradients``); other parameters from ``vmap(grad)`` in chunks of
    ``chunk_size`` samples, so memory stays bounded by chunk_size · (p + activations).
    """
    engine = gradient_engine(layout, loss, block)
    chunk = chunk_size or default_chunk_size(engine.size, x.element_size())
    return engine.gradients(x, y, chunk)


def perturbation_influences(
    layout: ParameterLayout,
    loss: LossFunction,
    factors: Tensor,
    x: Tensor,
    y: Tensor,
    chunk_size: int | None = None,
) -> Tensor:
    """∂/∂x_j [factors_i · ∇_θ ℓ(x_j, y_j)] for every factor row i and sample j.

    Returns (n_factors, n, *x.shape[1:]). Uses reverse mode over the factors when
    there are fewer factors than input features, forward mode over the input
    features otherwise; never forms the p × d mixed-derivative matrix.
    """
    params = layout.parameters()
    fixed = layout.fixed_state()
    sample_loss = _single_sample_loss(layout, loss)
    n_features = max(1, x[0].numel()) if x.shape[0] else 1

    def projected_grad(xi: Tensor, yi: Tensor) -> Tensor:
        g = grad(sample_loss)(params, fixed, xi, yi)
        return factors @ layout.flatten(g)

    if factors.shape[0] <= n_features:
        per_sample = vmap(jacrev(projected_grad), in_dims=(0, 0))
    elif y.is_floating_point():
        # forward mode with a floating target: give it a tangent too (and drop its
        # columns), as some losses' forward-over-reverse formulas fail without one
        per_sample = vmap(lambda xi, yi: jacfwd(projected_grad, argnums=(0, 1))(xi, yi)[0], in_dims=(0, 0))
    else:
        per_sample = vmap(jacfwd(projected_grad), in_dims=(0, 0))
    chunk = chunk_size or default_chunk_size(
        layout.n_parameters, x.element_size(), factor=max(1, min(factors.shape[0], n_features))
    )
    parts = [per_sample(x[s : s + chunk], y[s : s + chunk]) for s in range(0, x.shape[0], chunk)]
    if not parts:
        return x.new_zeros((factors.shape[0], 0, *x.shape[1:]))
    return torch.cat(parts).transpose(0, 1)


def self_perturbation_influences(
    layout: ParameterLayout,
    loss: LossFunction,
    factors: Tensor,
    x: Tensor,
    y: Tensor,
    chunk_size: int | None = None,
) -> Tensor:
    """∂/∂x_i [factors_i · ∇_θ ℓ(x_i, y_i)] with factors_i held fixed: (n, *x.shape[1:])."""
    params = layout.parameters()
    fixed = layout.fixed_state()
    sample_loss = _single_sample_loss(layout, loss)

    def projected_grad(xi: Tensor, yi: Tensor, fi: Tensor) -> Tensor:
        g = grad(sample_loss)(params, fixed, xi, yi)
        return fi @ layout.flatten(g)

    per_sample = vmap(grad(projected_grad), in_dims=(0, 0, 0))
    chunk = chunk_size or default_chunk_size(layout.n_parameters, x.element_size(), factor=2)
    parts = [
        per_sample(x[s : s + chunk], y[s : s + chunk], factors[s : s + chunk])
        for s in range(0, x.shape[0], chunk)
    ]
    return torch.cat(parts) if parts else x.new_zeros(x.shape)


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
    """

    def __init__(
        self,
        layout: ParameterLayout,
        loss: LossFunction,
        data: Iterable,
        block: _Block,
        mode: SecondOrderMode,
        to_device: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
        vector_chunk: int | None = None,
        engine: GradientEngine | None = None,
    ):
        self.layout = layout
        self.loss = loss
        self.data = data
        self.block = block
        self.mode = _parse_enum(SecondOrderMode, mode, "second_order_mode")
        self.to_device = to_device
        self.vector_chunk = vector_chunk
        self.params = layout.parameters(block)
        self.fixed = layout.fixed_state(block)
        self.n_products = 0  # number of passes over the data, for diagnostics
        self._engine = engine

    def _gradients(self, x: Tensor, y: Tensor) -> tuple[GradientEngine, FactoredGradients | Tensor]:
        """The block's per-sample gradients of one batch (factored where the model allows)."""
        if self._engine is None:
            self._engine = gradient_engine(self.layout, self.loss, self.block)
        engine = self._engine
        return engine, engine.factored(x, y, default_chunk_size(engine.size, x.element_size()))

    @property
    def size(self) -> int:
        return self.block.size

    def _batch_loss(self, x: Tensor, y: Tensor):
        model, fixed, loss = self.layout.model, self.fixed, self.loss

        def f(params):
            return loss(functional_call(model, {**fixed, **params}, (x,)), y)

        return f

    def _batch_products(self, x: Tensor, y: Tensor) -> Callable[[Tensor], Tensor]:
        """V (k, p_block) ↦ V Cᵀ for the curvature C of one batch's mean loss; the batch's
        graph is built once and reused for every chunk of vectors."""
        block, layout = self.block, self.layout
        model, fixed, loss = layout.model, self.fixed, self.loss
        if self.mode is SecondOrderMode.EMPIRICAL_FISHER:
            # (1/b) Gᵀ (G v): two products with the batch's per-sample gradients
            engine, G = self._gradients(x, y)
            b = x.shape[0]

            def fisher_products(V: Tensor) -> Tensor:
                return engine.weighted_sums(engine.products(V, G), G) / b

            return fisher_products
        if self.mode is SecondOrderMode.HESSIAN:
            # reverse over reverse: the vector-Jacobian product of the batch gradient
            def f(params):
                return loss(functional_call(model, {**fixed, **params}, (x,)), y)

            _, hvp = vjp(grad(f), self.params)

            def hessian_products(V: Tensor) -> Tensor:
                (res,) = vmap(hvp)(layout.unflatten(V, block))
                return layout.flatten(res, block, batch_dims=1)

            return hessian_products

        def outputs(params):
            return functional_call(model, {**fixed, **params}, (x,))

        out, vjp_fn = vjp(outputs, self.params)
        out = out.detach()
        loss_grad = grad(loss)

        def gauss_newton_products(V: Tensor) -> Tensor:
            jv = vmap(lambda t: jvp(outputs, (self.params,), (t,))[1])(layout.unflatten(V, block))
            hjv = vmap(lambda u: _jvp_with_target(loss_grad, out, u, y))(jv)
            (res,) = vmap(vjp_fn)(hjv)
            return layout.flatten(res, block, batch_dims=1)

        return gauss_newton_products

    def _batches(self) -> Iterable[tuple[Tensor, Tensor]]:
        """The non-empty (x, y) batches of the data, on the model's device; consecutive small
        batches are concatenated up to ``MERGE_ROWS`` rows and ``MERGE_BYTES`` bytes of input."""
        pending: list[tuple[Tensor, Tensor]] = []
        rows = nbytes = 0

        def merged() -> tuple[Tensor, Tensor]:
            if len(pending) == 1:
                return pending[0]
            return torch.cat([x for x, _ in pending]), torch.cat([y for _, y in pending])

        for batch in loader_batches(self.data):
            x, y = self.to_device(*split_batch(batch))
            if not x.shape[0]:
                continue
            size = x.element_size() * x.numel()
            if pending and (rows + x.shape[0] > MERGE_ROWS or nbytes + size > MERGE_BYTES):
                yield merged()
                pending, rows, nbytes = [], 0, 0
            pending.append((x, y))
            rows, nbytes = rows + x.shape[0], nbytes + size
        if pending:
            yield merged()

    def matmat(self, V: Tensor) -> Tensor:
        """Curvature times each row of V: (k, p_block) → (k, p_block)."""
        total = torch.zeros_like(V)
        n = 0
        for x, y in self._batches():
            b = x.shape[0]
            products = self._batch_products(x, y)
            chunk = self.vector_chunk or max(1, VECTORS_TIMES_SAMPLES // b)
            for s in range(0, V.shape[0], chunk):
                total[s : s + chunk] += b * products(V[s : s + chunk])
            n += b
        self.n_products += 1
        if n == 0:
            raise ValueError("the training data is empty: it yielded no samples.")
        return total / n

    def _unit_column_products(self, x: Tensor, y: Tensor, j: int) -> Callable[[Tensor], Tensor]:
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
                    return loss(functional_call(model, {**const, **ps, name_j: pj}, (x,)), y)

                return grad(f)(ps[name_j])

            _, vjp_j = vjp(gradient_j, {**others, name_j: p_j})

            def hessian_rows(V: Tensor) -> Tensor:
                (res,) = vmap(vjp_j)(V.reshape(V.shape[0], *shape_j))
                return flat(res, batch_dims=1)

            return hessian_rows

        def outputs_rows(ps):
            return functional_call(model, {**const, **ps}, (x,))

        def outputs_j(pj):
            return functional_call(model, {**const, **others, name_j: pj}, (x,))

        out, vjp_fn = vjp(outputs_rows, {**others, name_j: p_j})
        out = out.detach()
        loss_grad = grad(loss)

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
            rows = default_chunk_size(H.shape[0], x.element_size())
            for s in range(0, x.shape[0], rows):
                engine, G = self._gradients(x[s : s + rows], y[s : s + rows])
                G = engine.to_dense(G)
                H.addmm_(G.T, G)
            n += x.shape[0]
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
        offsets = [0]
        for numel in block.numels:
            offsets.append(offsets[-1] + numel)
        n = 0
        for x, y in self._batches():
            b = x.shape[0]
            chunk = self.vector_chunk or max(1, VECTORS_TIMES_SAMPLES // b)
            for j, numel in enumerate(block.numels):
                o = offsets[j]
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
        for j in range(len(block.numels)):
            o, e = offsets[j], offsets[j + 1]
            D = H[o:e, o:e]
            D.copy_((D + D.T) / 2)
            H[e:, o:e] = H[o:e, e:].T
        return H


def block_regularization(layout: ParameterLayout, regularization, default: float = 0.0) -> dict[str, float]:
    """Per-block regularization from a float or a dict keyed by block name.

    Blocks missing from a dict get ``default``. Unknown keys and negative values raise.
    """
    if isinstance(regularization, Mapping):
        unknown = [k for k in regularization if k not in layout.block_names]
        if unknown:
            raise ValueError(
                f"hessian_regularization has keys {unknown} that are no block; blocks are "
                f"{layout.block_names}."
            )
        values = {b: float(regularization.get(b, default)) for b in layout.block_names}
    else:
        try:
            value = float(regularization)
        except (TypeError, ValueError):
            raise ValueError(
                f"hessian_regularization must be a float or a dict block → float; got {regularization!r}."
            ) from None
        values = {b: value for b in layout.block_names}
    for b, v in values.items():
        if not v >= 0:
            raise ValueError(f"hessian_regularization for block {b!r} is {v}; it must be ≥ 0.")
    return values


def stack_rows(rows: Sequence[Tensor]) -> Tensor:
    return torch.cat(list(rows), dim=0)
