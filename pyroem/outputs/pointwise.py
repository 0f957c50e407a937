r"""Pointwise log-likelihood of a Pyro program, discrete latents summed out.

LOO and WAIC need :math:`\log p(x_i \mid θ)` for each *observation unit* :math:`i`:
a group of data that is conditionally independent of the others given θ once the
discrete latents are summed out. In a Pyro program the units are the entries of a
``pyro.plate``, the **observation plate**. By default it is the outermost plate that
holds every observed site and every enumerated site (``"data"`` in a
:class:`~pyroem.Mixture` program, the sequence plate of an HMM); pass ``plate=`` to
name another one.

The factor tables of the program are contracted as for the evidence (sum over
enumerated values, product over plates), except that the observation plate is kept:

.. math::
    \log p(x_i \mid θ) = \log \sum_{z_i} \prod_{f \ni i} φ_f(z_i; θ),

which is Pyro's ``contract_to_tensor`` with the observation plate as target ordinal.
Sites given a value (the parameters, and any continuous latent drawn by a sampler)
are conditioned on, so their log densities are left out.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from tqdm import tqdm

from pyroem.errors import NotSupportedError, SpecError
from pyroem.estep.program import common_scale, masked_log_prob, site_scale
from pyroem.model.program import ProgramModel, sample_sites

__all__ = ["observation_plate", "pointwise_log_likelihood", "pointwise_log_likelihood_draws"]


def _vectorized_plates(site: Any) -> list[Any]:
    return [frame for frame in site["cond_indep_stack"] if frame.vectorized]


def observation_plate(trace: Any, program: ProgramModel, plate: str | None = None) -> str:
    """The plate whose entries are the observation units.

    Args:
        trace: a trace of the program (from :meth:`ProgramModel.trace`).
        program: the program.
        plate: a plate name to use, or ``None`` for the default: the outermost plate
            holding every observed site and every enumerated site.

    Raises:
        SpecError: ``plate`` does not hold every observed and enumerated site, or no
            plate does.
    """
    sites = [trace.nodes[name] for name in [*program.observed, *program.enumerated]]
    candidates = [
        frame.name
        for frame in _vectorized_plates(trace.nodes[program.observed[0]])
        if all(frame.name in {f.name for f in _vectorized_plates(site)} for site in sites)
    ]
    if plate is None:
        if not candidates:
            raise SpecError(
                "no pyro.plate holds every observed and enumerated site of the model "
                f"{program.name}, so its log-likelihood does not split into independent "
                "observations; put the observations in a pyro.plate to get pointwise values "
                "(LOO, WAIC), or leave the log-likelihood out (log_likelihood=False)"
            )
        return candidates[0]
    if plate not in candidates:
        raise SpecError(
            f"plate {plate!r} cannot index the observations of {program.name}: the "
            "pointwise log-likelihood needs a plate holding every observed and enumerated "
            f"site; candidates are {candidates}"
        )
    return plate


def _plate_size(trace: Any, name: str) -> int:
    for node in trace.nodes.values():
        for frame in node.get("cond_indep_stack", ()):
            if frame.name == name:
                return int(frame.size)
    raise SpecError(f"the model has no plate named {name!r}")


def _keep_plate(term: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Sum an unpacked log-probability tensor over every dimension but the plate's."""
    if term.dim() < -dim:
        return term.sum().expand(size)
    kept = term.movedim(dim, 0)
    return kept.reshape(kept.shape[0], -1).sum(-1).expand(size)


def pointwise_log_likelihood(
    program: ProgramModel, values: Mapping[str, torch.Tensor], *, plate: str | None = None
) -> torch.Tensor:
    r"""``log p(x_i | θ)`` for every entry ``i`` of the observation plate.

    Args:
        program: the program.
        values: a value for every parameter site; values for other latent sample sites
            (e.g. continuous local latents drawn by a sampler) are conditioned on too.
        plate: the observation plate (default: see :func:`observation_plate`).

    Returns:
        ``(num_units,)``; the sum is the log-likelihood with discrete latents summed out.

    Raises:
        NotSupportedError: the observation plate is subsampled, or sites that depend on
            enumerated latents carry different ``poutine.scale`` values.
    """
    trace = program.trace(values)
    name = observation_plate(trace, program, plate)
    size = _plate_size(trace, name)
    symbol = trace.plate_to_symbol[name]
    enum_symbols = {
        site["infer"]["_enumerate_symbol"]
        for _, site in sample_sites(trace)
        if site["infer"].get("_enumerate_symbol") is not None
    }
    total = torch.zeros(size, dtype=_float_dtype(trace))
    log_factors: OrderedDict[frozenset[str], list[torch.Tensor]] = OrderedDict()
    scales = set()
    for site_name, site in sample_sites(trace):
        if site_name in values:
            continue
        scale = site_scale(site)
        enumerated = site["infer"].get("_enumerate_symbol") is not None
        term = (
            site["unscaled_log_prob"]
            if enumerated
            else masked_log_prob(site, site["unscaled_log_prob"])
        )
        if enum_symbols.isdisjoint(site["packed"]["unscaled_log_prob"]._pyro_dims):
            frame = next(f for f in _vectorized_plates(site) if f.name == name)
            total = total + scale * _keep_plate(term, frame.dim, size)
            continue
        ordinal = frozenset(trace.plate_to_symbol[f.name] for f in _vectorized_plates(site))
        log_factors.setdefault(ordinal, []).append(
            packed.pack(term, site["infer"]["_dim_to_symbol"])
        )
        scales.add(scale)
    if log_factors:
        scale = common_scale(scales)
        contracted = contract_to_tensor(
            log_factors, set(enum_symbols), target_ordinal=frozenset({symbol})
        )
        total = total + scale * contracted.expand(size)
    if total.shape[0] != size:
        raise NotSupportedError(f"the observation plate {name!r} is subsampled")
    return total.detach()


def _float_dtype(trace: Any) -> torch.dtype:
    for _, site in sample_sites(trace):
        value = site["unscaled_log_prob"]
        if value.is_floating_point():
            return value.dtype
    return torch.get_default_dtype()


def pointwise_log_likelihood_draws(
    program: ProgramModel,
    draws: Mapping[str, torch.Tensor],
    fixed: Mapping[str, torch.Tensor],
    *,
    plate: str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """:func:`pointwise_log_likelihood` at every posterior draw.

    Args:
        program: the program.
        draws: site name → draws ``(num_chains, num_draws, *shape)``.
        fixed: values of the parameter sites that have no draws (e.g. a point estimate).
        plate: the observation plate (default: see :func:`observation_plate`).
        progress: show a progress bar.

    Returns:
        ``(num_chains, num_draws, num_units)``.
    """
    if not draws:
        raise SpecError("draws is empty; use pointwise_log_likelihood for a point estimate")
    num_chains, num_draws = next(iter(draws.values())).shape[:2]
    rows = []
    with tqdm(
        total=num_chains * num_draws, desc="log-likelihood", disable=not progress, leave=False
    ) as bar:
        for chain in range(num_chains):
            row = []
            for draw in range(num_draws):
                values = {**fixed, **{name: value[chain, draw] for name, value in draws.items()}}
                row.append(pointwise_log_likelihood(program, values, plate=plate))
                bar.update(1)
            rows.append(torch.stack(row))
    return torch.stack(rows)
