r"""Data sources read chunk by chunk: fits whose memory does not grow with the data.

:func:`open_source` recognises what ``pyroem.fit(spec, source)`` may be given besides an
in-memory array:

- a ``.npy`` file (a path) or an ``np.memmap``: memory-mapped, read ``chunk_size`` rows
  at a time;
- a ``.csv`` file: read with ``pandas.read_csv(chunksize=chunk_size)`` (a header row,
  numeric columns);
- a ``.parquet`` file: read by record batches with ``pyarrow`` (optional dependency);
- a glob pattern (``"part-*.npy"``), a folder (its ``.npy``, ``.csv`` and ``.parquet``
  files) or a list of paths: the files in turn, in sorted order for a pattern or folder;
- a re-iterable of chunks: a function returning a fresh iterator of ``(n, dim)`` arrays
  on every call, or a ``torch.utils.data.DataLoader`` (a batch may be a tensor or a
  one-element tuple/list).

Every pass reads each chunk once, so batch EM on a source holds only ``O(chunk_size · K
· dim)`` besides the parameters. A generator or iterator can be read only once and is
refused (wrap it in a function).

The first pass over a source (:func:`scan`) validates every chunk, counts the rows and
keeps a **reservoir sample** (Vitter's algorithm R) of at most ``reservoir_size`` rows,
drawn uniformly from the whole stream with the fit's seed. The family's data-derived
defaults (the default prior's scale) and the initialisation (k-means++ and the other
``init`` strings) are computed on that sample, so they too use bounded memory. When the
source has at most ``reservoir_size`` rows the sample is the whole data in its order, and
the fit equals the in-memory fit.
"""

from __future__ import annotations

import glob
import mmap
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch

from pyroem.errors import DataError
from pyroem.model.mixture import as_data

__all__ = ["ChunkSource", "Scan", "open_source", "scan"]

_SUFFIXES = (".npy", ".csv", ".parquet")


class ChunkSource:
    """A re-readable sequence of data chunks.

    Args:
        read: a function returning a fresh iterator of raw chunks (arrays) on every call.
        description: what the source is, for error messages.
        chunk_size: the most rows of a chunk handed on (larger raw chunks are split).
        dtype: floating dtype of the chunks.
        device: torch device of the chunks.
    """

    def __init__(
        self,
        read: Callable[[], Iterable[Any]],
        description: str,
        chunk_size: int,
        dtype: torch.dtype = torch.float64,
        device: Any = None,
        shards: Callable[[int, int], Callable[[], Iterable[Any]] | None] | None = None,
        ordered: bool = False,
    ) -> None:
        self.read = read
        # A shard that is one block of consecutive rows: the shards in rank order are
        # the source in its order.
        self.ordered = ordered
        self.description = description
        self.chunk_size = chunk_size
        self.dtype = dtype
        self.device = device
        self.shards = shards

    def with_options(self, dtype: torch.dtype, device: Any) -> ChunkSource:
        """This source, handing chunks in ``dtype`` on ``device``."""
        return ChunkSource(self.read, self.description, self.chunk_size, dtype, device, self.shards)

    def shard(self, rank: int, world_size: int) -> ChunkSource:
        """Rank ``rank``'s part of the source, of ``world_size`` disjoint parts that
        together hold every row once (:mod:`pyroem.engines.distributed`).

        A ``.npy`` file or a whole memmap: rows ``[r N / W, (r + 1) N / W)``, read from
        there; several files, at least ``W``: consecutive files, ``[r F / W, (r + 1) F /
        W)``; fewer Parquet files than ranks: consecutive row groups of their ``G`` (when
        ``G ≥ W``), ``[r G / W, (r + 1) G / W)``, read alone; anything else (fewer
        other files than ranks, a function of chunks, a DataLoader): every ``W``-th
        chunk the source gives, from the ``r``-th (every rank reads the
        whole source then, and uses its share). The first kinds are blocks of consecutive
        rows (``ordered``): the shards in rank order are the source in its order.
        """
        read = self.shards(rank, world_size) if self.shards is not None else None
        ordered = read is not None
        if read is None:
            whole = self.read

            def read() -> Iterator[Any]:
                for index, raw in enumerate(whole()):
                    if index % world_size == rank:
                        yield raw

        description = f"{self.description} (part {rank + 1} of {world_size})"
        return ChunkSource(
            read, description, self.chunk_size, self.dtype, self.device, ordered=ordered
        )

    def __iter__(self) -> Iterator[torch.Tensor]:
        """The chunks of one pass, each a validated ``(n, dim)`` tensor, ``n ≤ chunk_size``."""
        raw_chunks = self.read()
        if raw_chunks is None or not isinstance(raw_chunks, Iterable):
            raise DataError(
                f"{self.description} must return an iterable of (n, dim) arrays; got "
                f"{type(raw_chunks).__name__}"
            )
        for raw in raw_chunks:
            if isinstance(raw, tuple | list) and len(raw) == 1:
                raw = raw[0]  # a DataLoader over a one-tensor dataset
            try:
                tensor = as_data(raw, dtype=self.dtype, device=self.device)
            except DataError as err:
                raise DataError(f"a chunk of {self.description}: {err}") from err
            yield from tensor.split(self.chunk_size)


class Scan(NamedTuple):
    """What the first pass over a source found.

    Attributes:
        num_rows: rows in the source.
        dim: columns.
        sample: a uniform reservoir sample of at most ``reservoir_size`` rows (the whole
            data, in order, when it has no more rows than that).
    """

    num_rows: int
    dim: int
    sample: torch.Tensor


def _part(num_rows: int, part: tuple[int, int] | None) -> range:
    """Rows ``[r N / W, (r + 1) N / W)`` of ``num_rows`` for ``part = (r, W)`` (all: ``None``)."""
    if part is None:
        return range(num_rows)
    rank, world_size = part
    return range(rank * num_rows // world_size, (rank + 1) * num_rows // world_size)


def _read_rows(
    path: str,
    offset: int,
    shape: tuple[int, int],
    dtype: np.dtype,
    chunk_size: int,
    part: tuple[int, int] | None = None,
) -> Iterator[np.ndarray]:
    """Row-major ``shape`` rows of ``dtype`` stored at ``offset`` of ``path`` (rank
    ``r``'s share of ``W`` for ``part = (r, W)``), by plain reads of ``chunk_size`` rows:
    unlike a memory map, the pages read do not stay in the process's resident memory."""
    row_bytes = shape[1] * dtype.itemsize
    selected = _part(shape[0], part)
    with open(path, "rb") as file:
        file.seek(offset + selected.start * row_bytes)
        for start in range(selected.start, selected.stop, chunk_size):
            rows = min(chunk_size, selected.stop - start)
            buffer = bytearray(rows * row_bytes)  # writable, unlike bytes
            if file.readinto(buffer) != rows * row_bytes:
                raise DataError(f"{path!r} is truncated: expected {shape[0]} rows")
            yield np.frombuffer(buffer, dtype=dtype).reshape(rows, shape[1])


def _npy_reader(
    path: str, chunk_size: int, part: tuple[int, int] | None = None
) -> Callable[[], Iterator[np.ndarray]]:
    def read() -> Iterator[np.ndarray]:
        with open(path, "rb") as file:
            version = np.lib.format.read_magic(file)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(file)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(file)
            plain = version in ((1, 0), (2, 0)) and not fortran and not dtype.hasobject
            offset = file.tell()
        if plain and len(shape) == 2:
            yield from _read_rows(path, offset, shape, dtype, chunk_size, part)
        else:
            # Column-major or unusual files: through a memory map.
            array = np.load(path, mmap_mode="r")
            rows = _part(array.shape[0], part)
            yield from _array_chunks(array[rows.start : rows.stop], chunk_size, repr(path))

    return read


def _memmap_reader(
    array: np.memmap, chunk_size: int, part: tuple[int, int] | None = None
) -> Callable[[], Iterator[np.ndarray]]:
    """A whole, row-major memmap is read from its file (pages do not stay resident);
    a view of one (a slice) through the mapping."""
    whole = isinstance(array.base, mmap.mmap) and array.flags.c_contiguous
    filename = getattr(array, "filename", None)

    def read() -> Iterator[np.ndarray]:
        if whole and filename is not None and array.ndim == 2:
            if array.mode != "r":
                array.flush()
            shape = (int(array.shape[0]), int(array.shape[1]))
            yield from _read_rows(filename, int(array.offset), shape, array.dtype, chunk_size, part)
        else:
            rows = _part(array.shape[0], part)
            yield from _array_chunks(array[rows.start : rows.stop], chunk_size, "the memmap")

    return read


def _array_chunks(array: np.ndarray, chunk_size: int, what: str) -> Iterator[np.ndarray]:
    if array.ndim != 2:
        raise DataError(
            f"{what} must hold a two-dimensional (num_data, dim) array; got shape {array.shape}"
        )
    for start in range(0, array.shape[0], chunk_size):
        # A copy of the rows: the mapped pages are released once the chunk is used.
        yield np.array(array[start : start + chunk_size])


def _csv_reader(path: str, chunk_size: int) -> Callable[[], Iterator[np.ndarray]]:
    def read() -> Iterator[np.ndarray]:
        import pandas as pd

        with pd.read_csv(path, chunksize=chunk_size) as reader:
            for frame in reader:
                numeric = frame.select_dtypes(include="number")
                if numeric.shape[1] != frame.shape[1]:
                    bad = [c for c in frame.columns if c not in numeric.columns]
                    raise DataError(
                        f"{path!r}: column(s) {bad} are not numeric; drop them from the file "
                        "or pass the numeric columns as an array"
                    )
                yield frame.to_numpy()

    return read


def _pyarrow_parquet(path: str) -> Any:
    """``pyarrow.parquet``, or a :class:`DataError` saying how to get it."""
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise DataError(
            f"reading {path!r} needs pyarrow, which is not installed: pip install pyarrow "
            "(or convert the file to .npy or .csv)"
        ) from err
    return pq


def _parquet_reader(
    path: str, chunk_size: int, row_groups: list[int] | None = None
) -> Callable[[], Iterator[np.ndarray]]:
    """The record batches of a Parquet file (of ``row_groups`` alone when given)."""
    pq = _pyarrow_parquet(path)

    def read() -> Iterator[np.ndarray]:
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=chunk_size, row_groups=row_groups):
            yield np.column_stack([column.to_numpy() for column in batch.columns])

    return read


def _row_groups_shard(
    paths: list[str], chunk_size: int, rank: int, world_size: int
) -> Callable[[], Iterator[np.ndarray]] | None:
    """Rank ``rank``'s consecutive row groups ``[r G / W, (r + 1) G / W)`` of the ``G``
    row groups of Parquet files, in order (``None`` when ``G < W``)."""
    units = [
        (path, group)
        for path in paths
        for group in range(_pyarrow_parquet(path).ParquetFile(path).num_row_groups)
    ]
    if len(units) < world_size:
        return None
    part = _part(len(units), (rank, world_size))
    mine = units[part.start : part.stop]
    readers = [
        _parquet_reader(path, chunk_size, [group for name, group in mine if name == path])
        for path in dict.fromkeys(name for name, _ in mine)
    ]

    def read() -> Iterator[np.ndarray]:
        for reader in readers:
            yield from reader()

    return read


def _file_reader(path: str, chunk_size: int) -> Callable[[], Iterator[np.ndarray]]:
    suffix = os.path.splitext(path)[1].lower()
    if not os.path.isfile(path):
        raise DataError(f"data file {path!r} does not exist")
    if suffix == ".npy":
        return _npy_reader(path, chunk_size)
    if suffix == ".csv":
        return _csv_reader(path, chunk_size)
    if suffix == ".parquet":
        return _parquet_reader(path, chunk_size)
    raise DataError(
        f"data file {path!r}: pyroem reads {', '.join(_SUFFIXES)} files; convert it to one "
        "of them, or load it and pass the array"
    )


def _files_reader(paths: list[str], chunk_size: int) -> Callable[[], Iterator[np.ndarray]]:
    readers = [_file_reader(path, chunk_size) for path in paths]

    def read() -> Iterator[np.ndarray]:
        for reader in readers:
            yield from reader()

    return read


def _files_source(paths: list[str], description: str, chunk_size: int) -> ChunkSource:
    """The files in turn; a rank's shard: consecutive files (when there are enough), or
    consecutive row groups of fewer Parquet files."""
    if len(paths) == 1 and os.path.splitext(paths[0])[1].lower() == ".npy":
        return _npy_source(paths[0], description, chunk_size)

    def shards(rank: int, world_size: int) -> Callable[[], Iterator[np.ndarray]] | None:
        if len(paths) < world_size:
            parquet = all(os.path.splitext(path)[1].lower() == ".parquet" for path in paths)
            return _row_groups_shard(paths, chunk_size, rank, world_size) if parquet else None
        files = _part(len(paths), (rank, world_size))
        return _files_reader(paths[files.start : files.stop], chunk_size)

    return ChunkSource(_files_reader(paths, chunk_size), description, chunk_size, shards=shards)


def _npy_source(path: str, description: str, chunk_size: int) -> ChunkSource:
    """One ``.npy`` file; a rank's shard: its rows."""
    _file_reader(path, chunk_size)  # checks the file exists

    def shards(rank: int, world_size: int) -> Callable[[], Iterator[np.ndarray]]:
        return _npy_reader(path, chunk_size, (rank, world_size))

    return ChunkSource(_npy_reader(path, chunk_size), description, chunk_size, shards=shards)


def _is_path(value: Any) -> bool:
    return isinstance(value, str | os.PathLike)


def open_source(data: Any, chunk_size: int) -> ChunkSource | None:
    """The :class:`ChunkSource` for ``data``, or ``None`` when ``data`` is held in memory
    (an array, tensor, DataFrame or nested lists: the ordinary path).

    Raises:
        DataError: a path that does not exist or is of an unknown kind, a glob that
            matches nothing, or a one-shot iterator.
    """
    if isinstance(data, np.memmap):
        array = data
        return ChunkSource(
            _memmap_reader(array, chunk_size),
            "the memmap",
            chunk_size,
            shards=lambda rank, size: _memmap_reader(array, chunk_size, (rank, size)),
        )
    if _is_path(data):
        path = os.fspath(data)
        if os.path.isdir(path):
            paths = sorted(
                os.path.join(path, name)
                for name in os.listdir(path)
                if os.path.splitext(name)[1].lower() in _SUFFIXES
            )
            if not paths:
                raise DataError(f"the folder {path!r} holds no {', '.join(_SUFFIXES)} file")
            return _files_source(paths, repr(path), chunk_size)
        if glob.has_magic(path):
            paths = sorted(glob.glob(path))
            if not paths:
                raise DataError(f"no file matches {path!r}")
            return _files_source(paths, repr(path), chunk_size)
        return _files_source([path], repr(path), chunk_size)
    if isinstance(data, list | tuple) and data and all(_is_path(item) for item in data):
        paths = [os.fspath(item) for item in data]
        return _files_source(paths, "the list of files", chunk_size)
    if isinstance(data, torch.utils.data.DataLoader):
        loader = data
        return ChunkSource(lambda: iter(loader), "the DataLoader", chunk_size)
    if isinstance(data, Iterator):
        raise DataError(
            "data is an iterator (e.g. a generator), which can be read only once, but EM "
            "reads the data once per iteration; pass a function returning a fresh iterator "
            "(e.g. lambda: read_chunks(path)) instead"
        )
    if callable(data) and not isinstance(data, torch.Tensor | np.ndarray):
        return ChunkSource(data, "the data function", chunk_size)
    return None


def scan(
    source: ChunkSource, validate: Callable[[torch.Tensor], None], reservoir_size: int, seed: int
) -> Scan:
    """One pass over ``source``: validate each chunk, count rows, check the dimension,
    and draw a uniform reservoir sample of at most ``reservoir_size`` rows.

    Args:
        source: the chunks.
        validate: raises :class:`DataError` for a chunk outside the model's support.
        reservoir_size: most rows kept.
        seed: seed of the sample's draws.

    Raises:
        DataError: an empty source, chunks of different widths, or a chunk ``validate``
            refuses.
    """
    rng = np.random.default_rng(seed)
    reservoir: np.ndarray | None = None
    seen = 0
    dim = None
    for chunk in source:
        if dim is None:
            dim = chunk.shape[1]
        elif chunk.shape[1] != dim:
            raise DataError(
                f"{source.description}: a chunk has {chunk.shape[1]} columns, earlier ones "
                f"{dim}; every chunk must have the same columns"
            )
        try:
            validate(chunk)
        except DataError as err:
            raise DataError(f"rows {seen}-{seen + chunk.shape[0] - 1}: {err}") from err
        rows = chunk.cpu().numpy()
        if reservoir is None:
            reservoir = np.empty((reservoir_size, dim), dtype=rows.dtype)
        # Algorithm R: the first reservoir_size rows fill it in order; row i after that
        # replaces slot j ~ Uniform{0..i} when j < reservoir_size (a later row wins a slot
        # drawn twice, as in the sequential algorithm).
        fill = min(max(reservoir_size - seen, 0), rows.shape[0])
        reservoir[seen : seen + fill] = rows[:fill]
        rest = rows[fill:]
        if rest.shape[0]:
            index = np.arange(seen + fill, seen + rows.shape[0])
            slots = (rng.random(rest.shape[0]) * (index + 1)).astype(np.int64)
            keep = slots < reservoir_size
            reservoir[slots[keep]] = rest[keep]
        seen += rows.shape[0]
    if reservoir is None or dim is None:
        raise DataError(f"{source.description} holds no data")
    sample = torch.as_tensor(reservoir[: min(seen, reservoir_size)]).to(
        dtype=source.dtype, device=source.device
    )
    return Scan(seen, dim, sample)
