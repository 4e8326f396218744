"""The workflows the jobs and the public API run: score an index with its decisions, choose or change a threshold.

The top of the package: it calls the stages (``index``, ``pipeline``, ``parts``, ``scores``, ``decisions``) and no
module of the package imports it. A scoring run's threshold is settled before any part is written: where it needs
the labelled ``val`` rows (no stored threshold, or a value set by hand, which takes their score range as its
normalisation statistics), those rows are written as an index of their own and scored first, undecided (the rows
that choose a threshold cannot be decided with it), then every part is written once, decided with it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

import numpy as np

from rayanom.artifact import Artifact
from rayanom.config import RunConfig, UserError
from rayanom.decisions import Threshold, load_threshold, save_threshold, val_threshold
from rayanom.index import IndexInfo, describe_index, write_split
from rayanom.parts import VAL_DIR, Lease, apply_to_parts
from rayanom.pipeline import artifact_fingerprint, score
from rayanom.scores import read_score_columns

logger = logging.getLogger(__name__)


def threshold_from_val(scores_uri: str) -> Threshold | None:
    """The F1-adaptive threshold of the labelled ``val`` rows of a scores dataset, with their score range.

    None when those rows do not hold both classes. The driver holds the val rows only."""
    cols = read_score_columns(scores_uri, require_labels=False, only_val=True)
    if cols["labels"] is None:
        return None
    use = cols["ok"] & cols["val"] & np.isfinite(cols["scores"])
    return val_threshold(cols["labels"][use], cols["scores"][use])


def manual_threshold(scores_uri: str | None, value: float) -> Threshold:
    """A threshold set by hand, with the labelled ``val`` rows' score range of ``scores_uri`` as its statistics.

    Without such rows (or scores) it has none, and ``normalized_score`` stays null."""
    stats = threshold_from_val(scores_uri) if scores_uri else None
    return Threshold(float(value), stats.min if stats else None, stats.max if stats else None, "manual")


def score_val_rows(index: IndexInfo, artifact: Artifact, run: RunConfig, val_index: str,
                   val_scores: str) -> dict | None:
    """The ``val`` rows of ``index`` written as an index (``val_index``) and scored, undecided, into ``val_scores``.

    Returns their scores' summary, or None where ``index`` has no such rows. Both paths are this job's own: replaced
    when the model or the rows change, resumed otherwise."""
    if not write_split(index, "val", val_index):
        return None
    with Lease(val_scores) as lease:
        return score(describe_index(val_index), artifact, val_scores, run, overwrite=True, job=lease.job)


def choose_threshold(index: IndexInfo, artifact: Artifact, run: RunConfig, val_index: str, val_scores: str,
                     stored: Threshold | None = None,
                     manual: float | None = None) -> tuple[Threshold | None, dict | None]:
    """The threshold a scoring run of ``index`` decides with, known before any part is written.

    ``manual`` (a value set by hand, with the ``val`` rows' score range), else ``stored``, else the F1-adaptive
    threshold of the ``val`` rows; None without any. The ``val`` rows are scored (``score_val_rows``) only where the
    threshold needs them. Returns it and the val rows' summary (None where they were not scored)."""
    if manual is None and stored is not None:
        return stored, None
    summary = score_val_rows(index, artifact, run, val_index, val_scores)
    val = summary["output"] if summary else None
    if manual is not None:
        return manual_threshold(val, manual), summary
    return (threshold_from_val(val) if val else None), summary


def score_and_decide(index: IndexInfo, artifact: Artifact, output: str, run: RunConfig = RunConfig(),
                     model_dir: str | None = None, manual: float | None = None, store: bool = False,
                     **kwargs) -> dict:
    """``pipeline.score`` decided with the threshold ``choose_threshold`` settles first: every part written once.

    ``manual``: a threshold value for this run; else the threshold stored beside this very model in ``model_dir``;
    else the F1-adaptive threshold of the labelled ``val`` rows, scored first into ``OUTPUT/_rayanom_val``
    (``parts.VAL_DIR``). With ``store`` the threshold is stored beside the model when it changed. ``kwargs`` go to
    ``pipeline.score``. Returns the summary, its ``threshold`` the one the rows were decided with."""
    fingerprint = artifact_fingerprint(artifact)
    stored = load_threshold(model_dir, fingerprint) if model_dir else None
    val_dir = f"{output.rstrip('/')}/{VAL_DIR}"
    t, _ = choose_threshold(index, artifact, run, f"{val_dir}/index", f"{val_dir}/scores", stored, manual)
    summary = score(index, artifact, output, run, threshold=t, **kwargs)
    if store and t is not None and t != stored:
        save_threshold(model_dir, t, fingerprint)
    return summary


def threshold_from_fit_index(index: IndexInfo, artifact: Artifact, model_dir: str, val_index: str, val_scores: str,
                             run: RunConfig, manual: float | None = None) -> tuple[int, dict | None]:
    """A fit without an index to score: the threshold of the fit index's own labelled ``val`` rows, stored.

    The rows are written as an index (``val_index``) and scored (``val_scores``), and their F1-adaptive threshold
    (``manual``: that value, with their score range) stored beside the model; nothing when a threshold for this model
    is stored (and ``manual`` is None or its value). Returns the number of val rows and their scores' summary (or
    None), its ``threshold`` the one stored."""
    fingerprint = artifact_fingerprint(artifact)
    stored = load_threshold(model_dir, fingerprint)
    if stored is not None and manual in (None, stored.value):
        return 0, None
    t, summary = choose_threshold(index, artifact, run, val_index, val_scores, None, manual)
    if t is not None:
        save_threshold(model_dir, t, fingerprint)
    if summary is None:
        return 0, None
    summary["threshold"] = asdict(t) if t else None
    return summary["rows"], summary


def decide_scores(scores_uri: str, manual: float | None = None) -> tuple[Threshold, int]:
    """New decisions for existing scores, without scoring again: ``manual`` or the F1-adaptive threshold of the
    scores' ``val`` rows, applied to the parts decided otherwise. Returns it and the number of parts rewritten."""
    t = manual_threshold(scores_uri, manual) if manual is not None else threshold_from_val(scores_uri)
    if t is None:
        msg = f"{scores_uri!r} has no labelled 'val' rows holding both classes: pass --threshold"
        raise UserError(msg)
    n = apply_to_parts(scores_uri, t)
    logger.info("threshold %.6g (%s): %d parts of %s decided with it", t.value, t.source, n, scores_uri)
    return t, n
