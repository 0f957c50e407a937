"""pyroem: Expectation–Maximization for Pyro models.

Declare a mixture, pick an EM variant with one flag, get point estimates,
convergence traces and scores::

    import pyroem
    spec = pyroem.Mixture(num_components=2, family="gaussian", covariance_type="full")
    fit = pyroem.fit(spec, X, method="map-em", n_init=10, seed=0)
    fit.params["means"], fit.log_likelihood(), fit.bic()

Any Pyro program whose discrete latents can be enumerated fits the same way::

    fit = pyroem.fit(my_model, data, method="map-em")
    fit.params, fit.m_step_kinds, fit.marginals
"""

from importlib import import_module
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any

from pyroem.errors import (
    CollapsedComponentWarning,
    ConvergenceWarning,
    DataError,
    FitFileError,
    NotSupportedError,
    PyroEMError,
    SingularCovarianceError,
    SpecError,
)

if TYPE_CHECKING:
    from pyroem import datasets, plots
    from pyroem.api import METHODS, fit
    from pyroem.em import History
    from pyroem.engines.bayes import BayesFit
    from pyroem.engines.cavi import VariationalFit
    from pyroem.engines.mcmc_em import MCMCEMFit
    from pyroem.engines.svi import SVIFit
    from pyroem.fits.core import Fit, FitResult
    from pyroem.fits.loading import load
    from pyroem.fits.program import ProgramFit
    from pyroem.model.distributions import InverseWishart
    from pyroem.model.families import (
        Bernoulli,
        Categorical,
        Exponential,
        Family,
        Gaussian,
        Poisson,
    )
    from pyroem.model.mixture import Mixture
    from pyroem.model.priors import Beta, Dirichlet, Gamma, NormalInverseWishart
    from pyroem.model.program import ProgramModel
    from pyroem.outputs.alignment import align, align_fits
    from pyroem.outputs.comparison import compare, format_comparison
    from pyroem.outputs.selection import choose_components

#: Where each public name lives. They are imported on first use, so ``import pyroem``
#: (and with it the ``pyroem`` command's argument parsing and ``--help``) does not
#: wait for torch and Pyro.
_LAZY = {
    "datasets": "pyroem.datasets",
    "plots": "pyroem.plots",
    "align": "pyroem.outputs.alignment",
    "align_fits": "pyroem.outputs.alignment",
    "METHODS": "pyroem.api",
    "fit": "pyroem.api",
    "BayesFit": "pyroem.engines.bayes",
    "compare": "pyroem.outputs.comparison",
    "format_comparison": "pyroem.outputs.comparison",
    "History": "pyroem.em",
    "ProgramModel": "pyroem.model.program",
    "ProgramFit": "pyroem.fits.program",
    "Fit": "pyroem.fits.core",
    "FitResult": "pyroem.fits.core",
    "load": "pyroem.fits.loading",
    "MCMCEMFit": "pyroem.engines.mcmc_em",
    "choose_components": "pyroem.outputs.selection",
    "InverseWishart": "pyroem.model.distributions",
    "Bernoulli": "pyroem.model.families",
    "Categorical": "pyroem.model.families",
    "Exponential": "pyroem.model.families",
    "Family": "pyroem.model.families",
    "Gaussian": "pyroem.model.families",
    "Poisson": "pyroem.model.families",
    "Mixture": "pyroem.model.mixture",
    "Beta": "pyroem.model.priors",
    "Dirichlet": "pyroem.model.priors",
    "Gamma": "pyroem.model.priors",
    "NormalInverseWishart": "pyroem.model.priors",
    "VariationalFit": "pyroem.engines.cavi",
    "SVIFit": "pyroem.engines.svi",
}


def __getattr__(name: str) -> Any:
    """Import a public name or a submodule (``pyroem.diagnostics``) on first use (PEP 562)."""
    if name not in _LAZY:
        if name.startswith("_") or find_spec(f"pyroem.{name}") is None:
            raise AttributeError(f"module 'pyroem' has no attribute {name!r}")
        return import_module(f"pyroem.{name}")
    module = import_module(_LAZY[name])
    value = module if module.__name__ == f"pyroem.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "BayesFit",
    "Bernoulli",
    "Beta",
    "Categorical",
    "CollapsedComponentWarning",
    "ConvergenceWarning",
    "DataError",
    "Dirichlet",
    "Exponential",
    "Family",
    "Fit",
    "FitFileError",
    "FitResult",
    "Gamma",
    "Gaussian",
    "History",
    "InverseWishart",
    "MCMCEMFit",
    "Mixture",
    "NormalInverseWishart",
    "NotSupportedError",
    "Poisson",
    "ProgramFit",
    "ProgramModel",
    "PyroEMError",
    "SVIFit",
    "SingularCovarianceError",
    "SpecError",
    "VariationalFit",
    "__version__",
    "align",
    "align_fits",
    "choose_components",
    "compare",
    "datasets",
    "fit",
    "format_comparison",
    "load",
    "plots",
]
