"""``num_threads``: the fit runs on the threads asked for (one by default on a small
problem, a ``Mixture`` or a Pyro program) and leaves torch's thread setting as it found
it."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import pyroem
import pyroem.api
from pyroem.em import Iteration


@pytest.fixture
def two_threads() -> Iterator[None]:
    """Torch set to two threads for the test, the caller's setting restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def _data() -> np.ndarray:
    generator = np.random.default_rng(0)
    return np.r_[generator.normal(0.0, 1.0, (60, 2)), generator.normal(8.0, 1.0, (60, 2))]


def _threads_seen(**options: object) -> list[int]:
    seen: list[int] = []

    def record(iteration: Iteration) -> None:
        seen.append(torch.get_num_threads())

    spec = pyroem.Mixture(2, prior="mclust")
    pyroem.fit(spec, _data(), seed=0, max_iter=5, callback=record, **options)
    return seen


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("count", [1, 3])
def test_num_threads_takes_effect_during_the_fit_only(count: int) -> None:
    seen = _threads_seen(num_threads=count)
    assert seen and set(seen) == {count}
    assert torch.get_num_threads() == 2


@pytest.mark.usefixtures("two_threads")
def test_a_small_mixture_runs_on_one_thread_by_default() -> None:
    assert 120 * 2 * 2 < pyroem.api.SMALL_PROBLEM_WORK
    assert set(_threads_seen()) == {1}
    assert torch.get_num_threads() == 2


@pytest.mark.usefixtures("two_threads")
@pytest.mark.filterwarnings("ignore::pyroem.errors.MCMCWarning")
@pytest.mark.filterwarnings("ignore::pyroem.ConvergenceWarning")
def test_a_small_mixture_fitted_through_its_program_runs_on_one_thread() -> None:
    """mcmc-em runs a ``Mixture`` as a Pyro program; the ``Mixture``'s rule still holds."""
    seen: list[int] = []
    options = {"schedule": "mcem", "num_samples": 4, "max_samples": 8, "final_draws": 4}
    pyroem.fit(
        pyroem.Mixture(2, prior="mclust"),
        _data(),
        method="mcmc-em",
        seed=0,
        max_iter=2,
        num_chains=1,
        warmup_steps=4,
        callback=lambda iteration: seen.append(torch.get_num_threads()),
        **options,
    )
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2


@pytest.mark.usefixtures("two_threads")
def test_a_large_problem_keeps_torch_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pyroem.api, "SMALL_PROBLEM_WORK", 100)  # 120·2·2 is above it
    assert set(_threads_seen()) == {2}
    assert torch.get_num_threads() == 2


@pytest.mark.usefixtures("two_threads")
def test_threads_are_restored_when_the_fit_fails() -> None:
    data = _data()
    data[3, 1] = np.inf
    with pytest.raises(pyroem.DataError):
        pyroem.fit(pyroem.Mixture(2, prior="mclust"), data, num_threads=1)
    assert torch.get_num_threads() == 2


def _program_threads_seen(method: str, **options: object) -> list[int]:
    """The torch threads each run of a two-component mixture program saw during the
    fit; ``options`` go to :func:`pyroem.fit` (``model_kwargs`` reach the program)."""
    seen: list[int] = []

    def program(data: torch.Tensor, unused: object = None) -> None:
        seen.append(torch.get_num_threads())
        weights = pyro.sample("weights", dist.Dirichlet(data.new_ones(2)))
        with pyro.plate("components", 2):
            locs = pyro.sample("locs", dist.Normal(data.new_zeros(()), 10.0))
        with pyro.plate("data", data.shape[0]):
            z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
            pyro.sample("obs", dist.Normal(locs[z], 1.0), obs=data)

    data = torch.tensor(_data()[:, 0])
    pyroem.fit(program, data, method=method, seed=0, max_iter=3, **options)
    return seen


@pytest.mark.usefixtures("two_threads")
@pytest.mark.filterwarnings("ignore::pyroem.ConvergenceWarning")
@pytest.mark.parametrize("method", ["map-em", "vb-em"])
def test_a_program_with_small_tensors_runs_on_one_thread_by_default(method: str) -> None:
    seen = _program_threads_seen(method)
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2
    assert 120 < pyroem.api.SMALL_PROGRAM_NUMEL


@pytest.mark.usefixtures("two_threads")
def test_a_program_with_a_large_tensor_keeps_torch_threads() -> None:
    # The largest tensor counts wherever it is among the arguments, here inside a dict
    # of model_kwargs: 2**22 elements reach the threshold.
    large = {"table": [torch.zeros(pyroem.api.SMALL_PROGRAM_NUMEL, dtype=torch.bool)]}
    seen = _program_threads_seen("map-em", model_kwargs={"unused": large})
    assert seen and set(seen) == {2}
    assert torch.get_num_threads() == 2


@pytest.mark.usefixtures("two_threads")
def test_num_threads_is_honoured_on_a_program() -> None:
    seen = _program_threads_seen("map-em", num_threads=2)
    assert seen and set(seen) == {2}
    torch.set_num_threads(3)
    seen = _program_threads_seen("map-em", num_threads=1)
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 3


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_num_threads_must_be_a_positive_integer(bad: object) -> None:
    with pytest.raises(pyroem.SpecError, match="num_threads must be an integer >= 1"):
        pyroem.fit(pyroem.Mixture(2, prior="mclust"), _data(), num_threads=bad)


@pytest.mark.usefixtures("two_threads")
def test_the_cli_threads_option_reaches_the_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    from pyroem import cli

    settings: list[int] = []
    set_num_threads = torch.set_num_threads

    def record(count: int) -> None:
        settings.append(count)
        set_num_threads(count)

    monkeypatch.setattr(torch, "set_num_threads", record)
    argv = ["fit", "--dataset", "faithful", "--components", "2", "--threads", "3", "--quiet"]
    argv += ["--prior", "mclust"]
    assert cli.main(argv) == 0
    assert settings == [3, 2]  # set for the fit, then restored
    assert torch.get_num_threads() == 2
