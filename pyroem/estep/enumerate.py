r"""Exact E-step for the declarative mixture: z summed out in log space.

For each data chunk the component log-densities ``log p(x_n | θ_k)`` come from
the family's batched kernel, and

.. math::
    \log p(x_n | θ) = \operatorname{logsumexp}_k (\log π_k + \log p(x_n | θ_k)),\qquad
    w_{nk} = \exp(\log π_k + \log p(x_n | θ_k) - \log p(x_n | θ)).

The responsibilities ``w`` are turned into summable sufficient statistics
chunk by chunk, so memory is bounded by ``chunk_size``, not by ``num_data``.
After this E-step the bound is tight: ``L(q, θ) = log p(x, θ)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import repeat
from typing import Any, NamedTuple

import torch

from pyroem.em import EStepResult
from pyroem.estep.missing import has_nan, missing_log_prob, split_missing
from pyroem.model.families import EStepKernels, Family
from pyroem.model.params import MixtureParams

__all__ = [
    "CHUNK_BYTES",
    "MIN_CHUNK_ROWS",
    "KeptScores",
    "MixtureEStep",
    "add_statistics",
    "chunk_rows",
    "mixture_log_likelihood",
    "normalise_log_joint",
    "scale_statistics",
    "score_labels",
    "score_mixture",
]


def add_statistics(left: Any, right: Any) -> Any:
    """Statistics of two disjoint chunks together.

    Sums elementwise, unless the statistics define their own ``merge`` (a Gaussian's
    scatter about each component's mean is combined by the pairwise update).
    """
    merge = getattr(left, "merge", None)
    if merge is not None:
        return merge(right)
    return type(left)(*(a + b for a, b in zip(left, right, strict=True)))


def scale_statistics(stats: Any, factor: float) -> Any:
    """Statistics of the same data with every weight multiplied by ``factor``."""
    return type(stats)(*(factor * value for value in stats))


CHUNK_BYTES = 4 * 2**20
"""Target size of the E-step's largest per-chunk temporary (``(K, D, rows)`` unless the
family says otherwise, see ``Family.chunk_row_bytes``)."""

MIN_CHUNK_ROWS = 4096
"""Fewest rows of a chunk cut by :data:`CHUNK_BYTES` (below it, overhead per chunk shows)."""


def chunk_rows(row_bytes: int, chunk_size: int) -> int:
    """Rows per chunk: at most ``chunk_size``, and few enough that the kernels' largest
    per-chunk temporary, ``row_bytes`` a row, stays near :data:`CHUNK_BYTES`, but never
    below :data:`MIN_CHUNK_ROWS` rows."""
    return max(1, min(chunk_size, max(MIN_CHUNK_ROWS, CHUNK_BYTES // max(row_bytes, 1))))


class MixtureEStep:
    """Exact, chunked E-step of a :class:`~pyroem.Mixture` on fixed data.

    Args:
        family: the spec's family bound to ``data``.
        weights_prior: Dirichlet concentration of the weights, ``(K,)``.
        data: ``(num_data, dim)``.
        chunk_size: rows per chunk, at most: a chunk is cut further so that a
            ``(K, D, rows)`` kernel temporary stays near :data:`CHUNK_BYTES` (larger
            temporaries cost page faults on every allocation, smaller ones overhead
            per chunk), but never below :data:`MIN_CHUNK_ROWS` rows.
        sample_weight: optional ``(num_data,)`` non-negative frequency weights: row ``n``
            counts ``w_n`` times in the statistics and the log-likelihood.

    NaN entries of ``data`` are missing values, marginalised (see
    :mod:`pyroem.estep.missing`): rows without any go through the family's fused
    kernels as before, the others through its missing-data kernels.
    """

    # Per chunk, the rows' frequency weights (None: every row counts once).
    chunk_weights: list[torch.Tensor] | None = None
    # Rows with missing entries: (prepared rows, pattern index, their weights), and the
    # observed-coordinate patterns the indices refer to (none for complete data).
    missing_blocks: Sequence[tuple[torch.Tensor, int | None, torch.Tensor | None]] = ()
    patterns: Sequence[torch.Tensor] = ()

    # The per-row scores of the last E-step asked to keep them (see __call__).
    kept: KeptScores | None = None

    def __init__(
        self,
        family: Family,
        weights_prior: torch.Tensor,
        data: torch.Tensor,
        chunk_size: int,
        sample_weight: torch.Tensor | None = None,
        fused: bool = True,
    ) -> None:
        self.family = family
        self.weights_prior = weights_prior.to(dtype=data.dtype, device=data.device)
        num_components, size = weights_prior.shape[0], data.element_size()
        dim = data.shape[1] if data.ndim > 1 else 1
        row_bytes = family.chunk_row_bytes(num_components, dim, size, fused)
        self.chunk_size = chunk_rows(row_bytes, chunk_size)
        if has_nan(data):
            missing = torch.isnan(data)
            block_bytes = family.chunk_row_bytes(num_components, dim, size, fused=False)
            blocks_rows = chunk_rows(block_bytes, chunk_size)
            complete, self.patterns, blocks = split_missing(family, missing, blocks_rows)
            prepared_blocks = []
            for block in blocks:
                observed = None if block.pattern is None else self.patterns[block.pattern]
                prepared = family.prepare_missing(data[block.rows], observed)
                block_weights = None if sample_weight is None else sample_weight[block.rows]
                prepared_blocks.append((prepared, block.pattern, block_weights))
            self.missing_blocks = prepared_blocks
            data = data[complete]
            sample_weight = None if sample_weight is None else sample_weight[complete]
        # No chunk where every row went to the missing-data blocks above.
        chunks = data.split(self.chunk_size) if data.shape[0] > 0 else ()
        self.chunks = [family.prepare(chunk) for chunk in chunks]
        if sample_weight is not None:
            self.chunk_weights = list(sample_weight.to(data).split(self.chunk_size))
        # The kernels' temporaries, reused from chunk to chunk and E-step to E-step.
        self.workspace: dict[str, torch.Tensor] = {}

    def row_weights(self) -> Iterable[torch.Tensor | None]:
        """Each chunk's frequency weights, ``None`` per chunk when every row counts once."""
        return repeat(None) if self.chunk_weights is None else self.chunk_weights

    def log_prior(self, params: MixtureParams) -> torch.Tensor:
        """``log Dirichlet(π | α) + log p(θ)``; removed components are left out."""
        alpha = self.weights_prior[params.active]
        if alpha.shape[0] == 1:
            log_weights_prior = params.weights.new_zeros(())
        else:
            dirichlet = torch.distributions.Dirichlet(alpha)
            log_weights_prior = dirichlet.log_prob(params.weights)
        return log_weights_prior + self.family.log_prior(params.components)

    def __call__(self, params: MixtureParams, keep: bool = False) -> EStepResult:
        """The statistics and objective at ``params``. ``keep``: also keep each row's
        ``log p(x_n | θ)`` and label (its most probable component) in :attr:`kept`, so
        that the fit's result needs no scoring pass of its own where this E-step was
        its last (rows with missing entries: not kept, :attr:`kept` is ``None``)."""
        kernels = self.family.estep_kernels(params.components, self.workspace)
        log_weights = params.weights.log()[:, None]
        stats = None
        log_likelihood = params.weights.new_zeros(())
        self.kept = None
        keep = keep and not self.missing_blocks
        if keep:
            num_rows = sum(chunk.shape[0] for chunk in self.chunks)
            pointwise = log_weights.new_empty(num_rows)
            labels = torch.empty(num_rows, dtype=torch.long, device=log_weights.device)

        def accumulate(
            kernels: EStepKernels,
            chunk: torch.Tensor,
            row_weights: torch.Tensor | None,
            normalise: Callable[..., tuple[torch.Tensor, torch.Tensor]] = responsibilities,
        ) -> None:
            nonlocal stats, log_likelihood
            if kernels.fused is not None:
                chunk_stats, chunk_log_likelihood = kernels.fused(
                    chunk, log_weights, row_weights, normalise
                )
            else:
                # (K, n) layout: the reductions over components run across contiguous rows.
                joint, cache = kernels.log_prob(chunk)
                resp, log_norm = normalise(joint.add_(log_weights), row_weights)
                chunk_stats = kernels.statistics(chunk, cache, resp)
                del cache
                chunk_log_likelihood = log_norm.sum()
            stats = chunk_stats if stats is None else add_statistics(stats, chunk_stats)
            log_likelihood = log_likelihood + chunk_log_likelihood

        start = 0
        for chunk, row_weights in zip(self.chunks, self.row_weights(), strict=False):
            stop = start + chunk.shape[0]
            normalise = (
                _keeping(pointwise[start:stop], labels[start:stop]) if keep else responsibilities
            )
            accumulate(kernels, chunk, row_weights, normalise)
            start = stop
        if keep:
            self.kept = KeptScores(params, pointwise, labels)
        # Rows with missing entries: one set of kernels per missingness pattern.
        built: dict[int | None, EStepKernels] = {}
        for prepared, pattern, row_weights in self.missing_blocks:
            if pattern not in built:
                observed = None if pattern is None else self.patterns[pattern]
                built[pattern] = self.family.missing_kernels(params.components, observed)
            accumulate(built[pattern], prepared, row_weights)
        objective = log_likelihood + self.log_prior(params)
        return EStepResult(stats, float(objective), float(log_likelihood))


# Responsibilities at or below e^cutoff of a row's largest are set to exactly zero (exp() of
# underflowing arguments is slow on CPU, as are subnormal statistics). The cutoff is
# float32's (tiny·e⁸, about 3.5e-35) in wider dtypes too, so which components no datum
# reaches does not depend on the dtype (a log-likelihood moves by under 1e-34 relative).
_CUTOFF = math.log(torch.finfo(torch.float32).tiny) + 8


def normalise_log_joint(
    joint: torch.Tensor, dim: int, keep_joint: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(resp, log_total, peak)`` from ``log π_k + log p(x_n | θ_k)`` (components along
    ``dim``) in one in-place pass, exp once: ``log p(x_n | θ) = log_total + peak``. ``joint``
    is overwritten by ``resp``, or (``keep_joint``) by ``log r + log_total`` at the cutoff."""
    finfo = torch.finfo(joint.dtype)
    cutoff = max(math.log(finfo.tiny) + 8, _CUTOFF)
    peak = joint.amax(dim=dim, keepdim=True).clamp_(min=finfo.min)
    joint.sub_(peak).clamp_(min=cutoff)
    # Zero at and below e^cutoff after the exp: one pass, where a mask of the
    # arguments below the cutoff and a masked fill took three times as long.
    resp = joint.exp() if keep_joint else joint.exp_()
    torch.nn.functional.threshold(resp, math.exp(cutoff), 0.0, inplace=True)
    total = resp.sum(dim=dim, keepdim=True)
    return resp.div_(total), total.log_(), peak


class KeptScores(NamedTuple):
    """Each row's ``log p(x_n | θ)`` ``(N,)`` and label ``(N,)`` at ``params``, kept by
    an E-step (see :meth:`MixtureEStep.__call__`)."""

    params: MixtureParams
    pointwise: torch.Tensor
    labels: torch.Tensor


def _keeping(
    pointwise: torch.Tensor, labels: torch.Tensor
) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """:func:`responsibilities` for one chunk that also writes each row's ``log p(x_n)``
    (before any frequency weight) and label into the chunk's ``pointwise`` and
    ``labels``: the kernels call it on the chunk's rows in order, and a chunk run again
    starts again from its first row (the position wraps around)."""
    position = 0
    size = pointwise.shape[0]

    def normalise(
        log_joint: torch.Tensor, row_weights: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal position
        stop = position + log_joint.shape[1]
        labels[position:stop] = _labels(log_joint)
        resp, log_norm = responsibilities(log_joint, None)
        pointwise[position:stop] = log_norm[0]
        if row_weights is not None:
            resp.mul_(row_weights[None, :])
            log_norm.mul_(row_weights[None, :])
        position = stop % size
        return resp, log_norm

    return normalise


def _labels(log_joint: torch.Tensor) -> torch.Tensor:
    """Each row's most probable component from ``log π_k + log p(x_n | θ_k)`` ``(K, n)``:
    the first of equal largest, as argmax gives (which runs several times slower)."""
    return torch.max(log_joint, 0).indices


def responsibilities(
    log_joint: torch.Tensor, row_weights: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(resp (K, n), log p(x_n) (1, n))`` from ``log π_k + log p(x_n | θ_k)``
    ``(K, n)``, overwritten by ``resp``; both times the rows' frequency weights, if any."""
    resp, log_norm, peak = normalise_log_joint(log_joint, dim=0)
    log_norm.add_(peak)
    if row_weights is not None:
        resp.mul_(row_weights[None, :])
        log_norm.mul_(row_weights[None, :])
    return resp, log_norm


def score_mixture(
    family: Family,
    params: MixtureParams,
    data: torch.Tensor,
    chunk_size: int = 65536,
    log_resp: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pointwise log-likelihood ``(N,)`` and log-responsibilities ``(N, K)`` of ``data``.

    Chunk by chunk on the E-step's kernels, with chunks cut by bytes as the E-step's
    (:func:`chunk_rows`) and the kernels' temporaries reused: beyond the two outputs,
    memory does not grow with ``N``. Differentiable in ``params`` where they require
    grad (then through :func:`mixture_log_likelihood`).

    Args:
        family: the bound family.
        params: mixture parameters.
        data: ``(N, dim)``, validated; NaN entries are missing (marginalised).
        chunk_size: rows per chunk, at most.
        log_resp: compute the log-responsibilities; ``False``: an empty ``(0, K)`` in
            their place (the pointwise values alone, without an ``(N, K)`` output).
    """
    num_components = params.weights.shape[0]
    if torch.is_grad_enabled() and any(
        value.requires_grad for value in (params.weights, *params.components)
    ):
        log_prob = family.log_prob_fn(params.components)

        def chunk_log_prob(part: tuple[torch.Tensor, bool]) -> torch.Tensor:
            chunk, missing = part
            if missing:
                return missing_log_prob(family, params, chunk)
            return log_prob(family.prepare(chunk))

        # log_prob_fn's kernels hold (K, D, rows) temporaries: chunks by that rule.
        chunks = _scoring_chunks(family, num_components, data, chunk_size, fused=False)
        return mixture_log_likelihood(chunk_log_prob, params.weights, chunks)
    dtype = torch.promote_types(data.dtype, params.weights.dtype)
    log_norm = data.new_empty(data.shape[0], dtype=dtype)
    resp_rows = data.shape[0] if log_resp else 0
    log_resps = data.new_empty(resp_rows, num_components, dtype=dtype)
    with torch.no_grad():
        for rows, joint in _scored_chunks(family, params, data, chunk_size):
            if log_resp:
                torch.logsumexp(joint, dim=0, out=log_norm[rows])
                torch.sub(joint.T, log_norm[rows, None], out=log_resps[rows])
            else:
                log_norm[rows] = responsibilities(joint, None)[1][0]
    return log_norm, log_resps


def score_labels(
    family: Family, params: MixtureParams, data: torch.Tensor, chunk_size: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pointwise log-likelihood ``(N,)`` and labels ``(N,)`` (each row's most probable
    component) of ``data``: :func:`score_mixture`'s pass without its ``(N, K)`` output."""
    dtype = torch.promote_types(data.dtype, params.weights.dtype)
    log_norm = data.new_empty(data.shape[0], dtype=dtype)
    labels = torch.empty(data.shape[0], dtype=torch.long, device=data.device)
    with torch.no_grad():
        for rows, joint in _scored_chunks(family, params, data, chunk_size):
            labels[rows] = _labels(joint)
            log_norm[rows] = responsibilities(joint, None)[1][0]
    return log_norm, labels


def _scoring_chunks(
    family: Family, num_components: int, data: torch.Tensor, chunk_size: int, fused: bool = True
) -> Iterator[tuple[torch.Tensor, bool]]:
    """``data`` in chunks cut by bytes as the E-step's (:func:`chunk_rows`; ``fused``:
    for the E-step's kernels, else for the plain ones), each with whether it has missing
    entries (NaN): those are cut again for the missing-data kernels."""
    dim, size = data.shape[1] if data.ndim > 1 else 1, data.element_size()
    rows = chunk_rows(family.chunk_row_bytes(num_components, dim, size, fused), chunk_size)
    missing_rows = chunk_rows(family.chunk_row_bytes(num_components, dim, size, False), chunk_size)
    for chunk in data.split(rows):
        if not has_nan(chunk):
            yield chunk, False
        else:
            yield from ((part, True) for part in chunk.split(missing_rows))


def _scored_chunks(
    family: Family, params: MixtureParams, data: torch.Tensor, chunk_size: int
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Each chunk's rows of ``data`` and their ``log π_k + log p(x_n | θ_k)`` ``(K, n)``,
    on the E-step's kernels, their temporaries reused."""
    kernels = family.estep_kernels(params.components, {})
    log_weights = params.weights.log()[:, None]
    start = 0
    num_components = params.weights.shape[0]
    for chunk, missing in _scoring_chunks(family, num_components, data, chunk_size):
        stop = start + chunk.shape[0]
        if missing:
            joint = missing_log_prob(family, params, chunk).T
        else:
            joint, cache = kernels.log_prob(family.prepare(chunk))
            del cache
        yield slice(start, stop), joint.add_(log_weights)  # (K, n)
        start = stop


def mixture_log_likelihood(
    log_prob: Callable[[Any], torch.Tensor], weights: torch.Tensor, chunks: Iterable[Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``log p(x_n | θ) = logsumexp_k (log π_k + log p(x_n | θ_k))`` ``(N,)`` and the
    log-responsibilities ``(N, K)`` over prepared data chunks, differentiable (the
    E-step's in-place :func:`normalise_log_joint` computes the same numbers)."""
    log_weights, log_norms, log_resps = weights.log(), [], []
    for chunk in chunks:
        joint = log_prob(chunk) + log_weights
        log_norms.append(torch.logsumexp(joint, dim=1))
        log_resps.append(joint - log_norms[-1][:, None])
    return torch.cat(log_norms), torch.cat(log_resps)
