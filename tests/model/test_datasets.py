"""Tests for pyroem.datasets: the bundled data sets and the user CSV reader."""

from __future__ import annotations

import csv
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from pyroem.datasets import (
    Dataset,
    available_datasets,
    load_dataset,
    load_discoveries,
    load_faithful,
    load_iris,
    load_verbagg,
    read_csv,
)
from pyroem.errors import DataError

# ----------------------------------------------------------------------------
# Bundled data sets
# ----------------------------------------------------------------------------


def _check_common(ds: Dataset, shape: tuple[int, int]) -> None:
    assert isinstance(ds, Dataset)
    assert ds.data.shape == shape
    assert ds.data.dtype == torch.float64
    assert torch.isfinite(ds.data).all()
    assert len(ds.feature_names) == shape[1]
    assert all(isinstance(n, str) and n for n in ds.feature_names)
    assert ds.description and "\n" not in ds.description
    assert ds.source
    if ds.target is None:
        assert ds.target_names is None
    else:
        assert ds.target_names is not None
        assert ds.target.shape == (shape[0],)
        assert ds.target.dtype == torch.int64


def test_faithful() -> None:
    ds = load_faithful()
    _check_common(ds, (272, 2))
    assert ds.name == "faithful"
    assert ds.feature_names == ("eruptions", "waiting")
    assert ds.data[0].tolist() == [3.6, 79.0]
    assert ds.data[-1].tolist() == [4.467, 74.0]
    assert ds.data[:, 1].mean().item() == pytest.approx(70.897059, abs=1e-6)
    assert ds.data[:, 0].mean().item() == pytest.approx(3.487783, abs=1e-6)
    assert ds.target is None
    assert "gaussian" in ds.description


def test_iris() -> None:
    ds = load_iris()
    _check_common(ds, (150, 4))
    assert ds.name == "iris"
    assert ds.feature_names == ("sepal_length", "sepal_width", "petal_length", "petal_width")
    assert ds.target_names == ("setosa", "versicolor", "virginica")
    assert ds.target is not None
    assert torch.bincount(ds.target).tolist() == [50, 50, 50]
    assert ds.target[0].item() == 0 and ds.target[-1].item() == 2
    assert ds.data[0].tolist() == [5.1, 3.5, 1.4, 0.2]
    assert ds.data[-1].tolist() == [5.9, 3.0, 5.1, 1.8]
    assert (ds.data > 0).all()


def test_discoveries() -> None:
    ds = load_discoveries()
    _check_common(ds, (100, 1))
    assert ds.name == "discoveries"
    assert ds.feature_names == ("discoveries",)
    counts = ds.data[:, 0]
    assert torch.equal(counts, counts.round()) and (counts >= 0).all()
    assert counts.sum().item() == 310  # sum of R's `discoveries`
    assert counts[:2].tolist() == [5.0, 3.0]
    assert counts[-1].item() == 0.0
    assert "poisson" in ds.description


def test_discoveries_file_has_years() -> None:
    with resources.as_file(resources.files("pyroem.datasets") / "discoveries.csv") as path:
        data, names = read_csv(path)
    assert names == ("year", "discoveries")
    assert data[:, 0].tolist() == list(range(1860, 1960))
    assert torch.equal(data[:, 1:], load_discoveries().data)


def test_verbagg_kinds() -> None:
    binary = load_verbagg()
    categorical = load_verbagg("categorical")
    _check_common(binary, (316, 24))
    _check_common(categorical, (316, 24))
    assert binary.name == categorical.name == "verbagg"
    assert binary.feature_names == categorical.feature_names
    assert binary.feature_names[0] == "S1WantCurse"
    assert binary.feature_names[9] == "S4wantCurse"  # R's spelling
    assert binary.feature_names[-1] == "S4DoShout"
    assert set(categorical.data.unique().tolist()) == {0.0, 1.0, 2.0}
    assert set(binary.data.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(binary.data, (categorical.data > 0).to(torch.float64))
    assert torch.equal(load_verbagg("binary").data, binary.data)
    # Response totals of lme4's VerbAgg (7584 responses).
    cat = categorical.data
    assert [(cat == k).sum().item() for k in range(3)] == [3973, 2081, 1530]
    assert binary.data.sum().item() == 3611  # number of r2 == "Y"
    assert "bernoulli" in binary.description
    assert "categorical" in categorical.description


def test_verbagg_file_keeps_covariates() -> None:
    text = resources.files("pyroem.datasets").joinpath("verbagg.csv").read_text(encoding="utf-8")
    rows = list(csv.reader(text.splitlines()))
    assert rows[0][:3] == ["id", "Anger", "Gender"]
    assert [r[0] for r in rows[1:]] == [str(i) for i in range(1, 317)]
    assert {r[2] for r in rows[1:]} == {"M", "F"}
    assert rows[1][:3] == ["1", "20", "M"]


@pytest.mark.parametrize("kind", ["", "ordinal", "Binary", "r2"])
def test_verbagg_bad_kind(kind: str) -> None:
    with pytest.raises(DataError, match=r"binary.*categorical"):
        load_verbagg(kind)


def test_available_datasets_round_trip() -> None:
    names = available_datasets()
    assert names == ("faithful", "iris", "discoveries", "verbagg", "sleepstudy", "airquality")
    for name in names:
        ds = load_dataset(name)
        assert ds.name == name
        assert ds.data.dtype == torch.float64
    assert torch.equal(load_dataset("verbagg").data, load_verbagg("binary").data)
    assert torch.equal(load_dataset("Faithful").data, load_faithful().data)


def test_load_dataset_unknown() -> None:
    with pytest.raises(DataError, match="unknown data set 'mtcars'") as info:
        load_dataset("mtcars")
    for name in available_datasets():
        assert name in str(info.value)


def test_loaders_return_fresh_tensors() -> None:
    a = load_faithful()
    a.data.zero_()
    assert load_faithful().data[0].tolist() == [3.6, 79.0]


def test_bundled_files_are_clean() -> None:
    pkg = resources.files("pyroem.datasets")
    assert pkg.joinpath("SOURCES.md").is_file()
    for name in available_datasets():
        text = pkg.joinpath(f"{name}.csv").read_text(encoding="utf-8")
        header = text.splitlines()[0].split(",")
        assert header[0] not in ("", '""')  # no R row-index column
        assert name + ".csv" in pkg.joinpath("SOURCES.md").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------
# read_csv: good files
# ----------------------------------------------------------------------------


def _write(tmp_path: Path, text: str, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_read_csv_basic(tmp_path: Path) -> None:
    path = _write(tmp_path, "a,b\n1,2\n3.5,-4e-1\n")
    data, names = read_csv(path)
    assert names == ("a", "b")
    assert data.dtype == torch.float64
    assert data.tolist() == [[1.0, 2.0], [3.5, -0.4]]
    data2, names2 = read_csv(str(path))
    assert torch.equal(data, data2) and names == names2


def test_read_csv_select_columns(tmp_path: Path) -> None:
    path = _write(tmp_path, "a,label,b\n1,x,2\n3,y,4\n")
    data, names = read_csv(path, columns=["b", "a"])
    assert names == ("b", "a")
    assert data.tolist() == [[2.0, 1.0], [4.0, 3.0]]
    data, names = read_csv(path, columns="b")
    assert names == ("b",) and data.shape == (2, 1)


def test_read_csv_drops_r_index_column(tmp_path: Path) -> None:
    path = _write(tmp_path, '"","x","y"\n"1",1.5,2\n"2",3,4\n')
    data, names = read_csv(path)
    assert names == ("x", "y")
    assert data.tolist() == [[1.5, 2.0], [3.0, 4.0]]


def test_read_csv_whitespace_bom_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeff a , b \r\n 1 , 2 \r\n\r\n3,4\r\n\r\n".encode())
    data, names = read_csv(path)
    assert names == ("a", "b")
    assert data.tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_read_csv_iris_file(tmp_path: Path) -> None:
    src = resources.files("pyroem.datasets").joinpath("iris.csv").read_text(encoding="utf-8")
    path = _write(tmp_path, src, "iris.csv")
    iris = load_iris()
    data, names = read_csv(path, columns=iris.feature_names)
    assert names == iris.feature_names
    assert torch.equal(data, iris.data)
    with pytest.raises(DataError, match=r"column 'species' row 1 .*holds 'setosa'"):
        read_csv(path)


# ----------------------------------------------------------------------------
# read_csv: error paths
# ----------------------------------------------------------------------------


def _one_line(exc: pytest.ExceptionInfo[DataError], path: Path) -> str:
    message = str(exc.value)
    assert "\n" not in message
    assert str(path) in message
    return message


def test_read_csv_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.csv"
    with pytest.raises(DataError, match="no such file") as info:
        read_csv(path)
    _one_line(info, path)


def test_read_csv_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="directory"):
        read_csv(tmp_path)


def test_read_csv_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("a,b\n1,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8") as info:
        read_csv(path)
    _one_line(info, path)


@pytest.mark.parametrize("text", ["", "\n\n", "   \n"])
def test_read_csv_empty_file(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(DataError, match="is empty") as info:
        read_csv(path)
    _one_line(info, path)


def test_read_csv_header_only(tmp_path: Path) -> None:
    path = _write(tmp_path, "a,b\n")
    with pytest.raises(DataError, match="no data rows") as info:
        read_csv(path)
    _one_line(info, path)


@pytest.mark.parametrize("bad_row", ["1,2,3", "1"])
def test_read_csv_ragged_rows(tmp_path: Path, bad_row: str) -> None:
    path = _write(tmp_path, f"a,b\n1,2\n{bad_row}\n5,6\n")
    with pytest.raises(
        DataError, match=r"row 2 \(line 3\) has \d fields but the header has 2"
    ) as info:
        read_csv(path)
    _one_line(info, path)


def test_read_csv_non_numeric(tmp_path: Path) -> None:
    path = _write(tmp_path, "a,b\n1,2\n3,abc\n")
    with pytest.raises(DataError) as info:
        read_csv(path)
    message = _one_line(info, path)
    assert "column 'b' row 2 (line 3) holds 'abc'" in message
    assert message.endswith("select numeric columns with --columns")
    # The non-numeric column can be left out.
    data, _ = read_csv(path, columns=["a"])
    assert data.tolist() == [[1.0], [3.0]]


def test_read_csv_non_numeric_cell_is_shown_on_one_line(tmp_path: Path) -> None:
    path = _write(tmp_path, 'a,b\n1,"two\nlines"\n')
    with pytest.raises(DataError, match="holds 'two\\\\nlines'") as info:
        read_csv(path)
    _one_line(info, path)


@pytest.mark.parametrize("cell", ["", "NA", "nan", "NaN", " na "])
def test_read_csv_missing_values(tmp_path: Path, cell: str) -> None:
    path = _write(tmp_path, f"a,b\n1,2\n{cell},4\n")
    with pytest.raises(DataError) as info:
        read_csv(path)
    message = _one_line(info, path)
    assert "row 2 (line 3) column 'a' is missing" in message
    assert message.endswith("drop or impute missing values")


@pytest.mark.parametrize("cell", ["inf", "-Infinity"])
def test_read_csv_non_finite(tmp_path: Path, cell: str) -> None:
    path = _write(tmp_path, f"a\n1\n{cell}\n")
    with pytest.raises(DataError, match="finite") as info:
        read_csv(path)
    _one_line(info, path)


def test_read_csv_unknown_column(tmp_path: Path) -> None:
    path = _write(tmp_path, '"",a,b\n1,1,2\n')
    with pytest.raises(DataError) as info:
        read_csv(path, columns=["a", "c"])
    message = _one_line(info, path)
    assert "no column named 'c'" in message
    assert "available columns: 'a', 'b'" in message


def test_read_csv_no_columns_selected(tmp_path: Path) -> None:
    path = _write(tmp_path, "a,b\n1,2\n")
    with pytest.raises(DataError, match="no columns selected"):
        read_csv(path, columns=[])


def test_read_csv_unnamed_column(tmp_path: Path) -> None:
    path = _write(tmp_path, "a,,b\n1,2,3\n")
    with pytest.raises(DataError, match="header column 2 has no name") as info:
        read_csv(path)
    _one_line(info, path)


def test_read_csv_duplicate_column(tmp_path: Path) -> None:
    path = _write(tmp_path, "a,b,a\n1,2,3\n")
    with pytest.raises(DataError, match="'a' more than once") as info:
        read_csv(path)
    _one_line(info, path)


def test_data_error_is_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        read_csv(tmp_path / "missing.csv")


def test_airquality_keeps_its_missing_values() -> None:
    ds = load_dataset("airquality")
    assert ds.data.shape == (153, 4)
    assert ds.feature_names == ("Ozone", "Solar.R", "Wind", "Temp")
    missing = torch.isnan(ds.data)
    assert missing.sum(0).tolist() == [37, 7, 0, 0]
    assert int(missing.any(1).sum()) == 42
    assert ds.data[0].tolist() == [41.0, 190.0, 7.4, 67.0]
    # R: colMeans(airquality[1:4], na.rm = TRUE)
    np.testing.assert_allclose(
        ds.data.nanmean(0).numpy(), [42.12931, 185.9315, 9.957516, 77.88235], rtol=1e-6
    )
    assert ds.target is not None and ds.target_names is not None
    assert torch.bincount(ds.target).tolist() == [31, 30, 31, 31, 30]
    assert ds.target_names[ds.target[0]] == "May"
