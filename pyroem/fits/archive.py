"""Reading the ``.npz`` archives that fits and checkpoints are saved in, without pickle."""

from __future__ import annotations

import math
import zipfile
import zlib

import numpy as np

from pyroem.errors import FitFileError

__all__ = ["FORMAT_VERSION", "MIXTURE_FORMAT", "PROGRAM_FORMAT", "read_arrays"]

#: The ``format`` of a saved Mixture fit's metadata.
MIXTURE_FORMAT = "pyroem-fit"
#: The ``format`` of a saved Pyro program's fit.
PROGRAM_FORMAT = "pyroem-program-fit"
#: The version of both formats this package writes and reads.
FORMAT_VERSION = 1


def read_arrays(where: str) -> dict[str, np.ndarray]:
    """Every array of the archive, each read only after its header's size was checked
    against the bytes stored for it (a damaged header cannot ask for terabytes)."""
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(where) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    raise FitFileError(f"it holds {info.filename!r}, which is not an array")
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    header = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = header(member)
                    if dtype.hasobject:
                        raise FitFileError(f"array {info.filename!r} holds Python objects")
                    size = math.prod(shape) * dtype.itemsize
                    if size > info.file_size:
                        raise FitFileError(
                            f"array {info.filename!r} claims shape {shape} ({size} bytes) "
                            f"but only {info.file_size} bytes are stored"
                        )
                with archive.open(info) as member:
                    arrays[info.filename[:-4]] = np.lib.format.read_array(
                        member, allow_pickle=False
                    )
    except FitFileError as err:
        raise FitFileError(f"cannot read a pyroem fit from {where!r}: {err}") from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error) as err:
        raise FitFileError(
            f"cannot read a pyroem fit from {where!r}: {type(err).__name__}: {err} "
            "(the file is missing, truncated, damaged, or not written by FitResult.save)"
        ) from err
    return arrays
