"""The workflows the jobs and the public API run: fit a model, score an index with its decisions, set a threshold.

The top of the package: it calls the stages and no module of the package imports it.

fit:   index footers (driver) -> training rows whose keys can enter the bank (tasks: ``index.training_band``; the
       driver gets about K rows) -> decode (tasks) -> bank items (``stages.BankFeatures`` actors) -> bank (driver:
       ``bank.collect_bank``, a pass, rarely more) -> head
score: part descriptors (driver, from the index's footers) -> units of rows -> read and decode (tasks, any node) ->
       features + head, fragments joined into parts (``stages.ScoreBatches`` actors; the head read by each actor from
       a copy of the model beside the parts) -> one small row a forward batch (driver)

Ray must already be initialised (``jobs/`` does it); both run on ``plane`` (Ray Data). A scoring run's threshold is
settled before any part is written: where it needs the labelled ``val`` rows (no stored threshold, or a value set by
hand, which takes their score range as its normalisation statistics), those rows are written as an index of their
own and scored first, undecided (the rows that choose a threshold cannot be decided with it), then every part is
written once, decided with it. ``hooks`` (``plane.FaultHooks``): for callers that inject faults (tests).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata as md
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from rayanom import __version__
from rayanom.artifact import Artifact, artifact_fingerprint
from rayanom.bank import ALL_KEYS, Candidates, collect_bank
from rayanom.columns import PATH_COL, ROW_COL
from rayanom.config import ModelConfig, RunConfig, UserError, config_to_dict
from rayanom.decisions import Threshold, load_threshold, save_threshold, val_threshold
from rayanom.index import IndexInfo, describe_index, map_in_tasks, training_band, write_split
from rayanom.parts import (
    AUTO_ROWS, MODEL_COPY, VAL_DIR, Lease, apply_to_parts, drop_fragments, failed_rows, open_parts, part_name,
    part_problems, rows_per_part,
)
from rayanom.plane import FaultHooks, Nodes, unit_rows
from rayanom.plane import run as run_plane
from rayanom.scores import read_score_columns
from rayanom.specs import spec_of
from rayanom.stages import (
    BankFeatures, ScoreBatches, bank_items, fit_unit_rows, plan_of, score_unit_marker, score_unit_rows, score_units,
)
from rayanom.storage import ReadPolicy, ipc_bytes, resolve_filesystem
from rayanom.summary import summarize

logger = logging.getLogger(__name__)


def read_policy(run: RunConfig) -> ReadPolicy:
    """How a run reads image files (``--io-retries``, ``--max-file-bytes``)."""
    return ReadPolicy(retries=run.io_retries, max_file_bytes=run.max_file_bytes)


@dataclass
class FitResult:
    """What ``fit`` returns: the artifact (not yet saved) and what was read of the training rows."""

    artifact: Artifact
    n_train: int  # normal training rows in the index
    n_read: int  # of them, rows read (those whose keys could enter the bank)
    n_failed: int  # of the rows read, rows that failed
    failures: list[tuple[int, str]] = field(default_factory=list)


def fit(index, config: ModelConfig, weights_source: dict, run: RunConfig = RunConfig(),
        index_name: str | None = None, hooks: FaultHooks | None = None) -> FitResult:
    """Fit ``config``'s model on the normal training rows of an index.

    The index is an ``index.IndexInfo`` from ``describe_index``. The driver never reads the index: workers find the rows
    whose keys can enter the bank (``index.training_band``), so the driver holds about K rows of it.

    ``weights_source`` comes from the model's ``ModelSpec.weights`` (``features.resolve_weights`` for a timm
    backbone, ``regions.rkde_weights`` for RKDE); the actors load the
    weights it describes themselves (``load_weights``). Returns the artifact, not yet saved. ``hooks``: for callers
    that inject faults (tests).

    Raises:
        UserError: label values other than 0/1, or too few training rows for ``config`` (before any image is read).
    """
    t0 = time.time()
    index_name = index_name or index.uri
    cap = config.max_training_points
    spec = spec_of(config)
    slots = spec.slots(config)
    # The first band, sized for K + 1 rows if every row were a training row; it also counts the training rows and
    # checks the labels. collect_bank fetches more when the index holds other rows too.
    first = min(1.0, (cap + 8.0 * math.sqrt(cap) + 16.0) / max(index.n_rows, 1))
    first = first if first < 1.0 else ALL_KEYS
    n, *band = training_band(index, config.seed, slots, 0.0, first)
    if n < config.min_training_rows:
        msg = (f"{index_name}: {n} normal training rows (split 'train' where the column exists, label 0 where it "
               f"exists); {config.model} with these settings needs at least {config.min_training_rows}")
        raise UserError(msg)
    logger.info("fit: %d training rows, %s model (%s weights), bank cap %d", n, config.model, weights_source["kind"],
                cap)
    candidates = Candidates(n, lambda lo, hi: training_band(index, config.seed, slots, lo, hi)[1:], first,
                            tuple(band))
    kwargs = {"config": config, "weights": weights_source, "slots": slots, "device": run.device,
              "threads": run.threads_per_actor, "precision": run.precision, "batch_size": run.batch_size,
              "spec": spec, "hook": (hooks or FaultHooks()).model}
    decode = {"rows_of": fit_unit_rows, "batch_size": run.batch_size, "image_size": config.image_size,
              "policy": read_policy(run), "bf16": run.precision == "bf16", "hook": (hooks or FaultHooks()).decode}

    def run_pass(todo: np.ndarray, lo: float, hi: float):
        """Decode ``todo`` (sorted row indices) and extract their bank items with keys in [lo, hi)."""
        where = {int(r): i for i, r in enumerate(candidates.rows)}
        paths = candidates.paths[[where[int(r)] for r in todo]] if len(todo) else np.empty(0, dtype=object)
        rows = pa.table({ROW_COL: pa.array(todo, pa.int64()), PATH_COL: pa.array(paths.tolist(), pa.string())})
        # Chunks of whole forward batches (so the batches do not depend on them), about four per actor, at most a
        # part's rows.
        batches = -(-len(todo) // (4 * run.num_actors * run.batch_size))
        chunk = run.batch_size * max(1, min(batches, -(-(run.rows_per_part or AUTO_ROWS[1]) // run.batch_size)))
        units = [{"part": i, "rows": ipc_bytes(rows.slice(s, chunk))} for i, s in enumerate(range(0, len(todo), chunk))]
        plan = plan_of(dataclasses.replace(run, num_actors=min(run.num_actors, len(units))), config, chunk)
        nodes, started = Nodes(), time.time()
        for block in run_plane(units, decode, BankFeatures, {**kwargs, "lo": lo, "hi": hi}, plan, run.progress):
            nodes.add(block)
            yield from bank_items(block)
        logger.info(nodes.line("fit pass", time.time() - started))

    bank = collect_bank(candidates, config.seed, cap, slots, run_pass)
    return _fit_head_on_bank(bank, n, t0, index, index_name, config, weights_source, run)


def _fit_head_on_bank(bank, n: int, t0: float, index, index_name: str, config: ModelConfig, weights_source: dict,
                      run: RunConfig) -> FitResult:
    """The head fitted on ``bank`` (``bank.collect_bank``'s), with the artifact's provenance; logs what was read."""
    ids, feats = bank.ids, bank.features
    failures = sorted(bank.failures.items())
    n_ok = bank.n_read - len(failures)
    if failures:
        logger.warning("fit: %d of %d training rows read failed, e.g. row %d: %s", len(failures), bank.n_read,
                       *failures[0])
    spec = spec_of(config)
    if spec.subset_note and n - len(failures) > config.max_training_points:
        logger.warning("fit: %s fitted on a uniform subset of %d of %d training rows (%s); raise "
                       "--max-training-points to use more", config.model, len(ids), n, spec.subset_note)
    logger.info("fit: bank of %d x %d features from %d of %d training rows read (%d decoded, %d passes) in %.1f s",
                *feats.shape[:2], bank.n_read, n, n_ok, bank.passes, time.time() - t0)
    t1 = time.time()
    head = spec.head(config).fit(feats)
    logger.info("fit: head fitted in %.2f s", time.time() - t1)
    provenance = {
        "versions": _versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "index": index_name,
        "n_train_rows": n, "n_read_rows": bank.n_read, "n_failed_rows": len(failures), "n_bank_rows": int(len(ids)),
        "feature_dim": int(feats.shape[1]), "bank_row_index_sha256": _sha(ids), "run": dataclasses.asdict(run),
        "fit_fingerprint": fit_fingerprint(index, config, weights_source, run.precision),
        "index_fingerprint": index.fingerprint,
    }
    artifact = Artifact(config=config, head=head, weights=weights_source, provenance=provenance,
                        precision=run.precision)
    return FitResult(artifact=artifact, n_train=n, n_read=bank.n_read, n_failed=len(failures), failures=failures[:20])


def score(index, artifact: Artifact, output: str, run: RunConfig = RunConfig(), overwrite: bool = False,
          job: str | None = None, retry_failed: bool = False, files: dict | None = None, threshold=None,
          hooks: FaultHooks | None = None) -> dict:
    """Score every row of an index into parquet parts at ``output``.

    The index is an ``index.IndexInfo`` from ``describe_index``; one row per input row, written by the workers.

    The actors load the weights ``artifact.weights`` records (with the files named in ``files``, weight flag ->
    path, found at those paths instead: ``load_weights``) and the head from a copy of the artifact written beside the
    parts (``parts.MODEL_COPY``), so nothing large is a constructor argument. Part p holds rows [p P, (p + 1) P) for
    P = ``run.rows_per_part`` (0: ``parts.rows_per_part`` chooses); parts already complete from an interrupted run of
    the same model, index and layout are kept and skipped (``parts``). The driver handles one small descriptor and
    one summary per part, never a row. ``retry_failed``: complete parts holding failed rows are done again for those
    rows only (``stages.ScoreBatches``), every other row kept as it was. ``threshold`` (a ``decisions.Threshold``, or
    None) decides ``is_anomalous`` and ``normalized_score``; complete parts decided with another threshold are decided
    again (``parts.apply_to_parts``), never scored again. ``hooks``: for callers that inject faults (tests). Returns
    the summary of ``summary.summarize``, with the threshold.
    """
    n, per_part = index.n_rows, rows_per_part(output, index.n_rows, run.rows_per_part, overwrite)
    # Format 4: the heads score in float32 on the actor's device (format 3's scores differ within heads.DEVICE_RTOL),
    # so parts of a format-3 run are not resumed into a format-4 one.
    manifest = {"format": "rayanom-scores", "format_version": 4, "model": artifact_fingerprint(artifact),
                "index": index.fingerprint, "index_files": list(index.file_fingerprints), "n_rows": n,
                "rows_per_part": per_part, "precision": run.precision, "n_parts": -(-n // per_part)}
    done = open_parts(output, manifest, overwrite)
    if done:
        done -= _broken_parts(output, sorted(done), n, per_part)
    retry = _parts_with_failures(output, sorted(done)) if retry_failed and done else {}
    todo = [{"part": p, "start": p * per_part, "stop": min((p + 1) * per_part, n), "retry": int(p in retry)}
            for p in range(manifest["n_parts"]) if p not in done or p in retry]
    logger.info("score: %d rows with a %s model -> %s (%d parts, %d to write%s)", n, artifact.config.model, output,
                manifest["n_parts"], len(todo) - len(retry),
                f"; {sum(retry.values())} failed rows of {len(retry)} complete parts to retry" if retry_failed else "")
    if todo:
        nodes = _write_parts(index, artifact, output, run, todo, manifest["model"], job, files, threshold,
                             hooks or FaultHooks())
    if done:  # parts of an earlier run: decided again where their threshold differs (decisions are not identity)
        redone = apply_to_parts(output, threshold)
        if redone:
            logger.info("score: %d complete parts decided again with this run's threshold", redone)
    summary = summarize(output)
    if summary["rows"] != n:
        msg = f"scores at {output!r} hold {summary['rows']} rows for {n} input rows"
        raise RuntimeError(msg)
    summary["threshold"] = dataclasses.asdict(threshold) if threshold else None
    # Rows per node id of each stage (O(nodes)): where decode and the model ran in this run.
    summary["nodes"] = {"decode": dict(nodes.decode), "model": dict(nodes.model)} if todo else {}
    return summary


def _write_parts(index, artifact: Artifact, output: str, run: RunConfig, todo: list[dict], fingerprint: str,
                 job: str | None, files: dict | None, threshold, hooks: FaultHooks) -> Nodes:
    """Score the parts ``todo`` on the plane and check that every part and row was written.

    Decode tasks and ``ScoreBatches`` actors; returns where the stages ran."""
    t0 = time.time()
    model = f"{output.rstrip('/')}/{MODEL_COPY}"
    artifact.save(model, overwrite=True)
    job = job or uuid.uuid4().hex[:12]
    drop_fragments(output)  # an interrupted job's: its complete parts are kept, the rest is scored again
    kwargs = {"model": model, "fingerprint": fingerprint, "weights": artifact.weights, "files": files,
              "spec": spec_of(artifact.config), "index": index,
              "device": run.device, "threads": run.threads_per_actor, "precision": run.precision,
              "output": output, "job": job, "batch_size": run.batch_size,
              "threshold": dataclasses.asdict(threshold) if threshold else None, "hook": hooks.model}
    decode = {"rows_of": functools.partial(score_unit_rows, index=index, output=output),
              "marker_of": functools.partial(score_unit_marker, output=output), "batch_size": run.batch_size,
              "image_size": artifact.config.image_size, "policy": read_policy(run), "bf16": run.precision == "bf16",
              "hook": hooks.decode}
    per_unit = unit_rows(index.n_rows, todo[0]["stop"] - todo[0]["start"], run.batch_size)
    nodes, written = Nodes(), {}
    for block in run_plane(score_units(todo, per_unit), decode, ScoreBatches, kwargs,
                           plan_of(run, artifact.config, per_unit), run.progress):
        nodes.add(block)
        written.update((p, w) for p, w in zip(block.column("part").to_pylist(), block.column("written").to_pylist())
                       if w)
    drop_fragments(output)
    n_done = sum(written.values())
    if len(written) != len(todo) or n_done != sum(t["stop"] - t["start"] for t in todo):  # retried parts too
        msg = f"scoring wrote {len(written)} of {len(todo)} parts ({n_done} rows)"
        raise RuntimeError(msg)
    logger.info(nodes.line("score", time.time() - t0))
    return nodes


def _parts_with_failures(output: str, done: list[int], parts_per_task: int = 256) -> dict[int, int]:
    """Failed rows per complete part (those with any), counted on the workers from the ``error`` column."""
    return {p: v for found in map_in_tasks(failed_rows, done, parts_per_task, output) for p, v in found.items() if v}


def _broken_parts(output: str, done: list[int], n_rows: int, per_part: int, parts_per_task: int = 256) -> set[int]:
    """Complete parts whose footers disagree with their rows, deleted so they are written again.

    Checked in parallel on the workers (``parts.part_problems``)."""
    problems = {p: v for found in map_in_tasks(part_problems, done, parts_per_task, output, n_rows, per_part)
                for p, v in found.items()}
    fs, path = resolve_filesystem(output)
    for part, problem in sorted(problems.items()):
        logger.warning("score: complete part %s is broken (%s): writing it again", part_name(part), problem)
        fs.delete_file(f"{path}/{part_name(part)}")
    return set(problems)


def fit_fingerprint(index, config: ModelConfig, weights_source: dict, precision: str = "fp32") -> str:
    """The sha256 of what determines a fitted model.

    The index (``IndexInfo.fingerprint``: its files' paths, sizes, modification times, row counts and schema,
    O(files)), the model config, the backbone weights and the precision. Any change to the index's files refits, even
    one outside the training rows."""
    identity = {"config": config_to_dict(config), "weights": weights_source, "index": index.fingerprint}
    if precision != "fp32":  # fp32 models keep the fingerprints they had before precision was part of it
        identity["precision"] = precision
    text = json.dumps(identity, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _sha(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()


def _versions() -> dict[str, str]:
    out = {"rayanom": __version__}
    for name in ("ray", "torch", "torchvision", "timm", "numpy", "pyarrow"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "absent"
    return out


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
    """``score`` decided with the threshold ``choose_threshold`` settles first: every part written once.

    ``manual``: a threshold value for this run; else the threshold stored beside this very model in ``model_dir``;
    else the F1-adaptive threshold of the labelled ``val`` rows, scored first into ``OUTPUT/_rayanom_val``
    (``parts.VAL_DIR``). With ``store`` the threshold is stored beside the model when it changed. ``kwargs`` go to
    ``score``. Returns the summary, its ``threshold`` the one the rows were decided with."""
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
    summary["threshold"] = dataclasses.asdict(t) if t else None
    return summary["rows"], summary


def decide_scores(scores_uri: str, manual: float | None = None) -> tuple[Threshold, int]:
    """New decisions for existing scores, without scoring again.

    ``manual``, or the F1-adaptive threshold of the scores' ``val`` rows, applied to the parts decided otherwise.
    Returns it and the number of parts rewritten."""
    t = manual_threshold(scores_uri, manual) if manual is not None else threshold_from_val(scores_uri)
    if t is None:
        msg = f"{scores_uri!r} has no labelled 'val' rows holding both classes: pass --threshold"
        raise UserError(msg)
    n = apply_to_parts(scores_uri, t)
    logger.info("threshold %.6g (%s): %d parts of %s decided with it", t.value, t.source, n, scores_uri)
    return t, n
