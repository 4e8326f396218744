"""Output stage: scores written in deterministic parts, so an interrupted job resumes where it stopped.

Part k holds index rows ``[k * rows_per_part, (k + 1) * rows_per_part)``, sorted by ``row_index``, in
``part-{k:08d}.parquet``, written by the worker that scored it to a hidden temporary name and then moved into place,
so a part file exists only when complete. ``_rayanom_scores.json`` records what the parts belong to (model, index
fingerprint and its files', part size, precision): running the same command again skips the complete parts and
writes the rest, and the result equals an uninterrupted run; a different model or index is refused unless
``--overwrite``. The part size is ``--rows-per-part``, or chosen from the index's row count (``rows_per_part``).
``_rayanom_model/`` holds a copy of the model the parts are scored with (the scoring actors read the head from it),
``_rayanom_val/`` the ``val`` rows scored first where they choose the threshold (``workflows.score_and_decide``).
Names starting with ``_`` or ``.`` are ignored by pyarrow and Ray Data readers, so the directory reads as one parquet
dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rayanom.columns import ROW_COL
from rayanom.config import UserError
from rayanom.decisions import META_KEY, Threshold, from_key, key_of, with_decisions
from rayanom.index import map_in_tasks
from rayanom.storage import ReadPolicy, check_output_dir, error_message, ipc_bytes, resolve_filesystem, with_retries

logger = logging.getLogger(__name__)

MANIFEST = "_rayanom_scores.json"
FRAGMENTS = "_rayanom_fragments"  # scored batches of parts not yet complete: FRAGMENTS/JOB/PART/OFFSET-ROWS.parquet
PART_RE = re.compile(r"^part-(\d{8})\.parquet$")
AUTO_PARTS = 64  # the automatic layout cuts an index into about this many parts ...
AUTO_ROWS = (1024, 4096)  # ... of a power of two rows within these bounds


def part_name(k: int) -> str:
    return f"part-{k:08d}.parquet"


def rows_per_part(output: str, n_rows: int, requested: int = 0, overwrite: bool = False) -> int:
    """Rows per part of a scoring job, chosen so that parts stay the same whatever the number of actors.

    ``requested`` (``--rows-per-part``) when not 0; else, unless ``overwrite``, the layout of the scores ``output``
    holds already (a resume, or scores of an earlier version of the index, keep theirs); else ``n_rows / AUTO_PARTS``
    rounded up to a power of two within ``AUTO_ROWS``. A small index is then cut into parts enough to keep every actor
    busy to the end (few large parts leave actors idle at the end of the job), a large one into 4,096-row parts. The
    layout depends on the index (and what ``output`` holds), never on the actors."""
    if requested:
        return requested
    fs, path = resolve_filesystem(output)
    if not overwrite and fs.get_file_info(f"{path}/{MANIFEST}").type == pafs.FileType.File:
        previous = _read_manifest(fs, path).get("rows_per_part")
        if isinstance(previous, int) and previous >= 1:
            return previous
    lo, hi = AUTO_ROWS
    return min(hi, max(lo, 1 << max(0, -(-n_rows // AUTO_PARTS) - 1).bit_length()))


def table_fingerprint(table: pa.Table) -> str:
    """sha256 of a table's content (schema and values), via its Arrow IPC serialisation."""
    return hashlib.sha256(ipc_bytes(table)).hexdigest()


def _is_ours(name: str) -> bool:
    return (name in (MANIFEST, LEASE, MODEL_COPY, FRAGMENTS, VAL_DIR) or bool(PART_RE.match(name))
            or (name.startswith((".part-", f".{MANIFEST}", f".{LEASE}")) and name.endswith((".tmp", ".probe"))))


def check_parts_dir(output: str) -> None:
    """Before any work: ``output`` must be new, or a directory holding only scores parts (resumable or replaceable)."""
    check_output_dir(output, _is_ours, overwrite=True)


def has_parts(output: str) -> bool:
    """Whether ``output`` holds anything of a scores run (parts or a manifest)."""
    fs, path = resolve_filesystem(output)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return False
    return any(_is_ours(i.base_name) and i.base_name not in _NOT_CONTENT
               for i in fs.get_file_info(pafs.FileSelector(path, recursive=False)))


def open_parts(output: str, manifest: dict, overwrite: bool) -> set[int]:
    """Prepare ``output`` for ``manifest``'s run; return the indices of the parts already complete (to skip).

    Raises:
        UserError: the directory holds other files, or parts of another run (without ``overwrite``).
    """
    check_parts_dir(output)
    fs, path = resolve_filesystem(output)
    infos = []
    if fs.get_file_info(path).type == pafs.FileType.Directory:  # the lease (this job's, see Lease) is not content
        infos = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=False))
                 if i.base_name not in _NOT_CONTENT and not i.base_name.endswith(".probe")]
    names = [i.base_name for i in infos]
    previous = _read_manifest(fs, path) if MANIFEST in names else None
    done = {int(m.group(1)) for n in names if (m := PART_RE.match(n))}
    if names and previous != manifest:
        if not overwrite:
            what = "scores of another model, index or part layout" if previous else "incomplete scores"
            if previous and _without_index(previous) == _without_index(manifest):
                what = (f"scores of another version of this index: {changed_parts(previous, manifest, done)} of "
                        f"its {len(done)} complete parts read rows that changed")
            msg = (f"output {output!r} holds {what}; pass --overwrite to replace them (re-running the same command "
                   "resumes instead)")
            raise UserError(msg)
        for i in infos:
            (fs.delete_dir if i.type == pafs.FileType.Directory else fs.delete_file)(f"{path}/{i.base_name}")
        infos, names, done = [], [], set()
    fs.create_dir(path, recursive=True)
    temporary = [i for i in infos if i.base_name.endswith(".tmp")]
    if temporary:  # parts that were being written when an earlier job stopped; a live job's are younger, kept
        now = _store_now(fs, path)
        for i in temporary:
            if (now - i.mtime_ns) / 1e9 > LEASE_STALE_S:
                fs.delete_file(f"{path}/{i.base_name}")
    if MANIFEST not in names:  # written whole under a temporary name, then moved: never read half-written
        with fs.open_output_stream(f"{path}/.{MANIFEST}.tmp") as f:
            f.write(json.dumps(manifest, indent=2, sort_keys=True).encode())
        fs.move(f"{path}/.{MANIFEST}.tmp", f"{path}/{MANIFEST}")
    if done:
        logger.info("resuming %s: %d of %d parts already complete", output, len(done), manifest["n_parts"])
    return done


_INDEX_KEYS = ("index", "index_files", "n_rows", "n_parts")  # what a new version of the same index changes


def _without_index(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in _INDEX_KEYS}


def read_manifest(output: str) -> dict:
    """The manifest of the scores directory ``output``; UserError where there is none."""
    fs, path = resolve_filesystem(output)
    if fs.get_file_info(f"{path}/{MANIFEST}").type == pafs.FileType.NotFound:
        msg = f"{output!r} holds no scores (no {MANIFEST})"
        raise UserError(msg)
    return _read_manifest(fs, path)


def _read_manifest(fs: pafs.FileSystem, path: str) -> dict:
    """The manifest, read with retries of transient storage errors.

    A read that still fails is an error that asks for a re-run and changes nothing (it must never lead to --overwrite,
    which deletes the parts); a manifest that is not JSON reads as one that disagrees."""
    def read() -> bytes:
        with fs.open_input_file(f"{path}/{MANIFEST}") as f:
            return f.read()

    try:
        text = with_retries(read, ReadPolicy())
    except OSError as e:
        msg = (f"cannot read the scores manifest {path}/{MANIFEST} ({error_message(e)}); nothing was changed: check "
               "access to the output and re-run the same command to resume")
        raise UserError(msg) from e
    try:
        manifest = json.loads(text)
    except ValueError:
        return {"format": "unparseable manifest"}
    return manifest if isinstance(manifest, dict) else {"format": "unparseable manifest"}


def s3_put_if_absent(fs: pafs.S3FileSystem, path: str, body: bytes) -> bool:
    """Write ``body`` at ``path`` (``bucket/key``) only if no object is there; True when written, False when it exists.

    It uses S3's conditional write (``If-None-Match: *``) through boto3, since pyarrow's S3 filesystem cannot send it;
    an existing object answers 412 Precondition Failed, or 409 when another conditional write to the key is in flight.
    boto3 finds the endpoint and credentials in the same environment as pyarrow (``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID``...).
    """
    import boto3
    from botocore.exceptions import ClientError

    bucket, _, key = path.partition("/")
    client = boto3.client("s3", region_name=fs.region or None)
    try:
        client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
    except ClientError as e:
        if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
            return False
        raise OSError(f"cannot create s3://{path}: {e}") from e
    return True


def _store_now(fs: pafs.FileSystem, path: str) -> int:
    """The store's clock (ns): the modification time of a probe file written now."""
    probe = f"{path}/.{LEASE}.{uuid.uuid4().hex[:12]}.probe"
    with fs.open_output_stream(probe) as f:
        f.write(b"")
    now = fs.get_file_info(probe).mtime_ns
    fs.delete_file(probe)
    return now


def part_problems(output: str, parts: list[int], n_rows: int, rows_per_part: int) -> dict[int, str]:
    """What is wrong with complete parts ``parts``, from their footers alone; parts without a problem are left out.

    The row count and the ``row_index`` range (row group statistics) must be those of the part's rows."""
    fs, path = resolve_filesystem(output)
    problems = {}
    for k in parts:
        lo = k * rows_per_part
        expect = min(rows_per_part, n_rows - lo)
        try:
            with fs.open_input_file(f"{path}/{part_name(k)}") as f:
                meta = pq.ParquetFile(f).metadata
        except (OSError, pa.ArrowInvalid) as e:
            problems[k] = f"unreadable footer ({e})"
            continue
        if meta.num_rows != expect:
            problems[k] = f"{meta.num_rows} rows, expected {expect}"
            continue
        names = [meta.schema.column(i).name for i in range(meta.num_columns)]
        if ROW_COL not in names:
            problems[k] = f"no {ROW_COL} column"
            continue
        j = names.index(ROW_COL)
        stats = [meta.row_group(g).column(j).statistics for g in range(meta.num_row_groups)]
        if not stats or any(st is None or not st.has_min_max for st in stats):
            problems[k] = f"no {ROW_COL} statistics"
            continue
        found = (min(st.min for st in stats), max(st.max for st in stats))
        if found != (lo, lo + expect - 1):
            problems[k] = f"{ROW_COL} {found[0]}..{found[1]}, expected {lo}..{lo + expect - 1}"
    return problems


def complete_parts(output: str) -> set[int]:
    """The numbers of the complete parts in ``output`` (none where it does not exist)."""
    fs, path = resolve_filesystem(output)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return set()
    return {int(m.group(1)) for i in fs.get_file_info(pafs.FileSelector(path)) if (m := PART_RE.match(i.base_name))}


def write_part(output: str, k: int, table: pa.Table, job: str) -> None:
    """Write part ``k`` on a worker, so that a part file exists only when complete.

    It is written to a hidden name unique to ``job`` and this part, then moved into place (a retried task rewrites its
    own temporary file)."""
    fs, path = resolve_filesystem(output)
    tmp, final = f"{path}/.{part_name(k)}.{job}.tmp", f"{path}/{part_name(k)}"
    with fs.open_output_stream(tmp) as f:
        pq.write_table(table, f)
    fs.move(tmp, final)


def changed_parts(previous: dict, manifest: dict, done: set[int]) -> int:
    """How many of the ``done`` parts of ``previous`` read rows of index files that ``manifest``'s index changed.

    Files are compared by per-file fingerprints; a file whose row count changed, or that is gone, shifts every row after
    it."""
    old, new = previous.get("index_files", []), manifest.get("index_files", [])
    rows = [json.loads(f)[3] for f in old]
    starts = np.cumsum([0, *rows])
    shift = next((i for i in range(len(old)) if i >= len(new) or json.loads(new[i])[3] != rows[i]), len(old))
    per = previous["rows_per_part"]
    hit: set[int] = set()
    for i in range(len(old)):
        if i < shift and old[i] == new[i]:
            continue
        hit |= {k for k in done if k * per < starts[i + 1] and (k + 1) * per > starts[i]}
    return len(hit)


LEASE = "_rayanom_lease.json"
MODEL_COPY = "_rayanom_model"  # the artifact the parts were scored with, read by the scoring actors
VAL_DIR = "_rayanom_val"  # the val rows that chose the threshold, scored before the parts (index/, scores/)
_NOT_CONTENT = (LEASE, VAL_DIR)  # what a directory may hold besides its scores (this job's lease, its val rows)
LEASE_STALE_S = 120.0  # a lease whose heartbeat is older than this (by the store's clock) belongs to a dead job
HEARTBEAT_S = 15.0


class Lease:
    """One writer per scores directory: a lease file that the job's heartbeat keeps fresh.

    ``_rayanom_lease.json`` holds the job's id and is rewritten every ``HEARTBEAT_S`` seconds by a thread of the driver,
    so its modification time shows the job is alive.

    ``acquire`` creates it exclusively: ``O_EXCL`` on a local directory, S3's conditional write on S3
    (``s3_put_if_absent``); elsewhere (GCS, HDFS, ...) a check, a write and a read-back, where a race of two jobs
    starting within the same second remains possible (documented). A lease that exists is refused while fresh; one whose
    heartbeat is older than ``LEASE_STALE_S``, measured against the store's own clock (the modification time of a probe
    file written now, never this machine's clock), is taken over, and so is one taken on this machine by a process that
    no longer exists (a killed job resumed at once).
    """

    def __init__(self, output: str, job: str | None = None) -> None:
        self.output, self.job = output, job or uuid.uuid4().hex[:12]  # a new job id unless given
        self.fs, self.path = resolve_filesystem(output)
        self.file = f"{self.path}/{LEASE}"
        self._stop = None
        self._thread = None
        self._created = False

    def _body(self) -> bytes:
        return json.dumps({"job": self.job, "host": socket.gethostname(), "pid": os.getpid(),
                           "heartbeat": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()

    def _write(self) -> None:
        with self.fs.open_output_stream(self.file) as f:
            f.write(self._body())

    def _holder(self) -> dict:
        try:
            with self.fs.open_input_file(self.file) as f:
                return json.loads(f.read())
        except (OSError, ValueError):
            return {}

    def age(self) -> float | None:
        """Seconds since the lease's last heartbeat, by the store's clock; None when there is no lease."""
        info = self.fs.get_file_info(self.file)
        if info.type == pafs.FileType.NotFound:
            return None
        return max(0.0, (_store_now(self.fs, self.path) - info.mtime_ns) / 1e9)

    def acquire(self) -> None:
        """Take the lease or raise UserError naming the job that holds it."""
        self._created = self.fs.get_file_info(self.path).type == pafs.FileType.NotFound
        self.fs.create_dir(self.path, recursive=True)
        for _ in range(2):
            created = self._create()
            if created:
                break
            if created is None and self.fs.get_file_info(self.file).type == pafs.FileType.NotFound:
                self._write()
                if self._holder().get("job") == self.job:
                    break
            age = self.age()
            if age is not None and age < LEASE_STALE_S and not self._holder_is_gone():
                holder = self._holder()
                msg = (f"output {self.output!r} is being written by another job ({holder.get('job', '?')} on "
                       f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}; last heartbeat {age:.0f} s ago); "
                       f"wait for it to finish or stop it. A lease without a heartbeat for {LEASE_STALE_S:.0f} s is "
                       "taken over")
                raise UserError(msg)
            if age is not None:
                logger.warning("output %s: taking over a stale lease (last heartbeat %.0f s ago, job %s)",
                               self.output, age, self._holder().get("job", "?"))
                self.fs.delete_file(self.file)
        else:
            msg = f"output {self.output!r}: another job took the lease at the same time; re-run"
            raise UserError(msg)
        self._start_heartbeat()

    def _create(self) -> bool | None:
        """Create the lease file only where none exists, in one atomic step.

        True when this job created it, False when one exists; None where the filesystem has no such write."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self._body())
            return True
        if isinstance(self.fs, pafs.S3FileSystem):
            return s3_put_if_absent(self.fs, self.file, self._body())
        return None

    def _holder_is_gone(self) -> bool:
        """Whether the lease was taken on this machine by a process that no longer exists (a job killed a moment ago).

        Such a lease can be taken over without waiting for the heartbeat to go stale."""
        holder = self._holder()
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False

    def _start_heartbeat(self) -> None:
        self._stop = threading.Event()

        def beat():
            while not self._stop.wait(HEARTBEAT_S):
                holder = self._holder()
                if holder and holder.get("job") != self.job:
                    logger.error("output %s: the lease was taken over by job %s; this job (%s) no longer owns it",
                                 self.output, holder.get("job"), self.job)
                    return
                try:
                    self._write()
                except OSError as e:  # a missed heartbeat is retried at the next one
                    logger.warning("output %s: lease heartbeat failed: %s", self.output, e)

        self._thread = threading.Thread(target=beat, name="rayanom-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join()
        if self._holder().get("job") == self.job:
            self.fs.delete_file(self.file)
        if self._created and not self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True)):
            self.fs.delete_dir(self.path)  # a job refused before writing leaves no directory behind

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class CrashMarker:
    """A file beside the parts (``.NAME.crash.tmp``) while a worker decodes or scores the unit of work ``name``.

    It records how many times the unit was begun (``attempts``), the rows known to kill the worker (``bad``) and, when
    working row by row, the row in progress (``row``). Cleared when the unit is done; still there when it is begun again
    means the last worker died on it (``plane.decode_rows``, ``pipeline.ScoreBatches``)."""

    def __init__(self, output: str, name: str) -> None:
        self.fs, path = resolve_filesystem(output)
        self.name = name
        self.file = f"{path}/.{name}.crash.tmp"

    def begin(self) -> dict:
        previous = {}
        try:
            with self.fs.open_input_file(self.file) as f:
                previous = json.loads(f.read())
        except (OSError, ValueError):
            pass
        bad = list(previous.get("bad", []))
        if previous.get("row") is not None:
            bad.append(int(previous["row"]))  # the row in progress when the last worker died
        state = {"attempts": int(previous.get("attempts", 0)) + 1, "bad": sorted(set(bad)), "row": None}
        self._write(state)
        return state

    def at(self, state: dict, row: int) -> None:
        self._write({**state, "row": row})

    def clear(self) -> None:
        try:
            self.fs.delete_file(self.file)
        except FileNotFoundError:
            pass

    def _write(self, state: dict) -> None:
        with self.fs.open_output_stream(self.file) as f:
            f.write(json.dumps(state).encode())


def _parts_decided(output: str, ks: list[int], key: bytes) -> list[int]:
    """A worker's share of ``apply_to_parts``: rewrite the parts among ``ks`` decided with another threshold."""
    t = from_key(key)
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
    """Decide every complete part of ``output`` with ``t``, on the workers; returns how many parts were rewritten.

    Only the parts decided with another threshold are rewritten: the footers show which."""
    ks = sorted(complete_parts(output))
    return sum(len(d) for d in map_in_tasks(_parts_decided, ks, parts_per_task, output, key_of(t)))


def failed_rows(output: str, parts: list[int]) -> dict[int, int]:
    """Rows with an ``error`` in each of the complete parts ``parts`` (that column only is read)."""
    fs, path = resolve_filesystem(output)
    counts = {}
    for k in parts:
        with fs.open_input_file(f"{path}/{part_name(k)}") as f:
            errors = pq.ParquetFile(f).read(columns=["error"]).column(0)
        counts[k] = len(errors) - errors.null_count
    return counts


_FRAGMENT_RE = re.compile(r"^(\d{10})-(\d{10})\.parquet$")


def fragment_dir(output: str, job: str, k: int) -> tuple[pafs.FileSystem, str]:
    fs, path = resolve_filesystem(output)
    return fs, f"{path}/{FRAGMENTS}/{job}/{part_name(k)}"


def write_fragment(output: str, job: str, k: int, offset: int, table: pa.Table) -> int:
    """Write scored rows of part ``k``; return how many of the part's rows its fragments hold now.

    A fragment is named by the offset of its first batch and its number, written to a temporary name, then moved into
    place (a retried call rewrites the same fragment)."""
    fs, d = fragment_dir(output, job, k)
    fs.create_dir(d, recursive=True)
    name = f"{offset:010d}-{table.num_rows:010d}"
    tmp, final = f"{d}/.{name}.{uuid.uuid4().hex}.tmp", f"{d}/{name}.parquet"
    with fs.open_output_stream(tmp) as f:
        pq.write_table(table, f)
    fs.move(tmp, final)
    return sum(int(m.group(2)) for i in fs.get_file_info(pafs.FileSelector(d, allow_not_found=True))
               if (m := _FRAGMENT_RE.match(i.base_name)))


def read_fragments(output: str, job: str, k: int) -> pa.Table | None:
    """Part ``k``'s fragments concatenated, in row order; None when they are gone (another call joined them)."""
    fs, d = fragment_dir(output, job, k)
    try:
        names = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(d)) if _FRAGMENT_RE.match(i.base_name))
        tables = []
        for name in names:
            with fs.open_input_file(name) as f:
                tables.append(pq.read_table(f))
    except FileNotFoundError:
        return None
    return pa.concat_tables(tables).sort_by(ROW_COL) if tables else None


def drop_fragments(output: str, job: str | None = None, k: int | None = None) -> None:
    """Delete the fragments of part ``k`` of ``job``, of all its parts, or (``job`` None) of every job."""
    fs, path = resolve_filesystem(output)
    d = f"{path}/{FRAGMENTS}" + (f"/{job}" if job else "") + (f"/{part_name(k)}" if k is not None else "")
    try:
        fs.delete_dir(d)
    except FileNotFoundError:
        pass
