"""An index from folders: MVTec AD's layout and anomalib's Folder layout, skipped files, order, the val split."""

import os
import subprocess
import sys
from collections import Counter

import pyarrow.parquet as pq
import pytest

from rayanom.config import UserError
from rayanom.folders import folder_index, mvtec_index, write_index

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _touch(root, *names):
    for name in names:
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"not decoded")  # files are chosen by extension: the content is never read


@pytest.fixture
def mvtec(tmp_path):
    root = str(tmp_path / "bottle")
    _touch(root, "train/good/001.png", "train/good/000.png", "train/good/002.jpg", "train/broken/003.png",
           "test/good/000.png", "test/good/001.png",
           "test/crack/000.png", "test/crack/001.png", "test/crack/notes.txt",
           "test/scratch/deep/000.png",  # nested defect folder, no masks for it anywhere
           "test/hole/000.png", "test/hole/001.png",  # masks exist for hole, but not for 001
           "ground_truth/crack/000_mask.png", "ground_truth/crack/001_mask.png", "ground_truth/crack/009_mask.png",
           "ground_truth/hole/000_mask.png", "license.txt")
    return root


def test_mvtec_layout_rows_order_and_skipped(mvtec, tmp_path):
    index = mvtec_index(mvtec, val_fraction=0.0)
    table = index.table()
    assert table.column_names == ["path", "label", "split", "defect_type", "mask_path"]
    rows = [(os.path.relpath(p, mvtec), lab, s, d, m and os.path.relpath(m, mvtec))
            for p, lab, s, d, m in zip(*(table.column(c).to_pylist() for c in table.column_names))]
    assert rows == [  # train first, then test; by path within a split
        ("train/good/000.png", 0, "train", "good", None),
        ("train/good/001.png", 0, "train", "good", None),
        ("train/good/002.jpg", 0, "train", "good", None),
        ("test/crack/000.png", 1, "test", "crack", "ground_truth/crack/000_mask.png"),
        ("test/crack/001.png", 1, "test", "crack", "ground_truth/crack/001_mask.png"),
        ("test/good/000.png", 0, "test", "good", None),
        ("test/good/001.png", 0, "test", "good", None),
        ("test/hole/000.png", 1, "test", "hole", "ground_truth/hole/000_mask.png"),
        ("test/scratch/deep/000.png", 1, "test", "scratch/deep", None),
    ]
    skipped = {os.path.relpath(p, mvtec): reason for p, reason in index.skipped}
    assert skipped == {
        "train/broken/003.png": "training image outside train/good",
        "test/crack/notes.txt": "not an image file (extension)",
        "test/hole/001.png": "anomalous image without a mask where its defect type has masks",
        "ground_truth/crack/009_mask.png": "mask without an image",
        "license.txt": "not an image file (extension)",
    }
    out = str(tmp_path / "idx" / "index.parquet")
    summary = write_index(index, out)
    assert summary["rows"] == 9 and summary["skipped"] == 5 and summary["with_mask"] == 3
    assert summary["by_split"] == {"test": 6, "train": 3}
    assert pq.read_table(out).equals(table)
    listed = [line.split("\t") for line in open(out + ".skipped.tsv").read().splitlines()]
    assert {os.path.relpath(p, mvtec): r for p, r in listed} == skipped
    from rayanom.index import describe_index

    assert describe_index(out).n_rows == 9  # a valid index for the jobs


def test_val_split_is_stratified_seeded_and_order_free(tmp_path):
    root = str(tmp_path / "cat")
    names = [f"train/good/{i:03d}.png" for i in range(4)] + [f"test/good/{i:03d}.png" for i in range(10)]
    names += [f"test/crack/{i:03d}.png" for i in range(6)] + [f"test/hole/{i:03d}.png" for i in range(4)]
    _touch(root, *names)
    a = mvtec_index(root, val_fraction=0.5, seed=3).table()
    counts = Counter((s, d) for s, d in zip(a.column("split").to_pylist(), a.column("defect_type").to_pylist()))
    assert counts == {("train", "good"): 4, ("val", "good"): 5, ("test", "good"): 5, ("val", "crack"): 3,
                      ("test", "crack"): 3, ("val", "hole"): 2, ("test", "hole"): 2}
    assert mvtec_index(root, val_fraction=0.5, seed=3).table().equals(a)  # the same seed, the same rows
    def val(t):
        return {p for p, s in zip(t.column("path").to_pylist(), t.column("split").to_pylist()) if s == "val"}

    assert val(mvtec_index(root, val_fraction=0.5, seed=4).table()) != val(a)  # another seed, other rows
    splits = a.column("split").to_pylist()
    assert splits == sorted(splits, key=["train", "val", "test"].index)  # train, val, test
    with pytest.raises(UserError, match="invalid val_fraction=1.0"):
        mvtec_index(root, val_fraction=1.0)
    elsewhere = str(tmp_path / "moved" / "to" / "another" / "cat")  # the same dataset at another place
    _touch(elsewhere, *names)
    b = mvtec_index(elsewhere, val_fraction=0.5, seed=3).table()
    assert {p[len(elsewhere):] for p in val(b)} == {p[len(root):] for p in val(a)}  # the same images set aside


def test_held_out_normals_do_not_depend_on_where_the_folders_are(tmp_path):
    names = [f"{i:03d}.png" for i in range(20)]
    picks = []
    for where in ("a", "b/c"):
        _touch(str(tmp_path / where / "normal"), *names)
        rows = folder_index(str(tmp_path / where / "normal"), normal_test_fraction=0.3, val_fraction=0.0).rows
        picks.append(sorted(os.path.basename(r["path"]) for r in rows if r["split"] == "test"))
    assert len(picks[0]) == 6 and picks[0] == picks[1]


def test_folder_layout_with_masks_and_held_out_normals(tmp_path):
    good, bad, masks = (str(tmp_path / d) for d in ("good", "bad", "masks"))
    _touch(good, *[f"{i:02d}.png" for i in range(10)], "Thumbs.db")
    _touch(bad, "scratch/a.png", "scratch/b.png", "c.png")
    _touch(masks, "scratch/a.png", "c.png", "orphan.png")
    index = folder_index(good, bad, mask=masks, normal_test_fraction=0.2, val_fraction=0.0, seed=0)
    table = index.table()
    by = Counter(zip(table.column("split").to_pylist(), table.column("label").to_pylist(),
                     table.column("defect_type").to_pylist()))
    assert by == {("train", 0, "good"): 8, ("test", 0, "good"): 2, ("test", 1, "scratch"): 1, ("test", 1, "bad"): 1}
    with_mask = {os.path.relpath(p, bad): m and os.path.relpath(m, masks) for p, m in
                 zip(table.column("path").to_pylist(), table.column("mask_path").to_pylist()) if p.startswith(bad)}
    assert with_mask == {"scratch/a.png": "scratch/a.png", "c.png": "c.png"}
    reasons = Counter(r for _, r in index.skipped)
    assert reasons == {"not an image file (extension)": 1, "anomalous image without a mask where masks exist": 1,
                       "mask without an image": 1}
    separate = folder_index(good, bad, normal_test=str(tmp_path / "bad"), val_fraction=0.0, seed=0).table()
    assert Counter(separate.column("split").to_pylist())["train"] == 10


def test_index_job_writes_an_index_and_refuses_mixed_layouts(mvtec, tmp_path):
    out = str(tmp_path / "index.parquet")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    evaluated = str(tmp_path / "eval.parquet")
    proc = subprocess.run([sys.executable, "jobs/index.py", "--mvtec", mvtec, "--out", out, "--eval-out", evaluated,
                           "--quiet"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"index: {out} (9 rows; 5 files skipped, listed in {out}.skipped.tsv)" in proc.stdout
    assert pq.read_table(out).num_rows == 9
    # The default val split (VAL_FRACTION 0.5) per defect type, round(0.5 n), Python's rounding: crack 2 -> 1,
    # good 2 -> 1, hole 1 -> 0, scratch/deep 1 -> 0.
    assert sorted(pq.read_table(evaluated).column("split").to_pylist()) == ["test"] * 4 + ["val"] * 2
    assert pq.read_table(out).equals(mvtec_index(mvtec, val_fraction=0.5).table())  # the library's default too
    assert mvtec_index(mvtec).table().equals(pq.read_table(out))
    none = subprocess.run([sys.executable, "jobs/index.py", "--mvtec", mvtec, "--out", out, "--val-fraction", "0",
                           "--quiet"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert none.returncode == 0 and "val" not in pq.read_table(out).column("split").to_pylist()
    bad = subprocess.run([sys.executable, "jobs/index.py", "--mvtec", mvtec, "--mask", mvtec, "--out", out],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "invalid --abnormal/--normal-test/--mask with --mvtec" in bad.stderr


def test_the_demo_set_has_a_stratified_val_split_to_decide_with(tmp_path, monkeypatch):
    """The jobs' demo set (no --index): its scored set holds val rows of both classes (they choose the threshold, so
    the demo ends with decisions) beside its test rows; a set written before, without val rows, is written anew."""
    from types import SimpleNamespace

    from rayanom import demo

    monkeypatch.setattr(demo, "DEMO_ROOT", str(tmp_path / "demo"))
    spec = SimpleNamespace(name="m", demo_sizes={"n_train": 4, "n_test_normal": 4, "n_test_anomalous": 8})
    old = demo.make_demo(str(tmp_path / "demo-m"), size=32, **spec.demo_sizes)  # the tests' sets: no val by default
    assert set(pq.read_table(old).column("split").to_pylist()) == {"train", "test"}
    index, scored = demo.demo_set(spec)
    assert index == old
    table, scored = pq.read_table(index), pq.read_table(scored)
    counts = Counter(zip(scored.column("split").to_pylist(), scored.column("defect_type").to_pylist()))
    assert counts == {("val", "good"): 2, ("test", "good"): 2, **{(s, d): 1 for s in ("val", "test")
                                                                 for d in ("scratch", "stain", "hole", "crack")}}
    assert scored.equals(table.slice(4))  # train rows first, then val and test: the scored set is the rest
