"""InverseHarmonicMeanInfluence: the DataInf approximation of the inverse curvature."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from ..base import InfluenceMode
from .base import TorchInfluenceFunctionModel
from .data import batch_size_of, device_batches, feature_nbytes
from .factored import FactoredGradients
from .layout import BlockMode, LossFunction, SecondOrderMode, _Block
from .memory import STORED_GRADIENT_BYTES, gram_rows, solve_rows

__all__ = ["InverseHarmonicMeanInfluence"]

#: stored training gradients may take this many bytes by default (``memory.STORED_GRADIENT_BYTES``)
DEFAULT_STORED_GRADIENT_BYTES = STORED_GRADIENT_BYTES


class InverseHarmonicMeanInfluence(TorchInfluenceFunctionModel):
    """Influences with the inverse harmonic mean (DataInf, Kwon et al. 2024) of the per-sample
    outer products in place of (H + λI)⁻¹.

    Per block, with gᵢ the gradient of training sample i restricted to the block::

        (H + λI)⁻¹ ≈ (1/n) Σᵢ (gᵢgᵢᵀ + λI)⁻¹,
        (gᵢgᵢᵀ + λI)⁻¹ v = (v − gᵢ (gᵢᵀv) / (λ + gᵢᵀgᵢ)) / λ   (Sherman–Morrison),

    every training sample weighted 1/n whatever the batch sizes. This swaps the
    inverse and the mean of the empirical Fisher (1/n) Σᵢ gᵢgᵢᵀ: it is exact for
    n = 1 and close when λ is large next to the Fisher's eigenvalues, but far from
    (F + λI)⁻¹ when λ is small (each term only damps its own gᵢ). The error grows
    with the block dimension, so ``BlockMode.LAYER_WISE`` (as in DataInf) is usually
    better than ``FULL``. There is no second-order mode: only gradients are used.

    Every query needs all training gradients: they are computed once at ``fit`` and
    kept (with the fit inputs, to recognize them) if they fit in
    ``max_stored_gradient_bytes``; otherwise they are recomputed from the fit loader at
    every query (one pass of per-sample gradients per query, for all test points at
    once), which keeps memory at one batch. While they are kept, points of a query that
    are a contiguous run of the fit data (in loader order, e.g. the whole training set
    or a calculator's chunk of it) take their stored gradients instead of computing
    them again.

    Args:
        model, loss, block_structure, gradient_chunk_size: see ``TorchInfluenceFunctionModel``.
        hessian_regularization: λ > 0, a float or a dict block name → float (required
            in every block).
        max_stored_gradient_bytes: keep the training gradients in memory up to this size.

    Raises:
        ValueError: λ ≤ 0 in some block, max_stored_gradient_bytes < 0.
    """

    # no second-order mode: only gradients are used
    settings = ("hessian_regularization", "block_structure")

    def __init__(
        self,
        model: nn.Module,
        loss: LossFunction,
        hessian_regularization: float | Mapping[str, float],
        block_structure: BlockMode | str | Mapping[str, Iterable[str]] = BlockMode.FULL,
        gradient_chunk_size: int | None = None,
        max_stored_gradient_bytes: int = DEFAULT_STORED_GRADIENT_BYTES,
    ):
        super().__init__(
            model, loss, hessian_regularization, block_structure, SecondOrderMode.HESSIAN, gradient_chunk_size
        )
        self._check_positive(self.regularization)
        if max_stored_gradient_bytes < 0:
            raise ValueError(f"max_stored_gradient_bytes must be ≥ 0; got {max_stored_gradient_bytes}.")
        self.max_stored_gradient_bytes = max_stored_gradient_bytes
        self._data: Iterable | None = None
        self._stored: Tensor | FactoredGradients | None = None
        self._fit_inputs: tuple[Tensor, Tensor] | None = None

    @staticmethod
    def _check_positive(regularization: Mapping[str, float]) -> None:
        bad = {k: v for k, v in regularization.items() if not v > 0}
        if bad:
            raise ValueError(
                "InverseHarmonicMeanInfluence needs hessian_regularization > 0 in every block "
                f"((gᵢgᵢᵀ + λI) is singular for λ = 0); got {bad}."
            )

    @property
    def stores_gradients(self) -> bool:
        """Whether the training gradients are kept in memory (else recomputed per query)."""
        return self._stored is not None

    def _fit(self, data: Iterable) -> None:
        self._data = data
        self._stored = None
        self._fit_inputs = None
        budget = self.max_stored_gradient_bytes
        parts: list | None = []
        inputs: list[tuple[Tensor, Tensor]] = []
        n, used = 0, 0
        for x, y in device_batches(data, self._to_device):
            n += batch_size_of(x)
            if parts is None:
                continue
            # per-sample gradients, factored (far smaller) for nn.Linear layers
            gradients = self._engine.factored(x, y, self._chunk())
            used += _nbytes(gradients) + feature_nbytes(x) + y.nbytes
            if used <= budget:
                parts.append(gradients)
                inputs.append((x, y))
            else:
                parts, inputs = None, []  # over budget: recompute at every query
        if n == 0:
            raise ValueError("InverseHarmonicMeanInfluence.fit(): the training data yielded no samples.")
        self.n_train = n
        if parts is not None:
            self._stored = _concatenate(parts, self._engine)
            try:
                self._fit_inputs = (torch.cat([x for x, _ in inputs]), torch.cat([y for _, y in inputs]))
            except (RuntimeError, TypeError):  # different feature shapes, or mappings: never matched
                self._fit_inputs = None

    #: at most this many positions of the fit data are compared with a query's first row
    _MAX_CANDIDATES = 8

    def _stored_rows(self, x: Tensor, y: Tensor) -> Tensor | None:
        """The stored gradients of (x, y) if they are a contiguous run of the fit data, else None.

        Found by the position of x's first row among the fit inputs, then checked exactly
        (torch.equal on x and y), so a query that only resembles the fit data is never
        served from the store.
        """
        if self._stored is None or self._fit_inputs is None or not isinstance(x, Tensor):
            return None
        fit_x, fit_y = self._fit_inputs
        n, m = fit_x.shape[0], x.shape[0]
        if not 0 < m <= n or x.shape[1:] != fit_x.shape[1:] or y.shape[1:] != fit_y.shape[1:]:
            return None
        if x.dtype != fit_x.dtype or y.dtype != fit_y.dtype:
            return None
        if m == n:
            starts = [0]
        else:
            first = (fit_x[: n - m + 1].reshape(n - m + 1, -1) == x[:1].reshape(1, -1)).all(dim=1)
            starts = first.nonzero().flatten()[: self._MAX_CANDIDATES].tolist()
        for s in starts:
            if torch.equal(fit_x[s : s + m], x) and torch.equal(fit_y[s : s + m], y):
                return _rows(self._stored, s, s + m)
        return None

    def _gradients(self, x: Tensor, y: Tensor) -> Tensor:
        stored = self._stored_rows(x, y)
        return self._engine.to_dense(stored) if stored is not None else super()._gradients(x, y)

    def _train_gradients(self, x: Tensor, y: Tensor) -> Tensor | FactoredGradients:
        stored = self._stored_rows(x, y)
        return stored if stored is not None else self._engine.factored(x, y, self._chunk())

    def _training_gradients(self) -> Iterator[Tensor | FactoredGradients]:
        if self._stored is not None:
            n, step = self.n_train, solve_rows()
            for s in range(0, n, step):
                yield _rows(self._stored, s, min(s + step, n))
            return
        for x, y in device_batches(self._data, self._to_device):
            yield self._engine.factored(x, y, self._chunk())

    def _influences(self, x_test, y_test, x, y, mode, symmetric) -> Tensor:
        if mode is not InfluenceMode.Up:
            return super()._influences(x_test, y_test, x, y, mode, symmetric)
        test = self._train_gradients(x_test, y_test)  # stored rows or factored: as for training points
        train = test if symmetric else self._train_gradients(x, y)
        if self._gram_cheaper(test, train):
            return self._gram_influences(test, train)
        factors = self._solve(self._engine.to_dense(test))
        return self._from_gradients(factors, train)

    def _gram_cheaper(self, test, train) -> bool:
        """Whether influences through inner products of gradients (``_gram_influences``) take
        fewer multiplications than through the test factors (n_test × p, then × n_train)."""
        engine = self._engine
        n_test, n_fit, n_train = _n(test), self.n_train, _n(train)
        width = max(engine.gram_width(test), engine.gram_width(train))
        gram = width * (n_test * n_fit + n_fit * n_train + n_test * n_train)
        gram += len(self.layout.blocks) * n_test * n_fit * n_train
        return gram < self.n_parameters * n_test * (2 * n_fit + n_train)

    def _gram_influences(self, test, train) -> Tensor:
        """Per block, with K the inner products of per-sample gradients (test t, training
        point j, fit sample i) and cᵢ = 1 / (λ + ‖gᵢ‖²)::

            influence(t, j) = (K_tj − (1/n) Σᵢ K_ti cᵢ K_ij) / λ

        the same numbers as through the factors, without forming a p-vector per test point:
        for nn.Linear layers every K comes from the factored gradients (``GradientEngine.gram``).
        """
        engine = self._engine
        out = torch.zeros(_n(test), _n(train), dtype=self.dtype, device=self.device)
        for b in self.layout.blocks:
            out += engine.gram(test, train, b.slice) / self.regularization[b.name]
        chunks = self._fit_gradient_chunks(max(_n(test), _n(train)))
        for G, cols, lam, weights in self._sherman_morrison_terms(self.layout.blocks, chunks):
            term = (engine.gram(test, G, cols) * weights) @ engine.gram(G, train, cols)
            out.sub_(term, alpha=1.0 / (self.n_train * lam))
        return out

    def _sherman_morrison_terms(self, blocks, chunks: Iterable) -> Iterator[tuple]:
        """(G, the block's columns, λ, cᵢ = 1 / (λ + ‖gᵢ‖²)) for every chunk G of fit gradients and
        every block: the pieces of Σᵢ (gᵢgᵢᵀ + λI)⁻¹ that each query way combines."""
        for G in chunks:
            for b in blocks:
                lam = self.regularization[b.name]
                yield G, b.slice, lam, 1.0 / (lam + self._engine.squared_norms(G, b.slice))

    def _fit_gradient_chunks(self, width: int) -> Iterator[Tensor | FactoredGradients]:
        """The training gradients in chunks of rows whose inner products with ``width`` other points
        fit in ``memory.GRAM_BYTES``."""
        rows = gram_rows(width, self.dtype.itemsize)
        for G in self._training_gradients():
            n = _n(G)
            for s in range(0, n, rows):
                yield G if rows >= n else _rows(G, s, min(s + rows, n))

    def _self_influences_up(self, x: Tensor, y: Tensor) -> Tensor:
        """Per block (λ‖g‖² − (1/n) Σᵢ cᵢ (g · gᵢ)²) / λ² … see ``_gram_influences``; through
        inner products when they are cheaper than p numbers per pair."""
        gradients = self._train_gradients(x, y)
        engine = self._engine
        if not engine.inner_products_pay(gradients):
            return super()._self_influences_up(x, y)
        out = torch.zeros(_n(gradients), dtype=self.dtype, device=self.device)
        for b in self.layout.blocks:
            out += engine.squared_norms(gradients, b.slice) / self.regularization[b.name]
        chunks = self._fit_gradient_chunks(_n(gradients))
        for G, cols, lam, weights in self._sherman_morrison_terms(self.layout.blocks, chunks):
            out.sub_(engine.gram(gradients, G, cols).square_() @ weights, alpha=1.0 / (self.n_train * lam))
        return out

    def _solve(self, gradients: Tensor) -> Tensor:
        return self._solve_blocks(self.layout.blocks, gradients)

    def _solve_block(self, block: _Block, rhs: Tensor) -> Tensor:
        padded = rhs.new_zeros((rhs.shape[0], self.n_parameters))
        padded[:, block.slice] = rhs
        return self._solve_blocks((block,), padded)[:, block.slice]

    def _solve_blocks(self, blocks, rhs: Tensor) -> Tensor:
        """Σᵢ Sherman–Morrison over the training gradients, one pass for the given blocks."""
        correction = torch.zeros_like(rhs)
        if rhs.shape[0]:
            engine = self._engine
            for G, cols, _, weights in self._sherman_morrison_terms(blocks, self._training_gradients()):
                coefficients = engine.products(rhs, G, cols) * weights  # (k, m)
                correction[:, cols] += engine.weighted_sums(coefficients, G, cols)[:, cols]
        out = torch.zeros_like(rhs)
        for b in blocks:
            lam = self.regularization[b.name]
            out[:, b.slice] = (rhs[:, b.slice] - correction[:, b.slice] / self.n_train) / lam
        return out

    def with_regularization(self, hessian_regularization) -> InverseHarmonicMeanInfluence:
        """A copy with another λ > 0, reusing the stored gradients (none are stored anew)."""
        new = self._copy_with_regularization(hessian_regularization)
        self._check_positive(new.regularization)
        return new


def _n(gradients: Tensor | FactoredGradients) -> int:
    return gradients.n_samples if isinstance(gradients, FactoredGradients) else gradients.shape[0]


def _nbytes(gradients: Tensor | FactoredGradients) -> int:
    if isinstance(gradients, FactoredGradients):
        return gradients.nbytes
    return gradients.element_size() * gradients.numel()


def _rows(gradients: Tensor | FactoredGradients, start: int, stop: int) -> Tensor | FactoredGradients:
    if isinstance(gradients, FactoredGradients):
        return gradients.rows(start, stop)
    return gradients[start:stop]


def _concatenate(parts: list, engine) -> Tensor | FactoredGradients:
    """One store from the batches' gradients: factored if every batch is (with the same
    number of positions), else dense."""
    if parts and all(isinstance(p, FactoredGradients) for p in parts):
        try:
            return FactoredGradients.cat(parts)
        except RuntimeError:
            pass
    return torch.cat([engine.to_dense(p) for p in parts])
