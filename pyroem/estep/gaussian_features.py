r"""The full-covariance Gaussian E-step as two matrix products over quadratic features.

About a centre ``c`` (the chunk's mean), with ``y = x − c``, ``b_k = μ_k − c`` and
``Λ_k = Σ_k⁻¹``,

.. math::
    \log N(x | μ_k, Σ_k) = a_k + (Λ_k b_k)ᵀ y − ½ Σ_i Λ_{k,ii} y_i² − Σ_{i<j} Λ_{k,ij} y_i y_j,

a linear function of the features ``φ(y) = [1, y, y_i y_j]`` (each unordered pair
``i, j`` once, see :func:`feature_pairs`): the ``(K, n)`` log-densities are one product
``W φ``, and the statistics (counts, first moments and each distinct second moment
about ``c``) one product ``r φᵀ``. That is
half the flops of whitening ``x − μ_k`` and forming ``Σ r d dᵀ`` per component, with no
``(K, D, n)`` temporary.

The price is cancellation: the terms are of size ``λ_max(Λ_k)·|y|²`` where the
log-density is of size one, and the second moments about ``c`` of size
``|m_k − c|²`` where the scatter is of size ``σ_k²``. :func:`feature_loss` bounds the
factor by which rounding grows, per chunk, and the caller takes this kernel only where
it is below :func:`max_feature_loss` (otherwise it whitens ``x − μ_k``, exact to the
dtype's precision wherever the data sit). The moments alone need less: their rounding
grows by :func:`moment_losses`, the responsibility-weighted mean of the same bound,
which the caller reads once a chunk is done to keep the features' moments of a
component whose log-densities it whitened.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "FEATURE_BLOCK_BYTES",
    "FeatureWeights",
    "feature_block_rows",
    "feature_coefficients",
    "feature_count",
    "feature_log_prob",
    "feature_loss",
    "feature_loss_floor",
    "feature_moment_statistics",
    "feature_pairs",
    "feature_rows",
    "feature_shifts",
    "feature_statistics",
    "feature_weights",
    "features_pay",
    "max_feature_loss",
    "moment_losses",
    "wrapped_feature_rows",
]

FEATURE_BLOCK_BYTES = 2 * 2**20
"""Bytes of a block of features ``(P, rows)``: small enough to stay in cache between
the feature build and the product that reads it, large enough that the per-block calls
cost little (one thread, float64, E-step alone: 2 MiB blocks took 0.88-0.99 the time of
1 MiB ones at K, D = 16, 16 / 8, 16 / 16, 8 / 16, 32 and 1.00 at 8, 48)."""


def features_pay(num_components: int, dim: int) -> bool:
    """Whether the feature kernel is the faster one: its feature build costs per row
    whatever ``K``, so it pays from about eight components (one thread, float64: 1.8-2x
    at K = 16, D = 16 and 32; 1.1x at K = 8, D = 16; 0.7x at K = 8, D = 64 and at
    K = 3, D = 2, where blocks of features stop fitting in cache or the build dominates)."""
    return num_components >= 8 and 4 <= dim <= 48


def max_feature_loss(dtype: torch.dtype) -> float:
    """The largest :func:`feature_loss` the feature kernel is taken at: ``eps^(-1/3)``
    (float64 about 1.6e5, keeping ≥ 10 of 16 digits; float32 about 200, keeping 5 of 7)."""
    return float(torch.finfo(dtype).eps) ** (-1.0 / 3.0)


def moment_losses(weights: FeatureWeights, moments: torch.Tensor) -> torch.Tensor:
    r"""``λ_max(Λ_k)·Σ_n r_nk |y_n|² / N_k`` ``(K,)`` from the moments ``r φᵀ`` ``(K, P)``:
    the factor by which rounding in the features' moments grows in component ``k``'s
    scatter relative to its smallest variance (the responsibility-weighted form of
    :func:`feature_loss`, read once the responsibilities are known; 0 where ``N_k = 0``)."""
    dim = weights.means.shape[1]
    counts = moments[:, 0]
    spread = moments[:, dim + 1 : 2 * dim + 1].sum(1)
    return weights.largest * spread / counts.clamp(min=torch.finfo(counts.dtype).tiny)


class FeatureWeights(NamedTuple):
    """What the feature kernel needs from the parameters.

    Attributes:
        means: ``(K, D)``; precisions: ``Λ_k`` ``(K, D, D)``; const: the log-normalisers
            ``(K,)``; largest: ``λ_max(Λ_k)`` ``(K,)``; rows, cols: the pairs of the
            quadratic features (:func:`feature_pairs`) ``(T,)``, ``T = D(D+1)/2``.
    """

    means: torch.Tensor
    precisions: torch.Tensor
    const: torch.Tensor
    largest: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor

    def take(self, index: torch.Tensor) -> FeatureWeights:
        """The components ``index``."""
        return FeatureWeights(
            self.means[index],
            self.precisions[index],
            self.const[index],
            self.largest[index],
            self.rows,
            self.cols,
        )


def feature_weights(
    means: torch.Tensor, whiten: torch.Tensor, const: torch.Tensor
) -> FeatureWeights:
    """From the means ``(K, D)``, ``L_k⁻¹`` ``(K, D, D)`` (``Σ_k = L_k L_kᵀ``) and the
    log-normalisers ``(K,)``."""
    dim = means.shape[1]
    precisions = whiten.mT @ whiten
    # λ_max(Λ) = 1 / σ_min(L)²: from the singular values of L⁻¹.
    largest = torch.linalg.matrix_norm(whiten, ord=2).square()
    rows, cols = feature_pairs(dim, means.device)
    return FeatureWeights(means, precisions, const, largest, rows, cols)


def feature_loss(
    weights: FeatureWeights, centred: torch.Tensor, centre: torch.Tensor
) -> torch.Tensor:
    r"""``λ_max(Λ_k)·(max_n |y_n|² + |μ_k − c|²)`` ``(K,)``: the factor by which the
    features' rounding exceeds the whitening kernel's in component ``k``'s log-density
    (in units of ``eps``) and in its scatter (relative to its smallest variance).

    Args:
        centred: the chunk about its centre, ``y`` ``(D, n)``; centre: ``c`` ``(D,)``.
    """
    spread = centred.square().sum(0).max()
    offsets = (weights.means - centre).square().sum(1)
    return weights.largest * (spread + offsets)


def feature_loss_floor(
    weights: FeatureWeights, rows: torch.Tensor, centre: torch.Tensor
) -> torch.Tensor:
    r"""A lower bound ``(K,)`` on :func:`feature_loss` from the chunk ``(D, n)`` itself,
    without centring it: ``max_n |y_n|² ≥ max_i max_n y_{n,i}²``, the largest squared
    distance of a coordinate's range from the centre (one read of the chunk, no
    ``(D, n)`` temporary)."""
    # amax and amin apart: aminmax along a dimension runs ten times slower here.
    low, high = rows.amin(1), rows.amax(1)
    reach = torch.maximum(high - centre, centre - low).square().max()
    offsets = (weights.means - centre).square().sum(1)
    return weights.largest * (reach + offsets)


def feature_coefficients(weights: FeatureWeights, centre: torch.Tensor) -> torch.Tensor:
    """``W`` ``(K, P)`` with ``log N(x | μ_k, Σ_k) = W_k · φ(x − c)``."""
    offsets = weights.means - centre  # (K, D)
    linear = (weights.precisions @ offsets[:, :, None])[:, :, 0]  # Λ b
    quadratic = -weights.precisions[:, weights.rows, weights.cols]
    quadratic[:, weights.rows == weights.cols] *= 0.5
    intercept = weights.const - 0.5 * (linear * offsets).sum(1)
    return torch.cat([intercept[:, None], linear, quadratic], dim=1)


def feature_block_rows(num_features: int, element_size: int) -> int:
    """Rows of a block of features ``(P, rows)`` that takes :data:`FEATURE_BLOCK_BYTES`."""
    return max(16, FEATURE_BLOCK_BYTES // (num_features * element_size))


def feature_count(dim: int) -> int:
    """``P = 1 + D + D(D+1)/2``, the length of ``φ``."""
    return 1 + dim + dim * (dim + 1) // 2


def feature_shifts(dim: int) -> int:
    """Cyclic shifts ``s = 0 … ⌊(D − 1)/2⌋`` whose products ``y_i y_{(i+s) mod D}`` over
    every ``i`` are each a full row of ``D`` features (see :func:`feature_pairs`)."""
    return (dim - 1) // 2 + 1


def feature_pairs(
    dim: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(i, j)`` ``(T,)`` each of the quadratic features ``y_i y_j``, in :func:`feature_rows`'
    order: shift by shift, ``j = (i + s) mod D`` for every ``i`` (each unordered pair at
    cyclic distance ``s < D/2`` once), then for even ``D`` the half shift ``j = i + D/2``,
    ``i < D/2`` (each of those pairs once): ``T = D(D+1)/2`` pairs, none twice."""
    index = torch.arange(dim, device=device)
    shifts = torch.arange(feature_shifts(dim), device=device)
    rows = index.repeat(shifts.shape[0])
    cols = ((index[None, :] + shifts[:, None]) % dim).reshape(-1)
    if dim % 2 == 0:
        half = torch.arange(dim // 2, device=device)
        rows, cols = torch.cat([rows, half]), torch.cat([cols, half + dim // 2])
    return rows, cols


def feature_rows(
    block: torch.Tensor, out: torch.Tensor, wrap: torch.Tensor | None = None
) -> torch.Tensor:
    """``φ`` of a block ``(D, m)`` into ``out`` ``(P, m)``, the products in
    :func:`feature_pairs`' order (see :func:`wrapped_feature_rows`), the block first
    copied into ``wrap``, a ``(D + shifts − 1, m)`` buffer (None: one is allocated)."""
    dim, width = block.shape
    shifts = feature_shifts(dim)
    if wrap is None:
        wrap = block.new_empty(dim + shifts - 1, width)
    wrap[:dim].copy_(block)
    wrap[dim:].copy_(block[: shifts - 1])
    return wrapped_feature_rows(wrap, dim, out)


def wrapped_feature_rows(wrapped: torch.Tensor, dim: int, out: torch.Tensor) -> torch.Tensor:
    """``φ`` into ``out`` ``(P, m)`` of a block given wrapped around, ``(D + shifts − 1, m)``
    (its first ``shifts − 1`` rows again after its ``D``, see :func:`feature_shifts`):
    every full shift's ``D`` products in one broadcast product of the block with a
    strided view of the wrapped rows, so the build costs a handful of operations
    whatever ``D`` (row by row it took ``D``, and their per-call overhead was most of
    the build in cache-sized blocks)."""
    shifts = feature_shifts(dim)
    block = wrapped[:dim]
    out[0].fill_(1.0)
    out[1 : dim + 1].copy_(block)
    # (shifts, D, m) with [s, i] = y_{(i+s) mod D}: windows of D rows, one row apart.
    shifted = wrapped.unfold(0, dim, 1).permute(0, 2, 1)
    full = dim + 1 + shifts * dim
    torch.mul(block[None], shifted, out=out[dim + 1 : full].unflatten(0, (shifts, dim)))
    if dim % 2 == 0:
        torch.mul(block[: dim // 2], block[dim // 2 :], out=out[full:])
    return out


def feature_log_prob(
    weights: FeatureWeights,
    centred: torch.Tensor,
    centre: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """Log-densities ``(K, n)`` into ``out``, from the chunk about its centre ``(D, n)``,
    block by block (no ``(P, n)`` features of the chunk are kept)."""
    coefficients = feature_coefficients(weights, centre)
    num_features = coefficients.shape[1]
    width = min(feature_block_rows(num_features, centred.element_size()), centred.shape[1])
    buffer = centred.new_empty(num_features, width)
    wrap = centred.new_empty(centred.shape[0] + feature_shifts(centred.shape[0]) - 1, width)
    scores = centred.new_empty(coefficients.shape[0], width)
    for start in range(0, centred.shape[1], width):
        block = centred[:, start : start + width]
        features = feature_rows(block, buffer[:, : block.shape[1]], wrap[:, : block.shape[1]])
        # Into a contiguous block: BLAS writes a strided slice of out through a copy anyway.
        scores_block = torch.mm(coefficients, features, out=scores[:, : block.shape[1]])
        out[:, start : start + width].copy_(scores_block)
    return out


def feature_statistics(
    weights: FeatureWeights,
    centred: torch.Tensor,
    centre: torch.Tensor,
    resp: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(counts (K,), sum_x (K, D), scatter (K, D, D))`` of the chunk about its centre
    ``(D, n)`` under responsibilities ``(K, n)``; ``sum_x`` about the origin. The features
    are built block by block."""
    num_components, dim = weights.means.shape
    num_features = feature_count(dim)
    width = min(feature_block_rows(num_features, centred.element_size()), centred.shape[1])
    buffer = centred.new_empty(num_features, width)
    wrap = centred.new_empty(dim + feature_shifts(dim) - 1, width)
    moments = centred.new_zeros(num_components, num_features)
    for start in range(0, centred.shape[1], width):
        block = centred[:, start : start + width]
        count = block.shape[1]
        features = feature_rows(block, buffer[:, :count], wrap[:, :count])
        moments.addmm_(resp[:, start : start + width], features.T)
    return feature_moment_statistics(weights, moments, centre)


def feature_moment_statistics(
    weights: FeatureWeights, moments: torch.Tensor, centre: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(counts, sum_x, scatter)`` from the moments ``r φᵀ`` ``(K, P)`` about ``c``."""
    num_components, dim = weights.means.shape
    counts, first = moments[:, 0], moments[:, 1 : dim + 1]
    second = moments.new_empty(num_components, dim, dim)
    second[:, weights.rows, weights.cols] = moments[:, dim + 1 :]
    second[:, weights.cols, weights.rows] = moments[:, dim + 1 :]
    offsets = first / counts.clamp(min=torch.finfo(counts.dtype).tiny)[:, None]
    scatter = second - first[:, :, None] * offsets[:, None, :]
    return counts, counts[:, None] * centre + first, 0.5 * (scatter + scatter.mT)
