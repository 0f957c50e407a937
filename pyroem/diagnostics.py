"""Everything pyroem does through ArviZ lives in this module.

ArviZ 0.x (``InferenceData``) is what Python 3.11 gets; keeping every ArviZ call
here makes a move to ArviZ 1.x (xarray ``DataTree``) a change to one file.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = ["ChainDiagnostics", "chain_diagnostics", "chain_problems"]


def _arviz() -> Any:
    """ArviZ, imported on first use (its import announces a refactor with a FutureWarning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


class ChainDiagnostics(NamedTuple):
    """Convergence diagnostics of a set of chains (worst value over every variable).

    Attributes:
        max_rhat: largest rank-normalised split R-hat.
        min_ess_bulk: smallest bulk effective sample size.
        min_ess_tail: smallest tail effective sample size.
        num_divergences: divergent transitions (NUTS), summed over chains.
        num_chains: chains.
        num_draws: draws per chain.
    """

    max_rhat: float
    min_ess_bulk: float
    min_ess_tail: float
    num_divergences: int
    num_chains: int
    num_draws: int


def chain_diagnostics(draws: Mapping[str, Any], divergences: Any = None) -> ChainDiagnostics:
    """R-hat, bulk and tail ESS (computed by ArviZ) and divergences of chains.

    Args:
        draws: variable name → draws ``(num_chains, num_draws, *shape)`` (tensor or array).
        divergences: optional divergence flags ``(num_chains, num_draws)``.

    Returns:
        The worst value of each diagnostic over every variable and element.
    """
    arviz = _arviz()
    arrays = {name: _as_numpy(value) for name, value in draws.items()}
    num_chains, num_draws = next(iter(arrays.values())).shape[:2]
    dataset = arviz.convert_to_dataset(arrays)
    with warnings.catch_warnings():
        # ArviZ warns about shapes it cannot judge (e.g. one chain); the numbers still come back.
        warnings.simplefilter("ignore")
        rhat = arviz.rhat(dataset)
        bulk = arviz.ess(dataset, method="bulk")
        tail = arviz.ess(dataset, method="tail")

    def worst(result: Any, pick: Any) -> float:
        values = np.concatenate([np.ravel(result[name].values) for name in arrays])
        values = values[np.isfinite(values)]
        return float(pick(values)) if values.size else float("nan")

    return ChainDiagnostics(
        max_rhat=worst(rhat, np.max),
        min_ess_bulk=worst(bulk, np.min),
        min_ess_tail=worst(tail, np.min),
        num_divergences=0 if divergences is None else int(_as_numpy(divergences).sum()),
        num_chains=int(num_chains),
        num_draws=int(num_draws),
    )


def chain_problems(
    diagnostics: ChainDiagnostics, *, max_rhat: float = 1.01, min_ess: float = 100.0
) -> list[str]:
    """What is wrong with the chains, in words (empty when nothing is).

    Thresholds follow Vehtari et al. (2021): R-hat below 1.01, and bulk and tail ESS
    of at least 100 (the caller scales ``min_ess`` with the number of chains if it
    wants the paper's 100 per chain).
    """
    problems = []
    if not diagnostics.max_rhat < max_rhat:
        problems.append(f"R-hat {diagnostics.max_rhat:.3f} (should be < {max_rhat})")
    for kind, value in (("bulk", diagnostics.min_ess_bulk), ("tail", diagnostics.min_ess_tail)):
        if not value >= min_ess:
            problems.append(f"{kind} ESS {value:.0f} (should be >= {min_ess:.0f})")
    if diagnostics.num_divergences:
        problems.append(f"{diagnostics.num_divergences} divergent transitions")
    return problems
