r"""A lean log-space einsum for the small tables of enumerated programs.

Pyro contracts factor tables with ``opt_einsum`` and a log-space einsum backend
that, for every pairwise step, shifts each operand by its maximum, exponentiates,
multiplies and takes the log again: about fifteen tensor operations per step. For
the small tables of enumerated models (a few states, a plate of data) the cost is
in the number of operations, not their size. This backend does the same pairwise
step as a broadcast sum and one ``logsumexp``:

.. math:: \log \sum_{s} \exp(a + b) \quad\text{(dimensions aligned by broadcasting)},

which materialises the outer sum of the two operands; past ``_MAX_NUMEL`` entries
it hands the step back to Pyro's backend. Entries are clamped at the most negative
finite number before the ``logsumexp``, so a slice of ``-inf`` (an impossible
configuration) sums to a finite, negligible value and its gradient stays finite,
as in Pyro's backend.

:class:`LogRing` is Pyro's ring of log-space sum-product operations with this
backend; ``pyro.ops.contract.contract_to_tensor(..., ring=LogRing())`` contracts
with it.
"""

from __future__ import annotations

import math

import torch
from pyro.ops import rings
from pyro.ops.einsum import torch_log
from pyro.ops.einsum.util import Tensordot

__all__ = ["LogRing", "einsum", "tensordot", "transpose"]

# Largest outer sum (entries) a pairwise step may materialise.
_MAX_NUMEL = 1 << 18

# Per (equation, shapes): how to align each operand, and which dimensions to sum;
# ``None`` when the outer sum would be too large.
_Plan = tuple[list[tuple[tuple[int, ...] | None, tuple[int, ...]]], tuple[int, ...]]
_PLANS: dict[tuple[str, tuple[torch.Size, ...]], _Plan | None] = {}


def _plan(equation: str, shapes: tuple[torch.Size, ...]) -> _Plan | None:
    """Permutations and views that align every operand to ``output + summed`` dims."""
    inputs_text, output = equation.split("->")
    inputs = inputs_text.split(",")
    sizes: dict[str, int] = {}
    for dims, shape in zip(inputs, shapes, strict=True):
        for dim, size in zip(dims, shape, strict=True):
            sizes[dim] = max(sizes.get(dim, 1), size)
    summed = sorted({dim for dims in inputs for dim in dims} - set(output))
    union = list(output) + summed
    if math.prod(sizes[dim] for dim in union) > _MAX_NUMEL:
        return None
    aligned = []
    for dims, shape in zip(inputs, shapes, strict=True):
        own = [dim for dim in union if dim in dims]
        perm = tuple(dims.index(dim) for dim in own)
        view = tuple(shape[dims.index(dim)] if dim in dims else 1 for dim in union)
        aligned.append((None if perm == tuple(range(len(dims))) else perm, view))
    return aligned, tuple(range(len(output), len(union)))


def einsum(equation: str, *operands: torch.Tensor) -> torch.Tensor:
    """Log-space einsum: ``log(einsum(equation, *exp(operands)))``, computed stably."""
    key = (equation, tuple(operand.shape for operand in operands))
    if key in _PLANS:
        plan = _PLANS[key]
    else:
        plan = _PLANS[key] = _plan(equation, key[1])
    if plan is None:
        return torch_log.einsum(equation, *operands)
    aligned, summed = plan
    total: torch.Tensor | None = None
    for (perm, view), operand in zip(aligned, operands, strict=True):
        if perm is not None:
            operand = operand.permute(perm)
        operand = operand.reshape(view)
        total = operand if total is None else total + operand
    assert total is not None
    if not summed:
        # A new tensor even for a lone operand: Pyro attaches names to results.
        return total if len(operands) > 1 else total.clone()
    total = total.clamp(min=torch.finfo(total.dtype).min)
    return torch.logsumexp(total, dim=summed)


def transpose(tensor: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """``opt_einsum``'s transpose for this backend."""
    return tensor.permute(axes)


tensordot = Tensordot(einsum)


class LogRing(rings.LogRing):
    """Pyro's log-space sum-product ring, contracting with this module's einsum."""

    _backend = __name__
