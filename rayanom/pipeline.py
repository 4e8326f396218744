"""Orchestration: the one place that runs the two jobs on Ray.

fit:   index footers (driver) -> training rows whose keys can enter the bank (tasks: index.training_band; the
       driver gets about K rows) -> decode + bank items (actor pool, chunks of rows) -> bank (driver:
       bank.collect_bank, a pass, rarely more) -> head
score: part descriptors (driver, from the index's footers) -> read rows, decode, features + head, write the part (one
       actor call a part; the head read by each actor from a copy of the model beside the parts) -> one summary a
       part (driver)

Ray must already be initialised (``jobs/`` does it). The actors (``pool.ActorPool``) are built from small inline
arguments and load the weights themselves (``load_weights``), so Ray can restart them anywhere. Forward batches are
cut at fixed offsets (from the start of a fit chunk, itself at a multiple of ``batch_size``, or of a scoring part):
each forward pass sees the same rows whatever the number of actors.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rayanom import __version__
from rayanom.artifact import Artifact
from rayanom.bank import REGION_ID_STRIDE, Candidates, collect_bank, region_keys, row_keys
from rayanom.config import ModelConfig, RunConfig, UserError, config_to_dict
from rayanom.data import (
    DECISION_COL, ERROR_COL, HEIGHT_COL, IMAGE_COL, NORMALIZED_COL, PATH_COL, ROW_COL, SCORE_COL, WIDTH_COL,
    ReadPolicy, decode_table, error_message, failed_table, images_of,
)
from rayanom.features import device_kind
from rayanom.models import Batch, ModelSpec, spec_of
from rayanom.summary import summarize
from rayanom.parts import AUTO_ROWS, open_parts, rows_per_part, table_fingerprint

logger = logging.getLogger(__name__)

KEY_COL = "bank_key"
BANK_ID_COL = "bank_id"
FEATURES_COL = "features"


def load_weights(config: ModelConfig, source: dict, files: dict | None = None, spec: ModelSpec | None = None) -> dict:
    """The weights ``source`` describes (an artifact's ``weights``, or the source ``ModelSpec.weights`` gave), with
    the files named in ``files`` (weight flag -> path) found at other paths. Each actor loads its own from the record,
    so it can be restarted anywhere: a random init from its seed, timm's pretrained tag, or a file every worker can
    read (a URI, a shared filesystem, or a path inside ``ray job submit --working-dir``), checked against its
    sha256."""
    return (spec or spec_of(config)).load_weights(config, source, files or {})


def _extractor(spec: ModelSpec, config: ModelConfig, weights: dict, files: dict | None, device: str, threads: int,
               precision: str):
    """The model's feature stage (``ModelSpec.extractor``), with its weights loaded here."""
    return spec.extractor(config, load_weights(config, weights, files, spec), device, threads, precision)


class _Decoder:
    """Forward batches decoded ahead in a thread pool (Pillow releases the GIL in its decoders and resampling),
    ``threads`` batches at a time, each batch cut at a fixed offset from the start of its rows. On a CPU actor the
    forward pass already uses the cores, and one decode thread measured best here: 22 us a row of pipeline cost
    against 38 us with two threads splitting each batch (pure-Python work such as a missing file's error contends for
    the GIL), and the same speed on PNGs. Beside a GPU more threads decode, so the device never waits on them."""

    def __init__(self, image_size: tuple[int, int], policy: ReadPolicy, device: str, threads: int,
                 stage=None) -> None:
        self.image_size, self.policy, self.stage = image_size, policy, stage
        self.threads = threads or (1 if device == "cpu" else max(2, (os.cpu_count() or 2) // 2))
        self.pool = ThreadPoolExecutor(self.threads)

    def _decode(self, rows: pa.Table):
        decoded = decode_table(rows, self.image_size, self.policy)
        if self.stage is None:
            return decoded, None
        try:
            return decoded, self.stage(decoded)
        except Exception as e:  # noqa: BLE001 - staged again by the forward pass, where a failure stays with its rows
            logger.warning("staging a batch for the device failed (%s); it is copied in the forward pass",
                           error_message(e))
            return decoded, None

    def batches(self, rows: pa.Table, batch_size: int):
        """Decoded batches, each with ``stage``'s result on it (its input tensor for the device, made in the decode
        thread: ``Scorer.stage``), or None."""
        cuts = [rows.slice(s, batch_size) for s in range(0, rows.num_rows, batch_size)]
        pending = deque(self.pool.submit(self._decode, c) for c in cuts[:self.threads])
        for i in range(len(cuts)):
            decoded = pending.popleft().result()
            if i + self.threads < len(cuts):
                pending.append(self.pool.submit(self._decode, cuts[i + self.threads]))
            yield decoded


class BankFeatures:
    """Fit-stage actor: decodes a chunk of training rows (``row_index``, ``path``) and returns the bank items of its
    rows whose key lies in [lo, hi) (``bank``), and the rows that failed with their errors.

    A model whose images give one item each (``slots`` 1) banks them with bank id = row index; one whose images give
    several (RKDE's regions) with bank id = row index * 65536 + item number, so the bank is a uniform subset of all
    items of all training images. Forward batches are slices of ``batch_size`` rows from the chunk's start (chunks
    start at multiples of it).
    """

    def __init__(self, config: ModelConfig, weights: dict, slots: int, device: str, threads: int,
                 precision: str = "fp32", batch_size: int = 32, decode_threads: int = 0,
                 policy: ReadPolicy = ReadPolicy(), spec: ModelSpec | None = None) -> None:
        self.spec = spec or spec_of(config)
        self.extractor = _extractor(self.spec, config, weights, None, device, threads, precision)
        self.slots = slots  # bank items a row can have (bank.lower_keys)
        self.seed, self.batch_size = config.seed, batch_size
        self.decoder = _Decoder(config.image_size, policy, device, decode_threads)

    def items(self, rows: pa.Table, lo: float, hi: float) -> dict[str, np.ndarray]:
        out = [self._batch(decoded, lo, hi) for decoded, _ in self.decoder.batches(rows, self.batch_size)]
        return {k: np.concatenate([o[k] for o in out]) for k in out[0]} if out else {}

    def _batch(self, table: pa.Table, lo: float, hi: float) -> dict[str, np.ndarray]:
        rows = table.column(ROW_COL).to_numpy()
        errors = np.asarray(table.column(ERROR_COL).to_pylist(), dtype=object)
        ok = np.array([e is None for e in errors], dtype=bool)
        ids, keys, feats = self._safe_items(table, rows, ok, errors)
        ok = np.array([e is None for e in errors], dtype=bool)  # rows the model stage failed on are failed rows
        keep = (keys >= lo) & (keys < hi)
        return {"failed_rows": rows[~ok], "errors": errors[~ok], KEY_COL: keys[keep], BANK_ID_COL: ids[keep],
                FEATURES_COL: feats[keep]}

    def _safe_items(self, table: pa.Table, rows: np.ndarray, ok: np.ndarray, errors: np.ndarray):
        """``_items``; when the model stage raises, the rows in halves down to the single row that fails, whose
        ``errors`` entry then names the exception (as scoring does, ``PartScorer``)."""
        try:
            return self._items(table, rows, ok)
        except Exception as e:  # noqa: BLE001 - narrowed to its row; the fit goes on
            where = np.flatnonzero(ok)
            if len(where) <= 1:
                errors[where] = error_message(e)
                return np.zeros(0, np.int64), np.zeros(0), np.zeros((0, self.extractor.dim), np.float32)
            logger.warning("the model stage failed on a batch of %d (%s): retrying it in halves", len(where),
                           error_message(e))
            parts = []
            for half in (where[:len(where) // 2], where[len(where) // 2:]):
                mask = np.zeros_like(ok)
                mask[half] = True
                parts.append(self._safe_items(table, rows, mask, errors))
            return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))

    def _items(self, table: pa.Table, rows: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bank ids, keys, features) of the decoded rows' items."""
        _failpoints(table, ok)
        counts, feats = (self.spec.items(self.extractor, images_of(table)[ok]) if ok.any() else
                         (np.zeros(0, np.int64), np.zeros((0, self.extractor.dim), np.float32)))
        if self.slots == 1:
            return rows[ok], row_keys(rows[ok], self.seed), feats
        owner = np.repeat(rows[ok], counts)
        item = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        keys = region_keys(owner, item, self.seed, self.slots)
        return owner * REGION_ID_STRIDE + item, keys, feats


class Scorer:
    """Score-stage actor: feature stage + fitted head; every input column, then the model's output columns
    (``ModelSpec.outputs``: ``anomaly_score`` first, then e.g. DFKDE's ``anomaly_probability``, DFM's anomaly map,
    RKDE's boxes) and ``error``."""

    def __init__(self, config: ModelConfig, weights: dict, head, device: str, threads: int,
                 precision: str = "fp32", files: dict | None = None, spec: ModelSpec | None = None) -> None:
        self.spec = spec or spec_of(config)
        self.extractor = _extractor(self.spec, config, weights, files, device, threads, precision)
        self.head = head
        self.config = config
        self.device = device

    def stage(self, table: pa.Table):
        """The decoded batch's good images as the feature stage's input tensor (``FeatureExtractor.stage``: on a GPU
        a pinned, non-blocking copy under way), with the table it belongs to; None for a feature stage that takes
        arrays only. Runs in a decode thread."""
        if not hasattr(self.extractor, "stage"):
            return None
        ok = np.array([e is None for e in table.column(ERROR_COL).to_pylist()], dtype=bool)
        return table, self.extractor.stage(images_of(table)[ok]) if ok.any() else None

    def __call__(self, table: pa.Table, staged=None) -> pa.Table:
        """Score a decoded batch; ``staged``: :meth:`stage` of this very table, if made ahead."""
        errors = table.column(ERROR_COL).to_pylist()
        ok = np.array([e is None for e in errors], dtype=bool)
        _failpoints(table, ok)
        columns = self.spec.outputs(Batch(table, ok, errors, self.extractor, self.head, self.config, self.device,
                                           staged))
        if list(columns) != [SCORE_COL, *self.spec.columns(self.config)]:  # what the report checks rely on
            msg = (f"{self.config.model}: outputs gave {list(columns)}, its spec declares "
                   f"{[SCORE_COL, *self.spec.columns(self.config)]}")
            raise RuntimeError(msg)
        out = table.drop_columns([IMAGE_COL, ERROR_COL, HEIGHT_COL, WIDTH_COL])
        for name, column in columns.items():
            out = out.append_column(name, column)
        return out.append_column(ERROR_COL, pa.array(errors, pa.string()))


def _pool(cls: type, kwargs: dict, run: RunConfig, size: int):
    """``run.num_actors`` actors (at most ``size``), each with ``num_cpus_per_actor`` CPUs and, on a GPU cluster,
    ``num_gpus_per_actor`` GPUs; the rest of the node's CPUs stay free for the index and footer tasks."""
    from rayanom.pool import ActorPool

    return ActorPool(cls, kwargs, size=min(run.num_actors, max(1, size)), num_cpus=run.num_cpus_per_actor,
                     num_gpus=run.num_gpus_per_actor, no_progress_s=run.no_progress_s,
                     start_timeout_s=run.start_timeout_s)


def read_policy(run: RunConfig) -> ReadPolicy:
    return ReadPolicy(retries=run.io_retries, max_file_bytes=run.max_file_bytes)


@dataclass
class FitResult:
    artifact: Artifact
    n_train: int  # normal training rows in the index
    n_read: int  # of them, rows read (those whose keys could enter the bank)
    n_failed: int  # of the rows read, rows that failed
    failures: list[tuple[int, str]] = field(default_factory=list)


def fit(index, config: ModelConfig, weights_source: dict, run: RunConfig = RunConfig(),
        index_name: str | None = None) -> FitResult:
    """Fit ``config``'s model on the normal training rows of an index (an ``index.IndexInfo`` from
    ``describe_index``). The driver never reads the index: workers find the rows whose keys can enter the bank
    (``index.training_band``), so the driver holds about K rows of it.

    ``weights_source`` comes from the model's ``ModelSpec.weights`` (``features.resolve_weights`` for a timm
    backbone, ``regions.rkde_weights`` for RKDE); the actors load the
    weights it describes themselves (``load_weights``). Returns the artifact, not yet saved.

    Raises:
        UserError: label values other than 0/1, or too few training rows for ``config`` (before any image is read).
    """
    from rayanom.index import training_band

    t0 = time.time()
    index_name = index_name or index.uri
    k = config.max_training_points
    spec = spec_of(config)
    slots = spec.slots(config)
    # The first band, sized for K + 1 rows if every row were a training row; it also counts the training rows and
    # checks the labels. collect_bank fetches more when the index holds other rows too.
    first = min(1.0, (k + 8.0 * math.sqrt(k) + 16.0) / max(index.n_rows, 1))
    first = first if first < 1.0 else 2.0
    n, *band = training_band(index, config.seed, slots, 0.0, first)
    if n < config.min_training_rows:
        msg = (f"{index_name}: {n} normal training rows (split 'train' where the column exists, label 0 where it "
               f"exists); {config.model} with these settings needs at least {config.min_training_rows}")
        raise UserError(msg)
    logger.info("fit: %d training rows, %s model (%s weights), bank cap %d", n, config.model, weights_source["kind"],
                k)
    candidates = Candidates(n, lambda lo, hi: training_band(index, config.seed, slots, lo, hi)[1:], first,
                            tuple(band))
    def run_pass(todo: np.ndarray, lo: float, hi: float):
        """Decode ``todo`` (sorted row indices) and extract their bank items with keys in [lo, hi)."""
        where = {int(r): i for i, r in enumerate(candidates.rows)}
        paths = candidates.paths[[where[int(r)] for r in todo]] if len(todo) else np.empty(0, dtype=object)
        rows = pa.table({ROW_COL: pa.array(todo, pa.int64()), PATH_COL: pa.array(paths.tolist(), pa.string())})
        # Chunks of whole forward batches (so the batches do not depend on them), about four per actor, at most a
        # part's rows.
        batches = -(-len(todo) // (4 * run.num_actors * run.batch_size))
        chunk = run.batch_size * max(1, min(batches, -(-(run.rows_per_part or AUTO_ROWS[1]) // run.batch_size)))
        chunks = [rows.slice(s, chunk) for s in range(0, rows.num_rows, chunk)]
        for out in actors.map_unordered("items", [(c, lo, hi) for c in chunks]):
            if out:
                yield (out[KEY_COL], out[BANK_ID_COL], out[FEATURES_COL],
                       list(zip(out["failed_rows"].tolist(), out["errors"].tolist())))

    kwargs = {"config": config, "weights": weights_source, "slots": slots, "device": run.device,
              "threads": run.threads_per_actor, "precision": run.precision, "batch_size": run.batch_size,
              "decode_threads": run.decode_threads, "policy": read_policy(run), "spec": spec}
    with _pool(BankFeatures, kwargs, run, -(-min(n, len(candidates.rows)) // run.batch_size)) as actors:
        bank = collect_bank(candidates, config.seed, k, slots, run_pass)
    return _fitted(bank, n, t0, index, index_name, config, weights_source, run)


def _fitted(bank, n: int, t0: float, index, index_name: str, config: ModelConfig, weights_source: dict,
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
        "fit_fingerprint": fit_fingerprint(index, config, weights_source), "index_fingerprint": index.fingerprint,
    }
    artifact = Artifact(config=config, head=head, weights=weights_source, provenance=provenance)
    return FitResult(artifact=artifact, n_train=n, n_read=bank.n_read, n_failed=len(failures), failures=failures[:20])


CAREFUL_AFTER = 2  # a part whose worker died this many times is scored row by row, skipping the rows that kill it


class PartScorer:
    """Score-stage actor whose unit of work is one output part: it reads the part's index rows (``index.read_rows``),
    decodes them in a thread pool (the next batches while the current one runs), scores them in forward batches cut at
    fixed offsets from the part's start (``Scorer``), and writes the part (``parts.write_part``). Only a one-row
    summary goes back, so no row passes through the driver and every run forms the same batches.

    Failures stay with their rows. A batch whose model stage raises is scored again in halves down to single rows,
    so only the offending row gets an ``error`` naming the exception; an out-of-memory error also lowers this
    actor's batch size for the rest of its life. A row that kills the worker process is found by a crash marker
    beside the part (``parts.CrashMarker``): Ray restarts the actor and retries the part; after ``CAREFUL_AFTER``
    deaths the part is scored one row at a time, the marker naming the row in progress, and the row that killed the
    worker again is skipped with an error. Both change batch composition: those rows' scores (and, after an OOM, the
    actor's later batches) agree with an undisturbed run within ``heads.BATCH_RTOL``, not bit for bit.
    """

    def __init__(self, model: str, fingerprint: str, weights: dict, device: str, threads: int, precision: str,
                 output: str, job: str, batch_size: int, decode_threads: int = 0,
                 policy: ReadPolicy = ReadPolicy(), threshold: dict | None = None, files: dict | None = None,
                 spec: ModelSpec | None = None) -> None:
        from rayanom.decide import Threshold

        artifact = Artifact.load(model, spec)
        if artifact_fingerprint(artifact) != fingerprint:
            msg = f"the model at {model!r} is not the one this job scores with (it changed during the job?)"
            raise RuntimeError(msg)
        self.scorer = Scorer(artifact.config, weights, artifact.head, device, threads, precision, files, spec)
        self.device_kind, self.precision = device_kind(device), precision
        self.output, self.job, self.batch_size = output, job, batch_size
        self.max_batch = batch_size  # lowered by an out-of-memory error
        self.image_size, self.policy = artifact.config.image_size, policy
        self.decoder = _Decoder(artifact.config.image_size, policy, device, decode_threads, self.scorer.stage)
        self.threshold = Threshold(**threshold) if threshold else None

    def score_part(self, part: dict) -> dict[str, int]:
        """Score and write part ``part["part"]``: rows [start, stop) of ``part["index"]`` (``IndexInfo.part_of``);
        with ``part["retry"]`` only the failed rows of the complete part. Returns the part and its row count."""
        from rayanom.decide import with_decisions
        from rayanom.index import read_rows
        from rayanom.parts import CrashMarker, write_part

        k, start, stop = part["part"], part["start"], part["stop"]
        rows = index_rows = read_rows(part["index"], start, stop)
        previous = None
        if part.get("retry"):  # --retry-failed: only the failed rows of a complete part
            previous, rows = self._failed_rows(k, rows)
        marker = CrashMarker(self.output, k)
        state = marker.begin()
        if state["attempts"] > CAREFUL_AFTER:
            logger.warning("part %d killed its worker %d times: scoring it row by row", k, state["attempts"] - 1)
            scored = self._row_by_row(rows, marker, state)
        else:
            scored = self._batches(rows)
        table = pa.concat_tables(scored) if scored else rows
        if previous is not None:  # the rows retried, back among the others in row order
            kept = previous.filter(pc.is_null(previous.column(ERROR_COL)))
            table = pa.concat_tables([kept, table.select(kept.column_names).cast(kept.schema)]).sort_by(ROW_COL)
        table = with_decisions(table, self.threshold)
        # What the part was computed from, kept in its metadata: the sha256 of its index rows, and where and how: the
        # device kind and the precision (GPU fp32 is not batch-invariant: cuDNN picks algorithms per shape).
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               b"rayanom_input_sha256": table_fingerprint(index_rows).encode(),
                                               b"rayanom_device": self.device_kind.encode(),
                                               b"rayanom_precision": self.precision.encode()})
        write_part(self.output, k, table, self.job)
        marker.clear()
        return {"part": k, "rows": table.num_rows}

    def _failed_rows(self, k: int, rows: pa.Table) -> tuple[pa.Table, pa.Table]:
        """The complete part ``k`` as written, and the index rows of its failed rows."""
        import pyarrow.parquet as pq

        from rayanom.data import resolve_filesystem
        from rayanom.parts import part_name

        fs, path = resolve_filesystem(self.output)
        with fs.open_input_file(f"{path}/{part_name(k)}") as f:
            previous = pq.read_table(f)
        previous = previous.replace_schema_metadata(None)  # decided again below, with the rest of the part
        previous = previous.drop_columns([c for c in (DECISION_COL, NORMALIZED_COL) if c in previous.column_names])
        failed = np.flatnonzero(previous.column(ERROR_COL).is_valid().to_numpy(zero_copy_only=False))
        return previous, rows.take(pa.array(failed))

    def _batches(self, rows: pa.Table) -> list[pa.Table]:
        return [self._score(decoded, staged) for decoded, staged in self.decoder.batches(rows, self.batch_size)]

    def _row_by_row(self, rows: pa.Table, marker, state: dict) -> list[pa.Table]:
        bad, scored = set(state["bad"]), []
        for i in range(rows.num_rows):
            row = rows.slice(i, 1)
            r = int(row.column(ROW_COL)[0].as_py())
            if r in bad:
                msg = (f"WorkerCrash: the worker process died while reading or scoring this row "
                       f"({state['attempts'] - 1} deaths of its part's worker); the row was skipped")
                scored.append(self.scorer(failed_table(row, self.image_size, msg)))
                continue
            marker.at(state, r)
            scored.append(self._score(decode_table(row, self.image_size, self.policy)))
        return scored

    def _score(self, decoded: pa.Table, staged=None) -> pa.Table:
        """``Scorer`` on a decoded batch (``staged``: its input tensor made ahead, ``Scorer.stage``); when it raises,
        the batch in halves down to single rows (the row that still raises alone gets the exception as its
        ``error``). An out-of-memory error lowers ``max_batch``."""
        n = decoded.num_rows
        if n > self.max_batch:
            return pa.concat_tables([self._score(decoded.slice(s, self.max_batch)) for s in range(0, n, self.max_batch)])
        try:
            return self.scorer(decoded, staged)
        except Exception as e:  # noqa: BLE001 - a model-stage failure is narrowed to its row, the job goes on
            if _is_out_of_memory(e) and n > 1:
                self.max_batch = max(1, min(self.max_batch, n // 2))
                logger.warning("out of memory on a batch of %d: this actor's batch size is now %d (%s)", n,
                               self.max_batch, error_message(e))
            elif n > 1:
                logger.warning("the model stage failed on a batch of %d (%s): scoring it in halves", n,
                               error_message(e))
            if n == 1:
                return self.scorer(_failed(decoded, error_message(e)))
            half = -(-n // 2)
            return pa.concat_tables([self._score(decoded.slice(0, half)), self._score(decoded.slice(half))])


def _failpoints(table: pa.Table, ok: np.ndarray) -> None:
    """Tests only, set by environment variables: the model stage raises on a batch holding a marked path, or an
    out-of-memory error on batches of more rows than a limit (the exception CUDA raises)."""
    raise_on = os.environ.get("RAYANOM_FAILPOINT_RAISE_ON_PATH")
    if raise_on and any(raise_on in str(p) for p, good in zip(table.column(PATH_COL).to_pylist(), ok) if good):
        msg = f"failpoint: a batch holding {raise_on!r}"
        raise RuntimeError(msg)
    oom_above = os.environ.get("RAYANOM_FAILPOINT_OOM_ABOVE")
    if oom_above and int(ok.sum()) > int(oom_above):
        import torch

        msg = f"CUDA out of memory (failpoint: more than {oom_above} images in a batch)"
        raise torch.cuda.OutOfMemoryError(msg)


def _failed(decoded: pa.Table, message: str) -> pa.Table:
    """``decoded`` with every row failed with ``message`` (the scorer then computes nothing for them)."""
    i = decoded.schema.get_field_index(ERROR_COL)
    return decoded.set_column(i, ERROR_COL, pa.array([message] * decoded.num_rows, pa.string()))


def _is_out_of_memory(e: BaseException) -> bool:
    import torch

    return isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def score(index, artifact: Artifact, output: str, run: RunConfig = RunConfig(), overwrite: bool = False,
          job: str | None = None, retry_failed: bool = False, files: dict | None = None, threshold=None) -> dict:
    """Score every row of an index (an ``index.IndexInfo`` from ``describe_index``) into parquet parts at
    ``output``: one row per input row, written by the workers.

    The actors load the weights ``artifact.weights`` records (with the files named in ``files``, weight flag ->
    path, found at those paths instead: ``load_weights``) and the head from a copy of the artifact written beside the
    parts (``parts.MODEL_COPY``), so nothing large is a constructor argument. Part k holds rows [k P, (k + 1) P) for
    P = ``run.rows_per_part`` (0: ``parts.rows_per_part`` chooses); parts already complete from an interrupted run of
    the same model, index and layout are kept and skipped (``parts``). The driver handles one small descriptor and
    one summary per part, never a row. ``retry_failed``: complete parts holding failed rows are done again for those
    rows only (``PartScorer``), every other row kept as it was. ``threshold`` (a ``decide.Threshold``, or None)
    decides ``is_anomalous`` and ``normalized_score``; complete parts decided with another threshold are decided again
    (``decide.apply_to_parts``), never scored again. Returns the summary of ``summary.summarize``, with the threshold.
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
    todo = [{"part": k, "start": k * per_part, "stop": min((k + 1) * per_part, n), "retry": int(k in retry)}
            for k in range(manifest["n_parts"]) if k not in done or k in retry]
    logger.info("score: %d rows with a %s model -> %s (%d parts, %d to write%s)", n, artifact.config.model, output,
                manifest["n_parts"], len(todo) - len(retry),
                f"; {sum(retry.values())} failed rows of {len(retry)} complete parts to retry" if retry_failed else "")
    if todo:
        _write_parts(index, artifact, output, run, todo, manifest["model"], job, files, threshold)
    if done:  # parts of an earlier run: decided again where their threshold differs (decisions are not identity)
        from rayanom.decide import apply_to_parts

        redone = apply_to_parts(output, threshold)
        if redone:
            logger.info("score: %d complete parts decided again with this run's threshold", redone)
    summary = summarize(output)
    if summary["rows"] != n:
        msg = f"scores at {output!r} hold {summary['rows']} rows for {n} input rows"
        raise RuntimeError(msg)
    summary["threshold"] = dataclasses.asdict(threshold) if threshold else None
    return summary


def _write_parts(index, artifact: Artifact, output: str, run: RunConfig, todo: list[dict], fingerprint: str,
                 job: str | None, files: dict | None, threshold) -> None:
    """Score the parts ``todo`` on a pool of ``PartScorer`` actors; checks that every part and row was written."""
    import uuid

    from rayanom.parts import MODEL_COPY

    t0 = time.time()
    model = f"{output.rstrip('/')}/{MODEL_COPY}"
    artifact.save(model, overwrite=True)
    kwargs = {"model": model, "fingerprint": fingerprint, "weights": artifact.weights, "files": files,
              "spec": spec_of(artifact.config),
              "device": run.device, "threads": run.threads_per_actor, "precision": run.precision,
              "output": output, "job": job or uuid.uuid4().hex[:12], "batch_size": run.batch_size,
              "decode_threads": run.decode_threads, "policy": read_policy(run),
              "threshold": dataclasses.asdict(threshold) if threshold else None}
    calls = [({**t, "index": index.part_of(t["start"], t["stop"])},) for t in todo]
    with _pool(PartScorer, kwargs, run, len(todo)) as actors:
        written = list(actors.map_unordered("score_part", calls))
    n_done = sum(int(r["rows"]) for r in written)
    if len(written) != len(todo) or n_done != sum(t["stop"] - t["start"] for t in todo):  # retried parts too
        msg = f"scoring wrote {len(written)} of {len(todo)} parts ({n_done} rows)"
        raise RuntimeError(msg)
    logger.info("score: %d rows in %.1f s (%.1f rows/s, actor start-up included)", n_done, time.time() - t0,
                n_done / max(time.time() - t0, 1e-9))


def _parts_with_failures(output: str, done: list[int], parts_per_task: int = 256) -> dict[int, int]:
    """Failed rows per complete part (those with any), counted on the workers from the ``error`` column."""
    from rayanom.index import in_tasks
    from rayanom.parts import failed_rows

    return {k: v for found in in_tasks(failed_rows, done, parts_per_task, output) for k, v in found.items() if v}


def _broken_parts(output: str, done: list[int], n_rows: int, per_part: int, parts_per_task: int = 256) -> set[int]:
    """Complete parts whose footers disagree with their rows (``parts.part_problems``, checked in parallel on the
    workers), deleted so they are written again."""
    from rayanom.data import resolve_filesystem
    from rayanom.index import in_tasks
    from rayanom.parts import part_name, part_problems

    problems = {k: v for found in in_tasks(part_problems, done, parts_per_task, output, n_rows, per_part)
                for k, v in found.items()}
    fs, path = resolve_filesystem(output)
    for k, problem in sorted(problems.items()):
        logger.warning("score: complete part %s is broken (%s): writing it again", part_name(k), problem)
        fs.delete_file(f"{path}/{part_name(k)}")
    return set(problems)


def fit_fingerprint(index, config: ModelConfig, weights_source: dict) -> str:
    """sha256 of what determines a fitted model: the index (``IndexInfo.fingerprint``: its files' paths, sizes,
    modification times, row counts and schema, O(files)), the model config and the backbone weights. Any change to
    the index's files refits, even one outside the training rows."""
    import hashlib
    import json

    text = json.dumps({"config": config_to_dict(config), "weights": weights_source, "index": index.fingerprint},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def artifact_fingerprint(artifact: Artifact) -> str:
    """sha256 of an artifact's JSON and head arrays: what a scores directory was made with."""
    import hashlib
    import json

    h = hashlib.sha256(json.dumps(artifact.to_json(), sort_keys=True).encode())
    for name, array in sorted(artifact.head.to_arrays().items()):
        h.update(name.encode() + np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def _sha(ids: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"rayanom": __version__}
    for name in ("ray", "torch", "torchvision", "timm", "numpy", "pyarrow"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "absent"
    return out


