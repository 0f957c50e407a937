"""MCMC-EM over torch.distributed: two gloo processes on 127.0.0.1, each drawing the
latents of its own rows, give the single-process fit to 1e-10 in float64 (a Mixture
passed whole to every rank, with restarts too; a Pyro mixture program whose rows each
rank passes), with the same schedule (step sizes, draws per E-step, stopping); the
keyed draws follow the exact posterior and do not depend on how the rows are split."""

import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import norm
from test_distributed import (
    _free_port,
    _launch,
    global_latent_program,
    hierarchical_program,
    hmm_program,
    mixture_program,
    program_data,
    sequence_data,
)

import pyroem
from pyroem.errors import ConvergenceWarning, NotSupportedError
from pyroem.estep.exact_draws import KEY_BLOCK, KeyedSampler, keyed_site
from pyroem.estep.stacked_draws import LatentProgram

WORKER = """
import sys

import numpy as np
import torch.distributed as dist

dist.init_process_group("gloo")
out = sys.argv[1]
sys.path.insert(0, sys.argv[3])
from test_distributed_mcmc_em import FITS

rank, size = dist.get_rank(), dist.get_world_size()
result = {}
for name, (data, shard, run) in FITS.items():
    data = data()
    if shard:
        num = data.shape[-1]
        data = data[..., rank * num // size : (rank + 1) * num // size]
    fit = run(data)
    result[f"{name}/processes"] = np.array(fit.options.get("processes", 1))
    result[f"{name}/num_data"] = np.array(fit.num_data)
    for key, value in fit.params.items():
        result[f"{name}/{key}"] = value.numpy()
    result[f"{name}/objective"] = fit.history.objective
    for key in ("step_size", "num_samples", "delta_q", "delta_q_se"):
        result[f"{name}/{key}"] = fit.sample_stats[key]
    result[f"{name}/draws"] = fit.draws["assignment"].numpy()
np.savez(f"{out}/rank{rank}.npz", **result)
dist.destroy_process_group()
"""


def mixture_data() -> np.ndarray:
    rng = np.random.default_rng(4)
    centres = np.array([[-3.0, 0.0], [3.0, 1.0]])
    return centres[rng.choice(2, size=150)] + rng.normal(size=(150, 2))


SPEC = pyroem.Mixture(2, "gaussian", covariance_type="diag")
FULL = pyroem.Mixture(3, "gaussian", covariance_type="full")
COMMON = {"method": "mcmc-em", "seed": 7, "num_samples": 20}


def mixture_restarts(data: np.ndarray) -> pyroem.Fit:
    # tol=0: six iterations of each restart.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return pyroem.fit(FULL, data, n_init=2, max_iter=6, tol=0, **COMMON)


def program_mcem(data: torch.Tensor) -> pyroem.Fit:
    # tol=1e-6 is out of reach in 30 iterations: the draws grow once the gains are noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return pyroem.fit(mixture_program, data, schedule="mcem", max_iter=30, tol=1e-6, **COMMON)


def hierarchical_mcem(data: torch.Tensor) -> pyroem.Fit:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return pyroem.fit(hierarchical_program, data, max_iter=8, tol=0, **COMMON)


FITS = {
    # A Mixture passed whole on every rank: rank 0's start, each rank draws its rows.
    "mixture_saem": (mixture_data, False, lambda data: pyroem.fit(SPEC, data, **COMMON)),
    # Full covariances (their closed form reads the means' prior) and two restarts.
    "mixture_restarts": (mixture_data, False, mixture_restarts),
    # A Pyro program, each rank passing its rows; MCEM's draws grow with the noise.
    "program_mcem": (program_data, True, program_mcem),
    # A centre read by the component locations only: its closed form's statistics are
    # summed over the ranks with the locations' uses counted by rank 0 alone.
    "hierarchical": (program_data, True, hierarchical_mcem),
}


@pytest.mark.slow
def test_two_gloo_ranks_give_the_single_process_mcmc_em_fit(tmp_path):
    ranks = _launch(tmp_path, worker=WORKER)
    for key in ranks[0]:
        if key.endswith("/draws"):
            continue
        # Every rank took the same M-steps and schedule: the same bits.
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key], err_msg=key)
    for name, (data, _, run) in FITS.items():
        single = run(data())
        assert ranks[0][f"{name}/processes"] == 2, name
        assert ranks[0][f"{name}/num_data"] == single.num_data, name
        objective = ranks[0][f"{name}/objective"]
        assert objective.shape == single.history.objective.shape, name
        assert len(objective) > 3, name
        np.testing.assert_allclose(objective, single.history.objective, rtol=1e-12, err_msg=name)
        for key in ("step_size", "num_samples"):
            np.testing.assert_array_equal(ranks[0][f"{name}/{key}"], single.sample_stats[key])
        np.testing.assert_allclose(
            ranks[0][f"{name}/delta_q"], single.sample_stats["delta_q"], rtol=1e-8, atol=1e-8
        )
        for key, value in single.params.items():
            np.testing.assert_allclose(
                ranks[0][f"{name}/{key}"], value.numpy(), rtol=0, atol=1e-10, err_msg=name
            )
        # Each rank holds the last draws of its own rows: together, one process's draws.
        shards = [rank[f"{name}/draws"] for rank in ranks]
        assert shards[0].shape[-1] == shards[1].shape[-1] == single.num_data // 2, name
        np.testing.assert_array_equal(np.concatenate(shards, -1), single.draws["assignment"])
    # The schedules did what they are for: SAEM left its burn-in, MCEM grew its draws.
    assert ranks[0]["mixture_saem/step_size"][-1] < 1
    assert ranks[0]["program_mcem/num_samples"][-1] > 20


def _responsibilities(data: np.ndarray, weights, locs, variance) -> np.ndarray:
    """p(assignment_i = k | x_i) of ``mixture_program``, written with scipy."""
    weights, locs = np.asarray(weights), np.asarray(locs)
    log = np.log(weights)[None] + norm.logpdf(data[:, None], locs[None], np.sqrt(variance))
    return np.exp(log - logsumexp(log, axis=1, keepdims=True))


PARAMS = {
    "weights": torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64),
    "variance": torch.tensor(1.5, dtype=torch.float64),
    "locs": torch.tensor([-3.0, 0.5, 4.0], dtype=torch.float64),
}


def test_keyed_draws_follow_the_exact_posterior_of_each_point():
    """Each point's frequency of each component over S keyed draws is a mean of S i.i.d.
    Bernoulli(p) indicators, p from scipy's densities: within 4.5 sd of p (600 entries,
    missed by chance with probability below 0.5%; the key is fixed)."""
    data = program_data()
    program = LatentProgram(mixture_program, (data,))
    site, reason = keyed_site(program, program.trace(PARAMS))
    assert site == "assignment" and reason == ""
    expected = _responsibilities(
        data.numpy(), *(PARAMS[name].numpy() for name in ("weights", "locs", "variance"))
    )
    num_draws = 4000
    sampler = KeyedSampler(program, site, torch.arange(3))
    draws = sampler.sample(torch.from_numpy(expected), num_draws, (7, 0, 3))
    values = draws.discrete["assignment"][0]
    assert values.shape == (num_draws, 200) and draws.num_draws == num_draws
    frequencies = (values[..., None] == torch.arange(3)).double().mean(0).numpy()
    band = 4.5 * np.sqrt(expected * (1 - expected) / num_draws) + 1e-12
    assert np.all(np.abs(frequencies - expected) <= band)
    # Draws of different points and keys differ (the generators are not shared).
    other = sampler.sample(torch.from_numpy(expected), num_draws, (7, 0, 4))
    assert not torch.equal(other.discrete["assignment"], draws.discrete["assignment"])


def test_keyed_draws_of_a_point_do_not_depend_on_how_the_rows_are_split():
    rng = np.random.default_rng(2)
    num_rows = 2 * KEY_BLOCK + 300  # shards straddle the blocks of keyed uniforms
    data = rng.normal(size=num_rows) * 3
    marginals = torch.from_numpy(_responsibilities(data, [0.3, 0.3, 0.4], [-3, 0.5, 4], 1.5))
    program = LatentProgram(mixture_program, (torch.from_numpy(data[:10]),))
    support = torch.arange(3)
    whole = KeyedSampler(program, "assignment", support).sample(marginals, 5, (1, 2, 3))
    parts = []
    for start, stop in ((0, 700), (700, 1500), (1500, num_rows)):
        sampler = KeyedSampler(program, "assignment", support, offset=start)
        parts.append(sampler.sample(marginals[start:stop], 5, (1, 2, 3)).discrete["assignment"])
    assert torch.equal(torch.cat(parts, dim=-1), whole.discrete["assignment"])


def random_effect_mixture(data: torch.Tensor) -> None:
    """A mixture with a continuous random shift per data point (drawn by NUTS)."""
    weights = pyro.sample("weights", dist.Dirichlet(torch.full((2,), 2.0, dtype=torch.float64)))
    with pyro.plate("components", 2):
        locs = pyro.sample("locs", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 10.0))
    with pyro.plate("data", len(data)):
        shift = pyro.sample("shift", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0))
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[assignment] + shift, 1.0), obs=data)


def test_a_process_group_refuses_mcmc_em_latents_it_cannot_draw_per_row(monkeypatch):
    # One gloo rank stands in for a group: the checks read the group's size.
    import torch.distributed as tdist

    tdist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        monkeypatch.setattr(tdist, "get_world_size", lambda *args: 2)
        common = {"method": "mcmc-em", "seed": 0, "max_iter": 2}
        with pytest.raises(
            NotSupportedError, match=r"'state_0'.*forward filtering.*distributed=False"
        ):
            pyroem.fit(hmm_program, sequence_data()[:3, :4], **common)
        with pytest.raises(NotSupportedError, match=r"continuous latent sites \['shift'\]"):
            pyroem.fit(random_effect_mixture, program_data()[:10], **common)
        with pytest.raises(NotSupportedError, match=r"'assignment' lies in the plates \[\]"):
            pyroem.fit(global_latent_program, program_data()[:10], **common)
        with pytest.raises(NotSupportedError, match=r"have none"):
            pyroem.fit(mixture_program, program_data()[:10], m_step="gradient", **common)
    finally:
        monkeypatch.undo()
        tdist.destroy_process_group()
