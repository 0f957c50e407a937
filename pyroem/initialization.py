"""Starting points for EM: k-means++, k-means, random, random-from-data, or user-given."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch

from pyroem.errors import SpecError
from pyroem.spec.families import Family
from pyroem.spec.mixture import MixtureParams

if TYPE_CHECKING:
    from pyroem.spec.mixture import Mixture

__all__ = [
    "INIT_METHODS",
    "initial_params",
    "kmeans_plusplus",
    "seeded_generator",
    "site_values",
]

INIT_METHODS = ("kmeans++", "kmeans", "random", "random_from_data")


def kmeans_plusplus(
    features: torch.Tensor, num_components: int, generator: torch.Generator
) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): each new centre is drawn with
    probability proportional to its squared distance from the nearest chosen centre.

    Args:
        features: ``(num_data, dim)``.
        num_components: number of centres ``K ≤ num_data``.
        generator: source of randomness.

    Returns:
        Indices of the chosen rows, ``(K,)``.
    """
    num_data = features.shape[0]
    first = int(torch.randint(num_data, (1,), generator=generator))
    chosen = [first]
    nearest = (features - features[first]).square().sum(-1)
    for _ in range(1, num_components):
        total = nearest.sum()
        if not bool(total > 0):
            remaining = torch.ones(num_data, dtype=features.dtype)
            remaining[chosen] = 0
            nxt = int(torch.multinomial(remaining, 1, generator=generator))
        else:
            nxt = int(torch.multinomial(nearest / total, 1, generator=generator))
        chosen.append(nxt)
        nearest = torch.minimum(nearest, (features - features[nxt]).square().sum(-1))
    return torch.tensor(chosen)


def _hard_resp(features: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """One-hot responsibilities of the nearest centre, ``(num_data, K)``."""
    distances = torch.cdist(features, centres)
    labels = distances.argmin(-1)
    return torch.nn.functional.one_hot(labels, centres.shape[0]).to(features.dtype)


def _lloyd(features: torch.Tensor, centres: torch.Tensor, max_iter: int = 100) -> torch.Tensor:
    """Lloyd's k-means from ``centres``; returns the final hard responsibilities."""
    resp = _hard_resp(features, centres)
    for _ in range(max_iter):
        counts = resp.sum(0)
        moved = (resp.T @ features) / counts.clamp(min=1)[:, None]
        centres = torch.where(counts[:, None] > 0, moved, centres)
        new_resp = _hard_resp(features, centres)
        if torch.equal(new_resp, resp):
            break
        resp = new_resp
    return resp


def _regularised(family: Family, data: torch.Tensor, num_components: int) -> Family:
    """The bound family, with the weak default prior if it has none.

    Initial responsibilities can put a single point in a component; a flat
    M-step would then give a singular start, the default prior does not.
    """
    if family.resolved is not None:
        return family
    twin = copy.copy(family)
    twin.prior = family.prior_type()
    try:
        twin.resolved = twin._resolve_prior(data, num_components)
    except SpecError:
        # Degenerate data (e.g. collinear columns) admit no default prior; the flat
        # M-step then reports the singular covariance itself.
        return family
    return twin


def params_from_resp(family: Family, data: torch.Tensor, resp: torch.Tensor) -> MixtureParams:
    """Parameters from initial responsibilities ``(num_data, K)`` by one M-step."""
    num_components = resp.shape[1]
    stats = family.statistics(family.prepare(data), resp)
    counts = resp.sum(0) + 10 * torch.finfo(resp.dtype).eps
    components = _regularised(family, data, num_components).m_step(stats)
    active = torch.arange(num_components, device=resp.device)
    return MixtureParams(counts / counts.sum(), components, active)


def seeded_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or from fresh entropy when it is ``None``."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def site_values(
    spec: Mixture, family: Family, data: torch.Tensor, init: Any, seed: int | None
) -> dict[str, torch.Tensor]:
    """Starting values of ``spec.model(data)``'s parameter sites: the mixture's own
    initialisation (``init``, k-means++ when ``None``; see :func:`initial_params`)."""
    generator = seeded_generator(seed)
    start = initial_params(spec, family, data, "kmeans++" if init is None else init, generator)
    return {"weights": start.weights, **family.to_user(start.components)}


def initial_params(
    spec: Mixture,
    family: Family,
    data: torch.Tensor,
    init: Any,
    generator: torch.Generator,
) -> MixtureParams:
    """Starting parameters for one EM run.

    Args:
        spec: the mixture being fitted.
        family: ``spec.family`` bound to ``data``.
        data: ``(num_data, dim)``.
        init: ``"kmeans++"`` (seeding, then nearest-centre assignment), ``"kmeans"``
            (seeding, then Lloyd iterations), ``"random"`` (random responsibilities),
            ``"random_from_data"`` (K random points as centres), or a dict of parameters
            in ``fit.params`` form.
        generator: source of randomness.
    """
    num_components = spec.num_components
    if isinstance(init, dict):
        values = dict(init)
        if "weights" not in values:
            raise SpecError("init_params needs 'weights' besides the family's parameters")
        given = values.pop("weights")
        try:
            weights = torch.as_tensor(given, dtype=data.dtype, device=data.device)
        except (TypeError, ValueError, RuntimeError) as err:
            raise SpecError(
                f"init weights must be {num_components} non-negative numbers summing to 1; "
                f"got {given!r}"
            ) from err
        if not bool(torch.isfinite(weights).all()):
            raise SpecError(f"init weights must be finite; got {given!r}")
        if weights.shape != (num_components,) or not bool((weights >= 0).all()):
            raise SpecError(
                f"init weights must be {num_components} non-negative numbers; "
                f"got shape {tuple(weights.shape)}"
            )
        if not bool(torch.isclose(weights.sum(), weights.new_ones(()))):
            raise SpecError(f"init weights must sum to 1; they sum to {float(weights.sum())}")
        components = family.from_user(values, num_components, data)
        return MixtureParams(weights, components, torch.arange(num_components))
    if init not in INIT_METHODS:
        raise SpecError(f"init must be one of {INIT_METHODS} or a parameter dict; got {init!r}")
    # Seeding runs on the CPU, where the generator lives; the M-step runs on the data's device.
    features = (family.prepare(data) if family.name == "categorical" else data).cpu()
    if init == "random":
        raw = torch.rand(features.shape[0], num_components, generator=generator, dtype=data.dtype)
        resp = raw / raw.sum(1, keepdim=True)
    elif init == "random_from_data":
        rows = torch.randperm(data.shape[0], generator=generator)[:num_components]
        resp = _hard_resp(features, features[rows])
    else:
        centres = features[kmeans_plusplus(features, num_components, generator)]
        resp = _lloyd(features, centres) if init == "kmeans" else _hard_resp(features, centres)
    return params_from_resp(family, data, resp.to(data.device))
