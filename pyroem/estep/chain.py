r"""Log evidence of chain-structured factor graphs, on stacked tables.

An enumerated program whose discrete latents form chains — a mixture (a chain of
one latent per data point), a mixture with nested discrete choices, an HMM built
with ``pyro.markov`` — has a log evidence that is a product of matrices in the
(log-sum-exp, +) semiring. With latents :math:`z_0, …, z_{T-1}` (each with ``K``
values, batched over the plates the chain lives in), unary tables
:math:`u_t(z_t)` and pairwise tables :math:`p_t(z_{t-1}, z_t)`:

.. math::

    \log Z = \log \sum_{z} \exp\Big(u_0(z_0) + \sum_{t \ge 1} m_t(z_{t-1}, z_t)\Big),
    \qquad m_t = p_t + u_t,

and the matrix product :math:`m_1 ⋯ m_{T-1}` is taken pairwise in
:math:`\lceil \log_2 T \rceil` batched steps. This is the contraction Pyro's
``contract_to_tensor`` performs on the same tables, reordered so that the many
tables of a chain are stacked and combined in a few tensor operations instead of
one operation per table; marginals still come from backpropagation through it.

A :class:`ChainPlan` is read once from a trace (which tables exist, their
dimensions, which latent each dimension holds); :func:`log_evidence` then runs on
the tables of any run with the same structure. Programs outside this form (a
factor on three latents, latents forming a tree or a loop, latents of different
sizes in one chain, latents in different plates) get no plan, and their tables are
contracted by Pyro's general algorithm.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from pyro.ops.special import safe_log

__all__ = ["ChainPlan", "Factor", "build_chain_plan", "log_evidence", "mixture_log_evidence"]

# Largest (entries) batched outer sum a log-matmul step may materialise.
_MAX_OUTER_NUMEL = 1 << 20


class Factor(NamedTuple):
    """One table of a trace, as the planner sees it.

    Attributes:
        name: the site.
        shape: the table's shape (its unscaled ``log_prob``).
        dims: per table dimension, the symbol it holds (an enumerated latent or a
            plate), or ``None`` for a dimension of size 1.
        plates: the plate symbols of the site (its ordinal).
        key: anything else that tables stacked together must share (e.g. how the
            caller masks them).
    """

    name: str
    shape: torch.Size
    dims: tuple[str | None, ...]
    plates: frozenset[str]
    key: object = None


class _Group(NamedTuple):
    """Tables of one shape and layout, stacked along a new first dimension.

    Attributes:
        names: the sites, in stacking order.
        extra: dimensions of the stacked tensor summed first (plates deeper than
            the chain's).
        squeezed: the stacked shape once ``extra`` is summed and size-1 dims dropped.
        perm: permutation of ``squeezed`` to ``(n, batch dims present, latents)``.
        view: the final shape ``(n, *batch or 1, K[, K])``.
        times: position in the chain of each table (of its later latent), counted from
            the first position tables of its kind can take (1 for pairwise), ``(n,)``.
        full: the tables are exactly one per position, in order (no scatter needed).
    """

    names: tuple[str, ...]
    extra: tuple[int, ...]
    squeezed: tuple[int, ...]
    perm: tuple[int, ...]
    view: tuple[int, ...]
    times: torch.Tensor
    full: bool


class _Component(NamedTuple):
    """One chain: its length, latent size, batch shape and grouped tables."""

    length: int
    num_states: int
    batch: tuple[int, ...]
    unary: tuple[_Group, ...]
    pairwise: tuple[_Group, ...]


class ChainPlan(NamedTuple):
    """How to compute the log evidence from stacked tables; see :func:`build_chain_plan`."""

    components: tuple[_Component, ...]

    @property
    def mixture(self) -> bool:
        """Every chain has one latent (a mixture per chain)."""
        return all(component.length == 1 for component in self.components)

    @property
    def groups(self) -> list[_Group]:
        """Every group of stacked tables the plan reads."""
        return [
            group
            for component in self.components
            for group in (*component.unary, *component.pairwise)
        ]


def _components(factors: Sequence[Factor], latents: set[str]) -> list[list[Factor]] | None:
    """Factors split by the latents they connect (union-find); ``None`` if one has > 2."""
    parent = {latent: latent for latent in latents}

    def find(latent: str) -> str:
        while parent[latent] != latent:
            parent[latent] = parent[parent[latent]]
            latent = parent[latent]
        return latent

    for factor in factors:
        own = [dim for dim in factor.dims if dim in latents]
        if not own or len(own) > 2:
            return None
        if len(own) == 2:
            parent[find(own[0])] = find(own[1])
    groups: dict[str, list[Factor]] = {}
    for factor in factors:
        latent = next(dim for dim in factor.dims if dim in latents)
        groups.setdefault(find(latent), []).append(factor)
    return list(groups.values())


def _path(edges: set[frozenset[str]], latents: list[str]) -> list[str] | None:
    """The latents in path order from the first-listed end, or ``None`` if not a path."""
    neighbours: dict[str, set[str]] = {latent: set() for latent in latents}
    for edge in edges:
        first, second = tuple(edge)
        neighbours[first].add(second)
        neighbours[second].add(first)
    if len(edges) != len(latents) - 1 or any(len(n) > 2 for n in neighbours.values()):
        return None
    ends = [latent for latent in latents if len(neighbours[latent]) <= 1]
    order = [ends[0]]
    while len(order) < len(latents):
        following = neighbours[order[-1]] - set(order[-2:-1])
        if len(following) != 1:
            return None
        order.append(following.pop())
    return order


def _layout(
    factor: Factor, batch: Sequence[str], latents: Sequence[str], sizes: Mapping[str, int]
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(extra, squeezed, perm, view)`` taking a stacked table to ``(n, *batch, *latents)``."""
    extra = tuple(
        1 + i for i, dim in enumerate(factor.dims) if dim is not None and dim not in sizes
    )
    present = [dim for dim in factor.dims if dim is not None and dim in sizes]
    squeezed = (-1, *(sizes[dim] for dim in present))
    target = [dim for dim in (*batch, *latents) if dim in present]
    perm = (0, *(1 + present.index(dim) for dim in target))
    view = (
        -1,
        *(sizes[dim] if dim in present else 1 for dim in batch),
        *(sizes[d] for d in latents),
    )
    return extra, squeezed, perm, view


def _groups(
    entries: list[tuple[Factor, int, tuple[str, ...]]],
    batch: Sequence[str],
    sizes: Mapping[str, int],
    first: int,
    length: int,
) -> tuple[_Group, ...]:
    """Stack tables whose shape and layout agree; ``entries`` are (factor, time, latents),
    at times ``first, …, length − 1``."""
    grouped: dict[tuple[object, ...], list[tuple[str, int]]] = {}
    layouts: dict[tuple[object, ...], tuple[tuple[int, ...], ...]] = {}
    for factor, time, latents in entries:
        layout = _layout(factor, batch, latents, sizes)
        signature: tuple[object, ...] = (factor.shape, layout, factor.key)
        layouts[signature] = layout
        grouped.setdefault(signature, []).append((factor.name, time))
    groups = []
    for signature, members in grouped.items():
        extra, squeezed, perm, view = layouts[signature]
        names = tuple(name for name, _ in members)
        times = torch.tensor([time for _, time in members], dtype=torch.long)
        full = torch.equal(times, torch.arange(first, length))
        groups.append(_Group(names, extra, squeezed, perm, view, times - first, full))
    return tuple(groups)


def build_chain_plan(
    factors: Sequence[Factor],
    latent_plates: Mapping[str, frozenset[str]],
    plate_order: Sequence[str],
) -> ChainPlan | None:
    """Read the chains of a factor graph, or ``None`` if it has another structure.

    Args:
        factors: every table that depends on an enumerated latent, in trace order.
        latent_plates: for every enumerated latent (its symbol), the plate symbols of
            its site, in the order the latents were enumerated.
        plate_order: every plate symbol, outermost tensor dimension first.

    Returns:
        The plan, or ``None``.
    """
    latents = set(latent_plates)
    parts = _components(factors, latents)
    if parts is None:
        return None
    rank = {latent: i for i, latent in enumerate(latent_plates)}
    components = []
    for part in parts:
        own = sorted({dim for f in part for dim in f.dims if dim in latents}, key=rank.__getitem__)
        edges = {
            frozenset(dim for dim in f.dims if dim in latents)
            for f in part
            if sum(dim in latents for dim in f.dims) == 2
        }
        order = _path(edges, own)
        plates = {latent_plates[latent] for latent in own}
        if order is None or len(plates) != 1:
            return None
        chain_plates = plates.pop()
        sizes: dict[str, int] = {}
        for factor in part:
            if not factor.plates >= chain_plates:
                return None
            for dim, size in zip(factor.dims, factor.shape, strict=True):
                if dim is not None and (dim in latents or dim in chain_plates):
                    sizes[dim] = max(sizes.get(dim, 1), size)
        states = {sizes[latent] for latent in own}
        if len(states) != 1:
            return None
        batch = [plate for plate in plate_order if plate in chain_plates]
        for plate in batch:
            sizes.setdefault(plate, 1)
        time = {latent: t for t, latent in enumerate(order)}
        unary: list[tuple[Factor, int, tuple[str, ...]]] = []
        pairwise: list[tuple[Factor, int, tuple[str, ...]]] = []
        for factor in part:
            present = sorted((dim for dim in factor.dims if dim in latents), key=time.__getitem__)
            entry = (factor, time[present[-1]], tuple(present))
            (pairwise if len(present) == 2 else unary).append(entry)
        if not unary:
            return None
        components.append(
            _Component(
                len(order),
                states.pop(),
                tuple(sizes[plate] for plate in batch),
                _groups(unary, batch, sizes, 0, len(order)),
                _groups(pairwise, batch, sizes, 1, len(order)),
            )
        )
    return ChainPlan(tuple(components))


def _stacked(group: _Group, stacked: torch.Tensor) -> torch.Tensor:
    """A group's stacked tables in the layout ``(n, *batch, *latents)``."""
    if group.extra:
        stacked = stacked.sum(group.extra)
    return stacked.reshape(group.squeezed).permute(group.perm).reshape(group.view)


def _log_matmul(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``log(exp(first) @ exp(second))`` over the last two dimensions, stably.

    As a matrix product of the exponentials, each row of ``first`` and column of
    ``second`` shifted by its largest entry. Small products are checked: if an entry
    came out so small that terms of its sum may have underflowed (or is zero: an
    impossible pair of states, or terms more than ~700 nats apart), they are taken
    again as a log-sum-exp over the outer sum, which loses nothing.
    """
    size = first.shape[-1]
    finfo = torch.finfo(first.dtype)
    first_shift = first.detach().amax(-1, keepdim=True).clamp(min=finfo.min)
    second_shift = second.detach().amax(-2, keepdim=True).clamp(min=finfo.min)
    product = torch.matmul((first - first_shift).exp(), (second - second_shift).exp())
    small = math.prod(first.shape) * size <= _MAX_OUTER_NUMEL
    if small and not bool(product.detach().amin() > size * finfo.tiny / finfo.eps):
        outer = first.unsqueeze(-1) + second.unsqueeze(-3)
        return torch.logsumexp(outer.clamp(min=finfo.min), dim=-2)
    return safe_log(product) + first_shift + second_shift


def _chain_product(matrices: torch.Tensor) -> torch.Tensor:
    """Log-space product ``m_0 m_1 ⋯`` of ``(T, *batch, K, K)`` matrices, pairwise."""
    while matrices.shape[0] > 1:
        count = matrices.shape[0]
        even = count - count % 2
        paired = _log_matmul(matrices[0:even:2], matrices[1:even:2])
        matrices = paired if even == count else torch.cat([paired, matrices[even:]])
    return matrices[0]


def _accumulate(
    groups: Sequence[_Group], stacks: Mapping[str, torch.Tensor], shape: tuple[int, ...]
) -> torch.Tensor:
    """The sum of the groups' tables at each position, ``shape`` (size-1 batch dims where
    no table has them)."""
    total = None
    scattered = None
    for group in groups:
        tables = _stacked(group, stacks[group.names[0]])
        if group.full:
            total = tables if total is None else total + tables
            continue
        if scattered is None:
            scattered = torch.zeros(shape, dtype=tables.dtype, device=tables.device)
        times = group.times.to(tables.device)
        scattered = scattered.index_add(0, times, tables.expand(-1, *shape[1:]))
    if scattered is not None:
        total = scattered if total is None else total + scattered
    assert total is not None
    return total


def log_evidence(plan: ChainPlan, stacks: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The log evidence of every chain, summed over the chains' plates (0-dim).

    Args:
        plan: from :func:`build_chain_plan`.
        stacks: per group (keyed by its first site's name), its tables stacked along a
            new first dimension, masked.

    Returns:
        :math:`\\sum \\log Z`, differentiable in ``stacks``.
    """
    total = None
    for component in plan.components:
        states = component.num_states
        unary = _accumulate(component.unary, stacks, (component.length, *component.batch, states))
        start = unary[0]
        finite = torch.finfo(start.dtype).min
        if component.length == 1:
            value = torch.logsumexp(start.clamp(min=finite), dim=-1)
        else:
            shape = (component.length - 1, *component.batch, states, states)
            steps = _accumulate(component.pairwise, stacks, shape) + unary[1:].unsqueeze(-2)
            joint = start.unsqueeze(-1) + _chain_product(steps)
            value = torch.logsumexp(joint.clamp(min=finite).flatten(-2), dim=-1)
        total = value.sum() if total is None else total + value.sum()
    assert total is not None
    return total


def _unstacked(group: _Group, grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The gradient of :func:`_stacked` at a stacked tensor of ``shape``: ``grad``, of
    the layout ``(n, *batch or 1, K)``, taken back to ``shape``."""
    summed = [size for d, size in enumerate(shape) if d not in group.extra]
    squeezed = (shape[0], *group.squeezed[1:])
    permuted = [squeezed[d] for d in group.perm]
    inverse = sorted(range(len(group.perm)), key=group.perm.__getitem__)
    out = grad.reshape(permuted).permute(inverse).reshape(summed)
    for d in group.extra:
        out = out.unsqueeze(d)
    return out.expand(shape)


def mixture_log_evidence(
    plan: ChainPlan, stacks: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    r""":func:`log_evidence` and its gradient in ``stacks``, for plans whose chains are
    all of length one (mixtures: one latent per chain); ``None`` for other plans.

    The gradient of :math:`\log \sum_z \exp u(z)` in every table added into
    :math:`u` is the posterior :math:`\exp(u - \log Z)`, summed over the dimensions
    the table is broadcast along: written out, it needs no autograd graph.
    """
    if not plan.mixture:
        return None
    total = None
    grads: dict[str, torch.Tensor] = {}
    for component in plan.components:
        shape = (1, *component.batch, component.num_states)
        unary = _accumulate(component.unary, stacks, shape)
        start = unary[0]
        finite = torch.finfo(start.dtype).min
        clamped = start.clamp(min=finite)
        lse = torch.logsumexp(clamped, dim=-1, keepdim=True)
        value = lse.sum()
        total = value if total is None else total + value
        posterior = (clamped - lse).exp_()
        # Clamped entries pass no gradient.
        posterior = posterior.masked_fill_(start < finite, 0.0).unsqueeze(0)
        for group in component.unary:
            stacked = stacks[group.names[0]]
            view = (stacked.shape[0], *group.view[1:])
            if group.full:
                grad = posterior.sum_to_size(view)
            else:
                times = group.times.to(posterior.device)
                grad = posterior.index_select(0, times).sum_to_size(view)
            grads[group.names[0]] = _unstacked(group, grad, stacked.shape)
    assert total is not None
    return total, grads
