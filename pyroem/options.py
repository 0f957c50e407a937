"""Validation of fit options, shared by every method (one wording for every error)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from pyroem.engines.distributed import LOCAL, Collective
from pyroem.errors import SpecError

__all__ = [
    "OPTIONS",
    "FitSettings",
    "Option",
    "check_applicable",
    "check_integer",
    "with_defaults",
]


def check_integer(name: str, value: Any, low: int) -> int:
    """``value`` if it is an integer ``>= low`` (not a bool).

    Raises:
        SpecError: naming the option, the bound and the value given.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SpecError(f"{name} must be an integer >= {low}; got {value!r}")
    return value


def with_defaults(
    method: str, options: Mapping[str, Any], defaults: Mapping[str, Any], hint: str = ""
) -> dict[str, Any]:
    """The method's options: ``defaults`` updated with ``options``.

    Args:
        method: how the method is named in the error (``"method='nuts'"``).
        options: the options the user gave.
        defaults: every option the method knows, with its default.
        hint: a remedy appended to the error.

    Raises:
        SpecError: an option the method does not know, naming it and listing the known ones.
    """
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise SpecError(
            f"unknown options for {method}: {unknown}; the options are {sorted(defaults)}"
            + (f" ({hint})" if hint else "")
        )
    return {**defaults, **options}


class Option(NamedTuple):
    """A common option of :func:`pyroem.fit`: its default, where it applies (method →
    ``"any"`` model, ``"Mixture"``, ``"program"``, or ``"Mixture (CAVI)"``: a Mixture
    under vb-em without a guide), and what to use where it does not."""

    default: Any
    applies: Mapping[str, str]
    otherwise: str


_EM = {"map-em": "any", "vb-em": "any", "mcmc-em": "any"}
_ALL = {**_EM, "nuts": "any"}
_MIXTURE = dict.fromkeys(_ALL, "Mixture")
_PROGRAM_M_STEP = {"map-em": "program", "mcmc-em": "any"}
_CHECKPOINTED = {"map-em": "any", "vb-em": "any", "mcmc-em": "any"}
_NO_CHECKPOINT = (
    "nuts draws its chains in one go: save its result with fit.save(path), or use "
    "method='mcmc-em' or 'vb-em' for a fit that can be resumed"
)

#: Which common option of :func:`pyroem.fit` applies to which method (the README's table).
OPTIONS: dict[str, Option] = {
    "n_init": Option(1, _EM, "for nuts use num_chains"),
    "init": Option(None, _ALL, ""),
    "tol": Option(1e-6, _EM, "nuts has no stopping rule: it draws num_samples per chain"),
    "max_iter": Option(1000, _EM, "for nuts use num_samples and warmup_steps"),
    "seed": Option(None, _ALL, ""),
    "dtype": Option(None, _MIXTURE, "a Pyro program computes in its own tensors' dtype"),
    "device": Option(None, _MIXTURE, "a Pyro program computes on its own tensors' device"),
    "chunk_size": Option(
        65536,
        {"map-em": "Mixture", "vb-em": "Mixture (CAVI)", "nuts": "Mixture"},
        "only a Mixture's own kernels are chunked",
    ),
    "progress": Option(False, _ALL, ""),
    "model_kwargs": Option(None, dict.fromkeys(_ALL, "program"), "a Mixture takes only the data"),
    "m_step": Option(
        "auto", _PROGRAM_M_STEP, "a Mixture's map-em M-step, CAVI, SVI and NUTS have none to choose"
    ),
    "gradient_steps": Option(
        50, _PROGRAM_M_STEP, "only gradient M-steps (Pyro programs, mcmc-em) take steps"
    ),
    "callback": Option(None, _EM, "nuts has no iterations; use progress=True"),
    "checkpoint": Option(None, _CHECKPOINTED, _NO_CHECKPOINT),
    "checkpoint_every": Option(10, _CHECKPOINTED, _NO_CHECKPOINT),
    "resume": Option(False, _CHECKPOINTED, _NO_CHECKPOINT),
    "accelerate": Option(
        "auto",
        {"map-em": "program"},
        "SQUAREM extrapolates map-em's parameter map on a Pyro program only",
    ),
}


def check_applicable(method: str, kind: str, given: Mapping[str, Any]) -> None:
    """Raise if an option of ``given`` set away from its default does not apply.

    Args:
        method: the method.
        kind: ``"Mixture"``, ``"Mixture (CAVI)"`` or ``"program"``.
        given: the common options as passed to :func:`pyroem.fit`.

    Raises:
        SpecError: naming the option, the method, where it applies and the alternative.
    """
    for name, value in given.items():
        option = OPTIONS[name]
        if value is option.default or (
            not isinstance(value, torch.Tensor)
            and type(value) is type(option.default)
            and value == option.default
        ):
            continue
        if name == "accelerate" and value is None:
            continue  # plain EM: what every other fit runs
        where = option.applies.get(method)
        if where == "any" or where == kind or (where == "Mixture" and kind.startswith(where)):
            continue
        places = ", ".join(
            method if model == "any" else f"{method} on a {model}"
            for method, model in option.applies.items()
        )
        model = "a Pyro program" if kind == "program" else f"a {kind}"
        raise SpecError(
            f"{name} does not apply to method={method!r} on {model}; it applies to {places}"
            + (f" ({option.otherwise})" if option.otherwise else "")
        )


@dataclass(frozen=True)
class FitSettings:
    """The common options of one :func:`pyroem.fit` call, checked, as every method reads
    them (see :func:`pyroem.fit` for each; its defaults).

    Attributes:
        dtype: the torch dtype of a ``Mixture``'s data.
        collective: the fit's collectives (:mod:`pyroem.engines.distributed`).
    """

    method: str = "map-em"
    n_init: int = 1
    init: Any = None
    tol: float = 1e-6
    max_iter: int = 1000
    seed: int | None = None
    dtype: torch.dtype = torch.float64
    device: Any = None
    chunk_size: int = 65536
    progress: bool = False
    callback: Callable[[Any], Any] | None = None
    m_step: str = "auto"
    gradient_steps: int = 50
    sample_weight: Any = None
    accelerate: str | None = "auto"
    collective: Collective = LOCAL

    def loop(self) -> dict[str, Any]:
        """The EM loop's settings, :func:`pyroem.em.run_em`'s keywords."""
        return {
            "n_init": self.n_init,
            "tol": self.tol,
            "max_iter": self.max_iter,
            "progress": self.progress,
            "callback": self.callback,
        }

    def record(self) -> dict[str, Any]:
        """What a ``Mixture`` fit's ``options`` record of these settings."""
        return {
            "n_init": self.n_init,
            "init": self.init if isinstance(self.init, str) else "params",
            "tol": self.tol,
            "max_iter": self.max_iter,
            "seed": self.seed,
            "chunk_size": self.chunk_size,
        }
