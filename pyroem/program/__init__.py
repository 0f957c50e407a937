"""EM on any Pyro program: exact enumeration E-step, ECM M-step."""

from pyroem.program.model import ParamSite, ProgramModel
from pyroem.program.posterior import Posterior, expected_log_joint, posterior

__all__ = ["ParamSite", "Posterior", "ProgramModel", "expected_log_joint", "posterior"]
