"""LissaInfluence: the stochastic Neumann series (LiSSA) over mini-batches."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import LissaDivergenceError
from .base import TorchInfluenceFunctionModel
from .curvature import CurvatureOperator
from .data import batch_size_of, batch_sizes, device_batches
from .layout import BlockMode, LossFunction, SecondOrderMode, _Block

__all__ = ["LissaInfluence", "LissaDivergenceError"]


class LissaInfluence(TorchInfluenceFunctionModel):
    """Influences with (H + λI)⁻¹ applied by the stochastic Neumann series (Agarwal et al. 2017).

    For all right-hand sides b of a query at once (rows of a (k, p_b) matrix), per
    curvature block::

        h₀ = b,   h_{t+1} = b + (1 − dampen) h_t − (H_t + λI) h_t / scale,   result h_T / scale

    where H_t is the curvature of the t-th mini-batch of the fit loader (the loader
    is cycled, and re-shuffled if it shuffles), weighted by its size over the mean
    batch size, so that one cycle averages to the curvature of the mean loss even
    when the last batch is short. With dampen = 0 the fixed point of
    the expected iteration is (H + λI)⁻¹ b; dampen > 0 computes
    (H + (λ + dampen · scale) I)⁻¹ b instead, i.e. it adds dampen · scale to the
    regularization in exchange for faster, safer convergence.

    Convergence needs every eigenvalue μ of the batch curvatures plus λ to satisfy
    0 < (μ + λ) / scale < 2 − dampen: ``scale`` must exceed the largest curvature
    eigenvalue (about half of it at the least), and λ + dampen · scale must
    exceed any negative eigenvalue of a non-convex Hessian. The error then shrinks
    like (1 − dampen − (μ_min + λ)/scale)^t, so a scale far above the largest
    eigenvalue costs iterations. With mini-batches the iterates keep a noise floor
    proportional to the batch-to-batch variation of the curvature: a single
    full batch is deterministic, small batches are cheap per iteration but noisy.

    Each iteration is one curvature product with one mini-batch for all
    right-hand sides; the query stops when the largest relative change
    ‖h_{t+1} − h_t‖ / ‖h_{t+1}‖ over the right-hand sides is ≤ ``rtol``.

    Args:
        model, loss, hessian_regularization, block_structure, second_order_mode,
            gradient_chunk_size: see ``TorchInfluenceFunctionModel``.
        maxiter: most iterations (mini-batch products) per query and block.
        dampen: in [0, 1); see above.
        scale: > 0; see above.
        rtol: stop when the relative change of every right-hand side is ≤ rtol.
        progress: show a tqdm progress bar per solve.

    Raises:
        ValueError: invalid maxiter, dampen, scale or rtol.
        LissaDivergenceError (at query): the iterates became non-finite, grew beyond
            the bound scale · ‖b‖ / (λ + dampen · scale) that holds for a convergent
            iteration, or kept growing; the message says to raise ``scale`` or ``dampen``.

    Warns:
        RuntimeWarning when ``maxiter`` is reached, with the relative change reached.
    """

    settings = TorchInfluenceFunctionModel.settings + ("maxiter", "dampen", "scale", "rtol")

    def __init__(
        self,
        model: nn.Module,
        loss: LossFunction,
        hessian_regularization: float | Mapping[str, float] = 0.0,
        maxiter: int = 1000,
        dampen: float = 0.0,
        scale: float = 10.0,
        rtol: float = 1e-4,
        progress: bool = False,
        block_structure: BlockMode | str | Mapping[str, Iterable[str]] = BlockMode.FULL,
        second_order_mode: SecondOrderMode | str = SecondOrderMode.HESSIAN,
        gradient_chunk_size: int | None = None,
    ):
        super().__init__(
            model, loss, hessian_regularization, block_structure, second_order_mode, gradient_chunk_size
        )
        if not isinstance(maxiter, int) or maxiter < 1:
            raise ValueError(f"maxiter must be an integer ≥ 1; got {maxiter!r}.")
        if not 0 <= dampen < 1:
            raise ValueError(f"dampen must be in [0, 1); got {dampen!r}.")
        if not scale > 0:
            raise ValueError(f"scale must be > 0 (above the largest curvature eigenvalue); got {scale!r}.")
        if not rtol > 0:
            raise ValueError(f"rtol must be > 0; got {rtol!r}.")
        self.maxiter = maxiter
        self.dampen = float(dampen)
        self.scale = float(scale)
        self.rtol = float(rtol)
        self.progress = progress
        self._data: Iterable | None = None
        self._mean_batch_size = 1.0
        self.last_iterations: dict[str, int] = {}

    def _fit(self, data: Iterable) -> None:
        self._data = data
        sizes = [n for n in batch_sizes(data) if n]  # empty batches are skipped when iterating
        if not sizes:
            raise ValueError("LissaInfluence.fit(): the training data yielded no samples.")
        self._mean_batch_size = sum(sizes) / len(sizes)

    def _batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The non-empty batches of the fit data on the model's device, cycled without end."""
        while True:
            empty = True
            for x, y in device_batches(self._data, self._to_device):
                empty = False
                yield x, y
            if empty:
                raise ValueError("LissaInfluence: the training data loader yielded no batch.")

    def _diverged(self, block: _Block, iteration: int, why: str) -> LissaDivergenceError:
        return LissaDivergenceError(
            f"LissaInfluence: the Neumann iteration of block {block.name!r} diverged at iteration "
            f"{iteration} ({why}) with scale={self.scale:g}, dampen={self.dampen:g}, "
            f"hessian_regularization={self.regularization[block.name]:g}. Raise scale above the largest "
            "curvature eigenvalue, or raise dampen (or hessian_regularization, or use "
            "second_order_mode=SecondOrderMode.GAUSS_NEWTON) if the Hessian has negative eigenvalues."
        )

    def _solve_block(self, block: _Block, rhs: Tensor) -> Tensor:
        if rhs.shape[0] == 0:
            return rhs.clone()
        lam, scale, dampen = self.regularization[block.name], self.scale, self.dampen
        tiny = torch.finfo(rhs.dtype).tiny
        b_norm = torch.linalg.norm(rhs, dim=1)
        shift = lam + dampen * scale
        # a convergent iteration with PSD batch curvatures stays below scale‖b‖ / (λ + dampen·scale)
        bound = 10 * scale * b_norm / shift if shift > 0 else None
        keep = 1 - dampen - lam / scale  # h_{t+1} = b + keep · h_t − weight · H_t h_t / scale

        # the block's per-sample gradient engine (empirical Fisher), shared by every product
        engine = self._block_engine(block)

        def product(x: Tensor, y: Tensor, V: Tensor) -> Tensor:
            op = CurvatureOperator(
                self.layout,
                self.loss,
                [(x, y)],
                block,
                self.second_order_mode,
                lambda a, c: (a, c),
                engine=engine,
            )
            return op.matmat(V)

        h = rhs.clone()
        batches = self._batches()
        change = torch.zeros(rhs.shape[0], dtype=rhs.dtype, device=rhs.device)
        growing, previous_largest = 0, float("inf")
        iteration = 0
        with tqdm(total=self.maxiter, disable=not self.progress, desc=f"LiSSA {block.name}") as bar:
            for iteration in range(1, self.maxiter + 1):
                x, y = next(batches)
                weight = batch_size_of(x) / self._mean_batch_size  # a cycle over the loader averages to H
                h_new = torch.add(rhs, h, alpha=keep)
                h_new.add_(product(x, y, h), alpha=-weight / scale)
                new_norm = torch.linalg.norm(h_new, dim=1)
                # a non-finite entry makes its row's norm non-finite
                if not bool(torch.isfinite(new_norm).all()):
                    raise self._diverged(block, iteration, "the iterates are no longer finite")
                change = torch.linalg.norm(h.sub_(h_new), dim=1) / new_norm.clamp_min(tiny)
                h = h_new
                if bound is not None and bool((new_norm > bound).any()):
                    raise self._diverged(
                        block, iteration, "an iterate exceeded scale·‖b‖/(λ + dampen·scale) tenfold"
                    )
                worst = change.max().item()
                largest = new_norm.max().item()
                growing = growing + 1 if worst > 1 and largest > previous_largest else 0
                previous_largest = largest
                if growing >= 20:
                    raise self._diverged(
                        block, iteration, "the iterates kept growing by more than themselves"
                    )
                bar.update(1)
                bar.set_postfix(change=f"{worst:.2e}")
                if worst <= self.rtol:
                    break
            else:
                warnings.warn(
                    f"LissaInfluence: block {block.name!r} reached maxiter={self.maxiter} with relative "
                    f"change {change.max().item():.3g} > rtol={self.rtol:g}. Raise maxiter, lower scale "
                    "(it must stay above the largest curvature eigenvalue), raise dampen, or use larger "
                    "batches (less noise).",
                    RuntimeWarning,
                    stacklevel=4,
                )
        self.last_iterations[block.name] = iteration
        return h / scale
