"""The result of fitting a Pyro program."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from pyroem.fits.archive import PROGRAM_FORMAT
from pyroem.fits.core import Fit, FitResult, format_array
from pyroem.model.program import ProgramModel
from pyroem.model.transforms import unconstraining

__all__ = ["ProgramFit"]


class ProgramFit(Fit):
    """A Pyro program fitted by EM; everything of :class:`~pyroem.fits.core.Fit` holds,
    with:

    Attributes:
        program: the :class:`~pyroem.model.program.ProgramModel` (sites sorted; also ``model``).
        params: parameter values keyed by site name (copies).
        m_step_kinds: the M-step each parameter got: a recognised closed form
            (e.g. ``"dirichlet-categorical"``, ``"normal-mean"``,
            ``"inverse-gamma-normal-variance"``; ``"flat-…"`` for ``pyro.param`` sites,
            which have no prior) or ``"gradient"``.
        marginals: posterior marginal probabilities of every enumerated site at the
            fitted parameters, ``(*value_shape, num_values)``.
        history: :class:`~pyroem.em.History` of the kept run (objective = log joint).
        restart_objectives: final log joint of every restart.
        mixture_fit: for a ``Mixture`` fitted through its program, the same fit as a
            :class:`~pyroem.FitResult` (predictions, scores, and what ``save`` writes);
            ``None`` for any other program.
    """

    kind = "program"
    archive_format = PROGRAM_FORMAT
    #: The class the method runs the program as.
    program_type: ClassVar[type[ProgramModel]] = ProgramModel

    def __init__(
        self,
        *,
        program: ProgramModel,
        values: dict[str, torch.Tensor],
        m_step_kinds: dict[str, str],
        marginals: dict[str, torch.Tensor],
        **fit: Any,
    ) -> None:
        super().__init__(model=program, **fit)
        self.program = program
        self._values = values
        self.m_step_kinds = m_step_kinds
        self.marginals = marginals
        # Set by pyroem.fit when the program is a Mixture's.
        self.mixture_fit: FitResult | None = None

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """Fitted parameters by site name (copies; editing them does not change the fit)."""
        return {name: value.detach().clone() for name, value in self._values.items()}

    @property
    def mixture(self) -> FitResult | None:
        return self.mixture_fit

    @property
    def num_parameters(self) -> int:
        """Free parameters: the unconstrained dimension of every parameter site."""
        return sum(
            math.prod(unconstraining(name, site.constraint).forward_shape(self._values[name].shape))
            for name, site in self.program.params.items()
        )

    def _repr_fields(self) -> list[str]:
        return [
            f"model={self.program.name}",
            f"method={self.method!r}",
            f"log_joint={self._log_joint:.6g}",
        ]

    def _summary_parts(self) -> tuple[str, list[str], list[str], list[str]]:
        head = [
            f"  observations       {self.num_data}",
            f"  enumerated sites   {len(self.program.enumerated)}",
        ]
        notes = []
        if self.mixture_fit is not None:
            notes.append(f"  prior              {self.mixture_fit.family.prior_repr()}")
        width = max(len(name) for name in self._values) if self._values else 0
        params = []
        for name, value in self._values.items():
            params.append(f"  {name:<{width}}  [{self.m_step_kinds[name]}]  {format_array(value)}")
        return f"the Pyro program {self.program.name}", head, notes, params

    def _archive(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays: dict[str, np.ndarray] = {}
        for name, value in self.params.items():
            arrays[f"params/{name}"] = value.detach().cpu().numpy()
        for name, value in self.marginals.items():
            arrays[f"marginals/{name}"] = value.detach().cpu().numpy()
        meta = {
            "program": self.program.name,
            "m_step_kinds": dict(self.m_step_kinds),
            "log_likelihood": self.log_likelihood(),
            "log_joint": self.log_joint(),
            "num_data": self.num_data,
        }
        return arrays, meta

    @classmethod
    def rebuild_program(
        cls,
        model: Callable[..., Any],
        model_args: tuple[Any, ...],
        model_kwargs: Mapping[str, Any] | None,
        options: Mapping[str, Any],
    ) -> ProgramModel:
        """The program as this kind of fit saw it (:attr:`program_type`; ``options``: the
        saved fitting options), for :func:`pyroem.load`."""
        return cls.program_type(model, model_args, model_kwargs)

    @classmethod
    def from_archive(
        cls, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], fields: dict[str, Any]
    ) -> ProgramFit:
        """This kind of fit as :func:`pyroem.load` rebuilds it: ``fields`` are the checked
        ones of every program fit, ``arrays`` and ``meta`` what :meth:`_archive` wrote."""
        return cls(**fields)
