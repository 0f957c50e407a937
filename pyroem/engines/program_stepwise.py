r"""Stepwise (online) EM for a Pyro program whose M-steps are all closed forms.

The program's data plate subsamples (``pyro.plate(name, N, subsample_size=b)``). Each
minibatch ``B_t`` is a subsample of ``b`` entries that this engine chooses (a pass visits
every entry once, in a fresh random order when ``shuffle``) and hands to the plate, which
scales every site in it by ``N / b`` as in Pyro's SVI. The exact E-step on the minibatch
gives each closed form (:mod:`pyroem.mstep.recognised`) its weighted data sums ``ŝ(B_t)``
(counts, moments, scatter matrices, already scaled by ``N / b``), and those sums move as
in the ``Mixture`` path (:mod:`pyroem.engines.stepwise`):

.. math::
    s_t = (1 − γ_t)\, s_{t−1} + γ_t\, \hat s(B_t; θ_{t−1}),\qquad
    γ_t = (t + 2)^{−κ},\ κ ∈ (0.5, 1],

the first minibatch setting ``s_1``; the prior joins the running sums once per closed
form, as in batch MAP-EM (the sums pass through the hook
:func:`~pyroem.mstep.recognised.summed_over_shards`, the same one a distributed fit sums
its ranks' statistics with). The reported parameters are the Polyak–Ruppert average of the
iterates of the passes after the first (after one pass, its last iterate).

Each EM "iteration" of the history is one pass, and its objective is the exact
``log p(x, θ)`` of the reported parameters over all ``N`` entries: the plate is handed
consecutive subsamples that cover it (the last one filled up with entries whose
observations are masked out), and the scaled log-likelihoods are summed and divided by
``N / b``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from pyroem.em import EMRun, Engine, EStepResult, MStepResult
from pyroem.engines.initialization import seeded_generator
from pyroem.engines.stepwise import check_stepwise, running_mean, step_size
from pyroem.errors import NotSupportedError, SpecError
from pyroem.estep.program import posterior
from pyroem.model.program import ProgramModel
from pyroem.mstep.recognised import recognise, summed_over_shards
from pyroem.options import check_integer

__all__ = [
    "PlateSubsamples",
    "ProgramStepwiseEngine",
    "StepwiseOptions",
    "check_closed_forms",
    "check_stepwise_plate",
    "check_uses_fixed",
    "minibatch_error",
    "minibatch_plate",
    "stepwise_plate",
]


class StepwiseOptions(NamedTuple):
    """``pyroem.fit``'s stepwise options for a Pyro program (see :func:`stepwise_plate`)."""

    batch_size: int | None
    kappa: float
    passes: int
    shuffle: bool


class PlateSubsamples(Messenger):
    """Hands the plate ``name`` the subsample ``indices``; with ``kept`` set, only its
    first ``kept`` entries count: the observed sites in the plate are masked beyond them.
    With ``indices`` ``None`` (:meth:`release`) it does nothing.

    Args:
        name: the plate.
        size: its entries ``N``.
        batch: its subsample size ``b``.
    """

    def __init__(self, name: str, size: int, batch: int) -> None:
        super().__init__()
        self.name, self.size, self.batch = name, size, batch
        self.indices: torch.Tensor | None = torch.arange(batch)
        self.kept: int | None = None

    def release(self) -> None:
        """Leave the plate to the program from here on (after the fit)."""
        self.indices, self.kept = None, None

    def _pyro_sample(self, msg: Any) -> None:
        if self.indices is None:
            return
        if msg["name"] == self.name and site_is_subsample(msg):
            msg["value"] = self.indices.to(msg["fn"].device)
            return
        if self.kept is None or not msg["is_observed"]:
            return
        for frame in msg["cond_indep_stack"]:
            if frame.name == self.name and frame.dim is not None:
                keep = torch.arange(self.batch) < self.kept
                keep = keep.reshape((-1,) + (1,) * (-frame.dim - 1))
                mask = msg["mask"]
                msg["mask"] = keep if mask is None or mask is True else mask & keep


def stepwise_plate(program: ProgramModel, options: StepwiseOptions) -> PlateSubsamples | None:
    """The subsampling plate of a program fitted by stepwise EM, its subsamples from here
    on chosen by the returned handler (the program is wrapped in it); ``None`` when no
    plate subsamples and ``batch_size`` is given: :func:`minibatch_plate` then picks the
    plate over the data from the first trace.

    Raises:
        SpecError: bad options (``batch_size`` other than the plate's subsample size).
        NotSupportedError: no plate subsamples and no ``batch_size``, or several plates do.
    """
    check_integer("passes", options.passes, 1)
    if not isinstance(options.shuffle, bool):
        raise SpecError(f"shuffle must be True or False; got {options.shuffle!r}")
    plates = program.subsampled
    if not plates:
        if options.batch_size is not None:
            check_stepwise(options.batch_size, options.kappa)
            return None
        raise NotSupportedError(
            f"stepwise EM on a Pyro program reads its data in the subsamples of its data "
            f"plate, but no plate of {program.name} subsamples and no batch_size is given: "
            "pass batch_size=b (pyroem then hands the plate over the data points "
            "subsamples of b entries; the program must observe data[indices], indexed by "
            "the plate's indices), or declare that plate as pyro.plate(name, N, "
            "subsample_size=b); or leave out stepwise for batch EM"
        )
    if len(plates) > 1:
        raise NotSupportedError(
            f"stepwise EM on a Pyro program subsamples one plate; the plates {sorted(plates)} "
            "all subsample: keep subsample_size on the outermost plate over the data points"
        )
    ((name, (size, batch)),) = plates.items()
    if options.batch_size is None:
        options = options._replace(batch_size=batch)
    check_stepwise(options.batch_size, options.kappa)
    if options.batch_size != batch:
        raise SpecError(
            f"batch_size={options.batch_size}, but the plate {name!r} subsamples {batch} of "
            f"its {size} entries (subsample_size={batch}): leave out batch_size (the plate "
            "sets the minibatch size) or pass the same size to the program"
        )
    handler = PlateSubsamples(name, size, batch)
    program.model = handler(program.model)
    return handler


def minibatch_plate(program: ProgramModel, options: StepwiseOptions, trace: Any) -> PlateSubsamples:
    """The plate over the data points of a program none of whose plates subsamples,
    from its first (full) trace: the one vectorized plate that holds every observed and
    every enumerated site and no parameter. From here on the returned handler hands it
    subsamples of ``batch_size`` entries (the program is wrapped in it).

    Raises:
        NotSupportedError: no such plate, or several.
        SpecError: ``batch_size`` not smaller than the plate.
    """
    assert options.batch_size is not None
    sizes = {
        name: int(site["fn"].size)
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and site_is_subsample(site)
    }
    candidates = set(sizes)
    for name in [*program.observed, *program.enumerated]:
        if name in trace.nodes:
            stack = trace.nodes[name]["cond_indep_stack"]
            candidates &= {frame.name for frame in stack if frame.vectorized}
    for name in program.params:
        candidates -= {frame.name for frame in trace.nodes[name]["cond_indep_stack"]}
    if len(candidates) != 1:
        found = f"the plates {sorted(candidates)} all do" if candidates else "none does"
        raise NotSupportedError(
            f"stepwise EM with batch_size={options.batch_size} minibatches the one plate "
            f"of {program.name} that holds every observation and latent and no parameter, "
            f"but {found}: declare the plate to minibatch as pyro.plate(name, N, "
            "subsample_size=b), observing data[indices]"
        )
    name = candidates.pop()
    if options.batch_size >= sizes[name]:
        raise SpecError(
            f"batch_size={options.batch_size} must be smaller than the {sizes[name]} "
            f"entries of plate {name!r}; for minibatches of all of it, leave out stepwise"
        )
    handler = PlateSubsamples(name, sizes[name], options.batch_size)
    program.model = handler(program.model)
    return handler


def minibatch_error(plate: PlateSubsamples, program: ProgramModel, err: Exception) -> Exception:
    """The error of a program that fails when pyroem hands its plate a subsample."""
    return NotSupportedError(
        f"stepwise EM hands the plate {plate.name!r} of {program.name} subsamples of "
        f"{plate.batch} of its {plate.size} entries, and the program failed on one "
        f"({type(err).__name__}: {err}): index the data with the plate's indices "
        "(with pyro.plate(name, N) as indices: ... obs=data[indices]), or declare the "
        "plate with subsample_size"
    )


def check_closed_forms(found: Mapping[str, Any]) -> None:
    """Raise unless every parameter has a closed form (stepwise EM keeps running
    averages of their data sums)."""
    gradient = [name for name, block in found.items() if block is None]
    if gradient:
        raise NotSupportedError(
            f"stepwise EM on a Pyro program takes closed-form M-steps only (it keeps running "
            f"averages of their data sums); the parameters {gradient} have none: give them "
            "conjugate priors the closed forms recognise, or leave out stepwise (batch EM, "
            "without subsample_size)"
        )


def check_stepwise_plate(program: ProgramModel, trace: Any, plate: PlateSubsamples) -> None:
    """Raise unless the subsampled plate is vectorized, no parameter lies in it, and
    every observed and enumerated site does."""
    frames = [
        frame
        for site in trace.nodes.values()
        for frame in site.get("cond_indep_stack", ())
        if frame.name == plate.name
    ]
    if any(not frame.vectorized for frame in frames):
        raise NotSupportedError(
            f"stepwise EM on a Pyro program hands the subsampled plate {plate.name!r} its "
            "minibatches, but the program iterates over it (for i in pyro.plate(...)), "
            "naming new sites for each subsample: write it vectorized, "
            "with pyro.plate(name, N, subsample_size=b) as indices, observing data[indices]"
        )

    def in_plate(name: str) -> bool:
        return any(frame.name == plate.name for frame in trace.nodes[name]["cond_indep_stack"])

    local = [name for name in program.params if in_plate(name)]
    # A discrete latent outside the plate couples all the subsamples: its posterior is
    # no sum over them, nor is the log-likelihood.
    outside = [
        name
        for name in [*program.observed, *program.enumerated]
        if name in trace.nodes and not in_plate(name)
    ]
    if local or outside:
        what = (
            f"the parameters {local} lie in it (one value per entry)"
            if local
            else f"the observed or enumerated sites {outside} lie outside it"
        )
        raise NotSupportedError(
            f"stepwise EM on a Pyro program subsamples the plate {plate.name!r}, which must "
            f"hold every observation and discrete latent and no parameter, but {what}: move "
            "them, or leave out stepwise"
        )


def _sample_sites(trace: Any) -> frozenset[str]:
    return frozenset(
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    )


def _plate_dim(trace: Any, name: str) -> int:
    """The batch dimension of plate ``name`` (negative), 0 if no site lies in it."""
    for site in trace.nodes.values():
        for frame in site.get("cond_indep_stack", ()):
            if frame.name == name and frame.dim is not None:
                return int(frame.dim)
    return 0


def _check_sites(
    program: ProgramModel, plate: PlateSubsamples, first: frozenset[str], trace: Any
) -> None:
    """The closed forms read the sites of the first subsample's run: a subsample whose
    run has other sites (a loop over its own longest sequence) is refused."""
    sites = _sample_sites(trace)
    if sites != first:
        changed = sorted(sites ^ first)
        raise NotSupportedError(
            f"the sites of {program.name} depend on the subsample of plate {plate.name!r} "
            f"(present in some subsamples only: {changed[:5]}); stepwise EM's closed forms "
            "read the same sites in every subsample: loop over the longest length of all "
            "the data (e.g. range(max_length), not range(lengths[index].max())) and mask "
            "the steps past each length"
        )


def _same_uses(block: Any, other: Any) -> bool:
    if other is None or other.slot != block.slot or len(other.uses) != len(block.uses):
        return False
    return all(
        a.site == b.site and a.slot == b.slot and torch.equal(a.rows, b.rows)
        for a, b in zip(block.uses, other.uses, strict=True)
    )


def check_uses_fixed(
    program: ProgramModel,
    found: Mapping[str, Any],
    values: Mapping[str, torch.Tensor],
    plate: PlateSubsamples,
    first_trace: Any,
) -> None:
    """Raise unless the closed forms read their parameters' rows the same way in another
    subsample (the plate's last entries) as in the first: the running sums add up each
    subsample's sums row by row, so the rows an entry reads must not depend on the data
    (a parameter indexed by a group id observed with the data)."""
    if all(block is None for block in found.values()):
        return
    first = plate.indices
    plate.indices = torch.arange(plate.size - plate.batch, plate.size)
    try:
        trace = program.trace(values)
        _check_sites(program, plate, _sample_sites(first_trace), trace)
        again = recognise(program, values, trace)
    finally:
        plate.indices = first
    changed = [
        name
        for name, block in found.items()
        if block is not None and not _same_uses(block, again.get(name))
    ]
    if changed:
        raise NotSupportedError(
            f"stepwise EM on a Pyro program keeps running sums of each closed form's "
            f"statistics per parameter row, but which rows of {changed} a site reads "
            f"depends on the subsample of plate {plate.name!r} (e.g. a parameter indexed "
            "by an id observed with the data): fit it by batch EM (leave out stepwise and "
            "subsampling)"
        )


class _RunningSums:
    """The closed forms' data sums (in the order the sweep asks for them), moved towards
    each minibatch's by the step size ``gain``."""

    def __init__(self) -> None:
        self.sums: list[list[torch.Tensor]] = []
        self.calls = 0
        self.gain = 1.0

    def start(self, gain: float) -> None:
        self.calls = 0
        self.gain = gain

    def __call__(self, sums: list[torch.Tensor]) -> list[torch.Tensor]:
        index = self.calls
        self.calls += 1
        if index == len(self.sums):
            self.sums.append([total.detach() for total in sums])
        else:
            g = self.gain
            self.sums[index] = [
                (1 - g) * old + g * new.detach()
                for old, new in zip(self.sums[index], sums, strict=True)
            ]
        return list(self.sums[index])


def _batches(
    order: torch.Tensor, batch: int, filler: Callable[[int], torch.Tensor]
) -> Iterator[tuple[torch.Tensor, int]]:
    """Consecutive subsamples of ``batch`` entries of ``order``, with how many of each
    are new; the last one, if short, filled up with ``filler(missing)``."""
    for chunk in order.split(batch):
        kept = chunk.numel()
        if kept < batch:
            chunk = torch.cat([chunk, filler(batch - kept)])
        yield chunk, kept


class ProgramStepwiseEngine(Engine):
    """Stepwise EM on a Pyro program as an :class:`~pyroem.em.Engine`: ``m_step`` is one
    pass of minibatch updates, ``e_step`` scores the averaged parameters on all entries.

    Args:
        engine: the batch MAP-EM engine of the program (its starts, closed forms, sweep
            order and log-Jacobian are reused).
        plate: the handler of the subsampled plate.
        options: the stepwise options.
        seed: seed of the order of the entries.
        sweep: ``sweep(trace, weights, values)`` runs the closed forms of one ECM sweep,
            updating ``values`` in place.
    """

    def __init__(
        self,
        engine: Any,
        plate: PlateSubsamples,
        options: StepwiseOptions,
        seed: int,
        sweep: Callable[[Any, Mapping[str, torch.Tensor], dict[str, torch.Tensor]], None],
    ) -> None:
        self.base, self.plate, self.options, self.sweep = engine, plate, options, sweep
        self.program: ProgramModel = engine.program
        self.name = f"{engine.name} stepwise"
        self.num_data = engine.num_data * plate.size / plate.batch
        self.generator = seeded_generator(seed)
        self.sites = _sample_sites(engine.first_trace)
        self.plate_dim = _plate_dim(engine.first_trace, plate.name)
        self._reset({})

    def _reset(self, values: dict[str, torch.Tensor]) -> None:
        self.current = dict(values)
        self.running = _RunningSums()
        self.updates = 0
        self.mean: dict[str, torch.Tensor] | None = None
        self.averaged = 0

    def init(self, restart: int) -> MStepResult:
        start = self.base.init(restart)
        self._reset(start.params)
        return start

    def e_step(self, values: dict[str, torch.Tensor]) -> EStepResult:
        """The exact objective over all ``N`` entries, by consecutive subsamples, with
        the posterior marginals of the enumerated sites at every entry as statistics."""
        plate = self.plate
        log_likelihood = 0.0
        log_prior = 0.0
        marginals: dict[str, torch.Tensor] = {}
        try:
            for indices, kept in _batches(
                torch.arange(plate.size), plate.batch, lambda n: torch.arange(n)
            ):
                plate.indices = indices
                plate.kept = None if kept == plate.batch else kept
                post = posterior(self.program, values)
                log_likelihood += float(post.log_likelihood)
                log_prior = float(post.log_joint) - float(post.log_likelihood)
                self._collect(marginals, post.marginals, indices, kept)
        finally:
            plate.kept = None
        log_likelihood *= plate.batch / plate.size
        if not math.isfinite(log_likelihood):
            raise NotSupportedError(
                f"the log-likelihood of {self.program.name} is not finite at the current "
                "parameters: check the data and the priors"
            )
        objective = log_likelihood + log_prior + self.base.log_jacobian(values)
        # The statistics the loop keeps are the posterior marginals of every entry.
        return EStepResult(marginals, objective, log_likelihood)

    def _collect(
        self,
        out: dict[str, torch.Tensor],
        marginals: Mapping[str, torch.Tensor],
        indices: torch.Tensor,
        kept: int,
    ) -> None:
        """Place a subsample's posterior marginals at its entries of the plate (sites
        whose marginals do not run along the plate are left out)."""
        dim = self.plate_dim
        for name, table in marginals.items():
            axis = table.dim() - 1 + dim
            if dim >= 0 or axis < 0 or table.shape[axis] != self.plate.batch:
                continue
            if name not in out:
                shape = list(table.shape)
                shape[axis] = self.plate.size
                out[name] = table.new_zeros(shape)
            out[name].index_copy_(axis, indices[:kept], table.narrow(axis, 0, kept))

    def m_step(self, stats: Any, values: Any, iteration: int) -> MStepResult:
        """One pass of minibatch updates."""
        plate, options = self.plate, self.options
        size, batch = plate.size, plate.batch
        if options.shuffle:
            order = torch.randperm(size, generator=self.generator)
        else:
            order = torch.arange(size)

        def filler(missing: int) -> torch.Tensor:
            # Entries of the pass's earlier subsamples, at random: the last subsample is
            # a uniform draw too.
            earlier = order[: size - size % batch]
            pick = torch.randperm(earlier.numel(), generator=self.generator)[:missing]
            return earlier[pick]

        gain = 1.0
        for indices, _ in _batches(order, batch, filler):
            plate.indices = indices
            post = posterior(self.program, self.current)
            self._check_sites(post.trace)
            if self.updates:
                gain = step_size(self.updates, options.kappa)
            self.running.start(gain)
            current = dict(self.current)
            with summed_over_shards(self.running):
                self.sweep(post.trace, post.weights, current)
            self.current = current
            self.updates += 1
            if iteration > 1:
                self.averaged += 1
                if self.mean is None:
                    self.mean = dict(current)
                else:
                    self.mean = {
                        name: running_mean(mean, current[name], self.averaged)
                        for name, mean in self.mean.items()
                    }
        reported = self.current if self.mean is None else self.mean
        return MStepResult(
            dict(reported),
            info={"step_size": gain, "updates": self.updates, "averaged": self.averaged},
        )

    def _check_sites(self, trace: Any) -> None:
        _check_sites(self.program, self.plate, self.sites, trace)

    def unconverged_message(self, run: EMRun) -> str | None:
        # Stepwise EM runs the passes it is given; reaching ``passes`` is expected.
        return None
