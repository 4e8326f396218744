"""Reading a scores directory: the dataset, its row count, and the score columns streamed or held.

The one reader of the parquet parts scoring writes (``parts``), for the summary, the report, the comparison, the
pictures and the threshold: each opens the directory and reads the score columns through these functions. The error
text and the split strings are reduced to booleans by the parquet scanner, never held whole.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from rayanom.columns import DEFECT_COL, ERROR_COL, LABEL_COL, PATH_COL, SCORE_COL, SPLIT_COL
from rayanom.config import UserError
from rayanom.storage import resolve_filesystem

VAL_SPLIT = "val"  # rows with this ``split`` value choose the threshold; metrics are reported on the other rows
BATCH_ROWS = 1 << 20  # rows a streamed batch holds at most


def open_scores(scores_uri: str, checked: bool = False) -> pads.Dataset:
    """The parquet dataset of a scores directory (or file), without its hidden names (``_``, ``.``).

    ``checked``: files that are not parquet are left out, and a directory that is no scores dataset (no
    ``anomaly_score`` and ``path`` columns) is a UserError naming ``scores_uri``."""
    fs, path = resolve_filesystem(scores_uri)
    if not checked:
        return pads.dataset(path, filesystem=fs, format="parquet")
    try:
        dataset = pads.dataset(path, filesystem=fs, format="parquet", exclude_invalid_files=True)
    except (OSError, pa.ArrowInvalid) as e:
        msg = f"invalid scores={scores_uri!r}: not a parquet dataset ({e})"
        raise UserError(msg) from e
    missing = [c for c in (SCORE_COL, PATH_COL) if c not in dataset.schema.names]
    if missing:
        msg = (f"invalid scores={scores_uri!r}: no {missing} column(s); expected a directory written by score.py or "
               "fit.py")
        raise UserError(msg)
    return dataset


def count_rows(dataset: pads.Dataset) -> int:
    """Rows of a scores dataset, from the parquet footers."""
    return sum(f.metadata.num_rows for f in dataset.get_fragments())


def score_values(table: pa.Table | pa.RecordBatch) -> np.ndarray:
    """The ``anomaly_score`` column as float64, NaN where null."""
    return pc.fill_null(table.column(SCORE_COL).cast("float64"), np.nan).to_numpy(zero_copy_only=False)


def _projection(names: list[str], with_labels: bool, with_defects: bool = False) -> dict:
    """The columns the scanner computes: score, is-scored (``_ok``), and label, is-validation (``_val``), defect."""
    columns = {SCORE_COL: pc.field(SCORE_COL)}
    if with_labels and LABEL_COL in names:
        columns[LABEL_COL] = pc.field(LABEL_COL)
    if ERROR_COL in names:
        columns["_ok"] = pc.field(ERROR_COL).is_null()
    if with_labels and SPLIT_COL in names:
        columns["_val"] = pc.field(SPLIT_COL) == VAL_SPLIT
    if with_defects and DEFECT_COL in names:
        columns[DEFECT_COL] = pc.field(DEFECT_COL)
    return columns


def _flags(table, columns: dict) -> tuple[np.ndarray, np.ndarray]:
    """Is-scored (a score and no error) and is-validation arrays of a projected table or batch."""
    ok = table.column(SCORE_COL).is_valid().to_numpy(zero_copy_only=False)
    if "_ok" in columns:
        ok &= pc.fill_null(table.column("_ok"), False).to_numpy(zero_copy_only=False)
    val = (pc.fill_null(table.column("_val"), False).to_numpy(zero_copy_only=False) if "_val" in columns
           else np.zeros(len(ok), dtype=bool))
    return ok, val


def stream_score_columns(dataset: pads.Dataset, with_labels: bool) -> Iterator[dict[str, np.ndarray]]:
    """Batches of ``BATCH_ROWS`` rows as numpy columns.

    The columns: ``scores`` (NaN where null), ``ok``, and with labels: ``labels`` (-1 where null) and ``val``."""
    columns = _projection(dataset.schema.names, with_labels)
    for batch in dataset.to_batches(columns=columns, batch_size=BATCH_ROWS):
        ok, val = _flags(batch, columns)
        out = {"scores": score_values(batch), "ok": ok}
        if with_labels:
            out["labels"] = pc.fill_null(batch.column(LABEL_COL).cast("int64"), -1).to_numpy(zero_copy_only=False)
            out["val"] = val
        yield out


def read_score_columns(scores_uri: str, require_labels: bool = True,
                       only_val: bool = False) -> dict[str, np.ndarray | None]:
    """Score, label, is-scored and is-validation arrays, and the defect types, with nothing else materialised.

    ``defects`` is the ``defect_type`` column dictionary-encoded: (codes, names), codes -1 where null; None without the
    column. The error text is not materialised.

    ``labels`` is None when the dataset has no usable labels and ``require_labels`` is False; with it True (the report),
    a missing ``label`` column, a null label or a value other than 0/1 on a scored row is a ValueError. ``only_val``:
    the ``val`` rows alone, filtered by the scanner (the driver holds those rows, not the dataset).
    """
    dataset = open_scores(scores_uri)
    names = dataset.schema.names
    required = ((SCORE_COL, "the anomaly scores"), (LABEL_COL, "ground truth 0 (normal) / 1 (anomalous)"))
    for col, why in required[:2 if require_labels else 1]:
        if col not in names:
            msg = f"evaluation needs a {col!r} column ({why}); {scores_uri!r} has columns {names}"
            raise ValueError(msg)
    if only_val and SPLIT_COL not in names:
        return {"scores": np.zeros(0), "labels": None, "ok": np.zeros(0, bool), "val": np.zeros(0, bool),
                "defects": None}
    columns = _projection(names, with_labels=True, with_defects=True)
    table = dataset.to_table(columns=columns, filter=(pc.field(SPLIT_COL) == VAL_SPLIT) if only_val else None)
    ok, val = _flags(table, columns)
    try:
        labels = _labels(table, ok, scores_uri) if LABEL_COL in columns else None
    except ValueError:
        if require_labels:
            raise
        labels = None
    defects = None
    if DEFECT_COL in columns:
        encoded = pc.dictionary_encode(table.column(DEFECT_COL).cast("string")).combine_chunks()
        defects = (pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64),
                   encoded.dictionary.to_pylist())
    return {"scores": score_values(table), "labels": labels, "ok": ok, "val": val, "defects": defects}


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
