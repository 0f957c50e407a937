"""Distributions Pyro lacks that the conjugate mixture priors need."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints

__all__ = ["InverseWishart"]


class InverseWishart(TorchDistribution):
    r"""Inverse-Wishart distribution over symmetric positive-definite matrices.

    .. math::
        \log p(\Sigma) = \tfrac{\nu}{2}\log|\Psi| - \tfrac{\nu D}{2}\log 2
        - \log\Gamma_D(\tfrac{\nu}{2}) - \tfrac{\nu + D + 1}{2}\log|\Sigma|
        - \tfrac12 \operatorname{tr}(\Psi\Sigma^{-1})

    Its mode is :math:`\Psi / (\nu + D + 1)`; if :math:`\Sigma \sim IW(\nu, \Psi)` then
    :math:`\Sigma^{-1} \sim \mathrm{Wishart}(\nu, \Psi^{-1})`.

    Args:
        df: degrees of freedom :math:`\nu > D - 1`, shape ``batch_shape``.
        scale_matrix: :math:`\Psi`, shape ``batch_shape + (D, D)``.
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {
        "df": constraints.positive,
        "scale_matrix": constraints.positive_definite,
    }
    support = constraints.positive_definite
    has_rsample = True

    def __init__(
        self,
        df: torch.Tensor | float,
        scale_matrix: torch.Tensor,
        validate_args: bool | None = None,
    ) -> None:
        scale_matrix = torch.as_tensor(scale_matrix)
        df = torch.as_tensor(df, dtype=scale_matrix.dtype, device=scale_matrix.device)
        batch_shape = torch.broadcast_shapes(df.shape, scale_matrix.shape[:-2])
        event_shape = scale_matrix.shape[-2:]
        self.df = df.expand(batch_shape)
        self.scale_matrix = scale_matrix.expand(batch_shape + event_shape)
        if validate_args is not False and bool((self.df <= event_shape[-1] - 1).any()):
            raise ValueError(
                f"InverseWishart needs df > dim - 1 = {event_shape[-1] - 1}; got df={df.tolist()}"
            )
        super().__init__(batch_shape, event_shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(InverseWishart, _instance)
        batch_shape = torch.Size(batch_shape)
        new.df = self.df.expand(batch_shape)
        new.scale_matrix = self.scale_matrix.expand(batch_shape + self.event_shape)
        super(InverseWishart, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self) -> torch.Tensor:
        dim = self.event_shape[-1]
        return self.scale_matrix / (self.df - dim - 1)[..., None, None]

    @property
    def mode(self) -> torch.Tensor:
        dim = self.event_shape[-1]
        return self.scale_matrix / (self.df + dim + 1)[..., None, None]

    def rsample(self, sample_shape: Any = ()) -> torch.Tensor:
        # Bartlett decomposition: with Ψ = U Uᵀ and A lower triangular (A_ii² ~ χ²(ν − i),
        # N(0, 1) below), Σ⁻¹ = U⁻ᵀ A Aᵀ U⁻¹ ~ Wishart(ν, Ψ⁻¹), so Σ = (U A⁻ᵀ)(U A⁻ᵀ)ᵀ.
        # torch's Wishart.rsample is avoided: it resamples in place, which breaks autograd,
        # and warns "Singular sample detected" on every call (pytorch/pytorch#122021).
        dim = self.event_shape[-1]
        shape = torch.Size(sample_shape) + self.batch_shape
        offsets = torch.arange(dim, dtype=self.df.dtype, device=self.df.device)
        chi2 = torch.distributions.Chi2(self.df[..., None] - offsets)
        bartlett = torch.diag_embed(chi2.rsample(sample_shape).sqrt()) + torch.randn(
            shape + self.event_shape, dtype=self.df.dtype, device=self.df.device
        ).tril(-1)
        eye = torch.eye(dim, dtype=self.df.dtype, device=self.df.device)
        inverse = torch.linalg.solve_triangular(bartlett, eye.expand_as(bartlett), upper=False)
        factor = torch.linalg.cholesky(self.scale_matrix) @ inverse.mT
        return factor @ factor.mT

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        dim = self.event_shape[-1]
        chol_value = torch.linalg.cholesky(value)
        chol_scale = torch.linalg.cholesky(self.scale_matrix)
        log_det_value = 2 * chol_value.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        log_det_scale = 2 * chol_scale.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        # tr(Psi Sigma^{-1}) = ||L_Sigma^{-1} L_Psi||_F^2
        whitened = torch.linalg.solve_triangular(chol_value, chol_scale, upper=False)
        trace = whitened.square().sum((-2, -1))
        half_df = 0.5 * self.df
        return (
            half_df * log_det_scale
            - half_df * dim * math.log(2.0)
            - torch.mvlgamma(half_df, p=dim)
            - 0.5 * (self.df + dim + 1) * log_det_value
            - 0.5 * trace
        )
