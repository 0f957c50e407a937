"""Reading a saved fit of any kind back (:func:`pyroem.load`), without pickle."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pyroem.em import History
from pyroem.engines.bayes import BayesFit
from pyroem.engines.cavi import restore_variational_fit
from pyroem.engines.mcmc_em import MCMCEMFit
from pyroem.engines.svi import SVIFit
from pyroem.errors import FitFileError, PyroEMError
from pyroem.fits.archive import FORMAT_VERSION, MIXTURE_FORMAT, PROGRAM_FORMAT, read_arrays
from pyroem.fits.core import Fit, FitResult
from pyroem.fits.program import ProgramFit
from pyroem.model.mixture import Mixture, MixtureParams

__all__ = ["load"]


def load(
    path: str | os.PathLike[str],
    model: Callable[..., Any] | None = None,
    *model_args: Any,
    model_kwargs: dict[str, Any] | None = None,
) -> Fit:
    """Read a fit written by ``fit.save`` (never unpickles).

    The whole archive is checked before anything is built: every array present,
    of the saved dtype and of the shape the metadata implies (sizes bounded by the
    bytes actually stored), finite, and the parameters inside their supports.

    Args:
        path: the ``.npz`` file.
        model: for the fit of a Pyro program, the program (code is not saved), run as
            ``model(*model_args, **model_kwargs)``; unused for a ``Mixture``.

    Returns:
        A :class:`~pyroem.fits.core.Fit` of the class that was saved: a :class:`FitResult`
        for a ``Mixture`` fitted by any method (a :class:`~pyroem.VariationalFit` for
        CAVI); for a Pyro program a :class:`~pyroem.ProgramFit`,
        :class:`~pyroem.SVIFit`, :class:`~pyroem.MCMCEMFit` or :class:`~pyroem.BayesFit`
        (what cannot be saved, such as an SVI fit's guide, raises an error on use).

    Raises:
        FitFileError: the file is missing, not a pyroem fit, damaged or inconsistent;
            the message names what is wrong.
    """
    where = os.fspath(path)
    arrays = read_arrays(where)
    meta = _read_meta(arrays, where)
    restore = _KINDS[meta["format"]][1]
    if meta["format"] == PROGRAM_FORMAT and model is None:
        raise FitFileError(
            f"{where!r} holds a fit of the Pyro program {meta['program']}; its code is not "
            f"saved: pass it, pyroem.load(path, {meta['program']}, *model_args)"
        )
    try:
        common = _common_fields(arrays, meta)
        result = restore(arrays, meta, common, model, model_args, model_kwargs)
    except FitFileError as err:
        raise FitFileError(f"{where!r} is not a valid pyroem fit: {err}") from None
    result.runtime = float(meta["runtime"])
    return result


def _common_fields(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> dict[str, Any]:
    """The :class:`~pyroem.fits.core.Fit` fields every kind of fit saves, checked."""
    history = [
        _array(arrays, f"history/{name}", np.float64, ndim=1, finite=False)
        for name in History._fields
    ]
    if len({len(entry) for entry in history}) != 1:
        raise FitFileError("its history arrays differ in length")
    restarts = _array(arrays, "restart_objectives", np.float64, ndim=1, finite=False)
    draws = {
        key.removeprefix("draws/"): torch.from_numpy(_array(arrays, key, arrays[key].dtype))
        for key in arrays
        if key.startswith("draws/")
    }
    return dict(
        method=meta["method"],
        history=History(*history),
        converged=meta["converged"],
        num_iterations=meta["num_iterations"],
        restart_objectives=restarts.tolist(),
        options=meta["options"],
        draws=draws or None,
        sample_stats={
            key.removeprefix("sample_stats/"): arrays[key]
            for key in arrays
            if key.startswith("sample_stats/")
        },
    )


def _read_meta(arrays: dict[str, np.ndarray], where: str) -> dict[str, Any]:
    """The metadata, checked for every key :func:`load` reads and its type."""
    if "meta" not in arrays:
        raise FitFileError(f"{where!r} is not a pyroem fit (no metadata)")
    try:
        meta = json.loads(str(arrays["meta"]))
    except ValueError as err:
        raise FitFileError(f"cannot read a pyroem fit from {where!r}: {err}") from err
    if not isinstance(meta, dict) or str(meta.get("format")) not in _KINDS:
        raise FitFileError(f"{where!r} is not a pyroem fit")
    expected = _KINDS[meta["format"]][0]
    for key, kind in expected.items():
        value = meta.get(key)
        numeric = kind is float and isinstance(value, int | float) and not isinstance(value, bool)
        if not (numeric or (isinstance(value, kind) and not (kind is int and value is True))):
            raise FitFileError(
                f"{where!r} is not a valid pyroem fit: metadata {key!r} should be a "
                f"{kind.__name__}; got {value!r}"
            )
    if meta["version"] != FORMAT_VERSION:
        raise FitFileError(
            f"{where!r} was written in pyroem fit format {meta['version']}; this version "
            f"reads format {FORMAT_VERSION}"
        )
    if meta.get("dtype", "float64") not in ("float32", "float64"):
        raise FitFileError(f"{where!r}: dtype must be float32 or float64; got {meta['dtype']!r}")
    runtime = meta.setdefault("runtime", math.nan)
    if not isinstance(runtime, int | float) and runtime is not None:
        raise FitFileError(f"{where!r}: metadata 'runtime' should be a number; got {runtime!r}")
    if runtime is None:
        meta["runtime"] = math.nan
    return meta


def _array(
    arrays: dict[str, np.ndarray],
    name: str,
    dtype: Any,
    shape: tuple[int, ...] | None = None,
    ndim: int | None = None,
    finite: bool = True,
) -> np.ndarray:
    """``arrays[name]``, checked for presence, dtype, shape and finiteness."""
    if name not in arrays:
        raise FitFileError(f"array {name!r} is missing")
    value = arrays[name]
    if value.dtype != np.dtype(dtype):
        raise FitFileError(f"array {name!r} has dtype {value.dtype}; expected {np.dtype(dtype)}")
    if shape is not None and value.shape != shape:
        raise FitFileError(f"array {name!r} has shape {value.shape}; expected {shape}")
    if ndim is not None and value.ndim != ndim:
        raise FitFileError(f"array {name!r} has {value.ndim} dimensions; expected {ndim}")
    if finite and value.dtype.kind == "f" and not np.isfinite(value).all():
        raise FitFileError(f"array {name!r} holds NaN or infinite values")
    return value


def _restore_mixture(
    arrays: dict[str, np.ndarray], meta: dict[str, Any], common: dict[str, Any], *_: Any
) -> FitResult:
    """A ``Mixture``'s :class:`FitResult` (a :class:`~pyroem.VariationalFit` for CAVI),
    each array checked against the metadata and the parameters against their supports
    before anything is built from them."""
    float_type = np.dtype(meta["dtype"])
    try:
        spec = Mixture.from_config(meta["spec"])
        family_config = meta["spec"]["family"]
    except (PyroEMError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise FitFileError(
            f"its model description is invalid ({type(err).__name__}: {err})"
        ) from err
    weights = _array(arrays, "weights", float_type, ndim=1)
    num_active = weights.shape[0]
    if not 1 <= num_active <= spec.num_components:
        raise FitFileError(
            f"it has {num_active} weights for a mixture of {spec.num_components} components"
        )
    if (weights < 0).any() or abs(float(weights.sum()) - 1) > 1e-4:
        raise FitFileError("its weights are not probabilities (non-negative, summing to 1)")
    active = _array(arrays, "active", np.int64, shape=(num_active,))
    if (
        len(set(active.tolist())) != num_active
        or not ((active >= 0) & (active < spec.num_components)).all()
    ):
        raise FitFileError(
            f"'active' must hold distinct components in 0..{spec.num_components - 1}"
        )
    names = spec.family.params_type._fields
    saved = sorted(key.removeprefix("component/") for key in arrays if key.startswith("component/"))
    if saved != sorted(names):
        raise FitFileError(
            f"the {family_config.get('family')!r} family has parameters {sorted(names)}; "
            f"the file holds {saved}"
        )
    components = {name: _array(arrays, f"component/{name}", float_type) for name in names}
    dim = meta["dim"]
    # Every family's first parameter is (K, dim, ...): the arrays present bound dim.
    first = components[names[0]]
    if first.ndim < 2 or first.shape[1] != dim:
        raise FitFileError(
            f"its {names[0]} have shape {first.shape}, which does not hold dim={dim}"
        )
    shift = None
    if "shift" in arrays:
        shift = torch.from_numpy(_array(arrays, "shift", float_type, shape=(dim,)))
    dtype = getattr(torch, meta["dtype"])
    try:
        family = spec.family.rebind(dim, shift, dtype)
        family._check_user_params(
            family.params_type(**{k: torch.from_numpy(v.copy()) for k, v in components.items()}),
            num_active,
        )
    except (PyroEMError, ValueError, RuntimeError) as err:
        raise FitFileError(f"its parameters are invalid: {err}") from None
    rows = meta.get("rows")
    pointwise = labels = None
    if isinstance(rows, dict):
        # A streamed fit's totals (it keeps no per-row values).
        try:
            common.update(
                num_data=int(rows["num_data"]), log_likelihood=float(rows["log_likelihood"])
            )
        except (KeyError, TypeError, ValueError):
            raise FitFileError(
                f"its rows record {rows!r} is not num_data and log_likelihood"
            ) from None
    else:
        pointwise = _array(arrays, "pointwise_log_likelihood", float_type, ndim=1)
        labels = _array(arrays, "labels", np.int64, shape=pointwise.shape)
        if labels.size and not ((labels >= 0) & (labels < num_active)).all():
            raise FitFileError(f"its labels must lie in 0..{num_active - 1}")
    draws = common["draws"] or {}
    params = {"weights": weights.shape, **{k: v.shape for k, v in components.items()}}
    for name, value in draws.items():
        expected = params.get(name)
        if expected is not None and tuple(value.shape[2:]) != expected:
            raise FitFileError(
                f"draws of {name!r} have shape {tuple(value.shape)}; expected "
                f"(num_chains, num_draws, *{expected})"
            )
    for key in arrays:
        if key.startswith("variational/"):
            _array(arrays, key, float_type)
        known = ("component/", "history/", "draws/", "sample_stats/", "variational/")
        if key not in _TOP_LEVEL and not key.startswith(known):
            raise FitFileError(f"it holds an unknown array {key!r}")
    internal = MixtureParams(
        torch.from_numpy(weights),
        family.params_type(**{k: torch.from_numpy(v) for k, v in components.items()}),
        torch.from_numpy(active),
    )
    fields = dict(
        spec=spec,
        family=family,
        internal=internal,
        pointwise_log_likelihood=None if pointwise is None else torch.from_numpy(pointwise),
        labels=None if labels is None else torch.from_numpy(labels),
        objective=float(meta["objective"]),
        **common,
    )
    if "variational" not in meta:
        return FitResult(**fields)
    try:
        return restore_variational_fit(arrays, meta["variational"], fields)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
        raise FitFileError(
            f"its variational factors do not fit the model ({type(err).__name__}: {err})"
        ) from err


_TOP_LEVEL = (
    "meta",
    "weights",
    "active",
    "pointwise_log_likelihood",
    "labels",
    "restart_objectives",
    "shift",
)


def _restore_program(
    arrays: dict[str, np.ndarray],
    meta: dict[str, Any],
    common: dict[str, Any],
    model: Callable[..., Any],
    model_args: tuple[Any, ...],
    model_kwargs: dict[str, Any] | None,
) -> ProgramFit:
    """The saved kind of :class:`~pyroem.ProgramFit` from its archive and the program,
    checked first (a file without its class, as older versions wrote, as a ProgramFit)."""
    kind = _PROGRAM_CLASSES.get(meta.get("class", "ProgramFit"))
    if kind is None:
        raise FitFileError(f"it holds a fit of an unknown class {meta['class']!r}")
    program = kind.rebuild_program(model, model_args, model_kwargs, meta["options"])
    saved = sorted(k.removeprefix("params/") for k in arrays if k.startswith("params/"))
    if saved != sorted(program.params):
        raise FitFileError(
            f"it holds parameters {saved}; the program given has {sorted(program.params)}"
        )
    values = {}
    for name, site in program.params.items():
        like = program.param_inits.get(name)
        dtype = like.dtype if like is not None else torch.get_default_dtype()
        value = torch.from_numpy(
            _array(arrays, f"params/{name}", np.dtype(str(dtype).removeprefix("torch.")))
        )
        if value.shape != site.shape or not bool(site.constraint.check(value).all()):
            raise FitFileError(
                f"parameter {name!r} (shape {tuple(value.shape)}) does not fit the "
                f"program's site (shape {tuple(site.shape)}, support {site.constraint})"
            )
        values[name] = value
    marginals = {
        k.removeprefix("marginals/"): torch.from_numpy(_array(arrays, k, arrays[k].dtype))
        for k in arrays
        if k.startswith("marginals/")
    }
    fields = dict(
        program=program,
        values=values,
        m_step_kinds=meta["m_step_kinds"],
        marginals=marginals,
        log_likelihood=float(meta["log_likelihood"]),
        log_joint=float(meta["log_joint"]),
        num_data=meta["num_data"],
        **common,
    )
    try:
        return kind.from_archive(arrays, meta, fields)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise FitFileError(
            f"its {kind.__name__} results are incomplete or invalid ({type(err).__name__}: {err})"
        ) from err


#: The program fits :func:`load` restores, by the class name their archive holds.
_PROGRAM_CLASSES: dict[str, type[ProgramFit]] = {
    kind.__name__: kind for kind in (ProgramFit, SVIFit, MCMCEMFit, BayesFit)
}


_COMMON_META = {
    "version": int,
    "method": str,
    "converged": bool,
    "num_iterations": int,
    "options": dict,
}
#: Each saved kind: the metadata it must hold (key → type), and how it is rebuilt.
_KINDS: dict[str, tuple[dict[str, type], Callable[..., Fit]]] = {
    MIXTURE_FORMAT: (
        {
            **_COMMON_META,
            "spec": dict,
            "dim": int,
            "dtype": str,
            "objective": float,
        },
        _restore_mixture,
    ),
    PROGRAM_FORMAT: (
        {
            **_COMMON_META,
            "program": str,
            "m_step_kinds": dict,
            "log_likelihood": float,
            "log_joint": float,
            "num_data": int,
        },
        _restore_program,
    ),
}
