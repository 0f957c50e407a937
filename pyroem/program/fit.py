"""MAP-EM on a Pyro program: exact enumeration E-step, ECM M-step."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import pyro
import pyro.poutine as poutine
import torch

from pyroem.em import EMRun, best_of_restarts, run_em
from pyroem.errors import DataError, SpecError
from pyroem.estep.enumerate import EStep
from pyroem.program.conjugacy import (
    LOCATION_SLOTS,
    SCALE_SLOTS,
    ClosedForm,
    closed_form_update,
    recognise,
)
from pyroem.program.gradient import gradient_m_step
from pyroem.program.model import ProgramModel, _Inject, sample_sites
from pyroem.program.posterior import Posterior, posterior
from pyroem.program.results import ProgramFit

__all__ = ["fit_program", "initial_values"]

M_STEPS = ("auto", "gradient")


def _as_value(name: str, value: Any, program: ProgramModel, like: torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=like.dtype, device=like.device).detach().clone()
    site = program.params[name]
    if tensor.shape != site.shape:
        raise SpecError(
            f"init[{name!r}] has shape {tuple(tensor.shape)}; the site's value has shape "
            f"{tuple(site.shape)}"
        )
    if not bool(torch.isfinite(tensor).all()):
        raise DataError(f"init[{name!r}] has NaN or infinite entries")
    if not bool(site.constraint.check(tensor).all()):
        raise SpecError(f"init[{name!r}] is outside the site's support {site.constraint}")
    return tensor


def initial_values(
    program: ProgramModel, init: Mapping[str, Any] | None, seed: int
) -> dict[str, torch.Tensor]:
    """Starting parameters: ``init`` where given; otherwise a prior draw for sample
    sites (seeded, drawn given the ``init`` values) and the program's value for
    ``pyro.param`` sites.

    Raises:
        SpecError: ``init`` names an unknown site, or a value of the wrong shape/support.
    """
    init = dict(init or {})
    unknown = sorted(set(init) - set(program.params))
    if unknown:
        raise SpecError(
            f"init names sites that are not parameters of the model: {unknown}; "
            f"the parameters are {list(program.params)}"
        )
    likes = dict(program.param_inits)
    with torch.random.fork_rng(), pyro.get_param_store().scope(), poutine.block():
        torch.manual_seed(seed)
        fixed = {name: torch.as_tensor(value) for name, value in init.items()}
        trace = poutine.trace(_Inject(fixed)(program.model)).get_trace(
            *program.model_args, **program.model_kwargs
        )
    for name, site in sample_sites(trace):
        if name in program.params:
            likes[name] = site["value"].detach()
    values = {}
    for name in program.params:
        if name in init:
            values[name] = _as_value(name, init[name], program, likes[name])
        else:
            values[name] = likes[name].clone()
    return values


def _num_observations(trace: Any, program: ProgramModel) -> int:
    total = 0
    for name in program.observed:
        site = trace.nodes[name]
        value = site["value"]
        total += math.prod(value.shape[: value.dim() - site["fn"].event_dim])
    return max(total, 1)


def _block_order(program: ProgramModel, blocks: Mapping[str, ClosedForm | None]) -> list[str]:
    """Closed-form blocks in update order: locations first, then children before parents.

    A location block goes before the scale blocks of the same sites, as in
    scikit-learn's and hmmlearn's M-steps; and a mean whose prior depends on a
    covariance goes before that covariance, which for Normal–Inverse-Wishart
    priors makes one ECM sweep the joint mode.
    """
    order = [name for name in reversed(list(program.params)) if blocks[name] is not None]
    return sorted(order, key=lambda name: blocks[name].slot not in LOCATION_SLOTS)  # type: ignore[union-attr]


def _needs_trace(blocks: Mapping[str, ClosedForm | None], order: list[str]) -> list[bool]:
    """Before each block: must the program run again, because an earlier block in the
    sweep changed a site this block reads? A scale block reads changed locations and
    changed parameter values without a new run (see ``closed_form_update``)."""
    touched: dict[str, set[str]] = {}
    needs = []
    for name in order:
        block = blocks[name]
        assert block is not None
        sites = {use.site for use in block.uses}
        tags = set().union(*(touched.get(site, set()) for site in sites))
        patchable = block.slot in SCALE_SLOTS and tags <= {"location", "value"}
        again = bool(tags) and not patchable
        needs.append(again)
        if again:
            touched = {}
        for site in sites:
            touched.setdefault(site, set()).add(
                "location" if block.slot in LOCATION_SLOTS else "other"
            )
        touched.setdefault(name, set()).add("value")
    return needs


def fit_program(
    model: Callable[..., Any],
    model_args: tuple[Any, ...],
    model_kwargs: Mapping[str, Any] | None,
    *,
    method: str,
    init: Any,
    n_init: int,
    seed: int | None,
    tol: float,
    max_iter: int,
    progress: bool,
    m_step: str,
    gradient_steps: int,
) -> ProgramFit:
    """Fit a Pyro program by MAP-EM (see :func:`pyroem.fit`)."""
    if m_step not in M_STEPS:
        raise SpecError(f"m_step must be one of {M_STEPS}; got {m_step!r}")
    steps_ok = isinstance(gradient_steps, int) and not isinstance(gradient_steps, bool)
    if not steps_ok or gradient_steps < 1:
        raise SpecError(f"gradient_steps must be an integer >= 1; got {gradient_steps!r}")
    program = ProgramModel(model, model_args, model_kwargs)
    if isinstance(init, ProgramFit):
        init = init.params
    if init is not None and not isinstance(init, Mapping):
        raise SpecError(
            "init for a Pyro program is a dict {site name: value} (or a previous fit); "
            f"got {type(init).__name__}"
        )
    if init is not None and set(init) >= set(program.params):
        n_init = 1
    base_seed = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else seed
    first = initial_values(program, init, base_seed)
    first_trace = program.trace(first)
    found = (
        recognise(program, first, first_trace)
        if m_step == "auto"
        else dict.fromkeys(program.params)
    )
    order = _block_order(program, found)
    retrace = _needs_trace(found, order)
    gradient_sites = [name for name in program.params if found[name] is None]
    kinds = {name: "gradient" if block is None else block.kind for name, block in found.items()}
    num_data = _num_observations(first_trace, program)

    def e_step(values: dict[str, torch.Tensor]) -> EStep:
        post = posterior(program, values, first_trace if values is first else None)
        return EStep(post, float(post.log_likelihood), float(post.log_joint))

    def ecm(post: Posterior, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        values = dict(values)
        trace = post.trace
        changes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, again in zip(order, retrace, strict=True):
            if again:
                trace = program.trace(values)
                changes = {}
            block = found[name]
            assert block is not None
            new = closed_form_update(program, block, trace, post.weights, changes, found)
            changes[name] = (values[name], new)
            values[name] = new
        if gradient_sites:
            values.update(
                gradient_m_step(
                    program, values, post.weights, gradient_sites, max_steps=gradient_steps
                )
            )
        return values

    def run_once(restart: int) -> EMRun:
        start = first if restart == 0 else initial_values(program, init, base_seed + restart)
        label = f"{method} restart {restart + 1}/{n_init}" if n_init > 1 else method
        return run_em(
            e_step,
            ecm,
            start,
            num_data=num_data,
            tol=tol,
            max_iter=max_iter,
            progress=progress,
            description=label,
        )

    best, finals = best_of_restarts(run_once, n_init)
    post: Posterior = best.last.stats
    options = {
        "n_init": n_init,
        "tol": tol,
        "max_iter": max_iter,
        "seed": seed,
        "m_step": m_step,
        "gradient_steps": gradient_steps,
    }
    return ProgramFit(
        program=program,
        method=method,
        values=best.params,
        m_step_kinds=kinds,
        marginals=post.marginals,
        log_likelihood=float(post.log_likelihood),
        log_joint=float(post.log_joint),
        history=best.history,
        converged=best.converged,
        num_iterations=best.num_iterations,
        num_data=num_data,
        restart_objectives=finals,
        options=options,
    )
