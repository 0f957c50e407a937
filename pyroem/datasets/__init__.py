"""Small bundled data sets for examples and tests, and a CSV reader for user data.

The bundled files are compact, cleaned copies of classic R data sets (see
``SOURCES.md`` next to this module for origins, citations, licence notes and the
transformations applied). Each loader returns a :class:`Dataset` whose ``data``
is the ``(num_data, dim)`` float64 matrix a mixture model is fitted to::

    from pyroem.datasets import load_faithful

    ds = load_faithful()
    ds.data.shape  # torch.Size([272, 2])

:func:`read_csv` reads a user's numeric CSV file into the same kind of matrix
and reports problems (missing file, ragged rows, text or missing cells) as
:class:`pyroem.errors.DataError` with a one-line message naming the remedy.

Only numpy, torch and the standard library are used; files are opened through
:mod:`importlib.resources`, so loading works from an installed wheel or zip.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Sequence
from importlib import resources
from typing import NamedTuple

import numpy as np
import torch

from pyroem.errors import DataError

__all__ = [
    "Dataset",
    "available_datasets",
    "load_airquality",
    "load_dataset",
    "load_discoveries",
    "load_faithful",
    "load_iris",
    "load_sleepstudy",
    "load_verbagg",
    "read_csv",
]

#: Cell values (compared after stripping whitespace and lower-casing) that mean "missing".
_MISSING = frozenset({"", "na", "nan"})

#: Response coding of the wide VerbAgg file (lme4's ordered factor ``resp``).
_VERBAGG_LEVELS = ("no", "perhaps", "yes")
_VERBAGG_KINDS = ("binary", "categorical")


class Dataset(NamedTuple):
    """A bundled data set, ready to fit.

    Attributes:
        data: The matrix a mixture is fitted to, shape ``(num_data, dim)``,
            dtype ``torch.float64``.
        feature_names: ``dim`` column names, in the order of ``data``'s columns.
        name: Short name, as accepted by :func:`load_dataset`.
        description: One paragraph: what the data are, units, and the
            component family they suit.
        source: Citation line for the original data.
        target: Integer labels of shape ``(num_data,)`` and dtype ``torch.int64``
            where the data set has them (iris species), else ``None``.
        target_names: Names of the label codes ``0..K-1`` (``target_names[k]``
            is the label coded ``k``), or ``None`` when there is no target.
    """

    data: torch.Tensor
    feature_names: tuple[str, ...]
    name: str
    description: str
    source: str
    target: torch.Tensor | None
    target_names: tuple[str, ...] | None


# ----------------------------------------------------------------------------
# Bundled files
# ----------------------------------------------------------------------------


def _read_resource(filename: str) -> tuple[list[str], list[list[str]]]:
    """Read a bundled CSV file into its header and its rows of strings.

    Args:
        filename: File name inside the ``pyroem.datasets`` package.

    Returns:
        ``(header, rows)``: the column names and one list of cells per data row.
    """
    text = resources.files(__name__).joinpath(filename).read_text(encoding="utf-8")
    # The bundled files have no quoted line breaks, so splitting on lines is safe.
    rows = [row for row in csv.reader(text.splitlines()) if row]
    return rows[0], rows[1:]


def _codes(labels: list[str]) -> tuple[torch.Tensor, tuple[str, ...]]:
    """Integer codes of string labels, numbered in order of first appearance, and the
    labels in that order."""
    names = tuple(dict.fromkeys(labels))
    code = {label: k for k, label in enumerate(names)}
    return torch.tensor([code[label] for label in labels], dtype=torch.int64), names


def _cell_value(cell: str) -> float:
    """A trusted cell's number; NaN for a missing one (``NA``)."""
    return math.nan if cell.strip().lower() in _MISSING else float(cell)


def _columns_as_tensor(
    header: Sequence[str], rows: Sequence[Sequence[str]], names: Sequence[str]
) -> torch.Tensor:
    """Convert the named columns of trusted rows into a float64 matrix.

    Args:
        header: Column names of ``rows``.
        rows: Rows of cells (strings).
        names: Columns to take, in order.

    Returns:
        Tensor of shape ``(len(rows), len(names))``, dtype ``torch.float64``.
    """
    index = [header.index(n) for n in names]
    array = np.array([[_cell_value(row[j]) for j in index] for row in rows], dtype=np.float64)
    return torch.from_numpy(array.reshape(len(rows), len(names)))


def load_faithful() -> Dataset:
    """Load the Old Faithful geyser data.

    Returns:
        A :class:`Dataset` with ``data`` of shape ``(272, 2)`` (columns
        ``eruptions`` and ``waiting``, both in minutes) and no target.
    """
    header, rows = _read_resource("faithful.csv")
    names = ("eruptions", "waiting")
    return Dataset(
        data=_columns_as_tensor(header, rows, names),
        feature_names=names,
        name="faithful",
        description=(
            "Old Faithful geyser, Yellowstone National Park, USA: 272 eruptions, each with "
            "the eruption duration 'eruptions' (minutes; heavily rounded from seconds) and "
            "the waiting time to the next eruption 'waiting' (minutes). The joint "
            "distribution has two clear clusters (short and long eruptions), the textbook "
            "case for a two-component mixture of multivariate normals (family 'gaussian')."
        ),
        source=(
            "Härdle, W. (1991) Smoothing Techniques with Implementation in S. Springer; "
            "see also Azzalini, A. and Bowman, A. W. (1990) A look at some data on the Old "
            "Faithful geyser. Applied Statistics 39, 357-365. Via R package 'datasets'."
        ),
        target=None,
        target_names=None,
    )


def load_iris() -> Dataset:
    """Load Fisher's (Anderson's) iris measurements.

    Returns:
        A :class:`Dataset` with ``data`` of shape ``(150, 4)`` (sepal length,
        sepal width, petal length, petal width, in centimetres), ``target`` of
        shape ``(150,)`` with species codes 0, 1, 2 and ``target_names``
        ``("setosa", "versicolor", "virginica")``.
    """
    header, rows = _read_resource("iris.csv")
    names = ("sepal_length", "sepal_width", "petal_length", "petal_width")
    j = header.index("species")
    species = [row[j] for row in rows]
    target, target_names = _codes(species)
    return Dataset(
        data=_columns_as_tensor(header, rows, names),
        feature_names=names,
        name="iris",
        description=(
            "Fisher's or Anderson's iris data: sepal length, sepal width, petal length and "
            "petal width (centimetres) of 150 flowers, 50 from each of three species (Iris "
            "setosa, versicolor and virginica; the species codes are in 'target'). Setosa "
            "separates cleanly, versicolor and virginica overlap: a standard test for "
            "mixtures of multivariate normals with full covariances (family 'gaussian')."
        ),
        source=(
            "Fisher, R. A. (1936) The use of multiple measurements in taxonomic problems. "
            "Annals of Eugenics 7(2), 179-188; data collected by Anderson, E. (1935) The "
            "irises of the Gaspe Peninsula. Bulletin of the American Iris Society 59, 2-5. "
            "Via R package 'datasets'."
        ),
        target=target,
        target_names=target_names,
    )


def load_discoveries() -> Dataset:
    """Load the yearly counts of great inventions and discoveries, 1860-1959.

    Returns:
        A :class:`Dataset` with ``data`` of shape ``(100, 1)`` holding the
        non-negative integer count for each year (as float64) and no target.
        Row ``i`` is the year ``1860 + i``.
    """
    header, rows = _read_resource("discoveries.csv")
    names = ("discoveries",)
    return Dataset(
        data=_columns_as_tensor(header, rows, names),
        feature_names=names,
        name="discoveries",
        description=(
            "Numbers of 'great' inventions and scientific discoveries in each year from "
            "1860 to 1959 (100 yearly counts; row i is the year 1860 + i). The counts are "
            "overdispersed relative to a single Poisson, a small example for mixtures of "
            "Poisson distributions (family 'poisson')."
        ),
        source=(
            "The World Almanac and Book of Facts, 1975 Edition, pages 315-318; McNeil, D. R. "
            "(1977) Interactive Data Analysis. Wiley. Via R package 'datasets'."
        ),
        target=None,
        target_names=None,
    )


def load_verbagg(kind: str = "binary") -> Dataset:
    """Load the verbal-aggression item responses, one row per respondent.

    Args:
        kind: ``"binary"`` for 1 where the answer was "perhaps" or "yes"
            (lme4's ``r2 == "Y"``) and 0 for "no"; ``"categorical"`` for the
            codes 0, 1, 2 meaning "no", "perhaps", "yes".

    Returns:
        A :class:`Dataset` with ``data`` of shape ``(316, 24)`` (respondents by
        items, items named and ordered as in R) and no target.

    Raises:
        DataError: If ``kind`` is not one of ``"binary"`` and ``"categorical"``.
    """
    if kind not in _VERBAGG_KINDS:
        raise DataError(
            f"unknown VerbAgg kind {kind!r}; valid kinds: "
            + ", ".join(repr(k) for k in _VERBAGG_KINDS)
        )
    header, rows = _read_resource("verbagg.csv")
    names = tuple(header[header.index("Gender") + 1 :])
    codes = _columns_as_tensor(header, rows, names)
    common = (
        "Verbal aggression questionnaire: 316 respondents (rows) each answered 24 items "
        "(columns) of the form 'in situation S1-S4 I would want to / would do curse, scold "
        "or shout'. Gender and the Trait Anger score of each respondent are kept in "
        "verbagg.csv but are not part of 'data'. "
    )
    if kind == "binary":
        data = (codes > 0).to(torch.float64)
        description = common + (
            "Cells are 1 where the answer was 'perhaps' or 'yes' and 0 for 'no' (lme4's "
            "dichotomous r2): a latent-class example for mixtures of independent Bernoulli "
            "variables (family 'bernoulli')."
        )
    else:
        data = codes
        description = common + (
            "Cells are the ordered answers coded 0 = no, 1 = perhaps, 2 = yes: a latent-class "
            "example for mixtures of independent categorical variables with three levels "
            "(family 'categorical')."
        )
    return Dataset(
        data=data,
        feature_names=names,
        name="verbagg",
        description=description,
        source=(
            "De Boeck, P. and Wilson, M. (eds.) (2004) Explanatory Item Response Models: A "
            "Generalized Linear and Nonlinear Approach. Springer. Via R package 'lme4' "
            "(VerbAgg)."
        ),
        target=None,
        target_names=None,
    )


def load_sleepstudy() -> Dataset:
    """Load the reaction times of 18 subjects over ten days of sleep deprivation.

    Returns:
        A :class:`Dataset` with ``data`` of shape ``(180, 2)`` (``Reaction``, the mean
        reaction time in milliseconds, and ``Days`` of sleep deprivation, 0-9), one row
        per subject and day, rows grouped by subject; ``target`` of shape ``(180,)``
        with the subject's code 0-17 and ``target_names`` the subjects' numbers in the
        study (``"308"``, ``"309"``, ...), in order of first appearance.
    """
    header, rows = _read_resource("sleepstudy.csv")
    names = ("Reaction", "Days")
    j = header.index("Subject")
    subjects = [row[j] for row in rows]
    target, target_names = _codes(subjects)
    return Dataset(
        data=_columns_as_tensor(header, rows, names),
        feature_names=names,
        name="sleepstudy",
        description=(
            "Average reaction time per day (milliseconds) of 18 truck drivers restricted to "
            "three hours of sleep per night, on days 0-9 of the study (180 rows; the "
            "subject codes are in 'target'). Reaction time grows roughly linearly with the "
            "days of deprivation, with an intercept and a slope of its own for each subject: "
            "the standard example for linear mixed-effects models with a random intercept "
            "and slope (models/mixed_effects.py)."
        ),
        source=(
            "Belenky, G. et al. (2003) Patterns of performance degradation and restoration "
            "during sleep restriction and subsequent recovery: a sleep dose-response study. "
            "Journal of Sleep Research 12, 1-12. Via R package 'lme4' (sleepstudy)."
        ),
        target=target,
        target_names=target_names,
    )


_MONTHS = ("May", "June", "July", "August", "September")


def load_airquality() -> Dataset:
    """Load the New York air quality measurements of May to September 1973, with their
    missing values.

    Returns:
        A :class:`Dataset` with ``data`` of shape ``(153, 4)`` (``Ozone`` in parts per
        billion, ``Solar.R`` solar radiation in Langleys, ``Wind`` in miles per hour,
        ``Temp`` in degrees Fahrenheit), NaN where a value is missing (37 ozone and 7
        solar radiation readings, 42 rows with at least one); ``target`` of shape
        ``(153,)`` with the month's code 0-4 and ``target_names``
        ``("May", "June", "July", "August", "September")``.
    """
    header, rows = _read_resource("airquality.csv")
    names = ("Ozone", "Solar.R", "Wind", "Temp")
    j = header.index("Month")
    target = torch.tensor([int(row[j]) - 5 for row in rows], dtype=torch.int64)
    return Dataset(
        data=_columns_as_tensor(header, rows, names),
        feature_names=names,
        name="airquality",
        description=(
            "Daily air quality in New York, 1 May to 30 September 1973 (153 days): mean "
            "ozone 'Ozone' (ppb, 13:00-15:00, Roosevelt Island), solar radiation 'Solar.R' "
            "(Langleys, 08:00-12:00, Central Park), average wind speed 'Wind' (mph) and "
            "maximum temperature 'Temp' (degrees F, both LaGuardia Airport); the month's "
            "code is in 'target'. 37 ozone and 7 solar radiation readings are missing "
            "(NaN): an example for mixtures of multivariate normals fitted with missing "
            "values marginalised (family 'gaussian', method 'map-em')."
        ),
        source=(
            "New York State Department of Conservation (ozone) and the National Weather "
            "Service (meteorological data); Chambers, J. M., Cleveland, W. S., Kleiner, B. "
            "and Tukey, P. A. (1983) Graphical Methods for Data Analysis. Wadsworth. Via R "
            "package 'datasets'."
        ),
        target=target,
        target_names=_MONTHS,
    )


_LOADERS: dict[str, Callable[[], Dataset]] = {
    "faithful": load_faithful,
    "iris": load_iris,
    "discoveries": load_discoveries,
    "verbagg": load_verbagg,
    "sleepstudy": load_sleepstudy,
    "airquality": load_airquality,
}


def available_datasets() -> tuple[str, ...]:
    """Name the bundled data sets.

    Returns:
        The names accepted by :func:`load_dataset`:
        ``("faithful", "iris", "discoveries", "verbagg", "sleepstudy", "airquality")``.
    """
    return tuple(_LOADERS)


def load_dataset(name: str) -> Dataset:
    """Load a bundled data set by name.

    Args:
        name: One of :func:`available_datasets` (case-insensitive). ``"verbagg"``
            gives the binary kind; call :func:`load_verbagg` for the other.

    Returns:
        The :class:`Dataset`, with ``Dataset.name == name.lower()``.

    Raises:
        DataError: If ``name`` is not a bundled data set.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    loader = _LOADERS.get(key) if isinstance(key, str) else None
    if loader is None:
        raise DataError(f"unknown data set {name!r}; available data sets: " + ", ".join(_LOADERS))
    return loader()


# ----------------------------------------------------------------------------
# User CSV files
# ----------------------------------------------------------------------------


def _show(cell: str, limit: int = 40) -> str:
    """Quote a cell for a one-line message, shortening long cells."""
    if len(cell) > limit:
        cell = cell[: limit - 3] + "..."
    return repr(cell)


def read_csv(
    path: str | os.PathLike[str], columns: Sequence[str] | None = None
) -> tuple[torch.Tensor, tuple[str, ...]]:
    """Read a numeric CSV file with a header row into a float64 matrix.

    The first row must name the columns. A leading column with an empty name
    (the row index R's ``write.csv`` and pandas' ``to_csv`` write) is dropped.
    Blank lines are skipped. Only the selected columns need to be numeric.
    Rows are numbered from 1 at the first data row in error messages (the file
    line is given too).

    Args:
        path: The CSV file (UTF-8, comma-separated, optional BOM).
        columns: Names of the columns to return, in that order; ``None`` for
            all columns. A single string selects one column.

    Returns:
        ``(data, names)``: a tensor of shape ``(num_rows, num_cols)``, dtype
        ``torch.float64``, and the ``num_cols`` column names of its columns.

    Raises:
        DataError: With a one-line message naming the file and the remedy, if
            the file cannot be read, is empty or has no data rows, a row has a
            different number of fields from the header, the header has an
            unnamed or repeated column, a selected column does not exist, or a
            selected cell is missing (empty, ``NA`` or ``nan``), not a number,
            or not finite.
    """
    where = os.fspath(path)
    try:
        with open(where, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            lines: list[tuple[int, list[str]]] = []
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line
                lines.append((reader.line_num, row))
    except FileNotFoundError:
        raise DataError(f"cannot read {where}: no such file; check the path") from None
    except IsADirectoryError:
        raise DataError(f"cannot read {where}: it is a directory; pass a CSV file") from None
    except UnicodeDecodeError:
        raise DataError(f"cannot read {where}: not UTF-8 text; save it as a UTF-8 CSV") from None
    except (OSError, csv.Error) as exc:
        message = " ".join(str(exc).split())
        raise DataError(f"cannot read {where}: {message}; check the file is a CSV file") from None

    if not lines:
        raise DataError(
            f"{where} is empty; expected a header row naming the columns, "
            "then one row per observation"
        )
    header = [name.strip() for name in lines[0][1]]
    body = lines[1:]
    if not body:
        raise DataError(f"{where} has a header row but no data rows; add one row per observation")

    # Drop a leading unnamed (R-style) row-index column.
    offset = 1 if len(header) > 1 and header[0] == "" else 0
    names = header[offset:]
    for j, name in enumerate(names):
        if not name:
            raise DataError(
                f"{where}: header column {j + 1 + offset} has no name; "
                "name every column in the header row"
            )
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError(
                f"{where}: the header names column {name!r} more than once; "
                "give the columns distinct names"
            )
        seen.add(name)

    for n, (line, row) in enumerate(body, start=1):
        if len(row) != len(header):
            raise DataError(
                f"{where}: row {n} (line {line}) has {len(row)} fields but the header has "
                f"{len(header)}; give every row {len(header)} comma-separated fields"
            )

    if columns is None:
        selected = list(names)
    else:
        selected = [columns] if isinstance(columns, str) else list(columns)
        if not selected:
            raise DataError(f"{where}: no columns selected; select at least one column by name")
        available = ", ".join(repr(name) for name in names)
        for name in selected:
            if name not in seen:
                raise DataError(
                    f"{where}: no column named {name!r}; available columns: {available}"
                )
    index = [offset + names.index(name) for name in selected]

    values = np.empty((len(body), len(selected)), dtype=np.float64)
    for n, (line, row) in enumerate(body, start=1):
        for k, (name, j) in enumerate(zip(selected, index, strict=True)):
            cell = row[j].strip()
            if cell.lower() in _MISSING:
                raise DataError(
                    f"{where}: row {n} (line {line}) column {name!r} is missing "
                    f"({_show(row[j])}); drop or impute missing values"
                )
            try:
                value = float(cell)
            except ValueError:
                raise DataError(
                    f"{where}: column {name!r} row {n} (line {line}) holds {_show(row[j])}; "
                    "select numeric columns with --columns"
                ) from None
            if not math.isfinite(value):
                raise DataError(
                    f"{where}: row {n} (line {line}) column {name!r} holds {_show(row[j])}; "
                    "values must be finite numbers"
                )
            values[n - 1, k] = value
    return torch.from_numpy(values), tuple(selected)
