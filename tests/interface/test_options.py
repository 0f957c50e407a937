"""Every common option of ``pyroem.fit`` against every method: it takes effect where
``pyroem.options.OPTIONS`` says it applies, and raises ``SpecError`` naming the method
and the alternative where it does not."""

from __future__ import annotations

import inspect
import os
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyroem
from pyroem.errors import SpecError
from pyroem.fits.checkpoint import Checkpoint
from pyroem.options import OPTIONS

METHODS = ("map-em", "vb-em", "mcmc-em", "nuts")
# Small settings of each method so that the sweep stays fast.
SETTINGS: dict[str, dict[str, Any]] = {
    "map-em": {},
    "vb-em": {"num_draws": 5},
    "mcmc-em": {"schedule": "mcem", "num_samples": 20, "final_draws": 20},
    "nuts": {"num_samples": 10, "warmup_steps": 10, "num_chains": 1},
}
PROGRAM_SETTINGS = {"vb-em": {"window": 5, "num_draws": 5, "num_elbo_particles": 2}}
DATA = torch.cat(
    [torch.randn(15, generator=torch.Generator().manual_seed(0)) - 3, torch.randn(15) + 3]
)
seen_kwargs: list[Any] = []


def _program(data: torch.Tensor, scale: float = 1.0) -> None:
    seen_kwargs.append(scale)
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(2, dtype=data.dtype)))
    locs = pyro.sample("locs", dist.Normal(torch.zeros(2, dtype=data.dtype), 10.0).to_event(1))
    with pyro.plate("data", len(data)):
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(locs[z], scale), obs=data)


def _model(kind: str) -> tuple[Any, tuple[Any, ...]]:
    if kind == "program":
        return _program, (DATA.double(),)
    return pyroem.Mixture(2, "gaussian"), (DATA.double()[:, None],)


def _fit(method: str, kind: str, **options: Any) -> Any:
    model, args = _model(kind)
    settings = {
        **SETTINGS[method],
        **(PROGRAM_SETTINGS.get(method, {}) if kind == "program" else {}),
    }
    options = {"max_iter": 3, **options} if method != "nuts" else options
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pyroem.fit(model, *args, method=method, **{"seed": 0, **settings, **options})


def _calls() -> tuple[dict[str, Any], Callable[..., None]]:
    record: dict[str, Any] = {"calls": 0}

    def callback(state: Any) -> None:
        record["calls"] += 1

    return record, callback


def _check_effect(name: str, method: str, kind: str, capsys: Any) -> None:
    """Fit with option ``name`` set away from its default and check it took effect."""
    if name == "n_init":
        assert len(_fit(method, kind, n_init=2).restart_objectives) == 2
    elif name == "init":
        key = "locs" if kind == "program" else "weights"
        init: Any = {"locs": torch.tensor([-3.0, 3.0], dtype=torch.float64)}
        started = _fit(method, kind, init=init if kind == "program" else "random")
        assert not torch.equal(started.params[key], _fit(method, kind).params[key])
    elif name == "tol":
        assert _fit(method, kind, tol=1e9, max_iter=50).converged
    elif name == "max_iter":
        assert 1 <= _fit(method, kind, max_iter=2, tol=0.0).num_iterations <= 2
    elif name == "seed":
        first, second = (_fit(method, kind, seed=5) for _ in range(2))
        for key, value in first.params.items():
            torch.testing.assert_close(second.params[key], value, rtol=0, atol=0)
    elif name == "dtype":
        assert _fit(method, kind, dtype="float32").params["weights"].dtype == torch.float32
    elif name == "device":
        assert _fit(method, kind, device="cpu").params["weights"].device.type == "cpu"
    elif name == "chunk_size":
        fit = _fit(method, kind, chunk_size=7)
        assert fit.options["chunk_size"] == 7
    elif name == "progress":
        _fit(method, kind, progress=True)
        assert "it" in capsys.readouterr().err
    elif name == "model_kwargs":
        seen_kwargs.clear()
        _fit(method, kind, model_kwargs={"scale": 2.0})
        assert 2.0 in seen_kwargs and 1.0 not in seen_kwargs
    elif name == "m_step":
        fit = _fit(method, kind, m_step="gradient")
        assert set(fit.m_step_kinds.values()) == {"gradient"}
    elif name == "gradient_steps":
        assert (
            _fit(method, kind, m_step="gradient", gradient_steps=3).options["gradient_steps"] == 3
        )
    elif name == "callback":
        record, callback = _calls()
        fit = _fit(method, kind, callback=callback, max_iter=2, tol=0.0)
        assert record["calls"] == fit.num_iterations >= 1
    elif name in ("checkpoint", "checkpoint_every", "resume"):
        _check_checkpoint(name, method, kind)
    elif name == "accelerate":
        assert _fit(method, kind, accelerate="squarem").options["accelerate"] == "squarem"
    else:
        raise AssertionError(f"no check for option {name}")


def _check_checkpoint(name: str, method: str, kind: str) -> None:
    """``checkpoint`` writes the file, ``checkpoint_every`` writes it more often, and
    ``resume`` continues from it (the start's elapsed time comes from the file)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "run.ckpt")
        if name == "checkpoint":
            _fit(method, kind, checkpoint=path)
            assert os.path.exists(path)
        elif name == "checkpoint_every":
            writes: list[int] = []
            original = Checkpoint.write

            def counted(self: Checkpoint, state: dict[str, Any]) -> None:
                writes.append(1)
                original(self, state)

            Checkpoint.write = counted  # type: ignore[method-assign]
            try:
                _fit(method, kind, checkpoint=path, checkpoint_every=1, max_iter=2, tol=0.0)
            finally:
                Checkpoint.write = original  # type: ignore[method-assign]
            # After iterations 1 and 2, and when the run stops (the default: only then).
            assert len(writes) == 3
        else:
            first = _fit(method, kind, checkpoint=path, max_iter=1, tol=0.0)
            resumed = _fit(method, kind, checkpoint=path, resume=True, max_iter=2, tol=0.0)
            assert resumed.history.elapsed[0] == first.history.elapsed[0]
            assert resumed.num_iterations == 2


_NON_DEFAULT = {
    "n_init": 2,
    "init": {"locs": torch.tensor([-3.0, 3.0])},
    "tol": 1e-3,
    "max_iter": 2,
    "seed": 5,
    "dtype": "float32",
    "device": "cpu",
    "chunk_size": 7,
    "progress": True,
    "model_kwargs": {"scale": 2.0},
    "m_step": "gradient",
    "gradient_steps": 3,
    "callback": print,
    "checkpoint": "run.ckpt",
    "checkpoint_every": 5,
    "resume": True,
    "accelerate": "squarem",
}


def _applies(name: str, method: str, kind: str) -> bool:
    where = OPTIONS[name].applies.get(method)
    return where == "any" or where == kind or (where == "Mixture" and kind.startswith("Mixture"))


@pytest.mark.parametrize("kind", ["Mixture", "program"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_every_option_takes_effect_or_raises(
    name: str, method: str, kind: str, capsys: Any
) -> None:
    table_kind = "Mixture (CAVI)" if kind == "Mixture" and method == "vb-em" else kind
    if _applies(name, method, table_kind):
        _check_effect(name, method, kind, capsys)
        return
    value = _NON_DEFAULT[name]
    if name == "init" and kind == "Mixture":
        value = "random"
    with pytest.raises(SpecError, match=rf"{name} does not apply to method='{method}'.*applies to"):
        _fit(method, kind, **{name: value})


def test_error_names_the_alternative() -> None:
    with pytest.raises(SpecError, match="for nuts use num_chains"):
        _fit("nuts", "Mixture", n_init=3)
    with pytest.raises(SpecError, match="num_samples and warmup_steps"):
        _fit("nuts", "program", max_iter=10)


def test_table_defaults_are_fits_defaults() -> None:
    parameters = inspect.signature(pyroem.fit).parameters
    for name, option in OPTIONS.items():
        assert parameters[name].default == option.default, name
