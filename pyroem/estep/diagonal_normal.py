r"""Diagonal Normal components over data columns: log-density tables and moments.

The arithmetic of the E-step of ``K`` Normal components with diagonal covariances,
shared by the declarative Gaussian kernel (``covariance_type`` diag and spherical)
and the recognised-mixture kernel of Pyro programs. One buffer holds the deviations
``x − μ_k`` and their squares, so that the table is one batched product with
``−1 / (2σ²)`` and both moments about ``μ_k``, ``Σ_n r_kn (x_n − μ_k)`` and
``Σ_n r_kn (x_n − μ_k)²``, are one batched product with the responsibilities:

.. math::

    \log N(x_n | μ_k, σ_k²) = −\tfrac12 \sum_d \left[\log 2π + \log σ²_{kd}
        + (x_{nd} − μ_{kd})² / σ²_{kd}\right].
"""

from __future__ import annotations

import math

import torch

__all__ = ["diagonal_normal_moments", "diagonal_normal_table"]


def diagonal_normal_table(
    data: torch.Tensor, locs: torch.Tensor, variances: torch.Tensor, buffer: torch.Tensor
) -> torch.Tensor:
    """The log-densities of every column of ``data`` under every component.

    Args:
        data: the data points as columns, ``(dim, num_data)``, contiguous.
        locs: the components' locations, ``(num_components, dim)``.
        variances: the components' variances, ``(num_components, dim)``.
        buffer: filled with the deviations ``x − μ_k`` (its first ``dim`` rows) and
            their squares (the last ``dim``), ``(num_components, 2 * dim, num_data)``;
            :func:`diagonal_normal_moments` reads it.

    Returns:
        ``log N(x_n | μ_k, diag σ_k²)``, ``(num_components, num_data)``.
    """
    dim = data.shape[0]
    deviations, squares = buffer[:, :dim], buffer[:, dim:]
    torch.sub(data[None], locs[:, :, None], out=deviations)
    torch.square(deviations, out=squares)
    halves = (-0.5 * variances.reciprocal())[:, None, :]
    const = -0.5 * (dim * math.log(2 * math.pi) + variances.log().sum(-1, keepdim=True))
    return torch.bmm(halves, squares)[:, 0].add_(const)


def diagonal_normal_moments(
    buffer: torch.Tensor, resp: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted first and second moments about the locations of a buffer filled by
    :func:`diagonal_normal_table`.

    Args:
        buffer: deviations and their squares, ``(num_components, 2 * dim, num_data)``.
        resp: the weights, ``(num_components, num_data)``.

    Returns:
        ``Σ_n r_kn (x_n − μ_k)`` and ``Σ_n r_kn (x_n − μ_k)²``, ``(num_components, dim)``
        each.
    """
    dim = buffer.shape[1] // 2
    # (K, 1, n) @ (K, n, 2D): several times faster than the (K, 2D, n) @ (K, n, 1)
    # matrix-vector form, which BLAS runs as n-long dot products per row.
    moments = torch.bmm(resp[:, None, :], buffer.mT)[:, 0]
    return moments[:, :dim], moments[:, dim:]
