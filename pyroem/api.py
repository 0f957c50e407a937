"""``pyroem.fit``: the single entry point, with the EM variant chosen by one flag."""

from __future__ import annotations

from typing import Any

import torch

from pyroem.em import EMRun, best_of_restarts, run_em
from pyroem.errors import NotSupportedError, SpecError
from pyroem.estep.enumerate import MixtureEStep, score_mixture
from pyroem.initialization import initial_params
from pyroem.mstep.mixture import mixture_m_step
from pyroem.program.fit import fit_program
from pyroem.program.results import ProgramFit
from pyroem.results import FitResult
from pyroem.spec.mixture import Mixture, as_data

__all__ = ["METHODS", "fit"]

METHODS = ("map-em", "vb-em", "mcmc-em", "nuts")
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _check_options(
    method: str, n_init: int, tol: float, max_iter: int, chunk_size: int, dtype: Any
) -> torch.dtype:
    if method not in METHODS:
        raise SpecError(f"unknown method {method!r}; choose one of {METHODS}")
    if method != "map-em":
        raise NotSupportedError(
            f"method={method!r} is not available in this version of pyroem; use method='map-em'"
        )
    for name, value, low in (
        ("n_init", n_init, 1),
        ("max_iter", max_iter, 0),
        ("chunk_size", chunk_size, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise SpecError(f"{name} must be an integer >= {low}; got {value!r}")
    if not (isinstance(tol, int | float) and tol >= 0):
        raise SpecError(f"tol must be a non-negative number; got {tol!r}")
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise SpecError(f"dtype must be one of {sorted(_DTYPES)}; got {dtype!r}")
        return _DTYPES[dtype]
    if dtype is None:
        return torch.float64
    if dtype not in _DTYPES.values():
        raise SpecError(f"dtype must be torch.float64 or torch.float32; got {dtype!r}")
    return dtype


def fit(
    model: Any,
    *model_args: Any,
    method: str = "map-em",
    n_init: int = 1,
    init: Any = None,
    tol: float = 1e-6,
    max_iter: int = 1000,
    seed: int | None = None,
    dtype: Any = None,
    device: Any = None,
    chunk_size: int = 65536,
    progress: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    m_step: str = "auto",
    gradient_steps: int = 50,
) -> FitResult | ProgramFit:
    r"""Fit a model by the EM variant ``method``.

    Args:
        model: a :class:`~pyroem.Mixture`, or any Pyro program (a callable) whose
            discrete latents can be enumerated; it is run as
            ``model(*model_args, **model_kwargs)``.
        *model_args: for a ``Mixture``, the data ``(num_data, dim)`` (array-like or
            tensor); for a Pyro program, its positional arguments.
        method: ``"map-em"`` (exact E-step; closed-form conjugate M-steps, gradient
            steps where there is none). The flags ``"vb-em"``, ``"mcmc-em"`` and
            ``"nuts"`` are reserved and raise :class:`~pyroem.errors.NotSupportedError`
            in this version.
        n_init: restarts; the run with the highest final objective is kept.
        init: for a ``Mixture``: ``"kmeans++"`` (default), ``"kmeans"``, ``"random"``,
            ``"random_from_data"``, a dict of parameters in ``fit.params`` form, or a
            previous fit. For a Pyro program: ``{site name: value}`` for any subset of
            the parameters (the rest: a prior draw for sample sites, the program's own
            value for ``pyro.param`` sites), or a previous fit.
        tol: convergence when the objective changes by less than ``tol`` per data point.
        max_iter: most EM iterations per restart; hitting it warns with
            :class:`~pyroem.errors.ConvergenceWarning`.
        seed: makes initialisation, and so the whole fit, reproducible.
        dtype: ``torch.float64`` (default) or ``torch.float32`` (``Mixture`` only; a
            Pyro program computes in its own tensors' dtype).
        device: torch device for the computation (``Mixture`` only; default: the
            data's, else CPU).
        chunk_size: data rows per E-step chunk; bounds memory at ``O(chunk_size · K · D)``.
        progress: show a progress bar.
        model_kwargs: keyword arguments of a Pyro program.
        m_step: Pyro programs: ``"auto"`` (recognised closed forms, gradient steps for
            the rest) or ``"gradient"`` (gradient steps for every site).
        gradient_steps: L-BFGS iterations per gradient M-step.

    Returns:
        A :class:`~pyroem.results.FitResult` for a ``Mixture``, a
        :class:`~pyroem.ProgramFit` for a Pyro program.

    The MAP-EM objective is the log joint of the Pyro program ``model.model(data)``:

    .. math:: \log p(x, θ) = \sum_n \log \sum_k π_k\, p(x_n | θ_k) + \log p(π) + \log p(θ)

    and it never decreases from one iteration to the next.
    """
    torch_dtype = _check_options(method, n_init, tol, max_iter, chunk_size, dtype)
    if not isinstance(model, Mixture):
        if dtype is not None or device is not None:
            raise SpecError(
                "dtype and device are for pyroem.Mixture; a Pyro program computes in the "
                "dtype and on the device of its own tensors (pass the data as you want it)"
            )
        return fit_program(
            model,
            model_args,
            model_kwargs,
            method=method,
            init=init,
            n_init=n_init,
            seed=seed,
            tol=tol,
            max_iter=max_iter,
            progress=progress,
            m_step=m_step,
            gradient_steps=gradient_steps,
        )
    if init is None:
        init = "kmeans++"
    if model_kwargs:
        raise SpecError("model_kwargs is for Pyro programs; a Mixture takes only the data")
    if len(model_args) != 1:
        raise SpecError(
            f"fit(Mixture, data) takes exactly one data argument; got {len(model_args)}"
        )
    data = as_data(model_args[0], dtype=torch_dtype, device=device)
    family = model.bind(data)
    if isinstance(init, FitResult):
        init = init.params
    if isinstance(init, dict):
        n_init = 1
    e_step = MixtureEStep(family, model.weights_prior, data, chunk_size)
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)

    def mixture_step(stats: Any, params: Any) -> Any:
        return mixture_m_step(family, model.weights_prior, stats, params)

    def run_once(restart: int) -> EMRun:
        start = initial_params(model, family, data, init, generator)
        label = f"{method} restart {restart + 1}/{n_init}" if n_init > 1 else method
        return run_em(
            e_step,
            mixture_step,
            start,
            num_data=data.shape[0],
            tol=tol,
            max_iter=max_iter,
            progress=progress,
            description=label,
        )

    best, finals = best_of_restarts(run_once, n_init)
    pointwise, log_resp = score_mixture(family, best.params, data, chunk_size)
    options = {
        "n_init": n_init,
        "init": init if isinstance(init, str) else "params",
        "tol": tol,
        "max_iter": max_iter,
        "seed": seed,
        "chunk_size": chunk_size,
    }
    return FitResult(
        spec=model,
        family=family,
        method=method,
        internal=best.params,
        history=best.history,
        converged=best.converged,
        num_iterations=best.num_iterations,
        pointwise_log_likelihood=pointwise,
        labels=log_resp.argmax(-1),
        objective=best.last.objective,
        restart_objectives=finals,
        options=options,
    )
