"""Monte Carlo EM: sampling E-steps (exact discrete draws, NUTS) and their schedules."""

from pyroem.sampling.mcmc_em import MCMC_EM_OPTIONS, MCMCEMFit, fit_mcmc_em

__all__ = ["MCMC_EM_OPTIONS", "MCMCEMFit", "fit_mcmc_em"]
