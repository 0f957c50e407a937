"""``pyroem.fit``: the single entry point, with the EM variant chosen by one flag."""

from __future__ import annotations

import math
import numbers
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np
import torch

from pyroem.em import EStepResult, Iteration, MStepResult, run_em
from pyroem.engines.bayes import fit_nuts
from pyroem.engines.cavi import CAVI_OPTIONS, fit_mixture_cavi
from pyroem.engines.distributed import LOCAL, Collective, collective
from pyroem.engines.initialization import seeded_generator, site_values
from pyroem.engines.mcmc_em import fit_mcmc_em
from pyroem.engines.program_map import fit_program
from pyroem.engines.program_start import INIT_CHOICES, raise_bad_init, resolve_start
from pyroem.engines.program_stepwise import StepwiseOptions
from pyroem.engines.streamed import LARGE_DATA_OPTIONS, fit_mixture_large
from pyroem.engines.svi import check_guide_over_ranks, fit_svi
from pyroem.errors import DataError, NotSupportedError, PyroEMError, SpecError
from pyroem.estep.enumerate import MixtureEStep, score_labels
from pyroem.fits.checkpoint import Checkpoint, checkpointing, identity_of
from pyroem.fits.core import Fit, FitResult, fit_start, mixture_fit_from_program
from pyroem.model.mixture import Mixture, as_data, fill_missing
from pyroem.mstep.mixture import MixtureEngine
from pyroem.options import OPTIONS, FitSettings, check_applicable, check_integer, with_defaults
from pyroem.sources import open_source

__all__ = ["METHODS", "SMALL_PROBLEM_WORK", "SMALL_PROGRAM_NUMEL", "fit"]

METHODS = ("map-em", "vb-em", "mcmc-em", "nuts")
_DTYPES = {"float64": torch.float64, "float32": torch.float32}
_STOP_RULES = ("parameters", "objective")


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


SMALL_PROBLEM_WORK = 2**22
"""A ``Mixture`` fit with ``N·K·D`` below this runs on one thread by default: smaller
kernels finish before more threads pay for their start and their spin-waiting."""

SMALL_PROGRAM_NUMEL = 2**22
"""A Pyro program's fit runs on one thread by default when the largest tensor (or
array) among its ``model_args`` and ``model_kwargs`` has fewer elements than this: a
program's E-step and M-step are many small tensor operations, each over at most a few
times that many elements, and a second thread only spin-waits between them (a GMM
program at 2·10⁶ data elements took 2.8× the CPU time per iteration on two threads)."""


def _thread_count(
    num_threads: Any,
    model: Any,
    model_args: tuple[Any, ...],
    model_kwargs: dict[str, Any] | None = None,
) -> int | None:
    """The threads a fit runs on: ``num_threads``, or by default one for a small
    ``Mixture`` problem (:data:`SMALL_PROBLEM_WORK`, whatever the method) or a Pyro
    program whose tensors are small (:data:`SMALL_PROGRAM_NUMEL`), else ``None``
    (torch's own setting)."""
    if num_threads is not None:
        return check_integer("num_threads", num_threads, 1)
    if not isinstance(model, Mixture):
        values = (*model_args, *(model_kwargs or {}).values())
        return 1 if _largest_numel(values) < SMALL_PROGRAM_NUMEL else None
    if len(model_args) != 1:
        return None
    if isinstance(model_args[0], str | os.PathLike | list) and not _is_numeric(model_args[0]):
        return None  # files to stream: their size is unknown here
    if callable(model_args[0]) or hasattr(model_args[0], "__next__"):
        return None  # chunk functions, loaders
    shape = getattr(model_args[0], "shape", None)
    if shape is None:
        try:
            shape = np.shape(model_args[0])
        except ValueError:  # ragged input: fit reports it
            return None
    # N·D (a single column's shape is (N,)), times K.
    return 1 if math.prod(shape) * model.num_components < SMALL_PROBLEM_WORK else None


def _largest_numel(values: Any, depth: int = 3) -> int:
    """The most elements of any tensor or array among ``values``, looking into lists,
    tuples and dict values ``depth`` levels deep (0 when there is none)."""
    largest = 0
    for value in values:
        shape = getattr(value, "shape", None)
        if isinstance(shape, tuple | torch.Size):
            largest = max(largest, math.prod(shape))
        elif depth > 0 and isinstance(value, list | tuple | dict):
            inner = value.values() if isinstance(value, dict) else value
            largest = max(largest, _largest_numel(inner, depth - 1))
    return largest


def _is_numeric(value: Any) -> bool:
    """Whether ``value`` is numbers (nested lists of them), not paths."""
    try:
        return np.asarray(value).dtype.kind in "biufc"
    except (TypeError, ValueError):
        return False


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """Run the block on ``count`` torch threads (``None``: as set), then restore the setting."""
    previous = torch.get_num_threads()
    if count is None or count == previous:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


_SEED_LIMIT = 2**32


def _check_seed(seed: Any) -> int | None:
    """``seed`` as a Python int (NumPy integers accepted), or ``None``.

    Raises:
        SpecError: not an integer, or outside ``[0, 2**32)`` (NumPy's and scikit-learn's range).
    """
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise SpecError(
            f"seed must be an integer in [0, 2**32) or None; got {seed!r} "
            f"({type(seed).__name__}); pass e.g. seed=0"
        )
    value = int(seed)
    if not 0 <= value < _SEED_LIMIT:
        raise SpecError(
            f"seed must be an integer in [0, 2**32) or None; got {value}; "
            f"reduce it, e.g. seed % 2**32"
        )
    return value


def _check_device(device: Any) -> None:
    """Raise :class:`SpecError` unless ``device`` names a CPU, or a CUDA or MPS device
    that exists on this machine."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (TypeError, RuntimeError, ValueError) as err:
        raise SpecError(
            f"device must be 'cpu', 'cuda', 'cuda:N' or 'mps' (or a torch.device); got {device!r}"
        ) from err
    if parsed.type == "cpu":
        return
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise SpecError(
                f"device={device!r} asks for a GPU, but this PyTorch "
                f"({torch.__version__}) sees no CUDA device; use device='cpu', or install a "
                "CUDA build of PyTorch on a machine with an NVIDIA GPU"
            )
        if parsed.index is not None and parsed.index >= count:
            raise SpecError(
                f"device={device!r}: there are only {count} CUDA device(s) "
                f"(cuda:0 to cuda:{count - 1})"
            )
        return
    if parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise SpecError(f"device={device!r}: MPS is not available here; use device='cpu'")
        return
    raise SpecError(
        f"device={device!r} is not supported: pyroem computes on 'cpu', 'cuda' or 'mps' "
        f"(a {parsed.type!r} tensor holds no data pyroem can fit)"
    )


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
    callback: Callable[[Iteration], Any] | None = None,
    sample_weight: Any = None,
    num_threads: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int | str = 10,
    resume: bool = False,
    distributed: bool | None = None,
    accelerate: str | None = "auto",
    **method_options: Any,
) -> Any:
    r"""Fit a model by the EM variant ``method``.

    Args:
        model: a :class:`~pyroem.Mixture`, or any Pyro program (a callable) whose
            discrete latents can be enumerated; it is run as
            ``model(*model_args, **model_kwargs)``.
        *model_args: for a ``Mixture``, the data ``(num_data, dim)`` (array-like or
            tensor), or a source read chunk by chunk (``map-em``, CAVI ``vb-em``): a
            ``.npy``, ``.csv`` or
            ``.parquet`` path, a glob or folder of them, an ``np.memmap``, a function
            returning a fresh iterator of arrays, or a torch ``DataLoader`` (see
            :mod:`pyroem.sources`); for a Pyro program, its positional arguments. NaN
            entries of in-memory data are missing values: ``map-em`` marginalises them
            (every family; see the README's "Missing data"), the other methods refuse
            them.
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
            value for ``pyro.param`` sites), or a previous fit. SVI (``vb-em``) and
            ``nuts`` on a Pyro program start by default from a short MAP-EM fit of it
            (``init="map-em"``); ``init="prior"`` starts them from a prior draw.
        tol: convergence when the objective changes by less than ``tol`` per data point
            (for a ``Mixture`` under map-em, also the parameters' extrapolated relative
            distance to their limit; see the README).
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
        callback: EM methods: called after every iteration with a
            :class:`~pyroem.em.Iteration` (restart, iteration, params, objective,
            log-likelihood, elapsed seconds), e.g. to log or save progress. Raising
            ``KeyboardInterrupt`` in it (or pressing Ctrl-C) stops the fit cleanly: the best
            state so far is returned, marked not converged.
        sample_weight: ``map-em`` and closed-form ``vb-em`` on a ``Mixture``: non-negative
            frequency weights ``(num_data,)``; row ``n`` counts ``w_n`` times in the
            sufficient statistics and in the objective (the ELBO for vb-em; integer
            weights give the fit on repeated rows). The
            initialisation (k-means++ etc.) does not use them; ``fit.log_likelihood()``
            stays the unweighted sum over rows.
        num_threads: torch threads for the fit, set on entry and restored on return
            (torch's setting is otherwise untouched). Default: one thread for a
            ``Mixture`` whose ``N·K·D`` is below :data:`SMALL_PROBLEM_WORK`, with any
            method, and for a Pyro program whose largest tensor among ``model_args`` and
            ``model_kwargs`` has fewer than :data:`SMALL_PROGRAM_NUMEL` elements (more
            threads only spin-wait there; tensors the program reads from elsewhere are
            not counted), otherwise torch's current setting.
        checkpoint: EM methods: a file to write the loop's state to (atomically: a
            temporary file in the same folder, then renamed), every ``checkpoint_every``
            iterations, when a restart stops and on Ctrl-C; see :mod:`pyroem.fits.checkpoint`.
        checkpoint_every: an integer (iterations, default 10) or seconds as a string,
            e.g. ``"30s"``.
        resume: continue from ``checkpoint`` if that file exists (else start afresh): the
            result equals the uninterrupted fit's, bit for bit (seeded fits). A
            checkpoint of another model, data, method or options is refused with a
            :class:`~pyroem.errors.FitFileError` naming what differs.
        distributed: split the fit over the ranks of a ``torch.distributed`` process
            group (:mod:`pyroem.engines.distributed`): ``None`` (default) when this process is in
            an initialised group of several ranks, ``True`` also joins the group a
            launcher (``torchrun``) set up, ``False`` never. Every rank passes the same
            data (array, file, glob, memmap) and reads its shard; every rank returns the
            same fit, equal to the single-process one (with gradient M-steps, to the
            round-off L-BFGS's end point carries, about 1e-9). map-em (batch) and vb-em
            (CAVI) on a ``Mixture``, and mcmc-em on one in memory; map-em on a Pyro
            program, each rank passing its own shard of the data: closed-form M-steps sum
            their statistics over the ranks, gradient M-steps (ECME, Q's L-BFGS steps,
            ``pyro.module`` weights) their values and gradients, SQUAREM (``accelerate=``)
            scores its points on every rank; vb-em (SVI, ``guide="delta"``) on a Pyro
            program, each rank's ELBO covering its shard and the global terms counted
            once, ELBO and gradients summed; mcmc-em on a Pyro program whose one latent
            is a discrete site per data point and whose parameters all have closed forms
            (each rank drawing its shard's, see :mod:`pyroem.engines.mcmc_em`).
        accelerate: ``map-em`` on a Pyro program: ``"squarem"`` extrapolates the EM map
            (SQUAREM, with a safeguard that keeps the objective monotone; see
            :mod:`pyroem.engines.squarem`); ``"auto"`` (default): on a program with
            gradient M-steps, plain EM until it slows down (a gain more than half the
            one before), SQUAREM from then on, and plain EM on other programs, with a
            checkpoint, and under stepwise EM; ``None``: plain EM.
        **method_options: options of each method (see the README's section on each);
            an option the method does not know is an error. map-em on a ``Mixture``:
            ``stop_rule`` — ``"parameters"`` (default: the objective rule and the
            parameters within ``tol`` of their extrapolated limit) or ``"objective"``;
            ``stepwise=True`` (stepwise EM, with ``batch_size``, ``kappa``, ``passes``,
            ``shuffle``; see :mod:`pyroem.engines.stepwise`; under ``vb-em`` on a ``Mixture``,
            stochastic VI) and, for a source, ``reservoir_size`` (rows of the sample
            that initialises it). map-em on a Pyro program: ``space`` and
            ``stepwise=True`` with ``kappa``, ``passes``, ``shuffle`` and ``batch_size``
            (default: the subsample size of the program's subsampling plate), for a
            program whose plate over the data subsamples
            (``pyro.plate(name, N, subsample_size=b)``), or, given ``batch_size``, whose
            plate over the data indexes the data by its indices, and whose parameters
            all have closed forms: the E-step on each subsample, scaled ``N/b`` by the plate, and
            running averages of the closed forms' data sums (see
            :mod:`pyroem.engines.program_stepwise`). Batch map-em refuses a subsampling
            plate with :class:`~pyroem.errors.NotSupportedError`.

    Returns:
        A :class:`~pyroem.fits.core.FitResult` for a ``Mixture``, a
        :class:`~pyroem.ProgramFit` for a Pyro program.

    The MAP-EM objective is the log joint of the Pyro program ``model.model(data)``:

    .. math:: \log p(x, θ) = \sum_n \log \sum_k π_k\, p(x_n | θ_k) + \log p(π) + \log p(θ)

    and it never decreases from one iteration to the next, except at an iteration that
    removes a collapsed component (``fit.removed_components``): that changes the model.
    """
    given = {name: value for name, value in locals().items() if name in OPTIONS}
    torch_dtype = _check_options(method, n_init, tol, max_iter, chunk_size, dtype)
    seed = _check_seed(seed)
    _check_device(device)
    kind = "program"
    if isinstance(model, Mixture):
        cavi = method == "vb-em" and "guide" not in method_options
        kind = "Mixture (CAVI)" if cavi else "Mixture"
    check_applicable(method, kind, {**given, "model_kwargs": model_kwargs or None})
    large = sorted(key for key in LARGE_DATA_OPTIONS if key in method_options)
    switch = method_options.get("stepwise")
    stepwise_program = method == "map-em" and (
        (switch is True and "reservoir_size" not in large)
        or (switch is False and large == ["stepwise"])
    )
    if kind == "program" and large and not stepwise_program:
        raise NotSupportedError(
            f"{large}: on a Pyro program, stepwise EM is map-em with stepwise=True (and "
            "batch_size, kappa, passes, shuffle) over the plate of its data points; streamed "
            "sources and the other methods' stepwise forms are written for a "
            "pyroem.Mixture: pass method='map-em', stepwise=True, or leave out these "
            "options, or declare the model as a pyroem.Mixture"
        )
    weighable = kind == "Mixture (CAVI)" or (kind == "Mixture" and method == "map-em")
    if sample_weight is not None and not weighable:
        raise NotSupportedError(
            f"sample_weight is supported by method='map-em' and closed-form 'vb-em' (no "
            f"guide) on a pyroem.Mixture; got method={method!r} on {type(model).__name__}. "
            "Repeat rows instead"
        )
    group = _collective(distributed, method, kind, method_options, device)
    seed = group.broadcast_seed(seed)
    if checkpoint is not None and group is not LOCAL:
        raise NotSupportedError(
            "checkpoint= is written by one process, and this fit is split over "
            f"{group.world_size} torch.distributed ranks: pass distributed=False, or leave "
            "out checkpoint"
        )
    if checkpoint is not None and accelerate == "auto":
        accelerate = None  # a checkpointed fit is plain EM
    if checkpoint is not None and accelerate is not None:
        raise SpecError(
            "checkpoint= is not written for accelerated fits: pass accelerate=None to "
            "checkpoint, or leave out checkpoint to accelerate"
        )
    saver = _checkpoint(
        checkpoint,
        checkpoint_every,
        resume,
        model,
        model_args,
        model_kwargs,
        {
            "method": method,
            "n_init": n_init,
            "seed": seed,
            "dtype": dtype,
            "device": device,
            "init": init,
            "chunk_size": chunk_size,
            "m_step": m_step,
            "gradient_steps": gradient_steps,
            "sample_weight": sample_weight,
            **method_options,
        },
    )
    settings = FitSettings(
        method=method,
        n_init=n_init,
        init=init,
        tol=tol,
        max_iter=max_iter,
        seed=seed,
        dtype=torch_dtype,
        device=device,
        chunk_size=chunk_size,
        progress=progress,
        callback=callback,
        m_step=m_step,
        gradient_steps=gradient_steps,
        sample_weight=sample_weight,
        accelerate=accelerate,
        collective=group,
    )
    threads = _thread_count(num_threads, model, model_args, model_kwargs)
    with _threads(threads), checkpointing(saver):
        return _fit_checked(model, model_args, model_kwargs, kind, settings, method_options)


def _checkpoint(
    path: Any,
    every: Any,
    resume: Any,
    model: Any,
    model_args: tuple[Any, ...],
    model_kwargs: dict[str, Any] | None,
    options: dict[str, Any],
) -> Checkpoint | None:
    """The fit's :class:`~pyroem.fits.checkpoint.Checkpoint` (``None`` without ``checkpoint``),
    naming the model, data and options a checkpoint must have been written for."""
    if not isinstance(resume, bool):
        raise SpecError(f"resume must be True or False; got {resume!r}")
    if path is None:
        if resume:
            raise SpecError("resume=True needs checkpoint=PATH, the file to resume from")
        if every != 10:
            raise SpecError("checkpoint_every needs checkpoint=PATH, the file to write")
        return None
    if not isinstance(path, str | os.PathLike):
        raise SpecError(f"checkpoint must be a file path; got {path!r}")
    described = repr(model) if isinstance(model, Mixture) else _name_of(model)
    identity = {
        "model": described,
        "data": "; ".join(identity_of(arg) for arg in model_args),
        "model_kwargs": "; ".join(
            f"{key}={identity_of(value)}" for key, value in sorted((model_kwargs or {}).items())
        ),
    }
    for key, value in options.items():
        if key == "init" and hasattr(value, "params"):
            value = type(value).__qualname__
        identity[key] = _name_of(value) if callable(value) else identity_of(value)
    return Checkpoint(path, every, resume, identity)


def _name_of(value: Any) -> str:
    """A callable's module and qualified name (its identity in a checkpoint)."""
    module = getattr(value, "__module__", None) or type(value).__module__
    return f"{module}.{getattr(value, '__qualname__', type(value).__qualname__)}"


def _collective(
    distributed: Any, method: str, kind: str, options: dict[str, Any], device: Any
) -> Collective:
    """The collectives of the fit (:func:`pyroem.engines.distributed.collective`).

    Raises:
        NotSupportedError: a process group of several ranks for a fit that cannot be
            split over them.
    """
    group = collective(distributed, device)
    if group is LOCAL:
        return group
    split = (
        ("map-em", "Mixture"),
        ("vb-em", "Mixture (CAVI)"),
        ("map-em", "program"),
        ("mcmc-em", "Mixture"),
        ("mcmc-em", "program"),
        ("vb-em", "program"),
    )
    supported = (method, kind) in split
    if not supported or options.get("stepwise"):
        model = "a Pyro program" if kind == "program" else f"a {kind}"
        what = "stepwise EM" if supported else f"method={method!r} on {model}"
        raise NotSupportedError(
            f"this process is one of {group.world_size} ranks of a torch.distributed process "
            f"group, but a distributed fit is written for batch map-em, vb-em (CAVI) and "
            f"mcmc-em on a pyroem.Mixture and batch map-em, vb-em (SVI) and mcmc-em on a "
            f"Pyro program, not {what}: pass distributed=False to fit in each process alone"
        )
    return group


def _fit_checked(
    model: Any,
    model_args: tuple[Any, ...],
    model_kwargs: dict[str, Any] | None,
    kind: str,
    settings: FitSettings,
    method_options: dict[str, Any],
) -> Any:
    """:func:`fit` once its options are checked and its threads set."""
    started = time.perf_counter()
    result: Any
    method, chunk_size = settings.method, settings.chunk_size
    large = _large_data(model, model_args, model_kwargs, chunk_size, method, method_options)
    if large is not None:
        if settings.sample_weight is not None:
            raise NotSupportedError(
                "sample_weight is not supported for a streamed or stepwise fit; pass the "
                "data in memory, or repeat rows"
            )
        result = fit_mixture_large(model, model_args[0], large, settings, **method_options)
    else:
        method_options = _method_options(kind, method_options, settings)
        if method != "map-em":
            result = _fit_other(model, model_args, model_kwargs, settings, method_options)
        elif kind == "program":
            stepwise = method_options["stepwise"]
            if not isinstance(stepwise, bool):
                raise SpecError(f"stepwise must be True or False; got {stepwise!r}")
            result = fit_program(
                model,
                model_args,
                model_kwargs,
                method=method,
                init=settings.init,
                seed=settings.seed,
                m_step=settings.m_step,
                gradient_steps=settings.gradient_steps,
                space=method_options["space"],
                accelerate=settings.accelerate,
                collective=settings.collective,
                stepwise=StepwiseOptions(*(method_options[key] for key in StepwiseOptions._fields))
                if stepwise
                else None,
                **settings.loop(),
            )
        else:
            result = _fit_mixture(model, model_args, settings, method_options["stop_rule"])
    result.runtime = time.perf_counter() - started
    columns = getattr(model_args[0], "columns", None) if len(model_args) == 1 else None
    if columns is not None:
        # A DataFrame's column names label the fit's dimensions (to_arviz coordinates).
        result.feature_names = tuple(str(name) for name in columns)
    if isinstance(model, Mixture) and result.kind == "program":
        # Through its Pyro program, a Mixture's fit also gets the mixture interface.
        data = as_data(model_args[0], dtype=settings.dtype, device=settings.device)
        # Under the prior the program was fitted with (mclust's for prior="default").
        used = model if method == "map-em" else model.with_proper_prior()
        try:
            result.mixture_fit = mixture_fit_from_program(used, data, result, chunk_size)
        except PyroEMError:
            # Parameters the mixture kernels refuse (e.g. a singular covariance):
            # the fit stays a program fit, and saves as one.
            result.mixture_fit = None
    return result


# map-em's options on a Pyro program, with their defaults (stepwise EM's as a Mixture's).
_PROGRAM_OPTIONS = {
    "space": "auto",
    "stepwise": False,
    "batch_size": None,
    "kappa": 0.7,
    "passes": 5,
    "shuffle": True,
}


def _method_options(kind: str, options: dict[str, Any], settings: FitSettings) -> dict[str, Any]:
    """``method_options`` with the method's defaults, and the common options its engine
    also reads."""
    method = settings.method
    if method == "map-em":
        known = {"stop_rule": "parameters"} if kind == "Mixture" else dict(_PROGRAM_OPTIONS)
        options = with_defaults("method='map-em'", options, known)
        rule = options.get("stop_rule", "parameters")
        if rule not in _STOP_RULES:
            raise SpecError(f"stop_rule must be one of {_STOP_RULES}; got {rule!r}")
    elif method == "mcmc-em":
        # MCMC-EM reuses the MAP-EM M-steps, so it takes their options too.
        options = {"m_step": settings.m_step, "gradient_steps": settings.gradient_steps, **options}
    elif method == "nuts" and kind == "Mixture":
        options = {"chunk_size": settings.chunk_size, **options}
    return options


def _large_data(
    model: Any,
    model_args: tuple[Any, ...],
    model_kwargs: dict[str, Any] | None,
    chunk_size: int,
    method: str,
    options: dict[str, Any],
) -> Any:
    """For a ``Mixture`` fitted from a chunked source (a file, a memmap, a function of
    chunks) or by stepwise EM: the source (``False`` for in-memory data); else ``None``."""
    if not isinstance(model, Mixture) or len(model_args) != 1 or model_kwargs:
        return None
    source = open_source(model_args[0], chunk_size)
    if source is None and not any(key in options for key in LARGE_DATA_OPTIONS):
        return None
    known: tuple[str, ...] = LARGE_DATA_OPTIONS
    if method == "vb-em":
        known = known + CAVI_OPTIONS
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise SpecError(
            f"unknown options for a streamed or stepwise fit: {unknown}; the options are "
            f"{sorted(known)}"
        )
    return False if source is None else source


class _MixtureEngine(MixtureEngine):
    """MAP-EM on a ``Mixture`` held in memory: the chunked exact E-step and the
    closed-form M-step."""

    estep: MixtureEStep

    def __init__(
        self,
        spec: Mixture,
        family: Any,
        data: torch.Tensor,
        settings: FitSettings,
        weights: torch.Tensor | None = None,
    ) -> None:
        # The initialisation reads the data with missing entries set to column medians.
        self.spec, self.family, self.start = spec, family, settings.init
        self.init_data = fill_missing(data)
        self.generator = seeded_generator(settings.seed)
        # Every rank initialises from the whole data; its E-step reads its rows.
        group = self.collective = settings.collective
        rows = group.rows(data.shape[0])
        shard_weights = None if weights is None else weights[rows]
        self.estep = MixtureEStep(
            family, spec.weights_prior, data[rows], settings.chunk_size, shard_weights
        )
        self.name = settings.method
        # Weights are frequencies: the tolerance is per weighted row.
        self.num_data = data.shape[0] if weights is None else float(weights.sum())
        # An E-step likely to be the run's last keeps each row's log-likelihood and
        # label for the result (one rank holds its own rows only: none kept there).
        self.max_iter, self.tol, self.keeps = settings.max_iter, settings.tol, group is LOCAL
        self.keep_next = False
        self.objectives: list[float] = []
        self.changes: list[float] = []

    def init(self, restart: int) -> MStepResult:
        self.objectives, self.changes = [], []
        self.keep_next = self.max_iter <= 0
        return super().init(restart)

    def e_step(self, params: Any) -> EStepResult:
        if not self.keeps:
            return super().e_step(params)
        result = self.collective.reduce(self.estep(params, keep=self.keep_next))
        self.objectives.append(result.objective)
        return result

    def m_step(self, stats: Any, params: Any, iteration: int) -> MStepResult:
        step = super().m_step(stats, params, iteration)
        self.changes.append(step.info["change"])
        self.keep_next = iteration >= self.max_iter or self._converges_next()
        return step

    def _converges_next(self) -> bool:
        """Whether the next E-step's objective is predicted to stop the run: the last
        objective change times EM's linear rate (the ratio of the last two changes),
        with this step's parameter change, under :meth:`converged`'s own rule."""
        objectives = self.objectives[-3:]
        if len(objectives) < 3:
            return False
        before, last = objectives[1] - objectives[0], objectives[2] - objectives[1]
        rate = min(abs(last / before), 1.0) if before != 0 else 1.0
        predicted = [*objectives, objectives[2] + rate * last]
        info = [{"change": change} for change in self.changes[-2:]]
        return len(info) == 2 and self.converged(predicted, info, self.tol)


def _fit_mixture(
    model: Mixture, model_args: tuple[Any, ...], settings: FitSettings, stop_rule: str
) -> FitResult:
    """MAP-EM on a ``Mixture`` by its fast tensor kernels."""
    init = "kmeans++" if settings.init is None else settings.init
    if len(model_args) != 1:
        raise SpecError(
            f"fit(Mixture, data) takes exactly one data argument; got {len(model_args)}"
        )
    data = as_data(model_args[0], dtype=settings.dtype, device=settings.device, allow_missing=True)
    family = model.bind(data)
    init = fit_start(init)
    n_init = 1 if isinstance(init, dict) else settings.n_init
    settings = replace(settings, init=init, n_init=n_init)
    weights = settings.sample_weight
    weights = None if weights is None else _check_sample_weight(weights, data)
    engine = _MixtureEngine(model, family, data, settings, weights)
    engine.parameter_rule = stop_rule == "parameters"
    result = run_em(engine, **settings.loop())
    best = result.best
    kept = engine.estep.kept
    if kept is not None and kept.params is best.params:
        pointwise, labels = kept.pointwise, kept.labels
    else:
        pointwise, labels = score_labels(family, best.params, data, settings.chunk_size)
    options = {
        **settings.record(),
        "stop_rule": stop_rule,
        **result.record(),
        **settings.collective.record(),
    }
    return FitResult(
        spec=model,
        family=family,
        method=settings.method,
        internal=best.params,
        pointwise_log_likelihood=pointwise,
        labels=labels,
        objective=best.last.objective,
        **result.fit_fields(),
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
    init = fit_start(init)
    values = site_values(spec, spec.bind(data), data, init, seed)
    return spec.model(data, params=values), values


def _fit_other(
    model: Any,
    model_args: tuple[Any, ...],
    model_kwargs: dict[str, Any] | None,
    settings: FitSettings,
    options: dict[str, Any],
) -> Any:
    """Every method but ``map-em``: CAVI for a ``Mixture`` under ``vb-em`` (unless a
    guide is asked for); otherwise the engine runs on the Pyro program (for a
    ``Mixture``, ``spec.model(data)``, started from the ``Mixture``'s initialisation;
    a Pyro program under SVI or NUTS starts from a short MAP-EM fit unless ``init``
    says otherwise, see :mod:`pyroem.engines.program_start`)."""
    method, init, seed = settings.method, settings.init, settings.seed
    n_init = settings.n_init
    is_program = not isinstance(model, Mixture)
    if isinstance(model, Mixture):
        # These methods need a proper posterior: prior="default" means mclust's there.
        model = model.with_proper_prior()
        if len(model_args) != 1:
            raise SpecError(
                f"fit(Mixture, data) takes exactly one data argument; got {len(model_args)}"
            )
        data = as_data(model_args[0], dtype=settings.dtype, device=settings.device)
        if method == "vb-em" and "guide" not in options:
            weights = settings.sample_weight
            return fit_mixture_cavi(
                model,
                data,
                replace(settings, init="kmeans++" if init is None else init),
                sample_weight=None if weights is None else _check_sample_weight(weights, data),
                **options,
            )
        if method == "nuts":
            # NUTS evaluates a Mixture's density with its own batched kernels.
            return fit_nuts(
                model, (data,), None, init=init, seed=seed, progress=settings.progress, **options
            )
        program, values = _mixture_as_program(model, data, init, seed)
        if n_init > 1 and not isinstance(init, dict | Fit):
            # Each restart from the Mixture's own initialisation, seeded per restart.
            init = partial(site_values, model, model.bind(data), data, init)
        else:
            init = values
        model, model_args, model_kwargs = program, (), None
        if method == "mcmc-em" and settings.collective is not LOCAL:
            # The program of the whole data (its default prior is the whole data's) and
            # its start, run by each rank on its own rows.
            model_args = (data[settings.collective.rows(data.shape[0])],)
    start = None
    if method in ("vb-em", "nuts") and is_program:
        # A Pyro program: a short MAP-EM fit is the start unless init says otherwise.
        if method == "vb-em":
            # Refused guides before the start's MAP-EM fit is spent on them.
            check_guide_over_ranks(options.get("guide", "normal"), settings.collective)
        if not callable(options.get("guide")):
            group = settings.collective if method == "vb-em" else LOCAL
            init, start = resolve_start(model, model_args, model_kwargs, init, seed, group)
        elif init is None or isinstance(init, str):
            # A guide function starts from its own pyro.param values: nothing to compute.
            if init is not None and init not in INIT_CHOICES:
                raise_bad_init(init)
            init, start = None, "guide"
    common: dict[str, Any] = {"init": init, "seed": seed, **options}
    result: Any
    if method == "vb-em":
        result = fit_svi(
            model,
            model_args,
            model_kwargs,
            **settings.loop(),
            collective=settings.collective,
            **common,
        )
    elif method == "mcmc-em":
        return fit_mcmc_em(
            model,
            model_args,
            model_kwargs,
            **settings.loop(),
            collective=settings.collective,
            **common,
        )
    else:
        result = fit_nuts(model, model_args, model_kwargs, progress=settings.progress, **common)
    if start is not None:
        result.options["init"] = start
    return result
