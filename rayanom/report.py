"""Report stage: metrics (image AUROC, F1 at the F1-adaptive threshold) and a figure for a scores dataset.

Reads the parquet dataset written by scoring (``anomaly_score``, ``error``, ``label``, optionally ``split``) and
writes ``metrics.json`` and ``report.png`` (ROC curve and score histograms) to an output directory, local or URI.
"""

from __future__ import annotations

import io
import json
import logging

import numpy as np

from rayanom.data import resolve_filesystem
from rayanom.evaluate import VAL_SPLIT, read_score_columns

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
FIGURE_FILE = "report.png"


def _two_classes(labels: np.ndarray) -> bool:
    return bool(np.any(labels == 0) and np.any(labels == 1))


def f1_adaptive_threshold(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """The threshold maximising F1 when a sample is predicted anomalous iff ``score >= threshold``.

    The candidates are the thresholds of :func:`sklearn.metrics.precision_recall_curve` (distinct score values,
    compared with ``>=``, so tied scores always fall on the same side). On equal F1 the lowest threshold wins.

    Returns:
        The threshold, or None when ``labels`` does not hold both classes.
    """
    from sklearn.metrics import precision_recall_curve

    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    if not _two_classes(labels):
        return None
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    # The last (precision, recall) = (1, 0) has no threshold.
    p, r = precision[:-1], recall[:-1]
    denom = p + r
    f1 = np.divide(2 * p * r, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(thresholds[int(np.argmax(f1))])


def compute_metrics(labels: np.ndarray, scores: np.ndarray, threshold_labels: np.ndarray | None = None,
                    threshold_scores: np.ndarray | None = None) -> dict:
    """Image AUROC and precision, recall and F1 at the F1-adaptive threshold.

    Args:
        labels: 0 (normal) or 1 (anomalous), one per sample of the evaluated set.
        scores: anomaly scores (higher = more anomalous), same length as ``labels``.
        threshold_labels: labels of a validation split that chooses the threshold; None uses ``labels``.
        threshold_scores: scores of that validation split; given together with ``threshold_labels``.

    Returns:
        ``auroc`` (on raw scores), ``threshold`` (predicted anomalous iff ``score >= threshold``),
        ``threshold_source`` (``"validation split"`` or ``"scored set"``), ``f1``, ``precision``, ``recall``
        (on ``labels``/``scores`` at that threshold), ``n_normal`` and ``n_anomalous``. ``auroc`` is None when the
        evaluated set lacks a class; ``threshold`` is None when the set that chooses it lacks a class; ``f1``,
        ``precision`` and ``recall`` are None when either is.

    Raises:
        ValueError: mismatched lengths, or only one of ``threshold_labels``/``threshold_scores`` given.
    """
    from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

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
               "recall": None}
    evaluable = _two_classes(labels)
    if evaluable:
        metrics["auroc"] = float(roc_auc_score(labels, scores))
    threshold = f1_adaptive_threshold(t_labels, t_scores)
    metrics["threshold"] = threshold
    if evaluable and threshold is not None:
        pred = (scores >= threshold).astype(int)
        metrics["f1"] = float(f1_score(labels, pred, zero_division=0))
        metrics["precision"] = float(precision_score(labels, pred, zero_division=0))
        metrics["recall"] = float(recall_score(labels, pred, zero_division=0))
    return metrics


def _figure_png(labels: np.ndarray, scores: np.ndarray, metrics: dict) -> bytes:
    """Two panels: the ROC curve, and the score histograms of normal and anomalous images with the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, (ax_roc, ax_hist) = plt.subplots(1, 2, figsize=(11, 4.5))
    try:
        if metrics["auroc"] is not None:
            fpr, tpr, _ = roc_curve(labels, scores)
            ax_roc.plot(fpr, tpr, color="tab:blue", lw=2, label="ROC")
            ax_roc.set_title(f"ROC curve (image AUROC = {metrics['auroc']:.4f})")
        else:
            ax_roc.set_title("ROC curve (AUROC undefined: needs both classes)")
        ax_roc.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="chance")
        ax_roc.set_xlim(0, 1)
        ax_roc.set_ylim(0, 1.02)
        ax_roc.set_xlabel("false positive rate")
        ax_roc.set_ylabel("true positive rate")
        ax_roc.legend(loc="lower right")

        if scores.size:
            edges = np.histogram_bin_edges(scores, bins=min(50, max(10, int(np.sqrt(scores.size)))))
            for value, name, color in ((0, "normal", "tab:green"), (1, "anomalous", "tab:red")):
                sel = scores[labels == value]
                if sel.size:
                    ax_hist.hist(sel, bins=edges, alpha=0.5, color=color, label=f"{name} (n={sel.size})")
        if metrics["threshold"] is not None:
            source = metrics["threshold_source"].split(" (")[0]  # "validation split" or "scored set"
            ax_hist.axvline(metrics["threshold"], color="black", ls="--", lw=1.5,
                            label=f"threshold = {metrics['threshold']:.4g} ({source})")
        f1 = "n/a" if metrics["f1"] is None else f"{metrics['f1']:.4f}"
        ax_hist.set_title(f"Anomaly scores (F1 at threshold = {f1})")
        ax_hist.set_xlabel("anomaly score")
        ax_hist.set_ylabel("images")
        if ax_hist.get_legend_handles_labels()[0]:
            ax_hist.legend(loc="upper right", fontsize="small")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
    finally:
        plt.close(fig)
    return buf.getvalue()


def evaluate(scores_uri: str, out_dir: str) -> dict:
    """Metrics and a figure for a scores dataset; writes ``metrics.json`` and ``report.png`` into ``out_dir``.

    Rows with ``split == "val"`` (when the column exists and holds such rows) choose the F1-adaptive threshold and
    the metrics are reported on the other scored rows; otherwise the threshold is chosen on the scored rows
    themselves (optimistic: say so when quoting F1), as ``threshold_source`` records. If the validation rows lack
    one class, the threshold is chosen on, and the metrics reported on, all scored rows, with a warning. Rows with
    an ``error`` or a null or non-finite score count as failed and are left out of the metrics.

    Memory: only the score (float64), label (int64) and two booleans (scored, validation) are held on the driver,
    about 18 bytes per row (16-24 with Arrow buffers), e.g. 10 million rows ~ 240 MB at most; the error text and
    the split strings are reduced to booleans by the parquet scanner. scikit-learn's ROC/PR curves sort the scores
    and add a few temporary arrays of the same length.

    Args:
        scores_uri: the parquet dataset written by scoring (directory or file, local path or URI).
        out_dir: output directory (local path or URI), created when missing.

    Returns:
        The metrics of :func:`compute_metrics` plus ``scores``, ``rows``, ``scored``, ``failed`` and
        ``n_validation`` (rows that chose the threshold).

    Raises:
        ValueError: no ``label`` or ``anomaly_score`` column, or labels outside {0, 1} on scored rows.
    """
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
    if n_val and _two_classes(labels[val_ok]):
        metrics = compute_metrics(labels[test_ok], scores[test_ok], labels[val_ok], scores[val_ok])
        metrics["threshold_source"] = (f"validation split ({n_val} scored rows with split == {VAL_SPLIT!r}); "
                                       f"metrics on the other {int(test_ok.sum())} scored rows")
    else:
        note = "no validation split: the threshold is chosen on the evaluated rows (optimistic F1)"
        if n_val:
            note = (f"the {n_val} validation rows (split == {VAL_SPLIT!r}) lack one class: the threshold is chosen "
                    "on all scored rows, which are all evaluated (optimistic F1)")
            logger.warning("%s", note)
            n_val, test_ok = 0, ok
        metrics = compute_metrics(labels[test_ok], scores[test_ok])
        metrics["threshold_source"] = f"scored set ({int(test_ok.sum())} scored rows; {note})"
    metrics.update({"scores": scores_uri, "rows": rows, "scored": int(ok.sum()), "failed": rows - int(ok.sum()),
                    "n_validation": n_val})
    png = _figure_png(labels[test_ok], scores[test_ok], metrics)

    fs, path = resolve_filesystem(out_dir)
    fs.create_dir(path, recursive=True)
    base = path.rstrip("/") or path
    with fs.open_output_stream(f"{base}/{METRICS_FILE}") as f:
        f.write(json.dumps(metrics, indent=2, sort_keys=True).encode() + b"\n")
    with fs.open_output_stream(f"{base}/{FIGURE_FILE}") as f:
        f.write(png)
    logger.info("report for %s: %d rows, %d scored, %d failed, AUROC %s, F1 %s (threshold %s) -> %s", scores_uri,
                rows, metrics["scored"], metrics["failed"], metrics["auroc"], metrics["f1"], metrics["threshold"],
                out_dir)
    return metrics
