"""The declarative mixture model: ``π ~ Dirichlet(α)``, ``θ_k ~ prior``, ``z_n ~ π``,
``x_n ~ family(θ_{z_n})``."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch

from pyroem.engines.initialization import initial_params
from pyroem.errors import DataError, SpecError
from pyroem.estep.missing import has_nan
from pyroem.model.families import Family, family_from_config, make_family
from pyroem.model.params import MixtureParams

__all__ = ["MISSING_DATA_SUPPORT", "Mixture", "MixtureParams", "as_data", "fill_missing"]


def _is_complex(data: Any) -> bool:
    """Whether ``data`` holds complex numbers (a tensor, an array or nested lists)."""
    if isinstance(data, torch.Tensor):
        return data.is_complex()
    dtype = getattr(data, "dtype", None)
    try:
        if dtype is not None:
            return bool(np.issubdtype(np.dtype(dtype), np.complexfloating))
        return bool(np.iscomplexobj(np.asarray(data)))
    except (TypeError, ValueError):
        return False


def as_data(
    data: Any,
    dtype: torch.dtype = torch.float64,
    device: Any = None,
    *,
    allow_missing: bool = False,
) -> torch.Tensor:
    """Validate generic data requirements and return a ``(num_data, dim)`` tensor.

    Args:
        data: array-like (NumPy array, tensor, nested lists, pandas DataFrame).
        dtype: floating dtype of the result.
        device: torch device of the result (default: the data's own, or CPU).
        allow_missing: let NaN entries (missing values) through, as map-em on a
            :class:`Mixture` marginalises them; a row with every entry missing is
            still an error.

    Raises:
        DataError: not numeric, not two-dimensional, empty, holding inf, holding NaN
            where ``allow_missing`` is false, or a row with every entry missing.
    """
    if hasattr(data, "to_numpy") and not isinstance(data, torch.Tensor):
        data = data.to_numpy()
    if _is_complex(data):
        raise DataError(
            "data must be real; got a complex array (casting would drop the imaginary "
            "part): pass data.real, np.abs(data), or the real and imaginary parts as "
            "separate columns"
        )
    if isinstance(data, torch.Tensor):
        tensor = data.detach().to(dtype=dtype, device=device)
    else:
        try:
            tensor = torch.as_tensor(data, dtype=dtype, device=device)
        except (TypeError, ValueError, RuntimeError) as err:
            raise DataError(f"data must be a numeric array; could not convert it ({err})") from err
    if tensor.ndim != 2:
        hint = (
            " reshape one feature to (num_data, 1) with x.reshape(-1, 1)"
            if tensor.ndim == 1
            else ""
        )
        raise DataError(
            f"data must be two-dimensional (num_data, dim); got shape {tuple(tensor.shape)}.{hint}"
        )
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise DataError(f"data is empty: shape {tuple(tensor.shape)}")
    # Chunk by chunk: torch.isinf takes |x|, a float copy of the whole data.
    if any(bool(torch.isinf(rows).any()) for rows in tensor.split(65536)):
        infinite = torch.isinf(tensor)
        row, col = (int(i) for i in torch.nonzero(infinite)[0])
        count = int(infinite.sum())
        raise DataError(
            f"data holds {count} infinite value(s), first at row {row} column {col}; "
            "drop or replace them before fitting"
        )
    if has_nan(tensor):
        missing = torch.isnan(tensor)
        if not allow_missing:
            row, col = (int(i) for i in torch.nonzero(missing)[0])
            raise DataError(
                f"data holds {int(missing.sum())} missing value(s) (NaN), first at row {row} "
                f"column {col}. {MISSING_DATA_SUPPORT}; elsewhere drop or impute them first "
                "(e.g. with fit.impute(data) of a map-em fit)"
            )
        empty = torch.nonzero(missing.all(1)).reshape(-1)
        if empty.numel() > 0:
            shown = empty[:10].tolist()
            more = f" (and {empty.numel() - 10} more)" if empty.numel() > 10 else ""
            raise DataError(
                f"row(s) {shown}{more} of the data have every entry missing (NaN): such a "
                "row carries no information; drop it"
            )
    return tensor


def fill_missing(data: torch.Tensor) -> torch.Tensor:
    """``data`` with each NaN set to the median of its column's observed entries (an
    observed value, so within every family's support); ``data`` itself when it has none.

    It serves what needs one number per entry: validation, the data-derived default
    priors and the initialisation. The fit itself marginalises missing entries.

    Raises:
        DataError: a column with every entry missing.
    """
    if not has_nan(data):
        return data
    missing = torch.isnan(data)
    empty = torch.nonzero(missing.all(0)).reshape(-1)
    if empty.numel() > 0:
        raise DataError(
            f"column(s) {empty.tolist()} of the data have every entry missing (NaN); drop them"
        )
    medians = data.nanmedian(0).values
    return torch.where(missing, medians, data)


MISSING_DATA_SUPPORT = (
    "Missing values (NaN) are supported by pyroem.fit(Mixture, data, method='map-em') with "
    "the data in memory (every family), by that fit's predict, predict_proba, score_samples "
    "and impute, and by pyroem.sklearn's map-em estimators (GaussianMixture, PoissonMixture, "
    "BernoulliMixture, CategoricalMixture); not by vb-em, mcmc-em, nuts, Pyro programs, or "
    "streamed and stepwise fits"
)
"""Where missing values are supported (quoted by the errors elsewhere)."""


class Mixture:
    """A finite mixture model with conjugate priors, declared in one line.

    The generative model is::

        π ~ Dirichlet(weights_prior)                  # mixing weights, (K,)
        θ_k ~ prior              for k = 1..K         # family parameters
        z_n ~ Categorical(π)     for n = 1..N         # enumerated, never sampled
        x_n ~ family(θ_{z_n})

    Args:
        num_components: ``K ≥ 1``.
        family: ``"gaussian"``, ``"poisson"``, ``"bernoulli"``, ``"categorical"``,
            ``"exponential"``, or a family object (:class:`pyroem.Gaussian`, …).
        covariance_type: for the gaussian family: ``"full"`` (default), ``"diag"``,
            ``"spherical"`` or ``"tied"``.
        weights_prior: Dirichlet concentration ``α`` of the mixing weights, a scalar or
            ``(K,)``. ``1`` (default) is flat: the weights are then maximum likelihood.
            ``α_k < 1`` favours sparse weights; MAP-EM then removes a component whose
            ``N_k + α_k − 1`` drops to 0 or below, with a
            :class:`~pyroem.errors.CollapsedComponentWarning` (the log joint is unbounded
            on that face of the simplex, so there is no interior maximum to return).
        prior: ``"default"`` (the family's weak, data-scaled conjugate prior, which keeps
            components from collapsing), ``None`` (flat: plain maximum likelihood), or a
            prior object (:class:`pyroem.NormalInverseWishart`, :class:`pyroem.Gamma`,
            :class:`pyroem.Beta`, :class:`pyroem.Dirichlet`).
        num_categories: for the categorical family (default: ``max(data) + 1``).
    """

    def __init__(
        self,
        num_components: int,
        family: str | Family = "gaussian",
        *,
        covariance_type: str | None = None,
        weights_prior: Any = 1.0,
        prior: Any = "default",
        num_categories: int | None = None,
    ) -> None:
        if isinstance(num_components, bool) or not isinstance(num_components, int):
            raise SpecError(f"num_components must be a positive integer; got {num_components!r}")
        if num_components < 1:
            raise SpecError(f"num_components must be >= 1; got {num_components}")
        self.num_components = num_components
        self.family = make_family(
            family, covariance_type=covariance_type, num_categories=num_categories, prior=prior
        )
        try:
            alpha = torch.as_tensor(weights_prior, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise SpecError(
                f"weights_prior must be a positive number or {num_components} positive "
                f"numbers (a Dirichlet concentration); got {weights_prior!r}"
            ) from err
        if alpha.ndim > 1 or (alpha.ndim == 1 and alpha.shape[0] != num_components):
            raise SpecError(
                f"weights_prior must be a scalar or have shape ({num_components},); "
                f"got shape {tuple(alpha.shape)}"
            )
        if not bool(torch.isfinite(alpha).all() and (alpha > 0).all()):
            raise SpecError(f"weights_prior must be positive and finite; got {weights_prior!r}")
        self.weights_prior = alpha.expand(num_components).clone()

    def __repr__(self) -> str:
        alpha = self.weights_prior.unique()
        shown = float(alpha[0]) if alpha.numel() == 1 else self.weights_prior.tolist()
        return (
            f"Mixture(num_components={self.num_components}, family={self.family!r}, "
            f"weights_prior={shown})"
        )

    # ----- serialisation --------------------------------------------------
    def to_config(self) -> dict[str, Any]:
        """JSON-serialisable description of the spec."""
        return {
            "num_components": self.num_components,
            "family": self.family.to_config(),
            "weights_prior": self.weights_prior.tolist(),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Mixture:
        """Inverse of :meth:`to_config`."""
        return cls(
            config["num_components"],
            family_from_config(config["family"]),
            weights_prior=config["weights_prior"],
        )

    def with_proper_prior(self) -> Mixture:
        """This mixture, with mclust's prior in place of the weak default
        (``prior="default"`` of the gaussian family is improper: flat on the means)."""
        family = self.family.proper_default()
        if family is self.family:
            return self
        twin = copy.copy(self)
        twin.family = family
        return twin

    # ----- binding ----------------------------------------------------------
    def bind(self, data: torch.Tensor) -> Family:
        """The family bound to ``data`` (dimension fixed, default priors resolved).

        Where ``data`` has missing entries (NaN), the default priors are resolved from
        the data with each missing entry set to its column's median (see
        :func:`fill_missing`).
        """
        if data.shape[0] < self.num_components:
            raise DataError(
                f"num_components={self.num_components} exceeds the number of data points "
                f"({data.shape[0]}); use fewer components or more data"
            )
        # The family validates the data (its support) as it binds.
        return self.family.bind(fill_missing(data), self.num_components)

    # ----- the Pyro program ---------------------------------------------------
    def model(self, data: Any, params: dict[str, Any] | None = None) -> Callable[..., torch.Tensor]:
        """The Pyro program of this mixture for ``data``.

        ``z`` is a ``Categorical`` site marked for parallel enumeration, so
        ``TraceEnum_ELBO`` and NUTS sum it out. Parameters with a prior are
        ``pyro.sample`` sites; with ``prior=None`` they are ``pyro.param`` sites
        (initialised from ``params``, or k-means++ seeding with seed 0).

        Args:
            data: the data, shape ``(num_data, dim)``; it also resolves default priors.
            params: optional initial values in ``fit.params`` form.

        Returns:
            ``mixture_model(data=data)``: a callable Pyro model returning ``z``.
        """
        # A floating tensor keeps its dtype (a float32 fit builds a float32 program).
        floating = isinstance(data, torch.Tensor) and data.is_floating_point()
        tensor = as_data(data, dtype=data.dtype if floating else torch.float64)
        family = self.bind(tensor)
        alpha = self.weights_prior.to(tensor.dtype)
        if params is None:
            generator = torch.Generator().manual_seed(0)
            init = initial_params(self, family, tensor, "kmeans++", generator).components
        else:
            init = family.from_user(dict(params), self.num_components, tensor)
        num_components = self.num_components

        def mixture_model(data: torch.Tensor = tensor) -> torch.Tensor:
            weights = pyro.sample("weights", dist.Dirichlet(alpha))
            components = family.pyro_params(num_components, init)
            with pyro.plate("data", data.shape[0]):
                assignment = pyro.sample(
                    "assignment",
                    dist.Categorical(weights),
                    infer={"enumerate": "parallel"},
                )
                chosen = family.select(components, assignment)
                pyro.sample("obs", family.component_distribution(chosen), obs=data)
            return assignment

        return mixture_model

    def simulate(
        self,
        num_data: int,
        seed: int | None = None,
        *,
        dim: int = 2,
        params: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Draw a data set with known truth.

        Args:
            num_data: number of points.
            seed: random seed (``None``: nondeterministic).
            dim: data dimension when ``params`` is not given.
            params: true parameters in ``fit.params`` form (``weights`` plus the family's);
                default: well-separated components and ``Dirichlet(5)`` weights.

        Returns:
            ``(data, truth)``: data ``(num_data, dim)`` float64 and a dict of the true
            parameters plus ``"assignment"`` ``(num_data,)``.
        """
        if not isinstance(num_data, int) or num_data < 1:
            raise SpecError(f"num_data must be a positive integer; got {num_data!r}")
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        num_components = self.num_components
        family = self.family
        if params is None:
            # Dirichlet(5) weights: normalised Gamma(5, 1) draws, each a sum of 5 Exp(1).
            uniform = torch.rand(num_components, 5, generator=generator, dtype=torch.float64)
            raw = -uniform.log().sum(-1)
            weights = raw / raw.sum()
            components = family.default_truth(num_components, dim, generator)
        else:
            weights = torch.as_tensor(params["weights"], dtype=torch.float64)
            values = {key: value for key, value in params.items() if key != "weights"}
            components = family.params_type(
                **{k: torch.as_tensor(v, dtype=torch.float64) for k, v in values.items()}
            )
        assignment = torch.multinomial(weights, num_data, replacement=True, generator=generator)
        chosen = family.select(components, assignment)
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            data = family.component_distribution(chosen).sample().to(torch.float64)
        truth = {"weights": weights, **family.to_user(components), "assignment": assignment}
        return data, truth
