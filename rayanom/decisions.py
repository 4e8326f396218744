"""Decision stage: a threshold that travels with the model, and the two decision columns of the scores.

The threshold lives beside the model in its own file, ``MODEL_DIR/threshold.json``, outside the artifact: the model's
fingerprint, its reuse by ``jobs/fit.py`` and the resume of a scores directory never change with it. It holds the
F1-adaptive threshold ``t`` chosen on the labelled ``val`` rows of a scores dataset (or a value set by hand) and the
normalisation statistics, the smallest and largest validation score. Scores then get
``is_anomalous`` = ``anomaly_score >= t`` and ``normalized_score`` = clip((s - t) / (max - min) + 0.5, 0, 1),
anomalib's min-max normalisation (the threshold maps to 0.5); both are null on a failed row, and both are null
everywhere without a threshold (``normalized_score`` alone without statistics). ``anomaly_score`` never changes.

Each part records the threshold it was decided with in its parquet metadata (``META_KEY``), so a new threshold is
applied to existing scores part by part (``parts.apply_to_parts``), touching only the parts decided with another one.
A leaf: numpy, pyarrow and the column names only, so the scoring actors import it without the orchestration.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from rayanom.columns import DECISION_COL, ERROR_COL, NORMALIZED_COL, SCORE_COL
from rayanom.config import UserError
from rayanom.storage import resolve_filesystem

logger = logging.getLogger(__name__)

THRESHOLD_FILE = "threshold.json"
FORMAT = "rayanom-threshold"
META_KEY = b"rayanom_threshold"
NO_THRESHOLD = ("no threshold: is_anomalous and normalized_score are null (score an index with labelled 'val' rows "
                "holding both classes, or pass --threshold VALUE)")


@dataclass(frozen=True)
class Threshold:
    """A decision threshold and the normalisation statistics that go with it."""

    value: float
    min: float | None = None  # normalisation statistics: the validation scores' range
    max: float | None = None
    source: str = "manual"

    def to_json(self) -> dict:
        return {"format": FORMAT, "format_version": 1, **asdict(self)}

    def key(self) -> bytes:
        """What a part records of the threshold its decisions were made with."""
        return json.dumps([self.value, self.min, self.max]).encode()


def key_of(t: Threshold | None) -> bytes:
    """The metadata value of a part decided with ``t`` (``b"null"`` for no threshold)."""
    return t.key() if t is not None else b"null"


def from_key(key: bytes) -> Threshold | None:
    """The threshold a part's ``key_of`` value describes (its source is not recorded)."""
    return None if key == b"null" else Threshold(*json.loads(key))


def f1_adaptive_threshold(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """The threshold maximising F1 when a sample is predicted anomalous iff ``score >= threshold``.

    The candidates are the thresholds of :func:`sklearn.metrics.precision_recall_curve` (distinct score values,
    compared with ``>=``, so tied scores always fall on the same side). On equal F1 the lowest threshold wins.

    Returns:
        The threshold, or None when ``labels`` does not hold both classes.
    """
    from sklearn.metrics import precision_recall_curve  # scikit-learn: a second and a half of start-up

    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    if not (np.any(labels == 0) and np.any(labels == 1)):
        return None
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    # The last (precision, recall) = (1, 0) has no threshold.
    p, r = precision[:-1], recall[:-1]
    denom = p + r
    f1 = np.divide(2 * p * r, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(thresholds[int(np.argmax(f1))])


def val_threshold(labels: np.ndarray, scores: np.ndarray) -> Threshold | None:
    """The F1-adaptive threshold of labelled validation rows, with their score range; None without both classes."""
    t = f1_adaptive_threshold(labels, scores)
    if t is None:
        return None
    return Threshold(t, float(scores.min()), float(scores.max()), f"F1-adaptive on {len(scores)} val rows")


def decisions(scores: np.ndarray, scored: np.ndarray, t: Threshold | None) -> tuple[pa.Array, pa.Array]:
    """``is_anomalous`` and ``normalized_score`` for float64 ``scores`` (``scored``: rows with a score)."""
    n = len(scores)
    if t is None:
        return pa.nulls(n, pa.bool_()), pa.nulls(n, pa.float64())
    anomalous = pa.array(scores >= t.value, pa.bool_(), mask=~scored)
    if t.min is None or t.max is None:
        return anomalous, pa.nulls(n, pa.float64())
    span = t.max - t.min if t.max > t.min else 1.0  # one validation score: no range to scale by
    normalized = np.clip((scores - t.value) / span + 0.5, 0.0, 1.0)
    return anomalous, pa.array(normalized, pa.float64(), mask=~scored)


def with_decisions(table: pa.Table, t: Threshold | None) -> pa.Table:
    """``table`` (a scores part) with its two decision columns set for ``t`` and ``t`` recorded in its metadata.

    The columns are replaced where present, else added before ``error``."""
    score = table.column(SCORE_COL).to_numpy(zero_copy_only=False).astype(np.float64)
    scored = table.column(SCORE_COL).is_valid().to_numpy(zero_copy_only=False)
    scored &= table.column(ERROR_COL).is_null().to_numpy(zero_copy_only=False)
    anomalous, normalized = decisions(np.nan_to_num(score), scored, t)
    table = table.drop_columns([c for c in (DECISION_COL, NORMALIZED_COL) if c in table.column_names])
    at = table.schema.get_field_index(ERROR_COL)
    table = table.add_column(at, DECISION_COL, anomalous).add_column(at + 1, NORMALIZED_COL, normalized)
    meta = dict(table.schema.metadata or {})
    meta[META_KEY] = key_of(t)
    return table.replace_schema_metadata(meta)


def save_threshold(model_dir: str, t: Threshold, model_fingerprint: str) -> None:
    """Store ``t`` beside the model at ``model_dir``, for the model with this fingerprint."""
    fs, path = resolve_filesystem(model_dir)
    with fs.open_output_stream(f"{path}/{THRESHOLD_FILE}") as f:
        f.write(json.dumps({**t.to_json(), "model": model_fingerprint}, indent=2, sort_keys=True).encode())
    logger.info("threshold %.6g (%s) written to %s/%s", t.value, t.source, model_dir, THRESHOLD_FILE)


def load_threshold(model_dir: str, model_fingerprint: str) -> Threshold | None:
    """The threshold stored beside the model, or None: none there, or one made for another model (logged)."""
    fs, path = resolve_filesystem(model_dir)
    file = f"{path}/{THRESHOLD_FILE}"
    if fs.get_file_info(file).type == pafs.FileType.NotFound:
        return None
    try:
        with fs.open_input_file(file) as f:
            record = json.loads(f.read())
        if record.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        t = Threshold(float(record["value"]), record.get("min"), record.get("max"), record.get("source", "manual"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        msg = f"invalid {model_dir}/{THRESHOLD_FILE}: {e}"
        raise UserError(msg) from e
    if record.get("model") != model_fingerprint:
        logger.warning("%s/%s was chosen for another model (refitted since): ignored", model_dir, THRESHOLD_FILE)
        return None
    return t
