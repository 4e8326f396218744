"""Decision stage: a threshold that travels with the model, and the two decision columns of the scores.

The threshold lives beside the model in its own file, ``MODEL_DIR/threshold.json``, outside the artifact: the model's
fingerprint, its reuse by ``jobs/fit.py`` and the resume of a scores directory never change with it. It holds the
F1-adaptive threshold ``t`` chosen on the labelled ``val`` rows of a scores dataset (or a value set by hand) and the
normalisation statistics, the smallest and largest validation score. Scores then get
``is_anomalous`` = ``anomaly_score >= t`` and ``normalized_score`` = clip((s - t) / (max - min) + 0.5, 0, 1),
anomalib's min-max normalisation (the threshold maps to 0.5); both are null on a failed row, and both are null
everywhere without a threshold (``normalized_score`` alone without statistics). ``anomaly_score`` never changes.

Each part records the threshold it was decided with in its parquet metadata (``rayanom_threshold``), so a new threshold
is applied to existing scores part by part on the workers (``apply_to_parts``), touching only the parts decided with
another one, never through the driver.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from rayanom.config import UserError
from rayanom.data import DECISION_COL, ERROR_COL, NORMALIZED_COL, SCORE_COL, resolve_filesystem

logger = logging.getLogger(__name__)

THRESHOLD_FILE = "threshold.json"
FORMAT = "rayanom-threshold"
META_KEY = b"rayanom_threshold"


@dataclass(frozen=True)
class Threshold:
    value: float
    min: float | None = None  # normalisation statistics: the validation scores' range
    max: float | None = None
    source: str = "manual"

    def to_json(self) -> dict:
        return {"format": FORMAT, "format_version": 1, **asdict(self)}

    def key(self) -> bytes:
        """What a part records of the threshold its decisions were made with."""
        return json.dumps([self.value, self.min, self.max]).encode()


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
    """``table`` (a scores part) with its two decision columns set for ``t`` (replaced where present, else added
    before ``error``) and ``t`` recorded in its metadata."""
    score = table.column(SCORE_COL).to_numpy(zero_copy_only=False).astype(np.float64)
    scored = table.column(SCORE_COL).is_valid().to_numpy(zero_copy_only=False)
    scored &= table.column(ERROR_COL).is_null().to_numpy(zero_copy_only=False)
    anomalous, normalized = decisions(np.nan_to_num(score), scored, t)
    table = table.drop_columns([c for c in (DECISION_COL, NORMALIZED_COL) if c in table.column_names])
    at = table.schema.get_field_index(ERROR_COL)
    table = table.add_column(at, DECISION_COL, anomalous).add_column(at + 1, NORMALIZED_COL, normalized)
    meta = dict(table.schema.metadata or {})
    meta[META_KEY] = t.key() if t is not None else b"null"
    return table.replace_schema_metadata(meta)


def save_threshold(model_dir: str, t: Threshold, model_fingerprint: str) -> None:
    fs, path = resolve_filesystem(model_dir)
    with fs.open_output_stream(f"{path}/{THRESHOLD_FILE}") as f:
        f.write(json.dumps({**t.to_json(), "model": model_fingerprint}, indent=2, sort_keys=True).encode())
    logger.info("threshold %.6g (%s) written to %s/%s", t.value, t.source, model_dir, THRESHOLD_FILE)


def load_threshold(model_dir: str, model_fingerprint: str) -> Threshold | None:
    """The threshold stored beside the model, or None: none there, or one made for another model (logged)."""
    import pyarrow.fs as pafs

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


def threshold_from_val(scores_uri: str) -> Threshold | None:
    """The F1-adaptive threshold of the labelled ``val`` rows of a scores dataset, and their score range; None when
    those rows do not hold both classes."""
    from rayanom.summary import read_score_columns
    from rayanom.report import f1_adaptive_threshold

    cols = read_score_columns(scores_uri, require_labels=False, only_val=True)  # the driver holds the val rows only
    if cols["labels"] is None:
        return None
    use = cols["ok"] & cols["val"] & np.isfinite(cols["scores"])
    labels, scores = cols["labels"][use], cols["scores"][use]
    t = f1_adaptive_threshold(labels, scores)
    if t is None:
        return None
    return Threshold(t, float(scores.min()), float(scores.max()), f"F1-adaptive on {int(use.sum())} val rows")


def _parts_decided(output: str, ks: list[int], key: bytes) -> list[int]:
    """A worker's share of ``apply_to_parts``: rewrite the parts among ``ks`` decided with another threshold."""
    import pyarrow.parquet as pq

    from rayanom.parts import part_name, write_part

    t = None if key == b"null" else Threshold(*json.loads(key))
    fs, path = resolve_filesystem(output)
    done = []
    for k in ks:
        with fs.open_input_file(f"{path}/{part_name(k)}") as f:
            if (pq.read_schema(f).metadata or {}).get(META_KEY) == key:
                continue
            f.seek(0)
            table = pq.read_table(f)
        write_part(output, k, with_decisions(table, t), "decide")
        done.append(k)
    return done


def apply_to_parts(output: str, t: Threshold | None, parts_per_task: int = 64) -> int:
    """Decide every complete part of ``output`` with ``t``, on the workers; returns how many parts were rewritten
    (those decided with another threshold)."""
    from rayanom.index import in_tasks
    from rayanom.parts import complete_parts

    ks = sorted(complete_parts(output))
    key = t.key() if t is not None else b"null"
    return sum(len(d) for d in in_tasks(_parts_decided, ks, parts_per_task, output, key))


def manual_threshold(scores_uri: str, value: float) -> Threshold:
    """A threshold set by hand, with the labelled ``val`` rows' score range as its normalisation statistics where the
    scores have such rows (else none: ``normalized_score`` stays null)."""
    stats = threshold_from_val(scores_uri)
    return Threshold(float(value), stats.min if stats else None, stats.max if stats else None, "manual")


def settle(scores_uri: str, used: Threshold | None, manual: float | None = None) -> Threshold | None:
    """After scoring ``scores_uri`` with ``used``: the threshold its decisions should carry, applied to the parts
    decided otherwise. ``manual`` (a value set by hand; the labelled ``val`` rows' score range, when there are
    such rows, as its normalisation statistics), else ``used``, else the F1-adaptive threshold of the ``val`` rows;
    None when there is none of these."""
    if manual is not None:
        t = manual_threshold(scores_uri, manual)
    else:
        t = used if used is not None else threshold_from_val(scores_uri)
    if t is not None and t != used:
        n = apply_to_parts(scores_uri, t)
        logger.info("threshold %.6g (%s): %d parts of %s decided with it", t.value, t.source, n, scores_uri)
    return t


NO_THRESHOLD = ("no threshold: is_anomalous and normalized_score are null (score an index with labelled 'val' rows "
                "holding both classes, or pass --threshold VALUE)")


def score_and_decide(index, artifact, output: str, run, model_dir: str | None = None, manual: float | None = None,
                     store: bool = False, **kwargs) -> dict:
    """``pipeline.score`` with its decisions settled. Scored with ``manual`` (a threshold value for this run), else
    the threshold stored beside this very model in ``model_dir``; then ``settle``d (with neither, the F1-adaptive
    threshold of the labelled ``val`` rows). With ``store`` the settled threshold is stored beside the model when it
    changed. Returns the summary, its ``threshold`` the settled one."""
    from rayanom.pipeline import artifact_fingerprint, score

    fingerprint = artifact_fingerprint(artifact)
    stored = load_threshold(model_dir, fingerprint) if model_dir else None
    used = Threshold(manual) if manual is not None else stored
    summary = score(index, artifact, output, run, threshold=used, **kwargs)
    t = settle(output, used, manual)
    if store and t is not None and t != stored:
        save_threshold(model_dir, t, fingerprint)
    summary["threshold"] = asdict(t) if t else None
    return summary


def threshold_from_fit_index(index, artifact, model_dir: str, val_index: str, val_scores: str, run,
                             manual: float | None = None) -> tuple[int, dict | None]:
    """A fit without an index to score: the fit index's own labelled ``val`` rows, when it has some, are written as
    an index (``val_index``, on the workers), scored (``val_scores``) and their F1-adaptive threshold stored beside
    the model (``manual``: that value, with their score range); nothing when a threshold for this model is stored
    (and ``manual`` is None or its value). Returns the number of val rows and their scores' summary (or None)."""
    from rayanom.index import describe_index, write_split
    from rayanom.parts import Lease
    from rayanom.pipeline import artifact_fingerprint

    fingerprint = artifact_fingerprint(artifact)
    stored = load_threshold(model_dir, fingerprint)
    if stored is not None and manual in (None, stored.value):
        return 0, None
    n = write_split(index, "val", val_index)
    if not n:
        if manual is not None:
            save_threshold(model_dir, Threshold(manual), fingerprint)
        return 0, None
    with Lease(val_scores) as lease:  # this job's own output: replaced when the model changed
        summary = score_and_decide(describe_index(val_index), artifact, val_scores, run, model_dir, manual, True,
                                   overwrite=True, job=lease.job)
    return n, summary
