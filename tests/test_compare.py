"""Runs compared (rayanom.compare, jobs/compare.py) on synthetic runs with known flips and a known shift, against
scipy's spearmanr and ks_2samp on the full data."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.stats import ks_2samp, spearmanr

from rayanom import compare
from rayanom.parts import MANIFEST

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 3000


def _run(tmp_path, name, table, index="index-fp", part_rows=1000):
    d = tmp_path / name
    d.mkdir()
    for k in range(0, table.num_rows, part_rows):
        pq.write_table(table.slice(k, part_rows), d / f"part-{k // part_rows:08d}.parquet")
    (d / MANIFEST).write_text(json.dumps({"format": "rayanom-scores", "index": index}))
    return str(d)


def _runs(tmp_path, seed=0):
    """Run a, and run b = a with 7 decisions flipped to anomalous, 5 to normal, and the 'scratch' rows' normalised
    scores shifted up by 0.2; two failed rows in b."""
    rng = np.random.default_rng(seed)
    defect = rng.choice(["good", "scratch", "hole"], N, p=[0.6, 0.25, 0.15])
    score = rng.normal(0, 1, N) + (defect != "good") * 2.0
    norm = np.clip((score + 3) / 8, 0, 1)
    dec = norm >= 0.5
    a = {"row_index": np.arange(N), "path": [f"/img/{i}.png" for i in range(N)], "anomaly_score": score,
         "error": [None] * N, "is_anomalous": dec, "normalized_score": norm, "defect_type": defect}
    b = {k: (v.copy() if isinstance(v, np.ndarray) else list(v)) for k, v in a.items()}
    b["normalized_score"] = np.where(defect == "scratch", np.clip(norm + 0.2, 0, 1), norm)
    b["anomaly_score"] = score + np.where(defect == "scratch", 1.6, 0.0)
    up = rng.choice(np.flatnonzero(~dec & (defect == "good")), 7, replace=False)
    down = rng.choice(np.flatnonzero(dec & (defect == "hole")), 5, replace=False)
    b["is_anomalous"][up], b["is_anomalous"][down] = True, False
    b["normalized_score"][up] += 0.3
    failed = np.setdiff1d(np.arange(N), np.r_[up, down])[[10, 20]]
    for i in failed:
        b["error"][i] = "OSError: unreadable"
    b_score = pa.array(b["anomaly_score"], mask=np.isin(np.arange(N), failed))
    ta = pa.table({k: pa.array(v) for k, v in a.items()})
    tb = pa.table({k: pa.array(v) for k, v in b.items()}).set_column(2, "anomaly_score", b_score)
    return ta, tb, up, down, failed


def test_known_flips_spearman_and_shift(tmp_path):
    ta, tb, up, down, failed = _runs(tmp_path)
    r = compare.compare_runs(_run(tmp_path, "a", ta), _run(tmp_path, "b", tb), str(tmp_path / "out"), top=4)
    p = r["per_image"]
    assert r["joined_on"] == "row_index" and p["joined"] == N and p["scored_in_both"] == N - 2
    assert (p["to_anomalous"], p["to_normal"], p["flipped"]) == (7, 5, 12)
    assert p["flipped_fraction"] == pytest.approx(12 / (N - 2))
    ok = ~np.isin(np.arange(N), failed)
    sa, sb = ta.column("anomaly_score").to_numpy()[ok], tb.column("anomaly_score").to_numpy(zero_copy_only=False)[ok]
    assert p["spearman"] == pytest.approx(spearmanr(sa, sb).statistic, abs=1e-12) and p["spearman_exact"]
    # The most moved flips: the 7 pushed up by 0.3 (|change of normalised score|); 4 asked for.
    assert len(p["top_flips"]) == 4 and {f["row_index"] for f in p["top_flips"]} <= set(up.tolist())
    assert all(f["a"]["is_anomalous"] is False and f["b"]["is_anomalous"] is True for f in p["top_flips"])
    assert r["distribution_of"] == "normalized_score"
    defect = np.asarray(ta.column("defect_type").to_pylist())
    na, nb = ta.column("normalized_score").to_numpy(), tb.column("normalized_score").to_numpy()
    for t in ("good", "scratch", "hole"):
        ref = ks_2samp(na[defect == t], nb[(defect == t) & ok])
        s = r["per_defect_type"][t]
        assert s["ks_statistic"] == pytest.approx(ref.statistic, abs=1e-12)
        assert s["ks_pvalue"] == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-300)
    shifted = r["per_defect_type"]["scratch"]
    assert shifted["ks_statistic"] > 0.3 and shifted["median_change"] == pytest.approx(
        np.median(nb[(defect == "scratch") & ok]) - np.median(na[defect == "scratch"]))
    assert r["per_defect_type"]["good"]["ks_statistic"] < 0.01  # 7 of ~1800 moved
    saved = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert saved["per_image"]["flipped"] == 12
    assert (tmp_path / "out" / "compare.png").read_bytes().startswith(b"\x89PNG")


def test_streamed_and_sampled_at_scale(tmp_path, monkeypatch):
    """Chunks smaller than a part and a sample smaller than the rows (every k-th row): flips stay exact, Spearman
    within its stated sampling error of the exact value, KS within its own."""
    ta, tb, _, _, failed = _runs(tmp_path, seed=1)
    a, b = _run(tmp_path, "a", ta, part_rows=700), _run(tmp_path, "b", tb, part_rows=1100)
    exact = compare.compare_runs(a, b)
    monkeypatch.setattr(compare, "CHUNK", 500)
    monkeypatch.setattr(compare, "SAMPLE", 600)
    r = compare.compare_runs(a, b)
    assert r["per_image"]["flipped"] == exact["per_image"]["flipped"] == 12
    assert not r["per_image"]["spearman_exact"] and r["per_image"]["spearman_rows"] <= 600
    assert abs(r["per_image"]["spearman"] - exact["per_image"]["spearman"]) <= 3 * r["per_image"][
        "spearman_sampling_error"]
    for t, s in r["per_defect_type"].items():
        assert abs(s["ks_statistic"] - exact["per_defect_type"][t]["ks_statistic"]) <= s["sampling_error_95"] * 1.5


def test_joined_on_path_across_indexes_and_drift_between_batches(tmp_path):
    ta, tb, up, down, _ = _runs(tmp_path, seed=2)
    order = np.random.default_rng(0).permutation(N)[: N // 2]  # b: half the images, in another order, another index
    b = _run(tmp_path, "b", tb.take(pa.array(order)).drop_columns(["row_index"]), index="other")
    r = compare.compare_runs(_run(tmp_path, "a", ta), b)
    assert r["joined_on"] == "path" and r["per_image"]["joined"] == N // 2
    assert r["per_image"]["flipped"] == int(np.isin(np.r_[up, down], order).sum())
    # Two batches of different images: nothing to join, the distributions still compared.
    other = tb.set_column(1, "path", pa.array([f"/batch2/{i}.png" for i in range(N)]))
    r = compare.compare_runs(_run(tmp_path, "a2", ta), _run(tmp_path, "b2", other, index="batch2"))
    assert r["per_image"]["joined"] == 0 and r["per_image"]["spearman"] is None
    assert r["per_defect_type"]["scratch"]["ks_statistic"] > 0.3


@pytest.mark.timeout(120)
def test_compare_job(tmp_path):
    ta, tb, _, _, _ = _runs(tmp_path)
    a, b = _run(tmp_path, "a", ta), _run(tmp_path, "b", tb)
    proc = subprocess.run([sys.executable, "jobs/compare.py", "--before", a, "--after", b, "--out",
                           str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "decisions flipped 12 of 2998 (7 to anomalous, 5 to normal)" in proc.stdout
    assert (tmp_path / "o" / "compare.png").exists()
    proc = subprocess.run([sys.executable, "jobs/compare.py", "--before", a, "--after", str(tmp_path / "nothing"),
                           "--out", str(tmp_path / "o2")], cwd=REPO, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 2 and "invalid --after=" in proc.stderr, proc.stderr[-2000:]
