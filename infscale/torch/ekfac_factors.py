"""The per-batch quantities of every EK-FAC block and the passes over the data that accumulate them.

``Capture`` runs one batched forward pass with hooks on every module that uses a block (through
``torch.func.functional_call``: the model is not changed) and one backward pass per output vector
(``ekfac_loss``): per module call it yields the activation side ã (input patches, token rows, or the
token indices of an embedding) and the output gradients δ. ``accumulate_factors`` forms, per use of a
Kronecker block, A = Σ ã ãᵀ / n (summed over locations, mean over samples) and G = Σ δ δᵀ / (number of
locations) (KFC's convention), and the diagonal blocks' second moments E[g²];
``accumulate_diagonal`` the EK-FAC diagonal E[(Q_rᵀ g Q_c)²] in the Kronecker eigenbasis.

Token masks: a location whose token is masked (``token_mask``; an attention mask's padding) is left
out of A, G and the location count of every layer applied to token sequences of that length. The
per-sample gradients, and so the EK-FAC diagonal and all queries, never use the mask: they are the
model's exact gradients (at padded positions the output gradients are zero when the model masks them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, vjp, vmap

from .capture import live_state
from .data import batch_size_of, call_model
from .ekfac_layers import Block, OneHot, Side, Use, gram, masked, module_label, outer_sum, project
from .ekfac_loss import EkfacLoss, FisherType, LossSpec
from .layout import ParameterLayout
from .memory import default_chunk_size

#: output gradients of at most this many bytes per chunk of output vectors (exact Fisher)
VECTOR_BYTES = 64 * 2**20

__all__ = ["EkfacLoss", "FisherType", "Capture", "accumulate_factors", "accumulate_diagonal", "rotated"]


# ------------------------------------------------------------- one batch
@dataclass
class Batch:
    """One forward pass: the model's outputs, n, every module call's (input, output), the token mask."""

    outputs: Any
    n: int
    calls: dict[int, list[tuple[Tensor, Tensor]]]
    mask: Tensor | None


class Capture:
    """Per-batch quantities of ``blocks`` (see the module docstring), in ``factor_dtype``."""

    def __init__(
        self,
        layout: ParameterLayout,
        blocks: list[Block],
        spec: LossSpec,
        factor_dtype: torch.dtype,
        token_mask: Callable[[Any], Tensor] | None = None,
    ):
        self.layout = layout
        self.blocks = blocks
        self.spec = spec
        self.factor_dtype = factor_dtype
        self.token_mask = token_mask
        self.modules = {id(u.module): u for b in blocks for u in b.uses}

    # ------------------------------------------------------------------ forward
    def forward(self, x: Any) -> Batch:
        n = batch_size_of(x)
        calls: dict[int, list[tuple[Tensor, Tensor]]] = {k: [] for k in self.modules}

        def record(module, inputs, output):
            calls[id(module)].append((inputs[0], output))

        def expand(module, args):  # position ids (1, T) broadcast over the batch → (n, T)
            ids = args[0]
            if isinstance(ids, Tensor) and ids.ndim >= 2 and ids.shape[0] == 1 and n > 1:
                return (ids.expand(n, *ids.shape[1:]), *args[1:])
            return None

        handles = []
        try:
            for use in self.modules.values():
                if use.kind == "embedding":
                    handles.append(use.module.register_forward_pre_hook(expand))
                handles.append(use.module.register_forward_hook(record))
            state = live_state(self.layout.parameters(), self.layout.fixed_state())
            with torch.enable_grad():
                outputs = call_model(self.layout.model, x, state)
        finally:
            for h in handles:
                h.remove()
        missing = [module_label(u.path, u.module) for k, u in self.modules.items() if not calls[k]]
        if missing:
            raise ValueError(
                f"EkfacInfluence: modules {missing} were not called by the model's forward pass (their "
                "parameters are used some other way); freeze them or leave them out."
            )
        mask = None
        if self.token_mask is not None:
            mask = torch.as_tensor(self.token_mask(x)).to(self.layout.device)
        elif isinstance(x, Mapping) and isinstance(x.get("attention_mask"), Tensor):
            mask = x["attention_mask"]
        if mask is not None and (mask.ndim != 2 or mask.shape[0] != n):
            raise ValueError(
                f"EkfacInfluence: the token mask must have shape (n, T) = ({n}, T); got {tuple(mask.shape)}."
            )
        return Batch(outputs, n, calls, mask)

    # ------------------------------------------------------------------ the two sides
    def activations(self, block: Block, batch: Batch) -> list[list[Side]]:
        """Per use, per call: the activation side ã (n, T, d) (with the bias's 1), or token indices."""
        return [
            [self._activation(block, u, a.detach(), batch.n) for a, _ in batch.calls[id(u.module)]]
            for u in block.uses
        ]

    def _activation(self, block: Block, use: Use, a: Tensor, n: int) -> Side:
        m = use.module
        if a.shape[0] != n and not (use.kind in ("linear", "conv1d") and a.numel() % n == 0):
            raise ValueError(
                f"EkfacInfluence: module {module_label(use.path, m)} was called on {a.shape[0]} rows in a "
                f"batch of {n} samples; EK-FAC needs the samples on the first dimension."
            )
        if use.kind == "embedding":
            index = a.reshape(n, -1)
            if m.padding_idx is not None:  # torch gives the padding row no gradient
                index = index.masked_fill(index == m.padding_idx, -1)
            return OneHot(index, m.num_embeddings)
        if use.kind in ("linear", "conv1d"):
            a = a.reshape(n, -1, m.weight.shape[1] if use.kind == "linear" else m.weight.shape[0])
        else:
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
                a = F.pad(a, m._reversed_padding_repeated_twice, mode=mode)
                padding = 0
            else:
                padding = m.padding
            a = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)
            a = a.transpose(1, 2)  # (n, T, C·kh·kw), channel-major as in weight.reshape(d_out, -1)
        a = a.to(self.factor_dtype)
        if block.bias is not None:
            a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
        return a

    def gradient_side(self, use: Use, d: Tensor, n: int) -> Tensor:
        """The output gradients δ of one call as (n, T, d_out)."""
        if use.kind == "conv2d":
            return d.reshape(n, d.shape[1], -1).transpose(1, 2).to(self.factor_dtype)
        return d.reshape(n, -1, d.shape[-1]).to(self.factor_dtype)

    def terms(self, block: Block, acts: list[list[Side]], deltas: dict, n: int) -> list[tuple[Side, Side]]:
        """(r, c) per use and call of a Kronecker block: the per-sample gradient is Σ Σ_t r_t c_tᵀ."""
        out = []
        for use, use_acts in zip(block.uses, acts):
            for a, d in zip(use_acts, deltas[id(use.module)]):
                d = self.gradient_side(use, d, n)
                out.append((a, d) if use.transposed else (d, a))
        return out

    def location_mask(self, side: Side, batch: Batch) -> Tensor | None:
        """The locations (n, T) that enter the factors: the token mask where it fits this call's
        locations, and for an embedding only those with a token (not the padding index); None: all."""
        T = side.shape[1]
        mask = None if batch.mask is None or batch.mask.shape[1] != T or T == 1 else batch.mask != 0
        if isinstance(side, OneHot):
            mask = side.index >= 0 if mask is None else mask & (side.index >= 0)
        return mask

    # ------------------------------------------------------------------ backward
    def deltas(
        self, batch: Batch, y: Tensor, fisher: FisherType, generator, where: str
    ) -> Iterator[tuple[int, dict[int, list[Tensor]]]]:
        """Per chunk of k output vectors: (k, module id → the output gradients of each of its calls,
        the k vectors' stacked vector-major along the first dimension: k·n samples)."""
        keys = [(k, i) for k in self.modules for i in range(len(batch.calls[k]))]
        outs = [batch.calls[k][i][1] for k, i in keys]
        if self.spec.known or fisher is not FisherType.EMPIRICAL:
            z = self.spec.logits_of(batch.outputs)
            self.spec.check_logits(z, y, batch.n, where)
        if fisher is FisherType.EMPIRICAL:
            grads = torch.autograd.grad(self.spec.loss(batch.outputs, y) * batch.n, outs, allow_unused=True)
            yield 1, self._by_module(keys, grads, outs, 1)
            return
        w = self.spec.weights(batch.outputs, z, y, batch.n, where)
        count, vectors = self.spec.output_vectors(z, w, fisher, generator)
        per_vector = sum(o.numel() for o in outs) * z.element_size()
        size = max(1, min(count, VECTOR_BYTES // max(per_vector, 1)))
        done = 0
        while done < count:
            V = torch.stack([next(vectors).to(z.dtype) for _ in range(min(size, count - done))])
            done += V.shape[0]
            grads = self._pullbacks(z, outs, V, retain=done < count)
            yield V.shape[0], self._by_module(keys, grads, outs, V.shape[0])

    @staticmethod
    def _pullbacks(z: Tensor, outs: list[Tensor], V: Tensor, retain: bool) -> tuple:
        """Jᵀv at every call output for the k vectors V (k, *z.shape): one vmapped backward pass
        (``is_grads_batched``), or one pass per vector where the graph has no batching rule."""
        if V.shape[0] > 1:
            try:
                return torch.autograd.grad(
                    z, outs, grad_outputs=V, retain_graph=True, allow_unused=True, is_grads_batched=True
                )
            except RuntimeError:
                pass
        parts = [
            torch.autograd.grad(z, outs, grad_outputs=v, retain_graph=True, allow_unused=True) for v in V
        ]
        if not retain:
            torch.autograd.grad(z, outs, grad_outputs=torch.zeros_like(z), allow_unused=True)  # frees it
        return tuple(None if p[0] is None else torch.stack(p) for p in zip(*parts))

    def _by_module(self, keys, grads, outs, k: int) -> dict[int, list[Tensor]]:
        result: dict[int, list[Tensor]] = {m: [] for m in self.modules}
        for (m, _), g, o in zip(keys, grads, outs):
            if g is None:
                g = o.new_zeros((k, *o.shape))
            result[m].append(g.flatten(0, 1) if g.ndim > o.ndim else g)
        return result

    def diagonal_gradients(self, block: Block, batch: Batch, deltas: dict, k: int = 1) -> Tensor:
        """Per-sample gradients (k·n, p_block) of a diagonal block (k output vectors): vmap of the vjp
        of each module call."""
        values = self.layout.parameters()
        total: dict[str, Tensor] = {}
        for use in block.uses:
            params = {local: values[full] for local, full in use.local.items()}
            module = use.module

            def one(p, a, d, module=module):
                _, pullback = vjp(lambda q: functional_call(module, q, (a.unsqueeze(0),)), p)
                return pullback(d.unsqueeze(0))[0]

            for (a, _), d in zip(batch.calls[id(module)], deltas[id(module)]):
                if a.shape[0] != batch.n:
                    raise ValueError(
                        f"EkfacInfluence: module {module_label(use.path, module)} was called on "
                        f"{a.shape[0]} rows in a batch of {batch.n} samples; a diagonal block needs the "
                        "samples on the first dimension."
                    )
                a = a.detach().repeat(k, *([1] * (a.ndim - 1)))
                grads = vmap(one, in_dims=(None, 0, 0))(params, a, d)
                for local, g in grads.items():
                    full = use.local[local]
                    total[full] = total[full] + g if full in total else g
        rows = k * batch.n
        return torch.cat([total[name].reshape(rows, -1) for name in block.params], 1).to(self.factor_dtype)


def repeated(side: Side | None, k: int) -> Side | None:
    """The side (or mask) of n samples repeated for k output vectors: k·n rows, vector-major."""
    if side is None or k == 1:
        return side
    if isinstance(side, OneHot):
        return OneHot(side.index.repeat(k, 1), side.size)
    return side.repeat(k, *([1] * (side.ndim - 1)))


# ------------------------------------------------------------- rotations
def _project_first(r: Side, c: Side, q_r: Tensor | None, q_c: Tensor | None) -> bool:
    if isinstance(r, OneHot) or isinstance(c, OneHot) or q_r is None or q_c is None:
        return True
    T, R, C = r.shape[1], q_r.shape[0], q_c.shape[0]
    return T * (R * R + C * C) <= R * C * (R + C)


def rotated(q_r: Tensor | None, q_c: Tensor | None, terms: list[tuple[Side, Side]], dtype) -> Tensor:
    """Per-sample gradients Σ Σ_t r_t c_tᵀ in the eigenbasis (Q_rᵀ g Q_c; None = identity): (n, R, C),
    in ``dtype``. Vectors are rotated before their outer products are formed, or the gradient is formed
    and rotated once, whichever is cheaper."""
    total = None
    formed = None
    for r, c in terms:
        if _project_first(r, c, q_r, q_c):
            part = outer_sum(project(r, q_r), project(c, q_c), dtype)
            total = part if total is None else total + part
        else:
            part = outer_sum(r, c, r.dtype)
            formed = part if formed is None else formed + part
    if formed is not None:
        part = (q_r.T @ formed @ q_c).to(dtype)
        total = part if total is None else total + part
    return total


def rotated_squares(q_r, q_c, terms: list[tuple[Side, Side]], dtype) -> Tensor:
    """Σ_n (Q_rᵀ g_n Q_c)² for one output vector: (R, C)."""
    (r, c), *rest = terms
    if not rest and r.shape[1] == 1:  # rank one per sample: the square is an outer product of squares
        pr, pc = project(r, q_r), project(c, q_c)
        pr = pr.dense(dtype) if isinstance(pr, OneHot) else pr
        pc = pc.dense(dtype) if isinstance(pc, OneHot) else pc
        return pr[:, 0].square().T @ pc[:, 0].square()
    n, R, C = (
        r.shape[0],
        r.shape[2] if q_r is None else q_r.shape[1],
        c.shape[2] if q_c is None else q_c.shape[1],
    )
    total = torch.zeros(R, C, dtype=dtype, device=(q_r if q_r is not None else q_c).device)
    chunk = default_chunk_size(R * C, total.element_size())
    for s in range(0, n, chunk):
        part = [(_rows(a, s, s + chunk), _rows(b, s, s + chunk)) for a, b in terms]
        total += rotated(q_r, q_c, part, dtype).square().sum(0)
    return total


def _rows(side: Side, start: int, stop: int) -> Side:
    return OneHot(side.index[start:stop], side.size) if isinstance(side, OneHot) else side[start:stop]


# ------------------------------------------------------------- passes over the data
@dataclass
class Factors:
    """The first pass's result: n, per Kronecker block and use (A, G) (a (V,) vector for a one-hot
    side), and per diagonal block E[g²] (1, p)."""

    n: int
    A: dict[str, list[Tensor]]
    G: dict[str, list[Tensor]]
    second_moments: dict[str, Tensor]


def accumulate_factors(
    capture: Capture, batches: Iterable[tuple[Any, Tensor]], fisher: FisherType, generator, where: str
) -> Factors:
    """One pass: A = Σ ã ãᵀ / n (summed over locations), G = Σ δ δᵀ / (number of locations) per use
    of each Kronecker block (token-masked locations left out), and E[g²] of each diagonal block."""
    kron = [b for b in capture.blocks if b.model == "kronecker"]
    diag = [b for b in capture.blocks if b.model == "diagonal"]
    A: dict[str, list] = {b.name: [0.0] * len(b.uses) for b in kron}
    G: dict[str, list] = {b.name: [0.0] * len(b.uses) for b in kron}
    locations = {b.name: [0] * len(b.uses) for b in kron}
    moments: dict[str, Any] = {b.name: 0.0 for b in diag}
    n = 0
    for x, y in batches:
        batch = capture.forward(x)
        acts = {b.name: capture.activations(b, batch) for b in kron}
        masks = {
            b.name: [[capture.location_mask(a, batch) for a in use] for use in acts[b.name]] for b in kron
        }
        for b in kron:
            for u, (use_acts, use_masks) in enumerate(zip(acts[b.name], masks[b.name])):
                for a, m in zip(use_acts, use_masks):
                    a = masked(a, m)
                    A[b.name][u] = A[b.name][u] + gram(a)
                    locations[b.name][u] += int(m.sum()) if m is not None else a.shape[0] * a.shape[1]
        for k, deltas in capture.deltas(batch, y, fisher, generator, where):
            for b in kron:
                for u, use in enumerate(b.uses):
                    for d, m in zip(deltas[id(use.module)], masks[b.name][u]):
                        d = masked(capture.gradient_side(use, d, k * batch.n), repeated(m, k))
                        G[b.name][u] = G[b.name][u] + gram(d)
            for b in diag:
                g = capture.diagonal_gradients(b, batch, deltas, k)
                moments[b.name] = moments[b.name] + g.square().sum(0)
        n += batch.n
    if n == 0:
        return Factors(0, {}, {}, {})
    fd = capture.factor_dtype
    A = {k: [torch.as_tensor(a).to(fd) / n for a in v] for k, v in A.items()}
    G = {k: [torch.as_tensor(g).to(fd) / max(c, 1) for g, c in zip(v, locations[k])] for k, v in G.items()}
    moments = {k: (torch.as_tensor(v) / n).to(fd).reshape(1, -1) for k, v in moments.items()}
    return Factors(n, A, G, moments)


def accumulate_diagonal(
    capture: Capture,
    batches: Iterable[tuple[Any, Tensor]],
    fisher: FisherType,
    generator,
    where: str,
    bases: Mapping[str, tuple[Tensor | None, Tensor | None]],
) -> dict[str, Tensor]:
    """One pass: per Kronecker block Σ_n (Q_rᵀ g_n Q_c)², summed over the samples and output vectors
    (the EK-FAC diagonal times n); ``bases`` block → (Q_r, Q_c)."""
    kron = [b for b in capture.blocks if b.model == "kronecker"]
    diag = {
        b.name: torch.zeros(b.rows, b.cols, dtype=capture.factor_dtype, device=capture.layout.device)
        for b in kron
    }
    for x, y in batches:
        batch = capture.forward(x)
        acts = {b.name: capture.activations(b, batch) for b in kron}
        for k, deltas in capture.deltas(batch, y, fisher, generator, where):
            for b in kron:
                acts_k = [[repeated(a, k) for a in use] for use in acts[b.name]]
                terms = capture.terms(b, acts_k, deltas, k * batch.n)
                diag[b.name] += rotated_squares(*bases[b.name], terms, capture.factor_dtype)
    return diag


# ------------------------------------------------------------- eigenbases
def _eig(factor: Tensor) -> tuple[Tensor | None, Tensor]:
    """(basis, eigenvalues ≥ 0) of a factor; a (V,) diagonal factor keeps the identity basis (None)."""
    if factor.ndim == 1:
        return None, factor.clamp_min(0)
    values, vectors = torch.linalg.eigh(factor)
    return vectors, values.clamp_min(0)


def _dense(factor: Tensor) -> Tensor:
    return torch.diag(factor) if factor.ndim == 1 else factor


def _diagonal_in(Q: Tensor | None, factor: Tensor) -> Tensor:
    """diag(Qᵀ F Q)."""
    if Q is None:
        return torch.diagonal(_dense(factor))
    if factor.ndim == 1:
        return Q.square().T @ factor
    return ((factor @ Q) * Q).sum(0)


def nearest_kronecker(rows: list[Tensor], cols: list[Tensor]) -> tuple[Tensor, Tensor]:
    """R ⊗ C closest in Frobenius norm to Σ_u rows_u ⊗ cols_u (Van Loan & Pitsianis 1993): with the
    Gram matrices P_uv = ⟨rows_u, rows_v⟩ and Q_uv = ⟨cols_u, cols_v⟩, R = Σ a_u rows_u and
    C = Σ (P a)_u cols_u for a the leading eigenvector of Q P (non-negative for PSD factors)."""
    rows, cols = [_dense(r) for r in rows], [_dense(c) for c in cols]
    P = torch.stack([torch.stack([(a * b).sum() for b in rows]) for a in rows])
    Q = torch.stack([torch.stack([(a * b).sum() for b in cols]) for a in cols])
    values, vectors = torch.linalg.eig(Q @ P)
    a = vectors[:, values.real.argmax()].real
    a = a * torch.sign(a.sum()) if a.sum() != 0 else torch.ones_like(a)
    b = P @ a / (a @ P @ a).clamp_min(torch.finfo(a.dtype).tiny)  # so that R ⊗ C is the best fit, scale too
    return sum(w * r for w, r in zip(a, rows)), sum(w * c for w, c in zip(b, cols))


def eigenbases(blocks: list[Block], factors: Factors):
    """Per Kronecker block ``(Q_r, λ_r, Q_c, λ_c)`` (Q None: identity), and the K-FAC eigenvalues of
    blocks with several uses: Σ_u diag(Q_rᵀ R_u Q_r) ⊗ diag(Q_cᵀ C_u Q_c), the diagonal of the sum of
    their Kronecker terms in the basis of its nearest Kronecker product."""
    bases, shared = {}, {}
    for b in blocks:
        if b.model != "kronecker":
            continue
        A, G = factors.A[b.name], factors.G[b.name]
        rows = [a if u.transposed else g for u, a, g in zip(b.uses, A, G)]
        cols = [g if u.transposed else a for u, a, g in zip(b.uses, A, G)]
        R, C = (rows[0], cols[0]) if len(b.uses) == 1 else nearest_kronecker(rows, cols)
        (q_r, l_r), (q_c, l_c) = _eig(R), _eig(C)
        bases[b.name] = (q_r, l_r, q_c, l_c)
        if len(b.uses) > 1:
            shared[b.name] = sum(
                torch.outer(_diagonal_in(q_r, r), _diagonal_in(q_c, c)) for r, c in zip(rows, cols)
            ).clamp_min(0)
    return bases, shared
