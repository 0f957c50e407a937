"""Distributed fits: two gloo processes on 127.0.0.1, each reading its shard, give the
single-process fit (float64, to 1e-10) for MAP-EM and CAVI on a Mixture (data in memory
and streamed from files) and for MAP-EM on a Pyro program (each rank passing its shard),
and both ranks hold the same parameters; a streamed fit's ranks read only their shard of
the files, in every pass."""

import importlib.util
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import pyroem
import pyroem.api as api_module
import pyroem.sources
from pyroem.engines.distributed import Collective
from pyroem.engines.svi import fit_svi
from pyroem.errors import NotSupportedError, SpecError

WORKER = textwrap.dedent(
    """
    import sys

    import numpy as np
    import torch.distributed as dist

    import pyroem
    dist.init_process_group("gloo")
    assert dist.get_world_size() == 2
    out, folder = sys.argv[1], sys.argv[2]
    sys.path.insert(0, sys.argv[3])
    from test_distributed import FITS, count_rows_read

    rows_read = count_rows_read()
    result = {}
    for name, run in FITS.items():
        rows_read.clear()
        fit = run(folder)
        result[f"{name}/rows_read"] = np.array(sum(rows_read))
        result[f"{name}/processes"] = np.array(fit.options.get("processes", 1))
        for key, value in fit.params.items():
            result[f"{name}/{key}"] = value.numpy()
        result[f"{name}/objective"] = fit.history.objective
        result[f"{name}/labels"] = fit.labels.numpy()
    np.savez(f"{out}/rank{dist.get_rank()}.npz", **result)
    dist.destroy_process_group()
    """
)


PROGRAM_WORKER = textwrap.dedent(
    """
    import sys

    import numpy as np
    import torch.distributed as dist

    dist.init_process_group("gloo")
    out = sys.argv[1]
    sys.path.insert(0, sys.argv[3])
    from test_distributed import PROGRAM_FITS

    rank, size = dist.get_rank(), dist.get_world_size()
    result = {}
    for name, (data, run) in PROGRAM_FITS.items():
        # The data points (or sequences) are the last dimension: each rank takes its half.
        data = data()
        num = data.shape[-1]
        fit = run(data[..., rank * num // size : (rank + 1) * num // size])
        result[f"{name}/processes"] = np.array(fit.options.get("processes", 1))
        result[f"{name}/num_data"] = np.array(fit.num_data)
        for key, value in fit.params.items():
            result[f"{name}/{key}"] = value.numpy()
        result[f"{name}/objective"] = fit.history.objective
    np.savez(f"{out}/rank{rank}.npz", **result)
    dist.destroy_process_group()
    """
)


def program_data() -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.tensor(np.array([-4.0, 0.0, 4.0])[rng.choice(3, size=200)] + rng.normal(size=200))


def mixture_program(data: torch.Tensor) -> None:
    """Three Normal components: Dirichlet weights, Normal locations, an inverse-gamma
    variance, and an enumerated assignment per data point."""
    f64 = torch.float64
    weights = pyro.sample("weights", dist.Dirichlet(torch.full((3,), 2.0, dtype=f64)))
    variance = pyro.sample("variance", dist.InverseGamma(torch.tensor(2.0, dtype=f64), 2.0))
    with pyro.plate("components", 3):
        locs = pyro.sample("locs", dist.Normal(torch.tensor(0.0, dtype=f64), 10.0))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[assignment], variance.sqrt()), obs=data)


def hierarchical_program(data: torch.Tensor) -> None:
    """Component locations drawn around a common centre (a parameter read by a parameter)."""
    centre = pyro.sample("centre", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 10.0))
    with pyro.plate("components", 2):
        locs = pyro.sample("locs", dist.Normal(centre, 3.0))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(torch.ones(2) / 2))
        pyro.sample("obs", dist.Normal(locs[assignment], 1.0), obs=data)


def shared_centre_program(data: torch.Tensor) -> None:
    """A centre read by the component locations (every rank holds them whole) and by
    the data (each rank holds its shard): its closed form mixes the two."""
    centre = pyro.sample("centre", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 10.0))
    with pyro.plate("components", 2):
        locs = pyro.sample("locs", dist.Normal(centre, 3.0))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(torch.ones(2) / 2))
        pyro.sample("obs", dist.Normal(locs[assignment], 1.0), obs=data)
        pyro.sample("shifted", dist.Normal(centre, 5.0), obs=data)


def local_latent_program(data: torch.Tensor) -> None:
    """A continuous latent per data point (its guide would differ per shard)."""
    loc = pyro.sample("loc", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 10.0))
    with pyro.plate("data", len(data)):
        offset = pyro.sample("offset", dist.Normal(loc, 1.0))
        pyro.sample("obs", dist.Normal(offset, 1.0), obs=data)


def global_latent_program(data: torch.Tensor) -> None:
    """One assignment shared by every data point: a latent outside the data plate."""
    weights = pyro.sample("weights", dist.Dirichlet(torch.full((2,), 2.0, dtype=torch.float64)))
    with pyro.plate("components", 2):
        locs = pyro.sample("locs", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 10.0))
    assignment = pyro.sample("assignment", dist.Categorical(weights))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(locs[assignment], 1.0), obs=data)


def sequence_data() -> torch.Tensor:
    """20 steps of 40 sequences, ``(steps, sequences)``."""
    rng = np.random.default_rng(1)
    states = np.where(rng.random((20, 40)) < 0.5, -2.0, 2.0)
    return torch.tensor(states + rng.normal(size=(20, 40)))


def hmm_program(data: torch.Tensor) -> None:
    """A two-state Gaussian HMM over the sequences (forward-backward per rank)."""
    f64 = torch.float64
    transitions = pyro.sample(
        "transitions", dist.Dirichlet(torch.full((2, 2), 2.0, dtype=f64)).to_event(1)
    )
    with pyro.plate("states", 2):
        locs = pyro.sample("locs", dist.Normal(torch.tensor(0.0, dtype=f64), 10.0))
    with pyro.plate("sequences", data.shape[1]):
        state = torch.zeros(data.shape[1], dtype=torch.long)
        for step in pyro.markov(range(data.shape[0])):
            state = pyro.sample(f"state_{step}", dist.Categorical(transitions[state]))
            pyro.sample(f"obs_{step}", dist.Normal(locs[state], 1.0), obs=data[step])


PROGRAM_COMMON = {"seed": 3, "tol": 1e-12, "max_iter": 200}

PROGRAM_FITS = {
    # The default start: short runs from prior and uniform draws (em-EM).
    "short_runs": (program_data, lambda data: pyroem.fit(mixture_program, data, **PROGRAM_COMMON)),
    # Three restarts, each from a prior draw of rank 0.
    "restarts": (
        program_data,
        lambda data: pyroem.fit(mixture_program, data, n_init=3, **PROGRAM_COMMON),
    ),
    "hmm": (sequence_data, lambda data: pyroem.fit(hmm_program, data, **PROGRAM_COMMON)),
    # A closed form read by parameters only, the same on every rank (not summed).
    "hierarchical": (
        program_data,
        lambda data: pyroem.fit(hierarchical_program, data, **PROGRAM_COMMON),
    ),
    # A closed form read by a parameter and by the data: the parameter's use counts once.
    "shared_centre": (
        program_data,
        lambda data: pyroem.fit(shared_centre_program, data, **PROGRAM_COMMON),
    ),
    # SQUAREM: extrapolated points scored on every rank, accepted on the summed objective.
    "squarem": (
        program_data,
        lambda data: pyroem.fit(mixture_program, data, accelerate="squarem", **PROGRAM_COMMON),
    ),
}


def _blobs(num: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    centres = np.array([[-5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])
    return centres[rng.choice(3, size=num)] + rng.normal(size=(num, 2))


def _counts(num: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.poisson(np.array([[2.0, 9.0], [12.0, 1.0]])[rng.choice(2, size=num)])


# Parquet sources need pyarrow (a test extra); without it their fits are left out.
PARQUET = importlib.util.find_spec("pyarrow") is not None


def _write_data(folder: Path) -> None:
    data = _blobs(301)
    if PARQUET:
        import pandas as pd

        # One file of 8 row groups: each rank reads its 4 (row-group sharding).
        frame = pd.DataFrame(data, columns=["a", "b"])
        frame.to_parquet(folder / "blobs.parquet", row_group_size=40)
    np.save(folder / "blobs.npy", data)
    np.save(folder / "part-0.npy", data[:100])
    np.save(folder / "part-1.npy", data[100:220])
    np.save(folder / "part-2.npy", data[220:])
    np.save(folder / "counts.npy", _counts(200))


GAUSSIAN = pyroem.Mixture(3, "gaussian", prior=None)
COMMON = {"seed": 3, "tol": 1e-12, "max_iter": 300}

FITS = {
    "map_in_memory": lambda folder: pyroem.fit(
        GAUSSIAN, np.load(f"{folder}/blobs.npy"), chunk_size=37, **COMMON
    ),
    "map_streamed": lambda folder: pyroem.fit(
        GAUSSIAN, f"{folder}/part-*.npy", chunk_size=37, **COMMON
    ),
    "map_weighted": lambda folder: pyroem.fit(
        GAUSSIAN,
        np.load(f"{folder}/blobs.npy"),
        sample_weight=np.arange(301) % 3 + 0.5,
        chunk_size=37,
        **COMMON,
    ),
    "map_poisson": lambda folder: pyroem.fit(
        pyroem.Mixture(2, "poisson"), np.load(f"{folder}/counts.npy"), **COMMON
    ),
    "cavi": lambda folder: pyroem.fit(
        pyroem.Mixture(3, "gaussian"),
        np.load(f"{folder}/blobs.npy"),
        method="vb-em",
        chunk_size=50,
        num_draws=0,
        **COMMON,
    ),
    # 60 of the 301 rows initialise the fit: the ranks' reservoir samples are merged.
    "map_sampled": lambda folder: pyroem.fit(
        GAUSSIAN, f"{folder}/part-*.npy", chunk_size=37, reservoir_size=60, **COMMON
    ),
    "cavi_streamed": lambda folder: pyroem.fit(
        pyroem.Mixture(3, "gaussian"),
        f"{folder}/part-*.npy",
        method="vb-em",
        chunk_size=50,
        num_draws=0,
        **COMMON,
    ),
}


if PARQUET:
    FITS["map_parquet"] = lambda folder: pyroem.fit(
        GAUSSIAN, f"{folder}/blobs.parquet", chunk_size=37, **COMMON
    )
    FITS["cavi_parquet"] = lambda folder: pyroem.fit(
        pyroem.Mixture(3, "gaussian"),
        f"{folder}/blobs.parquet",
        method="vb-em",
        chunk_size=50,
        num_draws=0,
        **COMMON,
    )


def count_rows_read() -> list[int]:
    """Count the rows every read of a ``.npy`` file gives (one entry per chunk)."""
    from pyroem import sources

    read_rows = sources._read_rows
    counts: list[int] = []

    def counting(*args, **kwargs):
        for rows in read_rows(*args, **kwargs):
            counts.append(rows.shape[0])
            yield rows

    sources._read_rows = counting
    return counts


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _launch(
    tmp_path: Path, world_size: int = 2, worker: str = WORKER
) -> list[dict[str, np.ndarray]]:
    script = tmp_path / "worker.py"
    script.write_text(worker)
    port = _free_port()
    processes = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        here = str(Path(__file__).parent)
        command = [sys.executable, str(script), str(tmp_path), str(tmp_path), here]
        processes.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    for process in processes:
        output, _ = process.communicate(timeout=240)
        assert process.returncode == 0, output.decode()[-3000:]
    return [dict(np.load(tmp_path / f"rank{rank}.npz")) for rank in range(world_size)]


@pytest.mark.slow
def test_two_gloo_ranks_give_the_single_process_fit(tmp_path, monkeypatch):
    _write_data(tmp_path)
    ranks = _launch(tmp_path)
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        if key.endswith("rows_read"):
            continue
        # Every rank took the same M-steps: the same bits.
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key], err_msg=key)
    monkeypatch.setattr("pyroem.sources._read_rows", pyroem.sources._read_rows)
    rows_read = count_rows_read()
    for name, run in FITS.items():
        rows_read.clear()
        single = run(str(tmp_path))
        if name == "map_sampled":
            # Another sample of the file than one process draws, so another start: the
            # same maximum of the likelihood (well-separated clusters), ranks alike.
            order = np.argsort(ranks[0][f"{name}/means"][:, 0])
            reference = np.argsort(single.params["means"][:, 0].numpy())
            for key, value in single.params.items():
                np.testing.assert_allclose(
                    ranks[0][f"{name}/{key}"][order], value.numpy()[reference], atol=1e-8
                )
            continue
        if name == "map_streamed":
            # Every pass of each rank reads its shard (100 and 201 of the 301 rows).
            assert ranks[0][f"{name}/rows_read"] * 301 == sum(rows_read) * 100
            assert ranks[1][f"{name}/rows_read"] * 301 == sum(rows_read) * 201
        assert ranks[0][f"{name}/processes"] == 2, name
        objective = ranks[0][f"{name}/objective"]
        assert objective.shape == single.history.objective.shape, name
        np.testing.assert_allclose(objective, single.history.objective, rtol=1e-12, err_msg=name)
        np.testing.assert_array_equal(ranks[0][f"{name}/labels"], single.labels.numpy())
        for key, value in single.params.items():
            np.testing.assert_allclose(
                ranks[0][f"{name}/{key}"], value.numpy(), rtol=0, atol=1e-10, err_msg=name
            )


@pytest.mark.slow
def test_two_gloo_ranks_give_the_single_process_fit_of_a_pyro_program(tmp_path, monkeypatch):
    from pyroem.estep import recognised_mixture

    ranks = _launch(tmp_path, worker=PROGRAM_WORKER)
    for key in ranks[0]:
        # Every rank took the same M-steps: the same bits.
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key], err_msg=key)
    for name, (data, run) in PROGRAM_FITS.items():
        # The ranks run the program at every E-step; one process computes a recognised
        # mixture's E-steps from its parameter forms instead, whose other rounding moves
        # SQUAREM's end point by ~1e-9. The reference runs the program as the ranks do,
        # and the kernel's fit is checked against it to that precision.
        kernel = run(data())
        with monkeypatch.context() as patch:
            patch.setattr(recognised_mixture, "_FAST", False)
            single = run(data())
        for key, value in single.params.items():
            np.testing.assert_allclose(kernel.params[key], value, rtol=0, atol=1e-8, err_msg=name)
        assert ranks[0][f"{name}/processes"] == 2, name
        # Two observed sites per data point in the shared-centre program.
        observed = 2 if name == "shared_centre" else 1
        assert ranks[0][f"{name}/num_data"] == single.num_data == observed * data().numel(), name
        objective = ranks[0][f"{name}/objective"]
        assert objective.shape == single.history.objective.shape, name
        np.testing.assert_allclose(objective, single.history.objective, rtol=1e-12, err_msg=name)
        for key, value in single.params.items():
            np.testing.assert_allclose(
                ranks[0][f"{name}/{key}"], value.numpy(), rtol=0, atol=1e-10, err_msg=name
            )


def test_distributed_true_outside_a_process_group_says_how_to_launch():
    with pytest.raises(SpecError, match="torchrun"):
        pyroem.fit(GAUSSIAN, _blobs(50), distributed=True)
    with pytest.raises(SpecError, match="distributed must be"):
        pyroem.fit(GAUSSIAN, _blobs(50), distributed="yes")


def test_a_process_group_refuses_what_it_cannot_split(tmp_path, monkeypatch):
    # One gloo rank stands in for a group: the check reads the group's size.
    import torch.distributed as dist

    port = _free_port()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(dist, "get_world_size", lambda *args: 2)
        with pytest.raises(NotSupportedError, match="distributed=False"):
            pyroem.fit(GAUSSIAN, _blobs(50), method="nuts")
        with pytest.raises(NotSupportedError, match="stepwise"):
            pyroem.fit(GAUSSIAN, _blobs(50), stepwise=True)
        with pytest.raises(NotSupportedError, match="Pyro program"):
            pyroem.fit(lambda data: None, torch.zeros(3), method="nuts")
        data = program_data()[:20]
        with pytest.raises(NotSupportedError, match=r"\['assignment'\] lie in no plate"):
            pyroem.fit(global_latent_program, data, init="prior")
        svi = {"method": "vb-em", "guide": "delta", "init": "prior", "max_iter": 2}
        with pytest.raises(NotSupportedError, match=r"\['assignment'\], in no plate"):
            pyroem.fit(global_latent_program, data, **svi)
        with pytest.raises(NotSupportedError, match="guide function"):
            pyroem.fit(mixture_program, data, **{**svi, "guide": lambda data: None})
        with pytest.raises(NotSupportedError, match="guide='normal'"):
            pyroem.fit(mixture_program, data, **{**svi, "guide": "normal"})
        # The engine called directly (it is exported) refuses it too.
        with pytest.raises(NotSupportedError, match="guide='normal'"):
            fit_svi(
                mixture_program, (data,), None, tol=0.0, max_iter=2, init=None, seed=0,
                progress=False, collective=Collective(), guide="normal",
            )  # fmt: skip

        with pytest.raises(NotSupportedError, match=r"\['offset'\], local to the data"):
            pyroem.fit(local_latent_program, data, **svi)

        # The default guide is refused before the default start's MAP-EM fit is run.
        def no_start(*args, **kwargs):
            raise AssertionError("the start was computed for a refused guide")

        monkeypatch.setattr(api_module, "resolve_start", no_start)
        with pytest.raises(NotSupportedError, match="guide='normal'"):
            pyroem.fit(mixture_program, data, method="vb-em")
    finally:
        monkeypatch.undo()
        dist.destroy_process_group()


# ----- gradient M-steps over ranks ------------------------------------------------------


def scale_mixture_data() -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.tensor(np.array([-3.0, 3.0])[rng.choice(2, size=120)] + rng.normal(size=120))


def scale_mixture_program(data: torch.Tensor) -> None:
    """Two Normal components sharing a scale with a half-Cauchy prior (no closed form:
    ECME steps on the objective, with the prior's and the log-Jacobian's terms), closed
    forms for the weights and locations."""
    f64 = torch.float64
    weights = pyro.sample("weights", dist.Dirichlet(torch.full((2,), 2.0, dtype=f64)))
    scale = pyro.sample("scale", dist.HalfCauchy(torch.tensor(5.0, dtype=f64)))
    with pyro.plate("components", 2):
        locs = pyro.sample("locs", dist.Normal(torch.tensor(0.0, dtype=f64), 10.0))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)


def regression_data() -> torch.Tensor:
    """``(2, 80)``: inputs and outputs of two lines."""
    rng = np.random.default_rng(2)
    x = rng.uniform(-2.0, 2.0, size=80)
    y = np.where(rng.random(80) < 0.5, 2.0 * x + 1.0, -x - 1.0) + 0.3 * rng.normal(size=80)
    return torch.tensor(np.stack([x, y]))


NETWORK = torch.nn.Linear(1, 2).double()


def fit_regression_mixture(data: torch.Tensor) -> pyroem.ProgramFit:
    """The fit from the network's same starting weights (a fit leaves its fitted weights
    in the network)."""
    with torch.no_grad():
        NETWORK.weight.copy_(torch.tensor([[0.5], [-0.2]]))
        NETWORK.bias.copy_(torch.tensor([0.1, -0.3]))
    return pyroem.fit(regression_mixture_program, data, init="prior", **PROGRAM_COMMON)


def regression_mixture_program(data: torch.Tensor) -> None:
    """A mixture of two regression lines from a ``pyro.module`` (its weights take
    gradient M-steps, its biases a flat closed form) and Dirichlet weights."""
    network = pyro.module("network", NETWORK)
    weights = pyro.sample("weights", dist.Dirichlet(torch.full((2,), 2.0, dtype=torch.float64)))
    lines = network(data[0].unsqueeze(-1))
    with pyro.plate("data", data.shape[1]):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample(
            "obs", dist.Normal(lines[torch.arange(data.shape[1]), assignment], 0.3), obs=data[1]
        )


def bernoulli_data() -> torch.Tensor:
    """``(3, 40)``: 40 binary vectors, the data points in the last dimension."""
    generator = torch.Generator().manual_seed(0)
    data = torch.zeros(40, 3, dtype=torch.float64)
    data[20:] = (torch.rand(20, 3, generator=generator) < 0.8).double()
    return data.T.contiguous()


def real_probability_program(data: torch.Tensor) -> None:
    """A Bernoulli mixture whose ``pyro.param`` probabilities are declared real: L-BFGS
    steps where the program is invalid, so ECME gives way to Q's gradient step, cut
    back until valid."""
    probs = pyro.param(
        "probs", lambda: torch.tensor([[0.2, 0.5, 0.4], [0.5, 0.6, 0.7]], dtype=torch.float64)
    )
    weights = pyro.param("weights", lambda: torch.tensor([0.5, 0.5], dtype=torch.float64))
    with pyro.plate("data", data.shape[1]):
        z = pyro.sample("z", dist.Categorical(probs=weights))
        pyro.sample("x", dist.Bernoulli(probs[z]).to_event(1), obs=data.T)


GRADIENT_FITS = {
    # The default start (short runs), a scale by ECME, MAP in unconstrained coordinates.
    "scale": (
        scale_mixture_data,
        lambda data: pyroem.fit(
            scale_mixture_program, data, space="unconstrained", **PROGRAM_COMMON
        ),
    ),
    "network": (regression_data, fit_regression_mixture),
    "real_probabilities": (
        bernoulli_data,
        lambda data: pyroem.fit(real_probability_program, data, seed=0, tol=1e-10, max_iter=60),
    ),
}

GRADIENT_WORKER = PROGRAM_WORKER.replace("PROGRAM_FITS", "GRADIENT_FITS")


@pytest.mark.slow
def test_two_gloo_ranks_give_the_single_process_fit_with_gradient_m_steps(tmp_path):
    """ECME steps on the objective and Q's gradient steps (with cut-backs), over ranks
    whose values and gradients are summed: every rank the same bits, and the
    single-process fit to the precision that fit itself has. L-BFGS stops where the
    objective's value stops changing, so its end point carries round-off at about the
    square root of float64's precision: the single-process fit of the same data in
    another order moves by up to 3.5e-9 (parameters) and 2.3e-10 (history, relative); two
    ranks differ from one process by as much (3.5e-9 and 2.4e-10 measured; 1e-13 on the
    scale mixture). A prior counted on both ranks moves the scale by 4e-3; gradients left
    unsummed send the ranks apart."""
    ranks = _launch(tmp_path, worker=GRADIENT_WORKER)
    for key in ranks[0]:
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key], err_msg=key)
    for name, (data, run) in GRADIENT_FITS.items():
        single = run(data())
        assert "gradient" in single.m_step_kinds.values(), name
        assert ranks[0][f"{name}/processes"] == 2, name
        assert ranks[0][f"{name}/num_data"] == single.num_data, name
        objective = ranks[0][f"{name}/objective"]
        assert objective.shape == single.history.objective.shape, name
        np.testing.assert_allclose(objective, single.history.objective, rtol=1e-9, err_msg=name)
        for key, value in single.params.items():
            np.testing.assert_allclose(
                ranks[0][f"{name}/{key}"], value.numpy(), rtol=0, atol=1e-7, err_msg=name
            )


AGREE_WORKER = textwrap.dedent(
    """
    import sys

    import numpy as np
    import torch.distributed as dist

    from pyroem.engines.distributed import Collective
    from pyroem.errors import DataError, SingularCovarianceError

    dist.init_process_group("gloo")
    group = Collective()
    rank = group.rank
    cases = {
        # (rank 0's error, rank 1's error)
        "none": (None, None),
        "program": (None, ValueError("outside the support")),
        "numerical": (SingularCovarianceError("singular"), ValueError("outside the support")),
        "input": (ValueError("outside the support"), DataError("bad shard")),
        "uncaught": (ValueError("outside the support"), IndexError("out of range")),
    }
    result = {}
    for name, errors in cases.items():
        try:
            group.agree(errors[rank])
            result[name] = "none"
        except Exception as err:
            own = err is errors[rank]
            result[name] = ("own " if own else "stand-in ") + type(err).__name__
    np.savez(f"{sys.argv[1]}/rank{rank}.npz", **{k: np.array(v) for k, v in result.items()})
    dist.destroy_process_group()
    """
)


def _errors_seen(tmp_path: Path, worker: str) -> list[dict[str, str]]:
    """What each of two ranks running ``worker`` met, case by case."""
    ranks = _launch(tmp_path, worker=worker)
    return [{name: str(value) for name, value in rank.items()} for rank in ranks]


@pytest.mark.slow
def test_a_failure_on_one_rank_is_a_failure_of_the_same_kind_on_every_rank(tmp_path):
    """Where one rank's step fails, every rank raises an error of the gravest kind met (an
    input error ends the fit, a numerical one a restart, an uncaught one the fit, a
    ValueError or RuntimeError drops SQUAREM's point),
    so the ranks take the same branch and none waits on a collective."""
    seen = _errors_seen(tmp_path, AGREE_WORKER)
    assert seen[0] == {
        "none": "none",
        "program": "stand-in RuntimeError",
        "numerical": "own SingularCovarianceError",
        "input": "stand-in DataError",
        # An error no loop catches ends the fit on every rank (SQUAREM would have caught
        # a RuntimeError stand-in, and waited on a rank that had left).
        "uncaught": "stand-in RankFailure",
    }
    assert seen[1] == {
        "none": "none",
        "program": "own ValueError",
        "numerical": "stand-in PyroEMError",
        "input": "own DataError",
        "uncaught": "own IndexError",
    }


# ----- SVI over ranks -------------------------------------------------------------------

SVI_COMMON = {"method": "vb-em", "seed": 3, "max_iter": 80, "window": 0, "num_draws": 10}

SVI_FITS = {
    # AutoDelta from the default start (a MAP-EM fit, itself split over the ranks).
    "delta": (
        program_data,
        lambda data: pyroem.fit(
            mixture_program, data, guide="delta", learning_rate=0.02, **SVI_COMMON
        ),
    ),
}

SVI_WORKER = PROGRAM_WORKER.replace("PROGRAM_FITS", "SVI_FITS")


@pytest.mark.slow
def test_two_gloo_ranks_give_the_single_process_svi_fit(tmp_path):
    """Data-parallel SVI with AutoDelta: each rank's ELBO covers its shard, the global
    sites' prior terms on rank 0 only, ELBOs and gradients summed: the single-process
    fit (its MAP-EM start split over the ranks too), every rank the same bits."""
    ranks = _launch(tmp_path, worker=SVI_WORKER)
    for key in ranks[0]:
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key], err_msg=key)
    for name, (data, run) in SVI_FITS.items():
        single = run(data())
        assert ranks[0][f"{name}/processes"] == 2, name
        assert ranks[0][f"{name}/num_data"] == single.num_data == data().numel(), name
        objective = ranks[0][f"{name}/objective"]
        assert objective.shape == single.history.objective.shape == (81,), name
        np.testing.assert_allclose(objective, single.history.objective, rtol=1e-12, err_msg=name)
        for key, value in single.params.items():
            np.testing.assert_allclose(
                ranks[0][f"{name}/{key}"], value.numpy(), rtol=0, atol=1e-10, err_msg=name
            )


SVI_FAILURE_WORKER = textwrap.dedent(
    """
    import os
    import sys
    import warnings

    import numpy as np
    import torch.distributed as dist

    dist.init_process_group("gloo")
    sys.path.insert(0, sys.argv[3])
    import pyroem
    from pyroem.errors import SingularCovarianceError
    from test_distributed import mixture_program, program_data

    rank, size = dist.get_rank(), dist.get_world_size()
    data = program_data()
    data = data[rank * len(data) // size : (rank + 1) * len(data) // size]
    cases = {
        "program": ValueError("outside the support"),
        "numerical": SingularCovarianceError("singular"),
        "uncaught": IndexError("out of range"),
    }
    result = {}
    for name, error in cases.items():
        steps = []

        def program(data):
            # Rank 1's program fails at the third SVI step, rank 0's never.
            if rank == 1 and len(steps) == 2:
                raise error
            mixture_program(data)

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pyroem.fit(
                    program, data, method="vb-em", guide="delta", init="prior", max_iter=5,
                    callback=steps.append,
                )
            result[name] = "none"
        except Exception as err:
            result[name] = type(err).__name__
    np.savez(f"{sys.argv[1]}/rank{rank}.npz", **{k: np.array(v) for k, v in result.items()})
    # The ranks' results are written: leave without the group's teardown, which after a
    # failed step could abort ("terminate called without an active exception") on a
    # loaded machine; a rank left waiting in a collective still fails by the timeout.
    sys.stdout.flush()
    os._exit(0)
    """
)


@pytest.mark.slow
def test_an_svi_step_that_fails_on_one_rank_fails_alike_on_every_rank(tmp_path):
    """An SVI step whose program fails on one rank: every rank raises an error of the
    kind Collective.agree gives (tested above), in the collective that sums the
    step's loss and gradients, so the ranks take the same branch and none waits."""
    seen = _errors_seen(tmp_path, SVI_FAILURE_WORKER)
    assert seen[0] == {
        "program": "RuntimeError",
        # A numerical error ends the restart on every rank: here the only one.
        "numerical": "PyroEMError",
        "uncaught": "RankFailure",
    }
    assert seen[1] == {
        "program": "ValueError",
        "numerical": "SingularCovarianceError",
        "uncaught": "IndexError",
    }


def test_a_gradient_evaluation_that_fails_uncaught_on_one_rank_ends_every_rank():
    """An error no loop catches (here an IndexError of the program) on one rank still
    joins the collective of the L-BFGS evaluation, so every rank ends the fit: the
    failing rank with its own error, the others with a stand-in (none waits)."""
    from pyroem.engines.distributed import RankFailure, failure_flags
    from pyroem.mstep import gradient

    calls = []

    def other_rank_failed(tensors):
        # The sum over two ranks where the other rank's evaluation raised uncaught.
        calls.append(len(tensors))
        other = failure_flags(IndexError("out of range"))
        return [tensors[0] + 1.0, tensors[1] + other, *tensors[2:]]

    def fine():
        return torch.tensor(2.0, dtype=torch.float64)

    def broken():
        raise IndexError("index 5 is out of bounds")

    with pytest.raises(RankFailure, match="another rank"):
        gradient._total(fine, other_rank_failed)
    with pytest.raises(IndexError):
        gradient._total(broken, lambda tensors: list(tensors))
    leaf = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RankFailure, match="another rank"):
        gradient.summed_loss(lambda: (leaf**2).sum(), [leaf], other_rank_failed)
    with pytest.raises(IndexError):
        gradient.summed_loss(broken, [leaf], lambda tensors: list(tensors))
    # Every call reached the collective before raising.
    assert calls == [2, 3]
    # A ValueError stays a NaN (a line search steps back), as in one process.

    def invalid():
        raise ValueError("outside the support")

    assert math.isnan(gradient._total(invalid, lambda tensors: list(tensors)))
