r"""Missing data (NaN entries) in the exact E-step of a :class:`~pyroem.Mixture`.

Missing entries are marginalised, not imputed: each row's log-density is that of its
observed entries, and the statistics are the expected complete-data ones given them
(for the gaussian family the conditional means and covariances of the missing
coordinates; for the others a missing entry counts for nothing). Rows with no missing
entry keep the family's fused kernels; the gaussian family's other rows are grouped by
their missingness pattern, each group handled by batched linear algebra on its observed
coordinates.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pyroem.model.families import Family
from pyroem.model.params import MixtureParams

__all__ = ["MissingBlock", "has_nan", "missing_log_prob", "split_missing"]


class MissingBlock(NamedTuple):
    """Rows with missing entries that share one kernel.

    Attributes:
        rows: their indices in the data, ``(n,)``.
        pattern: index into the list of patterns (``None``: rows of any pattern).
    """

    rows: torch.Tensor
    pattern: int | None


def has_nan(data: torch.Tensor) -> bool:
    """Whether ``data`` holds a NaN: its sum first (a NaN anywhere makes it NaN), which
    takes a quarter of the time of ``isnan(data).any()``, that only where the sum is NaN
    (an overflow of infinities of both signs can make it NaN too)."""
    if not data.is_floating_point():
        return False
    return bool(torch.isnan(data.sum())) and bool(torch.isnan(data).any())


def split_missing(
    family: Family, missing: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, list[torch.Tensor], list[MissingBlock]]:
    """The rows the family's ordinary kernels take, and blocks of the rest.

    Args:
        family: the bound family.
        missing: ``(num_data, D)`` bool, true where an entry is NaN.
        chunk_size: most rows per block.

    Returns:
        ``(complete, patterns, blocks)``: indices ``(m,)`` of the rows with every entry
        observed (all rows go to ``blocks`` where the family does not group by pattern),
        the observed-coordinate patterns ``(D,)`` bool, and the blocks of the other rows.
    """
    if not family.missing_by_pattern:
        rows = torch.arange(missing.shape[0], device=missing.device)
        empty = rows[:0]
        return empty, [], [MissingBlock(block, None) for block in rows.split(chunk_size)]
    incomplete = missing.any(1)
    complete = torch.nonzero(~incomplete).reshape(-1)
    rows = torch.nonzero(incomplete).reshape(-1)
    patterns, inverse = torch.unique(~missing[rows], dim=0, return_inverse=True)
    blocks: list[MissingBlock] = []
    for index in range(patterns.shape[0]):
        members = rows[inverse == index]
        blocks.extend(MissingBlock(block, index) for block in members.split(chunk_size))
    return complete, list(patterns), blocks


def missing_log_prob(family: Family, params: MixtureParams, data: torch.Tensor) -> torch.Tensor:
    """Component log-densities ``(N, K)`` of the observed entries of each row of ``data``
    (NaN where missing), on the family's kernels."""
    missing = torch.isnan(data)
    complete, patterns, blocks = split_missing(family, missing, data.shape[0])
    out = data.new_empty(data.shape[0], params.weights.shape[0])
    if complete.numel() > 0:
        log_prob = family.log_prob_fn(params.components)
        out[complete] = log_prob(family.prepare(data[complete]))
    for block in blocks:
        observed = None if block.pattern is None else patterns[block.pattern]
        kernels = family.missing_kernels(params.components, observed)
        prepared = family.prepare_missing(data[block.rows], observed)
        out[block.rows] = kernels.log_prob(prepared)[0].T
    return out
