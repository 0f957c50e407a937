"""Checkpoints of a running fit, and resuming from them.

``pyroem.fit(..., checkpoint="run.ckpt", checkpoint_every=10)`` writes the state of
the EM loop every 10 iterations (or every ``"30s"``), when a restart stops
(converged, at ``max_iter``, or interrupted by Ctrl-C) and so at the end of the fit.
``resume=True`` continues from that file when it exists (and starts afresh when it
does not, so one command both starts and resumes a long fit).

A checkpoint holds everything the loop needs to go on as if it had never stopped:
the engine's state before its last E-step (parameters, variational factors,
optimiser state, random generators), the history and per-iteration records, the
restart index, the final objective and failure of every earlier restart, and the
best finished restart (re-scored and finished again on resume). Resuming therefore
gives the uninterrupted fit, bit for bit.

The file is an ``.npz`` archive of arrays plus JSON metadata, read back without
unpickling and checked (format, a SHA-256 digest of every array, every array a
record names) before anything is used; it is written to a temporary file in the
same folder and moved into place (``os.replace``), so an interruption while writing
leaves the previous checkpoint whole.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import numbers
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import numpy as np
import torch

from pyroem.errors import FitFileError, NotSupportedError, SpecError
from pyroem.fits.archive import read_arrays

__all__ = [
    "Checkpoint",
    "active",
    "checkpointing",
    "copied",
    "identity_of",
    "parse_every",
    "to_device",
]

_FORMAT = "pyroem-checkpoint"
_VERSION = 1
_SECONDS = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*s\s*$")


def parse_every(every: Any) -> tuple[int | None, float | None]:
    """``checkpoint_every`` as ``(iterations, seconds)``, one of them ``None``.

    An integer ``>= 1`` counts iterations; a string such as ``"30s"`` counts seconds.

    Raises:
        SpecError: anything else.
    """
    if isinstance(every, numbers.Integral) and not isinstance(every, bool) and int(every) >= 1:
        return int(every), None
    if isinstance(every, str):
        match = _SECONDS.match(every)
        if match and float(match.group(1)) > 0:
            return None, float(match.group(1))
    raise SpecError(
        f"checkpoint_every must be an integer >= 1 (iterations) or a string of seconds "
        f"such as '30s'; got {every!r}"
    )


# ----- the archive: nested values of tensors, arrays and plain numbers --------------


def _encode(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    """A JSON record of ``value``; its tensors and arrays go into ``arrays``."""
    if value is None or isinstance(value, bool | str):
        return {"t": "v", "v": value}
    if isinstance(value, torch.Tensor):
        name = f"a{len(arrays)}"
        arrays[name] = value.detach().cpu().numpy().copy()
        return {"t": "tensor", "a": name}
    if isinstance(value, np.ndarray | np.generic):
        name = f"a{len(arrays)}"
        arrays[name] = np.array(value)
        return {"t": "ndarray" if isinstance(value, np.ndarray) else "scalar", "a": name}
    if isinstance(value, int):
        return {"t": "v", "v": value}
    if isinstance(value, float):
        return {"t": "float", "v": repr(value)}
    if isinstance(value, torch.Size):
        return {"t": "size", "v": list(value)}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        kind = type(value)
        if not kind.__module__.startswith("pyroem."):
            raise NotSupportedError(f"a checkpoint cannot hold a {kind.__qualname__}")
        return {
            "t": "named",
            "type": f"{kind.__module__}:{kind.__qualname__}",
            "v": [_encode(item, arrays) for item in value],
        }
    if isinstance(value, list | tuple):
        return {"t": type(value).__name__, "v": [_encode(item, arrays) for item in value]}
    if isinstance(value, dict):
        return {
            "t": "dict",
            "v": [[_encode(key, arrays), _encode(item, arrays)] for key, item in value.items()],
        }
    raise NotSupportedError(
        f"a checkpoint cannot hold a {type(value).__qualname__}; this method's state "
        "cannot be checkpointed"
    )


def _decode(record: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    """The value :func:`_encode` recorded (raises ``KeyError``/``TypeError``/``ValueError``
    on a damaged record)."""
    kind, value = record["t"], record.get("v")
    if kind == "v":
        if value is not None and not isinstance(value, bool | str | int):
            raise TypeError(f"a plain value is a {type(value).__name__}")
        return value
    if kind == "float":
        return float(value)
    if kind in ("tensor", "ndarray", "scalar"):
        array = arrays[record["a"]]
        if kind == "tensor":
            return torch.from_numpy(array.copy())
        return array.copy() if kind == "ndarray" else array[()]
    if kind == "size":
        return torch.Size(int(item) for item in value)
    if kind == "list":
        return [_decode(item, arrays) for item in value]
    if kind == "tuple":
        return tuple(_decode(item, arrays) for item in value)
    if kind == "dict":
        return {_decode(key, arrays): _decode(item, arrays) for key, item in value}
    if kind == "named":
        return _named_type(record["type"])(*(_decode(item, arrays) for item in value))
    raise ValueError(f"unknown record kind {kind!r}")


#: Modules renamed since checkpoints were first written: a record type named by its old
#: module is read from the new one, so that older checkpoints still resume.
_RENAMED_MODULES = {
    "pyroem.alignment": "pyroem.outputs.alignment",
    "pyroem.bayes": "pyroem.engines.bayes",
    "pyroem.checkpoint": "pyroem.fits.checkpoint",
    "pyroem.distributed": "pyroem.engines.distributed",
    "pyroem.program.chain": "pyroem.estep.chain",
    "pyroem.program.compiled": "pyroem.estep.compiled",
    "pyroem.program.conjugacy": "pyroem.mstep.recognised",
    "pyroem.program.model": "pyroem.model.program",
    "pyroem.program.posterior": "pyroem.estep.program",
    "pyroem.program.stacked": "pyroem.mstep.stacked",
    "pyroem.sampling.exact": "pyroem.estep.exact_draws",
    "pyroem.sampling.mcmc_em": "pyroem.engines.mcmc_em",
    "pyroem.sampling.schedules": "pyroem.engines.mcmc_schedules",
    "pyroem.sampling.stacked": "pyroem.estep.stacked_draws",
    "pyroem.selection": "pyroem.outputs.selection",
    "pyroem.spec.families": "pyroem.model.families",
    "pyroem.spec.params": "pyroem.model.params",
    "pyroem.stream": "pyroem.estep.stream",
    "pyroem.variational.cavi": "pyroem.engines.cavi",
    "pyroem.variational.cavi_conjugate": "pyroem.mstep.cavi_factors",
    "pyroem.variational.svi": "pyroem.engines.svi",
    "pyroem.variational._cavi_conjugate": "pyroem.mstep.cavi_factors",
    "pyroem.program._chain": "pyroem.estep.chain",
    "pyroem.program._compiled": "pyroem.estep.compiled",
    "pyroem.program._stacked": "pyroem.mstep.stacked",
}


def _named_type(name: str) -> Any:
    """A NamedTuple class of pyroem by ``module:qualname`` (nothing else is imported)."""
    module, _, qualname = name.partition(":")
    if not module.startswith("pyroem.") or "." in qualname:
        raise ValueError(f"{name!r} is not a pyroem record type")
    module = _RENAMED_MODULES.get(module, module)
    kind = getattr(importlib.import_module(module), qualname)
    if not (isinstance(kind, type) and issubclass(kind, tuple) and hasattr(kind, "_fields")):
        raise ValueError(f"{name!r} is not a record type")
    return kind


def _digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of every array's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def identity_of(value: Any) -> str:
    """A short description of a model argument: an array's shape, dtype and digest."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray) and value.dtype.kind in "biufc":
        digest = hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()[:16]
        return f"array of shape {value.shape}, {value.dtype}, sha256 {digest}"
    if isinstance(value, bool | int | float | str | None):
        return repr(value)
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):
        array = None
    if array is not None and array.dtype.kind in "biufc":
        return identity_of(array)
    text = repr(value)
    return type(value).__qualname__ if " at 0x" in text else text


class Checkpoint:
    """Where and when a fit writes its checkpoint, and what it was written for.

    Args:
        path: the checkpoint file.
        every: ``checkpoint_every`` (see :func:`parse_every`).
        resume: continue from ``path`` when it exists.
        identity: what the checkpoint belongs to (method, model, data, seed, ...); a
            checkpoint written for anything else is refused.
    """

    def __init__(self, path: Any, every: Any, resume: bool, identity: dict[str, str]) -> None:
        self.path = os.fspath(path)
        self.iterations, self.seconds = parse_every(every)
        self.resume = resume
        self.identity = identity
        self._last_write = time.monotonic()
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise SpecError(f"checkpoint={self.path!r}: the folder {folder!r} does not exist")

    def due(self, iteration: int) -> bool:
        """Whether to write after ``iteration``."""
        if self.iterations is not None:
            return iteration % self.iterations == 0
        assert self.seconds is not None
        return time.monotonic() - self._last_write >= self.seconds

    def write(self, state: dict[str, Any]) -> None:
        """Write ``state`` atomically (a temporary file in the same folder, then
        ``os.replace``)."""
        arrays: dict[str, np.ndarray] = {}
        record = _encode(state, arrays)
        meta = {
            "format": _FORMAT,
            "version": _VERSION,
            "identity": self.identity,
            "state": record,
            "digest": _digest(arrays),
        }
        arrays["meta"] = np.array(json.dumps(meta))
        folder = os.path.dirname(os.path.abspath(self.path))
        handle, temporary = tempfile.mkstemp(
            prefix=os.path.basename(self.path) + ".", suffix=".tmp", dir=folder
        )
        try:
            with os.fdopen(handle, "wb") as stream:
                np.savez(stream, **arrays)  # type: ignore[arg-type]
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise
        self._last_write = time.monotonic()

    def read(self) -> dict[str, Any] | None:
        """The saved state when resuming from an existing file, else ``None``.

        Raises:
            FitFileError: the file is damaged, not a checkpoint, or was written for a
                different fit (naming what differs).
        """
        if not self.resume or not os.path.exists(self.path):
            return None
        try:
            arrays = read_arrays(self.path)
        except FitFileError as err:
            raise FitFileError(
                f"checkpoint {self.path!r} cannot be read: {err}; delete it, or resume=False "
                "to start afresh"
            ) from None
        where = f"checkpoint {self.path!r}"
        try:
            meta = json.loads(str(arrays.pop("meta")))
        except (KeyError, ValueError) as err:
            raise FitFileError(f"{where} is not a pyroem checkpoint ({err})") from None
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise FitFileError(f"{where} is not a pyroem checkpoint")
        if meta.get("version") != _VERSION:
            raise FitFileError(
                f"{where} has format version {meta.get('version')!r}; this pyroem reads "
                f"version {_VERSION}"
            )
        if meta.get("digest") != _digest(arrays):
            raise FitFileError(
                f"{where} is damaged: its arrays do not match their recorded digest; "
                "delete it, or resume=False to start afresh"
            )
        saved = meta.get("identity")
        if not isinstance(saved, dict):
            raise FitFileError(f"{where} is damaged: no record of the fit it belongs to")
        differences = [
            f"{key}: {saved.get(key, '(none)')} in the checkpoint, {value} now"
            for key, value in self.identity.items()
            if saved.get(key) != value
        ]
        if differences:
            raise FitFileError(
                f"{where} was written by a different fit ("
                + "; ".join(differences)
                + "); resume with the original model, data and options, or pass "
                "resume=False (or another checkpoint path) to start afresh"
            )
        try:
            state = _decode(meta["state"], arrays)
        except (KeyError, TypeError, ValueError, AttributeError, ImportError) as err:
            raise FitFileError(
                f"{where} is damaged ({type(err).__name__}: {err}); delete it, or "
                "resume=False to start afresh"
            ) from None
        if not isinstance(state, dict):
            raise FitFileError(f"{where} is damaged: its state is not a record")
        return state


_ACTIVE: ContextVar[Checkpoint | None] = ContextVar("pyroem_checkpoint", default=None)


@contextmanager
def checkpointing(checkpoint: Checkpoint | None) -> Iterator[None]:
    """Make ``checkpoint`` the one the next EM loop of this fit takes (see :func:`active`)."""
    token = _ACTIVE.set(checkpoint)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> Checkpoint | None:
    """The checkpoint of the fit running now, taken once: the fit's first EM loop gets it."""
    checkpoint = _ACTIVE.get()
    if checkpoint is not None:
        _ACTIVE.set(None)
    return checkpoint


def to_device(value: Any, like: torch.Tensor) -> Any:
    """``value`` (nested tuples, lists, dicts of tensors) with its tensors on ``like``'s
    device (their dtypes kept)."""
    if isinstance(value, torch.Tensor):
        return value.to(like.device)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(to_device(item, like) for item in value))
    if isinstance(value, list | tuple):
        return type(value)(to_device(item, like) for item in value)
    if isinstance(value, dict):
        return {key: to_device(item, like) for key, item in value.items()}
    return value


def copied(value: Any) -> Any:
    """``value`` (nested tuples, lists, dicts of tensors) with every tensor cloned, so
    that later in-place updates (an optimiser's state) leave it unchanged."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(copied(item) for item in value))
    if isinstance(value, list | tuple):
        return type(value)(copied(item) for item in value)
    if isinstance(value, dict):
        return {key: copied(item) for key, item in value.items()}
    return value
