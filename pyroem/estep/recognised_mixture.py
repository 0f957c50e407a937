r"""EM on a recognised mixture program without running it every iteration.

A Pyro program such as

.. code-block:: python

    weights = pyro.param("weights", ..., constraint=constraints.simplex)
    locs = pyro.param("locs", ...)
    variances = pyro.param("variances", ..., constraint=constraints.positive)
    with pyro.plate("data", N):
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("obs", dist.Normal(locs[z], variances[z].sqrt()).to_event(1), obs=x)

is a mixture plan (:mod:`pyroem.estep.chain`) whose every parameter has a recognised
closed form (:mod:`pyroem.mstep.recognised`): the categorical's probabilities are
``θ_w[i]``, each Normal's location ``θ_μ[i] + d`` and its variance ``c·θ_v[i]``, with
index tables ``i`` and constants ``d``, ``c`` read from the first trace and verified
there by the recognition probes. The M-step's closed forms already take these forms
as given between runs of the program (:func:`~pyroem.mstep.recognised.patched_site`);
:class:`MixtureKernel` takes the E-step's tables from them too, so an iteration is a
few tensor operations: the tables, a ``logsumexp`` over the components, the
posterior, and the closed forms' weighted sums, with no run of the program.

The guard: the program still runs, and its compiled E-step (with its structure
check, :class:`~pyroem.estep.compiled.ProgramRunner`) is compared with the kernel's
log-likelihood and posterior, at the kernel's 1st, 2nd, 4th, 8th, … E-step and at
the fit's last one. A disagreement switches the kernel off for the rest of the fit
(and a fit whose last E-step disagrees is fitted again without it). A program whose
distributions leave the recognised forms only at parameter values between two
checks is outside this guard, as it is outside the closed forms' own;
``pyroem.estep.recognised_mixture._FAST = False`` runs the program at every E-step.

Parameters may be ``pyro.param`` sites or ``pyro.sample`` sites with their conjugate
priors (``Dirichlet``, ``Normal``, ``InverseGamma``), whose log density joins the log
joint. Refused (the compiled path runs as before): gradient M-steps, the
unconstrained space, ``poutine.mask`` or ``poutine.scale`` on any site, sites that do
not depend on the latent, more than one enumerated site, latent probabilities that
differ between data points, observed sites other than (``Independent``) ``Normal``,
locations or variances that differ between data points beyond the latent's index,
and blocks other than ``categorical``, ``normal-loc`` and ``normal-variance``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import pyro.distributions as dist
import torch
from torch.distributions.utils import probs_to_logits

from pyroem.estep.compiled import CompiledEStep, CompiledProgram, compact_view
from pyroem.estep.diagonal_normal import diagonal_normal_moments, diagonal_normal_table
from pyroem.estep.enumerate import responsibilities
from pyroem.model.program import ProgramModel, sample_sites
from pyroem.mstep import conjugate
from pyroem.mstep.recognised import ClosedForm, unwrap_distribution

__all__ = ["MixtureEStep", "MixtureKernel"]

# Off, every E-step runs the program (the reference the kernel is tested against).
_FAST = True

# The kernel's log-likelihood and posterior agree with the compiled E-step's to this
# (relative to the log-likelihood's size; absolute for probabilities), or to 64 units
# of rounding of a coarser dtype.
_CHECK_TOL = 1e-9


def _tolerance(dtype: torch.dtype) -> float:
    return max(_CHECK_TOL, 64 * torch.finfo(dtype).eps)


# The closed forms the kernel takes, and the conjugate prior each takes.
_PRIOR_TYPES: dict[str, type] = {
    "categorical": dist.Dirichlet,
    "normal-loc": dist.Normal,
    "normal-variance": dist.InverseGamma,
}
# The prior's parameters each closed form reads.
_PRIOR_ATTRS = {
    "categorical": ("concentration",),
    "normal-loc": ("loc", "scale"),
    "normal-variance": ("concentration", "rate"),
}


class MixtureEStep(NamedTuple):
    """The kernel's E-step at ``values``.

    Attributes:
        log_likelihood: :math:`\\log p(x | θ)`, 0-dim.
        log_joint: plus the log prior of the ``pyro.sample`` parameters, 0-dim.
        posterior: the latent's posterior, ``(num_components, num_data)``, the layout
            of its weight table in the compiled E-step.
        values: the parameter values.
        deviations: per observed site, its locations ``(num_components, dim)`` and a
            ``(num_components, 2 * dim, num_data)`` buffer of the deviations ``x − μ_k``
            and their squares, which the M-step's moments reuse.
    """

    log_likelihood: torch.Tensor
    log_joint: torch.Tensor
    posterior: torch.Tensor
    values: Mapping[str, torch.Tensor]
    deviations: tuple[tuple[torch.Tensor, torch.Tensor], ...]


class _Prior(NamedTuple):
    """A parameter's prior: its distribution (for the log prior) and the parameters its
    closed form reads, broadcast to the parameter and flattened."""

    fn: Any
    params: tuple[torch.Tensor, ...]


class _Normal(NamedTuple):
    """An observed Normal site read as ``num_components × dim`` forms: the data
    ``(dim, num_data)``, and per component and dimension the parameter entries its
    location and variance read, the location's offset and the variance's factor."""

    data: torch.Tensor
    loc_block: str
    loc_rows: torch.Tensor
    loc_offset: torch.Tensor
    variance_block: str
    variance_rows: torch.Tensor
    variance_factor: torch.Tensor | None


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` narrowed to size 1 along every dimension it is constant on."""
    tensor = compact_view(tensor)
    for dim, size in enumerate(tensor.shape):
        if size > 1:
            first = tensor.narrow(dim, 0, 1)
            if torch.equal(tensor, first.expand_as(tensor)):
                tensor = first
    return tensor


def _rows(block: ClosedForm, site: str) -> torch.Tensor | None:
    """The index table of ``block``'s one use on ``site`` (``None`` if not one)."""
    rows = [use.rows for use in block.uses if use.site == site]
    return rows[0] if len(rows) == 1 else None


def _per_component(tensor: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor | None:
    """An entry table ``(K, N, D)`` constant along the data as ``(K, D)``; else ``None``."""
    compact = _compact(tensor)
    if compact.shape[1] != 1:
        return None
    return compact.expand(shape[0], 1, shape[2])[:, 0].contiguous()


def _row_sums(num_rows: int, rows: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
    """The sum of ``entries`` over the entries of each parameter row."""
    out = torch.zeros(num_rows, dtype=entries.dtype, device=entries.device)
    return out.index_add_(0, rows.reshape(-1), entries.reshape(-1))


class MixtureKernel:
    """The E-step and the closed-form sweep of a recognised mixture program (see the
    module docstring). Build it with :meth:`build`.

    Args:
        compiled: the program's compiled structure (the guard's E-step).
        order: the closed-form blocks in sweep order.
        blocks: the blocks by parameter.
        latent: the enumerated site's name.
        weights_block: the block of its probabilities.
        weights_row: the row of that parameter its probabilities are.
        support: its values in the order of the enumerated dimension, ``(K,)``.
        normals: the observed sites.
        priors: the priors of the ``pyro.sample`` parameters.
    """

    def __init__(
        self,
        compiled: CompiledProgram,
        order: Sequence[str],
        blocks: Mapping[str, ClosedForm],
        latent: str,
        weights_block: str,
        weights_row: int,
        support: torch.Tensor,
        normals: Sequence[_Normal],
        priors: Mapping[str, _Prior],
    ) -> None:
        self.compiled = compiled
        self.priors = dict(priors)
        self.order = list(order)
        self.blocks = dict(blocks)
        self.latent = latent
        self.weights_block = weights_block
        self.weights_row = weights_row
        self.support = support
        self.normals = list(normals)
        self.active = True
        self.count = 0

    # ----- recognition --------------------------------------------------------------
    @classmethod
    def build(
        cls,
        program: ProgramModel,
        compiled: CompiledProgram,
        found: Mapping[str, ClosedForm | None],
        order: Sequence[str],
        first: Mapping[str, torch.Tensor],
        trace: Any,
    ) -> MixtureKernel | None:
        """The kernel of a program whose structure it covers, else ``None``.

        Args:
            program: the program.
            compiled: its compiled structure, from ``trace``.
            found: the recognised closed forms (``None``: a gradient block).
            order: the closed forms' sweep order.
            first: the parameter values of ``trace``.
            trace: the first full trace.
        """
        plan = compiled.plan
        if not _FAST or plan is None or not plan.mixture or not compiled.supported:
            return None
        if compiled.free or compiled.scale != 1.0:
            return None
        blocks: dict[str, ClosedForm] = {}
        for name, block in found.items():
            if block is None or block.slot not in _PRIOR_TYPES or block.jacobian:
                return None
            blocks[name] = block
        sites = dict(sample_sites(trace))
        priors = {}
        for name, param in program.params.items():
            if param.kind != "param":
                prior = cls._prior(sites[name], blocks[name].slot, first[name])
                if prior is None:
                    return None
                priors[name] = prior
        names = [name for name in sites if name not in program.params]
        enumerated = [name for name in names if name in compiled.enumerated]
        if len(enumerated) != 1:
            return None
        latent = enumerated[0]
        for name in names:
            site = sites[name]
            if site["mask"] is not None or site["scale"] != 1.0 or site["args"] or site["kwargs"]:
                return None
            if (name == latent) == bool(site["is_observed"]):
                return None
        found_latent = cls._latent(sites[latent], latent, blocks, first)
        if found_latent is None:
            return None
        weights_block, weights_row, support = found_latent
        table_shape = tuple(sites[latent]["unscaled_log_prob"].shape)
        normals = []
        for name in names:
            if name == latent:
                continue
            normal = cls._normal(sites[name], name, blocks, first, table_shape)
            if normal is None:
                return None
            normals.append(normal)
        uses = {(use.site, use.slot) for block in blocks.values() for use in block.uses}
        expected = {(latent, "categorical")} | {
            (name, slot)
            for name in names
            if name != latent
            for slot in ("normal-loc", "normal-variance")
        }
        if uses != expected:
            return None
        kernel = cls(
            compiled,
            [name for name in order if name in blocks],
            blocks,
            latent,
            weights_block,
            weights_row,
            support,
            normals,
            priors,
        )
        return kernel if kernel._tables_agree(sites, names, first) else None

    @staticmethod
    def _prior(site: Any, slot: str, value: torch.Tensor) -> _Prior | None:
        """A parameter's conjugate prior, unmasked and unscaled; else ``None``."""
        if site["mask"] is not None or site["scale"] != 1.0 or site["args"] or site["kwargs"]:
            return None
        prior, _ = unwrap_distribution(site["fn"])
        if type(prior) is not _PRIOR_TYPES[slot]:
            return None
        params = []
        for attr in _PRIOR_ATTRS[slot]:
            tensor = getattr(prior, attr).detach()
            if tensor.dim() > value.dim() or tensor.dtype != value.dtype:
                return None
            params.append(tensor.expand(value.shape).reshape(-1))
        return _Prior(site["fn"], tuple(params))

    @staticmethod
    def _latent(
        site: Any, name: str, blocks: Mapping[str, ClosedForm], first: Mapping[str, torch.Tensor]
    ) -> tuple[str, int, torch.Tensor] | None:
        """The latent's block, row and support, where it is one ``Categorical`` over
        the data (joint tables ``(K, N)``) with the same probabilities for every point."""
        fn, value = site["fn"], site["value"]
        if type(fn) is not dist.Categorical or "probs" not in fn.__dict__:
            return None
        table = site["unscaled_log_prob"]
        num_values = fn.probs.shape[-1]
        if (
            table.dim() != 2
            or table.shape[0] != num_values
            or site["infer"]["_enumerate_dim"] != -2
        ):
            return None
        if tuple(value.shape) != (num_values, 1):
            return None
        owners = [block for block in blocks.values() if block.slot == "categorical"]
        if len(owners) != 1:
            return None
        block = owners[0]
        rows = _rows(block, name)
        if rows is None:
            return None
        rows = _compact(rows)
        theta = first[block.name].detach()
        if rows.numel() != 1 or theta.shape[-1] != num_values:
            return None
        row = int(rows.reshape(-1)[0])
        probs = theta.reshape(-1, num_values)[row]
        # As Categorical holds them: normalised (which may round).
        probs = (probs / probs.sum(-1, keepdim=True)).expand(fn.probs.shape)
        eps = torch.finfo(probs.dtype).eps
        if not torch.allclose(probs, fn.probs.detach(), rtol=8 * eps, atol=0.0):
            return None
        return block.name, row, value.reshape(-1).long()

    @staticmethod
    def _normal(
        site: Any,
        name: str,
        blocks: Mapping[str, ClosedForm],
        first: Mapping[str, torch.Tensor],
        table_shape: tuple[int, ...],
    ) -> _Normal | None:
        """The forms of an observed ``Normal`` (or ``Independent(Normal, 1)``) site whose
        location and variance per component read one entry each for every data point."""
        fn, event_ndims = site["fn"], 0
        if type(fn) is dist.Independent:
            fn, event_ndims = fn.base_dist, fn.reinterpreted_batch_ndims
        if type(fn) is not dist.Normal or event_ndims > 1:
            return None
        by_slot = {}
        for block in blocks.values():
            rows = _rows(block, name)
            if rows is not None:
                by_slot[block.slot] = (block.name, rows)
        if set(by_slot) != {"normal-loc", "normal-variance"}:
            return None
        batch = tuple(fn.batch_shape)
        if batch[: len(table_shape)] != table_shape or len(batch) != 2 + event_ndims:
            return None
        shape = (table_shape[0], table_shape[1], batch[2] if event_ndims else 1)

        def entries(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.expand(batch).reshape(shape)

        loc_block, loc_rows = by_slot["normal-loc"]
        variance_block, variance_rows = by_slot["normal-variance"]
        if loc_rows.shape != batch or variance_rows.shape != batch:
            return None
        theta = first[loc_block].detach().reshape(-1)
        variance = first[variance_block].detach().reshape(-1)[variance_rows]
        offset = _per_component(entries(fn.loc.detach() - theta[loc_rows]), shape)
        factor = _per_component(entries(fn.scale.detach().square() / variance), shape)
        loc_index = _per_component(entries(loc_rows), shape)
        variance_index = _per_component(entries(variance_rows), shape)
        value = site["value"]
        if offset is None or factor is None or loc_index is None or variance_index is None:
            return None
        if value.dtype != theta.dtype or value.dim() != 1 + event_ndims:
            return None
        eps = torch.finfo(theta.dtype).eps
        data = value.expand(batch[1:]).reshape(shape[1:]).T.contiguous()
        return _Normal(
            data,
            loc_block,
            loc_index,
            offset,
            variance_block,
            variance_index,
            # scale = sqrt(c θ) with c = 1 up to the rounding of sqrt: the program's own form.
            None if bool(((factor - 1).abs() <= 8 * eps).all()) else factor,
        )

    def _tables_agree(
        self, sites: Mapping[str, Any], names: Sequence[str], first: Mapping[str, torch.Tensor]
    ) -> bool:
        """Are the kernel's tables at ``first`` the first trace's own (to rounding)?"""
        tables = [(self._latent_table(first), sites[self.latent])]
        observed = [name for name in names if name != self.latent]
        for normal, name in zip(self.normals, observed, strict=True):
            tables.append((self._normal_table(normal, first)[0], sites[name]))
        for table, site in tables:
            expected = site["unscaled_log_prob"].detach()
            tol = _tolerance(expected.dtype) * expected.abs().clamp(min=1.0)
            if not bool(((table - expected).abs() <= tol).all()):
                return False
        return True

    # ----- the E-step ---------------------------------------------------------------
    def _latent_table(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``log π_k`` as ``Categorical(π)`` takes it, ``(K, 1)``."""
        theta = values[self.weights_block].detach()
        probs = theta.reshape(-1, theta.shape[-1])[self.weights_row]
        logits = probs_to_logits(probs / probs.sum(-1, keepdim=True))
        return logits[self.support].unsqueeze(-1)

    def _moments(
        self, normal: _Normal, values: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The site's locations and variances at ``values``, ``(K, D)`` each."""
        loc = values[normal.loc_block].detach().reshape(-1)[normal.loc_rows] + normal.loc_offset
        variance = values[normal.variance_block].detach().reshape(-1)[normal.variance_rows]
        if normal.variance_factor is not None:
            variance = normal.variance_factor * variance
        return loc, variance

    def _normal_table(
        self, normal: _Normal, values: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The site's table ``(K, N)``, its locations and its deviations buffer."""
        loc, variance = self._moments(normal, values)
        dim, num_data = normal.data.shape
        buffer = normal.data.new_empty(loc.shape[0], 2 * dim, num_data)
        return diagonal_normal_table(normal.data, loc, variance, buffer), loc, buffer

    def estimate(self, values: Mapping[str, torch.Tensor]) -> MixtureEStep:
        """The E-step at ``values``, from the recognised forms alone."""
        joint = self._latent_table(values)
        deviations = []
        for normal in self.normals:
            table, loc, buffer = self._normal_table(normal, values)
            joint = joint + table
            deviations.append((loc, buffer))
        # The declarative path's normalisation, in place in ``joint``.
        posterior, log_norm = responsibilities(joint, None)
        log_likelihood = log_norm.sum()
        log_joint = log_likelihood
        for name, prior in self.priors.items():
            log_joint = log_joint + prior.fn.log_prob(values[name].detach()).sum()
        return MixtureEStep(log_likelihood, log_joint, posterior, values, tuple(deviations))

    def __call__(self, values: Mapping[str, torch.Tensor]) -> MixtureEStep | CompiledEStep | None:
        """The E-step at ``values``: the kernel's, checked against the compiled E-step
        (log likelihood, log joint, posterior) at its 1st, 2nd, 4th, … call; the
        compiled one (or ``None`` where the program's structure changed) once a check
        fails."""
        self.count += 1
        estep = self.estimate(values)
        if self.count & (self.count - 1):
            return estep
        compiled = self.compiled(values)
        if compiled is None or not self.agrees(estep, compiled):
            self.active = False
            return compiled
        return estep

    def agrees(self, estep: MixtureEStep, compiled: CompiledEStep) -> bool:
        """Do the kernel's and the compiled E-step's log likelihood, log joint and
        posterior agree?"""
        tol = _tolerance(estep.posterior.dtype)
        pairs = (
            (estep.log_likelihood, compiled.log_likelihood),
            (estep.log_joint, compiled.log_joint),
        )
        for found, expected in pairs:
            reference = float(expected)
            if abs(float(found) - reference) > tol * max(1.0, abs(reference)):
                return False
        weight = compiled.weight(self.latent)
        if weight.shape != estep.posterior.shape:
            return False
        return bool(((estep.posterior - weight).abs() <= tol).all())

    # ----- the M-step ---------------------------------------------------------------
    def m_step(self, estep: MixtureEStep, values: dict[str, torch.Tensor]) -> None:
        """One sweep of the closed forms in order, in place in ``values``: each block
        reads the others at their values so far in the sweep, as the ECM sweep of the
        compiled path does (a new run of the program, or a patched location).

        The data enter through moments about the E-step's locations ``μ_k``,
        ``Σ r (x − μ_k)`` and ``Σ r (x − μ_k)²`` (one batched product with the
        posterior); a variance after a location update takes the residuals about the
        new locations by the exact shift ``Σ r (x − μ')² = S₂ − 2δ S₁ + δ² N``.
        """
        posterior = estep.posterior
        counts = posterior.sum(1)
        moments = []
        for loc, buffer in estep.deviations:
            moments.append((loc, *diagonal_normal_moments(buffer, posterior)))
        for name in self.order:
            block = self.blocks[name]
            current = values[name].detach()
            if block.slot == "categorical":
                new = self._categorical(name, current, counts)
            elif block.slot == "normal-loc":
                new = self._location(name, current, counts, moments, values)
            else:
                new = self._variance(name, current, counts, moments, values)
            values[name] = torch.where(torch.isfinite(new), new, current)

    def _categorical(self, name: str, current: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        num_values = current.shape[-1]
        table = torch.zeros_like(current.reshape(-1, num_values))
        table[self.weights_row].index_add_(0, self.support, counts)
        prior = self.priors.get(name)
        concentration = None if prior is None else prior.params[0].reshape(table.shape)
        return conjugate.dirichlet_mode(table, concentration).reshape(current.shape)

    def _location(
        self,
        name: str,
        current: torch.Tensor,
        counts: torch.Tensor,
        moments: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        values: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        size = current.numel()
        precision = torch.zeros(size, dtype=current.dtype, device=current.device)
        weighted = torch.zeros_like(precision)
        for normal, (loc, first, _) in zip(self.normals, moments, strict=True):
            if normal.loc_block != name:
                continue
            _, variance = self._moments(normal, values)
            # Σ r (x − d) = Σ r (x − μ_k) + N (μ_k − d), each over σ².
            centred = first + counts[:, None] * (loc - normal.loc_offset)
            precision += _row_sums(size, normal.loc_rows, counts[:, None] / variance)
            weighted += _row_sums(size, normal.loc_rows, centred / variance)
        prior = self.priors.get(name)
        if prior is None:
            return conjugate.normal_mean_mode(weighted, precision).reshape(current.shape)
        mean, scale = prior.params
        return conjugate.normal_mean_mode(weighted, precision, mean, scale**-2).reshape(
            current.shape
        )

    def _variance(
        self,
        name: str,
        current: torch.Tensor,
        counts: torch.Tensor,
        moments: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        values: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        size = current.numel()
        total = torch.zeros(size, dtype=current.dtype, device=current.device)
        squares = torch.zeros_like(total)
        for normal, (loc, first, second) in zip(self.normals, moments, strict=True):
            if normal.variance_block != name:
                continue
            shift = self._moments(normal, values)[0] - loc
            residual = second - 2 * shift * first + shift.square() * counts[:, None]
            if normal.variance_factor is not None:
                residual = residual / normal.variance_factor
            total += _row_sums(size, normal.variance_rows, counts[:, None].expand_as(residual))
            squares += _row_sums(size, normal.variance_rows, residual)
        prior = self.priors.get(name)
        a, b = (None, None) if prior is None else prior.params
        return conjugate.inverse_gamma_mode(total / 2, squares / 2, a, b).reshape(current.shape)
