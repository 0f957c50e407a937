"""``pyroem.fit``: the single entry point, with the EM variant chosen by one flag."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from pyroem.em import EMRun, best_of_restarts, run_em
from pyroem.errors import DataError, NotSupportedError, SpecError
from pyroem.estep.enumerate import MixtureEStep, score_mixture
from pyroem.initialization import initial_params, seeded_generator, site_values
from pyroem.mstep.mixture import mixture_m_step
from pyroem.options import check_integer, with_defaults
from pyroem.program.fit import fit_program
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
    check_integer("n_init", n_init, 1)
    check_integer("max_iter", max_iter, 0)
    check_integer("chunk_size", chunk_size, 1)
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
    sample_weight: Any = None,
    **method_options: Any,
) -> Any:
    r"""Fit a model by the EM variant ``method``.

    Args:
        model: a :class:`~pyroem.Mixture`, or any Pyro program (a callable) whose
            discrete latents can be enumerated; it is run as
            ``model(*model_args, **model_kwargs)``.
        *model_args: for a ``Mixture``, the data ``(num_data, dim)`` (array-like or
            tensor); for a Pyro program, its positional arguments.
        method: ``"map-em"`` (exact E-step; closed-form conjugate M-steps, gradient
            steps where there is none), ``"vb-em"`` (closed-form mean-field VB for a
            ``Mixture``; SVI with a guide for a Pyro program, or for a ``Mixture`` given
            ``guide=``), ``"mcmc-em"`` (Monte Carlo EM / SAEM with Gibbs and NUTS
            E-steps) or ``"nuts"`` (full Bayesian inference with z summed out).
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
        sample_weight: ``map-em`` on a ``Mixture``: non-negative frequency weights
            ``(num_data,)``; row ``n`` counts ``w_n`` times in the sufficient statistics and
            in the objective (integer weights give the fit on repeated rows). The
            initialisation (k-means++ etc.) does not use them; ``fit.log_likelihood()``
            stays the unweighted sum over rows.
        **method_options: options of the other methods (see the README's section on
            each method); an option the method does not know is an error.

    Returns:
        A :class:`~pyroem.results.FitResult` for a ``Mixture``, a
        :class:`~pyroem.ProgramFit` for a Pyro program.

    The MAP-EM objective is the log joint of the Pyro program ``model.model(data)``:

    .. math:: \log p(x, θ) = \sum_n \log \sum_k π_k\, p(x_n | θ_k) + \log p(π) + \log p(θ)

    and it never decreases from one iteration to the next.
    """
    torch_dtype = _check_options(method, n_init, tol, max_iter, chunk_size, dtype)
    if sample_weight is not None and (method != "map-em" or not isinstance(model, Mixture)):
        raise NotSupportedError(
            f"sample_weight is supported by method='map-em' on a pyroem.Mixture; got "
            f"method={method!r} on {type(model).__name__}. Repeat rows instead"
        )
    started = time.perf_counter()
    result: Any
    if method == "map-em":
        with_defaults("method='map-em'", method_options, {}, hint="map-em takes none")
    elif method == "mcmc-em":
        # MCMC-EM reuses the MAP-EM M-steps, so it takes their options too.
        method_options = {"m_step": m_step, "gradient_steps": gradient_steps, **method_options}
    if method != "map-em":
        result = _fit_other(
            model,
            model_args,
            model_kwargs,
            method=method,
            init=init,
            n_init=n_init,
            seed=seed,
            tol=tol,
            max_iter=max_iter,
            dtype=torch_dtype if dtype is not None else None,
            device=device,
            chunk_size=chunk_size,
            progress=progress,
            options=method_options,
        )
    elif not isinstance(model, Mixture):
        if dtype is not None or device is not None:
            raise SpecError(
                "dtype and device are for pyroem.Mixture; a Pyro program computes in the "
                "dtype and on the device of its own tensors (pass the data as you want it)"
            )
        result = fit_program(
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
    else:
        result = _fit_mixture(
            model,
            model_args,
            model_kwargs,
            method=method,
            init=init,
            n_init=n_init,
            seed=seed,
            tol=tol,
            max_iter=max_iter,
            dtype=torch_dtype,
            device=device,
            chunk_size=chunk_size,
            progress=progress,
            sample_weight=sample_weight,
        )
    result.runtime = time.perf_counter() - started
    return result


def _fit_mixture(
    model: Mixture,
    model_args: tuple[Any, ...],
    model_kwargs: dict[str, Any] | None,
    *,
    method: str,
    init: Any,
    n_init: int,
    seed: int | None,
    tol: float,
    max_iter: int,
    dtype: torch.dtype,
    device: Any,
    chunk_size: int,
    progress: bool,
    sample_weight: Any = None,
) -> FitResult:
    """MAP-EM on a ``Mixture`` by its fast tensor kernels."""
    if init is None:
        init = "kmeans++"
    if model_kwargs:
        raise SpecError("model_kwargs is for Pyro programs; a Mixture takes only the data")
    if len(model_args) != 1:
        raise SpecError(
            f"fit(Mixture, data) takes exactly one data argument; got {len(model_args)}"
        )
    data = as_data(model_args[0], dtype=dtype, device=device)
    family = model.bind(data)
    if isinstance(init, FitResult):
        init = init.params
    if isinstance(init, dict):
        n_init = 1
    weights = None if sample_weight is None else _check_sample_weight(sample_weight, data)
    e_step = MixtureEStep(family, model.weights_prior, data, chunk_size, weights)
    generator = seeded_generator(seed)

    def mixture_step(stats: Any, params: Any) -> Any:
        return mixture_m_step(family, model.weights_prior, stats, params)

    def run_once(restart: int) -> EMRun:
        start = initial_params(model, family, data, init, generator)
        label = f"{method} restart {restart + 1}/{n_init}" if n_init > 1 else method
        return run_em(
            e_step,
            mixture_step,
            start,
            # Weights are frequencies: the tolerance is per weighted row.
            num_data=data.shape[0] if weights is None else float(weights.sum()),
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
        data=data,
    )


def _check_sample_weight(sample_weight: Any, data: torch.Tensor) -> torch.Tensor:
    """``sample_weight`` as a ``(num_data,)`` tensor of finite non-negative numbers."""
    try:
        weights = torch.as_tensor(np.asarray(sample_weight), dtype=data.dtype, device=data.device)
    except (TypeError, ValueError) as err:
        raise DataError(f"sample_weight must be numeric; could not convert it ({err})") from err
    if weights.shape != (data.shape[0],):
        raise DataError(
            f"sample_weight must have shape ({data.shape[0]},), one weight per row; "
            f"got {tuple(weights.shape)}"
        )
    if not bool(torch.isfinite(weights).all() and (weights >= 0).all() and weights.sum() > 0):
        raise DataError("sample_weight must be finite and non-negative, with a positive sum")
    return weights


def _mixture_as_program(
    spec: Mixture, data: torch.Tensor, init: Any, seed: int | None
) -> tuple[Any, dict[str, torch.Tensor]]:
    """``spec.model(data)`` and its starting values in site form, from the
    ``Mixture``'s own initialisation (k-means++ by default)."""
    if isinstance(init, FitResult):
        init = init.params
    values = site_values(spec, spec.bind(data), data, init, seed)
    return spec.model(data, params=values), values


def _fit_other(
    model: Any,
    model_args: tuple[Any, ...],
    model_kwargs: dict[str, Any] | None,
    *,
    method: str,
    init: Any,
    n_init: int,
    seed: int | None,
    tol: float,
    max_iter: int,
    dtype: torch.dtype | None,
    device: Any,
    chunk_size: int,
    progress: bool,
    options: dict[str, Any],
) -> Any:
    """Every method but ``map-em``: CAVI for a ``Mixture`` under ``vb-em`` (unless a
    guide is asked for); otherwise the engine runs on the Pyro program (for a
    ``Mixture``, ``spec.model(data)``, started from the ``Mixture``'s initialisation)."""
    if isinstance(model, Mixture):
        if model_kwargs:
            raise SpecError("model_kwargs is for Pyro programs; a Mixture takes only the data")
        if len(model_args) != 1:
            raise SpecError(
                f"fit(Mixture, data) takes exactly one data argument; got {len(model_args)}"
            )
        data = as_data(model_args[0], dtype=dtype or torch.float64, device=device)
        if method == "vb-em" and "guide" not in options:
            from pyroem.variational.cavi import fit_mixture_cavi

            return fit_mixture_cavi(
                model,
                data,
                init="kmeans++" if init is None else init,
                n_init=n_init,
                seed=seed,
                tol=tol,
                max_iter=max_iter,
                chunk_size=chunk_size,
                progress=progress,
                **options,
            )
        if method == "nuts":
            from pyroem.bayes import fit_nuts

            # NUTS evaluates a Mixture's density with its own batched kernels.
            return fit_nuts(
                model, (data,), None, init=init, seed=seed, progress=progress, **options
            )
        program, init = _mixture_as_program(model, data, init, seed)
        model, model_args, model_kwargs = program, (), None
    elif dtype is not None or device is not None:
        raise SpecError(
            "dtype and device are for pyroem.Mixture; a Pyro program computes in the "
            "dtype and on the device of its own tensors (pass the data as you want it)"
        )
    common = {"init": init, "seed": seed, "progress": progress, **options}
    if method == "vb-em":
        from pyroem.variational.svi import fit_svi

        return fit_svi(model, model_args, model_kwargs, tol=tol, max_iter=max_iter, **common)
    if method == "mcmc-em":
        from pyroem.sampling.mcmc_em import fit_mcmc_em

        return fit_mcmc_em(model, model_args, model_kwargs, tol=tol, max_iter=max_iter, **common)
    from pyroem.bayes import fit_nuts

    return fit_nuts(model, model_args, model_kwargs, **common)
