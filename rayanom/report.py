"""Report stage: the image metrics anomalib reports and a one-page figure for a scores dataset.

Reads the parquet dataset written by scoring (``anomaly_score``, ``error``, ``label``, optionally ``split`` and
``defect_type``) and writes ``metrics.json`` and ``report.png`` to an output directory, local or URI. Metrics on raw
scores, as anomalib's image metrics: AUROC, F1Max (the best F1 over every threshold of the evaluated rows), average
precision (scikit-learn's ``average_precision_score``), F1, precision and recall at the threshold (the F1-adaptive
one chosen on the val rows, and the decision threshold when the scores were decided), and per defect type: counts,
the fraction flagged at the threshold (recall for a defect type, the false-positive rate for ``good``) and the score
quartiles. The page: ROC and PR curves, score histograms with the thresholds, scores per defect type and the table.
The report is the evaluation written to files when asked for; ``summary`` is the few numbers every scoring run logs.
"""

from __future__ import annotations

import io
import json
import logging

import numpy as np

from rayanom import maps
from rayanom.columns import BOXES_COL, MAP_COL
from rayanom.config import UserError
from rayanom.decisions import f1_adaptive_threshold
from rayanom.pixels import pixel_metrics
from rayanom.scores import VAL_SPLIT, count_rows, open_scores, read_score_columns
from rayanom.specs import spec_of
from rayanom.storage import check_output_dir, prepare_output_dir, resolve_filesystem
from rayanom.summary import EXACT_ROWS, Histograms

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
FIGURE_FILE = "report.png"


def _two_classes(labels: np.ndarray) -> bool:
    return bool(np.any(labels == 0) and np.any(labels == 1))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """anomalib's F1Max: the largest F1 over the thresholds of the precision-recall curve of these rows.

    None without both classes."""
    from sklearn.metrics import precision_recall_curve

    if not _two_classes(np.asarray(labels)):
        return None
    precision, recall, _ = precision_recall_curve(np.asarray(labels).astype(int), np.asarray(scores, np.float64))
    denom = precision + recall
    return float(np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0).max())


def per_defect_type(labels: np.ndarray, scores: np.ndarray, codes: np.ndarray, names: list[str],
                    threshold: float | None) -> list[dict]:
    """One row per defect type (null as ``"(none)"``), with its counts and score quartiles.

    A row: label, images, images flagged at ``threshold`` (score >= it) and their fraction (the recall of an anomalous
    type, the false-positive rate of a normal one), score quartiles."""
    rows = []
    for code in np.unique(codes):
        s, lab = scores[codes == code], labels[codes == code]
        flagged = int((s >= threshold).sum()) if threshold is not None else None
        q = np.quantile(s, [0.0, 0.25, 0.5, 0.75, 1.0]).tolist()
        rows.append({"defect_type": names[code] if code >= 0 else "(none)", "label": int(lab.max()),
                     "images": int(s.size), "flagged": flagged,
                     "flagged_fraction": flagged / s.size if flagged is not None else None,
                     "score_min": q[0], "score_q1": q[1], "score_median": q[2], "score_q3": q[3], "score_max": q[4]})
    return sorted(rows, key=lambda r: (r["label"], r["defect_type"]))


def compute_metrics(labels: np.ndarray, scores: np.ndarray, threshold_labels: np.ndarray | None = None,
                    threshold_scores: np.ndarray | None = None) -> dict:
    """Image AUROC and precision, recall and F1 at the F1-adaptive threshold.

    Args:
        labels: 0 (normal) or 1 (anomalous), one per sample of the evaluated set.
        scores: anomaly scores (higher = more anomalous), same length as ``labels``.
        threshold_labels: labels of a validation split that chooses the threshold; None uses ``labels``.
        threshold_scores: scores of that validation split; given together with ``threshold_labels``.

    Returns:
        ``auroc`` (on raw scores), ``f1_max`` and ``average_precision`` (on ``labels``/``scores``), ``threshold``
        (predicted anomalous iff ``score >= threshold``),
        ``threshold_source`` (``"validation split"`` or ``"scored set"``), ``f1``, ``precision``, ``recall``
        (on ``labels``/``scores`` at that threshold), ``n_normal`` and ``n_anomalous``. ``auroc`` is None when the
        evaluated set lacks a class; ``threshold`` is None when the set that chooses it lacks a class; ``f1``,
        ``precision`` and ``recall`` are None when either is.

    Raises:
        ValueError: mismatched lengths, or only one of ``threshold_labels``/``threshold_scores`` given.
    """
    from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score, roc_auc_score

    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape:
        msg = f"labels and scores differ in shape: {labels.shape} vs {scores.shape}"
        raise ValueError(msg)
    if (threshold_labels is None) != (threshold_scores is None):
        msg = "threshold_labels and threshold_scores must be given together"
        raise ValueError(msg)
    if threshold_labels is None:
        source, t_labels, t_scores = "scored set", labels, scores
    else:
        source = "validation split"
        t_labels = np.asarray(threshold_labels).astype(int)
        t_scores = np.asarray(threshold_scores, dtype=np.float64)
        if t_labels.shape != t_scores.shape:
            msg = f"threshold_labels and threshold_scores differ in shape: {t_labels.shape} vs {t_scores.shape}"
            raise ValueError(msg)

    metrics = {"n_normal": int((labels == 0).sum()), "n_anomalous": int((labels == 1).sum()),
               "threshold_source": source, "auroc": None, "threshold": None, "f1": None, "precision": None,
               "recall": None, "f1_max": None, "average_precision": None}
    evaluable = _two_classes(labels)
    if evaluable:
        metrics["auroc"] = float(roc_auc_score(labels, scores))
        metrics["average_precision"] = float(average_precision_score(labels, scores))
        metrics["f1_max"] = f1_max(labels, scores)
    threshold = f1_adaptive_threshold(t_labels, t_scores)
    metrics["threshold"] = threshold
    if evaluable and threshold is not None:
        pred = (scores >= threshold).astype(int)
        metrics["f1"] = float(f1_score(labels, pred, zero_division=0))
        metrics["precision"] = float(precision_score(labels, pred, zero_division=0))
        metrics["recall"] = float(recall_score(labels, pred, zero_division=0))
    return metrics


def _figure_png(roc: tuple[np.ndarray, np.ndarray] | None, hist: tuple[np.ndarray, np.ndarray, np.ndarray],
                metrics: dict, pr: tuple[np.ndarray, np.ndarray] | None = None,
                by_type: list[tuple[str, np.ndarray]] | None = None) -> bytes:
    """Draw the report's page as PNG bytes.

    The page: the ROC curve (``roc`` = fpr, tpr) and the PR curve (``pr`` = recall, precision); the score histograms of
    normal and anomalous images (``hist`` = bin edges, normal counts, anomalous counts) with the thresholds; the scores
    per defect type (``by_type``) and the per-defect table, when the index had defect types."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = metrics.get("per_defect_type") or []
    fig = plt.figure(figsize=(12, 9.5 + 0.3 * len(rows)))
    grid = fig.add_gridspec(3, 2, height_ratios=[4, 4, 1 + 0.3 * len(rows)])
    try:
        _roc_panel(fig.add_subplot(grid[0, 0]), roc, metrics)
        _pr_panel(fig.add_subplot(grid[0, 1]), pr, metrics)
        _hist_panel(fig.add_subplot(grid[1, 0]), hist, metrics)
        _defect_panels(fig.add_subplot(grid[1, 1]), fig.add_subplot(grid[2, :]), by_type, rows, metrics)
        fig.suptitle(_headline(metrics), fontsize="medium")
    except BaseException:
        plt.close(fig)
        raise
    return png_bytes(fig, 90)


def png_bytes(fig, dpi: int) -> bytes:
    """A matplotlib figure laid out, as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        return buf.getvalue()
    finally:
        plt.close(fig)


def _headline(metrics: dict) -> str:
    """The page's first line: the image metrics, and the pixel metrics when present."""
    def num(v):
        return "n/a" if v is None else f"{v:.4f}"

    line = (f"image AUROC {num(metrics['auroc'])}, F1Max {num(metrics.get('f1_max'))}, AP "
            f"{num(metrics.get('average_precision'))}, F1 {num(metrics['f1'])} at the F1 threshold"
            f" ({metrics['n_normal']} normal, {metrics['n_anomalous']} anomalous images)")
    pixel = metrics.get("pixel")
    if pixel and pixel["pixel_auroc"] is not None:
        h, w = pixel["evaluation_size"]
        line += (f"\npixel AUROC {num(pixel['pixel_auroc'])} (±{pixel['pixel_auroc_error_bound']:.1g}), AUPRO@"
                 f"{pixel['aupro_fpr_limit']:g} {num(pixel['aupro'])} (±{pixel['aupro_error_bound']:.1g}) "
                 f"at {h}×{w}, {pixel['images']} images, {pixel['regions']} defect regions")
    return line


def _roc_panel(ax, roc, metrics: dict) -> None:
    if metrics["auroc"] is not None and roc is not None:
        ax.plot(*roc, color="tab:blue", lw=2, label="ROC")
        ax.set_title(f"ROC curve (image AUROC = {metrics['auroc']:.4f})")
    else:
        ax.set_title("ROC curve (AUROC undefined: needs both classes)")
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="false positive rate", ylabel="true positive rate")
    ax.legend(loc="lower right")


def _pr_panel(ax, pr, metrics: dict) -> None:
    if pr is not None and metrics.get("average_precision") is not None:
        ax.plot(*pr, color="tab:purple", lw=2, drawstyle="steps-post", label="PR")
        ax.set_title(f"PR curve (AP = {metrics['average_precision']:.4f}, F1Max = {metrics['f1_max']:.4f})")
        ax.legend(loc="lower left")
    else:
        ax.set_title("PR curve (undefined: needs both classes)")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision")


def _thresholds(metrics: dict) -> list[tuple[float, str, str]]:
    out = []
    if metrics["threshold"] is not None:
        source = metrics["threshold_source"].split(" (")[0]  # "validation split" or "scored set"
        out.append((metrics["threshold"], f"F1 threshold = {metrics['threshold']:.4g} ({source})", "--"))
    if metrics.get("decision"):
        out.append((metrics["decision"]["threshold"], f"decision threshold = {metrics['decision']['threshold']:.4g}",
                    ":"))
    return out


def _hist_panel(ax, hist, metrics: dict) -> None:
    edges, normal, anomalous = hist
    for counts, name, color in ((normal, "normal", "tab:green"), (anomalous, "anomalous", "tab:red")):
        if counts.sum():
            ax.stairs(counts, edges, fill=True, alpha=0.5, color=color, label=f"{name} (n={counts.sum()})")
    for value, label, style in _thresholds(metrics):
        ax.axvline(value, color="black", ls=style, lw=1.5, label=label)
    f1 = "n/a" if metrics["f1"] is None else f"{metrics['f1']:.4f}"
    ax.set(title=f"Anomaly scores (F1 at threshold = {f1})", xlabel="anomaly score", ylabel="images")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize="small")


def _defect_panels(ax, ax_table, by_type, rows: list[dict], metrics: dict) -> None:
    ax_table.axis("off")
    if not by_type:
        ax.axis("off")
        ax.set_title("no defect types (index without a defect_type column, or over the exact-row limit)")
        return
    ax.boxplot([v for _, v in by_type], vert=False, tick_labels=[n for n, _ in by_type])
    for value, label, style in _thresholds(metrics):
        ax.axvline(value, color="black", ls=style, lw=1.2, label=label)
    ax.set(title="scores per defect type", xlabel="anomaly score")
    header = ["defect type", "label", "images", "flagged", "flagged fraction", "median score"]
    cells = [[r["defect_type"], r["label"], r["images"], "n/a" if r["flagged"] is None else r["flagged"],
              "n/a" if r["flagged_fraction"] is None else f"{r['flagged_fraction']:.3f}", f"{r['score_median']:.4g}"]
             for r in rows]
    table = ax_table.table(cellText=cells, colLabels=header, loc="upper center", cellLoc="center")
    table.scale(1, 1.2)
    ax_table.set_title("per defect type, at the " + ("decision" if metrics.get("decision") else "F1") +
                       " threshold (flagged fraction: recall of a defect type, false-positive rate of a normal one)",
                       fontsize="small")


def _exact_figure_data(labels: np.ndarray, scores: np.ndarray, metrics: dict):
    from sklearn.metrics import precision_recall_curve, roc_curve

    roc = roc_curve(labels, scores)[:2] if metrics["auroc"] is not None else None
    pr = precision_recall_curve(labels, scores)[1::-1] if metrics["auroc"] is not None else None
    edges = np.histogram_bin_edges(scores, bins=min(50, max(10, int(np.sqrt(max(scores.size, 1))))))
    return roc, (edges, np.histogram(scores[labels == 0], edges)[0], np.histogram(scores[labels == 1], edges)[0]), pr


def _best_edge(h: Histograms, validation: bool | None) -> float | None:
    """The bin edge maximising F1 on the selected rows (predicted anomalous iff score >= edge; lowest on ties)."""
    c = h.at_edges(validation)
    if not c["tp"].size or not (c["tp"][0] + c["fn"][0]) or not (c["fp"][0] + c["tn"][0]):
        return None
    denom = 2 * c["tp"] + c["fp"] + c["fn"]
    f1 = np.divide(2 * c["tp"], denom, out=np.zeros(denom.shape), where=denom > 0)
    return float(c["threshold"][int(np.argmax(f1))])


def _histogram_metrics(h: Histograms, validation_rows: int) -> tuple[dict, tuple, tuple]:
    """``compute_metrics`` from histograms.

    AUROC within its bound, the threshold the best F1 bin edge, F1, precision and recall exact at that edge."""
    use_val = validation_rows > 0 and _two_classes_counts(h.select(True))
    evaluated = False if use_val else None
    c = h.select(evaluated)
    auroc, bound = h.auroc(evaluated)
    threshold = _best_edge(h, True if use_val else None)
    metrics = {"n_normal": int(c[:, 0].sum()), "n_anomalous": int(c[:, 1].sum()), "auroc": auroc,
               "auroc_error_bound": bound, "threshold": threshold, "f1": None, "precision": None, "recall": None,
               "f1_max": None, "average_precision": None,
               "threshold_source": "validation split" if use_val else "scored set",
               "method": f"histograms of {h.edges.size + 1} quantile bins per class (over {EXACT_ROWS} rows)"}
    at = h.at_edges(evaluated)
    if auroc is not None and threshold is not None:
        i = int(np.searchsorted(h.edges, threshold))
        tp, fp, fn = int(at["tp"][i]), int(at["fp"][i]), int(at["fn"][i])
        metrics["precision"] = tp / (tp + fp) if tp + fp else 0.0
        metrics["recall"] = tp / (tp + fn) if tp + fn else 0.0
        metrics["f1"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    roc = pr = None
    if auroc is not None:
        n0, n1 = c[:, 0].sum(), c[:, 1].sum()
        roc = (np.r_[1.0, at["fp"] / n0, 0.0], np.r_[1.0, at["tp"] / n1, 0.0])
        # F1Max and average precision with the bin edges (and "everything") as the thresholds: exactly scikit-learn's
        # values for the scores replaced by their bin's number (ties within a bin count as one threshold).
        tp, fp = np.r_[n1, at["tp"]][::-1], np.r_[n0, at["fp"]][::-1]  # thresholds from the highest edge down
        recall, precision = tp / n1, np.divide(tp, tp + fp, out=np.ones(tp.shape), where=tp + fp > 0)
        metrics["f1_max"] = float((2 * tp / (tp + fp + n1)).max())
        metrics["average_precision"] = float((np.diff(np.r_[0.0, recall]) * precision).sum())
        pr = (recall, precision)
    # Display bins: 50 equal widths over the inner edges, each fine bin added to the one its left edge falls in.
    inner = h.edges if h.edges.size else np.zeros(1)
    display = np.linspace(inner[0], inner[-1], 51) if inner[-1] > inner[0] else np.array([inner[0], inner[0] + 1])
    where = np.clip(np.searchsorted(display, np.r_[inner[0], inner], side="right") - 1, 0, display.size - 2)
    counts = [np.bincount(where, weights=c[:, k], minlength=display.size - 1).astype(np.int64) for k in (0, 1)]
    return metrics, (roc, pr), (display, *counts)


def _two_classes_counts(c: np.ndarray) -> bool:
    return bool(c[:, 0].sum() and c[:, 1].sum())


def _threshold_source(use_val: bool, n_val: int, n_evaluated: int) -> tuple[str, int]:
    """``threshold_source`` and the number of rows that chose the threshold (0 when the scored set did)."""
    if use_val:
        return (f"validation split ({n_val} scored rows with split == {VAL_SPLIT!r}); metrics on the other "
                f"{n_evaluated} scored rows"), n_val
    note = "no validation split: the threshold is chosen on the evaluated rows (optimistic F1)"
    if n_val:
        note = (f"the {n_val} validation rows (split == {VAL_SPLIT!r}) lack one class: the threshold is chosen on "
                "all scored rows, which are all evaluated (optimistic F1)")
        logger.warning("%s", note)
    return f"scored set ({n_evaluated} scored rows; {note})", 0


def _exact(scores_uri: str, decision: float | None = None, pixel: dict | None = None) -> tuple[dict, bytes]:
    """``evaluate``'s metrics and figure from the score columns held in memory (up to ``EXACT_ROWS`` rows)."""
    cols = read_score_columns(scores_uri)
    scores, labels, ok, val = cols["scores"], cols["labels"], cols["ok"], cols["val"]
    rows = int(ok.size)
    finite = np.isfinite(scores)
    non_finite = int((ok & ~finite).sum())
    if non_finite:
        logger.warning("%d scored row(s) of %s have a non-finite score; counted as failed", non_finite, scores_uri)
    ok &= finite
    val_ok, test_ok = ok & val, ok & ~val
    n_val = int(val_ok.sum())
    use_val = bool(n_val and _two_classes(labels[val_ok]))
    if use_val:
        metrics = compute_metrics(labels[test_ok], scores[test_ok], labels[val_ok], scores[val_ok])
    else:
        test_ok = ok
        metrics = compute_metrics(labels[test_ok], scores[test_ok])
    metrics["threshold_source"], n_val = _threshold_source(use_val, n_val, int(test_ok.sum()))
    metrics.update({"scores": scores_uri, "rows": rows, "scored": int(ok.sum()), "failed": rows - int(ok.sum()),
                    "n_validation": n_val, "auroc_error_bound": 0.0 if metrics["auroc"] is not None else None,
                    "method": "exact", "pixel": pixel})
    if decision is not None:
        metrics["decision"] = decision_metrics(labels[test_ok], scores[test_ok], decision)
    by_type = None
    if cols["defects"] is not None:
        codes, names = cols["defects"]
        at = decision if decision is not None else metrics["threshold"]
        metrics["per_defect_type"] = per_defect_type(labels[test_ok], scores[test_ok], codes[test_ok], names, at)
        by_type = [(r["defect_type"], scores[test_ok][codes[test_ok] == (names.index(r["defect_type"])
                                                                          if r["defect_type"] in names else -1)])
                   for r in metrics["per_defect_type"]]
    roc, hist, pr = _exact_figure_data(labels[test_ok], scores[test_ok], metrics)
    return metrics, _figure_png(roc, hist, metrics, pr, by_type)


def _histogram(scores_uri: str, pixel: dict | None) -> tuple[dict, bytes]:
    """``evaluate``'s metrics and figure from streamed histograms (above ``EXACT_ROWS`` rows)."""
    h = Histograms.from_scores(scores_uri)
    n_val = int(h.select(True).sum())
    metrics, (roc, pr), hist = _histogram_metrics(h, n_val)
    use_val = metrics["threshold_source"] == "validation split"
    metrics["threshold_source"], n_val = _threshold_source(
        use_val, n_val, int(h.select(False).sum()) if use_val else h.finite)
    if h.scored > h.finite:
        logger.warning("%d scored row(s) of %s have a non-finite score; counted as failed", h.scored - h.finite,
                       scores_uri)
    metrics.update({"scores": scores_uri, "rows": h.rows, "scored": h.finite, "failed": h.rows - h.finite,
                    "n_validation": n_val, "pixel": pixel})
    return metrics, _figure_png(roc, hist, metrics, pr)


def decision_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict | None:
    """Precision, recall and F1 of the decisions ``score >= threshold`` (None when ``labels`` lacks a class)."""
    from sklearn.metrics import f1_score, precision_score, recall_score

    if not _two_classes(labels):
        return None
    pred = (np.asarray(scores) >= threshold).astype(int)
    return {"threshold": float(threshold), "rows": int(len(labels)), "anomalous": int(pred.sum()),
            "f1": float(f1_score(labels, pred, zero_division=0)),
            "precision": float(precision_score(labels, pred, zero_division=0)),
            "recall": float(recall_score(labels, pred, zero_division=0))}


def evaluate(scores_uri: str, out_dir: str, exact_rows: int = EXACT_ROWS, decision: float | None = None,
             pixel_size: tuple[int, int] | None = None) -> dict:
    """Metrics and a figure for a scores dataset; writes ``metrics.json`` and ``report.png`` into ``out_dir``.

    Rows with ``split == "val"`` (when the column exists and holds such rows) choose the F1-adaptive threshold and
    the metrics are reported on the other scored rows; otherwise the threshold is chosen on the scored rows
    themselves (optimistic: say so when quoting F1), as ``threshold_source`` records. If the validation rows lack
    one class, the threshold is chosen on, and the metrics reported on, all scored rows, with a warning. Rows with
    an ``error`` or a null or non-finite score count as failed and are left out of the metrics.

    Exact up to ``exact_rows`` rows (``summary.EXACT_ROWS``): the score (float64), label (int64) and two booleans
    (scored, validation) are held on the driver, and scikit-learn's ROC/PR curves sort the scores and add a few
    temporary arrays of the same length. Above, the parts are streamed twice (a million rows at a time) into
    ``summary.Histograms``: the driver holds O(bins) numbers whatever the number of rows; AUROC comes with
    ``auroc_error_bound``, the threshold is the best bin edge and F1, precision and recall are exact at it. The error
    text and the split strings are reduced to booleans by the parquet scanner in both cases.

    Args:
        scores_uri: the parquet dataset written by scoring (directory or file, local path or URI).
        out_dir: output directory (local path or URI), created when missing.

    ``decision``: the threshold the scores were decided with (``decisions``); ``decision`` in the metrics then holds
    precision, recall and F1 at it on the evaluated rows (exact mode only; above ``exact_rows`` it is left out).
    ``pixel_size``: for DFM ``fre`` scores of an index with masks, ``pixel`` in the metrics holds the pixel AUROC and
    AUPRO at this evaluation resolution (the model's input size; ``pixels.pixel_metrics``, on Ray tasks when Ray runs).

    Returns:
        The metrics of :func:`compute_metrics` plus ``scores``, ``rows``, ``scored``, ``failed``,
        ``n_validation`` (rows that chose the threshold), ``method``, ``auroc_error_bound`` (0 when exact) and
        ``decision`` (or None).

    Raises:
        ValueError: no ``label`` or ``anomaly_score`` column, or labels outside {0, 1} on scored rows.
    """
    pixel = None
    if pixel_size is not None:
        pixel = pixel_metrics(scores_uri, pixel_size)
    if count_rows(open_scores(scores_uri)) > exact_rows:
        metrics, png = _histogram(scores_uri, pixel)
    else:
        metrics, png = _exact(scores_uri, decision, pixel)

    fs, path = resolve_filesystem(out_dir)
    fs.create_dir(path, recursive=True)
    base = path.rstrip("/") or path
    with fs.open_output_stream(f"{base}/{METRICS_FILE}") as f:
        f.write(json.dumps(metrics, indent=2, sort_keys=True).encode() + b"\n")
    with fs.open_output_stream(f"{base}/{FIGURE_FILE}") as f:
        f.write(png)
    logger.info("report for %s: %d rows, %d scored, %d failed, AUROC %s, F1 %s (threshold %s) -> %s", scores_uri,
                metrics["rows"], metrics["scored"], metrics["failed"], metrics["auroc"], metrics["f1"],
                metrics["threshold"], out_dir)
    return metrics


REPORT_FILES = (METRICS_FILE, FIGURE_FILE, "heatmaps", "boxes", "regions")
REPORT_SUFFIX = "-report"


def report_dir_of(scores_uri: str) -> str:
    """Where the report of a scores directory goes, in every job: beside it, ``SCORES-report``.

    ``runs/r1/scores`` -> ``runs/r1/scores-report``, since the scores directory holds parquet parts only."""
    return scores_uri.rstrip("/") + REPORT_SUFFIX
_PICTURES = (("heatmaps", ".png"), ("boxes", ".png"), ("regions", ".parquet"))


def check_report(config, report_dir: str, evaluate: bool, heatmaps: int = 0, boxes: int = 0,
                 region_rows: bool = False) -> None:
    """Check, before any work, that the pictures asked for can be made and the report directory can be written.

    Pictures and region rows need a model with those outputs (``ModelSpec.columns``: an anomaly map for heat maps, boxes
    for box overlays and region rows), and the report directory may hold only report files (rewritten each run).
    ``config`` None: no pictures asked for."""
    columns = _columns(config)
    if heatmaps and (heatmaps < 0 or MAP_COL not in columns):
        raise UserError(f"invalid heatmaps={heatmaps}: heat maps need a DFM model with score_type 'fre' (outputs "
                        "with anomaly maps) and N > 0")
    if (boxes or region_rows) and (boxes < 0 or BOXES_COL not in columns):
        raise UserError(f"invalid boxes={boxes}, region_rows={region_rows}: they need an RKDE model (outputs with "
                        "boxes) and N > 0")
    if evaluate or heatmaps or boxes or region_rows:
        check_output_dir(report_dir, REPORT_FILES.__contains__, overwrite=True)
        for sub, suffix in _PICTURES:
            check_output_dir(f"{report_dir}/{sub}", lambda n, s=suffix: n.endswith(s), overwrite=True)


def _columns(config) -> tuple[str, ...]:
    return spec_of(config).columns(config) if config is not None else ()


def write_report(scores_uri: str, report_dir: str, evaluate_scores: bool, heatmaps: int = 0, boxes: int = 0,
                 region_rows: bool = False, decision: float | None = None, config=None) -> dict:
    """Write the report into ``report_dir``: metrics, figure, and the pictures asked for.

    That is metrics.json + report.png (``evaluate_scores``; with ``decision``, the threshold the scores were decided
    with, the metrics at it too; for a ``config`` with anomaly maps, the pixel metrics where the index had masks), heat
    maps of the ``heatmaps`` most anomalous images, box overlays of the ``boxes`` most anomalous, one row per region
    (``region_rows``). Files of an earlier report are replaced.

    Returns ``report_dir``, ``metrics`` (``evaluate``'s, or None) and, per picture kind written, its directory and file
    count (``regions``: its directory and the regions written)."""
    written: dict = {"metrics": None, "report_dir": report_dir}
    if not (evaluate_scores or heatmaps or boxes or region_rows):
        return written
    prepare_output_dir(report_dir, REPORT_FILES.__contains__, overwrite=True)
    if evaluate_scores:
        pixel_size = config.image_size if MAP_COL in _columns(config) else None
        written["metrics"] = evaluate(scores_uri, report_dir, decision=decision, pixel_size=pixel_size)
    counts = {"heatmaps": heatmaps, "boxes": boxes, "regions": int(region_rows)}
    writers = {"heatmaps": maps.write_heatmaps, "boxes": maps.write_box_overlays,
               "regions": lambda scores, target, _: maps.write_region_rows(scores, target)}
    for sub, suffix in _PICTURES:
        if not counts[sub]:
            continue
        target = f"{report_dir}/{sub}"
        fs, path = resolve_filesystem(target)
        for name in prepare_output_dir(target, lambda n, s=suffix: n.endswith(s), overwrite=True):
            fs.delete_file(f"{path}/{name}")  # files of an earlier run
        result = writers[sub](scores_uri, target, counts[sub])
        written[sub] = (target, result if isinstance(result, int) else len(result))
    return written
