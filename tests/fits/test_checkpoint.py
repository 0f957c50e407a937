"""Checkpoints and resuming (``checkpoint=``, ``checkpoint_every=``, ``resume=``).

The reference of every test is the same fit run without interruption: a fit
interrupted (Ctrl-C, raised from the callback) or stopped by ``max_iter`` and then
resumed from its checkpoint must equal it exactly: bit for bit for map-em and CAVI,
and, for SVI and MCMC-EM, because the resumed fit draws the same random stream.
"""

from __future__ import annotations

import importlib
import os
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import pyroem
from pyroem import cli
from pyroem.em import Iteration
from pyroem.errors import FitFileError, NotSupportedError, SpecError

POSITIVE = dist.constraints.positive


def _data() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.r_[
        rng.normal(0.0, 1.0, (40, 2)),
        rng.normal(3.0, 1.5, (40, 2)),
        rng.normal((0.0, 5.0), 0.7, (40, 2)),
    ]


def _interrupt_at(restart: int, iteration: int) -> Callable[[Iteration], None]:
    def callback(state: Iteration) -> None:
        if state.restart == restart and state.iteration == iteration:
            raise KeyboardInterrupt

    return callback


def _quiet(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


def _interrupted_then_resumed(
    path: Path, model: Any, args: tuple[Any, ...], stop: tuple[int, int], **options: Any
) -> tuple[Any, Any]:
    """The uninterrupted fit, and the fit interrupted at ``stop`` (restart, iteration)
    then resumed from its checkpoint."""
    reference = _quiet(pyroem.fit, model, *args, **options)
    stopped = _quiet(
        pyroem.fit,
        model,
        *args,
        callback=_interrupt_at(*stop),
        checkpoint=path,
        checkpoint_every=3,
        **options,
    )
    assert stopped.options["interrupted"]
    assert path.exists()
    resumed = _quiet(pyroem.fit, model, *args, checkpoint=path, resume=True, **options)
    return reference, resumed


def _assert_same_fit(reference: Any, resumed: Any) -> None:
    assert resumed.params.keys() == reference.params.keys()
    for name, value in reference.params.items():
        assert torch.equal(resumed.params[name], value), name
    assert np.array_equal(resumed.history.objective, reference.history.objective, equal_nan=True)
    assert np.array_equal(
        resumed.history.log_likelihood, reference.history.log_likelihood, equal_nan=True
    )
    assert resumed.num_iterations == reference.num_iterations
    assert resumed.converged == reference.converged
    assert np.array_equal(resumed.restart_objectives, reference.restart_objectives, equal_nan=True)
    assert "interrupted" not in resumed.options


@pytest.mark.parametrize("method", ["map-em", "vb-em"])
def test_interrupted_mixture_fit_resumes_bit_for_bit(tmp_path: Path, method: str) -> None:
    data = _data()
    reference, resumed = _interrupted_then_resumed(
        tmp_path / "run.ckpt",
        pyroem.Mixture(3),
        (data,),
        stop=(1, 7),
        method=method,
        seed=1,
        n_init=3,
        max_iter=60,
    )
    _assert_same_fit(reference, resumed)
    assert torch.equal(resumed.labels, reference.labels)
    assert torch.equal(resumed.predict_proba(data), reference.predict_proba(data))
    if method == "vb-em":
        assert resumed.elbo == reference.elbo
        for name, draws in reference.draws.items():
            assert torch.equal(resumed.draws[name], draws), name
        assert torch.equal(
            resumed.variational["assignment"]["probs"], reference.variational["assignment"]["probs"]
        )


def test_fit_stopped_by_max_iter_continues_every_restart(tmp_path: Path) -> None:
    data = _data()
    options = {"seed": 2, "n_init": 2}
    reference = _quiet(pyroem.fit, pyroem.Mixture(3), data, max_iter=300, **options)
    path = tmp_path / "run.ckpt"
    short = _quiet(pyroem.fit, pyroem.Mixture(3), data, max_iter=4, checkpoint=path, **options)
    assert short.num_iterations == 4 and not short.converged
    resumed = _quiet(
        pyroem.fit, pyroem.Mixture(3), data, max_iter=300, checkpoint=path, resume=True, **options
    )
    # Both restarts went on from iteration 4: the fit is the uninterrupted one.
    _assert_same_fit(reference, resumed)
    assert reference.converged


def test_streamed_fit_resumes_bit_for_bit(tmp_path: Path) -> None:
    source = tmp_path / "data.npy"
    np.save(source, _data())
    reference, resumed = _interrupted_then_resumed(
        tmp_path / "run.ckpt",
        pyroem.Mixture(3),
        (str(source),),
        stop=(1, 4),
        seed=0,
        n_init=2,
        chunk_size=50,
    )
    _assert_same_fit(reference, resumed)
    with pytest.raises(NotSupportedError, match="stepwise cannot write checkpoints"):
        pyroem.fit(pyroem.Mixture(3), str(source), stepwise=True, checkpoint=tmp_path / "step.ckpt")


def test_checkpoint_every_seconds_writes_when_stopped(tmp_path: Path) -> None:
    data = _data()
    path = tmp_path / "run.ckpt"
    reference = _quiet(pyroem.fit, pyroem.Mixture(3), data, seed=0, max_iter=50)
    # A long interval: the only write is the one when the run is interrupted.
    checkpoint_module = importlib.import_module("pyroem.fits.checkpoint")
    writes: list[int] = []
    original = checkpoint_module.Checkpoint.write

    def counting(self: Any, state: dict[str, Any]) -> None:
        writes.append(1)
        original(self, state)

    checkpoint_module.Checkpoint.write = counting  # type: ignore[method-assign]
    try:
        _quiet(
            pyroem.fit,
            pyroem.Mixture(3),
            data,
            seed=0,
            max_iter=50,
            callback=_interrupt_at(0, 5),
            checkpoint=path,
            checkpoint_every="3600s",
        )
    finally:
        checkpoint_module.Checkpoint.write = original  # type: ignore[method-assign]
    assert len(writes) == 1
    resumed = _quiet(
        pyroem.fit, pyroem.Mixture(3), data, seed=0, max_iter=50, checkpoint=path, resume=True
    )
    _assert_same_fit(reference, resumed)


def _program_data() -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.tensor(np.r_[rng.normal(-2, 1, 40), rng.normal(2, 1, 40)])


def _latent_mixture(x: torch.Tensor) -> None:
    weights = pyro.sample("w", dist.Dirichlet(torch.ones(2, dtype=x.dtype)))
    loc = pyro.sample("loc", dist.Normal(torch.zeros(2, dtype=x.dtype), 10.0).to_event(1))
    scale = pyro.param("scale", torch.tensor(1.0, dtype=x.dtype), constraint=POSITIVE)
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(loc[z], scale), obs=x)


def _param_mixture(x: torch.Tensor) -> None:
    weights = pyro.param("w", torch.ones(2, dtype=x.dtype) / 2, constraint=dist.constraints.simplex)
    loc = pyro.param("loc", torch.tensor([-1.0, 1.0], dtype=x.dtype))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(loc[z], 1.0), obs=x)


def test_interrupted_program_fit_resumes_bit_for_bit(tmp_path: Path) -> None:
    reference, resumed = _interrupted_then_resumed(
        tmp_path / "run.ckpt",
        _latent_mixture,
        (_program_data(),),
        stop=(1, 5),
        method="map-em",
        seed=3,
        n_init=2,
        max_iter=60,
        # A checkpointed fit is plain EM (the default "auto" would accelerate this
        # program's uninterrupted fit, whose scale has a gradient M-step).
        accelerate=None,
    )
    _assert_same_fit(reference, resumed)


def test_accelerated_fit_refuses_a_checkpoint_before_fitting(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="accelerate=None"):
        pyroem.fit(
            _latent_mixture,
            _program_data(),
            method="map-em",
            accelerate="squarem",
            checkpoint=tmp_path / "run.ckpt",
        )
    assert not (tmp_path / "run.ckpt").exists()


def test_interrupted_svi_fit_draws_the_same_stream(tmp_path: Path) -> None:
    reference, resumed = _interrupted_then_resumed(
        tmp_path / "run.ckpt",
        _latent_mixture,
        (_program_data(),),
        stop=(1, 17),
        method="vb-em",
        seed=3,
        n_init=2,
        max_iter=40,
        num_draws=50,
        num_elbo_particles=5,
    )
    # The ELBO estimates, the optimiser's steps and the guide's draws all match.
    _assert_same_fit(reference, resumed)
    for name, draws in reference.draws.items():
        assert torch.equal(resumed.draws[name], draws), name


def test_interrupted_mcmc_em_fit_draws_the_same_stream(tmp_path: Path) -> None:
    reference, resumed = _interrupted_then_resumed(
        tmp_path / "run.ckpt",
        _param_mixture,
        (_program_data(),),
        stop=(1, 4),
        method="mcmc-em",
        seed=3,
        n_init=2,
        max_iter=8,
        num_samples=20,
    )
    _assert_same_fit(reference, resumed)
    for name, draws in reference.draws.items():
        assert torch.equal(resumed.draws[name], draws), name


@pytest.mark.slow
def test_interrupted_mcmc_em_with_nuts_chains_resumes(tmp_path: Path) -> None:
    # float64 data under torch's float32 default: the chains run in the program's dtype.
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(6), 8)
    y = torch.tensor(1.0 + rng.normal(0, 1.5, 6)[groups] + rng.normal(0, 0.5, 48))
    index = torch.tensor(groups)

    def random_intercepts(y: torch.Tensor, index: torch.Tensor) -> None:
        mu = pyro.param("mu", torch.tensor(0.0, dtype=y.dtype))
        tau = pyro.param("tau", torch.tensor(1.0, dtype=y.dtype), constraint=POSITIVE)
        sd = pyro.param("sd", torch.tensor(1.0, dtype=y.dtype), constraint=POSITIVE)
        with pyro.plate("groups", 6):
            b = pyro.sample("b", dist.Normal(torch.tensor(0.0, dtype=y.dtype), tau))
        with pyro.plate("data", 48):
            pyro.sample("y", dist.Normal(mu + b[..., index], sd), obs=y)

    reference, resumed = _interrupted_then_resumed(
        tmp_path / "run.ckpt",
        random_intercepts,
        (y, index),
        stop=(0, 3),
        method="mcmc-em",
        seed=3,
        max_iter=6,
        latents=["b"],
        num_samples=24,
        warmup_steps=20,
        final_draws=30,
    )
    _assert_same_fit(reference, resumed)
    for name, draws in reference.draws.items():
        assert torch.equal(resumed.draws[name], draws), name


def _short_checkpoint(path: Path, data: np.ndarray, **options: Any) -> None:
    _quiet(pyroem.fit, pyroem.Mixture(2), data, seed=0, max_iter=3, checkpoint=path, **options)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"model": pyroem.Mixture(3)}, "model: Mixture(num_components=2"),
        ({"method": "vb-em"}, "method: 'map-em' in the checkpoint, 'vb-em' now"),
        ({"rows": 100}, "data: array of shape (120, 2)"),
        ({"seed": 5}, "seed: 0 in the checkpoint, 5 now"),
    ],
)
def test_a_checkpoint_of_another_fit_is_refused(
    tmp_path: Path, change: dict[str, Any], named: str
) -> None:
    data = _data()
    path = tmp_path / "run.ckpt"
    _short_checkpoint(path, data)
    model = change.get("model", pyroem.Mixture(2))
    rows = change.get("rows", len(data))
    options = {"method": change.get("method", "map-em"), "seed": change.get("seed", 0)}
    with pytest.raises(FitFileError, match="written by a different fit") as err:
        pyroem.fit(model, data[:rows], checkpoint=path, resume=True, max_iter=3, **options)
    assert named in str(err.value)
    assert "resume=False" in str(err.value)


def _flip_a_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        member = next(info for info in archive.infolist() if info.filename != "meta.npy")
        # A byte inside the first stored array's data.
        offset = member.header_offset + 30 + len(member.filename) + member.file_size - 1
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "not_a_checkpoint"])
def test_a_damaged_checkpoint_is_refused(tmp_path: Path, damage: str) -> None:
    data = _data()
    path = tmp_path / "run.ckpt"
    _short_checkpoint(path, data)
    if damage == "flip":
        _flip_a_byte(path)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        with open(path, "wb") as handle:
            np.savez(handle, meta=np.array('{"format": "pyroem-fit"}'))
    with pytest.raises(FitFileError, match=f"checkpoint '{path}'"):
        pyroem.fit(pyroem.Mixture(2), data, seed=0, max_iter=3, checkpoint=path, resume=True)


def test_writing_is_atomic(tmp_path: Path) -> None:
    data = _data()
    path = tmp_path / "run.ckpt"
    _short_checkpoint(path, data)
    before = path.read_bytes()
    checkpoint_module = importlib.import_module("pyroem.fits.checkpoint")
    original = np.savez

    def failing(handle: Any, **arrays: Any) -> None:
        handle.write(b"partial")
        raise KeyboardInterrupt

    checkpoint_module.np.savez = failing  # type: ignore[assignment]
    try:
        stopped = _quiet(pyroem.fit, pyroem.Mixture(2), data, seed=0, max_iter=3, checkpoint=path)
    finally:
        checkpoint_module.np.savez = original
    # Ctrl-C while writing stops the fit cleanly; the interrupted write left the
    # previous checkpoint whole, and no temporary file.
    assert stopped.options["interrupted"]
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["run.ckpt"]


def test_checkpoint_options_are_checked(tmp_path: Path) -> None:
    data = _data()
    with pytest.raises(SpecError, match="resume=True needs checkpoint=PATH"):
        pyroem.fit(pyroem.Mixture(2), data, resume=True)
    with pytest.raises(SpecError, match="checkpoint_every needs checkpoint=PATH"):
        pyroem.fit(pyroem.Mixture(2), data, checkpoint_every=5)
    for every in (0, "soon", 2.5, "-3s"):
        with pytest.raises(SpecError, match="checkpoint_every must be an integer >= 1"):
            pyroem.fit(pyroem.Mixture(2), data, checkpoint=tmp_path / "a", checkpoint_every=every)
    with pytest.raises(SpecError, match="does not exist"):
        pyroem.fit(pyroem.Mixture(2), data, checkpoint=tmp_path / "missing" / "a.ckpt")
    with pytest.raises(SpecError, match=r"checkpoint does not apply to method='nuts'.*fit\.save"):
        pyroem.fit(pyroem.Mixture(2), data, method="nuts", checkpoint=tmp_path / "a")


def test_resume_without_a_file_starts_afresh(tmp_path: Path) -> None:
    data = _data()
    path = tmp_path / "run.ckpt"
    reference = _quiet(pyroem.fit, pyroem.Mixture(3), data, seed=0)
    fresh = _quiet(pyroem.fit, pyroem.Mixture(3), data, seed=0, checkpoint=path, resume=True)
    _assert_same_fit(reference, fresh)
    assert path.exists()


def test_cli_checkpoint_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["fit", "--dataset", "iris", "--components", "3", "--n-init", "2", "--quiet"]
    path = str(tmp_path / "run.ckpt")
    assert cli.main([*common, "--out", str(tmp_path / "full")]) == 0
    short = [*common, "--max-iter", "5", "--checkpoint", path, "--checkpoint-every", "2"]
    assert cli.main([*short, "--out", str(tmp_path / "short")]) == 0
    assert cli.main([*common, "--checkpoint", path, "--resume", "--out", str(tmp_path / "b")]) == 0
    full = (tmp_path / "full" / "params.json").read_text()
    assert (tmp_path / "b" / "params.json").read_text() == full
    capsys.readouterr()
    assert cli.main([*common, "--resume"]) == 2
    assert "--resume needs --checkpoint" in capsys.readouterr().err
    several = ["fit", "--dataset", "iris", "--components", "2,3", "--checkpoint", path, "--quiet"]
    assert cli.main(several) == 2
    assert "--checkpoint holds one fit" in capsys.readouterr().err


@pytest.mark.parametrize("covariance_type", ["full", "tied"])
def test_vb_em_warm_start_from_a_fit_that_removed_a_component(covariance_type: str) -> None:
    rng = np.random.default_rng(0)
    data = np.r_[rng.normal(0, 1, (100, 2)), rng.normal(6, 1, (100, 2))]
    alpha, num_components = 0.05, 5
    spec = pyroem.Mixture(num_components, covariance_type=covariance_type, weights_prior=alpha)
    seed = 4 if covariance_type == "full" else 0
    with pytest.warns(pyroem.CollapsedComponentWarning):
        start = pyroem.fit(spec, data, seed=seed)
    removed = start.removed_components
    assert removed
    fit = pyroem.fit(spec, data, method="vb-em", init=start, seed=0)
    assert fit.converged and fit.num_components == num_components
    assert np.diff(fit.history.objective).min() >= -1e-9 * abs(fit.history.objective[-1])
    # A component no data reaches keeps q(π_k) ∝ its prior count: E_q[π_k] = α / (Kα + N).
    expected = alpha / (num_components * alpha + len(data))
    for component in removed:
        assert float(fit.params["weights"][component]) == pytest.approx(expected, rel=1e-6)


def test_a_checkpoint_naming_a_renamed_module_resumes(tmp_path: Path) -> None:
    """Checkpoints written before ``variational._cavi_conjugate`` became
    ``variational.cavi_conjugate`` name ``q(θ)``'s record type by the old module."""
    rng = np.random.default_rng(0)
    data = np.concatenate([rng.poisson(2.0, (40, 2)), rng.poisson(9.0, (40, 2))]).astype(float)
    options: dict[str, Any] = {"method": "vb-em", "seed": 0, "progress": False}
    path = tmp_path / "run.ckpt"
    _quiet(pyroem.fit, pyroem.Mixture(2, "poisson"), data, max_iter=3, checkpoint=path, **options)
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files}
    meta = str(arrays["meta"])
    new_name = "pyroem.mstep.cavi_factors:GammaPosterior"
    assert new_name in meta
    arrays["meta"] = np.array(
        meta.replace(new_name, "pyroem.variational._cavi_conjugate:GammaPosterior")
    )
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    resumed = _quiet(
        pyroem.fit,
        pyroem.Mixture(2, "poisson"),
        data,
        max_iter=50,
        checkpoint=path,
        resume=True,
        **options,
    )
    reference = _quiet(pyroem.fit, pyroem.Mixture(2, "poisson"), data, max_iter=50, **options)
    _assert_same_fit(reference, resumed)
