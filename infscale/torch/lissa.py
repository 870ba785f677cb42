"""LissaInfluence: the stochastic Neumann series (LiSSA) over mini-batches."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import LissaDivergenceError, NotPositiveDefiniteError
from .base import TorchInfluenceFunctionModel
from .curvature import CurvatureOperator
from .data import batch_size_of, batch_sizes, device_batches
from .layout import BlockMode, LossFunction, SecondOrderMode, _Block
from .linalg import lanczos_extremes, not_positive_definite

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

    Every iteration also measures the curvature along each iterate, c = hᵀ(H_t + λI)h / hᵀh
    (free: H_t h is the iteration's product). Where c < −dampen · scale (by more than rounding,
    100 · eps · scale) the iteration expands along h (its factor 1 − dampen − c/scale exceeds 1):
    negative curvature that λ + dampen · scale does not cover.

    Raises:
        ValueError: invalid maxiter, dampen, scale or rtol.
        NotPositiveDefiniteError (at query): the iterates diverged (see below) while growing
            along a direction of curvature c < −dampen · scale, or kept such a direction for
            ``NEGATIVE_CURVATURE_ITERATIONS`` iterations in a row: the batch curvature plus λ is not
            positive definite. Its extreme eigenvalues are estimated by a few Lanczos steps on that
            batch's curvature, started from the iterate (``linalg.lanczos_extremes``), and the
            message gives a ``hessian_regularization`` that makes it positive definite.
        LissaDivergenceError (at query): the iterates became non-finite, grew beyond
            the bound scale · ‖b‖ / (λ + dampen · scale) that holds for a convergent
            iteration, or kept growing, with no negative curvature along them (the scale is
            below about half the largest curvature eigenvalue); the message says to raise
            ``scale`` or ``dampen``.

    Warns:
        RuntimeWarning when ``maxiter`` is reached, with the relative change reached.
    """

    settings = TorchInfluenceFunctionModel.settings + ("maxiter", "dampen", "scale", "rtol")
    #: iterations in a row with an expanding direction of negative curvature before the query stops
    NEGATIVE_CURVATURE_ITERATIONS = 10

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

    def _negative_curvature(
        self, block: _Block, iteration: int, batch, direction: Tensor, curvature: float, why: str
    ) -> NotPositiveDefiniteError:
        """The error for an iteration that expands along ``direction`` (p_block,), where the batch
        curvature plus λ is ``curvature`` < −dampen · scale; A's extreme eigenvalues estimated by
        Lanczos on that batch's curvature, started from ``direction``."""
        product, n = batch
        lam = self.regularization[block.name]
        estimate = lanczos_extremes(product, direction)
        return not_positive_definite(
            "LissaInfluence",
            f"the curvature of block {block.name!r} on a mini-batch of {n} samples",
            lam,
            min(estimate.smallest, curvature - lam),
            estimate.largest,
            f"raise dampen (it adds dampen·scale to λ; now {self.dampen * self.scale:g}), or use "
            "second_order_mode=SecondOrderMode.GAUSS_NEWTON (positive semi-definite)",
            estimated_by=f"{estimate.describe()} on that batch, after the iteration {why} at iteration "
            f"{iteration} along a direction of regularized curvature {curvature:.3g}",
        )

    def _solve_block(self, block: _Block, rhs: Tensor) -> Tensor:
        if rhs.shape[0] == 0:
            return rhs.clone()
        lam, scale, dampen = self.regularization[block.name], self.scale, self.dampen
        tiny = torch.finfo(rhs.dtype).tiny
        b_norm = torch.linalg.norm(rhs, dim=1)
        shift = lam + dampen * scale
        # the iteration expands along h where hᵀ(H_t + λI)h / hᵀh is below −dampen·scale; less than
        # 100 eps · scale below is rounding (products are accurate to about eps times the curvature)
        expands_below = -dampen * scale - 100 * torch.finfo(rhs.dtype).eps * scale
        # a convergent iteration with PSD batch curvatures stays below scale‖b‖ / (λ + dampen·scale)
        bound = 10 * scale * b_norm / shift if shift > 0 else None
        keep = 1 - dampen - lam / scale  # h_{t+1} = b + keep · h_t − weight · H_t h_t / scale

        # the block's per-sample gradient engine (empirical Fisher), shared by every product
        engine = self._block_engine(block)

        def batch_product(x: Tensor, y: Tensor):
            op = CurvatureOperator(
                self.layout,
                self.loss,
                [(x, y)],
                block,
                self.second_order_mode,
                lambda a, c: (a, c),
                engine=engine,
            )
            return op.matmat

        h = rhs.clone()
        batches = self._batches()
        change = torch.zeros(rhs.shape[0], dtype=rhs.dtype, device=rhs.device)
        growing, previous_largest, expanding = 0, float("inf"), 0
        # the latest iteration's most negative regularized curvature along an iterate, that iterate, its batch
        latest_curvature, latest_direction, latest_batch = float("inf"), rhs[0], None
        iteration = 0

        def diverged(iteration: int, why: str) -> Exception:
            if latest_batch is not None and latest_curvature < expands_below:
                return self._negative_curvature(
                    block, iteration, latest_batch, latest_direction, latest_curvature, why
                )
            return self._diverged(block, iteration, why)

        with tqdm(total=self.maxiter, disable=not self.progress, desc=f"LiSSA {block.name}") as bar:
            for iteration in range(1, self.maxiter + 1):
                x, y = next(batches)
                weight = batch_size_of(x) / self._mean_batch_size  # a cycle over the loader averages to H
                product = batch_product(x, y)
                Hh = product(h)
                # c = hᵀ(H_t + λI)h / hᵀh per row: the iteration expands along h where c < −dampen·scale
                curvature = (h * Hh).sum(1) / (h * h).sum(1).clamp_min(tiny) + lam
                if bool(torch.isfinite(curvature).all()):
                    row = int(curvature.argmin())
                    latest_curvature = curvature[row].item()
                    latest_direction, latest_batch = h[row].clone(), (product, batch_size_of(x))
                    expanding = expanding + 1 if latest_curvature < expands_below else 0
                h_new = torch.add(rhs, h, alpha=keep)
                h_new.add_(Hh, alpha=-weight / scale)
                new_norm = torch.linalg.norm(h_new, dim=1)
                # a non-finite entry makes its row's norm non-finite
                if not bool(torch.isfinite(new_norm).all()):
                    raise diverged(iteration, "the iterates are no longer finite")
                if expanding >= self.NEGATIVE_CURVATURE_ITERATIONS:
                    raise diverged(iteration, f"expanded along negative curvature {expanding} times in a row")
                change = torch.linalg.norm(h.sub_(h_new), dim=1) / new_norm.clamp_min(tiny)
                h = h_new
                if bound is not None and bool((new_norm > bound).any()):
                    raise diverged(iteration, "an iterate exceeded scale·‖b‖/(λ + dampen·scale) tenfold")
                worst = change.max().item()
                largest = new_norm.max().item()
                growing = growing + 1 if worst > 1 and largest > previous_largest else 0
                previous_largest = largest
                if growing >= 20:
                    raise diverged(iteration, "the iterates kept growing by more than themselves")
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
