"""Evaluation of a scores dataset: row accounting and, where the index had labels, image AUROC (scikit-learn)."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow.dataset as pads

from rayanom.data import ERROR_COL, LABEL_COL, SCORE_COL, resolve_filesystem

logger = logging.getLogger(__name__)


def summarize(output: str) -> dict:
    """Counts of scored and failed rows and the image AUROC on raw scores (None without both classes).

    Reads only the ``anomaly_score``, ``error`` and ``label`` columns: 16 bytes per row in driver memory.
    """
    from sklearn.metrics import roc_auc_score

    fs, path = resolve_filesystem(output)
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    columns = [c for c in (SCORE_COL, ERROR_COL, LABEL_COL) if c in dataset.schema.names]
    table = dataset.to_table(columns=columns)
    ok = table.column(ERROR_COL).is_null().to_numpy(zero_copy_only=False)
    summary = {"output": output, "rows": table.num_rows, "scored": int(ok.sum()), "failed": int((~ok).sum()),
               "auroc": None}
    if LABEL_COL in columns:
        labels = table.column(LABEL_COL).to_numpy(zero_copy_only=False)[ok].astype(int)
        scores = table.column(SCORE_COL).to_numpy(zero_copy_only=False)[ok].astype(np.float64)
        if len(np.unique(labels)) == 2:
            summary["auroc"] = float(roc_auc_score(labels, scores))
            summary["n_normal"], summary["n_anomalous"] = int((labels == 0).sum()), int((labels == 1).sum())
    return summary
