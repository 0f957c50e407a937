"""The default start of SVI (``vb-em``) and NUTS on a Pyro program: a short MAP-EM fit.

A prior draw can sit far from the data (a ``Normal(0, 10)`` location for data in
``[1.6, 5.1]``), and SVI or NUTS started there may stay in a poor mode. Without
``init``, these methods start where pyroem's own MAP-EM on the same program ends:
:data:`START_RESTARTS` restarts from prior draws (seeded from the fit's seed), each at
most :data:`START_MAX_ITER` iterations, the best log joint kept. A program MAP-EM cannot
fit (a continuous latent local to the data, a discrete latent with infinite support)
starts from a prior draw, as with ``init="prior"``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from pyroem.engines.distributed import LOCAL, Collective
from pyroem.engines.program_map import fit_program
from pyroem.errors import ConvergenceWarning, PyroEMError, SpecError
from pyroem.fits.checkpoint import checkpointing

__all__ = [
    "INIT_CHOICES",
    "START_MAX_ITER",
    "START_RESTARTS",
    "START_TOL",
    "raise_bad_init",
    "resolve_start",
]

START_RESTARTS = 20
"""MAP-EM restarts of the default start (each from a prior draw)."""

START_MAX_ITER = 200
"""Most MAP-EM iterations per restart of the default start."""

START_TOL = 1e-5
"""MAP-EM tolerance (objective change per data point) of the default start."""

INIT_CHOICES = ("map-em", "prior")
"""The named starts of SVI and NUTS on a Pyro program."""


def resolve_start(
    model: Callable[..., Any],
    model_args: tuple[Any, ...],
    model_kwargs: Mapping[str, Any] | None,
    init: Any,
    seed: int | None,
    collective: Collective = LOCAL,
) -> tuple[Any, str]:
    """The ``init`` SVI or NUTS runs with, and how it was chosen.

    Args:
        model, model_args, model_kwargs: the Pyro program and its arguments.
        init: ``None`` or ``"map-em"`` (the default start), ``"prior"`` (a prior draw),
            or anything else a program takes as ``init`` (returned as it is).
        seed: seeds the MAP-EM restarts.
        collective: the ranks of a distributed fit (the MAP-EM start is split over them
            too); one process by default.

    Returns:
        ``(init, record)``: ``init`` as a function of the seed returning the site values
        (or ``None`` for a prior draw, or the user's own), and ``"map-em"``,
        ``"prior"``, ``"prior (map-em: …)"`` (MAP-EM could not fit the program; the
        reason) or ``"params"``.
    """
    if isinstance(init, str):
        if init not in INIT_CHOICES:
            raise_bad_init(init)
        if init == "prior":
            return None, "prior"
    elif init is not None:
        return init, "params"
    try:
        # The start's own EM loop neither writes nor resumes the fit's checkpoint.
        with warnings.catch_warnings(), torch.random.fork_rng(), checkpointing(None):
            warnings.simplefilter("ignore", ConvergenceWarning)
            start = fit_program(
                model,
                model_args,
                model_kwargs,
                method="map-em",
                init=None,
                n_init=START_RESTARTS,
                seed=seed,
                tol=START_TOL,
                max_iter=START_MAX_ITER,
                progress=False,
                m_step="auto",
                gradient_steps=50,
                collective=collective,
            )
    except PyroEMError as err:
        return None, f"prior (map-em: {str(err).splitlines()[0]})"
    values = {name: value.detach().clone() for name, value in start.params.items()}
    # A function of the seed, so that n_init restarts of SVI still run (each from this
    # start, with its own seed).
    return lambda _seed: values, "map-em"


def raise_bad_init(init: str) -> None:
    """Raise the error for an unknown named start."""
    raise SpecError(
        f"init={init!r} is not a start of a Pyro program; use init='map-em' (default: a "
        "short MAP-EM fit), init='prior' (a prior draw), a dict {site: value}, or a "
        "previous fit"
    )
