"""The data plane on Ray Data: a CPU decode stage that runs on any node, and a model stage of accelerator actors.

units (small rows: a row range of a part, or a chunk of fit rows) -> ``decode_units`` (Ray Data tasks: one output
row per forward batch, its images as float32 bytes, bf16 for bf16 runs) -> a model stage class
(``ActorPoolStrategy``, ``Plan.batches_per_call`` forward batches a call) -> small result rows, streamed to the
driver. Forward batches are cut at fixed offsets from
the start of their part or chunk, and every batch the model sees is checked against what it should hold, so results
do not depend on how Ray Data cuts blocks or on how many actors run. Where decode and model ask for the same
resources (CPU only) Ray Data fuses them into the actors: decode then runs in the model's process, with nothing to
ship between them; with an accelerator it runs as tasks on any node with a free CPU.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rayanom.columns import ROW_COL
from rayanom.config import UserError
from rayanom.decode import Decoded, bf16_bits, decode_table, failed_table
from rayanom.storage import ReadPolicy, ipc_bytes

logger = logging.getLogger(__name__)

# A unit or batch whose worker died this many times is done row by row, skipping the rows that kill it.
CAREFUL_AFTER = 2
# Where a forward batch sits: its part (or fit chunk) and the part's rows [first, stop), whether it re-scores the part's
# failed rows only (retry), the batch's offset in the rows it is cut from, their number (total) and its own rows (n).
BATCH_COLS = ("part", "first", "stop", "retry", "offset", "total", "n")
GROUP_BYTES = 32 * 2**20  # the decode stage emits its batch rows in tables of about this much of images


@dataclass(frozen=True)
class Plan:
    """How the plane runs: the actors (count, resources, device, precision) and Ray Data's limits."""

    num_actors: int
    batches_per_call: int  # forward batches a model-stage call takes (its fragments and crash marker are per call)
    num_cpus: float
    num_gpus: float
    memory: int  # bytes of heap each model actor reserves (Ray Data does not count it)
    no_progress_s: float
    start_timeout_s: float


@dataclass(frozen=True)
class FaultHooks:
    """Faults a caller injects into the stages (tests): each may raise, or end its worker's process.

    ``decode(rows)`` runs before each cut of rows is read (a forward batch, or a single row in careful mode);
    ``model(table, ok)`` before the model stage runs on a decoded batch (``ok``: the rows it computes).
    """

    decode: Callable[[pa.Table], None] | None = None
    model: Callable[[pa.Table, np.ndarray], None] | None = None


def batch_bytes(n: int, image_size: tuple[int, int], bf16: bool = False) -> int:
    """Bytes of one forward batch between the stages.

    Images at the model's input size, float32, or bfloat16 for bf16 runs."""
    return n * 3 * image_size[0] * image_size[1] * (2 if bf16 else 4)


def unit_rows(n_rows: int, per_part: int, batch_size: int, units: int = 64) -> int:
    """Rows per decode unit, a multiple of ``batch_size``.

    About ``units`` units for a small job (so a few thousand rows spread over every worker), a part for a large one;
    batches then sit at the same offsets whatever the unit."""
    def up(n: int) -> int:
        return -(-n // batch_size) * batch_size

    return min(up(per_part), max(batch_size, up(-(-n_rows // units))))


def to_batch_row(decoded: Decoded, where: dict, decode_s: float, node: str) -> dict:
    """One forward batch as one row (a dict of columns).

    Its place (``BATCH_COLS``), its decoded table (Arrow IPC), the images of the rows that decoded (their bytes,
    float32 or bf16; a failed row has none) and where and how long the decode ran."""
    images = np.ascontiguousarray(decoded.images)
    return {**{k: int(where[k]) for k in BATCH_COLS}, "meta": ipc_bytes(decoded.table), "pixels": images.tobytes(),
            "decode_node": node, "decode_s": decode_s}


def batch_rows_table(rows: list[dict]) -> pa.Table:
    """Batch rows (:func:`to_batch_row`'s) as one Arrow table: the decode stage's output block."""
    cols = {k: pa.array([r[k] for r in rows], pa.int64()) for k in BATCH_COLS}
    return pa.table({**cols, "meta": pa.array([r["meta"] for r in rows], pa.large_binary()),
                     "pixels": pa.array([r["pixels"] for r in rows], pa.large_binary()),
                     "decode_node": pa.array([r["decode_node"] for r in rows], pa.string()),
                     "decode_s": pa.array([r["decode_s"] for r in rows], pa.float64())})


def from_batch_row(meta, pixels, image_size: tuple[int, int], bf16: bool = False) -> Decoded:
    """The decoded batch of a batch row, from its ``meta`` and ``pixels`` values (Arrow binary scalars)."""
    table = pa.ipc.open_stream(meta.as_buffer()).read_all()
    images = np.frombuffer(pixels.as_buffer(), dtype=np.uint16 if bf16 else np.float32)
    return Decoded(table, images.reshape(-1, 3, *image_size))


def checked_batches(rows: pa.Table, image_size: tuple[int, int], batch_size: int,
                    bf16: bool = False) -> Iterator[tuple[dict, Decoded]]:
    """The place and decoded batch of each batch row of a model-stage call, each checked (:func:`check_batch`)."""
    metas, pixels = rows.column("meta"), rows.column("pixels")
    for i, where in enumerate(rows.select(list(BATCH_COLS)).to_pylist()):
        decoded = from_batch_row(metas[i], pixels[i], image_size, bf16)
        check_batch(where, decoded, batch_size)
        yield where, decoded


def check_batch(where: dict, decoded: pa.Table, batch_size: int) -> None:
    """Refuse a batch whose rows are not the ones its place says (a short or merged batch would change results)."""
    n_expected = min(batch_size, int(where["total"]) - int(where["offset"]))
    problem = None
    if decoded.num_rows != n_expected or int(where["n"]) != n_expected:
        problem = f"{decoded.num_rows} rows (expected {n_expected})"
    elif int(where["offset"]) % batch_size:
        problem = f"offset {where['offset']} is not a multiple of the batch size {batch_size}"
    if problem:
        msg = (f"a forward batch of part {where['part']} at offset {where['offset']} holds {problem}: batches are "
               "cut at fixed offsets, so results would depend on how the data was split")
        raise RuntimeError(msg)


def node_id() -> str:
    """The id of the Ray node this runs on ("" outside Ray: the stages also run as plain objects, Ray or not)."""
    try:
        import ray
    except ImportError:
        return ""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def decode_rows(rows: pa.Table, where: dict, batch_size: int, image_size: tuple[int, int], policy: ReadPolicy,
                marker=None, bf16: bool = False, hook: Callable | None = None) -> Iterator[pa.Table]:
    """Decode ``rows`` in forward batches and yield them as tables of batch rows.

    Batches are cut at multiples of ``batch_size`` from ``where["offset"]`` (itself one), a table of them for every
    ``GROUP_BYTES`` of images. With a crash marker whose unit killed its worker ``CAREFUL_AFTER`` times: row by row,
    the marker naming the row in progress, and a row that killed the worker before failed without being read.
    ``bf16``: the images as a bf16 run's first convolution takes them. ``hook``: ``FaultHooks.decode``."""
    node, state = node_id(), marker.begin() if marker is not None else None
    careful = state is not None and state["attempts"] > CAREFUL_AFTER
    if careful:
        logger.warning("%s killed its worker %d times: decoding it row by row", marker.name, state["attempts"] - 1)
    group, held = [], 0
    for s in range(0, rows.num_rows, batch_size):
        t0 = time.perf_counter()
        cut = rows.slice(s, batch_size)
        decoded = (Decoded.concat(row_by_row(cut, marker, state,
                                             lambda row: decode_table(row, image_size, policy, hook),
                                             lambda row, message: failed_table(row, image_size, message)))
                   if careful else decode_table(cut, image_size, policy, hook))
        if bf16:
            decoded = Decoded(decoded.table, bf16_bits(decoded.images))
        group.append(to_batch_row(decoded, {**where, "offset": where["offset"] + s, "n": cut.num_rows},
                                  time.perf_counter() - t0, node))
        held += len(group[-1]["pixels"])
        if held >= GROUP_BYTES:
            yield batch_rows_table(group)
            group, held = [], 0
    if group:
        yield batch_rows_table(group)
    if marker is not None:
        marker.clear()


def row_by_row(rows: pa.Table, marker, state: dict, work: Callable, fail: Callable) -> list:
    """Run ``work`` on each row alone, the crash marker naming the row first; return each row's result.

    A row known to kill the worker (``state``'s ``bad``) is not worked on but given to ``fail`` with the message that
    says so. Both stages' careful mode."""
    bad, out = set(state["bad"]), []
    for i in range(rows.num_rows):
        row = rows.slice(i, 1)
        r = int(row.column(ROW_COL)[0].as_py())
        if r in bad:
            out.append(fail(row, crash_message(state)))
            continue
        marker.at(state, r)
        out.append(work(row))
    return out


def crash_message(state: dict) -> str:
    return (f"WorkerCrash: the worker process died while reading or scoring this row ({state['attempts'] - 1} "
            "deaths of its worker); the row was skipped")


def decode_units(units: pa.Table, rows_of: Callable, batch_size: int, image_size: tuple[int, int],
                 policy: ReadPolicy, marker_of: Callable | None = None, bf16: bool = False,
                 hook: Callable | None = None) -> Iterator[pa.Table]:
    """The decode stage, a Ray Data generator UDF over unit rows.

    ``rows_of(unit)`` gives a unit's rows, decoded in forward batches (:func:`decode_rows`; ``hook``:
    ``FaultHooks.decode``); one output row per batch."""
    for unit in units.to_pylist():
        rows, where = rows_of(unit)
        marker = marker_of(unit) if marker_of is not None else None
        yield from decode_rows(rows, where, batch_size, image_size, policy, marker, bf16, hook)


def run(units: list[dict], decode: dict, stage: type, kwargs: dict, plan: Plan,
        progress: bool = True) -> Iterator[pa.Table]:
    """Stream ``units`` through decode tasks and a pool of ``stage`` actors; yield the result blocks.

    Decode runs ``decode_units`` with the arguments ``decode``; the actors are created from ``kwargs``; the model
    stage's result blocks reach the driver as they come."""
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_no_progress_timeout_s = plan.no_progress_s
    ctx.wait_for_min_actors_s = plan.start_timeout_s
    ctx.enable_progress_bars = progress
    # Equal resources let Ray Data fuse decode into the actors (CPU only); with a GPU, decode runs as CPU tasks.
    decode_args = ({"num_cpus": plan.num_cpus, "memory": plan.memory} if not plan.num_gpus else {"num_cpus": 1})
    ds = ray.data.from_items(units, override_num_blocks=max(1, len(units)))
    ds = ds.map_batches(decode_units, fn_kwargs=decode, batch_size=1, batch_format="pyarrow", **decode_args)
    pool = ray.data.ActorPoolStrategy(min_size=1, max_size=plan.num_actors, initial_size=plan.num_actors)
    ds = ds.map_batches(stage, fn_constructor_kwargs=kwargs, compute=pool, batch_size=plan.batches_per_call,
                        batch_format="pyarrow",
                        num_cpus=plan.num_cpus, num_gpus=plan.num_gpus or None, memory=plan.memory)
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1)
    except ray.data.exceptions.ExecutionTimeoutError as e:
        msg = (f"no progress for {plan.no_progress_s:g} s in the {stage.__name__} plane (raise --no-progress-timeout "
               f"if the cluster is slow to give resources): {e}")
        raise RuntimeError(msg) from None
    except ray.exceptions.GetTimeoutError as e:
        if "starting actors" not in str(e):
            raise
        from rayanom.pool import offer

        msg = (f"no {stage.__name__} actor ({plan.num_cpus:g} CPU, {plan.num_gpus:g} GPU) could start in "
               f"{plan.start_timeout_s:g} s of waiting: the cluster has no room for one ({offer()}). Raise "
               "--wait-for-actors while its autoscaler is still starting nodes, or ask for what it has (--device, "
               "--num-actors)")
        raise UserError(msg) from None


class Nodes:
    """Where the work ran, counted on the driver from the result rows: rows per decode node and per model node."""

    def __init__(self) -> None:
        self.decode: Counter = Counter()
        self.model: Counter = Counter()
        self.rows = 0
        self.decode_s = 0.0
        self.model_s = 0.0

    def add(self, block: pa.Table) -> None:
        if not block.num_rows:
            return
        for col, counter in (("decode_node", self.decode), ("node", self.model)):
            for r in block.group_by(col).aggregate([("n", "sum")]).to_pylist():
                counter[r[col]] += int(r["n_sum"])
        self.rows += int(pc.sum(block.column("n")).as_py())
        self.decode_s += float(pc.sum(block.column("decode_s")).as_py())
        self.model_s += float(pc.sum(block.column("model_s")).as_py())

    def line(self, what: str, wall_s: float) -> str:
        """The closing line: rows/s of the job and per stage (per busy second of a task or actor), and the nodes."""
        def where(c: Counter) -> str:
            return ", ".join(f"{n} rows on node ...{k[-8:]}" for k, n in sorted(c.items()))

        return (f"{what}: {self.rows} rows in {wall_s:.1f} s ({self.rows / max(wall_s, 1e-9):.1f} rows/s); decode "
                f"{self.rows / max(self.decode_s, 1e-9):.1f} rows/s per task on {len(self.decode)} node(s) "
                f"({where(self.decode)}); model {self.rows / max(self.model_s, 1e-9):.1f} rows/s per actor on "
                f"{len(self.model)} node(s) ({where(self.model)})")


def result_cols(rows: pa.Table, model_s: float, **extra) -> dict:
    """The columns every model-stage result row carries (one per batch row of a call).

    The batch's place, where its decode and model ran, and its share of the call's time."""
    n = rows.num_rows
    return {**{k: rows.column(k) for k in ("part", "offset", "n", "decode_node", "decode_s")},
            "node": pa.array([node_id()] * n), "model_s": pa.array([model_s / n] * n), **extra}
