"""The scores reader: the dataset, its row count, and the score columns held or streamed alike."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayanom.config import UserError
from rayanom.scores import count_rows, open_scores, read_score_columns, stream_score_columns


def _scores(path, n=40, parts=4):
    """A scores directory: a null score and a failed row, labels, a val split, and a hidden directory beside it."""
    os.makedirs(os.path.join(path, "_rayanom_val"))
    labels = np.arange(n) % 2
    error = [None] * n
    error[3] = "OSError: gone"
    table = pa.table({"path": [f"/x/{i}.png" for i in range(n)], "label": labels,
                      "split": ["val" if i % 4 == 0 else "test" for i in range(n)], "row_index": np.arange(n),
                      "anomaly_score": pa.array(np.linspace(-1, 1, n), mask=np.arange(n) == 7),
                      "error": pa.array(error, pa.string()), "defect_type": ["good", "scratch"] * (n // 2)})
    per = n // parts
    for k in range(parts):
        pq.write_table(table.slice(k * per, per), os.path.join(path, f"part-{k:08d}.parquet"))
    pq.write_table(table, os.path.join(path, "_rayanom_val", "part-00000000.parquet"))  # not part of the dataset
    return table


def test_read_and_stream_agree(tmp_path):
    table = _scores(str(tmp_path))
    dataset = open_scores(str(tmp_path))
    assert count_rows(dataset) == table.num_rows
    cols = read_score_columns(str(tmp_path))
    ok = np.ones(table.num_rows, bool)
    ok[[3, 7]] = False
    assert cols["ok"].tolist() == ok.tolist() and np.isnan(cols["scores"][7])
    assert cols["labels"].tolist() == table.column("label").to_pylist()
    assert cols["val"].tolist() == [s == "val" for s in table.column("split").to_pylist()]
    codes, names = cols["defects"]
    assert [names[c] for c in codes] == table.column("defect_type").to_pylist()
    streamed = list(stream_score_columns(dataset, with_labels=True))
    for key in ("scores", "ok", "labels", "val"):
        np.testing.assert_array_equal(np.concatenate([b[key] for b in streamed]), cols[key])
    val = read_score_columns(str(tmp_path), only_val=True)
    assert val["val"].all() and val["scores"].size == int(cols["val"].sum())


def test_labels_are_checked_where_required(tmp_path):
    table = _scores(str(tmp_path / "s"))
    bad = table.set_column(1, "label", pa.array([2] * table.num_rows))
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="allowed values are 0 and 1"):
        read_score_columns(str(tmp_path / "bad.parquet"))
    assert read_score_columns(str(tmp_path / "bad.parquet"), require_labels=False)["labels"] is None


def test_a_directory_that_is_no_scores_is_refused_when_checked(tmp_path):
    pq.write_table(pa.table({"x": [1]}), tmp_path / "a.parquet")
    with pytest.raises(UserError, match="no \\['anomaly_score', 'path'\\] column"):
        open_scores(str(tmp_path), checked=True)
