"""Hidden Markov models as plain Pyro programs, fitted by EM with pyroem.

Run it from the repository root (with pyroem installed)::

    python models/hmm.py

Each model is an ordinary Pyro program: a ``pyro.plate`` over sequences, a
``for t in pyro.markov(range(T))`` loop over time, the hidden state of every step
marked for parallel enumeration, and ``poutine.mask(mask=t < lengths)`` switching off
the padding of sequences shorter than ``T``. pyroem sums the states out exactly
(forward-backward, as a tensor contraction) and runs EM on the parameters. The script
shows:

1. a Gaussian HMM on simulated sequences of different lengths
   (:func:`gaussian_hmm`), fitted twice: with flat priors (``pyro.param`` sites,
   maximum likelihood, as hmmlearn fits it) and with conjugate priors (Dirichlet
   rows, a Normal-Inverse-Gamma prior on each state's mean and variance; MAP);
2. a Poisson HMM (:func:`poisson_hmm`) for the yearly counts of great discoveries,
   1860-1959, with Gamma priors on the rates;
3. for every fit: the parameters, which M-step each site got, the log joint, the
   number of iterations, a check that the objective never decreased, and a check
   that the program's log joint computed by Pyro's own ``TraceEnum_ELBO`` (states
   summed out, at the fitted parameters) equals ``fit.log_joint()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import TraceEnum_ELBO

import pyroem
from pyroem.datasets import load_discoveries

PRIORS = ("flat", "conjugate")
FIRST_YEAR = 1860


def observed_mask(lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """``True`` where step ``t`` of sequence ``s`` is observed, ``(num_sequences, max_length)``."""
    return torch.arange(max_length) < lengths.unsqueeze(-1)


def _as_sequences(sequences: torch.Tensor) -> torch.Tensor:
    """View ``(S, T)`` sequences as ``(S, T, 1)``; leave ``(S, T, D)`` as they are."""
    if sequences.dim() == 2:
        return sequences.unsqueeze(-1)
    if sequences.dim() == 3:
        return sequences
    raise ValueError(
        f"sequences must have shape (num_sequences, max_length) or (num_sequences, "
        f"max_length, dim), got {tuple(sequences.shape)}; pad shorter sequences to max_length"
    )


def _check_priors(priors: str) -> None:
    """Reject an unknown prior variant."""
    if priors not in PRIORS:
        raise ValueError(f"priors must be one of {PRIORS}, got {priors!r}")


def _observed_values(data: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The observed (unpadded) steps of ``(S, T, D)`` sequences, ``(num_observed, D)``."""
    return data[observed_mask(lengths, data.shape[1])]


def _initial_transitions(num_states: int, dtype: torch.dtype) -> torch.Tensor:
    """Start each row half on staying put, half spread evenly over all states."""
    return 0.5 * torch.eye(num_states, dtype=dtype) + 0.5 / num_states


def _initial_locs(values: torch.Tensor, num_states: int) -> torch.Tensor:
    """Spread the states' means over the data: the ``(k + ½)/K`` quantiles, ``(K, D)``."""
    levels = (torch.arange(num_states, dtype=values.dtype) + 0.5) / num_states
    return torch.quantile(values, levels, dim=0)


def gaussian_prior(
    sequences: torch.Tensor, lengths: torch.Tensor, num_states: int
) -> dict[str, torch.Tensor]:
    """Hyperparameters of :func:`gaussian_hmm` with ``priors="conjugate"``.

    Fraley and Raftery's (2007) weak data-scaled prior in one dimension, per feature:
    ``variance ~ InverseGamma(3/2, s² / (2 K²))`` (``dof = 3``, scale the data variance
    ``s²`` over ``K²``), ``mean | variance ~ Normal(x̄, variance / 0.01)``; and
    ``Dirichlet(2)`` on the initial probabilities and on every transition row (one
    pseudo-count per state, which keeps every probability off zero).

    Args:
        sequences: padded sequences, ``(S, T)`` or ``(S, T, D)``.
        lengths: observed length of each sequence, ``(S,)``.
        num_states: ``K``.

    Returns:
        ``prior_mean`` and ``variance_rate`` ``(D,)``; ``mean_precision``,
        ``variance_concentration`` and ``dirichlet_concentration`` as 0-dim tensors.
    """
    values = _observed_values(_as_sequences(sequences), lengths)
    scalar = values.new_tensor
    return {
        "prior_mean": values.mean(0),
        "mean_precision": scalar(0.01),
        "variance_concentration": scalar(1.5),
        "variance_rate": values.var(0) / (2.0 * num_states**2),
        "dirichlet_concentration": scalar(2.0),
    }


def _chain_parameters(
    num_states: int, dtype: torch.dtype, concentration: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chain's start probabilities and transition rows: ``pyro.param`` sites when
    ``concentration`` is ``None`` (flat), else sample sites with Dirichlet priors."""
    if concentration is None:
        init_probs = pyro.param(
            "init_probs",
            lambda: torch.full((num_states,), 1.0 / num_states, dtype=dtype),
            constraint=constraints.simplex,
        )
        transition_probs = pyro.param(
            "transition_probs",
            lambda: _initial_transitions(num_states, dtype),
            constraint=constraints.simplex,
        )
        return init_probs, transition_probs
    init_probs = pyro.sample("init_probs", dist.Dirichlet(concentration.expand(num_states)))
    transition_probs = pyro.sample(
        "transition_probs",
        dist.Dirichlet(concentration.expand(num_states, num_states)).to_event(1),
    )
    return init_probs, transition_probs


def gaussian_hmm(
    sequences: torch.Tensor, lengths: torch.Tensor, num_states: int, priors: str = "flat"
) -> None:
    """A Gaussian HMM with diagonal covariances for padded sequences, as a Pyro program.

    ``x_{s,0} ~ Categorical(init_probs)``, ``x_{s,t} ~ Categorical(transition_probs[x_{s,t-1}])``,
    ``y_{s,t} ~ Normal(locs[x_{s,t}], variances[x_{s,t}] ** ½)`` independently per feature,
    for ``t < lengths[s]``; the steps past a sequence's length are masked out.

    With ``priors="flat"`` the parameters are ``pyro.param`` sites (maximum likelihood,
    the model hmmlearn's ``GaussianHMM`` fits); their initial values are uniform start
    probabilities, transition rows half on staying put, the data quantiles as means and
    the data variance in every state. With ``priors="conjugate"`` they are sample sites
    with the priors of :func:`gaussian_prior` (MAP).

    Args:
        sequences: padded sequences, ``(S, T)`` or ``(S, T, D)``; the padding may hold
            any finite value.
        lengths: observed length of each sequence, ``(S,)``, integers in ``1..T``.
        num_states: ``K``.
        priors: ``"flat"`` or ``"conjugate"``.
    """
    _check_priors(priors)
    data = _as_sequences(sequences)
    num_sequences, max_length, dim = data.shape
    dtype = data.dtype
    if priors == "flat":
        values = _observed_values(data, lengths)
        init_probs, transition_probs = _chain_parameters(num_states, dtype, None)
        locs = pyro.param("locs", lambda: _initial_locs(values, num_states))
        variances = pyro.param(
            "variances",
            lambda: values.var(0).expand(num_states, dim).clone(),
            constraint=constraints.positive,
        )
    else:
        prior = gaussian_prior(data, lengths, num_states)
        init_probs, transition_probs = _chain_parameters(
            num_states, dtype, prior["dirichlet_concentration"]
        )
        with pyro.plate("states", num_states):
            variances = pyro.sample(
                "variances",
                dist.InverseGamma(
                    prior["variance_concentration"].expand(dim), prior["variance_rate"]
                ).to_event(1),
            )
            locs = pyro.sample(
                "locs",
                dist.Normal(
                    prior["prior_mean"], (variances / prior["mean_precision"]).sqrt()
                ).to_event(1),
            )
    with pyro.plate("sequences", num_sequences):
        state = None
        for t in pyro.markov(range(max_length)):
            probs = init_probs if state is None else transition_probs[state]
            with poutine.mask(mask=t < lengths):
                # Marked for parallel enumeration: the states are summed out exactly.
                state = pyro.sample(
                    f"state_{t}", dist.Categorical(probs), infer={"enumerate": "parallel"}
                )
                pyro.sample(
                    f"obs_{t}",
                    dist.Normal(locs[state], variances[state].sqrt()).to_event(1),
                    obs=data[:, t],
                )


def poisson_hmm(
    sequences: torch.Tensor, lengths: torch.Tensor, num_states: int, priors: str = "conjugate"
) -> None:
    """A Poisson HMM for padded count sequences, as a Pyro program.

    ``x_{s,0} ~ Categorical(init_probs)``, ``x_{s,t} ~ Categorical(transition_probs[x_{s,t-1}])``,
    ``y_{s,t} ~ Poisson(rates[x_{s,t}])`` independently per feature, for ``t < lengths[s]``.

    With ``priors="conjugate"``: ``Dirichlet(2)`` on the initial probabilities and on
    every transition row, and ``rates ~ Gamma(1 + 0.1·ȳ, 0.1)`` per state and feature
    (0.1 pseudo-observations at the data mean ``ȳ``, as ``pyroem.Mixture(K, "poisson")``'s
    default prior). With ``priors="flat"`` the parameters are ``pyro.param`` sites
    (maximum likelihood, the model hmmlearn's ``PoissonHMM`` fits), starting from uniform
    start probabilities, transition rows half on staying put and the data quantiles as
    rates.

    Args:
        sequences: padded counts, ``(S, T)`` or ``(S, T, D)``.
        lengths: observed length of each sequence, ``(S,)``, integers in ``1..T``.
        num_states: ``K``.
        priors: ``"conjugate"`` or ``"flat"``.
    """
    _check_priors(priors)
    data = _as_sequences(sequences)
    num_sequences, max_length, _ = data.shape
    dtype = data.dtype
    values = _observed_values(data, lengths)
    if priors == "flat":
        init_probs, transition_probs = _chain_parameters(num_states, dtype, None)
        rates = pyro.param(
            "rates",
            lambda: _initial_locs(values, num_states).clamp(min=0.5),
            constraint=constraints.positive,
        )
    else:
        init_probs, transition_probs = _chain_parameters(
            num_states, dtype, torch.tensor(2.0, dtype=dtype)
        )
        mean = values.mean(0)
        with pyro.plate("states", num_states):
            rates = pyro.sample(
                "rates", dist.Gamma(1 + 0.1 * mean, torch.full_like(mean, 0.1)).to_event(1)
            )
    with pyro.plate("sequences", num_sequences):
        state = None
        for t in pyro.markov(range(max_length)):
            probs = init_probs if state is None else transition_probs[state]
            with poutine.mask(mask=t < lengths):
                state = pyro.sample(
                    f"state_{t}", dist.Categorical(probs), infer={"enumerate": "parallel"}
                )
                pyro.sample(f"obs_{t}", dist.Poisson(rates[state]).to_event(1), obs=data[:, t])


def simulate_gaussian_hmm(
    lengths: torch.Tensor,
    init_probs: torch.Tensor,
    transition_probs: torch.Tensor,
    locs: torch.Tensor,
    variances: torch.Tensor,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw sequences from a Gaussian HMM, padded with zeros to the longest.

    Args:
        lengths: length of each sequence, ``(S,)``.
        init_probs: ``(K,)``.
        transition_probs: ``(K, K)``, rows summing to one.
        locs: ``(K, D)``.
        variances: ``(K, D)``.
        seed: seeds a private generator (the global random state is left alone).

    Returns:
        ``(sequences, states)``: ``(S, T, D)`` observations and ``(S, T)`` hidden states
        (``-1`` in the padding), ``T = max(lengths)``.
    """
    generator = torch.Generator().manual_seed(seed)
    num_sequences, max_length = len(lengths), int(lengths.max())
    sequences = torch.zeros(num_sequences, max_length, locs.shape[-1], dtype=locs.dtype)
    states = torch.full((num_sequences, max_length), -1, dtype=torch.long)
    for s, length in enumerate(lengths.tolist()):
        probs = init_probs
        for t in range(length):
            state = int(torch.multinomial(probs, 1, generator=generator))
            noise = torch.randn(locs.shape[-1], generator=generator, dtype=locs.dtype)
            sequences[s, t] = locs[state] + variances[state].sqrt() * noise
            states[s, t] = state
            probs = transition_probs[state]
    return sequences, states


def log_joint(
    model: Callable[..., Any], params: dict[str, torch.Tensor], *args: Any, **kwargs: Any
) -> float:
    """``log p(y, θ)`` of a Pyro program at ``params``, hidden states summed out.

    ``pyro.param`` sites are substituted and sample sites conditioned on ``params``,
    so with an empty guide Pyro's ``TraceEnum_ELBO`` is the log joint itself (the log
    likelihood where every parameter is a ``pyro.param`` site).
    """
    # A scratch parameter store: the global one is left as it was.
    with pyro.get_param_store().scope():
        trace = poutine.trace(model).get_trace(*args, **kwargs)
        param_names = {name for name, site in trace.nodes.items() if site["type"] == "param"}
        fixed = poutine.condition(
            poutine.substitute(model, data={k: v for k, v in params.items() if k in param_names}),
            data={k: v for k, v in params.items() if k not in param_names},
        )
        elbo = TraceEnum_ELBO(max_plate_nesting=1)
        return -elbo.loss(fixed, lambda *_, **__: None, *args, **kwargs)


def stationary_distribution(transition_probs: torch.Tensor) -> torch.Tensor:
    """The left eigenvector of the transition matrix for eigenvalue one, ``(K,)``."""
    num_states, dtype = transition_probs.shape[0], transition_probs.dtype
    # (Aᵀ − I) π = 0 with the extra row Σ π = 1, solved by least squares.
    balance = transition_probs.T - torch.eye(num_states, dtype=dtype)
    system = torch.cat([balance, torch.ones(1, num_states, dtype=dtype)])
    target = torch.zeros(num_states + 1, dtype=dtype)
    target[-1] = 1.0
    return torch.linalg.lstsq(system, target.unsqueeze(-1)).solution.squeeze(-1)


def relative_difference(value: float, reference: float) -> float:
    """``|value − reference| / |reference|``."""
    return abs(value - reference) / abs(reference)


def _never_decreased(objective: np.ndarray) -> bool:
    """Whether each step of the EM objective went up, up to float64 rounding."""
    rounding = 1e-12 * np.abs(objective[1:])
    return bool(np.all(np.diff(objective) >= -rounding))


def _report(name: str, fit: Any, hand_written: float, order: torch.Tensor) -> dict[str, Any]:
    """Print a fit's parameters (states in ``order``) and its checks; return the checks."""
    print(f"\n{name}")
    for site, value in fit.params.items():
        shown = value[order] if value.dim() > 0 and value.shape[0] == len(order) else value
        if site == "transition_probs":
            shown = shown[:, order]
        rows = np.array2string(shown.numpy(), precision=3, suppress_small=True)
        print(f"  {site} ({fit.m_step_kinds[site]}):\n    " + rows.replace("\n", "\n    "))
    objective = np.asarray(fit.history.objective)
    monotone = _never_decreased(objective)
    print(
        f"  log joint {fit.log_joint():.6f} after {fit.num_iterations} iterations "
        f"(converged: {fit.converged}); objective never decreased: {monotone}\n"
        f"  Pyro's TraceEnum_ELBO at the fitted parameters: {hand_written:.10f} "
        f"(relative difference {relative_difference(hand_written, fit.log_joint()):.1e})"
    )
    return {"hand_written": hand_written, "pyroem": fit.log_joint(), "monotone": monotone}


def fit_simulated() -> dict[str, dict[str, Any]]:
    """Simulate three-state Gaussian sequences; fit them with flat and conjugate priors."""
    truth = {
        "init_probs": torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
        "transition_probs": torch.tensor(
            [[0.90, 0.07, 0.03], [0.10, 0.80, 0.10], [0.05, 0.15, 0.80]], dtype=torch.float64
        ),
        "locs": torch.tensor([[-2.0], [0.0], [2.5]], dtype=torch.float64),
        "variances": torch.tensor([[0.5], [0.3], [1.0]], dtype=torch.float64),
    }
    lengths = torch.tensor([100, 60, 80, 40])
    sequences, _ = simulate_gaussian_hmm(lengths, **truth, seed=0)
    print(
        f"Simulated Gaussian HMM: {len(lengths)} sequences of lengths {lengths.tolist()}, "
        f"true means {truth['locs'].squeeze(-1).tolist()}, "
        f"variances {truth['variances'].squeeze(-1).tolist()}"
    )
    checks = {}
    for priors in PRIORS:
        fit = pyroem.fit(
            gaussian_hmm, sequences, lengths, 3, model_kwargs={"priors": priors}, seed=0
        )
        order = torch.argsort(fit.params["locs"][:, 0])
        hand_written = log_joint(gaussian_hmm, fit.params, sequences, lengths, 3, priors=priors)
        title = "maximum likelihood" if priors == "flat" else "MAP"
        checks[f"gaussian-{priors}"] = _report(
            f"Gaussian HMM, {priors} priors ({title}); states ordered by mean:",
            fit,
            hand_written,
            order,
        )
    return checks


def _spells(years: list[int]) -> str:
    """Runs of consecutive years, e.g. ``[1884, 1885, 1886, 1890]`` as ``"1884-1886, 1890"``."""
    runs: list[list[int]] = []
    for year in years:
        if runs and year == runs[-1][-1] + 1:
            runs[-1].append(year)
        else:
            runs.append([year])
    return ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else f"{run[0]}" for run in runs)


def fit_discoveries() -> dict[str, dict[str, Any]]:
    """Fit a two-state Poisson HMM to the yearly counts of great discoveries."""
    counts = load_discoveries().data[:, 0]
    sequences, lengths = counts.unsqueeze(0), torch.tensor([len(counts)])
    print(
        f"\nDiscoveries, {FIRST_YEAR}-{FIRST_YEAR + len(counts) - 1}: mean "
        f"{float(counts.mean()):.2f} a year, variance {float(counts.var()):.2f}"
    )
    fit = pyroem.fit(poisson_hmm, sequences, lengths, 2, seed=0)
    order = torch.argsort(fit.params["rates"][:, 0])
    hand_written = log_joint(poisson_hmm, fit.params, sequences, lengths, 2)
    check = _report(
        "Poisson HMM, Gamma and Dirichlet priors (MAP); states ordered by rate:",
        fit,
        hand_written,
        order,
    )

    low, high = (int(k) for k in order)
    rates = fit.params["rates"][:, 0]
    transitions = fit.params["transition_probs"]
    stationary = stationary_distribution(transitions)
    # One sequence: its row of each (num_sequences, K) marginal, a plate of size one
    # kept or not.
    high_probability = torch.stack(
        [fit.marginals[f"state_{t}"].reshape(-1, 2)[0, high] for t in range(len(counts))]
    )
    busy_years = (torch.nonzero(high_probability > 0.5).reshape(-1) + FIRST_YEAR).tolist()
    print("\nInterpretation:")
    for k, kind in ((low, "quiet"), (high, "busy")):
        print(
            f"  {kind} spells run at about {float(rates[k]):.1f} discoveries a year, last "
            f"{1 / (1 - float(transitions[k, k])):.1f} years on average, and take "
            f"{100 * float(stationary[k]):.0f}% of the years in the long run"
        )
    print(f"  {len(busy_years)} years are more likely busy than quiet, in {_spells(busy_years)}.")
    return {"poisson-discoveries": check}


def main() -> dict[str, Any]:
    """Fit both examples; return, per fit, the log joint check and the monotonicity check."""
    checks = fit_simulated()
    checks.update(fit_discoveries())
    return {"checks": checks}


if __name__ == "__main__":
    main()
