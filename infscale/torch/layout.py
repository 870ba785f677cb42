"""Which numbers influences are taken over: the trainable parameters of a model, grouped into
ordered blocks, each block flattened into one contiguous slice of a flat vector.

Also the two enums every method is configured with (``SecondOrderMode``, ``BlockMode``), the one
parser that turns a string or an enum member into a member, and the per-block regularization.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

import torch
from torch import Tensor, nn

__all__ = [
    "LossFunction",
    "SecondOrderMode",
    "BlockMode",
    "parse_enum",
    "ParameterLayout",
    "block_regularization",
]

#: ``loss(outputs, targets)``, averaging over the batch
LossFunction = Callable[[Tensor, Tensor], Tensor]

E = TypeVar("E", bound=Enum)


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


def parse_enum(enum_cls: type[E], value, argument: str) -> E:
    """The member of ``enum_cls`` that ``value`` names: a member, its value, or its name in any case.

    Raises:
        ValueError: naming ``argument``, the value given and the members expected.
    """
    if isinstance(value, enum_cls):
        return value
    for member in enum_cls:
        if value == member.value or (isinstance(value, str) and value.lower() == member.name.lower()):
            return member
    valid = ", ".join(f"{enum_cls.__name__}.{m.name}" for m in enum_cls)
    raise ValueError(f"{argument}={value!r} is not supported; expected one of {valid}.")


#: the former private name, kept for old imports
_parse_enum = parse_enum


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
    block is the concatenation of its parameters, flattened row-major. The layout never
    changes the model: parameters it leaves out are only *held fixed* in functional calls.

    Args:
        model: the model.
        block_structure: a ``BlockMode`` (or its value) or an ordered mapping
            block name → parameter names (as in ``model.named_parameters()``).
        held_fixed: names of trainable parameters to treat as frozen (held fixed and left
            out of every block), without touching their ``requires_grad``.

    Raises:
        ValueError: the model has no trainable parameters; a mapping names an
            unknown or frozen parameter, names one twice, or leaves one out.
    """

    def __init__(self, model: nn.Module, block_structure=BlockMode.FULL, held_fixed: Iterable[str] = ()):
        held = set(held_fixed)
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad and n not in held}
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
                            "(requires_grad=False) or held fixed."
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
        mode = parse_enum(BlockMode, block_structure, "block_structure")
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

    def names(self, block: _Block | None = None) -> list[str]:
        """The parameter names of one block (or of all blocks), in flat-vector order."""
        return list(block.parameter_names) if block else [n for b in self.blocks for n in b.parameter_names]

    def offsets(self, block: _Block | None = None) -> dict[str, slice]:
        """name → the parameter's slice of the flat vector of ``block`` (of the whole layout
        if None): the positions of its numbers, flattened row-major."""
        blocks = [block] if block else list(self.blocks)
        out, start = {}, 0
        for b in blocks:
            for n, numel in zip(b.parameter_names, b.numels):
                out[n] = slice(start, start + numel)
                start += numel
        return out

    def parameters(self, block: _Block | None = None) -> dict[str, Tensor]:
        """Detached trainable parameters (of one block, or all) by name: views of the model's
        current values."""
        params = dict(self.model.named_parameters())
        return {n: params[n].detach() for n in self.names(block)}

    def fixed_state(self, block: _Block | None = None) -> dict[str, Tensor]:
        """Everything held fixed in a functional call: buffers, frozen and held-fixed parameters,
        and (for a block) the trainable parameters outside it."""
        varying = set(self.names(block))
        state = {n: p.detach() for n, p in self.model.named_parameters() if n not in varying}
        state.update({n: b for n, b in self.model.named_buffers()})
        return state

    def flatten(
        self, tensors: Mapping[str, Tensor], block: _Block | None = None, batch_dims: int = 0
    ) -> Tensor:
        """Concatenate ``tensors`` (in layout order) into (*batch, p)."""
        return torch.cat(
            [tensors[n].reshape(*tensors[n].shape[:batch_dims], -1) for n in self.names(block)], dim=-1
        )

    def unflatten(self, flat: Tensor, block: _Block | None = None) -> dict[str, Tensor]:
        """Split (*batch, p) into a dict of (*batch, *param_shape)."""
        blocks = [block] if block else list(self.blocks)
        batch = flat.shape[:-1]
        shapes = {n: s for b in blocks for n, s in zip(b.parameter_names, b.shapes)}
        return {n: flat[..., cols].reshape(*batch, *shapes[n]) for n, cols in self.offsets(block).items()}


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
