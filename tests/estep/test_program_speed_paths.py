r"""The fast paths of MAP-EM on Pyro programs give the numbers of the full ones.

A fit reruns the program under one light handler, contracts chain-structured tables
stacked, and feeds stacked uses to the closed forms; the probes that find the closed
forms share runs. Each of these is held against an independent reference:

1. the log-space einsum backend against Pyro's own (``pyro.ops.einsum.torch_log``),
   values and gradients, with impossible (``-inf``) configurations;
2. the chain contraction, and Pyro's ``contract_to_tensor`` with that backend, against
   brute-force enumeration of every path and against ``contract_to_tensor`` with
   Pyro's own ring: log evidence and every table's gradient (its posterior marginal);
3. the compiled E-step against the full E-step (:func:`pyroem.estep.program`, which
   ``test_program_bruteforce.py`` holds to brute force) on mixtures, an HMM with ragged
   sequences, a chain of dependent latents, a factorial model (no chain: Pyro's
   general contraction), nested plates and ``poutine.scale``: log likelihood, log
   joint, every weight and marginal to 1e-12;
4. programs whose control flow depends on the parameters: when only numbers change, the
   light run computes them exactly; when the structure of a run changes, it reports
   it, and a fit that crosses such a branch falls back to full traces. Fits — this one,
   an HMM, a factorial model, nested plates with restarts, gradient M-steps — have the
   history, parameters and marginals of fits that never take the fast path (1e-12 on
   the log joint; 1e-10 on parameters, which the closed forms amplify);
5. the stacked closed forms against :func:`closed_form_update` on every use one by one,
   and the shared probe runs of :func:`recognise` against probing each parameter
   alone: the same blocks, rows and kinds;
6. tables computed from broadcast-free parameters are bit for bit the trace's own.
"""

from __future__ import annotations

import importlib
import itertools
import math
import runpy
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.ops.contract import contract_to_tensor
from pyro.ops.einsum import torch_log
from pyro.ops.rings import LogRing as PyroLogRing
from pyro.poutine.runtime import InferDict
from torch.distributions import constraints

import pyroem
from pyroem.engines.program_map import initial_values
from pyroem.estep.chain import Factor, build_chain_plan, log_evidence
from pyroem.estep.compiled import CompiledProgram, _stacked_tables, _table
from pyroem.estep.log_einsum import LogRing, einsum
from pyroem.estep.program import posterior
from pyroem.model.program import ProgramModel
from pyroem.mstep import recognised as conjugacy
from pyroem.mstep.stacked import StackedUpdate

fit_module = importlib.import_module("pyroem.engines.program_map")

TOL = 1e-12
PARALLEL: InferDict = {"enumerate": "parallel"}
HMM = runpy.run_path(
    str(Path(__file__).resolve().parents[2] / "models" / "hmm.py"), run_name="example"
)


@pytest.fixture(autouse=True)
def _float64() -> None:
    torch.set_default_dtype(torch.float64)


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> None:
    """Equal up to ``tol`` relative to the larger magnitude, at least 1 (infinities exactly)."""
    assert actual.shape == expected.shape
    scale = torch.maximum(actual.abs(), expected.abs()).clamp(min=1.0)
    near = (actual == expected) | ((actual - expected).abs() <= tol * scale)
    assert bool(near.all()), (actual - expected).abs().max()


# ----- 1. the log-space einsum ----------------------------------------------------------


@pytest.mark.parametrize(
    "equation",
    ["ab,bc->ac", "ab,ab->b", "abc,cd,d->ab", "a,a->a", "ab->a", "ab,bc->", "abc,bcd->ad"],
)
def test_log_einsum_matches_pyro(equation: str) -> None:
    generator = torch.Generator().manual_seed(0)
    sizes = {"a": 3, "b": 4, "c": 2, "d": 5}
    inputs = equation.split("->")[0].split(",")
    operands = []
    for dims in inputs:
        table = torch.randn([sizes[d] for d in dims], generator=generator)
        # An impossible configuration: a whole slice of -inf.
        table[(0,) * len(dims)] = -math.inf
        operands.append(table.requires_grad_())
    ours = einsum(equation, *operands)
    theirs = torch_log.einsum(equation, *operands)
    _close(ours.detach(), theirs.detach())
    # A log evidence weights only possible configurations: -inf outputs get weight 0.
    weights = torch.rand(ours.shape, generator=generator) * torch.isfinite(theirs.detach())
    grads_ours = torch.autograd.grad((ours * weights).sum(), operands)
    grads_theirs = torch.autograd.grad((theirs * weights).sum(), operands)
    for mine, reference in zip(grads_ours, grads_theirs, strict=True):
        assert bool(torch.isfinite(mine).all())
        _close(mine, reference)


# ----- 2. the chain contraction ---------------------------------------------------------


LATENTS = "abcdefgh"


def _chain_factors(
    length: int, states: int, batch: int, generator: torch.Generator
) -> tuple[list[Factor], dict[str, torch.Tensor]]:
    """Unary and pairwise tables of one chain of latents ``a, b, …`` in a plate ``p``.

    Latent ``t`` lives at dim ``-2 - t`` (no markov reuse), the plate at dim -1; two
    unary tables per latent (its own and an observation's) and one pairwise table per
    step, some entries ``-inf``.
    """
    ndim = length + 1
    factors, tables = [], {}

    def dims_of(latents: tuple[int, ...]) -> tuple[str | None, ...]:
        named: list[str | None] = [None] * ndim
        for t in latents:
            named[ndim - 2 - t] = LATENTS[t]
        named[-1] = "p"
        return tuple(named)

    for t in range(length):
        for kind in ("own", "obs"):
            latents = (t,) if kind == "obs" or t == 0 else (t - 1, t)
            dims = dims_of(latents)
            shape = torch.Size(batch if d == "p" else states if d else 1 for d in dims)
            table = torch.randn(shape, generator=generator)
            if kind == "own" and t == 1:
                table.reshape(-1)[0] = -math.inf
            name = f"{kind}_{t}"
            factors.append(Factor(name, shape, dims, frozenset({"p"})))
            tables[name] = table
    return factors, tables


def _contracted(factors: list[Factor], tables: dict[str, torch.Tensor], ring: Any) -> torch.Tensor:
    """``contract_to_tensor`` of the packed tables with ``ring``."""
    tree: OrderedDict[frozenset[str], list[torch.Tensor]] = OrderedDict()
    for factor in factors:
        table = tables[factor.name].squeeze()
        table._pyro_dims = "".join(d for d in factor.dims if d is not None)  # type: ignore[attr-defined]
        tree.setdefault(frozenset({"p"}), []).append(table)
    symbols = {d for f in factors for d in f.dims if d is not None and d != "p"}
    return contract_to_tensor(tree, symbols, ring=ring).sum()


def _brute_force_log_evidence(
    factors: list[Factor], tables: dict[str, torch.Tensor], length: int, states: int, batch: int
) -> float:
    total = 0.0
    for b in range(batch):
        scores = []
        for path in itertools.product(range(states), repeat=length):
            score = 0.0
            for factor in factors:
                index = tuple(
                    b if d == "p" else path[LATENTS.index(d)] if d else 0 for d in factor.dims
                )
                score += float(tables[factor.name][index])
            scores.append(score)
        finite = [s for s in scores if s > -math.inf]
        peak = max(finite)
        total += peak + math.log(sum(math.exp(s - peak) for s in finite))
    return total


@pytest.mark.parametrize("length", [1, 2, 3, 6])
def test_chain_log_evidence_matches_brute_force_and_pyro(length: int) -> None:
    generator = torch.Generator().manual_seed(length)
    states, batch = 3, 2
    factors, tables = _chain_factors(length, states, batch, generator)
    latents = {LATENTS[t]: frozenset({"p"}) for t in range(length)}
    plan = build_chain_plan(factors, latents, ["p"])
    assert plan is not None
    leaves = {name: table.clone().requires_grad_() for name, table in tables.items()}
    stacks = {
        group.names[0]: torch.stack([leaves[name] for name in group.names]) for group in plan.groups
    }
    reference = _brute_force_log_evidence(factors, tables, length, states, batch)
    theirs = _contracted(factors, leaves, PyroLogRing())
    grads_theirs = torch.autograd.grad(theirs, list(leaves.values()))
    assert abs(float(theirs.detach()) - reference) <= TOL * abs(reference)
    for ours in (log_evidence(plan, stacks), _contracted(factors, leaves, LogRing())):
        assert abs(float(ours.detach()) - reference) <= TOL * abs(reference)
        grads_ours = torch.autograd.grad(ours, list(leaves.values()), retain_graph=True)
        for mine, pyros in zip(grads_ours, grads_theirs, strict=True):
            assert bool(torch.isfinite(mine).all())
            _close(mine, pyros)


def test_chain_planner_refuses_other_structures() -> None:
    """A factor on three latents, and a loop, get no plan (Pyro's contraction instead)."""
    shape3 = torch.Size([2, 2, 2, 4])
    triple = Factor("f", shape3, ("a", "b", "c", "p"), frozenset({"p"}))
    own = [Factor(n, torch.Size([2, 4]), (n, "p"), frozenset({"p"})) for n in ("a", "b", "c")]
    latents = {n: frozenset({"p"}) for n in ("a", "b", "c")}
    assert build_chain_plan([*own, triple], latents, ["p"]) is None
    pair = torch.Size([2, 2, 4])
    loop = [
        Factor("ab", pair, ("a", "b", "p"), frozenset({"p"})),
        Factor("bc", pair, ("b", "c", "p"), frozenset({"p"})),
        Factor("ca", pair, ("c", "a", "p"), frozenset({"p"})),
    ]
    assert build_chain_plan([*own, *loop], latents, ["p"]) is None


# ----- 3. the compiled E-step against the full one ---------------------------------------


def gaussian_mixture(data: torch.Tensor) -> None:
    weights = pyro.sample("weights", dist.Dirichlet(torch.full((3,), 2.0)))
    with pyro.plate("components", 3):
        locs = pyro.sample("locs", dist.Normal(0.0, 5.0))
        variances = pyro.sample("variances", dist.InverseGamma(2.0, 1.0))
    with pyro.plate("data", data.shape[0]):
        z = pyro.sample("z", dist.Categorical(weights), infer=PARALLEL)
        pyro.sample("x", dist.Normal(locs[z], variances[z].sqrt()), obs=data)


def dependent_chain(data: torch.Tensor) -> None:
    """Three latents per datum, each depending on the last, ``z3`` observed: a chain."""
    start = pyro.sample("start", dist.Dirichlet(torch.ones(2)))
    step = pyro.param(
        "step", torch.tensor([[0.7, 0.3], [0.2, 0.8]]), constraint=constraints.simplex
    )
    means = pyro.sample("means", dist.Normal(0.0, 3.0).expand([2]).to_event(1))
    with pyro.plate("data", data.shape[0]):
        z = pyro.sample("z1", dist.Categorical(start), infer=PARALLEL)
        z = pyro.sample("z2", dist.Categorical(step[z]), infer=PARALLEL)
        z = pyro.sample("z3", dist.Categorical(step[z]), infer=PARALLEL)
        pyro.sample("x", dist.Normal(means[z], 1.0), obs=data)


def factorial(data: torch.Tensor) -> None:
    """Two independent latents feeding one observation: not a chain."""
    mix_a = pyro.sample("mix_a", dist.Dirichlet(torch.full((2,), 2.0)))
    mix_b = pyro.sample("mix_b", dist.Dirichlet(torch.full((3,), 2.0)))
    effect_a = pyro.sample("effect_a", dist.Normal(0.0, 2.0).expand([2]).to_event(1))
    effect_b = pyro.sample("effect_b", dist.Normal(0.0, 2.0).expand([3]).to_event(1))
    with pyro.plate("data", data.shape[0]):
        a = pyro.sample("a", dist.Categorical(mix_a), infer=PARALLEL)
        b = pyro.sample("b", dist.Categorical(mix_b), infer=PARALLEL)
        pyro.sample("x", dist.Normal(effect_a[a] + effect_b[b], 1.0), obs=data)


def nested_plates(data: torch.Tensor) -> None:
    """Groups with a latent class each, several observations per group (inner plate),
    and a scaled likelihood."""
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(2)))
    rates = pyro.sample("rates", dist.Gamma(2.0, 1.0).expand([2]).to_event(1))
    with poutine.scale(scale=0.5), pyro.plate("groups", data.shape[0], dim=-2):
        z = pyro.sample("z", dist.Categorical(weights), infer=PARALLEL)
        with pyro.plate("members", data.shape[1], dim=-1):
            pyro.sample("counts", dist.Poisson(rates[z]), obs=data)


def _programs() -> dict[str, tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]]:
    """Small instances (float64 data, built at import, before the fixture sets the default)."""
    double = torch.float64
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([7, 4, 6])
    sequences, _ = HMM["simulate_gaussian_hmm"](
        lengths,
        init_probs=torch.tensor([0.6, 0.4], dtype=double),
        transition_probs=torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=double),
        locs=torch.tensor([[-1.0], [1.5]], dtype=double),
        variances=torch.tensor([[0.4], [0.6]], dtype=double),
        seed=0,
    )
    counts = torch.poisson(torch.full((4, 3), 3.0, dtype=double), generator=generator)
    data = torch.randn(12, generator=generator, dtype=double) * 2
    return {
        "gaussian-mixture": (gaussian_mixture, (data,), {}),
        "hmm-ragged": (HMM["gaussian_hmm"], (sequences, lengths, 2), {"priors": "conjugate"}),
        "hmm-flat": (HMM["gaussian_hmm"], (sequences, lengths, 2), {"priors": "flat"}),
        "dependent-chain": (dependent_chain, (data,), {}),
        "factorial": (factorial, (data,), {}),
        "nested-plates": (nested_plates, (counts,), {}),
    }


PROGRAMS = _programs()
CHAINED = {"gaussian-mixture", "hmm-ragged", "hmm-flat", "dependent-chain", "nested-plates"}


def _shifted(values: dict[str, torch.Tensor], program: ProgramModel) -> dict[str, torch.Tensor]:
    """Other valid values: each parameter moved inside its support."""
    moved = {}
    for name, value in values.items():
        transform = torch.distributions.transform_to(program.params[name].constraint)
        moved[name] = transform(transform.inv(value) + 0.3).detach()
    return moved


def _assert_same_estep(compiled: CompiledProgram, estep: Any, full: Any) -> None:
    _close(estep.log_likelihood, full.log_likelihood)
    _close(estep.log_joint, full.log_joint)
    weights = estep.all_weights()
    assert set(weights) == set(full.weights)
    for name, weight in full.weights.items():
        _close(weights[name], weight)
    marginals = compiled.marginals(estep)
    assert set(marginals) == set(full.marginals)
    for name, marginal in full.marginals.items():
        _close(marginals[name], marginal)


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_compiled_estep_equals_full_estep(name: str) -> None:
    model, args, kwargs = PROGRAMS[name]
    program = ProgramModel(model, args, kwargs)
    values = initial_values(program, None, seed=1)
    trace = program.trace(values)
    compiled = CompiledProgram(program, trace)
    assert (compiled.plan is not None) == (name in CHAINED)
    _assert_same_estep(compiled, compiled.estimate_trace(trace), posterior(program, values, trace))
    moved = _shifted(values, program)
    estep = compiled(moved)
    assert estep is not None
    _assert_same_estep(compiled, estep, posterior(program, moved))


def test_stacked_tables_are_the_traces_own_bit_for_bit() -> None:
    """Log-densities from stacked or broadcast-free parameters: the same floats."""
    for model, args, kwargs in PROGRAMS.values():
        program = ProgramModel(model, args, kwargs)
        values = initial_values(program, None, seed=2)
        trace = program.trace(values)
        compiled = CompiledProgram(program, trace)
        sites = compiled.run(values)
        assert sites is not None
        for name, site in sites.items():
            assert torch.equal(_table(site), trace.nodes[name]["unscaled_log_prob"])
        for stack in compiled.stacks:
            expected = torch.stack([trace.nodes[n]["unscaled_log_prob"] for n in stack.names])
            assert torch.equal(_stacked_tables(sites, stack.names), expected)
    # A large broadcast Normal: the compacted path.
    data = torch.randn(3000)
    program = ProgramModel(gaussian_mixture, (data,), {})
    values = initial_values(program, None, seed=3)
    trace = program.trace(values)
    sites = CompiledProgram(program, trace).run(values)
    assert sites is not None
    assert torch.equal(_table(sites["x"]), trace.nodes["x"]["unscaled_log_prob"])
    assert torch.equal(_table(sites["z"]), trace.nodes["z"]["unscaled_log_prob"])


def diagonal_mixture(data: torch.Tensor) -> None:
    """Components with a diagonal covariance: one ``Independent`` Normal per datum."""
    dim = data.shape[-1]
    two, one, zero, five = (data.new_tensor(number) for number in (2.0, 1.0, 0.0, 5.0))
    weights = pyro.sample("weights", dist.Dirichlet(two.expand(3)))
    with pyro.plate("components", 3):
        locs = pyro.sample("locs", dist.Normal(zero, five).expand([dim]).to_event(1))
        variances = pyro.sample("variances", dist.InverseGamma(two, one).expand([dim]).to_event(1))
    with pyro.plate("data", data.shape[0]):
        z = pyro.sample("z", dist.Categorical(weights), infer=PARALLEL)
        pyro.sample("x", dist.Normal(locs[z], variances[z].sqrt()).to_event(1), obs=data)


@pytest.mark.parametrize("dim", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_event_sums_are_the_traces_own_bit_for_bit(dim: int, dtype: torch.dtype) -> None:
    """The reinterpreted (feature) dimension of a large table is summed by adding its
    slices for 2 or 3 features (:func:`_sum_event`): the floats of Pyro's own table."""
    data = (torch.randn(2000, dim, dtype=torch.float64) * 10.0 ** torch.arange(dim)).to(dtype)
    program = ProgramModel(diagonal_mixture, (data,), {})
    values = initial_values(program, None, seed=4)
    trace = program.trace(values)
    sites = CompiledProgram(program, trace).run(values)
    assert sites is not None
    table = _table(sites["x"])
    assert table.dtype == dtype
    assert torch.equal(table, trace.nodes["x"]["unscaled_log_prob"])


# ----- 4. control flow that depends on the parameters ------------------------------------


def branching_structure(data: torch.Tensor) -> None:
    """An extra observed site exists only while the first weight exceeds one half."""
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(2)))
    locs = pyro.sample("locs", dist.Normal(0.0, 3.0).expand([2]).to_event(1))
    if float(weights[0].detach()) > 0.5:
        pyro.sample("anchor", dist.Normal(locs[0], 1.0), obs=torch.tensor(-1.0))
    with pyro.plate("data", data.shape[0]):
        z = pyro.sample("z", dist.Categorical(weights), infer=PARALLEL)
        pyro.sample("x", dist.Normal(locs[z], 1.0), obs=data)


def branching_numbers(data: torch.Tensor) -> None:
    """The noise switches with the sign of the first mean; the sites stay the same."""
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(2)))
    locs = pyro.sample("locs", dist.Normal(0.0, 3.0).expand([2]).to_event(1))
    noise = 1.0 if float(locs[0].detach()) > 0 else 2.0
    with pyro.plate("data", data.shape[0]):
        z = pyro.sample("z", dist.Categorical(weights), infer=PARALLEL)
        pyro.sample("x", dist.Normal(locs[z], noise), obs=data)


def _branch_data() -> torch.Tensor:
    generator = torch.Generator().manual_seed(4)
    low = torch.randn(6, generator=generator, dtype=torch.float64) - 3.0
    return torch.cat([low, torch.randn(14, generator=generator, dtype=torch.float64) + 2.0])


def test_light_run_reports_a_change_of_structure() -> None:
    program = ProgramModel(branching_structure, (_branch_data(),), {})
    below = {"weights": torch.tensor([0.3, 0.7]), "locs": torch.tensor([-1.0, 1.0])}
    above = {"weights": torch.tensor([0.6, 0.4]), "locs": torch.tensor([-1.0, 1.0])}
    compiled = CompiledProgram(program, program.trace(below))
    assert compiled({**below, "locs": torch.tensor([-2.0, 2.0])}) is not None
    assert compiled(above) is None


def test_light_run_is_exact_when_only_numbers_change() -> None:
    program = ProgramModel(branching_numbers, (_branch_data(),), {})
    negative = {"weights": torch.tensor([0.3, 0.7]), "locs": torch.tensor([-1.0, 1.0])}
    positive = {"weights": torch.tensor([0.3, 0.7]), "locs": torch.tensor([0.5, 1.0])}
    compiled = CompiledProgram(program, program.trace(negative))
    for values in (negative, positive):
        estep = compiled(values)
        assert estep is not None
        _assert_same_estep(compiled, estep, posterior(program, values))


def _fit(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], **options: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        return pyroem.fit(model, *args, model_kwargs=kwargs, seed=0, **options)


def _assert_same_fit(fast: Any, full: Any, rtol: float = TOL) -> None:
    assert fast.num_iterations == full.num_iterations
    np.testing.assert_allclose(fast.history.objective, full.history.objective, rtol=rtol)
    np.testing.assert_allclose(fast.history.log_likelihood, full.history.log_likelihood, rtol=rtol)
    for name, value in full.params.items():
        _close(fast.params[name], value, 1e-10)
    for name, marginal in full.marginals.items():
        _close(fast.marginals[name], marginal, 1e-10)


FITS = {
    "hmm-ragged": (*PROGRAMS["hmm-ragged"], {"max_iter": 8}),
    "factorial": (*PROGRAMS["factorial"], {"max_iter": 6}),
    "nested-plates": (*PROGRAMS["nested-plates"], {"max_iter": 6, "n_init": 2}),
    "branching-structure": (
        branching_structure,
        (_branch_data(),),
        {},
        {
            "max_iter": 12,
            "init": {
                "weights": torch.tensor([0.45, 0.55], dtype=torch.float64),
                "locs": torch.tensor([2.0, -3.0], dtype=torch.float64),
            },
        },
    ),
    "gradient-block": (
        HMM["gaussian_hmm"],
        PROGRAMS["hmm-ragged"][1],
        {"priors": "conjugate"},
        {"max_iter": 4, "m_step": "gradient", "gradient_steps": 5},
    ),
}


@pytest.mark.parametrize("name", list(FITS))
def test_fit_equals_a_fit_without_the_fast_paths(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, args, kwargs, options = FITS[name]
    fast = _fit(model, args, kwargs, tol=0.0, **options)
    monkeypatch.setattr(fit_module, "_COMPILED", False)
    full = _fit(model, args, kwargs, tol=0.0, **options)
    # Gradient M-steps: L-BFGS reads Q's gradient, whose last digits differ between the
    # paths, so a step may land about 1e-11 apart in the parameters (compared to 1e-10):
    # from the prior-draw start, 2.2e-12 relative in one iteration's log-likelihood.
    _assert_same_fit(fast, full, rtol=1e-11 if name == "gradient-block" else TOL)


def test_branching_fit_crosses_its_branch() -> None:
    """The structure fit above does leave the branch it started in (else it tests nothing)."""
    model, args, kwargs, options = FITS["branching-structure"]
    fit = _fit(model, args, kwargs, tol=0.0, **options)
    assert float(fit.params["weights"][0]) > 0.5 > float(options["init"]["weights"][0])
    assert "anchor" in fit.program.trace(fit.params).nodes


# ----- 5. stacked closed forms and shared probes ------------------------------------------


@pytest.mark.parametrize("name", ["hmm-ragged", "hmm-flat", "gaussian-mixture", "nested-plates"])
def test_stacked_closed_forms_equal_use_by_use(name: str) -> None:
    model, args, kwargs = PROGRAMS[name]
    program = ProgramModel(model, args, kwargs)
    values = initial_values(program, None, seed=5)
    found = conjugacy.recognise(program, values)
    trace = program.trace(values)
    compiled = CompiledProgram(program, trace)
    full = posterior(program, values, trace)
    estep = compiled.estimate_trace(trace)
    sites = dict(estep.sites)
    changes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    order = fit_module.block_order(program, found)
    assert order, "no closed form recognised"
    for block_name in order:
        block = found[block_name]
        assert block is not None
        expected = conjugacy.closed_form_update(program, block, trace, full.weights, changes, found)
        stacked = StackedUpdate(block, found, sites, estep)(
            values[block_name], estep, sites, changes
        )
        _close(stacked, expected)
        changes[block_name] = (values[block_name], expected)


def _recognise_each(program: ProgramModel, values: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The reference: every parameter probed alone, with full traces."""
    trace = program.trace(values)
    generator = torch.Generator().manual_seed(0)
    found: dict[str, Any] = dict.fromkeys(program.params)
    for name, site in program.params.items():
        kind = conjugacy._constraint_kind(site.constraint)
        if kind is None:
            continue
        value = values[name].detach()
        probes = conjugacy._probes(value, kind, generator)
        reuse = kind in conjugacy._REUSE or (kind == "simplex" and conjugacy._distinct_rows(value))
        if reuse:
            probes = (value, *probes[1:])
        probe = conjugacy._Probe(kind, probes, reuse)
        found[name] = conjugacy._recognise_alone(program, values, trace, name, probe)
    return found


def robust_mixture(data: torch.Tensor) -> None:
    """Student-t components: a site whose location, scale and degrees of freedom no
    closed form covers, next to Dirichlet weights that have one."""
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(2)))
    with pyro.plate("components", 2):
        locs = pyro.sample("locs", dist.Normal(0.0, 3.0))
        scales = pyro.sample("scales", dist.Gamma(2.0, 2.0))
    df = pyro.param("df", torch.tensor(4.0), constraint=constraints.positive)
    with pyro.plate("data", data.shape[0]):
        z = pyro.sample("z", dist.Categorical(weights), infer=PARALLEL)
        pyro.sample("x", dist.StudentT(df, locs[z], scales[z]), obs=data)


@pytest.mark.parametrize(
    "name", ["hmm-ragged", "hmm-flat", "gaussian-mixture", "factorial", "robust", "dependent-chain"]
)
def test_shared_probes_find_what_probing_alone_finds(name: str) -> None:
    if name == "robust":
        model, args, kwargs = robust_mixture, (PROGRAMS["factorial"][1][0],), {}
    else:
        model, args, kwargs = PROGRAMS[name]
    program = ProgramModel(model, args, kwargs)
    values = initial_values(program, None, seed=6)
    shared = conjugacy.recognise(program, values)
    alone = _recognise_each(program, values)
    assert shared.keys() == alone.keys()
    for site, block in alone.items():
        other = shared[site]
        assert (block is None) == (other is None), site
        if block is None:
            continue
        assert (other.kind, other.slot) == (block.kind, block.slot)
        assert [u.site for u in other.uses] == [u.site for u in block.uses]
        for mine, reference in zip(other.uses, block.uses, strict=True):
            assert mine.event_ndims == reference.event_ndims
            assert torch.equal(mine.rows, reference.rows)
    if name == "robust":
        assert shared["weights"] is not None
        assert all(shared[site] is None for site in ("locs", "scales", "df"))
