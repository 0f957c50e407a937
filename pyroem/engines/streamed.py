r"""MAP-EM on a :class:`~pyroem.Mixture` whose data are read chunk by chunk.

The statistics of the exact E-step are sums over data points, so one pass over the
chunks of a :class:`~pyroem.sources.ChunkSource` gives exactly the statistics the
in-memory E-step computes: the fit is the same, and its memory is
``O(chunk_size · K · dim)`` plus the reservoir sample the initialisation uses, whatever
the number of rows. The same entry point runs stepwise EM
(:mod:`pyroem.engines.stepwise`) on a source or on in-memory data.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from pyroem.em import Engine, run_em
from pyroem.engines.cavi import StepwiseSettings, fit_mixture_cavi
from pyroem.engines.initialization import seeded_generator
from pyroem.engines.stepwise import StepwiseEngine, check_stepwise
from pyroem.errors import SpecError
from pyroem.estep.enumerate import score_labels, score_mixture
from pyroem.estep.stream import ChunksEStep, StreamedData, open_streamed, score_totals
from pyroem.fits.core import FitResult, fit_start
from pyroem.model.families import Family
from pyroem.model.mixture import Mixture, as_data
from pyroem.mstep.mixture import MixtureEngine
from pyroem.options import FitSettings, check_integer
from pyroem.sources import ChunkSource

__all__ = ["LARGE_DATA_OPTIONS", "fit_mixture_large"]

#: ``pyroem.fit`` options of this path (besides the common ones).
LARGE_DATA_OPTIONS = ("stepwise", "batch_size", "kappa", "passes", "shuffle", "reservoir_size")

_RESERVOIR_SIZE = 100_000


class _StreamEngine(MixtureEngine):
    """Batch MAP-EM over a source: each iteration reads every chunk once."""

    def __init__(
        self,
        spec: Mixture,
        family: Family,
        source: ChunkSource,
        sample: torch.Tensor,
        num_data: int,
        settings: FitSettings,
    ) -> None:
        self.spec, self.family, self.init_data, self.start = spec, family, sample, settings.init
        self.generator = seeded_generator(settings.seed)
        self.estep = ChunksEStep(family, spec.weights_prior, source, sample.dtype, sample.device)
        self.name = settings.method
        self.num_data = num_data
        self.collective = settings.collective


def _in_memory_source(data: torch.Tensor, chunk_size: int) -> ChunkSource:
    return ChunkSource(lambda: [data], "the data", chunk_size, data.dtype, data.device)


def fit_mixture_large(
    model: Mixture,
    data: Any,
    source: ChunkSource | bool,
    settings: FitSettings,
    *,
    stepwise: bool = False,
    batch_size: int = 1024,
    kappa: float = 0.7,
    passes: int = 5,
    shuffle: bool = True,
    reservoir_size: int = _RESERVOIR_SIZE,
    **cavi_options: Any,
) -> FitResult:
    """MAP-EM on a ``Mixture`` from a chunked source (``source``), or stepwise EM on a
    source or on in-memory ``data`` (``stepwise=True``; ``source`` is ``False``).

    Args:
        model: the mixture.
        data: the in-memory data when ``source`` is ``None``.
        source: the chunked source, or ``False`` for in-memory ``data``.
        stepwise: run stepwise (online) EM (:mod:`pyroem.engines.stepwise`) instead of batch EM.
        batch_size: stepwise EM's minibatch rows.
        kappa: stepwise EM's step-size exponent, ``γ_t = (t + 2)^{-κ}``, ``κ ∈ (0.5, 1]``.
        passes: stepwise EM's most passes over the data (``max_iter`` is batch EM's).
        shuffle: stepwise EM on in-memory data visits the rows in a fresh random order
            each pass (a source is read in its own order: shuffle it on disk).
        reservoir_size: most rows of the sample that resolves data-derived defaults and
            initialises (k-means++ etc.) a streamed fit.
        cavi_options: vb-em's options (``num_draws`` etc.; see
            :func:`~pyroem.engines.cavi.fit_mixture_cavi`).
        settings: :func:`pyroem.fit`'s common options. A distributed fit's collectives
            (:mod:`pyroem.engines.distributed`): each rank's E-step reads its shard of the
            source, the ranks' reservoir samples are merged into one, and the final
            scoring pass reads the whole source.
    """
    method, chunk_size, collective = settings.method, settings.chunk_size, settings.collective
    if method not in ("map-em", "vb-em"):
        raise SpecError(
            f"streamed data and stepwise EM are supported for method='map-em' and 'vb-em' "
            f"(CAVI) on a Mixture; got method={method!r}: load the data into memory for "
            f"{method}, or use map-em or vb-em"
        )
    check_integer("reservoir_size", reservoir_size, 1)
    if not isinstance(stepwise, bool):
        raise SpecError(f"stepwise must be True or False; got {stepwise!r}")
    if stepwise:
        check_stepwise(batch_size, kappa)
    init = "kmeans++" if settings.init is None else settings.init
    init = fit_start(init)
    settings = replace(settings, init=init, n_init=1 if isinstance(init, dict) else settings.n_init)
    generator_seed = 0 if settings.seed is None else settings.seed
    streamed: StreamedData | None = None
    if not isinstance(source, ChunkSource):
        tensor = as_data(data, dtype=settings.dtype, device=settings.device)
        sample, num_data, held = tensor, tensor.shape[0], tensor
        source = shard = _in_memory_source(tensor, chunk_size)
    else:
        streamed = open_streamed(
            model,
            source,
            settings.dtype,
            settings.device,
            reservoir_size,
            generator_seed,
            collective,
        )
        source, shard, sample, num_data = streamed
        held = None
    if method == "vb-em":
        online = None
        if stepwise:
            online = StepwiseSettings(source, batch_size, kappa, shuffle and held is not None)
            settings = replace(settings, max_iter=passes)
        fit = fit_mixture_cavi(
            model.with_proper_prior(),
            sample,
            settings,
            streamed=streamed,
            stepwise=online,
            **cavi_options,
        )
        if streamed is not None:
            fit.options.update(source=source.description, reservoir_size=reservoir_size)
        return fit
    family = model.bind(sample)
    options = settings.record()
    if held is None:
        options.update(source=source.description, reservoir_size=reservoir_size)
    options.update(collective.record())
    engine: Engine
    if stepwise:
        engine = StepwiseEngine(
            model,
            family,
            source,
            sample,
            num_data,
            init,
            settings.seed,
            batch_size=batch_size,
            kappa=kappa,
            shuffle=shuffle and held is not None,
            name=f"{method} stepwise",
        )
        settings = replace(settings, max_iter=passes)
        del options["max_iter"]
        options.update(stepwise=True, batch_size=batch_size, kappa=kappa, passes=passes)
    else:
        engine = _StreamEngine(model, family, shard, sample, num_data, settings)
    result = run_em(engine, **settings.loop())
    best = result.best

    def score(chunk: torch.Tensor) -> torch.Tensor:
        return score_mixture(family, best.params, chunk, chunk_size, False)[0]

    if held is None:
        # Per-row values (labels, pointwise log-likelihood) are not kept: memory stays
        # flat in N; the fit computes them from the source on demand.
        rows: dict[str, Any] = dict(
            pointwise_log_likelihood=None,
            labels=None,
            source=source,
            num_data=num_data,
            log_likelihood=score_totals(
                StreamedData(source, shard, sample, num_data), score, collective
            )[1],
        )
    else:
        pointwise, labels = score_labels(family, best.params, held, chunk_size)
        rows = dict(pointwise_log_likelihood=pointwise, labels=labels)
    return FitResult(
        spec=model,
        family=family,
        method=method,
        internal=best.params,
        objective=best.last.objective,
        **rows,
        **result.fit_fields(),
        options={**options, **result.record()},
        data=held,
    )
