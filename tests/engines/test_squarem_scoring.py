"""Which E-step scores SQUAREM's jumps on a Pyro program.

SQUAREM extrapolates in every parameter's unconstrained coordinates, so a parameter
declared with its support (simplex, unit interval) lands inside it: its jumps are
scored by the E-step the fit runs anyway, which on a verified ``pyro.markov`` chain
runs the loop's first steps only. A parameter declared real may be used where its
values are bounded (probabilities), so a program with one has its jumps scored with
Pyro's argument checks, and a jump the program cannot be run at is rejected.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO, config_enumerate
from torch.distributions import constraints

import pyroem

STEPS = 60
F64 = torch.float64
SEQUENCES = 6


class Runs:
    """Counts a program's complete runs."""

    def __init__(self) -> None:
        self.complete = 0


def _bernoulli_hmm(runs: Runs) -> Callable[[torch.Tensor], None]:
    """A two-state HMM over 0/1 emissions, every parameter declared with its support."""

    def model(data: torch.Tensor) -> None:
        init = pyro.param(
            "init", torch.tensor([0.6, 0.4], dtype=F64), constraint=constraints.simplex
        )
        trans = pyro.param(
            "trans",
            torch.tensor([[0.7, 0.3], [0.4, 0.6]], dtype=F64),
            constraint=constraints.simplex,
        )
        probs = pyro.param(
            "probs",
            torch.tensor([0.3, 0.6], dtype=F64),
            constraint=constraints.unit_interval,
        )
        with pyro.plate("sequences", data.shape[0]):
            state = None
            for t in pyro.markov(range(data.shape[1])):
                weights = init if state is None else trans[state]
                state = pyro.sample(
                    f"state_{t}", dist.Categorical(weights), infer={"enumerate": "parallel"}
                )
                pyro.sample(f"obs_{t}", dist.Bernoulli(probs[state]), obs=data[:, t])
        runs.complete += 1

    return model


def _data() -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    states = torch.zeros(SEQUENCES, STEPS, dtype=torch.long)
    for t in range(1, STEPS):
        stay = torch.rand(SEQUENCES, generator=generator) < 0.9
        states[:, t] = torch.where(stay, states[:, t - 1], 1 - states[:, t - 1])
    probs = torch.tensor([0.15, 0.85], dtype=F64)[states]
    return torch.bernoulli(probs, generator=generator)


def _pyro_log_joint(model: Callable[[torch.Tensor], None], data: torch.Tensor, params) -> float:
    """Pyro's own log joint (no priors: every parameter is a pyro.param) at ``params``."""
    with pyro.get_param_store().scope():
        pyro.clear_param_store()
        for name, value in params.items():
            pyro.get_param_store()[name] = value.detach().clone()
        loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(
            config_enumerate(model), lambda data: None, data
        )
    return -float(loss)


@pytest.mark.filterwarnings("ignore::pyroem.ConvergenceWarning")
def test_jumps_of_parameters_declared_with_their_support_keep_the_short_runs() -> None:
    data, runs = _data(), Runs()
    model = _bernoulli_hmm(runs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fit = pyroem.fit(model, data, accelerate="squarem", max_iter=6, tol=0.0, seed=0)
    # Two complete runs in the setup (see the replicated chains' tests); jumps scored by
    # complete runs made 16 over these 6 cycles.
    assert runs.complete <= 3, runs.complete
    assert fit.num_iterations == 6
    assert fit.options["squarem_cycles"] == 6  # every M-step a cycle
    objectives = list(fit.history.objective)
    assert all(b >= a - 1e-9 * abs(a) for a, b in itertools.pairwise(objectives))
    counted = Runs()
    reference = _pyro_log_joint(_bernoulli_hmm(counted), data, fit.params)
    assert abs(fit.log_joint() - reference) <= 1e-9 * abs(reference)
