"""Report stage: metrics against scikit-learn and brute force (with tied scores), and the files evaluate() writes."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.metrics import f1_score, roc_auc_score

from rayanom.decisions import f1_adaptive_threshold
from rayanom.report import compute_metrics, evaluate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def brute_force_f1(labels: np.ndarray, scores: np.ndarray, t: float) -> float:
    pred = scores >= t
    tp = int((pred & (labels == 1)).sum())
    fp = int((pred & (labels == 0)).sum())
    fn = int((~pred & (labels == 1)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def tied_scores(seed: int = 0, n: int = 60):
    """Scores rounded to one decimal: many ties, some across classes."""
    rng = np.random.default_rng(seed)
    labels = np.array([0] * (n // 2) + [1] * (n - n // 2))
    scores = np.round(rng.normal(0, 1, n) + 1.0 * labels, 1)
    assert len(np.unique(scores)) < n  # ties present
    tie_values = set(scores[labels == 0]) & set(scores[labels == 1])
    assert tie_values  # ties across the two classes
    return labels, scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn_and_brute_force_with_ties(seed):
    labels, scores = tied_scores(seed)
    m = compute_metrics(labels, scores)

    assert m["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    best = max(brute_force_f1(labels, scores, t) for t in np.unique(scores))
    assert m["f1"] == pytest.approx(best, abs=1e-12)
    assert m["threshold"] in set(scores.tolist())
    assert brute_force_f1(labels, scores, m["threshold"]) == pytest.approx(best, abs=1e-12)
    assert m["f1"] == pytest.approx(f1_score(labels, (scores >= m["threshold"]).astype(int)), abs=1e-12)
    assert m["threshold_source"] == "scored set"
    assert (m["n_normal"], m["n_anomalous"]) == (30, 30)
    pred = scores >= m["threshold"]
    assert m["precision"] == pytest.approx((pred & (labels == 1)).sum() / pred.sum())
    assert m["recall"] == pytest.approx((pred & (labels == 1)).sum() / (labels == 1).sum())


def test_ties_use_greater_equal():
    # The best threshold is a score shared by a normal and two anomalous samples: with ">=" all three are predicted
    # anomalous (F1 = 0.8); a ">" comparison at that value would give a different F1.
    labels = np.array([0, 0, 0, 1, 1, 0])
    scores = np.array([0.1, 0.2, 0.5, 0.5, 0.5, 0.3])
    t = f1_adaptive_threshold(labels, scores)
    assert t == 0.5
    m = compute_metrics(labels, scores)
    assert m["f1"] == pytest.approx(0.8)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(1.0)


def test_threshold_from_validation_split():
    val_labels = np.array([0, 0, 0, 1, 1, 1])
    val_scores = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])  # any t in (0.3, 0.7] separates; candidates: 0.7
    test_labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    test_scores = np.array([0.1, 0.5, 0.6, 0.75, 0.4, 0.72, 0.8, 0.95])

    m = compute_metrics(test_labels, test_scores, val_labels, val_scores)
    assert m["threshold_source"] == "validation split"
    assert m["threshold"] == pytest.approx(0.7)
    # Reported on the test arrays at 0.7: predicted {0.75, 0.72, 0.8, 0.95} -> tp 3, fp 1, fn 1.
    assert m["precision"] == pytest.approx(0.75)
    assert m["recall"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(0.75)
    assert m["auroc"] == pytest.approx(roc_auc_score(test_labels, test_scores))
    # The test set's own best threshold differs: the validation split really chose it.
    assert compute_metrics(test_labels, test_scores)["threshold"] != pytest.approx(0.7)


def test_one_class_gives_none():
    m = compute_metrics(np.zeros(5, dtype=int), np.array([0.1, 0.2, 0.2, 0.4, 0.5]))
    assert m["auroc"] is None and m["f1"] is None and m["threshold"] is None
    assert (m["n_normal"], m["n_anomalous"]) == (5, 0)
    m = compute_metrics(np.array([0, 1]), np.array([0.1, 0.9]), np.ones(3, dtype=int), np.array([0.5, 0.6, 0.7]))
    assert m["auroc"] == 1.0 and m["threshold"] is None and m["f1"] is None


def write_scores(directory, table: pa.Table, parts: int = 2):
    directory.mkdir()
    step = -(-table.num_rows // parts)
    for i in range(parts):
        pq.write_table(table.slice(i * step, step), directory / f"part-{i}.parquet")
    return str(directory)


def scores_table(with_label: bool = True, with_split: bool = False) -> pa.Table:
    labels, scores = tied_scores(0, n=20)
    score_list = scores.tolist()
    errors = [None] * 20
    score_list[3], errors[3] = None, "FileNotFoundError: missing file /x.png"  # one failed row
    cols = {"path": [f"/img/{i}.png" for i in range(20)],
            "anomaly_score": pa.array(score_list, pa.float64()),
            "error": pa.array(errors, pa.string())}
    if with_label:
        cols["label"] = pa.array(labels, pa.int64())
    if with_split:
        cols["split"] = pa.array(["val" if i % 2 else "test" for i in range(20)], pa.string())
    return pa.table(cols)


def test_evaluate_writes_metrics_and_png(tmp_path):
    table = scores_table()
    src = write_scores(tmp_path / "scores", table)
    out = tmp_path / "report" / "nested"
    m = evaluate(src, str(out))

    with open(out / "metrics.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(m))
    assert (saved["rows"], saved["scored"], saved["failed"]) == (20, 19, 1)
    assert saved["n_normal"] + saved["n_anomalous"] == 19
    assert saved["n_validation"] == 0
    assert saved["threshold_source"].startswith("scored set")
    ok = np.array([i != 3 for i in range(20)])
    labels = np.asarray(table.column("label").to_pylist())[ok]
    scores = np.asarray(table.column("anomaly_score").to_pylist(), dtype=float)[ok]
    assert saved["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert saved["f1"] == pytest.approx(max(brute_force_f1(labels, scores, t) for t in np.unique(scores)))

    data = (out / "report.png").read_bytes()
    assert data.startswith(PNG_MAGIC)
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        assert im.format == "PNG" and im.size[0] > 0 and im.size[1] > 0


def test_evaluate_uses_validation_split(tmp_path):
    table = scores_table(with_split=True)
    src = write_scores(tmp_path / "scores", table)
    m = evaluate(src, str(tmp_path / "out"))
    split = np.asarray(table.column("split").to_pylist())
    labels = np.asarray(table.column("label").to_pylist())
    scores = np.asarray(table.column("anomaly_score").to_pylist(), dtype=float)
    ok = ~np.isnan(scores)
    val, test = ok & (split == "val"), ok & (split != "val")
    expected = compute_metrics(labels[test], scores[test], labels[val], scores[val])
    assert m["threshold_source"].startswith("validation split")
    assert m["n_validation"] == int(val.sum())
    assert m["n_normal"] + m["n_anomalous"] == int(test.sum())
    for key in ("auroc", "threshold", "f1", "precision", "recall"):
        assert m[key] == pytest.approx(expected[key])
    assert (m["rows"], m["scored"], m["failed"]) == (20, 19, 1)


def test_evaluate_without_label_raises(tmp_path):
    src = write_scores(tmp_path / "scores", scores_table(with_label=False))
    with pytest.raises(ValueError, match="'label'"):
        evaluate(src, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_job_summary_counts_rows_and_auroc_without_requiring_labels(tmp_path):
    from rayanom.summary import summarize

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 40)
    scores = rng.normal(size=40) + labels
    errors = [None] * 40
    for i in (2, 7, 30):  # failed rows: a null score and an error; the summary's AUROC leaves them out
        errors[i] = "ValueError: not an image"
    score_col = pa.array(scores, mask=np.array([e is not None for e in errors]))
    table = pa.table({"anomaly_score": score_col, "error": pa.array(errors, pa.string()), "label": labels})
    pq.write_table(table, tmp_path / "a.parquet")
    s = summarize(str(tmp_path))
    ok = np.array([e is None for e in errors])
    assert (s["rows"], s["scored"], s["failed"]) == (40, 37, 3)
    assert s["auroc"] == pytest.approx(roc_auc_score(labels[ok], scores[ok]), abs=1e-12)
    assert (s["n_normal"], s["n_anomalous"]) == (int((labels[ok] == 0).sum()), int((labels[ok] == 1).sum()))

    pq.write_table(table.drop_columns(["label"]), tmp_path / "a.parquet")  # unlabelled: counts, no AUROC
    assert summarize(str(tmp_path)) == {"output": str(tmp_path), "rows": 40, "scored": 37, "failed": 3, "auroc": None,
                                        "failed_by_kind": {"ValueError": 3}}
    nulls = table.set_column(2, "label", pa.array([None] + labels[1:].tolist(), pa.int64()))
    pq.write_table(nulls, tmp_path / "a.parquet")  # a null label on a scored row: the report refuses, the summary
    assert summarize(str(tmp_path))["auroc"] is None  # only drops the AUROC
    with pytest.raises(ValueError, match="null 'label'"):
        evaluate(str(tmp_path), str(tmp_path / "report"))


def large_scores(tmp_path, n: int = 6000, seed: int = 5):
    """Scores over a wide range (a heavy tail), ties, a few failed rows and a non-finite score, a validation split,
    written as three parts."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    scores = np.round(rng.standard_t(2, n) * 50 + 40 * labels, 0)  # rounded: ties inside and across classes
    score_list = scores.tolist()
    errors = [None] * n
    for i in rng.choice(n, 30, replace=False):
        score_list[i], errors[i] = None, "OSError: unreadable"
    score_list[7], errors[7] = float("inf"), None
    split = np.where(rng.random(n) < 0.3, "val", "test")
    table = pa.table({"anomaly_score": pa.array(score_list, pa.float64()), "error": pa.array(errors, pa.string()),
                      "label": labels, "split": split})
    ok = np.array([e is None and np.isfinite(s) for e, s in zip(errors, [np.nan if v is None else v
                                                                        for v in score_list])])
    return write_scores(tmp_path / "scores", table, parts=3), labels, scores, ok, split == "val"


@pytest.mark.parametrize("bins", [16, 4096])
def test_histogram_auroc_is_within_its_stated_bound(tmp_path, bins):
    from rayanom.summary import Histograms

    src, labels, scores, ok, _ = large_scores(tmp_path)
    h = Histograms.from_scores(src, bins=bins, sample=1000)  # a sample smaller than the rows: every k-th row
    auroc, bound = h.auroc()
    exact = roc_auc_score(labels[ok], scores[ok])
    assert abs(auroc - exact) <= bound + 1e-12
    assert 0 < bound < (0.05 if bins == 16 else 0.005)  # coarse bins: a real, stated error; fine bins: small
    assert (h.rows, h.finite, h.scored) == (6000, int(ok.sum()), int(ok.sum()) + 1)  # + the infinite score
    # Counts at a bin edge are exact: predicted anomalous iff score >= edge.
    at = h.at_edges()
    for i in (0, len(h.edges) // 2, len(h.edges) - 1):
        pred = scores[ok] >= h.edges[i]
        assert at["tp"][i] == int((pred & (labels[ok] == 1)).sum())
        assert at["fp"][i] == int((pred & (labels[ok] == 0)).sum())


def test_summary_and_report_above_the_exact_size_use_histograms(tmp_path):
    from rayanom.summary import summarize

    src, labels, scores, ok, val = large_scores(tmp_path)
    exact_summary, hist_summary = summarize(src), summarize(src, exact_rows=1000)
    assert exact_summary["auroc_error_bound"] == 0.0
    assert {k: hist_summary[k] for k in ("rows", "scored", "failed", "n_normal", "n_anomalous")} == \
        {k: exact_summary[k] for k in ("rows", "scored", "failed", "n_normal", "n_anomalous")}
    assert abs(hist_summary["auroc"] - exact_summary["auroc"]) <= hist_summary["auroc_error_bound"] + 1e-12
    assert hist_summary["auroc_error_bound"] < 0.005

    exact, approx = evaluate(src, str(tmp_path / "e")), evaluate(src, str(tmp_path / "h"), exact_rows=1000)
    assert approx["method"].startswith("histograms") and exact["method"] == "exact"
    for key in ("rows", "scored", "failed", "n_validation", "n_normal", "n_anomalous"):
        assert approx[key] == exact[key], key
    assert approx["threshold_source"].startswith("validation split")
    assert abs(approx["auroc"] - exact["auroc"]) <= approx["auroc_error_bound"] + 1e-12
    test, t = ok & ~val, approx["threshold"]
    pred = (scores[test] >= t).astype(int)  # F1, precision and recall at the chosen edge are exact (scikit-learn)
    assert approx["f1"] == pytest.approx(f1_score(labels[test], pred), abs=1e-12)
    from sklearn.metrics import precision_score, recall_score

    assert approx["precision"] == pytest.approx(precision_score(labels[test], pred), abs=1e-12)
    assert approx["recall"] == pytest.approx(recall_score(labels[test], pred), abs=1e-12)
    # The threshold is the best edge on the validation rows; the exact search over all their scores can only do
    # as well or better there.
    v = ok & val
    best_exact = max(brute_force_f1(labels[v], scores[v], s) for s in np.unique(scores[v]))
    assert brute_force_f1(labels[v], scores[v], t) <= best_exact + 1e-12
    assert brute_force_f1(labels[v], scores[v], t) >= best_exact - 0.02
    assert (tmp_path / "h" / "report.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_f1max_and_average_precision_against_brute_force_and_sklearn(seed):
    """F1Max = the best F1 over every distinct score as the threshold (brute force); AP = scikit-learn's, and equal to
    its definition sum (R_k - R_k-1) P_k written out here over the distinct scores, ties included."""
    from sklearn.metrics import average_precision_score

    labels, scores = tied_scores(seed)
    m = compute_metrics(labels, scores)
    assert m["f1_max"] == pytest.approx(max(brute_force_f1(labels, scores, t) for t in np.unique(scores)), abs=1e-12)
    assert m["average_precision"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    ap, prev_recall = 0.0, 0.0
    for t in np.unique(scores)[::-1]:
        pred = scores >= t
        recall = (pred & (labels == 1)).sum() / (labels == 1).sum()
        ap += (recall - prev_recall) * (pred & (labels == 1)).sum() / pred.sum()
        prev_recall = recall
    assert m["average_precision"] == pytest.approx(ap, abs=1e-12)


def test_histogram_f1max_and_ap_equal_sklearn_on_binned_scores(tmp_path):
    """Above the exact size: F1Max and AP at the bin edges are exactly scikit-learn's on the scores replaced by their
    bin number; and within a small distance of the exact values."""
    from sklearn.metrics import average_precision_score

    from rayanom.summary import Histograms

    src, labels, scores, ok, val = large_scores(tmp_path)
    approx = evaluate(src, str(tmp_path / "h"), exact_rows=1000)
    exact = evaluate(src, str(tmp_path / "e"))
    h = Histograms.from_scores(src)
    test = ok & ~val
    binned = np.searchsorted(h.edges, scores[test], side="right")
    assert approx["average_precision"] == pytest.approx(average_precision_score(labels[test], binned), abs=1e-12)
    best = max(brute_force_f1(labels[test], binned, t) for t in np.unique(binned))
    assert approx["f1_max"] == pytest.approx(best, abs=1e-12)
    assert abs(approx["average_precision"] - exact["average_precision"]) < 0.01
    assert abs(approx["f1_max"] - exact["f1_max"]) < 0.01


def test_per_defect_type_table_and_page(tmp_path):
    """Per defect type: images, images flagged at the threshold and the quartiles, against direct numpy counts; the
    decision threshold is the one used when given; the page is drawn with the table."""
    rng = np.random.default_rng(5)
    n = 200
    defects = rng.choice(["good", "scratch", "hole"], n, p=[0.5, 0.3, 0.2])
    labels = (defects != "good").astype(int)
    scores = rng.normal(0, 1, n) + np.where(defects == "scratch", 1.0, np.where(defects == "hole", 3.0, 0.0))
    table = pa.table({"anomaly_score": scores, "error": pa.array([None] * n, pa.string()), "label": labels,
                      "defect_type": defects})
    src = write_scores(tmp_path / "scores", table, parts=2)
    for decision in (None, 0.8):
        m = evaluate(src, str(tmp_path / f"r-{decision}"), decision=decision)
        t = decision if decision is not None else m["threshold"]
        rows = {r["defect_type"]: r for r in m["per_defect_type"]}
        assert set(rows) == {"good", "scratch", "hole"}
        for name, r in rows.items():
            s = scores[defects == name]
            assert (r["images"], r["flagged"], r["label"]) == (s.size, int((s >= t).sum()), int(name != "good"))
            assert r["flagged_fraction"] == pytest.approx((s >= t).mean())
            assert r["score_median"] == pytest.approx(np.median(s)) and r["score_max"] == pytest.approx(s.max())
        data = (tmp_path / f"r-{decision}" / "report.png").read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            assert im.size[1] > im.size[0] * 0.8  # the page: curves, histograms, defect panel and table
