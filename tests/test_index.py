"""The index from its footers: row offsets equal pyarrow's read order, schema checks, label checks on workers, and a
resume refused when a middle file changed (naming how many parts it touches)."""

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayanom.columns import ROW_COL
from rayanom.config import UserError
from rayanom.index import (
    describe_index, index_value_errors, read_index, read_rows, training_rows, validate_index, with_row_index,
)
from rayanom.parts import AUTO_PARTS, AUTO_ROWS, open_parts, part_name, rows_per_part

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _table(start, n):
    return pa.table({"path": [f"img-{i}.png" for i in range(start, start + n)],
                     "label": pa.array(np.zeros(n, dtype=np.int64))})


def _index_dir(tmp_path):
    """Four files (pyarrow reads them sorted by name): several row groups, an empty file, a parquet file without the
    .parquet suffix; plus names pyarrow ignores."""
    root = tmp_path / "idx"
    root.mkdir()
    pq.write_table(_table(0, 10), root / "a.parquet", row_group_size=3)  # row groups of 3, 3, 3, 1
    pq.write_table(_table(10, 0), root / "b.parquet")
    pq.write_table(_table(10, 7), root / "c-no-suffix", row_group_size=4)
    pq.write_table(_table(17, 5), root / "d.parquet")
    (root / "_SUCCESS").write_text("")
    (root / ".hidden.parquet").write_text("not parquet")
    return str(root)


def test_row_offsets_from_footers_follow_read_table_order(tmp_path):
    root = _index_dir(tmp_path)
    info = describe_index(root)
    whole = pq.read_table(root)
    assert info.n_rows == whole.num_rows == 22
    assert [os.path.basename(f) for f in info.files] == ["a.parquet", "b.parquet", "c-no-suffix", "d.parquet"]
    for start, stop in [(0, 22), (0, 1), (2, 4), (3, 12), (9, 11), (10, 17), (16, 18), (21, 22), (5, 5)]:
        got = read_rows(info, start, stop)
        assert got.column(ROW_COL).to_pylist() == list(range(start, stop))
        assert got.drop_columns([ROW_COL]).equals(whole.slice(start, stop - start)), (start, stop)
    single = describe_index(os.path.join(root, "a.parquet"))
    assert read_rows(single, 0, 10).column("path").to_pylist() == [f"img-{i}.png" for i in range(10)]


@pytest.mark.parametrize("table,message", [
    (pa.table({"file": ["a"]}), "required column 'path' is missing"),
    (pa.table({"path": ["a"], "anomaly_score": [1.0]}), "column(s) ['anomaly_score'] are reserved"),
    (pa.table({"path": ["a"], "label": ["x"]}), "column 'label' has type string"),
])
def test_schema_is_checked_from_the_footers(tmp_path, table, message):
    pq.write_table(table, tmp_path / "i.parquet")
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        describe_index(str(tmp_path / "i.parquet"))


def test_unreadable_index_is_a_clear_error(tmp_path):
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="cannot read index"):
        describe_index(str(tmp_path / "x.parquet"))


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_label_values_are_checked_on_the_workers(ray_local, tmp_path):
    root = _index_dir(tmp_path)
    assert index_value_errors(describe_index(root)) is None
    bad = _table(30, 4).set_column(1, "label", pa.array([0, 2, None, 1], pa.int64()))
    pq.write_table(bad, os.path.join(root, "c-no-suffix"))
    error = index_value_errors(describe_index(root), files_per_task=1)
    assert "c-no-suffix" in error and "column 'label' holds [2, None]" in error


@pytest.mark.ray
def test_score_job_rejects_bad_labels_before_writing(tmp_path):
    index = tmp_path / "index.parquet"
    pq.write_table(pa.table({"path": ["a.png", "b.png"], "label": pa.array([0, 3], pa.int64())}), index)
    out = tmp_path / "scores"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    model = tmp_path / "model"
    from rayanom.artifact import Artifact
    from rayanom.config import DfkdeConfig
    from rayanom.heads import KdeHead

    config = DfkdeConfig(backbone="resnet18", image_size=(64, 64), n_pca_components=2)
    head = KdeHead(2).fit(np.random.default_rng(0).normal(size=(20, 512)))
    Artifact(config=config, head=head, weights={"kind": "random", "seed": 0}, provenance={}).save(str(model))
    proc = subprocess.run([sys.executable, "jobs/score.py", "--model-dir", str(model), "--index", str(index), "--out",
                           str(out), "--quiet"], cwd=REPO, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "column 'label' holds [3]" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_resume_refused_when_a_middle_file_changed(tmp_path):
    root = _index_dir(tmp_path)
    out = str(tmp_path / "scores")

    def manifest(info):
        return {"format": "rayanom-scores", "model": "m", "index": info.fingerprint,
                "index_files": list(info.file_fingerprints), "n_rows": info.n_rows, "rows_per_part": 4,
                "n_parts": -(-info.n_rows // 4)}

    first = manifest(describe_index(root))
    assert open_parts(out, first, overwrite=False) == set()
    for k in range(5):  # parts 0-4 (rows 0-19) complete, part 5 not
        pq.write_table(pa.table({"x": [k]}), os.path.join(out, part_name(k)))
    assert open_parts(out, first, overwrite=False) == set(range(5))  # the same index resumes

    changed = _table(10, 7).set_column(0, "path", pa.array([f"new-{i}" for i in range(7)]))  # same row count
    pq.write_table(changed, os.path.join(root, "c-no-suffix"), row_group_size=4)
    with pytest.raises(UserError, match="another version of this index: 3 of its 5 complete parts read rows"):
        open_parts(out, manifest(describe_index(root)), overwrite=False)  # rows 10-16: parts 2, 3, 4

    pq.write_table(_table(0, 11), os.path.join(root, "a.parquet"))  # one more row: every later row moves
    with pytest.raises(UserError, match="5 of its 5 complete parts"):
        open_parts(out, manifest(describe_index(root)), overwrite=False)


def test_automatic_part_layout(tmp_path):
    """``--rows-per-part 0``: the smallest power of two that cuts the index into at most ``AUTO_PARTS`` parts, within
    ``AUTO_ROWS``, from the row count alone; a given value wins; scores already in the output keep their layout."""
    out = str(tmp_path / "scores")
    lo, hi = AUTO_ROWS
    for n in (0, 1, 5_000, 20_000, 65_536, 65_537, 131_072, 131_073, 10**6, 10**8):
        power = 1
        while power * AUTO_PARTS < n:
            power *= 2
        assert rows_per_part(out, n) == min(hi, max(lo, power)), n
    assert [-(-20_000 // rows_per_part(out, 20_000)), -(-10**6 // rows_per_part(out, 10**6))] == [20, 245]
    assert rows_per_part(out, 20_000, requested=300) == 300
    assert not os.path.exists(out)  # choosing reads, never writes
    manifest = {"format": "rayanom-scores", "model": "m", "index": "i", "index_files": [], "n_rows": 20_000,
                "rows_per_part": 2048, "n_parts": 10}
    open_parts(out, manifest, overwrite=False)
    assert rows_per_part(out, 20_000) == rows_per_part(out, 10**6) == 2048  # a resume, a new version of the index
    assert rows_per_part(out, 20_000, requested=512) == 512  # then refused by open_parts, as another layout
    assert rows_per_part(out, 20_000, overwrite=True) == 1024  # --overwrite replaces them: their layout too


@pytest.mark.ray
def test_training_band_equals_the_rows_read_whole(ray_local, tmp_path):
    """The workers' band of training rows (split and label filters, row offsets across files, row groups, an empty
    file) equals the same selection made on the whole table read at once."""
    from rayanom.bank import lower_keys
    from rayanom.index import training_band

    root = tmp_path / "idx"
    root.mkdir()
    rng = np.random.default_rng(0)
    sizes = [40, 0, 25, 35]
    for i, n in enumerate(sizes):
        pq.write_table(pa.table({"path": [f"f{i}-{j}.png" for j in range(n)], "label": rng.integers(0, 2, n),
                                 "split": rng.choice(["train", "test", "val"], n)}), root / f"{i}.parquet",
                       row_group_size=7)
    info = describe_index(str(root))
    train = training_rows(with_row_index(pq.read_table(str(root))))
    rows = train.column(ROW_COL).to_numpy()
    for slots, (lo, hi) in [(1, (0.0, 0.5)), (1, (0.3, 2.0)), (5, (0.1, 0.6))]:
        lower = lower_keys(rows, 7, slots)
        n, got_rows, got_lower, got_paths = training_band(info, 7, slots, lo, hi, files_per_task=2)
        use = (lower >= lo) & (lower < hi)
        assert n == len(rows)
        assert got_rows.tolist() == rows[use].tolist()
        np.testing.assert_array_equal(got_lower, lower[use])
        assert list(got_paths) == np.asarray(train.column("path").to_pylist())[use].tolist()


@pytest.mark.ray
def test_training_band_rejects_bad_labels(ray_local, tmp_path):
    from rayanom.index import training_band

    pq.write_table(pa.table({"path": ["a", "b"], "label": pa.array([0, 2])}), tmp_path / "i.parquet")
    with pytest.raises(UserError, match=r"column 'label' holds \[2\]"):
        training_band(describe_index(str(tmp_path / "i.parquet")), 0, 1, 0.0, 2.0)


def test_a_replaced_index_file_is_read_anew(tmp_path):
    """Workers keep the row groups they read last, keyed by the file's fingerprint: a file replaced in place (same
    name and row count) is read again, not served from the cache."""
    path = tmp_path / "i.parquet"
    pq.write_table(_table(0, 10), path)
    assert read_rows(describe_index(str(path)), 2, 4).column("path").to_pylist() == ["img-2.png", "img-3.png"]
    pq.write_table(_table(100, 10), path)
    assert read_rows(describe_index(str(path)), 2, 4).column("path").to_pylist() == ["img-102.png", "img-103.png"]


# --- an index table in memory: validation and the training rows ---

def _write(tmp_path, **cols):
    path = str(tmp_path / "index.parquet")
    pq.write_table(pa.table(cols), path)
    return path


@pytest.mark.parametrize("cols,match", [
    ({"file": ["a.png"]}, "required column 'path' is missing"),
    ({"path": [1, 2]}, "column 'path' has type int64; expected string"),
    ({"path": ["a", "b"], "label": [0, 2]}, r"column 'label' holds \[2\]; allowed values are 0"),
    ({"path": ["a", "b"], "label": ["good", "bad"]}, "column 'label' has type string"),
    ({"path": ["a"], "label": pa.array([None], pa.int64())}, "no nulls"),
    ({"path": ["a"], "split": [1]}, "column 'split' has type int64"),
    ({"path": ["a"], "anomaly_score": [1.0]}, "reserved for outputs"),
])
def test_bad_index_is_rejected_with_the_reason(tmp_path, cols, match):
    with pytest.raises(UserError, match=match):
        read_index(_write(tmp_path, **cols))


def test_unreadable_index(tmp_path):
    bad = tmp_path / "x.parquet"
    bad.write_text("nope")
    with pytest.raises(UserError, match="cannot read index"):
        read_index(str(bad))
    with pytest.raises(UserError, match="cannot read index"):
        read_index(str(tmp_path / "absent.parquet"))


def test_training_rows_keep_normal_train_split():
    table = validate_index(pa.table({"path": list("abcdef"), "label": [0, 1, 0, 0, 1, 0],
                                     "split": ["train", "train", "test", "train", "test", None]}))
    rows = training_rows(with_row_index(table))
    assert rows.column("path").to_pylist() == ["a", "d"]
    assert rows.column("row_index").to_pylist() == [0, 3]
    assert training_rows(with_row_index(pa.table({"path": list("ab")}))).num_rows == 2


def test_directory_of_parquet_files_is_one_index(tmp_path):
    os.makedirs(tmp_path / "idx")
    pq.write_table(pa.table({"path": ["a", "b"]}), tmp_path / "idx" / "part-0.parquet")
    pq.write_table(pa.table({"path": ["c"]}), tmp_path / "idx" / "part-1.parquet")
    assert sorted(read_index(str(tmp_path / "idx")).column("path").to_pylist()) == ["a", "b", "c"]
