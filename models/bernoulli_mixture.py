"""Latent class analysis of the verbal aggression questionnaire (a Bernoulli mixture).

Run it from the repository root (with pyroem installed)::

    python models/bernoulli_mixture.py

316 respondents answered 24 yes/no items ("in situation S I would want to / would
curse, scold, shout"). A latent class model says each respondent belongs to one of
``K`` classes, and within a class the answers are independent. The script shows:

1. the declarative spec, ``pyroem.Mixture(K, "bernoulli")``;
2. the same model written out by hand as a plain Pyro program
   (:func:`latent_class_model`), which you can copy and edit;
3. MAP-EM fits for ``K = 2, 3, 4``, the choice of ``K`` by BIC, and a check that the
   hand-written program's log joint ``log p(x, θ)`` (Pyro's ``TraceEnum_ELBO`` with
   the classes summed out, at the fitted parameters) equals ``fit.log_joint()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO

import pyroem
from pyroem.datasets import load_verbagg

BEHAVIOURS = ("Curse", "Scold", "Shout")


def default_prior(data: torch.Tensor) -> dict[str, torch.Tensor]:
    """The prior ``prior="default"`` stands for: ``Beta(1.1, 1.1)`` on every probability,
    which keeps each one strictly inside (0, 1)."""
    ones = torch.ones(data.shape[1], dtype=data.dtype)
    return {"concentration1": 1.1 * ones, "concentration0": 1.1 * ones}


def latent_class_model(
    data: torch.Tensor,
    num_classes: int,
    concentration1: torch.Tensor,
    concentration0: torch.Tensor,
) -> torch.Tensor:
    """A mixture of independent Bernoullis with Beta priors, as a Pyro program.

    π ~ Dirichlet(1), p_kd ~ Beta(concentration1_d, concentration0_d),
    z_n ~ Categorical(π), x_nd ~ Bernoulli(p_{z_n d}).

    Args:
        data: binary answers, ``(num_data, dim)``.
        num_classes: ``K``.
        concentration1: Beta prior successes per item, ``(dim,)``.
        concentration0: Beta prior failures per item, ``(dim,)``.

    Returns:
        The classes ``z``, ``(num_data,)``.
    """
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(num_classes, dtype=data.dtype)))
    with pyro.plate("components", num_classes):
        probs = pyro.sample("probs", dist.Beta(concentration1, concentration0).to_event(1))
    with pyro.plate("data", data.shape[0]):
        # Marked for parallel enumeration: TraceEnum_ELBO (and NUTS) sum z out exactly.
        assignment = pyro.sample(
            "assignment", dist.Categorical(weights), infer={"enumerate": "parallel"}
        )
        pyro.sample("obs", dist.Bernoulli(probs=probs[assignment]).to_event(1), obs=data)
    return assignment


def log_joint(
    model: Callable[..., Any], params: dict[str, torch.Tensor], *args: Any, **kwargs: Any
) -> float:
    """``log p(x, θ)`` of a Pyro program at ``params``, discrete latents summed out.

    The parameter sites are conditioned on ``params``, so with an empty guide the
    ELBO is the log joint itself.
    """
    conditioned = poutine.condition(model, data=params)
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    return -elbo.loss(conditioned, lambda *_, **__: None, *args, **kwargs)


def relative_difference(value: float, reference: float) -> float:
    """``|value − reference| / |reference|``."""
    return abs(value - reference) / abs(reference)


def main() -> dict[str, Any]:
    """Fit K = 2, 3, 4 classes; check each against the hand-written program; pick K."""
    verbagg = load_verbagg("binary")
    data = verbagg.data
    names = verbagg.feature_names
    print(f"{data.shape[0]} respondents, {data.shape[1]} binary items")
    print("Declarative spec:", pyroem.Mixture(3, "bernoulli"))

    fits, checks = {}, {}
    print(f"\n  K  {'log-likelihood':>15}  {'BIC':>9}  {'hand-written log joint':>23}  rel. diff")
    for num_classes in (2, 3, 4):
        spec = pyroem.Mixture(num_classes, "bernoulli")
        fit = pyroem.fit(spec, data, n_init=5, seed=0)
        hand_written = log_joint(
            latent_class_model, fit.params, data, num_classes, **default_prior(data)
        )
        fits[num_classes] = fit
        checks[num_classes] = {"hand_written": hand_written, "pyroem": fit.log_joint()}
        difference = relative_difference(hand_written, fit.log_joint())
        print(
            f"  {num_classes}  {fit.log_likelihood():15.4f}  {fit.bic():9.2f}  "
            f"{hand_written:23.10f}  {difference:.1e}"
        )
    best = min(fits, key=lambda k: fits[k].bic())
    fit = fits[best]
    print(f"\nBest by BIC: K = {best}")
    print(fit.summary())

    probs = fit.params["probs"]
    weights = fit.params["weights"]
    want = torch.tensor(["Want" in name or "want" in name for name in names])
    behaviour = {b: torch.tensor([name.endswith(b) for name in names]) for b in BEHAVIOURS}
    order = torch.argsort(probs.mean(-1)).tolist()
    print("\nProbability of answering 'perhaps' or 'yes', averaged over the four situations:")
    header = "".join(f"{f'want {b.lower()}':>12}" for b in BEHAVIOURS)
    header += "".join(f"{f'do {b.lower()}':>10}" for b in BEHAVIOURS)
    print(f"  class  weight{header}")
    for k in order:
        cells = "".join(f"{float(probs[k, want & behaviour[b]].mean()):12.2f}" for b in BEHAVIOURS)
        cells += "".join(
            f"{float(probs[k, ~want & behaviour[b]].mean()):10.2f}" for b in BEHAVIOURS
        )
        print(f"  {k:>5}  {float(weights[k]):6.2f}{cells}")

    overall = probs.mean(-1)
    shout = probs[:, behaviour["Shout"]].mean(-1)
    others = torch.stack([probs[:, behaviour[b]].mean(-1) for b in BEHAVIOURS[:2]]).amin(0)
    gaps = probs[:, want].mean(-1) - probs[:, ~want].mean(-1)
    print("\nInterpretation:")
    print(
        f"  The classes (rows, least to most aggressive) endorse from "
        f"{100 * float(overall.min()):.0f}% to {100 * float(overall.max()):.0f}% of the items."
    )
    if bool((shout < others).all()):
        print("  In every class shouting is the least endorsed of the three behaviours.")
    print(
        "  Wanting minus doing, by class: "
        + ", ".join(f"{float(gaps[k]):+.2f}" for k in order)
        + (
            "; in every class wanting is more common than doing."
            if bool((gaps > 0).all())
            else "; a negative gap is a class that does more than it says it wants to."
        )
    )
    return {"best_num_components": best, "checks": checks}


if __name__ == "__main__":
    main()
