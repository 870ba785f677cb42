"""The blocks EK-FAC models, which modules use them, and the linear algebra on their two sides.

Two kinds of block:

- **Kronecker** blocks: a weight used as a matrix by ``nn.Linear``, HuggingFace's ``Conv1D`` (GPT-2;
  ``y = x W + b`` with W stored (in, out)), ``nn.Conv2d`` (groups=1) and ``nn.Embedding`` (one-hot
  inputs), with the module's bias when it has one. The block matrix is the weight as stored, 2-d
  (``W.reshape(W.shape[0], -1)``), with the bias appended on the activation side: as a last column
  for Linear / Conv2d (``[W | b]``), as a last row for Conv1D (``[W; bᵀ]``). In both cases the flat
  layout (weight row-major, then bias) is the block matrix read row-major, up to that split. A
  module's per-sample gradient is Σ_t r_t c_tᵀ over its locations t, with (r, c) = (δ, ã) for
  Linear / Conv2d and (ã, δ) for Conv1D / Embedding (their weight is the transpose of a Linear's).
  A weight shared by several modules (GPT-2's ``wte`` and ``lm_head``) is one block with several
  *uses*.
- **Diagonal** blocks: the parameters of an elementwise-affine module (LayerNorm, GroupNorm,
  RMSNorm, BatchNorm in eval mode, or types the caller adds), and biases shared between modules.

An embedding's activation side is kept as token indices (``OneHot``), never as (n, T, V) one-hot
vectors.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["Use", "Block", "OneHot", "find_blocks", "module_label", "to_matrix", "to_flat"]

#: module types modelled as diagonal blocks (elementwise affine, samples independent in eval mode)
DIAGONAL_TYPES: tuple[type, ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._BatchNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
KRONECKER_LAYERS = (
    "torch.nn.Linear and torch.nn.Conv2d (groups=1), torch.nn.Embedding and transformers' Conv1D as "
    "Kronecker blocks, and LayerNorm, GroupNorm, RMSNorm and BatchNorm (eval mode) as diagonal blocks"
)


def module_label(path: str, module: nn.Module) -> str:
    return f"{path!r} ({type(module).__name__})" if path else f"the model itself ({type(module).__name__})"


def _hf_conv1d() -> type | None:
    """transformers' Conv1D class if transformers is loaded (a model using it has imported it)."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


@dataclass
class Use:
    """One module's use of a block's parameters."""

    path: str
    module: nn.Module
    kind: str  # "linear" | "conv1d" | "conv2d" | "embedding" | "diagonal"
    local: dict[str, str] = field(default_factory=dict)  # diagonal: module-local name → full name

    @property
    def transposed(self) -> bool:
        """The module's (gradient side, activation side) matrix is the block matrix transposed."""
        return self.kind in ("conv1d", "embedding")


@dataclass
class Block:
    """A block of the parameter layout and its curvature model ("kronecker" or "diagonal")."""

    name: str
    model: str
    params: list[str]  # full parameter names in layout order
    uses: list[Use]
    rows: int  # the block matrix (diagonal blocks: 1 × p)
    cols: int
    bias: str | None = None

    @property
    def kind(self) -> str:
        if self.model == "diagonal":
            return "diagonal"
        return self.uses[0].kind if len(self.uses) == 1 else "shared"

    @property
    def transposed(self) -> bool:
        return self.model == "kronecker" and self.uses[0].transposed

    @property
    def n_weight(self) -> int:
        return self.rows * self.cols - (
            0 if self.bias is None else (self.cols if self.transposed else self.rows)
        )

    @property
    def one_hot_side(self) -> str | None:
        """The side kept in the identity basis: the vocabulary side of an embedding used alone."""
        return "rows" if self.kind == "embedding" else None


# ---------------------------------------------------------------- flat layout ↔ matrices
def to_matrix(block: Block, flat: Tensor) -> Tensor:
    """(k, p_block) in the flat layout → (k, rows, cols) block matrices."""
    k = flat.shape[0]
    if block.bias is None or block.transposed:
        return flat.reshape(k, block.rows, block.cols)
    w = flat[:, : block.n_weight].reshape(k, block.rows, -1)
    return torch.cat([w, flat[:, block.n_weight :].reshape(k, block.rows, 1)], dim=2)


def to_flat(block: Block, M: Tensor) -> Tensor:
    """(k, rows, cols) block matrices → (k, p_block) in the flat layout."""
    k = M.shape[0]
    if block.bias is None or block.transposed:
        return M.reshape(k, -1)
    return torch.cat([M[:, :, :-1].reshape(k, -1), M[:, :, -1]], dim=1)


# ---------------------------------------------------------------- discovery
def _kronecker_kind(module: nn.Module) -> str | None:
    conv1d = _hf_conv1d()
    if isinstance(module, nn.Linear):
        return "linear"
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def _reason(module: nn.Module, kind: str | None, diagonal: tuple[type, ...]) -> str | None:
    """Why ``module`` cannot be modelled, or None."""
    own = dict(module.named_parameters(recurse=False))
    if kind is None:
        if not isinstance(module, diagonal):
            return f"EK-FAC has no curvature model for {type(module).__name__}; it models {KRONECKER_LAYERS}"
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
            module.training or module.running_mean is None
        ):
            return (
                "in training mode (or without running statistics) BatchNorm couples the samples of a batch; "
                "put the model in eval mode"
            )
        return None
    weight, bias = own.get("weight"), own.get("bias")
    if weight is None or not weight.requires_grad:
        return "its weight is frozen but its bias is trainable; freeze both or neither"
    if kind in ("linear", "conv1d") and weight.ndim != 2:
        return f"its weight has shape {tuple(weight.shape)}; EK-FAC needs a 2-d weight"
    if kind == "conv2d" and module.groups != 1:
        return f"groups={module.groups}; only Conv2d with groups=1 is supported"
    if kind == "embedding" and (module.max_norm is not None or module.scale_grad_by_freq):
        return "max_norm (which rewrites the weight) and scale_grad_by_freq are not supported"
    del bias
    return None


def _matrix_shape(use: Use, weight: Tensor, bias: bool) -> tuple[int, int]:
    rows, cols = weight.shape[0], weight[0].numel()
    if bias:
        return (rows + 1, cols) if use.transposed else (rows, cols + 1)
    return rows, cols


def find_blocks(model: nn.Module, diagonal_types: Sequence[type] = ()):
    """The blocks of ``model`` and the modules left out.

    Returns:
        ``(blocks, unsupported)``: blocks in module order; unsupported is a list of
        (path, module, trainable parameter names, reason).
    """
    diagonal = DIAGONAL_TYPES + tuple(diagonal_types)
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    modules = list(model.named_modules())
    claims: dict[int, list[tuple[str, str, nn.Module, str]]] = {}  # param id → (role, path, module, local)
    unsupported = []
    for path, module in modules:
        own = [(local, p) for local, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        kind = _kronecker_kind(module)
        reason = _reason(module, kind, diagonal)
        if reason is not None:
            unsupported.append((path, module, [names[id(p)] for _, p in own], reason))
            continue
        for local, p in own:
            role = "weight" if kind is not None and local == "weight" else "bias" if kind else "diagonal"
            claims.setdefault(id(p), []).append((role, path, module, local))
    # a parameter also owned by a modelled module is covered (HuggingFace ties decoder biases so)
    unsupported = [u for u in unsupported if any(id(p) not in claims for p in _own(u[1]))]
    for pid, uses in claims.items():
        if len({role for role, *_ in uses}) > 1:
            raise ValueError(
                f"EkfacInfluence: parameter {names[pid]!r} is used in different roles by modules "
                f"{[path for _, path, _, _ in uses]}; EK-FAC cannot model it."
            )
    params = dict(model.named_parameters())
    kronecker = [_kronecker_block(uses, claims, names) for uses in claims.values() if uses[0][0] == "weight"]
    in_kronecker = {id(params[n]): b for b in kronecker for n in b.params}
    blocks: list[Block] = []
    emitted: set[int] = set()
    for path, module in modules:
        for _, p in module.named_parameters(recurse=False):
            pid = id(p)
            if pid not in claims or pid in emitted:
                continue
            if pid in in_kronecker:
                block = in_kronecker[pid]
            elif claims[pid][0][0] == "bias":  # a bias its weight's block does not hold (shared)
                block = _diagonal_block([pid], claims, names, params, names[pid])
            else:
                group = [
                    id(q)
                    for _, q in module.named_parameters(recurse=False)
                    if id(q) in claims and id(q) not in emitted and claims[id(q)][0][0] == "diagonal"
                ]
                block = _diagonal_block(group, claims, names, params, path or "root")
            blocks.append(block)
            emitted.update(id(params[n]) for n in block.params)
    return blocks, unsupported


def _own(module: nn.Module) -> list[Tensor]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def _kronecker_block(own: list, claims: dict, names: dict[int, str]) -> Block:
    """The block of one weight (``own``: its claims); the bias joins when one module uses both."""
    uses = [Use(path, module, _kronecker_kind(module)) for _, path, module, _ in own]
    weight = dict(own[0][2].named_parameters(recurse=False))["weight"]
    bias = None
    if len(uses) == 1:
        b = dict(uses[0].module.named_parameters(recurse=False)).get("bias")
        if b is not None and b.requires_grad and len(claims[id(b)]) == 1:
            bias = names[id(b)]
    rows, cols = _matrix_shape(uses[0], weight, bias is not None)
    name = uses[0].path or "root"
    return Block(name, "kronecker", [names[id(weight)]] + ([bias] if bias else []), uses, rows, cols, bias)


def _diagonal_block(group: list[int], claims, names, params, name: str) -> Block:
    uses: dict[int, Use] = {}
    for pid in group:
        for _, path, module, local in claims[pid]:
            uses.setdefault(id(module), Use(path, module, "diagonal")).local[local] = names[pid]
    full = [names[pid] for pid in group]
    return Block(name, "diagonal", full, list(uses.values()), 1, sum(params[n].numel() for n in full))


# ---------------------------------------------------------------- the two sides of a block
@dataclass
class OneHot:
    """One-hot vectors kept as indices: ``index`` (n, T), -1 where there is no token (the padding
    index, or a masked position)."""

    index: Tensor
    size: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.index.shape, self.size)

    def masked(self, mask: Tensor | None) -> OneHot:
        return self if mask is None else OneHot(self.index.masked_fill(mask == 0, -1), self.size)

    def dense(self, dtype: torch.dtype) -> Tensor:
        hot = torch.nn.functional.one_hot(self.index.clamp_min(0), self.size).to(dtype)
        return hot * (self.index >= 0).unsqueeze(-1).to(dtype)


Side = Tensor | OneHot


def masked(side: Side, mask: Tensor | None) -> Side:
    if mask is None:
        return side
    if isinstance(side, OneHot):
        return side.masked(mask)
    return side * mask.unsqueeze(-1).to(side.dtype)


def gram(side: Side) -> Tensor:
    """Σ over samples and locations of s sᵀ: (d, d), or the (V,) counts of a one-hot side."""
    if isinstance(side, OneHot):
        index = side.index[side.index >= 0]
        return torch.bincount(index, minlength=side.size)
    s = side.flatten(0, 1)
    return s.T @ s


def project(side: Side, Q: Tensor | None) -> Side:
    """The side's vectors in the basis Q (columns): s ↦ Qᵀ s; Q None is the identity."""
    if Q is None:
        return side
    if isinstance(side, OneHot):
        return torch.cat([Q, Q.new_zeros(1, Q.shape[1])])[side.index]  # row -1 is the zero row
    return side @ Q.to(side.dtype)


def outer_sum(r: Side, c: Side, dtype: torch.dtype) -> Tensor:
    """Σ_t r_t c_tᵀ per sample: (n, R, C), in ``dtype``."""
    if isinstance(r, OneHot) and isinstance(c, OneHot):
        return torch.einsum("ntk,ntl->nkl", r.dense(dtype), c.dense(dtype))
    if isinstance(c, OneHot):
        return outer_sum(c, r, dtype).transpose(1, 2)
    c = c.to(dtype)
    if isinstance(r, OneHot):
        n, T, C = c.shape
        out = c.new_zeros(n, r.size + 1, C)
        index = torch.where(r.index >= 0, r.index, r.size)  # -1 → a dummy row, dropped
        out.scatter_add_(1, index.unsqueeze(-1).expand(n, T, C), c)
        return out[:, : r.size]
    return torch.einsum("ntk,ntl->nkl", r.to(dtype), c)
