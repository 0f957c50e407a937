"""Pyro's own programs: pyroem map-em against SVI + AutoDelta on the same MAP problem.

The programs follow Pyro's examples (written here; see ``tests/engines/test_pyro_examples.py``
for the sources): ``examples/hmm.py``'s model_0 … model_4 and model_6 on synthetic
tones, the enumeration tutorial's mixture and HMM, the mixed-HMM, a mixture of
diagonal normals written with masks that read the assignment, ``capture_recapture``'s
per-period survival model, the DPMM tutorial's stick-breaking mixture, and small
programs with fewer than 100 observations.

For every program both fits start from the same values and maximise the same
function, in the same parameterisation: pyroem's objective ``fit.history.objective``
(the log joint, plus the log-Jacobian of Pyro's unconstraining maps where pyroem
chose ``space="unconstrained"``). The peer is ``SVI`` with ``TraceEnum_ELBO`` (the
discrete latents summed out exactly), an ``AutoDelta`` guide on the sample sites
(``pyro.param`` sites are Pyro parameters already), Adam at each learning rate of
``--learning-rates``, and, in the unconstrained space, the log-Jacobian added to the
ELBO, so that its loss is minus pyroem's objective. With a point mass the ELBO is
that objective exactly; SVI's steps return it, so it is scored for free.

Columns:

- ``iters``: pyroem's iterations at its default ``tol`` (1e-6 per observation) and
  its other defaults (``accelerate="auto"``: on a program with gradient M-steps, a
  SQUAREM cycle counts as one iteration once plain EM has slowed down); ``iters
  (squarem)`` and ``(cpu, squarem)``: the same with ``accelerate="squarem"``;
- ``log joint``: pyroem's ``fit.log_joint()`` at the default ``tol``;
  ``|Δ Pyro|``: its relative difference from Pyro's ``−TraceEnum_ELBO`` at the
  fitted values;
- ``SVI best``: SVI's best objective over the learning rates within the budget
  (``--max-steps``, ``--max-seconds``), as a log joint (less the Jacobian);
- ``ratio cpu`` / ``ratio wall``: SVI's time (best learning rate) over pyroem's time
  to reach an objective within ``--rtol`` (relative) of the optimum, the best of both
  fits' objectives; ``>`` marks a lower bound (SVI never got there within its budget),
  ``EM below`` that pyroem stopped at a stationary point below the target (SVI found
  a higher one). pyroem's time is a whole ``fit`` call (setup
  included) stopped at the iteration that reached the target: the median of
  ``--repeats`` such calls. SVI's time covers building the guide and the steps up to
  the one that reached the target: for the best learning rate, the median of
  ``--repeats`` runs (the first with every rate, the others stopped at the target).
  The load average is printed at the start and the end (the machine may be shared).

Everything runs in float64 with one torch thread. Run
``python bench/bench_programs.py --help`` for the options, ``--only NAME`` for one
program.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, TraceEnum_ELBO, config_enumerate
from pyro.infer.autoguide import AutoDelta, init_to_value
from pyro.optim import Adam  # type: ignore[attr-defined]
from torch.distributions import biject_to

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyroem
from pyroem.engines.program_map import initial_values
from pyroem.model.program import ProgramModel
from pyroem.model.space import jacobian_sites
from tests.engines import test_pyro_examples as ex

HIDDEN = 3


class Case(NamedTuple):
    """A program, its arguments, its Pyro plate nesting and the start of both fits."""

    name: str
    model: Callable[..., Any]
    args: tuple[Any, ...]
    nesting: int
    init: dict[str, torch.Tensor]
    max_iter: int | None = None
    # ``init`` is pyroem's default start (seed 0): pyroem then fits with its defaults.
    default_start: bool = False


class Clocks(NamedTuple):
    cpu: float
    wall: float


def _now() -> Clocks:
    return Clocks(time.process_time(), time.perf_counter())


def _since(start: Clocks) -> Clocks:
    now = _now()
    return Clocks(now.cpu - start.cpu, now.wall - start.wall)


# ----- programs not in the tests --------------------------------------------------------


def dp_data(per_cluster: int = 50) -> torch.Tensor:
    """The tutorial's four clusters of 2-D points."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-8.0, -8.0], [8.0, 8.0], [1.5, 2.0], [-0.5, 1.0]])
    noise = torch.randn(4, per_cluster, 2, generator=generator)
    return (centres[:, None, :] + noise).reshape(-1, 2)


def tone_data(num_sequences: int, length: int, tones: int, seed: int = 0) -> tuple[Any, Any]:
    """Binary tones from a sticky three-state chain (hmm.py's data shape)."""
    generator = torch.Generator().manual_seed(seed)
    probs = torch.rand(HIDDEN, tones, generator=generator) * 0.6
    states = torch.zeros(num_sequences, length, dtype=torch.long)
    for t in range(1, length):
        stay = torch.rand(num_sequences, generator=generator) < 0.8
        jump = torch.randint(0, HIDDEN, (num_sequences,), generator=generator)
        states[:, t] = torch.where(stay, states[:, t - 1], jump)
    sequences = torch.rand(num_sequences, length, tones, generator=generator) < probs[states]
    lengths = torch.tensor([length - (i % 3) for i in range(num_sequences)])
    return sequences.double(), lengths


# ----- the cases ------------------------------------------------------------------------


def _prior_start(model: Callable[..., Any], args: tuple[Any, ...], seed: int) -> dict[str, Any]:
    """pyroem's own first prior draw at ``seed``: prior draws for sample sites, the
    program's initial values for ``pyro.param`` sites (drawn after ``torch.manual_seed(
    seed)``, as :func:`fit_pyroem` seeds them)."""
    pyro.clear_param_store()
    torch.manual_seed(seed)
    program = ProgramModel(model, args, {}, check_enumeration=False)
    values = initial_values(program, None, seed)
    pyro.clear_param_store()
    return {name: value.detach().clone() for name, value in values.items()}


def cases(size: str) -> list[Case]:
    """Every program of the table; ``size``: ``"test"`` (the tests' data) or ``"issue"``
    (hmm.py's shape in the issue: 20 sequences × 50 steps × 88 tones, for hmm models)."""
    if size == "issue":
        tones: tuple[Any, Any] = tone_data(20, 50, 88)
    else:
        tones = ex._tone_data()
    out = []
    for label, model in [
        ("hmm model_0", ex.loop_hmm),
        ("hmm model_1", ex.batched_hmm),
        ("hmm model_2", ex.autoregressive_hmm),
        ("hmm model_3", ex.factorial_hmm),
        ("hmm model_4", ex.hierarchical_factorial_hmm),
    ]:
        nesting = 1 if model is ex.loop_hmm else 2
        out.append(Case(label, model, tones, nesting, _prior_start(model, tones, 0), None, True))
    out.append(
        Case(
            "hmm model_6",
            ex.second_order_hmm,
            tones,
            2,
            _prior_start(ex.second_order_hmm, tones, 0),
            None,
            True,
        )
    )
    mixture, hmm = ex._tutorial_programs()
    start = {**_prior_start(mixture[0], mixture[1], 0), **(ex._tutorial_start(0) or {})}
    out.append(Case("tutorial mixture (N=30)", mixture[0], mixture[1], 1, start))
    out.append(
        Case("tutorial HMM (T=25)", hmm[0], hmm[1], 1, _prior_start(hmm[0], hmm[1], 0), None, True)
    )

    generator = torch.Generator().manual_seed(0)
    step = torch.distributions.Gamma(2.0, 1.0).sample((3, 2, 6))
    step[torch.rand(3, 2, 6, generator=generator) < 0.2] = ex.MISSING
    angle = torch.rand(3, 2, 6, generator=generator) * 6.2 - 3.1
    out.append(
        Case(
            "mixed-HMM",
            ex.mixed_hmm,
            (step, angle),
            2,
            _prior_start(ex.mixed_hmm, (step, angle), 0),
            None,
            True,
        )
    )

    points = torch.cat(
        [torch.randn(30, 2, generator=generator) - 2, torch.randn(20, 2, generator=generator) + 2]
    )
    init = {"weights": torch.tensor([0.5, 0.5]), "locs": torch.tensor([[-1.0, -1.0], [1.0, 1.0]])}
    out.append(Case("diag-normal mixture, masks (N=50)", ex.masked_components, (points,), 1, init))

    alive = torch.ones(30, 4)
    for t in range(1, 4):
        alive[:, t] = alive[:, t - 1] * (torch.rand(30, generator=generator) < 0.7)
    history = alive * (torch.rand(30, 4, generator=generator) < 0.6)
    history[:, 0] = 1
    start = {"rho": torch.tensor(0.5), **{f"phi_{t}": torch.tensor(0.5) for t in (1, 2, 3)}}
    out.append(Case("cjs per-period phi (N=30)", ex.survival_by_period, (history,), 1, start))

    data = dp_data()
    out.append(
        Case(
            "DPMM tutorial (N=200)",
            ex.dp_mixture,
            (data,),
            1,
            _prior_start(ex.dp_mixture, (data,), 0),
            None,
            True,
        )
    )

    counts = torch.cat(
        [
            torch.poisson(torch.full((30,), 2.0), generator=generator),
            torch.poisson(torch.full((30,), 9.0), generator=generator),
            torch.zeros(10),
        ]
    )
    out.append(
        Case(
            "zero-inflated Poisson mix (N=70)",
            ex.zero_inflated_mixture,
            (counts,),
            1,
            _prior_start(ex.zero_inflated_mixture, (counts,), 0),
            None,
            True,
        )
    )
    bits = (torch.rand(40, 3, generator=generator) < torch.tensor([0.2, 0.5, 0.7])).double()
    out.append(
        Case(
            "tempered-prior Bernoulli mix (N=40)",
            ex.tempered_prior_mixture,
            (bits,),
            1,
            _prior_start(ex.tempered_prior_mixture, (bits,), 0),
            None,
            True,
        )
    )
    x = torch.randint(0, 3, (5, 6), generator=generator)
    out.append(
        Case(
            "tutorial feature mixture (N=30)",
            ex.feature_components,
            (x,),
            2,
            _prior_start(ex.feature_components, (x,), 0),
            None,
            True,
        )
    )
    return out


# ----- the two fits ---------------------------------------------------------------------


def _copy(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in values.items()}


def fit_pyroem(case: Case, max_iter: int, tol: float, **options: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        pyro.clear_param_store()
        if case.default_start:
            # pyroem's default start: the same first draw as case.init (see _prior_start).
            torch.manual_seed(0)
        return pyroem.fit(
            case.model,
            *case.args,
            init=None if case.default_start else _copy(case.init),
            seed=0,
            tol=tol,
            max_iter=max_iter,
            **options,
        )


def pyro_log_joint(case: Case, values: dict[str, torch.Tensor]) -> float:
    """``−TraceEnum_ELBO`` at ``values``: params substituted, sample sites conditioned."""
    pyro.clear_param_store()
    return float(ex.pyro_log_joint(case.model, _copy(values), case.nesting, *case.args))


def _log_jacobian(values: dict[str, torch.Tensor], sites: list[str], program: Any) -> Any:
    """``Σ log|det J|`` of ``biject_to(support)`` at ``values`` over ``sites``."""
    total: Any = 0.0
    for name in sites:
        transform = biject_to(program.params[name].constraint)
        u = transform.inv(values[name])
        total = total + transform.log_abs_det_jacobian(u, values[name]).sum()
    return total


class PeerRun(NamedTuple):
    learning_rate: float
    reached: Clocks | None
    best: float
    steps: int
    stop: str
    # Steps taken when the target was reached (0: never).
    reached_steps: int = 0


def run_svi(
    case: Case,
    learning_rate: float,
    target: float,
    jacobian: list[str],
    program: Any,
    max_steps: int,
    max_seconds: float,
    stop_at_target: bool = False,
) -> PeerRun:
    """SVI + AutoDelta (Adam) from the case's start; the objective of every step is the
    ELBO it returns (of the parameters before that step). ``stop_at_target``: stop once
    the target is reached (to time that again)."""
    pyro.clear_param_store()
    start = _now()
    samples = [name for name, site in program.params.items() if site.kind == "sample"]
    for name, site in program.params.items():
        if site.kind != "sample":
            pyro.param(name, case.init[name].clone(), constraint=site.constraint)
    model = config_enumerate(case.model, default="parallel")
    if samples:
        guide: Any = AutoDelta(
            poutine.block(model, expose=samples),
            init_loc_fn=init_to_value(values=_copy({n: case.init[n] for n in samples})),
        )
    else:

        def guide(*args: Any) -> None:
            return None

    elbo = TraceEnum_ELBO(max_plate_nesting=case.nesting)

    def loss(model: Any, guide: Any, *args: Any) -> Any:
        value = elbo.differentiable_loss(model, guide, *args)
        if jacobian:
            value = value - _log_jacobian(guide(*args), jacobian, program)
        return value

    svi = SVI(model, guide, Adam({"lr": learning_rate}), loss)
    best = -math.inf
    reached = None
    reached_steps = 0
    spent = Clocks(0.0, 0.0)
    steps = 0
    stop = "budget"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was not registered in the param store")
        while steps < max_steps:
            objective = -float(svi.step(*case.args))
            steps += 1
            if objective > best:
                best = objective
            if reached is None and objective >= target:
                reached = spent
                reached_steps = steps
                if stop_at_target:
                    break
            spent = _since(start)
            if not math.isfinite(objective) and steps > 1:
                stop = "diverged"
                break
            if spent.cpu > max_seconds:
                break
    return PeerRun(learning_rate, reached, best, steps, stop, reached_steps)


# ----- the table ------------------------------------------------------------------------


class Row(NamedTuple):
    name: str
    space: str
    iterations: int
    squarem_iterations: int
    log_joint: float
    pyro_gap: float
    objective: float
    svi_best: float
    ratio_cpu: str
    ratio_wall: str
    squarem_ratio_cpu: str


def _ratio(theirs: float | None, mine: float | None, bound_theirs: float) -> str:
    if mine is None:
        # pyroem stopped below the target (a lower stationary point than SVI's).
        return "EM below" if theirs is not None else "neither"
    if theirs is None:
        return f"> {bound_theirs / mine:.2g}"
    return f"{theirs / mine:.2g}"


def _time_to(case: Case, history: Any, target: float, repeats: int, **options: Any) -> Any:
    """Median time of a whole fit stopped at the first iteration that reached
    ``target`` in ``history`` (``None``: never reached)."""
    reached = [i for i, value in enumerate(history) if value >= target]
    if not reached:
        return None
    samples = []
    for _ in range(repeats):
        start = _now()
        # At least one iteration: with max_iter=0 a default start has no short runs.
        fit = fit_pyroem(case, max(reached[0], 1), 1e-12, **options)
        if float(max(fit.history.objective)) < target:
            # A default start's short runs are capped by max_iter too and may pick
            # another run: run the whole fit and take the time of the first iteration
            # of the continued run that reached the target (an upper bound where the
            # start itself met it).
            start = _now()
            hits: list[Clocks] = []

            def note(iteration: Any, hits: list[Clocks] = hits, start: Clocks = start) -> None:
                if not hits and iteration.objective >= target:
                    hits.append(_since(start))

            fit_pyroem(case, len(history) - 1, 1e-12, callback=note, **options)
            samples.append(hits[0] if hits else _since(start))
            continue
        samples.append(_since(start))
    return Clocks(
        statistics.median(s.cpu for s in samples), statistics.median(s.wall for s in samples)
    )


def bench_case(case: Case, options: argparse.Namespace) -> Row:
    fit_pyroem(case, 2, options.tol)  # warm-up
    max_iter = case.max_iter or options.max_iter
    fit = fit_pyroem(case, max_iter, options.tol)
    fast = fit_pyroem(case, max_iter, options.tol, accelerate="squarem")
    tight = fit_pyroem(case, max_iter, 1e-10)
    tight_fast = fit_pyroem(case, max_iter, 1e-10, accelerate="squarem")
    pyro.clear_param_store()
    program = ProgramModel(case.model, case.args, {})
    jacobian = (
        jacobian_sites(program, program.trace(tight.params))
        if tight.options["space"] == "unconstrained"
        else []
    )
    gap = abs(pyro_log_joint(case, fit.params) - fit.log_joint()) / abs(fit.log_joint())
    ours = float(max(tight.history.objective))
    budget = options.max_seconds
    peers = [
        run_svi(
            case,
            rate,
            ours - options.rtol * abs(ours),
            jacobian,
            program,
            options.max_steps,
            budget,
        )
        for rate in options.learning_rates
    ]
    best = max(peer.best for peer in peers)
    optimum = max(ours, best, float(max(tight_fast.history.objective)))
    target = optimum - options.rtol * abs(optimum)
    if optimum > ours:
        # The target moved: SVI's times to it are measured again.
        peers = [
            run_svi(case, rate, target, jacobian, program, options.max_steps, budget)
            for rate in options.learning_rates
        ]
    mine = _time_to(case, tight.history.objective, target, options.repeats)
    mine_fast = _time_to(
        case, tight_fast.history.objective, target, options.repeats, accelerate="squarem"
    )
    done = [peer for peer in peers if peer.reached is not None]
    winner = min(done, key=lambda peer: peer.reached.cpu) if done else None  # type: ignore[union-attr]
    theirs = winner.reached if winner is not None else None
    if winner is not None and options.repeats > 1:
        # The best rate's time to the target: the median of --repeats runs.
        again = [
            run_svi(
                case,
                winner.learning_rate,
                target,
                jacobian,
                program,
                winner.reached_steps,
                budget,
                stop_at_target=True,
            ).reached
            for _ in range(options.repeats - 1)
        ]
        samples = [theirs, *(clock for clock in again if clock is not None)]
        theirs = Clocks(
            statistics.median(s.cpu for s in samples),  # type: ignore[union-attr]
            statistics.median(s.wall for s in samples),  # type: ignore[union-attr]
        )
    print(
        f"<!-- {case.name}: pyroem {fit.num_iterations} it (tight {tight.num_iterations}), "
        f"squarem {fast.num_iterations} it (tight {tight_fast.num_iterations}), space "
        f"{fit.options['space']}, times to target: pyroem {mine}, squarem {mine_fast}; SVI "
        + ", ".join(
            f"lr={p.learning_rate:g}: best {p.best:.4f} in {p.steps} steps, reached {p.reached}"
            for p in peers
        )
        + " -->",
        flush=True,
    )
    return Row(
        case.name,
        "unconstr." if jacobian else "constr.",
        fit.num_iterations,
        fast.num_iterations,
        fit.log_joint(),
        gap,
        float(fit.history.objective[-1]),
        best,
        _ratio(theirs.cpu if theirs else None, mine.cpu if mine else None, budget),
        _ratio(theirs.wall if theirs else None, mine.wall if mine else None, budget),
        _ratio(theirs.cpu if theirs else None, mine_fast.cpu if mine_fast else None, budget),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="substrings of program names")
    parser.add_argument("--size", choices=("test", "issue"), default="test")
    parser.add_argument("--rtol", type=float, default=1e-3)
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--max-iter", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument(
        "--max-seconds", type=float, default=6.0, help="SVI budget per rate, CPU seconds"
    )
    options = parser.parse_args(argv)
    print(f"<!-- load average at start: {Path('/proc/loadavg').read_text().strip()} -->")
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    print(
        "| program | space | iters | iters (squarem) | log joint | rel. diff. from Pyro | "
        f"objective | SVI best objective | SVI/pyroem time to {options.rtol:g} (cpu) | (wall) "
        "| (cpu, squarem) |",
        flush=True,
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for case in cases(options.size):
        if options.only and not any(part in case.name for part in options.only):
            continue
        row = bench_case(case, options)
        print(
            f"| {row.name} | {row.space} | {row.iterations} | {row.squarem_iterations} | "
            f"{row.log_joint:.3f} | {row.pyro_gap:.0e} | {row.objective:.3f} | "
            f"{row.svi_best:.3f} | {row.ratio_cpu} | {row.ratio_wall} | "
            f"{row.squarem_ratio_cpu} |",
            flush=True,
        )
    print(f"<!-- load average at end: {Path('/proc/loadavg').read_text().strip()} -->")


if __name__ == "__main__":
    main()
