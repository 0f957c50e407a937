r"""The exact E-step of a :class:`~pyroem.Mixture` over data read chunk by chunk.

The statistics of the exact E-step are sums over data points, so one pass over the
chunks of a :class:`~pyroem.sources.ChunkSource` gives exactly the statistics the
in-memory E-step computes, in memory ``O(chunk_size · K · dim)`` whatever the number
of rows. Here: that E-step, the opening of a source for a fit (its reservoir sample)
and the final scoring pass. The fits built on them: :mod:`pyroem.engines.streamed` (MAP-EM,
stepwise EM), :mod:`pyroem.engines.cavi` (CAVI).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch

from pyroem.engines.distributed import LOCAL, Collective
from pyroem.errors import DataError, SpecError
from pyroem.estep.enumerate import MixtureEStep
from pyroem.model.families import Family
from pyroem.model.mixture import Mixture
from pyroem.sources import ChunkSource, scan

__all__ = ["ChunksEStep", "StreamedData", "open_streamed", "score_totals"]


class _Prepared:
    """The family-prepared chunks of a source, re-read on every iteration."""

    def __init__(self, family: Family, chunks: Iterable[torch.Tensor]) -> None:
        self.family, self.chunks = family, chunks

    def __iter__(self) -> Iterator[torch.Tensor]:
        for chunk in self.chunks:
            yield self.family.prepare(chunk)


class ChunksEStep(MixtureEStep):
    """The exact E-step of :class:`MixtureEStep` over any re-iterable of raw chunks
    (a :class:`ChunkSource`, or one minibatch), prepared as they are read.

    Args:
        family: the bound family.
        weights_prior: Dirichlet concentration of the weights, ``(K,)``.
        chunks: re-iterable of ``(n, dim)`` tensors.
        dtype: their dtype.
        device: their device.
    """

    def __init__(
        self,
        family: Family,
        weights_prior: torch.Tensor,
        chunks: Iterable[torch.Tensor],
        dtype: torch.dtype,
        device: Any,
    ) -> None:
        self.family = family
        self.weights_prior = weights_prior.to(dtype=dtype, device=device)
        self.chunks = _Prepared(family, chunks)  # type: ignore[assignment]
        self.workspace: dict[str, torch.Tensor] = {}


class StreamedData(NamedTuple):
    """A source opened for a fit.

    Attributes:
        source: the whole source, handing chunks in the fit's dtype and device.
        shard: the part of it this rank's E-step reads (the whole source in one process).
        sample: the reservoir sample of the whole source (initialisation, data defaults).
        num_data: rows in the whole source.
    """

    source: ChunkSource
    shard: ChunkSource
    sample: torch.Tensor
    num_data: int


def open_streamed(
    model: Mixture,
    source: ChunkSource,
    dtype: torch.dtype,
    device: Any,
    reservoir_size: int,
    seed: int,
    collective: Collective = LOCAL,
) -> StreamedData:
    """The first pass over ``source``: validate, count and sample it (each rank its shard,
    the samples merged into one; :mod:`pyroem.engines.distributed`).

    Raises:
        DataError: data the family refuses, or an empty source (on every rank, when any
            rank met it).
        SpecError: fewer rows than components.
    """
    source = source.with_options(dtype, device)
    shard = source
    if collective is LOCAL:
        found = scan(source, model.family.validate, reservoir_size, seed)
        num_data, sample = found.num_rows, found.sample
    else:
        shard = source.shard(collective.rank, collective.world_size)
        error = None
        try:
            found = scan(shard, model.family.validate, reservoir_size, seed)
        except DataError as err:
            error = err
        collective.check(error)
        num_data, sample = collective.merge_samples(
            found.num_rows, found.sample, reservoir_size, seed
        )
    if num_data < model.num_components:
        raise SpecError(
            f"num_components={model.num_components} exceeds the number of data points "
            f"({num_data}) in {source.description}; use fewer components or more data"
        )
    return StreamedData(source, shard, sample, num_data)


def score_totals(
    streamed: StreamedData,
    score: Callable[[torch.Tensor], torch.Tensor],
    collective: Collective = LOCAL,
) -> tuple[int, float]:
    """The final pass of a streamed fit: the rows and the sum of ``score(chunk)`` (a
    value per row, e.g. the log-likelihood) over the whole source, each rank reading its
    shard and the totals summed over the ranks. No per-row value is kept, so memory does
    not grow with the rows; the fit computes them on demand from the source.

    Raises:
        DataError: the source gave another number of rows than in its first pass.
    """
    rows, total = 0, 0.0
    for chunk in streamed.shard if collective is not LOCAL else streamed.source:
        rows += chunk.shape[0]
        total += float(score(chunk).sum(dtype=torch.float64))
    if collective is not LOCAL:
        rows, total = round(collective.sum(float(rows))), collective.sum(total)
    if rows != streamed.num_data:
        raise DataError(
            f"{streamed.source.description} gave {rows} rows in the last pass but "
            f"{streamed.num_data} in the first; a source must give the same data on every pass"
        )
    return rows, total
