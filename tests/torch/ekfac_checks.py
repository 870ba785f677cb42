"""Checks of fitted EK-FAC models against an explicit Gauss-Newton matrix, shared by the EK-FAC tests.

Built only from public attributes (the layout, ``covered_modules``, the eigenvectors and the
diagonal) and the documented block-matrix convention, not from the library's own layout helpers.
"""

from __future__ import annotations

import torch
from torch import nn

from infscale.torch import EkfacInfluence

DT = torch.float64


def block_indices(ek: EkfacInfluence, model: nn.Module, block: str) -> torch.Tensor:
    """Positions of a block's parameters in the references' flat vector (named_parameters order)."""
    offsets, start = {}, 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            offsets[name] = torch.arange(start, start + p.numel())
            start += p.numel()
    return torch.cat([offsets[n] for n in ek.layout.block(block).parameter_names])


def kronecker_basis(ek: EkfacInfluence, block: str) -> torch.Tensor:
    """(p, rows·cols) the block's eigenbasis in the flat layout: column (i, j) is the block matrix
    Q_r[:, i] Q_c[:, j]ᵀ read in parameter order. The block matrix is the weight as stored, 2-d, with
    the bias as a last column ([W | b]: Linear, Conv2d) or row ([W; bᵀ]: Conv1D, whose weight is (in,
    out)); rows are the gradient side (G) except for Conv1D and Embedding (their weight is a transposed
    Linear's), whose vocabulary / input side (A) is the rows; a side without eigenvectors is the identity."""
    names = ek.layout.block(block).parameter_names
    weight = dict(ek.model.named_parameters())[names[0]]
    first = next(cls for _, cls, _, b in ek.covered_modules if b == block)
    transposed = first in ("Conv1D", "Embedding")
    bias = len(names) == 2
    rows, cols = weight.shape[0], weight[0].numel()
    rows, cols = (rows + bias, cols) if transposed else (rows, cols + bias)
    q_a, q_g = ek.eigenvectors_A.get(block), ek.eigenvectors_G.get(block)
    q_r, q_c = (q_a, q_g) if transposed else (q_g, q_a)
    q_r = torch.eye(rows, dtype=DT) if q_r is None else q_r
    q_c = torch.eye(cols, dtype=DT) if q_c is None else q_c
    E = torch.einsum("ai,bj->ijab", q_r, q_c).reshape(-1, rows, cols)
    if not bias or transposed:  # [W] or [W; bᵀ]: row-major
        return E.reshape(E.shape[0], -1).T
    return torch.cat([E[:, :, :-1].reshape(E.shape[0], -1), E[:, :, -1]], 1).T


def assert_projected_gauss_newton(ek: EkfacInfluence, model: nn.Module, GN: torch.Tensor, rtol=1e-7):
    """Every block: EK-FAC diagonal = diag(Bᵀ GN_block B) (diagonal blocks: B = I)."""
    for b in ek.layout.blocks:
        idx = block_indices(ek, model, b.name)
        block_gn = GN[idx[:, None], idx]
        if any(how == "diagonal" for _, _, how, blk in ek.covered_modules if blk == b.name):
            expected = torch.diagonal(block_gn)
        else:
            B = kronecker_basis(ek, b.name)
            expected = ((B.T @ block_gn) * B.T).sum(1)
        got = ek.diagonal[b.name].reshape(-1)
        torch.testing.assert_close(
            got, expected, rtol=rtol, atol=rtol * float(expected.abs().max()), msg=b.name
        )
