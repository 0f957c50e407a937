"""Choosing the number of mixture components.

Each candidate ``K`` is fitted with the same spec, data and options, then scored:

- ``"bic"``: :math:`-2 \\log p(x | \\hat θ) + p \\log N` (lower is better), the
  classical choice for EM fits (Fraley & Raftery);
- ``"aic"``: :math:`-2 \\log p(x | \\hat θ) + 2p`;
- ``"loo"``: Pareto-smoothed importance-sampling leave-one-out expected log
  predictive density (higher is better), computed by ArviZ from the pointwise
  log-likelihood with ``z`` summed out. It needs posterior draws, so it applies to
  ``method="nuts"`` and ``method="vb-em"`` fits. The choice follows the one-standard-
  error rule: the fewest components whose ``elpd_loo`` is within one standard error
  of the difference (ArviZ's ``dse``) of the best; a gain inside its own noise does
  not buy extra components.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import pandas as pd

from pyroem.api import fit
from pyroem.diagnostics import loo_table
from pyroem.errors import SpecError
from pyroem.model.mixture import Mixture
from pyroem.outputs.component_counts import CRITERIA, parse_components

__all__ = ["CRITERIA", "ComponentChoice", "choose_components", "parse_components"]


class ComponentChoice(NamedTuple):
    """The outcome of :func:`choose_components`.

    Attributes:
        best: the chosen number of components.
        table: one row per ``K`` (index ``num_components``): ``log_likelihood``,
            ``num_parameters``, ``bic``, ``aic`` and, for ``criterion="loo"``,
            ``elpd_loo``, ``se``, ``elpd_diff`` (below the best) and ``dse`` (the
            standard error of that difference); the chosen row is marked in ``chosen``.
        fits: the fit of every ``K``.
        criterion: the criterion used.
        rule: how ``best`` was chosen, in words.
    """

    best: int
    table: pd.DataFrame
    fits: dict[int, Any]
    criterion: str
    rule: str


def choose_components(
    spec: Mixture,
    data: Any,
    components: Iterable[int] = range(1, 7),
    *,
    criterion: str = "bic",
    method: str = "map-em",
    **fit_options: Any,
) -> ComponentChoice:
    """Fit ``spec`` with each number of components and pick one by ``criterion``.

    Args:
        spec: the mixture; its ``num_components`` is replaced by each candidate.
        data: the data ``(num_data, dim)``.
        components: the candidate numbers of components.
        criterion: ``"bic"`` or ``"aic"`` (lowest wins) or ``"loo"`` (the fewest
            components within one standard error of the highest ``elpd_loo``; needs a
            method with posterior draws).
        method: the EM variant every candidate is fitted with.
        **fit_options: passed to :func:`pyroem.fit` (``n_init``, ``seed``, …).

    Returns:
        A :class:`ComponentChoice`.

    Raises:
        SpecError: an unknown criterion, no candidates, a per-component
            ``weights_prior`` (it cannot carry over to another ``K``), or ``"loo"``
            with a method that has no posterior draws.
    """
    if criterion not in CRITERIA:
        raise SpecError(f"criterion must be one of {CRITERIA}; got {criterion!r}")
    candidates = sorted(set(components))
    if not candidates:
        raise SpecError("components is empty; give at least one number of components")
    if criterion == "loo" and method not in ("nuts", "vb-em"):
        raise SpecError(
            f"criterion='loo' needs posterior draws, which method={method!r} does not give; "
            "use method='nuts' or method='vb-em', or criterion='bic'"
        )
    alpha = spec.weights_prior
    if not bool((alpha == alpha[0]).all()):
        raise SpecError(
            "weights_prior differs between components, so it cannot carry over to another "
            "number of components; give a scalar weights_prior"
        )
    config = spec.to_config()
    fits = {}
    for num in candidates:
        candidate = Mixture.from_config(
            {**config, "num_components": num, "weights_prior": float(alpha[0])}
        )
        fits[num] = fit(candidate, data, method=method, **fit_options)
    table = pd.DataFrame(
        {
            "log_likelihood": [fits[k].log_likelihood() for k in candidates],
            "num_parameters": [fits[k].num_parameters for k in candidates],
            "bic": [fits[k].bic() for k in candidates],
            "aic": [fits[k].aic() for k in candidates],
        },
        index=pd.Index(candidates, name="num_components"),
    )
    if criterion == "loo":
        loo = loo_table({k: fits[k] for k in candidates})
        for column in ("elpd_loo", "se", "elpd_diff", "dse"):
            table[column] = loo[column]
        within = table.index[table["elpd_diff"] <= table["dse"]]
        best = int(min(within))
        top = int(table["elpd_loo"].idxmax())
        rule = (
            "the fewest components whose elpd_loo is within one standard error (dse) of "
            f"the best (K={top})"
        )
    else:
        best = int(table[criterion].idxmin())
        rule = f"the lowest {criterion.upper()}"
    table["chosen"] = table.index == best
    return ComponentChoice(best, table, fits, criterion, rule)
