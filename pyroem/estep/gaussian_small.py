r"""The Gaussian mixture E-step at small dimension (``D ≤ 4``), fused block by block.

At small ``D`` a whitening product ``L_k⁻¹ (x − μ_k)`` has an inner dimension of one
to four, where batched matrix products run far below their speed. Here the E-step is a
handful of elementwise operations over ``(K, rows)`` blocks, each block's temporaries
read again by the next step while they are still in cache:

- deviations ``d = x − μ_k`` ``(K, D, rows)``, about each component's own mean as in
  the other kernels (exact wherever the data sit, however far from the origin), read
  from the rows as stored;
- full and tied covariances: the whitened deviations written out per coordinate,
  ``u_i = Σ_{j≤i} W_{k,ij} d_j`` (``W = L⁻¹``, lower triangular), and
  ``log π_k + log N(x | μ_k, Σ_k) = c_k − ½ Σ_i u_i²`` accumulated in place;
  diagonal covariances: the squares ``d²`` beside ``d`` in one buffer, and the
  quadratic form one batched product with ``−½/σ²``;
- the caller's normalisation into responsibilities ``r``;
- the moments about ``μ_k`` accumulated over the blocks: ``Σ r``, ``Σ r d`` and
  ``Σ r d dᵀ`` (a batched product of ``r d`` with ``d``), or for diagonal covariances
  ``Σ r d`` and ``Σ r d²`` as one batched product of ``r`` with ``[d; d²]``.

The moments are turned into statistics by the corrected two-pass formula of the
other kernels (``S = Σ r d dᵀ − (Σ r d)(Σ r d)ᵀ / N``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from pyroem.estep.gaussian_features import features_pay

__all__ = [
    "SMALL_BLOCK_BYTES",
    "SMALL_MAX_DIM",
    "SmallGaussian",
    "small_block_rows",
    "small_kernels",
    "takes_small_kernel",
]

SMALL_MAX_DIM = 4
"""Largest dimension the kernel of this module is taken at."""

SMALL_BLOCK_BYTES = 8 * 2**20
"""Bytes of a block's temporaries (two ``(K, 2D, rows)`` buffers, the log-densities):
large enough that the few microseconds each tensor operation costs to dispatch stay
small beside its work (at K = 3, D = 2, float64, one thread, 2 MiB blocks ran 1.2x
slower than 8 MiB ones), small enough to stay in the last-level cache."""

Scratch = Callable[[str, tuple[int, ...], torch.Tensor], torch.Tensor]
Moments = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class SmallGaussian(NamedTuple):
    """The components, as the kernel reads them.

    Attributes:
        centres: the means ``μ_k`` ``(K, D)``.
        diagonal: ``W_{k,ii}`` ``(K, D)``: the whitening factor's diagonal, or ``1/σ_{k,i}``.
        lower: ``W_k`` ``(K, D, D)`` whose strictly lower triangle is read (full and tied
            covariances), or ``None`` (diagonal covariances).
        const: the log-normalisers ``(K,)``.
    """

    centres: torch.Tensor
    diagonal: torch.Tensor
    lower: torch.Tensor | None
    const: torch.Tensor


def takes_small_kernel(num_components: int, dim: int, diagonal: bool) -> bool:
    """Whether this module's kernel is the E-step's: ``D ≤`` :data:`SMALL_MAX_DIM`, except
    full and tied covariances where the quadratic-feature kernel pays (``K ≥ 8`` at
    ``D = 4``: one thread, float64, 2e5×4×8, this kernel took 1.23× its time)."""
    return dim <= SMALL_MAX_DIM and (diagonal or not features_pay(num_components, dim))


def small_block_rows(num_components: int, dim: int, element_size: int) -> int:
    """Rows of a block whose temporaries take about :data:`SMALL_BLOCK_BYTES`: two
    ``(K, 2D, rows)`` buffers (deviations and their squares or whitened values) and the
    log-densities with a temporary of the normalisation, ``2K``."""
    row_bytes = (4 * num_components * dim + 2 * num_components) * element_size
    return max(256, SMALL_BLOCK_BYTES // row_bytes)


def small_kernels(
    components: SmallGaussian, scratch: Scratch
) -> tuple[
    Callable[[torch.Tensor], tuple[torch.Tensor, None]],
    Callable[[torch.Tensor, Any, torch.Tensor], Moments],
    Callable[..., tuple[Moments, torch.Tensor]],
]:
    """``(log_prob, statistics, fused)`` over prepared chunks ``(n, D)``.

    ``log_prob(chunk)`` returns the log-densities ``(K, n)`` and no cache;
    ``statistics(chunk, None, resp)`` and ``fused(chunk, log_weights (K, 1), row_weights,
    responsibilities)`` return the moments about the means ``(Σ r (K,), Σ r d (K, D),
    second)``, ``second`` being ``Σ r d dᵀ`` ``(K, D, D)`` (full and tied) or ``Σ r d²``
    ``(K, D)`` (diagonal) (see :class:`~pyroem.model.families.EStepKernels`; ``fused``
    also the chunk's log-likelihood). ``scratch(name, shape, like)`` hands out the
    reused buffers.
    """
    centres, diagonal, lower, const = components
    num_components, dim = centres.shape
    centres3 = centres[:, :, None]
    column = const[:, None]
    if lower is None:
        # ½ Σ_i d_i²/σ_i² as one batched product with the squares.
        halves = (-0.5 * diagonal.square())[:, None, :].contiguous()  # (K, 1, D)
    else:
        diagonal3 = diagonal[:, :, None]
        # The strictly lower entries, each a (K, 1) column: u_i += W_ij d_j.
        below = [(i, j, lower[:, i, j, None].contiguous()) for i in range(dim) for j in range(i)]

    def buffers(chunk: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Block width and two ``(K, 2D, width)`` buffers: the deviations (and, for
        diagonal covariances, their squares after them), and the whitened values."""
        size = chunk.shape[0]
        width = small_block_rows(num_components, dim, chunk.element_size())
        # Blocks of equal width: no short last block paying a whole block's dispatch.
        blocks = max(1, -(-size // width))
        width = max(1, -(-size // blocks))
        shape = (num_components, 2 * dim, width)
        return width, scratch("small_deviations", shape, chunk), scratch("small_work", shape, chunk)

    def deviations(chunk: torch.Tensor, block: slice, held: torch.Tensor) -> torch.Tensor:
        """``x − μ_k`` ``(K, D, count)`` of the rows ``block``, into ``held``."""
        count = block.stop - block.start
        # From the strided (count, D) rows directly: a transposed copy first (whole, or
        # column by column) runs no faster.
        return torch.sub(chunk[block].T[None], centres3, out=held[:, :dim, :count])

    def log_density(
        chunk: torch.Tensor,
        block: slice,
        held: torch.Tensor,
        work: torch.Tensor,
        offset: torch.Tensor,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """``offset_k − ½ |W_k (x − μ_k)|²`` ``(K, count)`` of the rows ``block`` into
        ``out``, their deviations (and squares) left in ``held``."""
        deviation = deviations(chunk, block, held)
        count = deviation.shape[2]
        if lower is None:
            squares = torch.square(deviation, out=held[:, dim:, :count])
            torch.bmm(halves, squares, out=out[:, None, :])
            return out.add_(offset)
        white = torch.mul(deviation, diagonal3, out=work[:, :dim, :count])
        for i, j, factor in below:
            white[:, i].addcmul_(deviation[:, j], factor)
        torch.addcmul(offset, white[:, 0], white[:, 0], value=-0.5, out=out)
        for i in range(1, dim):
            out.addcmul_(white[:, i], white[:, i], value=-0.5)
        return out

    def accumulate(
        held: torch.Tensor, work: torch.Tensor, resp: torch.Tensor, sums: list[torch.Tensor]
    ) -> None:
        """Adds the block's ``(Σ r, Σ r d, second)`` to ``sums``."""
        count = resp.shape[1]
        sums[0].add_(resp.sum(1))
        if lower is None:
            # (K, 1, n) @ (K, n, 2D): Σ r d and Σ r d² in one product.
            moments = torch.bmm(resp[:, None, :], held[:, :, :count].mT)[:, 0]
            sums[1].add_(moments[:, :dim])
            sums[2].add_(moments[:, dim:])
            return
        deviation = held[:, :dim, :count]
        weighted = torch.mul(deviation, resp[:, None, :], out=work[:, :dim, :count])
        sums[1].add_(weighted.sum(2))
        sums[2].baddbmm_(weighted, deviation.mT)

    def zeros(chunk: torch.Tensor) -> list[torch.Tensor]:
        second = (num_components, dim) if lower is None else (num_components, dim, dim)
        shapes = ((num_components,), (num_components, dim), second)
        return [chunk.new_zeros(shape) for shape in shapes]

    def log_prob(chunk: torch.Tensor) -> tuple[torch.Tensor, None]:
        size = chunk.shape[0]
        out = chunk.new_empty(num_components, size)
        width, held, work = buffers(chunk)
        for start in range(0, size, width):
            block = slice(start, min(start + width, size))
            log_density(chunk, block, held, work, column, out[:, block])
        return out, None

    def statistics(chunk: torch.Tensor, cache: Any, resp: torch.Tensor) -> Moments:
        size = chunk.shape[0]
        width, held, work = buffers(chunk)
        sums = zeros(chunk)
        for start in range(0, size, width):
            block = slice(start, min(start + width, size))
            count = block.stop - block.start
            deviation = deviations(chunk, block, held)
            if lower is None:
                torch.square(deviation, out=held[:, dim:, :count])
            accumulate(held, work, resp[:, block], sums)
        return sums[0], sums[1], sums[2]

    def fused(
        chunk: torch.Tensor,
        log_weights: torch.Tensor,
        row_weights: torch.Tensor | None,
        responsibilities: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[Moments, torch.Tensor]:
        size = chunk.shape[0]
        width, held, work = buffers(chunk)
        joint = scratch("small_joint", (num_components, width), chunk)
        offset = column + log_weights
        sums = zeros(chunk)
        total = chunk.new_zeros(())
        for start in range(0, size, width):
            block = slice(start, min(start + width, size))
            count = block.stop - block.start
            log_joint = log_density(chunk, block, held, work, offset, joint[:, :count])
            weights = None if row_weights is None else row_weights[block]
            resp, log_norm = responsibilities(log_joint, weights)
            total += log_norm.sum()
            accumulate(held, work, resp, sums)
        return (sums[0], sums[1], sums[2]), total

    return log_prob, statistics, fused
