"""The run that sorts a program's sites doubles as its first enumerated trace.

``ProgramModel(..., sort_enumerated=True)`` runs the program once under Pyro's
parallel enumeration, its first enumerated dimension chosen at the first discrete
latent, and sorts the sites on that run. Where it is the trace Pyro's enumeration
gives with the program's own ``max_plate_nesting`` (``poutine.enum`` with
``first_available_dim = -1 - max_plate_nesting``, as ``ProgramModel.trace`` runs it),
``sorting_trace`` hands it out, and a fit needs no second whole run. Checked here:

- the trace handed out has, site for site, the tables, enumeration dimensions and
  packed symbols of Pyro's enumerated trace at the same values (bit for bit), and the
  sites and starting values sort as on an ordinary run (random initial values drawn
  the same way);
- it is not handed out for a program whose deeper plate appears only after the first
  discrete latent, one that draws random numbers in its body, one with latent
  parameters (sampled by the sorting run), or at other parameter values.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import config_enumerate
from torch.distributions import constraints

from pyroem.model.program import ProgramModel, sample_sites


@pytest.fixture(autouse=True)
def _float64() -> None:
    torch.set_default_dtype(torch.float64)


def _weights() -> torch.Tensor:
    return pyro.param("weights", lambda: torch.tensor([0.5, 0.5]), constraint=constraints.simplex)


def _hmm(data: torch.Tensor) -> None:
    """A Gaussian HMM over two sequences, random start for the means."""
    init = pyro.param("init", lambda: torch.tensor([0.6, 0.4]), constraint=constraints.simplex)
    trans = pyro.param(
        "trans", lambda: torch.tensor([[0.7, 0.3], [0.2, 0.8]]), constraint=constraints.simplex
    )
    locs = pyro.param("locs", lambda: torch.randn(2))
    with pyro.plate("sequences", data.shape[0]):
        state = None
        for t in pyro.markov(range(data.shape[1])):
            probs = init if state is None else trans[state]
            state = pyro.sample(f"state_{t}", dist.Categorical(probs))
            pyro.sample(f"obs_{t}", dist.Normal(locs[state], 1.0), obs=data[:, t])


def _features(data: torch.Tensor) -> None:
    """A mixture whose feature plate, nested in the data plate, opens after the latent."""
    weights = _weights()
    locs = pyro.param("locs", lambda: torch.tensor([[-1.0, 0.0, 1.0], [1.0, 0.5, -1.0]]))
    with pyro.plate("data", data.shape[0], dim=-1):
        z = pyro.sample("z", dist.Categorical(weights))
        with pyro.plate("features", data.shape[1], dim=-2):
            loc = locs[z, torch.arange(data.shape[1]).unsqueeze(-1)]
            pyro.sample("obs", dist.Normal(loc, 1.0), obs=data.T)


def _drawing(draw: Callable[[], float], source: str) -> Callable[[torch.Tensor], None]:
    """A mixture that draws a random number from ``source`` in its body (every run draws
    anew, though the number is multiplied by zero)."""

    def model(data: torch.Tensor) -> None:
        weights = _weights()
        locs = pyro.param("locs", lambda: torch.tensor([-1.0, 1.0]))
        shift = 0.0 * float(draw())
        with pyro.plate("data", data.shape[0]):
            z = pyro.sample("z", dist.Categorical(weights))
            pyro.sample("obs", dist.Normal(locs[z] + shift, 1.0), obs=data)

    model.__name__ = f"_{source}_noisy"
    return model


_noisy = _drawing(lambda: float(torch.rand(())), "torch")
_numpy_noisy = _drawing(lambda: float(np.random.normal()), "numpy")  # noqa: NPY002
_python_noisy = _drawing(random.random, "python")


def _latent_locs(data: torch.Tensor) -> None:
    """A mixture with a prior on its means: a latent parameter the sorting run samples."""
    weights = _weights()
    with pyro.plate("components", 2):
        locs = pyro.sample("locs", dist.Normal(0.0, 3.0))
    with pyro.plate("data", data.shape[0]):
        z = pyro.sample("z", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[z], 1.0), obs=data)


def _pyro_enumerated(
    model: Callable[..., None], values: dict[str, torch.Tensor], nesting: int, *args: object
) -> poutine.Trace:
    """Pyro's own enumerated trace at ``values``, scored and packed."""
    program = poutine.enum(
        poutine.substitute(config_enumerate(model, default="parallel"), data=values),
        first_available_dim=-1 - nesting,
    )
    with pyro.get_param_store().scope(), pyro.validation_enabled(False):
        trace = poutine.trace(program).get_trace(*args)
    trace.compute_log_prob()
    trace.pack_tensors()
    return trace


def test_sorting_trace_is_pyros_enumerated_trace() -> None:
    data = torch.randn(2, 6)
    pyro.set_rng_seed(3)
    plain = ProgramModel(_hmm, (data,))
    pyro.set_rng_seed(3)
    program = ProgramModel(_hmm, (data,), check_enumeration=False, sort_enumerated=True)
    # The same sites and starting values (the random means drawn the same way).
    assert program.enumerated == plain.enumerated and program.observed == plain.observed
    assert program.max_plate_nesting == plain.max_plate_nesting == 1
    for name, value in plain.param_inits.items():
        assert torch.equal(program.param_inits[name], value), name
    values = {name: value.clone() for name, value in program.param_inits.items()}
    trace = program.sorting_trace(values)
    assert trace is not None
    assert program.sorting_trace(values) is None  # handed out once
    reference = _pyro_enumerated(_hmm, values, 1, data)
    ours, theirs = sample_sites(trace), sample_sites(reference)
    assert [name for name, _ in ours] == [name for name, _ in theirs]
    for (name, site), (_, other) in zip(ours, theirs, strict=True):
        assert torch.equal(site["unscaled_log_prob"], other["unscaled_log_prob"]), name
        assert torch.equal(site["value"], other["value"]), name
        assert site["infer"].get("_enumerate_dim") == other["infer"].get("_enumerate_dim")
        assert site["packed"]["log_prob"]._pyro_dims == other["packed"]["log_prob"]._pyro_dims


@pytest.mark.parametrize(
    "model",
    [_features, _noisy, _numpy_noisy, _python_noisy, _latent_locs],
    ids=["late-plate", "body-draw", "numpy-draw", "python-random-draw", "latent"],
)
def test_sorting_trace_is_not_handed_out_where_it_differs(model: Callable[..., None]) -> None:
    data = torch.randn(5) if model is not _features else torch.randn(5, 3)
    program = ProgramModel(model, (data,), check_enumeration=False, sort_enumerated=True)
    plain = ProgramModel(model, (data,))
    assert program.max_plate_nesting == plain.max_plate_nesting
    assert list(program.params) == list(plain.params)
    values = {name: value.clone() for name, value in program.param_inits.items()}
    if model is _latent_locs:
        values["locs"] = torch.tensor([-1.0, 1.0])
    assert program.sorting_trace(values) is None
    # The ordinary enumerated trace still runs.
    assert program.trace(values).nodes["obs"]["unscaled_log_prob"].shape[0] == 2


def test_sorting_trace_is_not_handed_out_at_other_values() -> None:
    data = torch.randn(2, 4)
    program = ProgramModel(_hmm, (data,), check_enumeration=False, sort_enumerated=True)
    values = {name: value.clone() for name, value in program.param_inits.items()}
    values["locs"] = values["locs"] + 1.0
    assert program.sorting_trace(values) is None
