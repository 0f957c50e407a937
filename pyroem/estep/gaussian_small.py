r"""The Gaussian mixture E-step at small dimension (``D ≤ 4``), fused block by block.

At small ``D`` a whitening product ``L_k⁻¹ (x − μ_k)`` has an inner dimension of two
or three: batched matrix products run far below their speed, and each of the E-step's
steps (deviations, whitening, quadratic form, normalisation, moments) is a pass over
memory. Here every step is a handful of elementwise operations over ``(K, rows)``
blocks small enough to stay in cache from the first step to the last:

- deviations ``d = x − μ_k`` ``(K, D, rows)``, about each component's own mean as in
  the other kernels (exact wherever the data sit, however far from the origin);
- the whitened deviations written out per coordinate, ``u_i = Σ_{j≤i} W_{k,ij} d_j``
  (``W = L⁻¹``, lower triangular; diagonal covariances: ``u_i = d_i / σ_{k,i}``), and
  ``log π_k + log N(x | μ_k, Σ_k) = c_k − ½ Σ_i u_i²`` accumulated in place;
- the caller's normalisation into responsibilities ``r``;
- the moments about ``μ_k``, ``Σ r``, ``Σ r d`` and ``Σ r d dᵀ``, as one batched
  product of ``r·[d; 1]`` with ``[d; 1]`` (the row of ones carries the counts and the
  first moments), accumulated over the blocks.

The moments are turned into statistics by the corrected two-pass formula of the
other kernels (``S = Σ r d dᵀ − (Σ r d)(Σ r d)ᵀ / N``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

__all__ = [
    "SMALL_BLOCK_BYTES",
    "SMALL_MAX_DIM",
    "SmallGaussian",
    "small_block_rows",
    "small_kernels",
]

SMALL_MAX_DIM = 4
"""Largest dimension the kernel of this module is taken at."""

SMALL_BLOCK_BYTES = 16777216
"""Bytes of a block's temporaries (deviations, weighted deviations, log-densities):
small enough that they stay in cache from the deviations to the moments."""

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


def small_block_rows(num_components: int, dim: int, element_size: int) -> int:
    """Rows of a block whose temporaries take about :data:`SMALL_BLOCK_BYTES`: the
    deviations with their row of ones and the weighted copy ``2·K·(D + 1)``, the
    log-densities and the normaliser's mask ``2·K``, and the rows themselves ``D``."""
    row_bytes = (2 * num_components * (dim + 1) + 2 * num_components + dim) * element_size
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
    responsibilities)`` return the moments about the means ``(counts (K,), Σ r d (K, D),
    Σ r d dᵀ (K, D, D))`` (see :class:`~pyroem.model.families.EStepKernels`; ``fused``
    also the chunk's log-likelihood). ``scratch(name, shape, like)`` hands out the
    reused buffers.
    """
    centres, diagonal, lower, const = components
    num_components, dim = centres.shape
    centres3 = centres[:, :, None]
    diagonal3 = diagonal[:, :, None]
    # The strictly lower entries, each a (K, 1) column: u_i += W_ij d_j.
    below = (
        []
        if lower is None
        else [(i, j, lower[:, i, j, None].contiguous()) for i in range(dim) for j in range(i)]
    )

    def buffers(chunk: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block width, the rows ``(D, width)``, the deviations with their row of ones
        ``(K, D + 1, width)`` and a second buffer of that shape."""
        width = min(small_block_rows(num_components, dim, chunk.element_size()), chunk.shape[0])
        rows = scratch("small_rows", (dim, width), chunk)
        augmented = scratch("small_augmented", (num_components, dim + 1, width), chunk)
        augmented[:, dim].fill_(1.0)
        work = scratch("small_work", (num_components, dim + 1, width), chunk)
        return width, rows, augmented, work

    def deviations(
        chunk: torch.Tensor, start: int, count: int, rows: torch.Tensor, augmented: torch.Tensor
    ) -> torch.Tensor:
        """``x − μ_k`` ``(K, D, count)`` of the block's rows, in ``augmented``."""
        out = augmented[:, :dim, :count]
        return torch.sub(chunk[start : start + count].T[None], centres3, out=out)

    def log_density(
        deviation: torch.Tensor, work: torch.Tensor, offset: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        """``offset_k − ½ |W_k d|²`` ``(K, count)`` into ``out``."""
        count = deviation.shape[2]
        white = torch.mul(deviation, diagonal3, out=work[:, :dim, :count])
        for i, j, factor in below:
            white[:, i].addcmul_(deviation[:, j], factor)
        torch.addcmul(offset, white[:, 0], white[:, 0], value=-0.5, out=out)
        for i in range(1, dim):
            out.addcmul_(white[:, i], white[:, i], value=-0.5)
        return out

    def moments_of(
        augmented: torch.Tensor, work: torch.Tensor, resp: torch.Tensor, into: torch.Tensor
    ) -> None:
        """``into += (r·[d; 1]) [d; 1]ᵀ`` ``(K, D + 1, D + 1)`` for a block of ``count`` rows."""
        count = resp.shape[1]
        block = augmented[:, :, :count]
        weighted = torch.mul(block, resp[:, None, :], out=work[:, :, :count])
        into.baddbmm_(weighted, block.mT)

    def split(moments: torch.Tensor) -> Moments:
        """``(Σ r, Σ r d, Σ r d dᵀ)`` from the accumulated ``(K, D + 1, D + 1)``."""
        return moments[:, dim, dim], moments[:, :dim, dim], moments[:, :dim, :dim]

    column = const[:, None]

    def log_prob(chunk: torch.Tensor) -> tuple[torch.Tensor, None]:
        size = chunk.shape[0]
        out = chunk.new_empty(num_components, size)
        width, rows, augmented, work = buffers(chunk)
        joint = scratch("small_joint", (num_components, width), chunk)
        for start in range(0, size, width):
            count = min(width, size - start)
            deviation = deviations(chunk, start, count, rows, augmented)
            out[:, start : start + count] = log_density(deviation, work, column, joint[:, :count])
        return out, None

    def statistics(chunk: torch.Tensor, cache: Any, resp: torch.Tensor) -> Moments:
        size = chunk.shape[0]
        width, rows, augmented, work = buffers(chunk)
        moments = chunk.new_zeros(num_components, dim + 1, dim + 1)
        for start in range(0, size, width):
            count = min(width, size - start)
            deviations(chunk, start, count, rows, augmented)
            moments_of(augmented, work, resp[:, start : start + count], moments)
        return split(moments)

    def fused(
        chunk: torch.Tensor,
        log_weights: torch.Tensor,
        row_weights: torch.Tensor | None,
        responsibilities: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[Moments, torch.Tensor]:
        size = chunk.shape[0]
        width, rows, augmented, work = buffers(chunk)
        joint = scratch("small_joint", (num_components, width), chunk)
        offset = column + log_weights
        moments = chunk.new_zeros(num_components, dim + 1, dim + 1)
        total = chunk.new_zeros(())
        for start in range(0, size, width):
            count = min(width, size - start)
            deviation = deviations(chunk, start, count, rows, augmented)
            log_joint = log_density(deviation, work, offset, joint[:, :count])
            weights = None if row_weights is None else row_weights[start : start + count]
            resp, log_norm = responsibilities(log_joint, weights)
            total += log_norm.sum()
            moments_of(augmented, work, resp, moments)
        return split(moments), total

    return log_prob, statistics, fused
