"""Output stage: scores written in deterministic parts, so an interrupted job resumes where it stopped.

Part k holds index rows ``[k * rows_per_part, (k + 1) * rows_per_part)``, sorted by ``row_index``, in
``part-{k:08d}.parquet``, written by the worker that scored it to a hidden temporary name and then moved into place,
so a part file exists only when complete. ``_rayanom_scores.json`` records what the parts belong to (model, index
fingerprint and its files', part size, precision): running the same command again skips the complete parts and
writes the rest, and the result equals an uninterrupted run; a different model or index is refused unless
``--overwrite``. Names starting with ``_`` or ``.`` are ignored by pyarrow and Ray Data readers, so the directory
reads as one parquet dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rayanom.config import UserError
from rayanom.data import resolve_filesystem

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
        for name in names:
            fs.delete_file(f"{path}/{name}")
        names, done = [], set()
    fs.create_dir(path, recursive=True)
    for name in names:
        if name.endswith(".tmp"):
            fs.delete_file(f"{path}/{name}")  # a part that was being written when the last run stopped
    if MANIFEST not in names:
        with fs.open_output_stream(f"{path}/{MANIFEST}") as f:
            f.write(json.dumps(manifest, indent=2, sort_keys=True).encode())
    if done:
        logger.info("resuming %s: %d of %d parts already complete", output, len(done), manifest["n_parts"])
    return done


_INDEX_KEYS = ("index", "index_files", "n_rows", "n_parts")  # what a new version of the same index changes


def _without_index(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in _INDEX_KEYS}


def _read_manifest(fs: pafs.FileSystem, path: str) -> dict | None:
    try:
        with fs.open_input_file(f"{path}/{MANIFEST}") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def write_part(output: str, k: int, table: pa.Table, job: str) -> None:
    """Write part ``k`` on a worker: to a hidden name unique to ``job`` and this part, then moved into place, so a
    part file exists only when complete (a retried task rewrites its own temporary file)."""
    fs, path = resolve_filesystem(output)
    tmp, final = f"{path}/.{part_name(k)}.{job}.tmp", f"{path}/{part_name(k)}"
    with fs.open_output_stream(tmp) as f:
        pq.write_table(table, f)
    fs.move(tmp, final)


def changed_parts(previous: dict, manifest: dict, done: set[int]) -> int:
    """How many of the ``done`` parts of ``previous`` read rows of index files that ``manifest``'s index changed
    (per-file fingerprints; a file whose row count changed, or that is gone, shifts every row after it)."""
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
