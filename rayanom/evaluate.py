"""Reading a scores dataset: row accounting and, where the index had labels, image AUROC (scikit-learn).

``read_score_columns`` is shared with the report stage (``report``), which adds thresholds, F1 and a figure.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads

from rayanom.data import ERROR_COL, LABEL_COL, SCORE_COL, SPLIT_COL, resolve_filesystem

logger = logging.getLogger(__name__)

VAL_SPLIT = "val"  # rows with this ``split`` value choose the threshold; metrics are reported on the other rows


def summarize(output: str) -> dict:
    """Counts of scored and failed rows and the image AUROC on raw scores of all scored rows (None without labels
    or without both classes). Holds four small arrays per row in driver memory, never the error text."""
    from sklearn.metrics import roc_auc_score

    cols = read_score_columns(output, require_labels=False)
    ok, labels = cols["ok"], cols["labels"]
    summary = {"output": output, "rows": int(ok.size), "scored": int(ok.sum()), "failed": int((~ok).sum()),
               "auroc": None}
    if labels is not None:
        use = ok & np.isfinite(cols["scores"])
        labels, scores = labels[use], cols["scores"][use]
        if np.any(labels == 0) and np.any(labels == 1):
            summary["auroc"] = float(roc_auc_score(labels, scores))
            summary["n_normal"], summary["n_anomalous"] = int((labels == 0).sum()), int((labels == 1).sum())
    return summary


def read_score_columns(scores_uri: str, require_labels: bool = True) -> dict[str, np.ndarray | None]:
    """Score, label, is-scored and is-validation arrays; only these (not the error text) are materialised.

    ``labels`` is None when the dataset has no usable labels and ``require_labels`` is False; with it True (the
    report), a missing ``label`` column, a null label or a value other than 0/1 on a scored row is a ValueError.
    """
    fs, path = resolve_filesystem(scores_uri)
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    names = dataset.schema.names
    required = ((SCORE_COL, "the anomaly scores"), (LABEL_COL, "ground truth 0 (normal) / 1 (anomalous)"))
    for col, why in required[:2 if require_labels else 1]:
        if col not in names:
            msg = f"evaluation needs a {col!r} column ({why}); {scores_uri!r} has columns {names}"
            raise ValueError(msg)
    # Projections computed by the scanner: the error text and the split strings are never held whole.
    columns = {SCORE_COL: pc.field(SCORE_COL)}
    if LABEL_COL in names:
        columns[LABEL_COL] = pc.field(LABEL_COL)
    if ERROR_COL in names:
        columns["_ok"] = pc.field(ERROR_COL).is_null()
    if SPLIT_COL in names:
        columns["_val"] = pc.field(SPLIT_COL) == VAL_SPLIT
    table = dataset.to_table(columns=columns)
    n = table.num_rows
    score_col = table.column(SCORE_COL)
    ok = score_col.is_valid().to_numpy(zero_copy_only=False)
    if "_ok" in columns:
        ok &= table.column("_ok").to_numpy(zero_copy_only=False)
    val = (pc.fill_null(table.column("_val"), False).to_numpy(zero_copy_only=False) if "_val" in columns
           else np.zeros(n, dtype=bool))
    scores = pc.fill_null(score_col.cast("float64"), np.nan).to_numpy(zero_copy_only=False)
    try:
        labels = _labels(table, ok, scores_uri) if LABEL_COL in columns else None
    except ValueError:
        if require_labels:
            raise
        labels = None
    return {"scores": scores, "labels": labels, "ok": ok, "val": val}


def _labels(table, ok: np.ndarray, scores_uri: str) -> np.ndarray:
    """The label column as int64 (-1 where null); a null or a value other than 0/1 on a scored row is an error."""
    label_col = table.column(LABEL_COL)
    if label_col.null_count:
        bad = ok & ~label_col.is_valid().to_numpy(zero_copy_only=False)
        if bad.any():
            msg = f"{scores_uri!r}: {int(bad.sum())} scored row(s) have a null 'label'; expected 0 or 1"
            raise ValueError(msg)
    labels = pc.fill_null(label_col.cast("int64"), -1).to_numpy(zero_copy_only=False)
    bad_values = np.unique(labels[ok & (labels != 0) & (labels != 1)])
    if bad_values.size:
        msg = f"{scores_uri!r}: column 'label' holds {bad_values[:5].tolist()}; allowed values are 0 and 1"
        raise ValueError(msg)
    return labels
