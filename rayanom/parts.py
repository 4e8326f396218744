"""Output stage: scores written in deterministic parts, so an interrupted job resumes where it stopped.

Part k holds index rows ``[k * rows_per_part, (k + 1) * rows_per_part)``, sorted by ``row_index``, in
``part-{k:08d}.parquet``. A part is written to a hidden temporary name and then moved into place, so a part file
exists only when complete. ``_rayanom_scores.json`` records what the parts belong to (model, index, part size, batch
size): running the same command again skips the complete parts and writes the rest, and the result equals an
uninterrupted run; a different model or index is refused unless ``--overwrite``. Names starting with ``_`` or ``.``
are ignored by pyarrow and Ray Data readers, so the directory reads as one parquet dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rayanom.config import UserError
from rayanom.data import ROW_COL, resolve_filesystem

logger = logging.getLogger(__name__)

MANIFEST = "_rayanom_scores.json"
PART_RE = re.compile(r"^part-(\d{8})\.parquet$")


def part_name(k: int) -> str:
    return f"part-{k:08d}.parquet"


def table_fingerprint(table: pa.Table) -> str:
    """sha256 of a table's content (schema and values), via its Arrow IPC serialisation."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def _is_ours(name: str) -> bool:
    return name == MANIFEST or bool(PART_RE.match(name)) or (name.startswith(".part-") and name.endswith(".tmp"))


def check_parts_dir(output: str) -> None:
    """Before any work: ``output`` must be new, or a directory holding only scores parts (resumable or replaceable)."""
    fs, path = resolve_filesystem(output)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        msg = f"output {output!r} is a file, expected a directory"
        raise UserError(msg)
    if info.type == pafs.FileType.Directory:
        foreign = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path, recursive=False))
                         if not _is_ours(i.base_name))
        if foreign:
            msg = f"output {output!r} holds other files {foreign[:5]}; choose an empty or new directory"
            raise UserError(msg)


def has_parts(output: str) -> bool:
    """Whether ``output`` holds anything of a scores run (parts or a manifest)."""
    fs, path = resolve_filesystem(output)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return False
    return any(_is_ours(i.base_name) for i in fs.get_file_info(pafs.FileSelector(path, recursive=False)))


def open_parts(output: str, manifest: dict, overwrite: bool) -> set[int]:
    """Prepare ``output`` for ``manifest``'s run; return the indices of the parts already complete (to skip).

    Raises:
        UserError: the directory holds other files, or parts of another run (without ``overwrite``).
    """
    check_parts_dir(output)
    fs, path = resolve_filesystem(output)
    names = []
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(path, recursive=False))]
    previous = _read_manifest(fs, path) if MANIFEST in names else None
    if names and previous != manifest:
        if not overwrite:
            what = "scores of another model, index or part layout" if previous else "incomplete scores"
            msg = (f"output {output!r} holds {what}; pass --overwrite to replace them (re-running the same command "
                   "resumes instead)")
            raise UserError(msg)
        for name in names:
            fs.delete_file(f"{path}/{name}")
        names = []
    fs.create_dir(path, recursive=True)
    for name in names:
        if name.endswith(".tmp"):
            fs.delete_file(f"{path}/{name}")  # a part that was being written when the last run stopped
    if MANIFEST not in names:
        with fs.open_output_stream(f"{path}/{MANIFEST}") as f:
            f.write(json.dumps(manifest, indent=2, sort_keys=True).encode())
    done = {int(m.group(1)) for n in names if (m := PART_RE.match(n))}
    if done:
        logger.info("resuming %s: %d of %d parts already complete", output, len(done), manifest["n_parts"])
    return done


def _read_manifest(fs: pafs.FileSystem, path: str) -> dict | None:
    try:
        with fs.open_input_file(f"{path}/{MANIFEST}") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


class PartWriter:
    """Collects scored blocks (any order) and writes each part as soon as all its rows have arrived."""

    def __init__(self, output: str, rows_per_part: int, n_rows: int) -> None:
        self.fs, self.path = resolve_filesystem(output)
        self.rows_per_part = rows_per_part
        self.n_rows = n_rows
        self._pending: dict[int, list[pa.Table]] = {}
        self._counts: dict[int, int] = {}
        self.written = 0

    def _size(self, k: int) -> int:
        return min(self.rows_per_part, self.n_rows - k * self.rows_per_part)

    def add(self, block: pa.Table) -> None:
        """A scored block, in any order; its rows may belong to one part or several."""
        if block.num_rows == 0:
            return
        parts = pc.divide(block.column(ROW_COL), self.rows_per_part).to_numpy()
        for k in np.unique(parts):
            rows = block.filter(pa.array(parts == k)) if parts[0] != parts[-1] else block
            k = int(k)
            self._pending.setdefault(k, []).append(rows)
            self._counts[k] = self._counts.get(k, 0) + rows.num_rows
            if self._counts[k] == self._size(k):
                self._write(k, pa.concat_tables(self._pending.pop(k)).sort_by(ROW_COL))
                del self._counts[k]

    def _write(self, k: int, table: pa.Table) -> None:
        tmp, final = f"{self.path}/.{part_name(k)}.tmp", f"{self.path}/{part_name(k)}"
        with self.fs.open_output_stream(tmp) as f:
            pq.write_table(table, f)
        self.fs.move(tmp, final)
        self.written += 1

    def close(self) -> None:
        """Every expected row must have arrived: a gap is an internal error, never silent."""
        if self._pending:
            missing = {k: self._size(k) - self._counts[k] for k in self._pending}
            msg = f"parts {sorted(missing)[:5]} are incomplete ({sum(missing.values())} rows missing)"
            raise RuntimeError(msg)
