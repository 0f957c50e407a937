"""Closed-form M-steps on stacked uses.

A parameter of an HMM is read by one site per time step: the transition rows by
every ``state_t``, the state means by every ``obs_t``. The closed forms of
:mod:`pyroem.mstep.recognised` sum weighted statistics over those uses one by
one. :class:`StackedUpdate` gives them the same uses stacked: sites whose tables,
values, distribution parameters and row indices have the same shapes are stacked
along a new first dimension (the other dimensions padded to a common rank, so
broadcasting lines up), and each stack enters the closed form as a single use.
The statistics are the same sums, formed in a few tensor operations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import pyro.distributions as dist
import torch

from pyroem.estep.compiled import CompiledEStep, compact_view
from pyroem.mstep.recognised import (
    CONJUGATE_UPDATES,
    LOCATION_SLOTS,
    ClosedForm,
    Use,
    effective_prior,
    patched_site,
    unwrap_distribution,
)

__all__ = ["StackedUpdate"]

# Slots whose closed forms are elementwise in the stacked dimension; the others
# (multivariate normal) take their uses one by one.
_STACKABLE = {
    "categorical": (),
    "bernoulli": ("probs",),
    "binomial": ("probs", "total_count"),
    "poisson": ("rate",),
    "exponential": ("rate",),
    "normal-loc": ("loc", "scale"),
    "normal-variance": ("loc", "scale"),
    "normal-precision": ("loc", "scale"),
}


class _UseStack(NamedTuple):
    """Uses of one block stacked together.

    Attributes:
        names: their sites, in stacking order.
        rows: their row indices, stacked and padded, ``(n, *padding, *rows_shape)``.
        event_ndims: as :attr:`Use.event_ndims`.
        rank: dimensions of every padded tensor, stack dimension included.
        weight_rank: dimensions of the padded weight (``rank − event_ndims``).
        source: ``(group key, positions)`` when the weights are rows of one stacked
            E-step group (``positions`` ``None`` for the whole group, in order).
        shifts: per location block that moves these sites' ``loc``, its row indices
            on them, stacked and padded like ``rows``.
        members: ``names`` as a set.
    """

    names: tuple[str, ...]
    rows: torch.Tensor
    event_ndims: int
    rank: int
    weight_rank: int
    source: tuple[str, torch.Tensor | None] | None
    shifts: dict[str, torch.Tensor]
    members: frozenset[str]


def _pad(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """``(n, *shape)`` to ``(n, 1, …, 1, *shape)`` with ``rank`` dimensions."""
    return tensor.reshape(tensor.shape[0], *(1,) * (rank - tensor.dim()), *tensor.shape[1:])


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``; large tensors are stacked without their broadcast copies (the
    result broadcasts them back, so its shape is the stacked shape)."""
    if len(tensors) == 1:
        return tensors[0].unsqueeze(0)
    shape = tensors[0].shape
    if shape.numel() < _COMPACT_NUMEL:
        return torch.stack(list(tensors))
    compact = [compact_view(tensor) for tensor in tensors]
    if any(
        t.shape != shape or c.shape != compact[0].shape
        for t, c in zip(tensors, compact, strict=True)
    ):
        return torch.stack(list(tensors))
    return torch.stack(compact).expand(len(tensors), *shape)


# Stacks of tensors smaller than this are plain copies: compacting costs more.
_COMPACT_NUMEL = 1024


def _family(site: Any) -> Any:
    return unwrap_distribution(site["fn"])[0]


def _cached(
    cache: dict[Any, torch.Tensor], names: tuple[str, ...], attr: str, sites: Mapping[str, Any]
) -> torch.Tensor:
    """The sites' values (``attr == "value"``) or distribution attribute, stacked once.

    Keyed by the identity of ``names`` (a stack's own tuple, alive for the sweep):
    hashing a tuple of thousands of names costs more than the lookup saves."""
    key = (id(names), attr)
    if key not in cache:
        # Sites replicated from a few representatives give the stack without a site loop.
        replicated = getattr(sites, "stacked", None)
        shared = None if replicated is None else replicated(names, attr)
        if shared is not None:
            cache[key] = shared
        elif attr == "value":
            cache[key] = _stack([sites[name]["value"] for name in names])
        else:
            cache[key] = _stack([getattr(_family(sites[name]), attr) for name in names])
    return cache[key]


class StackedUpdate:
    """The closed-form update of one block, on stacked uses (see the module docstring).

    Args:
        block: the recognised block.
        blocks: every recognised block by site (location blocks shift scale blocks).
        sites: the sites of a run (any run of the same structure).
        estep: an E-step of that structure, to read which sites are stacked there.
    """

    def __init__(
        self,
        block: ClosedForm,
        blocks: Mapping[str, ClosedForm | None],
        sites: Mapping[str, Any],
        estep: CompiledEStep,
    ) -> None:
        self.block = block
        self.blocks = blocks
        self.stacks: list[_UseStack] = []
        self.single: list[Use] = []
        locations = [
            other
            for other in blocks.values()
            if other is not None and other.slot in LOCATION_SLOTS and other.name != block.name
        ]
        # Per location block, its uses by site (read once per use below, not searched).
        self.on_site: dict[str, dict[str, list[Use]]] = {}
        for other in locations:
            by_site = self.on_site.setdefault(other.name, {})
            for other_use in other.uses:
                by_site.setdefault(other_use.site, []).append(other_use)
        grouped: dict[tuple[Any, ...], list[Use]] = {}
        for use in block.uses:
            key = self._key(use, sites[use.site], estep, locations)
            if key is None:
                self.single.append(use)
            else:
                grouped.setdefault(key, []).append(use)
        for uses in grouped.values():
            if len(uses) == 1:
                # Nothing to stack: the closed form reads the site itself.
                self.single.extend(uses)
            else:
                self.stacks.append(self._build(uses, sites, estep, locations))

    def _key(
        self, use: Use, site: Any, estep: CompiledEStep, locations: Sequence[ClosedForm]
    ) -> tuple[Any, ...] | None:
        if use.slot not in _STACKABLE:
            return None
        family = _family(site)
        shapes = tuple(getattr(family, attr).shape for attr in _STACKABLE[use.slot])
        group = estep.group_of[use.site][0] if use.site in estep.group_of else None
        moved = []
        for other in locations:
            on_site = self.on_site[other.name].get(use.site, [])
            if len(on_site) > 1:
                return None
            moved.append((other.name, on_site[0].rows.shape) if on_site else None)
        return (
            type(family),
            use.rows.shape,
            use.event_ndims,
            site["value"].shape,
            estep.weight(use.site).shape,
            shapes,
            group,
            tuple(moved),
        )

    def _build(
        self,
        uses: list[Use],
        sites: Mapping[str, Any],
        estep: CompiledEStep,
        locations: Sequence[ClosedForm],
    ) -> _UseStack:
        first = uses[0]
        site = sites[first.site]
        family = _family(site)
        weight_rank = estep.weight(first.site).dim() + first.event_ndims
        ranks = [weight_rank, first.rows.dim(), site["value"].dim()]
        ranks += [getattr(family, attr).dim() for attr in _STACKABLE[first.slot]]
        rank = 1 + max(ranks)
        names = tuple(use.site for use in uses)
        rows = _pad(_stack([use.rows for use in uses]), rank)
        source = None
        if first.site in estep.group_of:
            key = estep.group_of[first.site][0]
            positions = torch.tensor([estep.group_of[name][1] for name in names])
            whole = positions.numel() == estep.stacks[key].shape[0] and bool(
                (positions == torch.arange(positions.numel())).all()
            )
            source = (key, None if whole else positions)
        shifts = {}
        for other in locations:
            by_site = self.on_site[other.name]
            if any(name in by_site for name in names):
                # _key put sites with and without such a use in different stacks.
                stacked = _stack([by_site[name][0].rows for name in names])
                shifts[other.name] = _pad(stacked, rank)
        return _UseStack(
            names,
            rows,
            first.event_ndims,
            rank,
            rank - first.event_ndims,
            source,
            shifts,
            frozenset(names),
        )

    def _weights(self, stack: _UseStack, estep: CompiledEStep) -> torch.Tensor:
        if stack.source is None:
            weight = _stack([estep.weight(name) for name in stack.names])
        else:
            key, positions = stack.source
            weight = estep.stacks[key]
            if positions is not None:
                weight = weight.index_select(0, positions.to(weight.device))
        return _pad(weight, stack.weight_rank)

    def _stacked_use(
        self,
        stack: _UseStack,
        estep: CompiledEStep,
        sites: Mapping[str, Any],
        changes: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        cache: dict[Any, torch.Tensor],
    ) -> tuple[Use, dict[str, Any], torch.Tensor]:
        slot = self.block.slot
        if any(name in stack.members for name in changes):
            values = [
                changes[name][1] if name in changes else sites[name]["value"]
                for name in stack.names
            ]
            value = _pad(_stack(values), stack.rank)
        else:
            value = _pad(_cached(cache, stack.names, "value", sites), stack.rank)
        params = {
            attr: _pad(_cached(cache, stack.names, attr, sites), stack.rank)
            for attr in _STACKABLE[slot]
        }
        if slot == "categorical":
            fn: Any = None
        elif slot in ("bernoulli", "binomial"):
            count = params.get("total_count")
            fn = (
                dist.Bernoulli(probs=params["probs"], validate_args=False)
                if count is None
                else dist.Binomial(count, probs=params["probs"], validate_args=False)
            )
        elif slot == "poisson":
            fn = dist.Poisson(params["rate"], validate_args=False)
        elif slot == "exponential":
            fn = dist.Exponential(params["rate"], validate_args=False)
        else:
            loc = params["loc"]
            for other, rows in stack.shifts.items():
                if other in changes:
                    old, new = changes[other]
                    loc = compact_view(loc) + (new - old).reshape(-1)[compact_view(rows)]
            fn = dist.Normal(loc, params["scale"], validate_args=False)
        use = Use("", slot, stack.rows, stack.event_ndims)
        return use, {"value": value, "fn": fn}, self._weights(stack, estep)

    def __call__(
        self,
        current: torch.Tensor,
        estep: CompiledEStep,
        sites: Mapping[str, Any],
        changes: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        cache: dict[Any, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The new value of the block's site, as :func:`closed_form_update` computes it.

        Args:
            current: the site's current value.
            estep: the E-step's weights.
            sites: the sites of the run at the current values.
            changes: ``{site: (old, new)}`` of blocks updated since that run.
            cache: stacked values and parameters of these ``sites``, shared by the
                blocks of one sweep.
        """
        current = current.detach()
        cache = {} if cache is None else cache
        uses = [self._stacked_use(stack, estep, sites, changes, cache) for stack in self.stacks]
        for use in self.single:
            site = sites[use.site]
            moved = use.site in changes or any(
                use.site in self.on_site.get(other, ()) for other in changes
            )
            if moved:
                site = patched_site(site, changes, self.blocks)
            uses.append((use, site, estep.weight(use.site)))
        name = self.block.name
        prior = effective_prior(sites[name]) if name in sites else None
        new = CONJUGATE_UPDATES[self.block.slot](current, uses, prior, self.block.jacobian)
        return torch.where(torch.isfinite(new), new, current).detach()
