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

from pyroem import datasets, plots
from pyroem.alignment import align, align_fits
from pyroem.api import METHODS, fit
from pyroem.bayes import BayesFit
from pyroem.comparison import compare, format_comparison
from pyroem.em import History
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
from pyroem.program import ProgramModel
from pyroem.program.results import ProgramFit
from pyroem.results import FitResult, load
from pyroem.sampling.mcmc_em import MCMCEMFit
from pyroem.selection import choose_components
from pyroem.spec.distributions import InverseWishart
from pyroem.spec.families import Bernoulli, Categorical, Exponential, Family, Gaussian, Poisson
from pyroem.spec.mixture import Mixture
from pyroem.spec.priors import Beta, Dirichlet, Gamma, NormalInverseWishart
from pyroem.variational.cavi import VariationalFit
from pyroem.variational.svi import SVIFit

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
