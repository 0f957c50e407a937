r"""The gradient M-step (generalized EM) for blocks without a closed form.

L-BFGS maximises :math:`Q(θ; θ_t)` over the block's sites in the unconstrained
space (:func:`pyroem.model.transforms.unconstraining` of each site's support; for
covariance matrices the log-Cholesky entries), the other blocks held fixed. The
step is accepted only if Q increased, so the log joint never decreases: this is
generalized EM, and with enough inner steps it converges to the same fixed
points as exact EM.

A site's support may be wider than the distribution argument it feeds (a real
``pyro.param`` used as Bernoulli or Categorical probabilities): L-BFGS can then step
where the program is invalid and the log-density, computed without validation, is
meaningless. The step is checked with Pyro's validation and, where it fails, cut back
along the segment from the old values until it passes and Q has not decreased.

In a fit split over the ranks of a ``torch.distributed`` process group
(:mod:`pyroem.engines.distributed`), each rank's Q and objective cover its shard of the
data, with the parameters' prior and log-Jacobian terms on rank 0 only (``priors``).
Every value and gradient L-BFGS reads, and every value an accept or reject decision
reads, is summed over the ranks (``shards``: one ``all_reduce`` in float64 per program
run), so every rank takes the same steps; an error on one rank is a NaN on all.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import pyro
import torch

from pyroem.engines.distributed import failure_flags, raise_agreed
from pyroem.estep.compiled import CompiledProgram, table_of
from pyroem.estep.program import expected_log_joint, masked_log_prob, posterior
from pyroem.model.program import ProgramModel, sample_sites
from pyroem.model.space import log_jacobian
from pyroem.model.transforms import unconstraining

__all__ = ["MarginalObjective", "ShardSum", "ecme_m_step", "gradient_m_step", "summed_loss"]

ShardSum = Callable[[list[torch.Tensor]], list[torch.Tensor]]
"""Tensors summed over the ranks of a distributed fit
(:meth:`pyroem.engines.distributed.Collective.sum_tensors`)."""


def gradient_m_step(
    program: ProgramModel,
    values: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor],
    names: list[str],
    *,
    max_steps: int = 50,
    jacobian: Collection[str] = (),
    priors: bool = True,
    shards: ShardSum | None = None,
) -> dict[str, torch.Tensor]:
    """Increase Q over the sites ``names`` by L-BFGS; keep the old values if Q did not rise.

    Args:
        program: the program.
        values: current values of every parameter (constrained).
        weights: the E-step's Q weights.
        names: the sites of this block.
        max_steps: L-BFGS iterations (function evaluations are bounded at 2× that).
        jacobian: sites of the block whose log-Jacobian is part of the objective (MAP in
            the unconstrained space, :mod:`pyroem.model.space`).
        priors: whether Q holds the parameters' own prior terms (``False`` on the ranks
            of a distributed fit other than rank 0).
        shards: in a distributed fit, the sum over the ranks of Q's values and
            gradients; ``None`` in one process.

    Returns:
        New values of the block's sites.
    """
    transforms, modules, unconstrained = _unconstrained_start(program, values, names)

    jacobian_sites = [name for name in names if name in jacobian]

    def objective(candidate: Mapping[str, torch.Tensor], validate: bool = False) -> torch.Tensor:
        full = {**values, **candidate}
        q = expected_log_joint(program, full, weights, validate, priors)
        if jacobian_sites:
            q = q + log_jacobian(program, full, jacobian_sites)
        return q

    def constrained(name: str, u: torch.Tensor) -> torch.Tensor:
        return u if name in modules else transforms[name].inv(u)

    def q_value() -> torch.Tensor:
        update = {name: constrained(name, u) for name, u in zip(names, unconstrained, strict=True)}
        return objective(update)

    with torch.no_grad():
        before = _total(q_value, shards)
    optimizer = _lbfgs(unconstrained, 1.0, max_steps)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        with torch.enable_grad():
            if shards is not None:
                return summed_loss(lambda: -q_value(), unconstrained, shards)
            loss = -q_value()
            if torch.isfinite(loss):
                loss.backward()
        return loss

    try:
        optimizer.step(closure)
    except (ValueError, RuntimeError, IndexError):
        # A step outside the model's domain (e.g. a failed Cholesky; IndexError: torch's
        # strong-Wolfe search after a non-finite trial): keep the old values.
        return {name: values[name] for name in names}
    with torch.no_grad():
        start = [transforms[name](values[name].detach()) for name in names if name not in modules]
        end = [u.detach().clone() for u in unconstrained]
        old_modules = {name: values[name].detach().clone() for name in names if name in modules}
        for _ in range(_CUTBACKS):
            candidate = {
                name: constrained(name, u).detach().clone()
                for name, u in zip(names, end, strict=True)
            }
            after = _checked(functools.partial(objective, candidate, validate=True), shards)
            if math.isfinite(after) and after >= before:
                return candidate
            if not math.isnan(after):
                # Valid but no better: L-BFGS's point is kept out.
                break
            end = _halfway(names, modules, start, end, old_modules)
    for name in names:
        if name in modules:
            with torch.no_grad():
                modules[name].copy_(values[name])
    return {name: values[name] for name in names}


# Halvings of an invalid step before the old values are kept.
_CUTBACKS = 30
# L-BFGS iterations between two checks of an ECME step's gain.
_LBFGS_ROUND = 5

# First-step scales of L-BFGS's attempts on a block (see :func:`_lbfgs_ascent`).
_LEARNING_RATES = (1.0, 0.1, 0.01)


def _lbfgs(params: list[torch.Tensor], learning_rate: float, steps: int) -> torch.optim.LBFGS:
    """L-BFGS with a strong-Wolfe line search for ``steps`` iterations (twice as many
    evaluations) and tolerances below rounding: the callers stop it themselves."""
    return torch.optim.LBFGS(
        params,
        lr=learning_rate,
        max_iter=steps,
        max_eval=2 * steps,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        history_size=20,
        line_search_fn="strong_wolfe",
    )


def _total(evaluate: Callable[[], torch.Tensor], shards: ShardSum | None) -> float:
    """``evaluate()`` as a float, summed over the ranks when ``shards`` is given (where a
    rank's evaluation fails, the sum is NaN on every rank, so none waits for it)."""
    if shards is None:
        return float(evaluate())
    local, failed = _evaluated(evaluate)
    total, flags = shards([local.detach().reshape(()), failure_flags(failed)])
    raise_agreed(failed, flags)
    return float(total)


#: The errors of a program evaluated where it is invalid (Pyro's validation, a failed
#: Cholesky): the value there is NaN.
_INVALID: tuple[type[Exception], ...] = (ValueError, RuntimeError)


def _evaluated(
    evaluate: Callable[[], torch.Tensor], invalid: tuple[type[Exception], ...] = _INVALID
) -> tuple[torch.Tensor, Exception | None]:
    """This rank's ``evaluate()``, NaN where the program is invalid there (an error of
    the kinds ``invalid``), and any other error, kept for
    :func:`~pyroem.engines.distributed.raise_agreed` once the ranks have met."""
    nan = torch.tensor(math.nan, dtype=torch.float64)
    try:
        return evaluate(), None
    except invalid:
        return nan, None
    except Exception as err:  # every rank ends the fit with it, after the collective
        return nan, err


def _checked(evaluate: Callable[[], torch.Tensor], shards: ShardSum | None) -> float:
    """:func:`_total` with Pyro's validation errors as NaN (the program is invalid there)."""
    try:
        return _total(evaluate, shards)
    except (ValueError, RuntimeError):
        return math.nan


def summed_loss(
    loss_of: Callable[[], torch.Tensor],
    leaves: Sequence[torch.Tensor],
    shards: ShardSum,
    *,
    invalid: tuple[type[Exception], ...] = _INVALID,
) -> torch.Tensor:
    """A loss and its gradient in a distributed fit (an L-BFGS closure's, an SVI step's):
    this rank's loss and the ``.grad`` of ``leaves``, both summed over the ranks in one
    collective, with the flags of a failed evaluation.

    ``loss_of`` returns this rank's loss, a scalar tensor; where it requires grad it is
    differentiated here, else ``loss_of`` has set the leaves' gradients itself. An error of
    the kinds ``invalid`` (the program is invalid there) or a non-finite loss on any rank
    gives every rank a non-finite loss and zero gradients, as a non-finite loss does in one
    process; any other error makes every rank raise an error of the same kind (none
    waits for the failing rank): the failing rank its own, the others a stand-in, as
    :meth:`~pyroem.engines.distributed.Collective.agree` does.

    Args:
        loss_of: this rank's loss, ``()``.
        leaves: the tensors whose gradients are summed, the same shapes and order on
            every rank.
        shards: the sum over the ranks.
        invalid: the errors that mean the program cannot be evaluated there.

    Returns:
        The loss summed over the ranks, ``()``; the leaves hold the summed gradients.
    """
    loss, failed = _evaluated(loss_of, invalid)
    if loss.requires_grad and bool(torch.isfinite(loss)):
        loss.backward()
    grads = [torch.zeros_like(leaf) if leaf.grad is None else leaf.grad for leaf in leaves]
    total, flags, *summed = shards([loss.detach().reshape(()), failure_flags(failed), *grads])
    raise_agreed(failed, flags)
    finite = bool(torch.isfinite(total))
    for leaf, grad in zip(leaves, summed, strict=True):
        leaf.grad = grad.detach() if finite else torch.zeros_like(leaf)
    return total


def _halfway(
    names: list[str],
    modules: Mapping[str, torch.Tensor],
    start: list[torch.Tensor],
    end: list[torch.Tensor],
    old_modules: Mapping[str, torch.Tensor],
) -> list[torch.Tensor]:
    """The midpoints between the old unconstrained values and ``end``."""
    starts = iter(start)
    out = []
    for name, u in zip(names, end, strict=True):
        old = old_modules[name] if name in modules else next(starts)
        middle = (old + u) / 2
        if name in modules:
            modules[name].copy_(middle)
        out.append(middle)
    return out


class MarginalObjective:
    r"""The fit's objective at given parameters, with its gradient: for ECME.

    Calling it with values (some of them requiring gradients) returns a scalar whose
    value is the objective (the log joint with the discrete latents summed out, plus
    the log-Jacobian of ``jacobian``'s sites) and whose gradient is the objective's.
    The gradient comes from Fisher's identity,
    :math:`∇_θ \log p(x, θ) = ∇_{θ'} Q(θ'; θ)|_{θ'=θ}`: one run of the program at θ gives
    the E-step's weights (the contraction, without gradients through it) and, from the
    same run's log-probability tables, Q at θ with its gradient. The returned scalar is
    ``objective + Q − stop_gradient(Q)``.

    While the program keeps its structure, the run is the compiled E-step's light run
    (:class:`~pyroem.estep.compiled.CompiledProgram`); otherwise a full trace and
    :func:`~pyroem.estep.program.posterior`.

    Args:
        program: the program.
        compiled: the fit's compiled E-step, or ``None`` (full traces).
        jacobian: the sites whose log-Jacobian is part of the objective.
        priors: whether the objective holds the parameters' own prior terms (``False``:
            the log-likelihood only, on the ranks of a distributed fit other than rank 0).
    """

    def __init__(
        self,
        program: ProgramModel,
        compiled: CompiledProgram | None,
        jacobian: Collection[str],
        priors: bool = True,
    ) -> None:
        self.program = program
        self.compiled = compiled
        self.jacobian = list(jacobian)
        self.priors = priors
        # Program runs so far (each a compiled run or a full trace).
        self.runs = 0
        # The values and compiled E-step of the last validated evaluation: the E-step at
        # an accepted point (the fit's next E-step, when the values are those).
        self.validated: tuple[Mapping[str, torch.Tensor], Any] | None = None

    def __call__(self, values: Mapping[str, torch.Tensor], validate: bool = False) -> torch.Tensor:
        self.runs += 1
        total = None
        if validate and self.compiled is not None and not self.compiled.replicating:
            # A compiled run with Pyro's validation: the objective without its gradient.
            estep = self.compiled(values, validate=True)
            if estep is not None:
                self.validated = (dict(values), estep)
                total = estep.log_joint if self.priors else estep.log_likelihood
            else:
                self.compiled = None
        elif self.compiled is not None and not validate:
            sites = self.compiled.run(values)
            if sites is not None:
                tables = None
                if not self.compiled.replicating:
                    # Each site's log-probability table once: Q's (with its gradient)
                    # and, detached, the contraction's.
                    with pyro.validation_enabled(False):
                        tables = {name: table_of(site) for name, site in sites.items()}
                detached = None if tables is None else {n: t.detach() for n, t in tables.items()}
                estep = self.compiled.estimate(sites, detached)
                weights = estep.all_weights()
                with pyro.validation_enabled(False):
                    q = _q_from_sites(sites, self._without_priors(weights), tables=tables)
                value = estep.log_joint if self.priors else estep.log_likelihood
                total = value + (q - q.detach())
            else:
                self.compiled = None
        if total is None:
            trace = self.program.trace(values, validate)
            post = posterior(self.program, values, trace)
            q = _q_from_sites(
                dict(sample_sites(trace)), self._without_priors(post.weights), trace=True
            )
            total = (post.log_joint if self.priors else post.log_likelihood) + (q - q.detach())
        if self.jacobian:
            total = total + log_jacobian(self.program, values, self.jacobian)
        return total

    def _without_priors(self, weights: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """``weights``, less the parameters' own prior sites unless ``priors``."""
        if self.priors:
            return weights
        return {name: w for name, w in weights.items() if name not in self.program.params}


def _q_from_sites(
    sites: Mapping[str, Any],
    weights: Mapping[str, torch.Tensor],
    trace: bool = False,
    tables: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Q from a run's sites: ``Σ weight × masked log-probability table`` (the tables
    ``tables`` where given)."""
    total: Any = 0.0
    for name, site in sites.items():
        weight = weights.get(name)
        if weight is None:
            continue
        if tables is not None:
            table = tables[name]
        elif trace:
            table = site["unscaled_log_prob"]
        else:
            table = site["fn"].log_prob(site["value"])
        total = total + (weight * masked_log_prob(site, table)).sum()
    return torch.as_tensor(total)


def ecme_m_step(
    program: ProgramModel,
    values: Mapping[str, torch.Tensor],
    names: list[str],
    objective: Callable[..., torch.Tensor],
    *,
    max_steps: int = 50,
    shards: ShardSum | None = None,
    tolerance: float = 1e-15,
) -> dict[str, torch.Tensor] | None:
    r"""ECME's conditional step (Liu & Rubin 1994): increase the objective itself, not
    Q, over the sites ``names`` (the other blocks fixed) by L-BFGS in their
    unconstrained coordinates; keep the old values unless the objective rose.

    Q's gradient at the E-step's point equals the objective's, so a gradient step on
    either starts the same way; the objective is the function EM climbs, and
    quasi-Newton steps on it converge in far fewer program runs than ascent on a Q
    that the next E-step replaces. Each evaluation is one run of the program
    (:class:`MarginalObjective`). The result is accepted only if its objective, with
    Pyro's argument validation on, is at least the old one: the objective never
    decreases. Where L-BFGS stepped where the program is invalid (a parameter whose
    support is wider than its use) or ended no higher, the step returns ``None`` and the
    caller takes :func:`gradient_m_step`'s step on Q (which cuts an invalid step back).

    Args:
        program: the program.
        values: current values of every parameter (constrained).
        names: the sites of this block.
        objective: a :class:`MarginalObjective`.
        max_steps: L-BFGS iterations (evaluations are bounded at 2× that).
        shards: in a distributed fit, the sum over the ranks of the objective's values
            and gradients (each rank's ``objective`` covers its shard); ``None`` in one
            process.
        tolerance: L-BFGS stops after a round of iterations (five) that raised the
            objective by less than this. The fit passes a tenth of the
            smallest change of its objective that it counts as progress (``tol × N``): a
            conditional step's last digits below that are lost in the next E-step, and
            on a smooth objective L-BFGS otherwise spends most of its runs there.

    Returns:
        New values of the block's sites, or ``None`` (no valid point as high as the old).
    """
    return _lbfgs_ascent(program, values, names, objective, max_steps, tolerance, shards)


def _lbfgs_ascent(
    program: ProgramModel,
    values: Mapping[str, torch.Tensor],
    names: list[str],
    objective: Callable[..., torch.Tensor],
    max_steps: int,
    tolerance: float = 1e-15,
    shards: ShardSum | None = None,
) -> dict[str, torch.Tensor] | None:
    """L-BFGS on ``objective(values with names replaced)`` from ``values`` to
    ``tolerance`` (see :func:`ecme_m_step`); the accepted values (``None`` if none was).

    The objective at the start is L-BFGS's first evaluation (no separate run): at the
    values mapped to the unconstrained coordinates and back, which can differ from the
    old values' own in the last bits. An end must rise above it; where no evaluation
    did, the old values themselves are kept."""
    transforms, modules, unconstrained = _unconstrained_start(program, values, names)

    def constrained(name: str, u: torch.Tensor) -> torch.Tensor:
        return u if name in modules else transforms[name].inv(u)

    def at(us: list[torch.Tensor], validate: bool = False) -> torch.Tensor:
        update = {name: constrained(name, u) for name, u in zip(names, us, strict=True)}
        return objective({**values, **update}, validate)

    # L-BFGS runs in rounds of a few iterations (its state carries over) and stops after
    # a round that gained less than ``tolerance``: torch's own ``tolerance_change`` also
    # bounds the slope and the step length, in other units, so it stays tiny.
    per_round = min(_LBFGS_ROUND, max_steps)
    outside: list[bool] = []
    # The objective of every evaluation; the first is at the start.
    seen: list[float] = []
    # The highest finite evaluation's point (unconstrained), where it rose above the start.
    highest: list[torch.Tensor] = []

    def note(value: float) -> None:
        seen.append(value)
        if math.isfinite(value) and value > max(seen[:-1], default=math.inf):
            highest[:] = [u.detach().clone() for u in unconstrained]

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        if shards is not None:
            with torch.enable_grad():
                total = summed_loss(lambda: -at(unconstrained), unconstrained, shards)
            note(-float(total))
            if not bool(torch.isfinite(total)):
                outside.append(True)
            return total
        with torch.enable_grad():
            loss = -at(unconstrained)
            note(-float(loss.detach()))
            if torch.isfinite(loss):
                loss.backward()
            else:
                outside.append(True)
        return loss.detach()

    # Where L-BFGS steps where the program is invalid before any point above the start,
    # it starts again from the old values with first steps 10 and 100 times shorter.
    for learning_rate in _LEARNING_RATES:
        outside.clear()
        seen.clear()
        optimizer = _lbfgs(unconstrained, learning_rate, per_round)
        try:
            for _ in range(0, max_steps, per_round):
                best = max(seen, default=-math.inf)
                optimizer.step(closure)
                if outside or not seen or not max(seen) - best >= tolerance:
                    break
        except (ValueError, RuntimeError, IndexError):
            # IndexError: torch's strong-Wolfe search after a non-finite trial.
            outside.append(True)
        if not outside or highest:
            break
        _restore(names, modules, values)
        with torch.no_grad():
            for name, u in zip(names, unconstrained, strict=True):
                if name not in modules:
                    u.copy_(transforms[name](values[name].detach()))
    if outside and highest:
        # L-BFGS stepped where the program is invalid after a point above the start:
        # that point is the candidate (checked below as any end point is).
        with torch.no_grad():
            for u, point in zip(unconstrained, highest, strict=True):
                u.copy_(point)
        seen[:] = [seen[0], max(value for value in seen if math.isfinite(value))]
    elif outside or not seen:
        # L-BFGS stepped where the program is invalid: its path says little.
        _restore(names, modules, values)
        return None
    before = seen[0]
    if max(seen) <= before:
        # No evaluation rose above the start: the old values stay.
        return _restore(names, modules, values)
    with torch.no_grad():
        candidate = {
            name: constrained(name, u).detach().clone()
            for name, u in zip(names, unconstrained, strict=True)
        }
        after = _checked(lambda: objective({**values, **candidate}, True), shards)
    if math.isfinite(after) and after > before:
        return candidate
    _restore(names, modules, values)
    return None


def _unconstrained_start(
    program: ProgramModel, values: Mapping[str, torch.Tensor], names: list[str]
) -> tuple[dict[str, Any], dict[str, torch.nn.Parameter], list[Any]]:
    """The block's transforms, its networks' own parameters, and the leaf tensors L-BFGS
    moves: a network's parameter in place (set to ``values``), every other site as a
    contiguous unconstrained copy (L-BFGS flattens gradients with .view, which a strided
    value breaks)."""
    transforms = {name: unconstraining(name, program.params[name].constraint) for name in names}
    modules = program.module_params
    for name in names:
        if name in modules:
            with torch.no_grad():
                modules[name].copy_(values[name])
    unconstrained = [
        modules[name]
        if name in modules
        else transforms[name](values[name].detach()).contiguous().clone().requires_grad_()
        for name in names
    ]
    return transforms, modules, unconstrained


def _restore(
    names: list[str], modules: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The old values of the block (written back into any network)."""
    for name in names:
        if name in modules:
            with torch.no_grad():
                modules[name].copy_(values[name])
    return {name: values[name] for name in names}
