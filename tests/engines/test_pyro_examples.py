"""Programs written the way Pyro's own examples write them, fitted by map-em.

The models follow the structure of Pyro's ``examples/hmm.py`` (HMMs and a factorial
HMM over binary "tones" with ``Beta(0.1, 0.9)`` emission priors and
``Dirichlet(0.9·I + 0.1)`` transition priors, priors under
``poutine.mask(mask=include_prior)``), written here, on small synthetic data of the
same shape. Every fit is checked against Pyro's own contraction: the reported log
joint is ``−TraceEnum_ELBO.loss`` of the program conditioned on the fitted values,
and the fitted point is a stationary point of Pyro's objective.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import TraceEnum_ELBO, config_enumerate
from pyro.ops.indexing import Vindex
from torch.distributions import biject_to, constraints

import pyroem
from pyroem.errors import NotSupportedError, SpecError

HIDDEN = 3
TONES = 5


def _tone_data(num_sequences: int = 4, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    sequences = (torch.rand(num_sequences, length, TONES, generator=generator) < 0.2).double()
    lengths = torch.tensor([length - 3 * (i % 2) for i in range(num_sequences)])
    return sequences, lengths


def loop_hmm(sequences: torch.Tensor, lengths: torch.Tensor, include_prior: bool = True) -> None:
    """hmm.py's first model: a Python loop over sequences, a markov loop over time."""
    with poutine.mask(mask=include_prior):
        probs_x = pyro.sample("probs_x", dist.Dirichlet(0.9 * torch.eye(HIDDEN) + 0.1).to_event(1))
        probs_y = pyro.sample(
            "probs_y", dist.Beta(0.1, 0.9).expand([HIDDEN, sequences.shape[-1]]).to_event(2)
        )
    tones = pyro.plate("tones", sequences.shape[-1], dim=-1)
    for i in pyro.plate("sequences", len(sequences)):
        x = 0
        for t in pyro.markov(range(int(lengths[i]))):
            x = pyro.sample(
                f"x_{i}_{t}", dist.Categorical(probs_x[x]), infer={"enumerate": "parallel"}
            )
            with tones:
                pyro.sample(
                    f"y_{i}_{t}", dist.Bernoulli(probs_y[x.squeeze(-1)]), obs=sequences[i, t]
                )


def batched_hmm(sequences: torch.Tensor, lengths: torch.Tensor, include_prior: bool = True) -> None:
    """hmm.py's vectorised HMM: a sequences plate, time steps past a length masked."""
    num_sequences, _, data_dim = sequences.shape
    with poutine.mask(mask=include_prior):
        probs_x = pyro.sample("probs_x", dist.Dirichlet(0.9 * torch.eye(HIDDEN) + 0.1).to_event(1))
        probs_y = pyro.sample("probs_y", dist.Beta(0.1, 0.9).expand([HIDDEN, data_dim]).to_event(2))
    tones = pyro.plate("tones", data_dim, dim=-1)
    with pyro.plate("sequences", num_sequences, dim=-2) as batch:
        lengths = lengths[batch]
        x = 0
        for t in pyro.markov(range(int(lengths.max()))):
            with poutine.mask(mask=(t < lengths).unsqueeze(-1)):
                x = pyro.sample(
                    f"x_{t}", dist.Categorical(probs_x[x]), infer={"enumerate": "parallel"}
                )
                with tones:
                    pyro.sample(
                        f"y_{t}", dist.Bernoulli(probs_y[x.squeeze(-1)]), obs=sequences[batch, t]
                    )


def autoregressive_hmm(
    sequences: torch.Tensor, lengths: torch.Tensor, include_prior: bool = True
) -> None:
    """hmm.py's arHMM: each tone also depends on its previous value."""
    num_sequences, _, data_dim = sequences.shape
    with poutine.mask(mask=include_prior):
        probs_x = pyro.sample("probs_x", dist.Dirichlet(0.9 * torch.eye(HIDDEN) + 0.1).to_event(1))
        probs_y = pyro.sample(
            "probs_y", dist.Beta(0.1, 0.9).expand([HIDDEN, 2, data_dim]).to_event(3)
        )
    tones_plate = pyro.plate("tones", data_dim, dim=-1)
    with pyro.plate("sequences", num_sequences, dim=-2) as batch:
        lengths = lengths[batch]
        x, y = 0, 0
        for t in pyro.markov(range(int(lengths.max()))):
            with poutine.mask(mask=(t < lengths).unsqueeze(-1)):
                x = pyro.sample(
                    f"x_{t}", dist.Categorical(probs_x[x]), infer={"enumerate": "parallel"}
                )
                with tones_plate as tones:
                    y = pyro.sample(
                        f"y_{t}", dist.Bernoulli(probs_y[x, y, tones]), obs=sequences[batch, t]
                    ).long()


def factorial_hmm(
    sequences: torch.Tensor, lengths: torch.Tensor, include_prior: bool = True
) -> None:
    """hmm.py's factorial HMM: two hidden chains emit together."""
    num_sequences, _, data_dim = sequences.shape
    hidden = 2
    with poutine.mask(mask=include_prior):
        probs_w = pyro.sample("probs_w", dist.Dirichlet(0.9 * torch.eye(hidden) + 0.1).to_event(1))
        probs_x = pyro.sample("probs_x", dist.Dirichlet(0.9 * torch.eye(hidden) + 0.1).to_event(1))
        probs_y = pyro.sample(
            "probs_y", dist.Beta(0.1, 0.9).expand([hidden, hidden, data_dim]).to_event(3)
        )
    tones_plate = pyro.plate("tones", data_dim, dim=-1)
    with pyro.plate("sequences", num_sequences, dim=-2) as batch:
        lengths = lengths[batch]
        w, x = 0, 0
        for t in pyro.markov(range(int(lengths.max()))):
            with poutine.mask(mask=(t < lengths).unsqueeze(-1)):
                w = pyro.sample(
                    f"w_{t}", dist.Categorical(probs_w[w]), infer={"enumerate": "parallel"}
                )
                x = pyro.sample(
                    f"x_{t}", dist.Categorical(probs_x[x]), infer={"enumerate": "parallel"}
                )
                with tones_plate as tones:
                    pyro.sample(
                        f"y_{t}", dist.Bernoulli(probs_y[w, x, tones]), obs=sequences[batch, t]
                    )


def hierarchical_factorial_hmm(
    sequences: torch.Tensor, lengths: torch.Tensor, include_prior: bool = True
) -> None:
    """hmm.py's model_4: the second chain's transition depends on the first (``Vindex``)."""
    num_sequences, _, data_dim = sequences.shape
    hidden = 2
    with poutine.mask(mask=include_prior):
        probs_w = pyro.sample("probs_w", dist.Dirichlet(0.9 * torch.eye(hidden) + 0.1).to_event(1))
        probs_x = pyro.sample(
            "probs_x",
            dist.Dirichlet(0.9 * torch.eye(hidden) + 0.1).expand_by([hidden]).to_event(2),
        )
        probs_y = pyro.sample(
            "probs_y", dist.Beta(0.1, 0.9).expand([hidden, hidden, data_dim]).to_event(3)
        )
    tones_plate = pyro.plate("tones", data_dim, dim=-1)
    with pyro.plate("sequences", num_sequences, dim=-2) as batch:
        lengths = lengths[batch]
        w = x = torch.tensor(0, dtype=torch.long)
        for t in pyro.markov(range(int(lengths.max()))):
            with poutine.mask(mask=(t < lengths).unsqueeze(-1)):
                w = pyro.sample(
                    f"w_{t}", dist.Categorical(probs_w[w]), infer={"enumerate": "parallel"}
                )
                x = pyro.sample(
                    f"x_{t}",
                    dist.Categorical(Vindex(probs_x)[w, x]),
                    infer={"enumerate": "parallel"},
                )
                with tones_plate as tones:
                    pyro.sample(
                        f"y_{t}", dist.Bernoulli(probs_y[w, x, tones]), obs=sequences[batch, t]
                    )


HMMS: list[tuple[Callable[..., None], int]] = [
    (loop_hmm, 1),
    (batched_hmm, 2),
    (autoregressive_hmm, 2),
    (factorial_hmm, 2),
    (hierarchical_factorial_hmm, 2),
]


def _empty_guide(*args: Any, **kwargs: Any) -> None:
    return None


def pyro_log_joint(
    model: Callable[..., None],
    values: dict[str, torch.Tensor],
    max_plate_nesting: int,
    *args: Any,
) -> torch.Tensor:
    """``log p(x, θ)`` by Pyro: ``−TraceEnum_ELBO`` loss of the program at ``θ``, every
    discrete latent enumerated, with a guide that samples nothing (differentiable in
    ``values``)."""
    elbo = TraceEnum_ELBO(max_plate_nesting=max_plate_nesting)
    # pyro.param sites substituted, pyro.sample sites observed (their log prior counts).
    program = config_enumerate(model, default="parallel")
    conditioned = poutine.condition(poutine.substitute(program, data=values), data=values)
    with warnings.catch_warnings():
        # substitute looks for every value among the params; sample sites are not there.
        warnings.filterwarnings("ignore", message=".*did not find params")
        if not any(value.requires_grad for value in values.values()):
            return torch.tensor(-elbo.loss(conditioned, _empty_guide, *args))
        return -elbo.differentiable_loss(conditioned, _empty_guide, *args)


def unconstrained_gradient(
    model: Callable[..., None],
    fit: Any,
    max_plate_nesting: int,
    *args: Any,
    jacobian: bool,
) -> dict[str, torch.Tensor]:
    """Gradient of Pyro's log joint (plus the log-Jacobian when ``jacobian``) with respect
    to the unconstrained coordinates of every parameter, at the fitted values."""
    transforms = {name: biject_to(site.constraint) for name, site in fit.program.params.items()}
    leaves = {
        name: transforms[name].inv(value).detach().requires_grad_()
        for name, value in fit.params.items()
    }
    values = {name: transforms[name](u) for name, u in leaves.items()}
    objective = pyro_log_joint(model, values, max_plate_nesting, *args)
    if jacobian:
        for name, u in leaves.items():
            objective = objective + transforms[name].log_abs_det_jacobian(u, values[name]).sum()
    objective.backward()
    return {name: u.grad for name, u in leaves.items()}


def _monotone(objective: Any) -> bool:
    steps = objective[1:] - objective[:-1]
    return bool((steps >= -1e-9 * abs(objective[1:])).all())


@pytest.mark.parametrize(("model", "max_plate_nesting"), HMMS, ids=[m.__name__ for m, _ in HMMS])
def test_unbounded_priors_fit_in_the_unconstrained_space(
    model: Callable[..., None], max_plate_nesting: int
) -> None:
    """Beta(0.1, 0.9)/Dirichlet(0.9·I + 0.1) priors: the constrained log joint has no
    maximum (a closed form reached +inf); the default fits the unconstrained density to
    a finite optimum: Pyro's log joint plus log-Jacobian is stationary there."""
    torch.set_default_dtype(torch.float64)
    data = _tone_data()
    fit = pyroem.fit(model, *data, seed=0, tol=1e-9, max_iter=3000)
    history = fit.history.objective
    assert fit.options["space"] == "unconstrained"
    assert bool(torch.isfinite(torch.as_tensor(history)).all())
    assert _monotone(history)
    expected = float(pyro_log_joint(model, fit.params, max_plate_nesting, *data))
    assert fit.log_joint() == pytest.approx(expected, rel=1e-9)
    gradient = unconstrained_gradient(model, fit, max_plate_nesting, *data, jacobian=True)
    for name, grad in gradient.items():
        assert float(grad.abs().max()) < 1e-3, name
    for name, value in fit.params.items():
        assert bool(fit.program.params[name].constraint.check(value).all())
        assert bool(((value > 0) & (value < 1)).all()), name


def test_constrained_space_refuses_an_unbounded_prior() -> None:
    torch.set_default_dtype(torch.float64)
    with pytest.raises(SpecError, match=r"probs_y.*space='unconstrained'"):
        pyroem.fit(batched_hmm, *_tone_data(), seed=0, space="constrained")


@pytest.mark.parametrize(("model", "max_plate_nesting"), HMMS, ids=[m.__name__ for m, _ in HMMS])
def test_masked_priors_give_maximum_likelihood(
    model: Callable[..., None], max_plate_nesting: int
) -> None:
    """``include_prior=False`` masks the priors: the closed forms must drop them (before,
    they kept the prior's pseudo-counts and the objective decreased). The fit is monotone
    and a stationary point of Pyro's masked log joint (the likelihood)."""
    torch.set_default_dtype(torch.float64)
    data = _tone_data()
    fit = pyroem.fit(model, *data, False, seed=0, tol=1e-11, max_iter=5000)
    assert fit.options["space"] == "constrained"
    assert _monotone(fit.history.objective)
    expected = float(pyro_log_joint(model, fit.params, max_plate_nesting, *data, False))
    assert fit.log_joint() == pytest.approx(expected, rel=1e-9)
    assert fit.log_joint() == pytest.approx(fit.log_likelihood(), rel=1e-12)
    # Stationary in the interior: every probability strictly inside (0, 1) has zero
    # gradient along the simplex (Bernoulli entries: the gradient itself).
    values = {name: value.requires_grad_() for name, value in fit.params.items()}
    pyro_log_joint(model, values, max_plate_nesting, *data, False).backward()
    for name, value in values.items():
        grad = value.grad
        if name == "probs_y":
            inside = (value > 1e-6) & (value < 1 - 1e-6)
            assert float(grad[inside].abs().max()) < 1e-3
        else:
            for row, row_grad in zip(value, grad, strict=True):
                live = row_grad[row > 1e-6]
                assert float((live - live.mean()).abs().max()) < 1e-3, (name, row)


# ----- programs that crashed ----------------------------------------------------------

MISSING = 1e-6


def mixed_hmm(step: torch.Tensor, angle: torch.Tensor) -> None:
    """The structure of Pyro's ``examples/mixed_hmm``: a discrete group effect picks the
    transition logits (``Vindex``), an HMM per individual, zero-inflated step lengths
    (``MaskedMixture`` of a Gamma and a point mass), von Mises turning angles."""
    states, effects = 2, 2
    num_individuals, num_groups, num_steps = step.shape
    probs_e = pyro.param(
        "probs_e_group", lambda: torch.tensor([0.4, 0.6]), constraint=constraints.simplex
    )
    theta = pyro.param(
        "theta_group", lambda: torch.tensor([[0.5, -0.5, 0.2, 0.1], [-0.3, 0.4, 0.6, -0.2]])
    )
    zi_logits = pyro.param("step_zi_param", lambda: torch.ones(states, 2))
    concentration = pyro.param(
        "step_concentration", lambda: torch.tensor([1.0, 2.0]), constraint=constraints.positive
    )
    rate = pyro.param(
        "step_rate", lambda: torch.tensor([1.0, 0.5]), constraint=constraints.positive
    )
    angle_loc = pyro.param("angle_loc", lambda: torch.tensor([0.1, 1.0]))
    angle_concentration = pyro.param(
        "angle_concentration", lambda: torch.tensor([1.0, 2.0]), constraint=constraints.positive
    )
    assert theta.shape == (effects, states * states)
    with pyro.plate("group", num_groups, dim=-1):
        effect = pyro.sample("e_g", dist.Categorical(probs_e))
        gamma = Vindex(theta)[..., effect, :]
        with pyro.plate("individual", num_individuals, dim=-2):
            y = torch.tensor(0).long()
            for t in pyro.markov(range(num_steps)):
                logits = gamma.reshape((*gamma.shape[:-1], states, states))
                y = pyro.sample(f"y_{t}", dist.Categorical(logits=Vindex(logits)[..., y, :]))
                missing = step[..., t] == MISSING
                pyro.sample(
                    f"step_zi_{t}",
                    dist.Categorical(logits=Vindex(zi_logits)[..., y, :]),
                    obs=missing.long(),
                )
                step_dist = dist.Gamma(Vindex(concentration)[..., y], Vindex(rate)[..., y])
                pyro.sample(
                    f"step_{t}",
                    dist.MaskedMixture(missing, step_dist, dist.Delta(torch.tensor(MISSING))),
                    obs=step[..., t],
                )
                pyro.sample(
                    f"angle_{t}",
                    dist.VonMises(Vindex(angle_loc)[..., y], Vindex(angle_concentration)[..., y]),
                    obs=angle[..., t],
                )


def test_mixed_hmm_fits() -> None:
    """Crashed in the compiled E-step (a ``MaskedMixture`` keeps its batch shape as a
    tuple); now fits, monotone, with Pyro's log joint."""
    torch.set_default_dtype(torch.float64)
    generator = torch.Generator().manual_seed(0)
    step = torch.distributions.Gamma(2.0, 1.0).sample((2, 2, 4))
    step[torch.rand(2, 2, 4, generator=generator) < 0.2] = MISSING
    angle = torch.rand(2, 2, 4, generator=generator) * 6.2 - 3.1
    with pytest.warns(pyroem.errors.ConvergenceWarning):
        fit = pyroem.fit(mixed_hmm, step, angle, seed=0, max_iter=2, gradient_steps=5)
    history = fit.history.objective
    assert _monotone(history) and history[-1] > history[0] + 1
    expected = float(pyro_log_joint(mixed_hmm, fit.params, 2, step, angle))
    assert fit.log_joint() == pytest.approx(expected, rel=1e-9)


def zero_inflated_mixture(counts: torch.Tensor) -> None:
    """A mixture of Poissons whose zeros are explained by a zero-inflated component
    (a composite likelihood: ``MaskedMixture`` of two families)."""
    weights = pyro.sample("weights", dist.Dirichlet(torch.full((2,), 2.0)))
    rates = pyro.sample("rates", dist.Gamma(2.0, 0.5).expand([2]).to_event(1))
    gate = pyro.sample("gate", dist.Beta(2.0, 2.0))
    with pyro.plate("data", len(counts)):
        z = pyro.sample("z", dist.Categorical(weights))
        inflated = dist.ZeroInflatedPoisson(rates[z], gate=gate)
        pyro.sample(
            "n", dist.MaskedMixture(counts == 0, dist.Poisson(rates[z]), inflated), obs=counts
        )


def test_zero_inflated_composite_likelihood_fits() -> None:
    torch.set_default_dtype(torch.float64)
    generator = torch.Generator().manual_seed(0)
    counts = torch.cat(
        [
            torch.poisson(torch.full((30,), 2.0), generator=generator),
            torch.poisson(torch.full((30,), 9.0), generator=generator),
            torch.zeros(10),
        ]
    )
    fit = pyroem.fit(zero_inflated_mixture, counts, seed=0)
    assert fit.converged and _monotone(fit.history.objective)
    expected = float(pyro_log_joint(zero_inflated_mixture, fit.params, 1, counts))
    assert fit.log_joint() == pytest.approx(expected, rel=1e-9)


def labelled_mixture(first: torch.Tensor, data: torch.Tensor) -> None:
    """A mixture with one labelled point: the weights also enter a categorical observed
    once, outside every plate (a use whose weight is a scalar)."""
    weights = pyro.sample("weights", dist.Dirichlet(torch.full((3,), 2.0)))
    locs = pyro.sample("locs", dist.Normal(0.0, 10.0).expand([3]).to_event(1))
    pyro.sample("first_label", dist.Categorical(weights), obs=first)
    with pyro.plate("data", len(data)):
        z = pyro.sample("z", dist.Categorical(weights))
        pyro.sample("x", dist.Normal(locs[z], 1.0), obs=data)


def test_scalar_categorical_use_fits() -> None:
    """Crashed in the closed form (reshape of a 0-d weight); now the Dirichlet closed
    form counts the labelled point and agrees with Pyro and with the gradient M-step."""
    torch.set_default_dtype(torch.float64)
    generator = torch.Generator().manual_seed(0)
    data = torch.cat(
        [torch.randn(20, generator=generator) - 3, torch.randn(20, generator=generator) + 3]
    )
    fit = pyroem.fit(labelled_mixture, torch.tensor(1), data, seed=0, tol=1e-10)
    assert fit.m_step_kinds["weights"] == "dirichlet-categorical"
    expected = float(pyro_log_joint(labelled_mixture, fit.params, 1, torch.tensor(1), data))
    assert fit.log_joint() == pytest.approx(expected, rel=1e-9)
    gradient = pyroem.fit(
        labelled_mixture, torch.tensor(1), data, init=fit.params, m_step="gradient", tol=1e-10
    )
    assert gradient.log_joint() <= fit.log_joint() + 1e-7


def subsampled_hmm(sequences: torch.Tensor, lengths: torch.Tensor, batch_size: int) -> None:
    """hmm.py's first model in minibatch mode: the sequences plate subsamples."""
    probs_x = pyro.sample("probs_x", dist.Dirichlet(0.9 * torch.eye(HIDDEN) + 0.1).to_event(1))
    probs_y = pyro.sample(
        "probs_y", dist.Beta(0.1, 0.9).expand([HIDDEN, sequences.shape[-1]]).to_event(2)
    )
    tones = pyro.plate("tones", sequences.shape[-1], dim=-1)
    for i in pyro.plate("sequences", len(sequences), batch_size):
        x = 0
        for t in pyro.markov(range(int(lengths[i]))):
            x = pyro.sample(f"x_{i}_{t}", dist.Categorical(probs_x[x]))
            with tones:
                pyro.sample(
                    f"y_{i}_{t}", dist.Bernoulli(probs_y[x.squeeze(-1)]), obs=sequences[i, t]
                )


def test_subsampled_plate_is_refused_clearly() -> None:
    """A KeyError deep in the E-step before; now a NotSupportedError naming the plate.
    Without subsampling the same program fits, with Pyro's log joint."""
    torch.set_default_dtype(torch.float64)
    data = _tone_data()
    with pytest.raises(NotSupportedError, match="plate 'sequences' subsamples 2 of its 4"):
        pyroem.fit(subsampled_hmm, *data, 2, seed=0)
    fit = pyroem.fit(subsampled_hmm, *data, None, seed=0, max_iter=5)
    expected = float(pyro_log_joint(subsampled_hmm, fit.params, 1, *data, None))
    assert fit.log_joint() == pytest.approx(expected, rel=1e-9)


# ----- wrong answers ------------------------------------------------------------------


def masked_components(data: torch.Tensor) -> None:
    """A mixture of diagonal normals written with one observe statement per component,
    each under ``poutine.mask(mask=which == k)``: the mask reads the enumerated latent."""
    num_components = 2
    weights = pyro.sample("weights", dist.Dirichlet(torch.full((num_components,), 2.0)))
    locs = pyro.sample(
        "locs", dist.Normal(0.0, 10.0).expand([num_components, data.shape[-1]]).to_event(2)
    )
    with pyro.plate("data", len(data)):
        which = pyro.sample("which", dist.Categorical(weights))
        for k in range(num_components):
            with poutine.mask(mask=which == k):
                pyro.sample(f"x_{k}", dist.Normal(locs[k], 1.0).to_event(1), obs=data)


def test_mask_that_reads_an_enumerated_latent_is_honoured() -> None:
    """Before, such a mask was summed over the latent's values (every component saw every
    point: identical locations, a log joint 100 nats off Pyro's at the start). Now the
    start and the fit agree with Pyro, and the fit is stationary for Pyro's objective."""
    torch.set_default_dtype(torch.float64)
    generator = torch.Generator().manual_seed(0)
    data = torch.cat(
        [torch.randn(30, 2, generator=generator) - 2, torch.randn(20, 2, generator=generator) + 2]
    )
    init = {"weights": torch.tensor([0.5, 0.5]), "locs": torch.tensor([[-1.0, -1.0], [1.0, 1.0]])}
    fit = pyroem.fit(masked_components, data, init=init, tol=1e-12, max_iter=500)
    start = float(pyro_log_joint(masked_components, init, 1, data))
    assert fit.history.objective[0] == pytest.approx(start, rel=1e-9)
    assert _monotone(fit.history.objective)
    expected = float(pyro_log_joint(masked_components, fit.params, 1, data))
    assert fit.log_joint() == pytest.approx(expected, rel=1e-9)
    gradient = unconstrained_gradient(masked_components, fit, 1, data, jacobian=False)
    for name, grad in gradient.items():
        assert float(grad.abs().max()) < 1e-4, name
    locs = fit.params["locs"]
    assert float((locs[0] - locs[1]).norm()) > 3


class _TonesNetwork(torch.nn.Module):
    """Emission logits from the hidden state and the previous tones (hmm.py's
    ``TonesGenerator``, smaller)."""

    def __init__(self, hidden: int, data_dim: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.x_to_logits = torch.nn.Linear(hidden, data_dim)
        self.y_to_logits = torch.nn.Linear(data_dim, data_dim, bias=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        onehot = y.new_zeros((*x.shape[:-1], self.hidden)).scatter_(-1, x, 1)
        return self.x_to_logits(onehot) + self.y_to_logits(y)


def test_pyro_module_weights_are_fitted() -> None:
    """hmm.py's model_5 form: emissions from a network registered with ``pyro.module``.
    Before, the values EM chose never reached the network (a no-op fit); now the
    network's own weights move, the log joint rises, and Pyro, running the program with
    the network as it now stands, gives the reported log joint."""
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    network = _TonesNetwork(HIDDEN, TONES)
    start = [parameter.detach().clone() for parameter in network.parameters()]

    def model(sequences: torch.Tensor, lengths: torch.Tensor) -> None:
        num_sequences, _, data_dim = sequences.shape
        pyro.module("tones", network)
        probs_x = pyro.sample("probs_x", dist.Dirichlet(0.9 * torch.eye(HIDDEN) + 0.1).to_event(1))
        with pyro.plate("sequences", num_sequences, dim=-2) as batch:
            lengths = lengths[batch]
            x: Any = 0
            y = torch.zeros(data_dim)
            for t in pyro.markov(range(int(lengths.max()))):
                with poutine.mask(mask=(t < lengths).unsqueeze(-1)):
                    x = pyro.sample(
                        f"x_{t}", dist.Categorical(probs_x[x]), infer={"enumerate": "parallel"}
                    )
                    with pyro.plate(f"tones_{t}", data_dim, dim=-1):
                        y = pyro.sample(
                            f"y_{t}",
                            dist.Bernoulli(logits=network(x, y)),
                            obs=sequences[batch, t],
                        )

    data = _tone_data()
    before = float(pyro_log_joint(model, {"probs_x": torch.eye(HIDDEN) * 0.7 + 0.1}, 2, *data))
    with pytest.warns(pyroem.errors.ConvergenceWarning):
        fit = pyroem.fit(
            model,
            *data,
            init={"probs_x": torch.eye(HIDDEN) * 0.7 + 0.1},
            max_iter=3,
            gradient_steps=10,
        )
    assert all(kind == "gradient" for name, kind in fit.m_step_kinds.items() if "$$$" in name)
    moved = max(
        float((parameter.detach() - old).abs().max())
        for parameter, old in zip(network.parameters(), start, strict=True)
    )
    assert moved > 0.1
    assert _monotone(fit.history.objective)
    expected = float(pyro_log_joint(model, {"probs_x": fit.params["probs_x"]}, 2, *data))
    assert fit.log_joint() == pytest.approx(expected, rel=1e-9)
    assert fit.log_joint() > before + 20


# ----- global parameters written inside a chain or a data plate ------------------------


def survival_by_period(capture_history: torch.Tensor) -> None:
    """Pyro's ``capture_recapture/cjs.py`` model_2 form: a survival probability per
    period, sampled inside the markov loop over periods; alive states enumerated."""
    num_animals, num_periods = capture_history.shape
    rho = pyro.sample("rho", dist.Uniform(0.0, 1.0))
    z = torch.ones(num_animals)
    seen = torch.zeros(num_animals).bool()
    animals = pyro.plate("animals", num_animals, dim=-1)
    for t in pyro.markov(range(num_periods)):
        phi: Any = pyro.sample(f"phi_{t}", dist.Uniform(0.0, 1.0)) if t > 0 else 1.0
        with animals, poutine.mask(mask=seen):
            alive = seen.double() * phi * z + (1 - seen.double())
            z = pyro.sample(f"z_{t}", dist.Bernoulli(alive), infer={"enumerate": "parallel"})
            pyro.sample(f"y_{t}", dist.Bernoulli(rho * z), obs=capture_history[:, t])
        seen |= capture_history[:, t].bool()


def capture_history(seed: int) -> torch.Tensor:
    """30 animals over 4 periods: survival 0.7 a period, capture 0.6, all marked at 0."""
    generator = torch.Generator().manual_seed(seed)
    alive = torch.ones(30, 4)
    for t in range(1, 4):
        alive[:, t] = alive[:, t - 1] * (torch.rand(30, generator=generator) < 0.7)
    history = alive * (torch.rand(30, 4, generator=generator) < 0.6)
    history[:, 0] = 1
    return history


def test_per_period_parameters_in_a_markov_loop_are_fitted() -> None:
    """``phi_t`` has one value per period, shared by every animal: a parameter, not a
    latent local to the data (refused before). The fit is Pyro's stationary point."""
    torch.set_default_dtype(torch.float64)
    history = capture_history(0)
    fit = pyroem.fit(survival_by_period, history, seed=0, tol=1e-11, max_iter=2000)
    assert set(fit.params) == {"rho", "phi_1", "phi_2", "phi_3"}
    assert _monotone(fit.history.objective)
    expected = float(pyro_log_joint(survival_by_period, fit.params, 1, history))
    assert fit.log_joint() == pytest.approx(expected, rel=1e-9)
    gradient = unconstrained_gradient(survival_by_period, fit, 1, history, jacobian=False)
    for name, grad in gradient.items():
        assert float(grad.abs().max()) < 1e-3, name


def feature_components(x: torch.Tensor) -> None:
    """The enumeration tutorial's program: ``p`` per feature and component, inside the
    feature plate that also holds the observations, read through ``Vindex``."""
    data_plate = pyro.plate("data_plate", x.shape[1], dim=-1)
    feature_plate = pyro.plate("feature_plate", x.shape[0], dim=-2)
    component_plate = pyro.plate("component_plate", 4, dim=-1)
    with feature_plate, component_plate:
        p = pyro.sample("p", dist.Dirichlet(torch.full((3,), 1.5)))
    with data_plate:
        c = pyro.sample("c", dist.Categorical(torch.ones(4)))
        with feature_plate as vdx:
            pc = Vindex(p)[vdx[..., None], c, :]
            pyro.sample("x", dist.Categorical(pc), obs=x)


def test_parameter_in_a_plate_with_data_but_shared_by_observations_is_fitted() -> None:
    """``p`` sits in the feature plate with the data but is shared across the data plate:
    a parameter (refused before). Closed form, with Pyro's log joint, and stationary."""
    torch.set_default_dtype(torch.float64)
    x = torch.randint(0, 3, (5, 6), generator=torch.Generator().manual_seed(0))
    fit = pyroem.fit(feature_components, x, seed=0, tol=1e-11, max_iter=2000)
    assert fit.m_step_kinds == {"p": "dirichlet-categorical"}
    expected = float(pyro_log_joint(feature_components, fit.params, 2, x))
    assert fit.log_joint() == pytest.approx(expected, rel=1e-9)
    gradient = unconstrained_gradient(feature_components, fit, 2, x, jacobian=False)
    assert float(gradient["p"].abs().max()) < 1e-4
    _check_local_latent_is_refused()


def _check_local_latent_is_refused() -> None:
    """A latent with a value per observation stays refused."""

    def model(data: torch.Tensor) -> None:
        scale = pyro.sample("scale", dist.Gamma(2.0, 2.0))
        with pyro.plate("data", len(data)):
            effect = pyro.sample("effect", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(effect, scale), obs=data)

    with pytest.raises(NotSupportedError, match="'effect' is a continuous latent"):
        pyroem.fit(model, torch.randn(10, dtype=torch.float64).float(), seed=0)

    def random_effects(y: torch.Tensor) -> None:
        spread = pyro.param("spread", torch.tensor(1.0), constraint=constraints.positive)
        with pyro.plate("groups", y.shape[0], dim=-2):
            shift = pyro.sample("shift", dist.Normal(0.0, spread))
            with pyro.plate("members", y.shape[1], dim=-1):
                pyro.sample("y", dist.Normal(shift, 1.0), obs=y)

    # A random effect (its prior reads a fitted spread) stays local too.
    with pytest.raises(NotSupportedError, match="'shift' is a continuous latent"):
        pyroem.fit(random_effects, torch.randn(4, 3), seed=0)


def tempered_prior_mixture(data: torch.Tensor) -> None:
    """A Bernoulli mixture whose priors are tempered with ``poutine.scale``."""
    with poutine.scale(scale=0.25):
        weights = pyro.sample("weights", dist.Dirichlet(torch.tensor([6.0, 3.0])))
        probs = pyro.sample("probs", dist.Beta(8.0, 3.0).expand([2, data.shape[-1]]).to_event(2))
        rate = pyro.sample("rate", dist.Gamma(9.0, 2.0))
    with pyro.plate("data", len(data)):
        z = pyro.sample("z", dist.Categorical(weights))
        pyro.sample("x", dist.Bernoulli(probs[z]).to_event(1), obs=data)
        pyro.sample("count", dist.Poisson(rate), obs=data.sum(-1))


def test_closed_forms_weight_a_scaled_prior() -> None:
    """The closed forms kept the prior's full weight under ``poutine.scale``; now the
    fixed point is Pyro's stationary point for the scaled log joint."""
    torch.set_default_dtype(torch.float64)
    generator = torch.Generator().manual_seed(0)
    data = (torch.rand(40, 3, generator=generator) < torch.tensor([0.2, 0.5, 0.7])).double()
    fit = pyroem.fit(tempered_prior_mixture, data, seed=0, tol=1e-12, max_iter=3000)
    assert fit.m_step_kinds == {
        "weights": "dirichlet-categorical",
        "probs": "beta-bernoulli",
        "rate": "gamma-poisson",
    }
    assert _monotone(fit.history.objective)
    expected = float(pyro_log_joint(tempered_prior_mixture, fit.params, 1, data))
    assert fit.log_joint() == pytest.approx(expected, rel=1e-9)
    gradient = unconstrained_gradient(tempered_prior_mixture, fit, 1, data, jacobian=False)
    for name, grad in gradient.items():
        assert float(grad.abs().max()) < 1e-5, name


def test_discrete_hmm_with_a_network_is_fitted() -> None:
    """hmm.py's model_7 form: a ``DiscreteHMM`` observed whole, its emissions from a
    ``pyro.module`` network, under a Dirichlet(0.9·I + 0.1) transition prior. Before:
    +inf after one iteration and an untouched network."""
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    network = _TonesNetwork(HIDDEN, TONES)
    start = [parameter.detach().clone() for parameter in network.parameters()]

    def model(sequences: torch.Tensor, lengths: torch.Tensor) -> None:
        pyro.module("tones", network)
        probs_x = pyro.sample("probs_x", dist.Dirichlet(0.9 * torch.eye(HIDDEN) + 0.1).to_event(1))
        with pyro.plate("sequences", len(sequences), dim=-1) as batch:
            lengths = lengths[batch]
            y = sequences[batch, : int(lengths.max())]
            steps = torch.arange(y.size(1))
            init_logits = torch.full((HIDDEN,), -math.inf)
            init_logits[0] = 0
            states = torch.arange(HIDDEN).unsqueeze(-1)
            emissions = dist.Bernoulli(logits=network(states, y.unsqueeze(-2))).to_event(1)
            emissions = emissions.mask((steps < lengths.unsqueeze(-1)).unsqueeze(-1))
            pyro.sample("y", dist.DiscreteHMM(init_logits, probs_x.log(), emissions), obs=y)

    data = _tone_data()
    with pytest.warns(pyroem.errors.ConvergenceWarning):
        fit = pyroem.fit(model, *data, seed=0, max_iter=3, gradient_steps=10, init="prior")
    history = fit.history.objective
    assert bool(torch.isfinite(torch.as_tensor(history)).all())
    assert _monotone(history) and history[-1] > history[0] + 20
    moved = max(
        float((parameter.detach() - old).abs().max())
        for parameter, old in zip(network.parameters(), start, strict=True)
    )
    assert moved > 0.1
    expected = float(pyro_log_joint(model, {"probs_x": fit.params["probs_x"]}, 1, *data))
    assert fit.log_joint() == pytest.approx(expected, rel=1e-9)


def tutorial_mixture(data: torch.Tensor, num_components: int = 3) -> None:
    """The enumeration tutorial's Gaussian mixture (``Dirichlet(0.5)`` weights)."""
    p = pyro.sample("p", dist.Dirichlet(0.5 * torch.ones(num_components)))
    scale = pyro.sample("scale", dist.LogNormal(0.0, num_components))
    with pyro.plate("components", num_components):
        loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(data)):
        x = pyro.sample("x", dist.Categorical(p))
        pyro.sample("obs", dist.Normal(loc[x], scale), obs=data)


def tutorial_hmm(data: torch.Tensor, data_dim: int, hidden_dim: int = 3) -> None:
    """The enumeration tutorial's categorical HMM (``Dirichlet(0.5)`` rows in a plate)."""
    with pyro.plate("hidden_state", hidden_dim):
        transition = pyro.sample("transition", dist.Dirichlet(0.5 * torch.ones(hidden_dim)))
        emission = pyro.sample("emission", dist.Dirichlet(0.5 * torch.ones(data_dim)))
    x: Any = 0
    for t, y in pyro.markov(enumerate(data)):
        x = pyro.sample(f"x_{t}", dist.Categorical(transition[x]), infer={"enumerate": "parallel"})
        pyro.sample(f"y_{t}", dist.Categorical(emission[x]), obs=y)


def _tutorial_programs() -> list[tuple[Callable[..., None], tuple[Any, ...], int]]:
    generator = torch.Generator().manual_seed(0)
    points = torch.cat(
        [torch.randn(15, generator=generator) - 4, torch.randn(15, generator=generator) + 4]
    )
    symbols = torch.randint(0, 4, (25,), generator=generator)
    return [(tutorial_mixture, (points,), 1), (tutorial_hmm, (symbols, 4), 1)]


def _tutorial_start(index: int) -> dict[str, torch.Tensor] | None:
    if index == 0:
        return {"loc": torch.tensor([-3.0, 0.0, 3.0]), "scale": torch.tensor(1.0)}
    return None


@pytest.mark.parametrize("index", [0, 1], ids=["mixture", "hmm"])
def test_enumeration_tutorial_programs_fit_to_a_finite_optimum(index: int) -> None:
    """``Dirichlet(0.5)`` priors made the constrained log joint unbounded (+inf after one
    iteration); the unconstrained MAP is finite and Pyro's objective is stationary there."""
    torch.set_default_dtype(torch.float64)
    model, args, max_plate_nesting = _tutorial_programs()[index]
    init = _tutorial_start(index)
    fit = pyroem.fit(model, *args, init=init, seed=0, tol=1e-9, max_iter=3000)
    history = fit.history.objective
    assert fit.options["space"] == "unconstrained"
    assert bool(torch.isfinite(torch.as_tensor(history)).all()) and _monotone(history)
    expected = float(pyro_log_joint(model, fit.params, max_plate_nesting, *args))
    assert fit.log_joint() == pytest.approx(expected, rel=1e-9)
    gradient = unconstrained_gradient(model, fit, max_plate_nesting, *args, jacobian=True)
    for name, grad in gradient.items():
        assert float(grad.abs().max()) < 1e-3, name


# ----- acceleration -------------------------------------------------------------------


def second_order_hmm(sequences: torch.Tensor, lengths: torch.Tensor) -> None:
    """hmm.py's model_6: a second-order HMM (``pyro.markov(history=2)``), the full
    ``hidden³`` transition tensor and the emissions as ``pyro.param`` sites."""
    num_sequences, _, data_dim = sequences.shape
    probs_x = pyro.param(
        "probs_x",
        lambda: torch.rand(HIDDEN, HIDDEN, HIDDEN).softmax(-1),
        constraint=constraints.simplex,
    )
    probs_y = pyro.param(
        "probs_y", lambda: torch.rand(HIDDEN, data_dim), constraint=constraints.unit_interval
    )
    tones_plate = pyro.plate("tones", data_dim, dim=-1)
    with pyro.plate("sequences", num_sequences, dim=-2) as batch:
        lengths = lengths[batch]
        x_curr, x_prev = torch.tensor(0), torch.tensor(0)
        for t in pyro.markov(range(int(lengths.max())), history=2):
            with poutine.mask(mask=(t < lengths).unsqueeze(-1)):
                probs_x_t = Vindex(probs_x)[x_prev, x_curr]
                x_prev, x_curr = (
                    x_curr,
                    pyro.sample(
                        f"x_{t}", dist.Categorical(probs_x_t), infer={"enumerate": "parallel"}
                    ),
                )
                with tones_plate:
                    pyro.sample(
                        f"y_{t}",
                        dist.Bernoulli(probs_y[x_curr.squeeze(-1)]),
                        obs=sequences[batch, t],
                    )


def _mix_weights(beta: torch.Tensor) -> torch.Tensor:
    beta1m_cumprod = (1 - beta).cumprod(-1)
    return F.pad(beta, (0, 1), value=1) * F.pad(beta1m_cumprod, (1, 0), value=1)


def dp_mixture(data: torch.Tensor, truncation: int = 6, alpha: float = 0.1) -> None:
    """The DPMM tutorial's Gaussian model: stick-breaking weights, 2-D means."""
    with pyro.plate("beta_plate", truncation - 1):
        beta = pyro.sample("beta", dist.Beta(1.0, alpha))
    with pyro.plate("mu_plate", truncation):
        mu = pyro.sample("mu", dist.MultivariateNormal(torch.zeros(2), 5 * torch.eye(2)))
    with pyro.plate("data", data.shape[0]):
        z = pyro.sample("z", dist.Categorical(_mix_weights(beta)))
        pyro.sample("obs", dist.MultivariateNormal(mu[z], torch.eye(2)), obs=data)


def _dp_points(per_cluster: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-8.0, -8.0], [8.0, 8.0], [1.5, 2.0], [-0.5, 1.0]])
    noise = torch.randn(4, per_cluster, 2, generator=generator)
    return (centres[:, None, :] + noise).reshape(-1, 2)


@pytest.mark.parametrize(
    "index",
    [pytest.param(0, id="dp-mixture", marks=pytest.mark.slow), pytest.param(1, id="tutorial-hmm")],
)
def test_squarem_is_monotone_and_reaches_the_same_optimum_in_fewer_iterations(
    index: int,
) -> None:
    """``accelerate="squarem"`` on the DPMM tutorial's stick-breaking mixture (a gradient
    block, a closed form, a Beta(1, 0.1) prior: unconstrained space) and on the
    enumeration tutorial's HMM: the objective never decreases, the fit needs far fewer
    iterations than plain EM, ends at least as high, Pyro's log joint agrees, and Pyro's
    objective is stationary there."""
    torch.set_default_dtype(torch.float64)
    if index == 0:
        model: Callable[..., None] = dp_mixture
        args: tuple[Any, ...] = (_dp_points(10), 4)
    else:
        (model, args, _) = _tutorial_programs()[1]
    fits = {
        accelerate: pyroem.fit(model, *args, seed=1, tol=1e-9, max_iter=3000, accelerate=accelerate)
        for accelerate in (None, "squarem")
    }
    plain, fast = fits[None], fits["squarem"]
    assert plain.converged and fast.converged
    assert fast.options["accelerate"] == "squarem"
    assert _monotone(fast.history.objective)
    assert fast.num_iterations * 3 < plain.num_iterations
    assert fast.history.objective[-1] >= plain.history.objective[-1] - 1e-6
    expected = float(pyro_log_joint(model, fast.params, 1, *args))
    assert fast.log_joint() == pytest.approx(expected, rel=1e-9)
    gradient = unconstrained_gradient(model, fast, 1, *args, jacobian=True)
    for name, grad in gradient.items():
        assert float(grad.abs().max()) < 1e-2, name


def test_squarem_applies_to_programs_only() -> None:
    with pytest.raises(SpecError, match="accelerate does not apply"):
        pyroem.fit(pyroem.Mixture(2, "gaussian"), torch.randn(20, 1), accelerate="squarem")
    with pytest.raises(SpecError, match="accelerate must be one of"):
        pyroem.fit(tutorial_mixture, torch.randn(10), accelerate="anderson")


# ----- parameters whose support is wider than their use --------------------------------


def real_probability_mixture(data: torch.Tensor, constrained: bool = False) -> None:
    """A Bernoulli mixture whose ``pyro.param`` sites are declared real (the default
    constraint) yet used as probabilities; ``constrained``: the same program with
    ``unit_interval`` and ``simplex`` constraints."""
    probs = pyro.param(
        "probs",
        lambda: torch.tensor([[0.2, 0.5, 0.4], [0.5, 0.6, 0.7]]),
        constraint=constraints.unit_interval if constrained else constraints.real,
    )
    weights = pyro.param(
        "weights",
        lambda: torch.tensor([0.5, 0.5]),
        constraint=constraints.simplex if constrained else constraints.real,
    )
    with pyro.plate("data", len(data)):
        z = pyro.sample("z", dist.Categorical(probs=weights))
        pyro.sample("x", dist.Bernoulli(probs[z]).to_event(1), obs=data)


def test_real_parameters_used_as_probabilities_stay_valid() -> None:
    """No closed form for a real-constrained site used as probabilities, and the gradient
    M-step no longer steps outside [0, 1] (before: probabilities down to -0.05, scored
    without validation, which Pyro refuses to evaluate). The fit is monotone, Pyro
    (validating) gives its log joint, and it is within 1e-4 of the optimum of the same
    program with the constraints declared."""
    torch.set_default_dtype(torch.float64)
    generator = torch.Generator().manual_seed(0)
    data = torch.zeros(40, 3)
    data[20:] = (torch.rand(20, 3, generator=generator) < 0.8).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.errors.ConvergenceWarning)
        fit = pyroem.fit(real_probability_mixture, data, seed=0, tol=1e-10, max_iter=300)
    assert fit.m_step_kinds == {"probs": "gradient", "weights": "gradient"}
    check_real_probability_fit(fit, data)


def check_real_probability_fit(fit: Any, data: torch.Tensor) -> None:
    """A fit of :func:`real_probability_mixture`: monotone, its probabilities and weights
    valid, Pyro (validating) gives its log joint, and it is within 1e-4 of (and not
    above) the optimum of the same program with the constraints declared."""
    assert _monotone(fit.history.objective)
    probs, weights = fit.params["probs"], fit.params["weights"]
    assert bool(((probs >= 0) & (probs <= 1)).all()) and bool((weights >= 0).all())
    with pyro.validation_enabled(True):
        expected = float(pyro_log_joint(real_probability_mixture, fit.params, 1, data))
    assert fit.log_joint() == pytest.approx(expected, rel=1e-9)
    reference = pyroem.fit(real_probability_mixture, data, True, seed=0, tol=1e-12)
    assert reference.m_step_kinds == {"probs": "flat-bernoulli", "weights": "flat-categorical"}
    assert fit.log_joint() <= reference.log_joint() + 1e-9
    assert fit.log_joint() == pytest.approx(reference.log_joint(), rel=1e-4)


def dynamic_bayesian_network(sequences: torch.Tensor, lengths: torch.Tensor) -> None:
    """Two discrete chains (the second's transition reads both, ``Vindex``) emitting
    tones together, as in hmm.py's model_4; the first chain's transition rows and the
    emissions are ``pyro.param`` sites left real (the default constraint), its start a
    simplex ``pyro.param``, the second chain's transitions Dirichlet(0.7) rows."""
    num_sequences, _, data_dim = sequences.shape
    probs_start = pyro.param(
        "probs_start", lambda: torch.tensor([0.6, 0.4]), constraint=constraints.simplex
    )
    probs_w = pyro.param("probs_w", lambda: torch.tensor([[0.7, 0.3], [0.2, 0.8]]))
    probs_x = pyro.sample(
        "probs_x", dist.Dirichlet(torch.full((2, HIDDEN, HIDDEN), 0.7)).to_event(2)
    )
    probs_y = pyro.param(
        "probs_y", lambda: torch.linspace(0.1, 0.9, 2 * HIDDEN * data_dim).reshape(2, HIDDEN, -1)
    )
    tones_plate = pyro.plate("tones", data_dim, dim=-1)
    with pyro.plate("sequences", num_sequences, dim=-2):
        w: Any = None
        x = torch.tensor(0)
        for t in pyro.markov(range(sequences.shape[1])):
            with poutine.mask(mask=(t < lengths).unsqueeze(-1)):
                w = pyro.sample(
                    f"w_{t}",
                    dist.Categorical(probs_start if w is None else probs_w[w]),
                    infer={"enumerate": "parallel"},
                )
                x = pyro.sample(
                    f"x_{t}",
                    dist.Categorical(Vindex(probs_x)[w, x]),
                    infer={"enumerate": "parallel"},
                )
                with tones_plate as tones:
                    pyro.sample(
                        f"y_{t}",
                        dist.Bernoulli(Vindex(probs_y)[w, x, tones]),
                        obs=sequences[:, t],
                    )


def test_dynamic_bayesian_network_fit_is_valid_for_pyro() -> None:
    """Before, the emissions left [0, 1] (down to -0.017) and Pyro could not evaluate the
    fit. Now the real sites used as probabilities stay valid, the simplex sites sum to 1
    within 1e-12, the closed forms go only where the constraints match, and Pyro
    (validating) gives the reported log joint."""
    torch.set_default_dtype(torch.float64)
    data = _tone_data(num_sequences=3, length=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.errors.ConvergenceWarning)
        fit = pyroem.fit(dynamic_bayesian_network, *data, seed=0, max_iter=4, gradient_steps=10)
    assert fit.m_step_kinds == {
        "probs_start": "flat-categorical",
        "probs_w": "gradient",
        "probs_x": "dirichlet-categorical",
        "probs_y": "gradient",
    }
    assert _monotone(fit.history.objective)
    for name in ("probs_start", "probs_x"):
        assert float((fit.params[name].sum(-1) - 1).abs().max()) < 1e-12, name
    probs_y = fit.params["probs_y"]
    assert bool(((probs_y >= 0) & (probs_y <= 1)).all())
    assert bool((fit.params["probs_w"] >= 0).all())
    with pyro.validation_enabled(True):
        expected = float(pyro_log_joint(dynamic_bayesian_network, fit.params, 2, *data))
    assert fit.log_joint() == pytest.approx(expected, rel=1e-9)
