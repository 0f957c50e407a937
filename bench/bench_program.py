"""MAP-EM on Pyro programs: pyroem against Pyro's own SVI on the same MAP problem.

Two programs, each fitted from the same data and the same starting values:

- ``gmm``: a Gaussian mixture with diagonal covariances (``weights ~ Dirichlet(1)``,
  ``variances ~ InverseGamma`` and ``locs ~ Normal`` per component, an enumerated
  assignment ``z`` in a plate over the data), on simulated data;
- ``hmm``: the Gaussian HMM of ``models/hmm.py`` with its conjugate priors (a
  ``pyro.markov`` chain of enumerated states in a plate over sequences), on
  sequences simulated there.

pyroem fits them by ``pyroem.fit(model, ..., method="map-em")``. The peer is Pyro's
way to the same MAP estimate: ``SVI`` with ``TraceEnum_ELBO`` (the states summed out
exactly), an ``AutoDelta`` guide on the parameter sites (``poutine.block(...,
expose=...)``, started by ``init_to_value`` at pyroem's starting values) and Adam,
at each of ``--learning-rates``; the best rate is reported for every target. The
default grid spans 0.01 to 1 so that the best rate lies inside it on both programs
(0.5 to 1 for the mixture, 0.2 to 1 for the HMM; a grid that stopped at 0.1 made SVI
look slower than it is). With a point-mass guide the ELBO is the log joint
``log p(x, θ)`` itself, so both maximise the same function; the script checks this at
pyroem's final parameters.

The metric is the time to reach a log joint within ``rtol`` relative of pyroem's
final log joint ``L*`` (``--rtols``; the headline ratio uses the first), on the
``--clock``: ``wall`` (elapsed time) or ``cpu`` (this process's processor time, which
a shared, loaded machine disturbs less; both fits run on one thread). pyroem's time
for a target is a whole ``fit`` call with ``max_iter`` set to the iterations its full
fit needed to reach that target: the median of ``--repeats`` such fits before the
peer's runs and as many after (a shared machine's load drifts during the minutes the
peer takes). The peer's clock runs over building the guide and the SVI steps only:
every ``--eval-every`` steps its log joint is computed at its current parameters by
``pyroem.estep.program`` with the clock stopped. The ELBO the next step returns
is the log joint at those same parameters, and the largest relative gap between the
two is printed. A peer that never reaches a target within ``--max-steps`` or
``--max-seconds`` is reported as ``> budget``, and the ratio as a lower bound. A
learning rate is abandoned once its clock has passed the best time of every target it
has not reached (it can no longer be the best one).

Both run in float64, in this process, with ``--threads`` torch threads (pyroem's fits
within that setting take their default ``num_threads``, one thread on these programs'
small tensors; ``--costs --fit-threads N`` sets it); both get one
untimed warm-up run first, and Pyro's validation (on by default; ``--no-validation``
turns it off for both; pyroem turns it off inside its loop regardless, having
validated the program once). ``--profile`` prints where pyroem's time goes.

Run ``python bench/bench_program.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import math
import pstats
import runpy
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SVI, JitTraceEnum_ELBO, TraceEnum_ELBO
from pyro.infer.autoguide import AutoDelta, init_to_value
from pyro.optim import Adam  # type: ignore[attr-defined]
from torch.distributions import constraints

import pyroem
from pyroem.estep import recognised_mixture
from pyroem.estep.program import posterior
from pyroem.model.program import ProgramModel

MODELS = ("gmm", "hmm")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
HMM = runpy.run_path(str(Path(__file__).resolve().parents[1] / "models" / "hmm.py"), run_name="hmm")


class Case(NamedTuple):
    """One MAP problem: a program, its arguments, its parameter sites and a start."""

    name: str
    description: str
    model: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    sites: tuple[str, ...]
    init: dict[str, torch.Tensor]


class PeerRun(NamedTuple):
    """One SVI run: per target, the (seconds, steps) at which it was first reached."""

    learning_rate: float
    reached: dict[float, tuple[float, int]]
    steps: int
    seconds: float
    best_log_joint: float
    final_log_joint: float
    elbo_gap: float
    stop: str


# ----- the programs -------------------------------------------------------------------


def mixture_model(data: torch.Tensor, num_components: int) -> None:
    """A Gaussian mixture with diagonal covariances and independent conjugate priors.

    ``weights ~ Dirichlet(1)``; per component and feature ``variances ~ InverseGamma(3/2,
    s² / (2 K²))`` and ``locs ~ Normal(x̄, 10 s²)`` (``x̄``, ``s²``: the data mean and
    variance); ``z_n ~ Categorical(weights)``, ``x_n ~ Normal(locs[z_n], variances[z_n] ** ½)``.

    Args:
        data: observations, ``(num_data, dim)``.
        num_components: ``K``.
    """
    mean, variance = data.mean(0), data.var(0)
    weights = pyro.sample("weights", dist.Dirichlet(data.new_ones(num_components)))
    with pyro.plate("components", num_components):
        variances = pyro.sample(
            "variances",
            dist.InverseGamma(
                torch.full_like(variance, 1.5), variance / (2 * num_components**2)
            ).to_event(1),
        )
        locs = pyro.sample("locs", dist.Normal(mean, (10 * variance).sqrt()).to_event(1))
    with pyro.plate("data", data.shape[0]):
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("obs", dist.Normal(locs[z], variances[z].sqrt()).to_event(1), obs=data)


def mixture_case(num_data: int, dim: int, num_components: int, spread: float, seed: int) -> Case:
    """Simulated clusters, means ``spread · N(0, 1)`` per feature and scales in
    ``[0.5, 1.5]``; start at equal weights, the data variance and ``K`` distinct random
    data points as means."""
    generator = torch.Generator().manual_seed(seed)
    double = torch.float64
    means = spread * torch.randn(num_components, dim, generator=generator, dtype=double)
    scales = 0.5 + torch.rand(num_components, dim, generator=generator, dtype=double)
    labels = torch.multinomial(torch.ones(num_components), num_data, True, generator=generator)
    noise = torch.randn(num_data, dim, generator=generator, dtype=double)
    data = means[labels] + scales[labels] * noise
    init = {
        "weights": torch.full((num_components,), 1.0 / num_components, dtype=torch.float64),
        "variances": data.var(0).expand(num_components, dim).clone(),
        "locs": data[torch.randperm(num_data, generator=generator)[:num_components]].clone(),
    }
    return Case(
        "gmm",
        f"Gaussian mixture N={num_data} D={dim} K={num_components} spread={spread:g}",
        mixture_model,
        (data, num_components),
        {},
        ("weights", "variances", "locs"),
        init,
    )


def hmm_case(num_sequences: int, length: int, seed: int) -> Case:
    """Three-state Gaussian sequences from ``models/hmm.py``; start at uniform initial
    probabilities, transition rows half on staying put, the data quartiles as means
    and the data variance in every state."""
    truth = {
        "init_probs": torch.tensor([0.5, 0.3, 0.2]),
        "transition_probs": torch.tensor(
            [[0.90, 0.07, 0.03], [0.10, 0.80, 0.10], [0.05, 0.15, 0.80]]
        ),
        "locs": torch.tensor([[-2.0], [0.0], [2.5]]),
        "variances": torch.tensor([[0.5], [0.3], [1.0]]),
    }
    truth = {name: value.double() for name, value in truth.items()}
    num_states = 3
    lengths = torch.full((num_sequences,), length)
    sequences, _ = HMM["simulate_gaussian_hmm"](lengths, **truth, seed=seed)
    values = sequences.reshape(-1, 1)
    levels = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    init = {
        "init_probs": torch.full((num_states,), 1.0 / num_states, dtype=torch.float64),
        "transition_probs": 0.5 * torch.eye(num_states, dtype=torch.float64) + 0.5 / num_states,
        "variances": values.var(0).expand(num_states, 1).clone(),
        "locs": torch.quantile(values, levels, dim=0),
    }
    return Case(
        "hmm",
        f"Gaussian HMM S={num_sequences} T={length} K={num_states}",
        HMM["gaussian_hmm"],
        (sequences, lengths, num_states),
        {"priors": "conjugate"},
        ("init_probs", "transition_probs", "variances", "locs"),
        init,
    )


# ----- the two fits -------------------------------------------------------------------


def _copy(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Adam updates AutoDelta's parameters in place, and they may share memory with
    # the values they were started from.
    return {name: value.detach().clone() for name, value in values.items()}


def fit_pyroem(case: Case, tol: float, max_iter: int) -> pyroem.ProgramFit:
    """``pyroem.fit(..., method="map-em")`` from the case's starting values."""
    fit = pyroem.fit(
        case.model,
        *case.args,
        method="map-em",
        model_kwargs=case.kwargs,
        init=_copy(case.init),
        tol=tol,
        max_iter=max_iter,
        seed=0,
    )
    if not isinstance(fit, pyroem.ProgramFit):
        raise TypeError(f"expected a ProgramFit for a Pyro program, got {type(fit).__name__}")
    return fit


def _peer_svi(
    case: Case, values: dict[str, torch.Tensor], learning_rate: float, nesting: int, jit: bool
) -> tuple[SVI, AutoDelta]:
    """SVI with an ``AutoDelta`` guide on the parameter sites, started at ``values``.

    With ``jit`` the program's arguments are closed over (the JIT traces tensors only).
    """
    pyro.clear_param_store()
    model = partial(case.model, *case.args, **case.kwargs) if jit else case.model
    guide = AutoDelta(
        poutine.block(model, expose=list(case.sites)), init_loc_fn=init_to_value(values=values)
    )
    loss = JitTraceEnum_ELBO if jit else TraceEnum_ELBO
    elbo = loss(max_plate_nesting=nesting, ignore_jit_warnings=True)
    return SVI(model, guide, Adam({"lr": learning_rate}), elbo), guide


def _peer_args(case: Case, jit: bool) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments of the peer's model and guide: none when they are closed over."""
    return ((), {}) if jit else (case.args, case.kwargs)


def elbo_log_joint(case: Case, program: ProgramModel, values: dict[str, torch.Tensor]) -> float:
    """``−TraceEnum_ELBO`` with an ``AutoDelta`` guide placed at ``values``."""
    svi, _ = _peer_svi(case, _copy(values), 0.0, program.max_plate_nesting, jit=False)
    with torch.no_grad():
        return -svi.evaluate_loss(*case.args, **case.kwargs)


def run_peer(
    case: Case,
    program: ProgramModel,
    learning_rate: float,
    targets: dict[float, float],
    best: dict[float, float],
    *,
    max_steps: int,
    max_seconds: float,
    eval_every: int,
    jit: bool,
    clock: Callable[[], float],
) -> PeerRun:
    """Run SVI until every target is reached, the budget is spent, or it cannot win.

    Args:
        case: the problem.
        program: the case's program, to score the peer's parameters.
        learning_rate: Adam's step size.
        targets: ``{rtol: log joint to reach}``.
        best: ``{rtol: fastest time of an earlier learning rate}``.
        max_steps: step budget.
        max_seconds: budget on the peer's clock.
        eval_every: steps between scorings.
        jit: use ``JitTraceEnum_ELBO``.
        clock: the clock (seconds).
    """
    args, kwargs = _peer_args(case, jit)
    started = clock()
    svi, guide = _peer_svi(case, _copy(case.init), learning_rate, program.max_plate_nesting, jit)
    seconds = clock() - started
    reached: dict[float, tuple[float, int]] = {}
    best_log_joint = final = -math.inf
    scored = None
    elbo_gap = 0.0
    stop = "budget"
    steps = 0
    while steps < max_steps and seconds < max_seconds:
        started = clock()
        loss = svi.step(*args, **kwargs)
        seconds += clock() - started
        steps += 1
        if scored is not None:
            elbo_gap = max(elbo_gap, abs(-loss - scored) / abs(scored))
            scored = None
        if steps % eval_every:
            continue
        with torch.no_grad():
            final = scored = float(posterior(program, guide.median(*args, **kwargs)).log_joint)
        best_log_joint = max(best_log_joint, final)
        for rtol, target in targets.items():
            if rtol not in reached and final >= target:
                reached[rtol] = (seconds, steps)
        pending = [rtol for rtol in targets if rtol not in reached]
        if not pending:
            stop = "all targets"
            break
        if all(seconds > best.get(rtol, math.inf) for rtol in pending):
            stop = "slower than best"
            break
        if not math.isfinite(final):
            stop = "diverged"
            break
    return PeerRun(learning_rate, reached, steps, seconds, best_log_joint, final, elbo_gap, stop)


def iterations_to(fit: pyroem.ProgramFit, target: float) -> int | None:
    """The first iteration at which pyroem's log joint reached ``target``."""
    reached = [t for t, value in enumerate(fit.history.objective) if value >= target]
    return reached[0] if reached else None


def time_fit(case: Case, options: argparse.Namespace, max_iter: int) -> list[float]:
    """Times of ``--repeats`` fits stopped after ``max_iter`` iterations, sorted."""
    clock = CLOCKS[options.clock]
    times = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        for _ in range(options.repeats):
            started = clock()
            fit_pyroem(case, options.tol, max_iter)
            times.append(clock() - started)
    return sorted(times)


# ----- the comparison -----------------------------------------------------------------


def _profile(case: Case, tol: float, max_iter: int, lines: int) -> None:
    """Print pyroem's ``fit`` under cProfile, by cumulative and by own time."""
    profiler = cProfile.Profile()
    profiler.runcall(fit_pyroem, case, tol, max_iter)
    for key in ("cumulative", "tottime"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(lines)
        body = text.getvalue()
        print(f"  cProfile of pyroem.fit, sorted by {key}:")
        print("    " + body[body.index("ncalls") :].rstrip().replace("\n", "\n    "))


def _format_time(seconds: float, count: int, budget: bool) -> str:
    if math.isinf(seconds):
        return f"{'> budget' if budget else 'not reached':>12} ({count:>5})"
    return f"{seconds:10.3f} s ({count:>5})"


def compare(case: Case, options: argparse.Namespace) -> dict[float, float]:
    """Time both fits of one case, print the table; return ``{rtol: ratio}``."""
    program = ProgramModel(case.model, case.args, case.kwargs)
    if set(program.params) != set(case.sites):
        raise RuntimeError(f"parameter sites {list(program.params)}, expected {case.sites}")
    nesting = program.max_plate_nesting

    # Warm-up: one-off costs of the process (imports, allocator, einsum paths).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        fit_pyroem(case, options.tol, 2)
    warm, _ = _peer_svi(case, _copy(case.init), 0.01, nesting, options.peer_jit)
    args, kwargs = _peer_args(case, options.peer_jit)
    for _ in range(3):
        warm.step(*args, **kwargs)

    clock = CLOCKS[options.clock]
    runs = []
    for _ in range(options.repeats):
        started = clock()
        fit = fit_pyroem(case, options.tol, options.max_iter)
        runs.append((clock() - started, fit))
    runs.sort(key=lambda run: run[0])
    total, fit = runs[len(runs) // 2]
    final = fit.log_joint()
    elbo_at_fit = elbo_log_joint(case, program, fit.params)
    targets = {rtol: final - rtol * abs(final) for rtol in options.rtols}
    needed = {rtol: iterations_to(fit, target) for rtol, target in targets.items()}
    # pyroem is timed before the peer runs and again after (median of both), so that a
    # change in the machine's load during the peer's long runs biases neither side.
    samples = {
        iterations: time_fit(case, options, iterations)
        for iterations in sorted({k for k in needed.values() if k is not None})
    }

    print(
        f"\n[{case.name}] {case.description}, float64, threads={torch.get_num_threads()}, "
        f"validation={dist.is_validation_enabled()}, clock={options.clock}"
    )
    print(
        f"  pyroem map-em: {total:.3f} s (median of {options.repeats}: "
        f"{', '.join(f'{t:.3f}' for t, _ in runs)}), {fit.num_iterations} iterations, "
        f"converged {fit.converged}; stopped after k iterations: "
        + ", ".join(f"k={k}: {1e3 * times[len(times) // 2]:.1f} ms" for k, times in samples.items())
        + " (before SVI)"
    )
    print(f"  M-steps: {fit.m_step_kinds}")
    print(f"  log joint L* = fit.log_joint() = {final:.10f}")
    print(
        f"  -TraceEnum_ELBO with AutoDelta at pyroem's θ = {elbo_at_fit:.10f} "
        f"(rel. diff {abs(elbo_at_fit - final) / abs(final):.1e})"
    )

    best: dict[float, float] = {}
    peers = []
    for learning_rate in options.learning_rates:
        peer = run_peer(
            case,
            program,
            learning_rate,
            targets,
            best,
            max_steps=options.max_steps,
            max_seconds=options.max_seconds,
            eval_every=options.eval_every,
            jit=options.peer_jit,
            clock=clock,
        )
        peers.append(peer)
        for rtol, (seconds, _) in peer.reached.items():
            best[rtol] = min(best.get(rtol, math.inf), seconds)
        print(
            f"  SVI Adam lr={learning_rate:<5g}: {peer.steps} steps in {peer.seconds:.3f} s "
            f"({1e3 * peer.seconds / max(peer.steps, 1):.2f} ms per step), stop: {peer.stop}; "
            f"log joint best {peer.best_log_joint:.6f}, last {peer.final_log_joint:.6f}; "
            f"|ELBO − log joint| / |log joint| ≤ {peer.elbo_gap:.1e}"
        )

    ours = {}
    for iterations, before in samples.items():
        times = sorted(before + time_fit(case, options, iterations))
        ours[iterations] = times[len(times) // 2]
    print(
        "  pyroem stopped after k iterations, median before and after SVI: "
        + ", ".join(f"k={k}: {1e3 * t:.1f} ms" for k, t in ours.items())
    )
    print(
        f"  {'rtol':>6} {'target':>16}   {'pyroem (iterations)':>22}   "
        f"{'SVI, best lr (steps)':>24}   ratio"
    )
    ratios = {}
    for rtol, target in targets.items():
        iterations = needed[rtol]
        mine = math.inf if iterations is None else ours[iterations]
        count = fit.num_iterations if iterations is None else iterations
        done = [peer for peer in peers if rtol in peer.reached]
        if done:
            winner = min(done, key=lambda peer: peer.reached[rtol][0])
            theirs, steps = winner.reached[rtol]
            label = f"lr={winner.learning_rate:g}"
            ratio = theirs / mine
            shown = f"{ratio:8.1f}"
        else:
            winner = max(peers, key=lambda peer: peer.seconds)
            theirs, steps, label = math.inf, winner.steps, "any lr"
            ratio = winner.seconds / mine
            shown = f"> {ratio:6.1f}"
        ratios[rtol] = ratio
        print(
            f"  {rtol:6.0e} {target:16.6f}   "
            f"{_format_time(mine, count, False):>22}   "
            f"{label:>8} {_format_time(theirs, steps, True)}   {shown}"
        )
    headline = options.rtols[0]
    bound = "" if any(headline in peer.reached for peer in peers) else "> "
    print(f"  ratio SVI time / pyroem time at rtol={headline:g}: {bound}{ratios[headline]:.1f}")
    if options.profile:
        _profile(case, options.tol, options.max_iter, options.profile_lines)
    return ratios


# ----- cost per iteration against hmmlearn and the declarative path -------------------


class _Costs(NamedTuple):
    """Seconds to the end of the first iteration (the one-off work included) and the
    median seconds of the later iterations, in CPU and wall time, with the fewest and
    most CPU seconds of one later iteration; and the fit."""

    setup: float
    iteration: float
    setup_wall: float
    iteration_wall: float
    fit: Any
    iteration_min: float = math.nan
    iteration_max: float = math.nan

    def line(self) -> str:
        return (
            f"one-off work + first iteration {self.setup:.3f} s CPU ({self.setup_wall:.3f} s "
            f"wall), then {1e3 * self.iteration:.2f} ms CPU ({1e3 * self.iteration_wall:.2f} "
            f"ms wall) per iteration (CPU min/median/max {1e3 * self.iteration_min:.2f} / "
            f"{1e3 * self.iteration:.2f} / {1e3 * self.iteration_max:.2f} ms)"
        )


def _iteration_costs(run: Callable[[Callable[[Any], None]], Any]) -> _Costs:
    """The costs of a fit (see :class:`_Costs`); ``run(callback)`` fits."""
    stamps: list[tuple[float, float]] = []
    started = time.process_time(), time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        fit = run(lambda _: stamps.append((time.process_time(), time.perf_counter())))

    def steps(clock: int) -> list[float]:
        return sorted(b[clock] - a[clock] for a, b in itertools.pairwise(stamps[1:]))

    cpu, wall = steps(0), steps(1)
    return _Costs(
        stamps[0][0] - started[0],
        cpu[len(cpu) // 2],
        stamps[0][1] - started[1],
        wall[len(wall) // 2],
        fit,
        cpu[0],
        cpu[-1],
    )


def long_hmm_costs(options: argparse.Namespace) -> float:
    """A 1-D Gaussian HMM program (``models/hmm.py``, ``pyro.param`` sites) on one
    sequence of ``--long-length`` steps with ``--long-states`` states, against
    hmmlearn's Baum-Welch from the same start; returns pyroem / hmmlearn per iteration.

    hmmlearn's time per iteration is ``(t(21 iterations) − t(1 iteration)) / 20``, the
    median of ``--repeats`` pairs of fits (its first iteration includes its setup).
    pyroem's one-off work to the end of its first iteration is timed over
    ``--setup-repeats`` fits (``--old-setup``: alternated with fits that sort the
    sites on a run of their own), and one run of the program is split into what
    the user's code costs with no handler and what Pyro's trace, validation and
    enumeration add (:func:`_one_run_costs`).
    """
    from hmmlearn.hmm import GaussianHMM

    import pyroem.estep.compiled as compiled

    states, length = options.long_states, options.long_length
    truth = {
        "init_probs": torch.full((states,), 1.0 / states, dtype=torch.float64),
        "transition_probs": 0.85 * torch.eye(states, dtype=torch.float64) + 0.15 / states,
        "locs": torch.linspace(-3.0, 5.0, states, dtype=torch.float64).unsqueeze(-1),
        "variances": torch.linspace(0.3, 1.0, states, dtype=torch.float64).unsqueeze(-1),
    }
    lengths = torch.tensor([length])
    sequences, _ = HMM["simulate_gaussian_hmm"](lengths, **truth, seed=options.seed)
    iterations = options.long_iterations

    # Complete runs of the program (a run of a chain's first steps only stops early),
    # counted to the end of the first iteration.
    complete_runs, runs_at_first = [0], []

    def counted_hmm(*args: Any, **kwargs: Any) -> None:
        HMM["gaussian_hmm"](*args, **kwargs)
        complete_runs[0] += 1

    def counted(callback: Callable[[Any], None]) -> Callable[[Any], None]:
        def call(iteration: Any) -> None:
            if not runs_at_first:
                runs_at_first.append(complete_runs[0])
            callback(iteration)

        return call

    def fit_program(callback: Callable[[Any], None]) -> Any:
        return pyroem.fit(
            counted_hmm,
            sequences,
            lengths,
            states,
            method="map-em",
            max_iter=iterations,
            tol=0.0,
            seed=0,
            callback=callback,
            num_threads=options.fit_threads,
        )

    costs = _iteration_costs(lambda callback: fit_program(counted(callback)))
    per_iteration, fit = costs.iteration, costs.fit
    setups = _setup_costs(fit_program, options.setup_repeats, options.old_setup)
    # The program's own start: uniform, rows half on staying put, quantiles, variance.
    values = _observed_start(fit)
    X = sequences[0].numpy()

    def hmmlearn_seconds(n_iter: int) -> float:
        model = GaussianHMM(
            states, covariance_type="diag", init_params="", n_iter=n_iter, tol=-math.inf
        )
        model.startprob_ = values["init_probs"]
        model.transmat_ = values["transition_probs"]
        model.means_ = values["locs"]
        model.covars_ = values["variances"]
        started = time.process_time()
        model.fit(X)
        return time.process_time() - started

    peer = sorted((hmmlearn_seconds(21) - hmmlearn_seconds(1)) / 20 for _ in range(options.repeats))
    theirs = peer[len(peer) // 2]
    print(
        f"\n[hmm-long] Gaussian HMM program, S=1 T={length} K={states} D=1, float64, "
        f"threads={torch.get_num_threads()}, fit threads={_fit_threads(options)}, CPU time"
    )
    print(f"  pyroem map-em: {costs.line()} (median of {iterations - 1})")
    print(f"  complete runs of the program to the end of the first iteration: {runs_at_first[0]}")
    for label, seconds in setups.items():
        print(f"  one-off work + first iteration, {label}: {_spread(seconds)}")
    print(f"  one run of the program ({options.setup_repeats} each):")
    for label, seconds in _one_run_costs(sequences, lengths, states, options.setup_repeats):
        print(f"    {label}: {_spread(seconds)}")
    if options.old_path:
        compiled._REPLICATED = False
        try:
            old = _iteration_costs(
                lambda callback: pyroem.fit(
                    HMM["gaussian_hmm"],
                    sequences,
                    lengths,
                    states,
                    method="map-em",
                    max_iter=4,
                    tol=0.0,
                    seed=0,
                    callback=callback,
                    num_threads=options.fit_threads,
                )
            )
        finally:
            compiled._REPLICATED = True
        print(f"  the same, running the whole program every E-step: {old.line()}")
    print(f"  hmmlearn GaussianHMM: {1e3 * theirs:.2f} ms per iteration (median of {len(peer)})")
    ratio = per_iteration / theirs
    print(f"  ratio pyroem / hmmlearn per iteration: {ratio:.2f}")
    return ratio


def _spread(seconds: list[tuple[float, float]]) -> str:
    """``min / median / max`` of CPU and of wall seconds."""

    def three(values: list[float]) -> str:
        ordered = sorted(values)
        return " / ".join(f"{v:.2f}" for v in (ordered[0], ordered[len(ordered) // 2], ordered[-1]))

    return (
        f"CPU {three([cpu for cpu, _ in seconds])} s, wall {three([wall for _, wall in seconds])} "
        "s (min / median / max)"
    )


def _setup_costs(
    fit_program: Callable[[Callable[[Any], None]], Any], repeats: int, old: bool
) -> dict[str, list[tuple[float, float]]]:
    """CPU and wall seconds from the call of ``fit`` to the end of its first iteration,
    ``repeats`` times; with ``old`` also with the sites sorted on a run of their own
    (``program_map._SORT_ENUMERATED = False``), the two alternated."""
    import pyroem.engines.program_map as program_map

    labels = {True: "sorting run = first trace", False: "sorting run of its own"}
    out: dict[str, list[tuple[float, float]]] = {label: [] for label in labels.values()}
    for _ in range(repeats):
        for merged in (True, False) if old else (True,):
            program_map._SORT_ENUMERATED = merged
            try:
                costs = _iteration_costs(fit_program)
            finally:
                program_map._SORT_ENUMERATED = True
            out[labels[merged]].append((costs.setup, costs.setup_wall))
    return {label: seconds for label, seconds in out.items() if seconds}


def _one_run_costs(
    sequences: torch.Tensor, lengths: torch.Tensor, states: int, repeats: int
) -> list[tuple[str, list[tuple[float, float]]]]:
    """CPU and wall seconds of one run of the HMM program, ``repeats`` times each: called
    with no handler (the user's code and Pyro's primitives with an empty stack, which
    draw the states), under ``poutine.trace`` with Pyro's validation off and on, and as
    pyroem's first trace (enumerated, scored and packed: :meth:`ProgramModel.trace`)."""
    model = HMM["gaussian_hmm"]
    args = (sequences, lengths, states)
    program = ProgramModel(model, args)
    values = {name: value.clone() for name, value in program.param_inits.items()}

    def bare(validate: bool) -> Callable[[], Any]:
        def run() -> None:
            with pyro.validation_enabled(validate):
                model(*args)

        return run

    def traced(validate: bool) -> Callable[[], Any]:
        def run() -> Any:
            with pyro.validation_enabled(validate):
                return poutine.trace(model).get_trace(*args)

        return run

    cases: list[tuple[str, Callable[[], Any]]] = [
        ("no handlers, validation off", bare(False)),
        ("no handlers, validation on", bare(True)),
        ("poutine.trace, validation off", traced(False)),
        ("poutine.trace, validation on", traced(True)),
        ("enumerated, scored, packed (pyroem's first trace)", lambda: program.trace(values)),
    ]
    out = []
    for label, run in cases:
        seconds = []
        for _ in range(repeats):
            with pyro.get_param_store().scope(), torch.random.fork_rng():
                started = time.process_time(), time.perf_counter()
                run()
                seconds.append((time.process_time() - started[0], time.perf_counter() - started[1]))
        out.append((label, seconds))
    return out


def _fit_threads(options: argparse.Namespace) -> str:
    """``--fit-threads``, or pyroem's default choice when it is not given."""
    return "default" if options.fit_threads is None else str(options.fit_threads)


def _observed_start(fit: Any) -> dict[str, Any]:
    """The starting parameters a fit began from, as numpy arrays (for hmmlearn)."""
    program = fit.program
    return {name: value.detach().numpy().copy() for name, value in program.param_inits.items()}


def mixture_costs(options: argparse.Namespace) -> float:
    """A diagonal Gaussian mixture as a Pyro program (``pyro.param`` sites: maximum
    likelihood) against ``pyroem.Mixture(K, Gaussian("diag", prior=None))`` from the
    same start, and the program with its recognised-mixture kernel switched off (the
    program run at every E-step); returns program / declarative per iteration."""
    case = mixture_case(
        options.num_data, options.dim, options.components, options.spread, options.seed
    )
    data, num_components = case.args
    start = case.init

    def program(data: torch.Tensor) -> None:
        weights = pyro.param(
            "weights", lambda: start["weights"].clone(), constraint=constraints.simplex
        )
        locs = pyro.param("locs", lambda: start["locs"].clone())
        variances = pyro.param(
            "variances", lambda: start["variances"].clone(), constraint=constraints.positive
        )
        with pyro.plate("data", data.shape[0]):
            z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
            pyro.sample("obs", dist.Normal(locs[z], variances[z].sqrt()).to_event(1), obs=data)

    iterations = options.long_iterations
    common = {"method": "map-em", "max_iter": iterations, "tol": 0.0, "seed": 0}
    common["num_threads"] = options.fit_threads
    ours = _iteration_costs(lambda callback: pyroem.fit(program, data, callback=callback, **common))
    mine, fit = ours.iteration, ours.fit
    # The compiled path: the program run at every E-step, its tables contracted.
    recognised_mixture._FAST = False
    try:
        compiled = _iteration_costs(
            lambda callback: pyroem.fit(program, data, callback=callback, **common)
        )
    finally:
        recognised_mixture._FAST = True
    spec = pyroem.Mixture(num_components, pyroem.Gaussian("diag", prior=None))
    init = {
        "weights": start["weights"],
        "means": start["locs"],
        "covariances": start["variances"],
    }
    declarative = _iteration_costs(
        lambda callback: pyroem.fit(spec, data, init=init, callback=callback, **common)
    )
    theirs, other = declarative.iteration, declarative.fit
    print(
        f"\n[gmm-declarative] {case.description}, float64, threads={torch.get_num_threads()}, "
        f"fit threads={_fit_threads(options)}, CPU time"
    )
    print(f"  program: {ours.line()}")
    print(f"  the same, running the program at every E-step: {compiled.line()}")
    print(f"  declarative Mixture: {declarative.line()}")
    print(
        f"  log likelihood after {iterations} iterations: program "
        f"{fit.log_likelihood():.8f}, declarative {other.log_likelihood():.8f}"
    )
    ratio = mine / theirs
    print(f"  ratio program / declarative per iteration: {ratio:.2f}")
    return ratio


def main(argv: list[str] | None = None) -> None:
    """Parse options and run the comparisons."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--num-data", type=int, default=5000, help="gmm")
    parser.add_argument("--dim", type=int, default=2, help="gmm")
    parser.add_argument("--components", type=int, default=3, help="gmm")
    parser.add_argument("--spread", type=float, default=3.0, help="gmm: scale of the means")
    parser.add_argument("--sequences", type=int, default=5, help="hmm")
    parser.add_argument("--length", type=int, default=200, help="hmm")
    parser.add_argument("--tol", type=float, default=1e-8, help="pyroem's tolerance")
    parser.add_argument("--max-iter", type=int, default=1000, help="pyroem")
    parser.add_argument("--repeats", type=int, default=5, help="pyroem fits (the median)")
    parser.add_argument(
        "--rtols", type=float, nargs="+", default=[1e-3, 1e-4, 1e-5, 1e-6], help="targets"
    )
    parser.add_argument(
        "--learning-rates",
        type=float,
        nargs="+",
        default=[0.2, 0.1, 0.5, 0.05, 1.0, 0.02, 0.01],
        help="Adam step sizes tried, in this order (the best one counts)",
    )
    parser.add_argument("--max-steps", type=int, default=20_000, help="SVI budget per lr")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="SVI budget per lr")
    parser.add_argument("--eval-every", type=int, default=1, help="SVI steps between scorings")
    parser.add_argument("--peer-jit", action="store_true", help="JitTraceEnum_ELBO for SVI")
    parser.add_argument("--threads", type=int, choices=(1, 2), default=1)
    parser.add_argument(
        "--fit-threads",
        type=int,
        choices=(1, 2),
        default=None,
        help="costs: pyroem.fit's num_threads (default: pyroem's choice under --threads)",
    )
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-validation", action="store_true", help="pyro.enable_validation(False) for both"
    )
    parser.add_argument("--profile", action="store_true", help="cProfile pyroem's fit")
    parser.add_argument("--profile-lines", type=int, default=25)
    parser.add_argument("--quick", action="store_true", help="small problems, small budget")
    parser.add_argument(
        "--costs",
        action="store_true",
        help="instead: CPU time per iteration against hmmlearn (hmm-long) and against "
        "the declarative Mixture (gmm-declarative)",
    )
    parser.add_argument("--long-length", type=int, default=10_000, help="hmm-long: T")
    parser.add_argument("--long-states", type=int, default=4, help="hmm-long: K")
    parser.add_argument("--long-iterations", type=int, default=15, help="costs: iterations")
    parser.add_argument(
        "--old-path", action="store_true", help="hmm-long: also time whole-program E-steps"
    )
    parser.add_argument(
        "--setup-repeats", type=int, default=3, help="hmm-long: fits timed to the first iteration"
    )
    parser.add_argument(
        "--old-setup",
        action="store_true",
        help="hmm-long: also time the setup with the sites sorted on a run of their own",
    )
    options = parser.parse_args(argv)
    if options.quick:
        options.num_data, options.sequences, options.length = 1000, 2, 50
        options.repeats, options.learning_rates = 1, [0.2, 0.5]
        options.max_steps, options.max_seconds, options.eval_every = 2000, 30.0, 5

    torch.set_num_threads(options.threads)
    pyro.enable_validation(not options.no_validation)
    if options.costs:
        with open("/proc/loadavg", encoding="utf-8") as load:
            print(f"load average: {load.read().strip()}")
        long_hmm_costs(options)
        mixture_costs(options)
        return
    for name in options.models:
        if name == "gmm":
            case = mixture_case(
                options.num_data, options.dim, options.components, options.spread, options.seed
            )
        else:
            case = hmm_case(options.sequences, options.length, options.seed)
        compare(case, options)


if __name__ == "__main__":
    main()
