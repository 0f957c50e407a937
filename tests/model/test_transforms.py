"""The one map between a site's support and an unconstrained space.

References: torch.distributions' own ``transform_to`` (values for real, positive,
unit interval and lower Cholesky; log-Jacobians where torch has one), and for every
support the log-determinant of the Jacobian computed by automatic differentiation of
the forward map, restricted to the free coordinates of the constrained value (all but
the last entry of a simplex, the lower triangle of a triangular or symmetric matrix).
"""

from __future__ import annotations

import pytest
import torch
from torch.distributions import constraints, transform_to

from pyroem.errors import NotSupportedError
from pyroem.model.transforms import constrain, unconstraining

DIM = 3
_LOWER = torch.tril_indices(DIM, DIM)


def _free(constraint: constraints.Constraint, value: torch.Tensor) -> torch.Tensor:
    """The free coordinates of a constrained value, flattened."""
    if constraint is constraints.simplex:
        return value[:-1]
    if value.dim() == 2:
        return value[_LOWER[0], _LOWER[1]]
    return value.reshape(-1)


def _square(u: torch.Tensor) -> torch.Tensor:
    """The ``D(D+1)/2`` log-Cholesky entries as the ``D × D`` matrix ``transform_to`` reads."""
    full = u.new_zeros(DIM, DIM)
    full[_LOWER[0], _LOWER[1]] = u
    return full


CASES = {
    "real": (constraints.real, 4),
    "positive": (constraints.positive, 4),
    "unit_interval": (constraints.unit_interval, 4),
    "simplex": (constraints.simplex, DIM),
    "lower_cholesky": (constraints.lower_cholesky, DIM * (DIM + 1) // 2),
    "positive_definite": (constraints.positive_definite, DIM * (DIM + 1) // 2),
}


@pytest.mark.parametrize("name", CASES)
def test_round_trip_and_log_jacobian(name: str) -> None:
    torch.set_default_dtype(torch.float64)
    constraint, size = CASES[name]
    transform = unconstraining(name, constraint)
    generator = torch.Generator().manual_seed(0)
    u = torch.randn(size, generator=generator)
    values, log_jacobian = constrain({name: transform}, {name: u})
    value = values[name]
    assert bool(constraint.check(value).all())
    # Round trip: constrained → unconstrained → constrained.
    torch.testing.assert_close(transform.inv(transform(value)), value)
    torch.testing.assert_close(transform(value), u)

    def forward(free: torch.Tensor) -> torch.Tensor:
        return _free(constraint, transform.inv(free))

    jacobian = torch.autograd.functional.jacobian(forward, u)
    expected = torch.linalg.slogdet(jacobian)[1]
    torch.testing.assert_close(log_jacobian, expected)
    if constraint in (
        constraints.real,
        constraints.positive,
        constraints.unit_interval,
        constraints.lower_cholesky,
    ):
        reference = transform_to(constraint)
        square = _square(u) if constraint is constraints.lower_cholesky else u
        torch.testing.assert_close(value, reference(square))
        if constraint is not constraints.lower_cholesky:  # torch has no Jacobian for it
            term = reference.log_abs_det_jacobian(u, reference(u))
            torch.testing.assert_close(log_jacobian, term.sum())


def test_leading_dimensions_are_kept() -> None:
    torch.set_default_dtype(torch.float64)
    transforms = {
        "cov": unconstraining("cov", constraints.positive_definite),
        "p": unconstraining("p", constraints.simplex),
    }
    batch = {"cov": torch.randn(5, 6), "p": torch.randn(5, 2)}
    _, per_row = constrain(transforms, batch, 1)
    _, total = constrain(transforms, batch)
    assert per_row.shape == (5,)
    torch.testing.assert_close(per_row.sum(), total)


def test_a_support_without_a_bijection_is_refused() -> None:
    with pytest.raises(NotSupportedError, match=r"'z'.*reparametrise"):
        unconstraining("z", constraints.integer_interval(0, 3))


def test_constrain_keeps_the_values_dtype_whatever_the_default() -> None:
    """A float32 fit stays float32 when torch's default dtype is float64 (the log-Jacobian
    sum must not promote the NUTS potential)."""
    torch.set_default_dtype(torch.float64)  # the autouse fixture restores it
    support = constraints.simplex
    transform = unconstraining("weights", support)
    raw = torch.tensor([0.3, -0.2], dtype=torch.float32)
    values, log_jacobian = constrain({"weights": transform}, {"weights": raw})
    assert values["weights"].dtype == torch.float32
    assert log_jacobian.dtype == torch.float32
