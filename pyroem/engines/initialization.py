"""Starting points for EM: k-means++, k-means, random, random-from-data, or user-given."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from pyroem.errors import SpecError
from pyroem.estep.enumerate import add_statistics
from pyroem.model.families import Family
from pyroem.model.params import MixtureParams

if TYPE_CHECKING:
    from pyroem.model.mixture import Mixture

__all__ = [
    "INIT_METHODS",
    "initial_params",
    "kmeans_plusplus",
    "seeded_generator",
    "site_values",
]

INIT_METHODS = ("kmeans++", "kmeans", "random", "random_from_data")


_CHUNK_SIZE = 65536


def _squared_distances(
    features: torch.Tensor, centre: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """``‖x_n − centre‖²`` for every row, ``(num_data,)``, one chunk of rows at a time."""
    out = features.new_empty(features.shape[0])
    for start in range(0, features.shape[0], chunk_size):
        block = features[start : start + chunk_size]
        out[start : start + block.shape[0]] = (block - centre).square().sum(-1)
    return out


def kmeans_plusplus(
    features: torch.Tensor,
    num_components: int,
    generator: torch.Generator,
    chunk_size: int = _CHUNK_SIZE,
) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): each new centre is drawn with
    probability proportional to its squared distance from the nearest chosen centre.

    Args:
        features: ``(num_data, dim)``.
        num_components: number of centres ``K ≤ num_data``.
        generator: source of randomness.
        chunk_size: rows per chunk; besides the data, memory is ``O(num_data)``
            (the distances) plus ``O(chunk_size · dim)``.

    Returns:
        Indices of the chosen rows, ``(K,)``.
    """
    num_data = features.shape[0]
    first = int(torch.randint(num_data, (1,), generator=generator))
    chosen = [first]
    nearest = _squared_distances(features, features[first], chunk_size)
    for _ in range(1, num_components):
        total = nearest.sum()
        if not bool(total > 0):
            remaining = torch.ones(num_data, dtype=features.dtype)
            remaining[chosen] = 0
            nxt = int(torch.multinomial(remaining, 1, generator=generator))
        else:
            nxt = int(torch.multinomial(nearest / total, 1, generator=generator))
        chosen.append(nxt)
        torch.minimum(nearest, _squared_distances(features, features[nxt], chunk_size), out=nearest)
    return torch.tensor(chosen)


def _nearest(features: torch.Tensor, centres: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Index of the nearest centre of every row, ``(num_data,)``, chunk by chunk."""
    # The distance formula cdist would pick for the whole data, whatever the chunk.
    mode = (
        "use_mm_for_euclid_dist"
        if features.shape[0] > 25 or centres.shape[0] > 25
        else "donot_use_mm_for_euclid_dist"
    )
    return torch.cat(
        [
            torch.cdist(block, centres, compute_mode=mode).argmin(-1)
            for block in features.split(chunk_size)
        ]
    )


def _lloyd(
    features: torch.Tensor, centres: torch.Tensor, chunk_size: int, max_iter: int = 100
) -> torch.Tensor:
    """Lloyd's k-means from ``centres``; returns the final labels ``(num_data,)``."""
    num_components = centres.shape[0]
    labels = _nearest(features, centres, chunk_size)
    for _ in range(max_iter):
        counts = torch.bincount(labels, minlength=num_components).to(features.dtype)
        sums = features.new_zeros(centres.shape)
        for block, block_labels in zip(
            features.split(chunk_size), labels.split(chunk_size), strict=True
        ):
            sums.index_add_(0, block_labels, block)
        moved = sums / counts.clamp(min=1)[:, None]
        centres = torch.where(counts[:, None] > 0, moved, centres)
        new_labels = _nearest(features, centres, chunk_size)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return labels


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


def params_from_resp(
    family: Family,
    data: torch.Tensor,
    resp: Callable[[int, int], torch.Tensor],
    num_components: int,
    chunk_size: int = _CHUNK_SIZE,
) -> MixtureParams:
    """Parameters from initial responsibilities by one M-step, chunk by chunk.

    Args:
        family: the bound family.
        data: ``(num_data, dim)``.
        resp: ``resp(start, stop)``: the responsibilities of rows ``start:stop``,
            ``(stop − start, K)``, on ``data``'s device.
        num_components: ``K``.
        chunk_size: rows per chunk; memory is ``O(chunk_size · K · dim)``.
    """
    stats = None
    for start in range(0, data.shape[0], chunk_size):
        chunk = data[start : start + chunk_size]
        chunk_stats = family.statistics(family.prepare(chunk), resp(start, start + chunk.shape[0]))
        stats = chunk_stats if stats is None else add_statistics(stats, chunk_stats)
    assert stats is not None
    counts = stats.counts + 10 * torch.finfo(data.dtype).eps
    components = _regularised(family, data, num_components).m_step(stats)
    active = torch.arange(num_components, device=data.device)
    return MixtureParams(counts / counts.sum(), components, active)


def _one_hot(labels: torch.Tensor, num_components: int, like: torch.Tensor) -> Callable:
    """``resp(start, stop)`` of hard assignments to ``labels``."""

    def resp(start: int, stop: int) -> torch.Tensor:
        block = labels[start:stop].to(like.device)
        return torch.nn.functional.one_hot(block, num_components).to(like.dtype)

    return resp


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
    chunk_size: int = _CHUNK_SIZE,
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
        chunk_size: rows per chunk: besides the data, memory is ``O(num_data)`` (labels
            and k-means++ distances) plus ``O(chunk_size · K · dim)``.
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
        # Drawn chunk by chunk in row order, one stream from the generator.
        draws = [
            torch.rand(block.shape[0], num_components, generator=generator, dtype=data.dtype)
            for block in features.split(chunk_size)
        ]

        def resp(start: int, stop: int) -> torch.Tensor:
            raw = draws[start // chunk_size].to(data.device)
            return raw / raw.sum(1, keepdim=True)

        return params_from_resp(family, data, resp, num_components, chunk_size)
    if init == "random_from_data":
        rows = torch.randperm(data.shape[0], generator=generator)[:num_components]
        labels = _nearest(features, features[rows], chunk_size)
    else:
        centres = features[kmeans_plusplus(features, num_components, generator, chunk_size)]
        labels = (
            _lloyd(features, centres, chunk_size)
            if init == "kmeans"
            else _nearest(features, centres, chunk_size)
        )
    return params_from_resp(
        family, data, _one_hot(labels, num_components, data), num_components, chunk_size
    )
