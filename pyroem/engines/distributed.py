r"""Fits split over the processes of a ``torch.distributed`` process group.

EM's statistics are sums over data points, so ``W`` processes (ranks), each holding a
shard of the data, give the single-process fit exactly: every rank runs the E-step on
its shard, and one collective per iteration hands every rank the statistics of the
whole data, so every rank takes the same M-step and holds the same parameters.

- **Statistics.** Every rank flattens its E-step statistics and log-likelihood into one
  float64 buffer. Plain sums (counts, moments of the Poisson, Bernoulli, categorical and
  exponential families; entropies) are combined by one ``all_reduce(SUM)``. A Gaussian's
  scatter about each component's own mean is not a sum: its parts are combined by the
  pairwise update that also combines chunks (:meth:`GaussianStats.merge`), after one
  ``all_gather`` of the same buffer, folded in rank order on every rank, so every rank
  gets the same bits.
- **Starting points.** Rank 0's starting parameters of every restart are broadcast; a
  seed is broadcast when none is given, so the restarts' draws agree.
- **Pyro programs** (map-em). Each rank passes :func:`pyroem.fit` its own shard of the
  data (the program's plates sized by the shard). The E-step (program runs, tables,
  forward-backward) is per rank; the objective is the ranks' log-likelihoods summed plus
  rank 0's prior term; each closed-form update sums its weighted statistics over the ranks
  (:func:`pyroem.mstep.recognised.summed_over_shards`) before the prior joins them, so
  every rank takes the closed form of the whole data (a hyperparameter read by parameters
  only has the same statistics on every rank: they are not summed; one read by parameters
  and data counts the parameters' uses on rank 0 only). A gradient M-step (ECME or Q's
  L-BFGS, :mod:`pyroem.mstep.gradient`) sums each evaluation's value and gradient over
  the ranks (:meth:`Collective.sum_tensors`; prior and log-Jacobian terms on rank 0), so
  every rank takes the same steps.
- **MCMC-EM** (exact draws of one discrete latent per data point, a mixture's
  assignment). Each rank draws the latents of its own rows, from generators keyed on
  the global row (:class:`~pyroem.estep.exact_draws.KeyedSampler`, its offset from
  :meth:`Collective.row_offset`), so the ranks draw what one process draws; the
  Monte Carlo statistics go through the closed forms' sums as for map-em, and the
  schedule reads the objective, the M-step's gain and its per-draw gains summed over
  the ranks (prior terms once), so every rank takes the same step sizes, draw counts
  and stopping decision.
- **SVI on a Pyro program** (vb-em, ``guide="delta"``): each rank's ELBO covers its
  shard, the global sites' prior and guide terms on rank 0; ELBO and gradients are
  summed every step (:mod:`pyroem.engines.svi`).
- **Shards.** In-memory data is passed whole on every rank (e.g. a memmap or a loaded
  array) and rank ``r`` takes rows ``[r N / W, (r + 1) N / W)``; a source
  (:mod:`pyroem.sources`) is split by :meth:`~pyroem.sources.ChunkSource.shard`. The
  reservoir samples of the ranks' shards are merged into one uniform sample of the whole
  source (:meth:`Collective.merge_samples`): the initialisation reads the same rows on
  every rank.

The process group is the one PyTorch programs already use: ``torchrun`` (or Ray Train,
or Lightning) starts the processes and sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`collective` joins it (backend ``gloo`` on CPU, ``nccl`` on CUDA).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from pyroem.em import EStepResult
from pyroem.errors import DataError, FitFileError, NotSupportedError, PyroEMError, SpecError

__all__ = ["LOCAL", "Collective", "collective", "in_process_group"]


def in_process_group() -> bool:
    """Whether this process belongs to an initialised process group of several ranks."""
    dist = torch.distributed
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def _launched() -> bool:
    """Whether a launcher (``torchrun``) set the environment of a process group."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _leaves(tree: Any) -> list[torch.Tensor]:
    """The tensors of nested tuples (NamedTuples) of tensors, in order."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, tuple):
        return [leaf for item in tree for leaf in _leaves(item)]
    return []


def _rebuild(tree: Any, flat: torch.Tensor, at: list[int]) -> Any:
    """``tree`` with its tensors read from ``flat`` (float64) from offset ``at[0]`` on,
    each back in its own dtype, shape and device."""
    if isinstance(tree, torch.Tensor):
        size = tree.numel()
        part = flat[at[0] : at[0] + size].reshape(tree.shape)
        at[0] += size
        return part.to(dtype=tree.dtype, device=tree.device)
    if isinstance(tree, tuple):
        items = [_rebuild(item, flat, at) for item in tree]
        return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
    return tree


def _merges(tree: Any) -> bool:
    """Whether any part of ``tree`` is combined by its own ``merge`` (not summed)."""
    if hasattr(tree, "merge"):
        return True
    return isinstance(tree, tuple) and any(_merges(item) for item in tree)


def _combine(left: Any, right: Any) -> Any:
    """Statistics of two disjoint parts of the data: ``merge`` where defined, else sums."""
    if hasattr(left, "merge"):
        return left.merge(right)
    if isinstance(left, torch.Tensor):
        return left + right
    if isinstance(left, tuple):
        items = [_combine(a, b) for a, b in zip(left, right, strict=True)]
        return type(left)(*items) if hasattr(left, "_fields") else type(left)(items)
    return left


class Collective:
    """The collectives a fit needs, over the default process group.

    Attributes:
        rank: this process's rank.
        world_size: the number of ranks ``W``.
    """

    def __init__(self) -> None:
        dist = torch.distributed
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        # nccl moves CUDA tensors only; gloo CPU tensors.
        self.device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")

    def record(self) -> dict[str, Any]:
        """What to add to a fit's options: the number of processes it was split over."""
        return {"processes": self.world_size} if self.world_size > 1 else {}

    def _flat(self, tree: Any, *scalars: float) -> torch.Tensor:
        parts = [leaf.detach().to(self.device, torch.float64).reshape(-1) for leaf in _leaves(tree)]
        parts.append(torch.tensor(scalars, dtype=torch.float64, device=self.device))
        return torch.cat(parts)

    def rows(self, num_rows: int) -> slice:
        """This rank's rows of ``num_rows``: ``[r N / W, (r + 1) N / W)``.

        Raises:
            DataError: fewer rows than ranks.
        """
        if num_rows < self.world_size:
            raise DataError(
                f"{num_rows} rows cannot be split over {self.world_size} ranks; use fewer processes"
            )
        return slice(
            self.rank * num_rows // self.world_size, (self.rank + 1) * num_rows // self.world_size
        )

    def row_offset(self, num_rows: int) -> int:
        """The global row of this rank's first row, when rank ``r`` holds ``num_rows``
        rows following those of ranks ``0 … r - 1``."""
        sizes = torch.zeros(self.world_size, dtype=torch.int64, device=self.device)
        sizes[self.rank] = num_rows
        torch.distributed.all_reduce(sizes)
        return int(sizes[: self.rank].sum())

    def sum(self, value: float) -> float:
        """``value`` summed over the ranks (float64)."""
        buffer = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(buffer)
        return float(buffer)

    def sum_tensors(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """``tensors`` summed over the ranks (one ``all_reduce`` in float64), each back in
        its own dtype and device."""
        flat = self._flat(tuple(tensors))
        torch.distributed.all_reduce(flat)
        return list(_rebuild(tuple(tensors), flat.cpu(), [0]))

    def broadcast(self, tree: Any) -> Any:
        """Rank 0's values of ``tree`` (nested tuples of tensors of the same shapes on
        every rank)."""
        flat = self._flat(tree)
        torch.distributed.broadcast(flat, src=0)
        return _rebuild(tree, flat.cpu(), [0])

    def broadcast_seed(self, seed: int | None) -> int:
        """``seed``, or when it is ``None`` a seed drawn on rank 0, the same on every rank."""
        value = torch.tensor([-1 if seed is None else seed], dtype=torch.int64, device=self.device)
        if seed is None and self.rank == 0:
            value.fill_(int(torch.randint(0, 2**32, (1,))))
        torch.distributed.broadcast(value, src=0)
        return int(value)

    def reduce(self, result: EStepResult) -> EStepResult:
        """The E-step of the whole data from each rank's E-step of its shard.

        The statistics and the log-likelihood are combined over the ranks (one
        collective); the objective is their log-likelihood plus rank 0's prior term
        (the same on every rank up to round-off), so every rank records the same bits
        and takes the same stopping decision.
        """
        stats, local = result.stats, result.log_likelihood
        prior = result.objective - local if self.rank == 0 else 0.0
        flat = self._flat(stats, local, prior)
        if not _merges(stats):
            torch.distributed.all_reduce(flat)
            combined = _rebuild(stats, flat.cpu(), [0])
            total, prior = float(flat[-2]), float(flat[-1])
        else:
            parts = [torch.empty_like(flat) for _ in range(self.world_size)]
            torch.distributed.all_gather(parts, flat)
            combined, total = None, 0.0
            for part in parts:
                part_stats = _rebuild(stats, part.cpu(), [0])
                combined = part_stats if combined is None else _combine(combined, part_stats)
                total += float(part[-2])
            prior = float(parts[0][-1])
        return EStepResult(combined, total + prior, total, result.info)

    def check(self, error: BaseException | None) -> None:
        """Raise on every rank when any rank met ``error`` (so no rank waits forever on a
        collective the failing one never reaches)."""
        flag = torch.tensor([0.0 if error is None else 1.0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if error is not None:
            raise error
        if float(flag) > 0:
            raise DataError(
                "another rank of the process group failed (reading its data shard, or checking "
                "the fit); that rank's error names the cause"
            )

    def agree(self, error: BaseException | None) -> None:
        """Raise on every rank when any rank met ``error``, an error of the same kind on
        every rank, so that every rank takes the same branch where a caller catches some
        kinds and not others (SQUAREM drops an extrapolated point the program cannot
        score, ``run_em`` skips a restart that failed numerically, an input error ends
        the fit, any other error ends it too). A rank whose own error is of the gravest
        kind met raises its own; the others raise a stand-in naming the failing rank's
        error."""
        flags = failure_flags(error).to(self.device)
        torch.distributed.all_reduce(flags)
        raise_agreed(error, flags.cpu())

    def merge_samples(
        self, num_rows: int, sample: torch.Tensor, reservoir_size: int, seed: int
    ) -> tuple[int, torch.Tensor]:
        """One uniform sample of the whole source from the ranks' reservoir samples.

        Args:
            num_rows: rows of this rank's shard.
            sample: its reservoir sample ``(m, dim)``, ``m = min(num_rows, reservoir_size)``.
            reservoir_size: most rows of the merged sample.
            seed: seed of the draw (the same on every rank).

        Returns:
            The rows of the whole source and the merged sample: when the source has at
            most ``reservoir_size`` rows, the shards' rows in rank order; otherwise
            ``reservoir_size`` rows, ``m_r`` of them drawn from rank ``r``'s sample with
            ``(m_r)`` multivariate hypergeometric in the shards' sizes, so each row of
            the source is equally likely to be kept.
        """
        sizes = torch.tensor([num_rows, sample.shape[0], sample.shape[1]], device=self.device)
        all_sizes = [torch.empty_like(sizes) for _ in range(self.world_size)]
        torch.distributed.all_gather(all_sizes, sizes)
        counts = [int(size[0]) for size in all_sizes]
        kept = [int(size[1]) for size in all_sizes]
        dims = {int(size[2]) for size in all_sizes}
        if len(dims) > 1:
            raise DataError(
                f"the ranks' data shards have different numbers of columns {sorted(dims)}; "
                "every rank must read the same source"
            )
        padded = sample.new_zeros((reservoir_size, sample.shape[1]), dtype=torch.float64)
        padded[: sample.shape[0]] = sample.to(torch.float64)
        padded = padded.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, padded)
        total = sum(counts)
        if total <= reservoir_size:
            rows = [part[:size] for part, size in zip(parts, kept, strict=True)]
        else:
            rng = np.random.default_rng(seed)
            take = rng.multivariate_hypergeometric(np.array(counts), reservoir_size)
            rows = [
                part[np.sort(rng.choice(size, int(number), replace=False))]
                for part, size, number in zip(parts, kept, take, strict=True)
            ]
        merged = torch.cat(rows).to(dtype=sample.dtype, device=sample.device)
        return total, merged


class RankFailure(Exception):
    """Another rank's error that no loop catches (an ``IndexError``, a ``TypeError``...
    of the program): every rank ends the fit with it."""


def failure_flags(error: BaseException | None) -> torch.Tensor:
    """This rank's flags for :func:`raise_agreed`: one per kind of failure (see
    :func:`_failure_kind`, the mildest first), 1 for the kind of ``error``, ``(4,)``.
    Summed over the ranks (alone, or beside other tensors in one ``all_reduce``), they
    count the ranks that met each kind."""
    flags = torch.zeros(4, dtype=torch.float64)
    if error is not None:
        flags[_failure_kind(error) - 1] = 1.0
    return flags


def raise_agreed(error: BaseException | None, flags: torch.Tensor) -> None:
    """Raise on every rank when any rank met an error (``flags``: the ranks'
    :func:`failure_flags` summed), one of the gravest kind met: a rank whose own
    ``error`` is of that kind raises its own; the others raise a stand-in naming the
    failing rank's error (see :meth:`Collective.agree`)."""
    met = torch.nonzero(flags.reshape(-1) > 0)
    if met.numel() == 0:
        return
    worst = int(met.max()) + 1
    if error is not None and _failure_kind(error) == worst:
        raise error
    message = (
        "another rank of the process group failed at the same step of the fit (its "
        "error names the cause); every rank stops that step with it"
    )
    raise (DataError, PyroEMError, RankFailure, RuntimeError)[4 - worst](message)


def _failure_kind(error: BaseException) -> int:
    """How grave ``error`` is for the loop around it: 4 an input error (ends the fit),
    3 a numerical :class:`~pyroem.errors.PyroEMError` (ends a restart), 2 an error no
    loop catches (ends the fit), 1 a ``ValueError`` or ``RuntimeError`` (a program that
    cannot be evaluated there: a line search or SQUAREM steps back)."""
    if isinstance(error, (SpecError, DataError, NotSupportedError, FitFileError)):
        return 4
    if isinstance(error, PyroEMError):
        return 3
    return 1 if isinstance(error, (ValueError, RuntimeError)) else 2


class _Local(Collective):
    """One process: every collective is the identity."""

    def __init__(self) -> None:
        self.rank, self.world_size = 0, 1

    def rows(self, num_rows: int) -> slice:
        return slice(0, num_rows)

    def row_offset(self, num_rows: int) -> int:
        return 0

    def sum(self, value: float) -> float:
        return value

    def broadcast(self, tree: Any) -> Any:
        return tree

    def sum_tensors(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return tensors

    def broadcast_seed(self, seed: int | None) -> int | None:  # type: ignore[override]
        return seed

    def reduce(self, result: EStepResult) -> EStepResult:
        return result

    def check(self, error: BaseException | None) -> None:
        if error is not None:
            raise error

    def agree(self, error: BaseException | None) -> None:
        if error is not None:
            raise error


#: The collectives of a single-process fit.
LOCAL: Collective = _Local()


def collective(distributed: Any, device: Any = None) -> Collective:
    """The collectives of a fit.

    Args:
        distributed: ``None`` (default): split the fit over the process group when this
            process belongs to an initialised one of several ranks; ``True``: split it,
            joining the group a launcher (``torchrun``) described in the environment if
            none is initialised; ``False``: fit in this process alone.
        device: the fit's device (a CUDA device joins with ``nccl``, else ``gloo``).

    Raises:
        SpecError: ``distributed`` is not a bool or ``None``, or ``True`` with no process
            group and no launcher environment.
    """
    if distributed is not None and not isinstance(distributed, bool):
        raise SpecError(f"distributed must be True, False or None; got {distributed!r}")
    if distributed is False:
        return LOCAL
    dist = torch.distributed
    if distributed and dist.is_available() and not dist.is_initialized() and _launched():
        cuda = device is not None and torch.device(device).type == "cuda"
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if in_process_group():
        return Collective()
    if distributed and dist.is_available() and dist.is_initialized():
        return LOCAL  # a group of one rank
    if distributed:
        raise SpecError(
            "distributed=True, but this process is in no process group of several ranks: "
            "launch the script with torchrun (torchrun --nproc_per_node 2 script.py), or "
            "call torch.distributed.init_process_group first; distributed=None fits in one "
            "process when there is no group"
        )
    return LOCAL
