"""The model stage of both workflows: the actor classes and the helpers that cut their work into units.

fit:   ``BankFeatures`` actors turn decoded forward batches into bank items (keys, ids, features) and failed rows.
score: ``ScoreBatches`` actors score decoded forward batches (``Scorer``: feature stage + fitted head) and join them
       into parts beside the output; the unit helpers (``score_units``, ``score_unit_rows``) tell the decode stage
       which rows each unit holds.

The actors load the weights themselves (``load_weights``), so Ray can restart them on any node. Forward batches are
cut at fixed offsets (from the start of a fit chunk, itself at a multiple of ``batch_size``, or of a scoring part):
each forward pass sees the same rows whatever the number of actors. Nothing here imports torch at module level: the
decode workers import this module for the unit helpers.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rayanom.artifact import Artifact, artifact_fingerprint
from rayanom.bank import REGION_ID_STRIDE, region_keys, row_keys
from rayanom.columns import DECISION_COL, ERROR_COL, HEIGHT_COL, NORMALIZED_COL, ROW_COL, SCORE_COL, WIDTH_COL
from rayanom.config import ModelConfig, RunConfig
from rayanom.decisions import Threshold, with_decisions
from rayanom.decode import Decoded
from rayanom.index import read_rows
from rayanom.parts import (
    CrashMarker, drop_fragments, part_name, read_fragments, table_fingerprint, write_fragment, write_part,
)
from rayanom.plane import CAREFUL_AFTER, Plan, batch_bytes, checked_batches, result_cols, row_by_row
from rayanom.specs import ModelSpec, ScoringBatch, spec_of
from rayanom.storage import error_message, resolve_filesystem

logger = logging.getLogger(__name__)

KEY_COL = "bank_key"
BANK_ID_COL = "bank_id"
FEATURES_COL = "features"


def load_weights(config: ModelConfig, source: dict, files: dict | None = None, spec: ModelSpec | None = None) -> dict:
    """The weights an actor loads from their record (``source``), files found where ``files`` says.

    ``source``: an artifact's ``weights``, or the source ``ModelSpec.weights`` gave; ``files``: weight flag -> path
    of a file found at another path. Each actor loads its own from the record,
    so it can be restarted anywhere: a random init from its seed, timm's pretrained tag, or a file every worker can
    read (a URI, a shared filesystem, or a path inside ``ray job submit --working-dir``), checked against its
    sha256."""
    return (spec or spec_of(config)).load_weights(config, source, files or {})


def _extractor(spec: ModelSpec, config: ModelConfig, weights: dict, files: dict | None, device: str, threads: int,
               precision: str):
    """The model's feature stage (``ModelSpec.extractor``), with its weights loaded here."""
    return spec.extractor(config, load_weights(config, weights, files, spec), device, threads, precision)


class BankFeatures:
    """Fit-stage model actor: the bank items of decoded forward batches, and the rows that failed.

    Per decoded forward batch (a ``plane`` batch row): its bank items whose keys lie in [lo, hi) (``bank``), and the
    rows that failed with their errors.

    A model whose images give one item each (``slots`` 1) banks them with bank id = row index; one whose images give
    several (RKDE's regions) with bank id = row index * 65536 + item number, so the bank is a uniform subset of all
    items of all training images. Forward batches are slices of ``batch_size`` rows from their chunk's start (chunks
    start at multiples of it).
    """

    def __init__(self, config: ModelConfig, weights: dict, slots: int, device: str, threads: int,
                 precision: str = "fp32", batch_size: int = 32, spec: ModelSpec | None = None,
                 lo: float = 0.0, hi: float = 1.0, hook: Callable | None = None) -> None:
        self.spec = spec or spec_of(config)
        self.extractor = _extractor(self.spec, config, weights, None, device, threads, precision)
        self.slots = slots  # bank items a row can have (bank.lower_keys)
        self.seed, self.batch_size, self.image_size = config.seed, batch_size, config.image_size
        self.lo, self.hi, self.bf16 = lo, hi, precision == "bf16"
        self.hook = hook  # plane.FaultHooks.model: a fault a caller injects (tests)

    def __call__(self, rows: pa.Table) -> pa.Table:
        """The bank items of a call's forward batches (``plane.to_batch_row``): one result row for each.

        A result row holds the batch's bank items and its failed rows."""
        t0 = time.perf_counter()
        out = [self.items(decoded, self.lo, self.hi)
               for _, decoded in checked_batches(rows, self.image_size, self.batch_size, self.bf16)]
        return pa.table(result_cols(rows, time.perf_counter() - t0, **{
            KEY_COL: pa.array([o[KEY_COL] for o in out], pa.list_(pa.float64())),
            BANK_ID_COL: pa.array([o[BANK_ID_COL] for o in out], pa.list_(pa.int64())),
            FEATURES_COL: pa.array([np.ascontiguousarray(o[FEATURES_COL], np.float32).tobytes() for o in out],
                                   pa.large_binary()),
            "failed_rows": pa.array([o["failed_rows"] for o in out], pa.list_(pa.int64())),
            "errors": pa.array([list(o["errors"]) for o in out], pa.list_(pa.string())),
            "dim": pa.array([self.extractor.dim] * len(out), pa.int64())}))

    def items(self, decoded: Decoded, lo: float, hi: float) -> dict[str, np.ndarray]:
        """The bank items of a decoded batch (``decode_table``'s) with keys in [lo, hi), and its failed rows."""
        rows = decoded.column(ROW_COL).to_numpy()
        errors = np.asarray(decoded.column(ERROR_COL).to_pylist(), dtype=object)
        ids, keys, feats = self._safe_items(decoded, rows, decoded.ok, errors)
        ok = np.array([e is None for e in errors], dtype=bool)  # rows the model stage failed on are failed rows
        keep = (keys >= lo) & (keys < hi)
        return {"failed_rows": rows[~ok], "errors": errors[~ok], KEY_COL: keys[keep], BANK_ID_COL: ids[keep],
                FEATURES_COL: feats[keep]}

    def _safe_items(self, decoded: Decoded, rows: np.ndarray, ok: np.ndarray, errors: np.ndarray):
        """``_items``, a failure narrowed down to the row that fails.

        When the model stage raises, the rows in halves down to the single row that fails, whose ``errors`` entry
        then names the exception (as scoring does, ``ScoreBatches``)."""
        try:
            return self._items(decoded, rows, ok)
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
                parts.append(self._safe_items(decoded, rows, mask, errors))
            return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))

    def _items(self, decoded: Decoded, rows: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bank ids, keys, features) of the ``ok`` rows' items."""
        if self.hook is not None:
            self.hook(decoded.table, ok)
        counts, feats = (self.spec.items(self.extractor, decoded.images_where(ok)) if ok.any() else
                         (np.zeros(0, np.int64), np.zeros((0, self.extractor.dim), np.float32)))
        if self.slots == 1:
            return rows[ok], row_keys(rows[ok], self.seed), feats
        owner = np.repeat(rows[ok], counts)
        item = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        keys = region_keys(owner, item, self.seed, self.slots)
        return owner * REGION_ID_STRIDE + item, keys, feats


class Scorer:
    """Score-stage model: feature stage + fitted head, adding the model's output columns to a decoded batch.

    Every input column, then the model's output columns
    (``ModelSpec.outputs``: ``anomaly_score`` first, then e.g. DFKDE's ``anomaly_probability``, DFM's anomaly map,
    RKDE's boxes) and ``error``."""

    def __init__(self, config: ModelConfig, weights: dict, head, device: str, threads: int,
                 precision: str = "fp32", files: dict | None = None, spec: ModelSpec | None = None,
                 hook: Callable | None = None) -> None:
        self.spec = spec or spec_of(config)
        self.extractor = _extractor(self.spec, config, weights, files, device, threads, precision)
        self.head = head
        self.hook = hook  # plane.FaultHooks.model: a fault a caller injects (tests)
        self.config = config
        self.device = device

    def __call__(self, decoded: Decoded) -> pa.Table:
        """Score a decoded batch."""
        errors, ok = decoded.column(ERROR_COL).to_pylist(), decoded.ok
        if self.hook is not None:
            self.hook(decoded.table, ok)
        columns = self.spec.outputs(ScoringBatch(decoded.table, ok, errors, self.extractor, self.head, self.config,
                                                 self.device, decoded.images))
        if list(columns) != [SCORE_COL, *self.spec.columns(self.config)]:  # what the report checks rely on
            msg = (f"{self.config.model}: outputs gave {list(columns)}, its spec declares "
                   f"{[SCORE_COL, *self.spec.columns(self.config)]}")
            raise RuntimeError(msg)
        out = decoded.table.drop_columns([ERROR_COL, HEIGHT_COL, WIDTH_COL])
        for name, column in columns.items():
            out = out.append_column(name, column)
        return out.append_column(ERROR_COL, pa.array(errors, pa.string()))


def fit_unit_rows(unit: dict) -> tuple[pa.Table, dict]:
    """A fit chunk's rows (carried in the unit) and where its batches sit (``plane.decode_units``'s ``rows_of``)."""
    rows = pa.ipc.open_stream(unit["rows"]).read_all()
    return rows, {"part": unit["part"], "first": 0, "stop": rows.num_rows, "retry": 0, "offset": 0,
                  "total": rows.num_rows}


def bank_items(block: pa.Table):
    """The bank items and failures of ``BankFeatures`` result rows, as ``bank.collect_bank`` takes them."""
    for r in block.select([KEY_COL, BANK_ID_COL, FEATURES_COL, "dim", "failed_rows", "errors"]).to_pylist():
        keys = np.asarray(r[KEY_COL], np.float64)
        feats = np.frombuffer(r[FEATURES_COL], np.float32).reshape(len(keys), r["dim"])
        yield keys, np.asarray(r[BANK_ID_COL], np.int64), feats, list(zip(r["failed_rows"], r["errors"]))


class ScoreBatches:
    """Score-stage model actor: decoded forward batches scored and joined into parts beside the output.

    A call takes a few decoded forward batches (``plane`` batch rows), scores them (``Scorer``) and writes them: a
    part the call holds whole goes straight into place (``parts.write_part``); otherwise the batches of each part
    become a fragment, and the call that completes a part joins its fragments into it, with its decisions and
    metadata. Only a one-row result per batch goes back, never a row's data.

    Failures stay with their rows. A batch whose model stage raises is scored again in halves down to single rows, so
    only the offending row gets an ``error`` naming the exception; an out-of-memory error also lowers this actor's
    batch size for the rest of its life. A batch whose worker died ``plane.CAREFUL_AFTER`` times (a crash marker
    beside the parts, ``parts.CrashMarker``) is scored one row at a time, the marker naming the row in progress, and
    the row that killed the worker again is skipped with an error. Both change batch composition: those rows' scores
    agree with an undisturbed run within ``heads.BATCH_RTOL``, not bit for bit.
    """

    def __init__(self, model: str, fingerprint: str, weights: dict, device: str, threads: int, precision: str,
                 output: str, job: str, batch_size: int, index, threshold: dict | None = None,
                 files: dict | None = None, spec: ModelSpec | None = None, hook: Callable | None = None) -> None:
        from rayanom.features import device_kind  # torch: only the actors need it, never the decode workers

        artifact = Artifact.load(model, spec)
        if artifact_fingerprint(artifact) != fingerprint:
            msg = f"the model at {model!r} is not the one this job scores with (it changed during the job?)"
            raise RuntimeError(msg)
        self.scorer = Scorer(artifact.config, weights, artifact.head, device, threads, precision, files, spec, hook)
        self.device_kind, self.precision = device_kind(device), precision
        self.output, self.job, self.batch_size, self.index = output, job, batch_size, index
        self.max_batch = batch_size  # lowered by an out-of-memory error
        self.image_size, self.bf16 = artifact.config.image_size, precision == "bf16"
        self.threshold = Threshold(**threshold) if threshold else None

    def __call__(self, rows: pa.Table) -> pa.Table:
        """Score and write a call's forward batches; one result row for each.

        Batch rows in (``plane.to_batch_row``; a few forward batches a call), one result row out for each: its
        place and nodes, and the rows of the part its group completed (0 when the part still misses batches)."""
        t0 = time.perf_counter()
        first = rows.slice(0, 1).drop_columns(["meta", "pixels"]).to_pylist()[0]
        marker = CrashMarker(self.output, f"{part_name(first['part'])}.batch-{first['offset']}")
        state = marker.begin()
        careful = state["attempts"] > CAREFUL_AFTER
        if careful:
            logger.warning("%s killed its worker %d times: scoring it row by row", marker.name, state["attempts"] - 1)
        groups: dict[int, list] = {}  # part -> its scored batches in this call
        places = []
        for where, decoded in checked_batches(rows, self.image_size, self.batch_size, self.bf16):
            scored = (row_by_row(decoded, marker, state, self._score,
                                 lambda row, message: self.scorer(row.failed(message))) if careful
                      else self._score(decoded))
            scored = pa.concat_tables(scored) if careful else scored
            groups.setdefault(where["part"], []).append((where, scored))
            places.append(where)
        written = {}
        for part, batches in groups.items():
            where, scored = batches[0][0], pa.concat_tables([t for _, t in batches])
            offsets = [w["offset"] for w, _ in batches]
            if offsets[0] == 0 and offsets == sorted(offsets) and scored.num_rows == where["total"]:  # a whole part
                written[(part, 0)] = self._join(where, scored)  # written at once, without fragments
                continue
            held = write_fragment(self.output, self.job, part, where["offset"], scored)
            written[(part, where["offset"])] = self._join(where) if held >= where["total"] else 0
        marker.clear()
        return pa.table(result_cols(rows, time.perf_counter() - t0, written=pa.array(
            [written.get((w["part"], w["offset"]), 0) for w in places], pa.int64())))

    def _join(self, where: dict, whole: pa.Table | None = None) -> int:
        """Join a part from its fragments (or ``whole``), decide it and write it.

        Part ``where["part"]`` from its fragments, or ``whole`` (all its scored rows), with the part's earlier rows
        for a retry, decided and written; its rows, or 0 where another call joined it first."""
        part, first, stop = where["part"], where["first"], where["stop"]
        table = read_fragments(self.output, self.job, part) if whole is None else whole
        if table is None:
            return 0
        index_rows = read_rows(self.index.part_of(first, stop), first, stop)
        if where["retry"]:  # --retry-failed: the rows retried, back among the others in row order
            previous = failed_rows_of(self.output, part, index_rows)[0]
            kept = previous.filter(pc.is_null(previous.column(ERROR_COL)))
            table = pa.concat_tables([kept, table.select(kept.column_names).cast(kept.schema)]).sort_by(ROW_COL)
        table = with_decisions(table, self.threshold)
        # What the part was computed from, kept in its metadata: the sha256 of its index rows, and where and how: the
        # device kind and the precision (GPU fp32 is not batch-invariant: cuDNN picks algorithms per shape).
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               b"rayanom_input_sha256": table_fingerprint(index_rows).encode(),
                                               b"rayanom_device": self.device_kind.encode(),
                                               b"rayanom_precision": self.precision.encode()})
        write_part(self.output, part, table, f"{self.job}-{uuid.uuid4().hex[:8]}")  # two joins never share a file
        if whole is None:
            drop_fragments(self.output, self.job, part)
        return table.num_rows

    def _score(self, decoded: Decoded) -> pa.Table:
        """``Scorer`` on a decoded batch, a failure narrowed down to the row that fails.

        When it raises, the batch in halves down to single rows (the row that still raises alone gets the exception
        as its ``error``). An out-of-memory error lowers ``max_batch``."""
        n = decoded.num_rows
        if n > self.max_batch:
            step = self.max_batch
            return pa.concat_tables([self._score(decoded.slice(s, step)) for s in range(0, n, step)])
        try:
            return self.scorer(decoded)
        except Exception as e:  # noqa: BLE001 - a model-stage failure is narrowed to its row, the job goes on
            if _is_out_of_memory(e) and n > 1:
                self.max_batch = max(1, min(self.max_batch, n // 2))
                logger.warning("out of memory on a batch of %d: this actor's batch size is now %d (%s)", n,
                               self.max_batch, error_message(e))
            elif n > 1:
                logger.warning("the model stage failed on a batch of %d (%s): scoring it in halves", n,
                               error_message(e))
            if n == 1:
                return self.scorer(decoded.failed(error_message(e)))
            half = -(-n // 2)
            return pa.concat_tables([self._score(decoded.slice(0, half)), self._score(decoded.slice(half))])


def failed_rows_of(output: str, part: int, rows: pa.Table) -> tuple[pa.Table, pa.Table]:
    """A complete part as written, and which of its index rows failed in it.

    The complete part ``part`` as written (its decisions dropped: decided again with the rest), and the rows of
    ``rows`` (the part's index rows) that failed in it."""
    fs, path = resolve_filesystem(output)
    with fs.open_input_file(f"{path}/{part_name(part)}") as f:
        previous = pq.read_table(f)
    previous = previous.replace_schema_metadata(None)
    previous = previous.drop_columns([c for c in (DECISION_COL, NORMALIZED_COL) if c in previous.column_names])
    failed = np.flatnonzero(previous.column(ERROR_COL).is_valid().to_numpy(zero_copy_only=False))
    return previous, rows.take(pa.array(failed))


def score_unit_rows(unit: dict, index, output: str) -> tuple[pa.Table, dict]:
    """A scoring unit's index rows and where its batches sit.

    For ``plane.decode_units``'s ``rows_of``: rows [start, end) of its part, or the failed rows of the complete part
    for a retry."""
    first, stop = unit["first"], unit["stop"]
    where = {"part": unit["part"], "first": first, "stop": stop, "retry": unit["retry"]}
    if unit["retry"]:
        rows = failed_rows_of(output, unit["part"], read_rows(index.part_of(first, stop), first, stop))[1]
        return rows, {**where, "offset": 0, "total": rows.num_rows}
    start, end = unit["start"], unit["end"]
    return read_rows(index.part_of(start, end), start, end), {**where, "offset": start - first, "total": stop - first}


def score_unit_marker(unit: dict, output: str) -> CrashMarker:
    return CrashMarker(output, f"{part_name(unit['part'])}.rows-{unit['start']}")


def score_units(todo: list[dict], per_unit: int) -> list[dict]:
    """The decode units of the parts ``todo``.

    Rows [start, end) of each part in ``per_unit`` rows (a multiple of the batch size, so batches sit at the same
    offsets whatever the unit), a retried part whole."""
    units = []
    for t in todo:
        step = t["stop"] - t["start"] if t["retry"] else per_unit
        units += [{"part": t["part"], "first": t["start"], "stop": t["stop"], "retry": t["retry"], "start": s,
                   "end": min(s + step, t["stop"])} for s in range(t["start"], t["stop"], step)]
    return units


def _is_out_of_memory(e: BaseException) -> bool:
    import torch

    return isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


CALL_BYTES = 256 * 2**20  # at most this much of images in one model-stage call


def plan_of(run: RunConfig, config: ModelConfig, unit: int) -> Plan:
    """The plane's actors for ``run``, with units of ``unit`` rows.

    A call takes a unit's batches (at most ``CALL_BYTES`` of images); each actor reserves its CPUs, its GPU and the heap
    of a model and two calls."""
    one = batch_bytes(run.batch_size, config.image_size, run.precision == "bf16")
    calls = max(1, min(-(-unit // run.batch_size), CALL_BYTES // one))
    return Plan(num_actors=run.num_actors, batches_per_call=calls, num_cpus=run.num_cpus_per_actor,
                num_gpus=run.num_gpus_per_actor, memory=2**30 + 2 * calls * one, no_progress_s=run.no_progress_s,
                start_timeout_s=run.start_timeout_s)
