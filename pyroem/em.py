r"""The one EM loop: restarts, iterations, convergence, history, progress, warnings.

Every EM variant is an :class:`Engine`: ``init`` gives a restart's starting point,
``e_step`` scores parameters and returns the statistics the M-step needs,
``m_step`` turns statistics into new parameters, ``converged`` judges a run and
``finish`` completes the kept state. :func:`run_em` owns everything else, so every
variant restarts, records, reports and stops alike:

- restarts (``n_init``): a restart that fails on a numerical error (e.g. a covariance
  that collapsed) is recorded and skipped; the best valid run is kept;
- ``callback``: called after every iteration with an :class:`Iteration`;
- Ctrl-C (``KeyboardInterrupt``) stops cleanly: the best state so far is returned,
  marked not converged;
- checkpoints (:mod:`pyroem.fits.checkpoint`): the loop's state is written as it goes, and a
  fit resumed from it continues as if it had never stopped.
"""

from __future__ import annotations

import math
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

from pyroem.errors import (
    ConvergenceWarning,
    DataError,
    FitFileError,
    NotSupportedError,
    PyroEMError,
    SpecError,
)
from pyroem.fits import checkpoint as _checkpoint

__all__ = [
    "EMResult",
    "EMRun",
    "EStepResult",
    "Engine",
    "History",
    "Iteration",
    "MStepResult",
    "run_em",
]

_NO_INFO: Mapping[str, Any] = {}


class History(NamedTuple):
    """Per-iteration record of one EM run; entry 0 is the starting point.

    Attributes:
        objective: the objective after each M-step (``log p(x, θ_t)`` for MAP-EM), ``(T+1,)``.
        log_likelihood: ``log p(x | θ_t)``, z summed out, ``(T+1,)``.
        elapsed: seconds since the run started, ``(T+1,)``.
    """

    objective: np.ndarray
    log_likelihood: np.ndarray
    elapsed: np.ndarray

    @property
    def change(self) -> np.ndarray:
        """Objective change per iteration, ``(T,)``."""
        return np.diff(self.objective)


class EStepResult(NamedTuple):
    """What an E-step hands to the loop.

    Attributes:
        stats: what the M-step reads (summable sufficient statistics, a posterior, draws).
        objective: the objective at the parameters scored (``log p(x, θ)`` for MAP-EM).
        log_likelihood: ``log p(x | θ)``, z summed out (NaN where unknown).
        info: per-iteration extras recorded in the run (diagnostics, sample sizes).
    """

    stats: Any
    objective: float
    log_likelihood: float
    info: Mapping[str, Any] = _NO_INFO


class MStepResult(NamedTuple):
    """What an M-step (or ``init``) hands to the loop.

    Attributes:
        params: the new parameters.
        objective: the objective of the new state where the M-step knows it (CAVI's
            ELBO, SVI's estimate); ``None``: the next E-step's objective is recorded.
        info: per-iteration extras recorded in the run (step sizes, gains).
    """

    params: Any
    objective: float | None = None
    info: Mapping[str, Any] = _NO_INFO


class EMRun(NamedTuple):
    """One EM run from one starting point.

    Attributes:
        params: the final parameters (those the last E-step scored).
        last: that E-step.
        history: objective, log-likelihood and time per iteration.
        converged: whether the engine's stopping rule was met.
        num_iterations: M-steps taken.
        info: per history entry, the E- and M-steps' ``info`` merged.
        restart: which restart this is (0-based).
        interrupted: stopped by ``KeyboardInterrupt``.
        extras: what the engine's ``finish`` adds.
    """

    params: Any
    last: EStepResult
    history: History
    converged: bool
    num_iterations: int
    info: list[Mapping[str, Any]]
    restart: int = 0
    interrupted: bool = False
    extras: Any = None


class Iteration(NamedTuple):
    """What a ``callback`` receives after each iteration."""

    restart: int
    iteration: int
    params: Any
    objective: float
    log_likelihood: float
    elapsed: float


class EMResult(NamedTuple):
    """The kept run and what became of every restart.

    Attributes:
        best: the run with the highest final objective.
        restart_objectives: every restart's final objective (NaN where it failed).
        failures: ``"restart r: <error>"`` for every restart that failed.
        interrupted: a ``KeyboardInterrupt`` stopped the fit.
    """

    best: EMRun
    restart_objectives: list[float]
    failures: list[str]
    interrupted: bool

    def fit_fields(self, history: History | None = None) -> dict[str, Any]:
        """What every :class:`~pyroem.Fit` takes from the kept run (``history`` in place
        of its own where the engine amended it)."""
        return {
            "history": self.best.history if history is None else history,
            "converged": self.best.converged,
            "num_iterations": self.best.num_iterations,
            "restart_objectives": self.restart_objectives,
        }

    def record(self) -> dict[str, Any]:
        """What to add to a fit's options: failed restarts and interruption."""
        out: dict[str, Any] = {}
        if self.failures:
            out["failed_restarts"] = list(self.failures)
        if self.interrupted:
            out["interrupted"] = True
        return out


class Engine(ABC):
    """The shape of an EM variant. Subclasses implement ``init``, ``e_step`` and
    ``m_step``; ``converged``, ``finish`` and ``unconverged_message`` have defaults.

    Attributes:
        name: label of the progress bar.
        num_data: ``N`` (the weighted count under sample weights), which scales the tolerance.
    """

    name = "EM"
    num_data: float = 1

    @abstractmethod
    def init(self, restart: int) -> MStepResult:
        """The starting point of restart ``restart`` (0-based)."""

    @abstractmethod
    def e_step(self, params: Any) -> EStepResult:
        """Score ``params`` and compute the statistics for the next M-step."""

    @abstractmethod
    def m_step(self, stats: Any, params: Any, iteration: int) -> MStepResult:
        """New parameters from the statistics of ``params``."""

    def converged(self, objectives: list[float], info: list[Mapping[str, Any]], tol: float) -> bool:
        r"""Default rule: the objective changed by less than ``tol`` per data point,
        :math:`|\mathcal{L}_t - \mathcal{L}_{t-1}| / N < \text{tol}`."""
        return abs(objectives[-1] - objectives[-2]) / self.num_data < tol

    def finish(self, run: EMRun) -> EMRun:
        """Complete a run once it stopped (e.g. a long final E-step)."""
        return run

    def snapshot(self, params: Any) -> Any:
        """For checkpoints: everything needed to continue from ``params`` before their
        E-step (the parameters, the engine's internal state, its random generators), as
        nested tuples, lists, dicts, NamedTuples of pyroem, tensors and numbers, none of
        which later steps change."""
        raise NotSupportedError(
            f"{self.name} cannot write checkpoints; fit without checkpoint= (or, for stepwise "
            "EM, with stepwise=False)"
        )

    def checkpoint_info(self, info: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """The per-iteration records a checkpoint keeps (default: all of them; an engine
        may drop what only its last record needs)."""
        return info

    def restore(self, snapshot: Any, restart: int) -> Any:
        """For resuming: set the engine to ``snapshot`` (taken in restart ``restart``) and
        return its parameters, ready for their E-step."""
        raise NotSupportedError(f"{self.name} cannot resume from checkpoints; pass resume=False")

    def unconverged_message(self, run: EMRun) -> str | None:
        """The :class:`ConvergenceWarning` text for a kept run that did not converge
        (``None``: no warning)."""
        change = abs(run.history.change[-1]) if run.num_iterations else math.nan
        return (
            f"EM did not converge in {run.num_iterations} iterations (last change "
            f"of the objective {change:.3g}); raise max_iter or tol, or check the model"
        )


# Errors that say the input is wrong: every restart would fail the same way.
_INPUT_ERRORS = (SpecError, DataError, NotSupportedError, FitFileError)


def run_em(
    engine: Engine,
    *,
    n_init: int,
    tol: float,
    max_iter: int,
    progress: bool = False,
    callback: Callable[[Iteration], Any] | None = None,
    enough: Callable[[list[EMRun | None]], bool] | None = None,
) -> EMResult:
    """Run ``n_init`` restarts of ``engine`` and keep the one with the highest final
    objective (after ``finish``). ``enough``: a stopping rule, called with the restarts
    run so far (``None`` where one failed) after each; ``True`` ends the restarts.

    A restart that raises a numerical :class:`~pyroem.errors.PyroEMError` (not an
    input error) is recorded in ``failures`` and skipped. A ``KeyboardInterrupt``
    ends the fit: the interrupted run keeps its last complete iteration and competes
    with the finished restarts. Warns with :class:`ConvergenceWarning` when the kept
    run did not converge (and was not interrupted).

    Raises:
        PyroEMError: every restart failed (the type of the last failure, listing them all).
        KeyboardInterrupt: interrupted before any iteration completed.
    """
    best: EMRun | None = None
    runs: list[EMRun | None] = []
    finals: list[float] = []
    failures: list[str] = []
    last_error: PyroEMError | None = None
    interrupted = False
    saver = _Saver.take(engine)
    for restart in range(n_init):
        label = f"{engine.name} restart {restart + 1}/{n_init}" if n_init > 1 else engine.name
        try:
            run = _run_once(engine, restart, tol, max_iter, progress, label, callback, saver)
            if run is not None:
                run = engine.finish(run)
        except _INPUT_ERRORS:
            raise
        except PyroEMError as err:
            failures.append(f"restart {restart + 1}: {type(err).__name__}: {err}")
            finals.append(math.nan)
            runs.append(None)
            last_error = err
            if enough is not None and enough(runs):
                break
            continue
        if run is None:
            interrupted = True
            break
        finals.append(float(run.history.objective[-1]))
        if best is None or finals[-1] > best.history.objective[-1]:
            best = run
        if run.interrupted:
            interrupted = True
            break
        runs.append(run)
        if enough is not None and enough(runs):
            break
    if best is None:
        if interrupted:
            raise KeyboardInterrupt
        assert last_error is not None
        if n_init == 1:
            raise last_error
        raise type(last_error)(
            f"every one of the {len(finals)} restarts failed ("
            + "; ".join(failures)
            + "); the last error says what to change"
        ) from last_error
    if interrupted:
        warnings.warn(
            f"{engine.name} was interrupted; returning the best state so far (restart "
            f"{best.restart + 1}, iteration {best.num_iterations}), marked not converged",
            ConvergenceWarning,
            stacklevel=3,
        )
    elif failures:
        warnings.warn(
            f"{len(failures)} of {len(finals)} restarts failed and were skipped: "
            + "; ".join(failures),
            ConvergenceWarning,
            stacklevel=3,
        )
    if not best.converged and not interrupted:
        message = engine.unconverged_message(best)
        if message is not None:
            warnings.warn(message, ConvergenceWarning, stacklevel=3)
    return EMResult(best, finals, failures, interrupted)


def _run_once(
    engine: Engine,
    restart: int,
    tol: float,
    max_iter: int,
    progress: bool,
    label: str,
    callback: Callable[[Iteration], Any] | None,
    saver: _Saver | None = None,
) -> EMRun | None:
    """One run; ``None`` when interrupted before its first E-step completed."""
    start = time.perf_counter()
    try:
        resumed = saver.resumed_run(engine, restart) if saver is not None else None
        if resumed is None:
            first = engine.init(restart)
            params = first.params
            if saver is not None:
                saver.before_e_step(engine, params, 0)
            current = engine.e_step(params)
        else:
            params, current = resumed.params, resumed.last
    except KeyboardInterrupt:
        return None
    if resumed is None:
        objectives = [current.objective if first.objective is None else first.objective]
        log_likelihoods = [current.log_likelihood]
        elapsed = [time.perf_counter() - start]
        info: list[Mapping[str, Any]] = [{**first.info, **current.info}]
        converged = interrupted = False
        iterations = 0
    else:
        objectives, log_likelihoods, elapsed, info = resumed.lists
        start -= elapsed[-1]
        converged, interrupted, iterations = resumed.converged, False, resumed.num_iterations
    with tqdm(total=max_iter, desc=label, disable=not progress, leave=False) as bar:
        try:
            for iteration in range(iterations + 1, 0 if converged else max_iter + 1):
                step = engine.m_step(current.stats, params, iteration)
                if saver is not None:
                    saver.before_e_step(engine, step.params, iteration)
                scored = engine.e_step(step.params)
                params, current, iterations = step.params, scored, iteration
                objectives.append(scored.objective if step.objective is None else step.objective)
                log_likelihoods.append(scored.log_likelihood)
                elapsed.append(time.perf_counter() - start)
                info.append({**step.info, **scored.info})
                bar.update(1)
                bar.set_postfix(objective=f"{objectives[-1]:.6g}", refresh=False)
                if callback is not None:
                    callback(
                        Iteration(
                            restart,
                            iteration,
                            params,
                            objectives[-1],
                            log_likelihoods[-1],
                            elapsed[-1],
                        )
                    )
                if not math.isfinite(objectives[-1]):
                    break
                if engine.converged(objectives, info, tol):
                    converged = True
                    break
                if saver is not None and saver.checkpoint.due(iteration):
                    saver.write(
                        restart, iterations, converged, objectives, log_likelihoods, elapsed, info
                    )
        except KeyboardInterrupt:
            interrupted = True
            # The last complete iteration is kept; a half-recorded one is dropped.
            del objectives[iterations + 1 :], log_likelihoods[iterations + 1 :]
            del elapsed[iterations + 1 :], info[iterations + 1 :]
    if saver is not None:
        try:
            saver.write(restart, iterations, converged, objectives, log_likelihoods, elapsed, info)
        except KeyboardInterrupt:
            interrupted = True  # the write is atomic: the previous checkpoint stays whole
    history = History(np.array(objectives), np.array(log_likelihoods), np.array(elapsed))
    return EMRun(params, current, history, converged, iterations, info, restart, interrupted)


# ----- checkpoints ------------------------------------------------------------------


class _Resumed(NamedTuple):
    """A run continued from a checkpoint: its state after its last complete iteration."""

    params: Any
    last: EStepResult
    lists: tuple[list[float], list[float], list[float], list[Mapping[str, Any]]]
    converged: bool
    num_iterations: int


_RECORD_KEYS = ("num_iterations", "converged", *History._fields, "info", "snapshot")


def _checked(saved: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The restarts' records of a checkpoint, checked for their keys."""
    records = saved.get("restarts")
    if not isinstance(records, dict) or not all(
        isinstance(restart, int)
        and isinstance(record, dict)
        and all(key in record for key in _RECORD_KEYS)
        for restart, record in records.items()
    ):
        raise FitFileError(
            "the checkpoint is damaged: its restarts' records are incomplete; delete it, "
            "or resume=False to start afresh"
        )
    return dict(records)


class _Saver:
    """Writes the checkpoints of one fit and resumes from one (:mod:`pyroem.fits.checkpoint`).

    A checkpoint holds the last state of every restart run so far (a failed restart
    has none, and reruns). The engine's snapshot is taken before every E-step; a state
    written after iteration ``t`` holds the one taken before E-step ``t``, so resuming
    restores it and reruns that E-step, which draws the same random numbers as the
    first time. A resumed restart goes on while it has not converged and ``max_iter``
    allows (a finished one is only scored and finished again).
    """

    def __init__(self, checkpoint: _checkpoint.Checkpoint, engine: Engine) -> None:
        self.checkpoint, self.engine = checkpoint, engine
        checkpoint.identity = {**checkpoint.identity, "engine": engine.name}
        saved = checkpoint.read()
        self.saved: dict[int, dict[str, Any]] = {} if saved is None else _checked(saved)
        self.records = dict(self.saved)
        self.snapshots: dict[int, Any] = {}

    @classmethod
    def take(cls, engine: Engine) -> _Saver | None:
        """The saver of the fit's checkpoint, if it has one."""
        checkpoint = _checkpoint.active()
        return None if checkpoint is None else cls(checkpoint, engine)

    def resumed_run(self, engine: Engine, restart: int) -> _Resumed | None:
        """The saved state of ``restart``, restored and re-scored (``None``: none saved)."""
        record = self.saved.pop(restart, None)
        if record is None:
            return None
        params = engine.restore(record["snapshot"], restart)
        self.snapshots = {int(record["num_iterations"]): record["snapshot"]}
        lists = (
            [float(value) for value in record["objective"]],
            [float(value) for value in record["log_likelihood"]],
            [float(value) for value in record["elapsed"]],
            list(record["info"]),
        )
        return _Resumed(
            params,
            engine.e_step(params),
            lists,
            bool(record["converged"]),
            int(record["num_iterations"]),
        )

    def before_e_step(self, engine: Engine, params: Any, iteration: int) -> None:
        """Keep the snapshot of ``params`` (and the one before, for an interruption)."""
        self.snapshots = {
            key: value for key, value in self.snapshots.items() if key == iteration - 1
        }
        self.snapshots[iteration] = engine.snapshot(params)

    def write(
        self,
        restart: int,
        iterations: int,
        converged: bool,
        objectives: list[float],
        log_likelihoods: list[float],
        elapsed: list[float],
        info: list[Mapping[str, Any]],
    ) -> None:
        """Write the state after iteration ``iterations`` of ``restart``."""
        self.records[restart] = {
            "num_iterations": iterations,
            "converged": converged,
            "objective": list(objectives),
            "log_likelihood": list(log_likelihoods),
            "elapsed": list(elapsed),
            "info": [dict(entry) for entry in self.engine.checkpoint_info(info)],
            "snapshot": self.snapshots[iterations],
        }
        self.checkpoint.write({"restarts": self.records})
