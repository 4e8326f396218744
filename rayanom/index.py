"""The index at scale: described from parquet footers on the driver, read in row ranges on the workers.

``describe_index`` lists the index's files in the order ``pyarrow.parquet.read_table`` reads them (pyarrow's dataset
discovery: a file, or a directory's files sorted, names starting with ``_`` or ``.`` ignored) and reads each footer:
the schema, the rows per file and per row group. From those alone come ``row_index`` (a row's position in that
order), the fingerprint (paths, sizes, modification times, row counts, schema: O(files)) and the checks of the
schema. The rows themselves are read only by workers, as ranges (``read_rows``), and the values of ``label`` by
``index_value_errors`` (one task per group of files, returning at most a message each). Nothing here grows with the
number of rows on the driver.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rayanom.bank import lower_keys
from rayanom.columns import LABEL_COL, PATH_COL, RESERVED_COLS, ROW_COL, SPLIT_COL
from rayanom.config import UserError
from rayanom.storage import resolve_filesystem


@dataclass(frozen=True)
class IndexInfo:
    """Metadata of a parquet index, enough to read any row range on a worker, O(files + row groups) in size."""

    uri: str
    files: tuple[str, ...]  # filesystem paths (resolved against ``uri``'s filesystem), in read order
    group_rows: tuple[tuple[int, ...], ...]  # rows per row group, per file
    file_fingerprints: tuple[str, ...]  # per file: path, size, modification time, rows
    schema_text: str
    columns: tuple[str, ...]
    first_row: int = 0  # row_index of the first file's first row (``part_of``)

    @property
    def file_rows(self) -> np.ndarray:
        return np.array([sum(g) for g in self.group_rows], dtype=np.int64)

    @property
    def n_rows(self) -> int:
        return int(self.file_rows.sum())

    @property
    def fingerprint(self) -> str:
        """sha256 of the files' identities and the schema: changes when any file is replaced, grown or edited."""
        text = json.dumps({"files": self.file_fingerprints, "schema": self.schema_text})
        return hashlib.sha256(text.encode()).hexdigest()

    def file_ranges(self) -> list[tuple[int, int]]:
        """[start, stop) global row range of each file."""
        ends = self.first_row + np.cumsum(self.file_rows)
        return [(int(e - r), int(e)) for e, r in zip(ends, self.file_rows)]

    def part_of(self, start: int, stop: int) -> IndexInfo:
        """The description of only the files holding rows [start, stop), what a worker needs to read them.

        Read by ``read_rows``; its size is O(those files) whatever the size of the index."""
        keep = [i for i, (a, b) in enumerate(self.file_ranges()) if a < stop and b > start]
        if not keep:
            return dataclasses.replace(self, files=(), group_rows=(), file_fingerprints=(), first_row=start)
        return dataclasses.replace(self, files=tuple(self.files[i] for i in keep),
                                   group_rows=tuple(self.group_rows[i] for i in keep),
                                   file_fingerprints=tuple(self.file_fingerprints[i] for i in keep),
                                   first_row=self.file_ranges()[keep[0]][0])


def read_index(uri: str) -> pa.Table:
    """Read and validate a parquet index (a file or a directory of parquet files).

    Raises:
        UserError: missing ``path`` column, wrong column types, labels outside {0, 1}, reserved column names.
    """
    fs, path = resolve_filesystem(uri)
    try:
        table = pq.read_table(path, filesystem=fs)
    except (OSError, pa.ArrowInvalid) as e:
        msg = f"cannot read index {uri!r} as parquet: {e}"
        raise UserError(msg) from e
    return validate_index(table, uri)


def validate_index(table: pa.Table, name: str = "index") -> pa.Table:
    """Check the schema and values of an index table and return it unchanged."""
    validate_schema(table.schema, name)
    check_index_values(table, name)
    return table


def validate_schema(schema: pa.Schema, name: str = "index") -> None:
    """The index's columns: ``path`` strings, no reserved names, integer ``label``, string ``split``."""
    cols = schema.names
    if PATH_COL not in cols:
        msg = f"{name}: required column 'path' is missing (columns: {cols}); it must hold image paths or URIs"
        raise UserError(msg)
    if not (pa.types.is_string(schema.field(PATH_COL).type) or pa.types.is_large_string(schema.field(PATH_COL).type)):
        msg = f"{name}: column 'path' has type {schema.field(PATH_COL).type}; expected string"
        raise UserError(msg)
    reserved = [c for c in cols if c in RESERVED_COLS]
    if reserved:
        msg = f"{name}: column(s) {reserved} are reserved for outputs; rename them (reserved: {list(RESERVED_COLS)})"
        raise UserError(msg)
    if LABEL_COL in cols:
        t = schema.field(LABEL_COL).type
        if not (pa.types.is_integer(t) or pa.types.is_boolean(t)):
            msg = f"{name}: column 'label' has type {t}; expected integers 0 (normal) or 1 (anomalous)"
            raise UserError(msg)
    if SPLIT_COL in cols and not (pa.types.is_string(schema.field(SPLIT_COL).type)
                                  or pa.types.is_large_string(schema.field(SPLIT_COL).type)):
        msg = f"{name}: column 'split' has type {schema.field(SPLIT_COL).type}; expected string"
        raise UserError(msg)


def check_index_values(table: pa.Table, name: str = "index") -> None:
    """The values of ``label`` where the table has it: 0 or 1, no nulls."""
    if LABEL_COL not in table.column_names:
        return
    labels = table.column(LABEL_COL).cast(pa.int64())
    bad = pc.invert(pc.is_in(labels, pa.array([0, 1], pa.int64())))
    if pc.any(pc.fill_null(bad, True)).as_py():
        values = sorted({v for v in pc.filter(labels, pc.fill_null(bad, True)).to_pylist()}, key=str)[:5]
        msg = f"{name}: column 'label' holds {values}; allowed values are 0 (normal) and 1 (anomalous), no nulls"
        raise UserError(msg)


def with_row_index(table: pa.Table) -> pa.Table:
    """Append ``row_index`` (0..n-1, the row's position in the index)."""
    return table.append_column(ROW_COL, pa.array(np.arange(table.num_rows, dtype=np.int64)))


def training_rows(table: pa.Table) -> pa.Table:
    """Normal training rows: ``split == "train"`` when the column exists, and ``label == 0`` when it exists."""
    mask = pa.array(np.ones(table.num_rows, dtype=bool))
    if SPLIT_COL in table.column_names:
        mask = pc.and_(mask, pc.fill_null(pc.equal(table.column(SPLIT_COL), "train"), False))
    if LABEL_COL in table.column_names:
        mask = pc.and_(mask, pc.equal(table.column(LABEL_COL).cast(pa.int64()), 0))
    return table.filter(mask)


def describe_index(uri: str) -> IndexInfo:
    """Read the footers of the parquet index at ``uri`` and check its schema (``validate_schema``).

    Raises:
        UserError: unreadable index, missing ``path`` column, wrong column types, reserved column names.
    """
    fs, path = resolve_filesystem(uri)
    try:
        dataset = pads.dataset(path, filesystem=fs, format="parquet")
        fragments = list(dataset.get_fragments())
        groups = tuple(tuple(f.metadata.row_group(i).num_rows for i in range(f.metadata.num_row_groups))
                       for f in fragments)
    except (OSError, pa.ArrowInvalid) as e:
        msg = f"cannot read index {uri!r} as parquet: {e}"
        raise UserError(msg) from e
    validate_schema(dataset.schema, uri)
    infos = fs.get_file_info([f.path for f in fragments])
    prints = tuple(json.dumps([f.path, i.size, i.mtime_ns, sum(g)]) for f, i, g in zip(fragments, infos, groups))
    return IndexInfo(uri=uri, files=tuple(f.path for f in fragments), group_rows=groups, file_fingerprints=prints,
                     schema_text=dataset.schema.remove_metadata().to_string(), columns=tuple(dataset.schema.names))


def read_rows(info: IndexInfo, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of the index, with ``row_index``; only the row groups that hold them are read."""
    fs = resolve_filesystem(info.uri)[0]
    pieces = []
    for path, fingerprint, groups, (f_start, f_stop) in zip(info.files, info.file_fingerprints, info.group_rows,
                                                            info.file_ranges()):
        if f_stop <= start or f_start >= stop:
            continue
        ends = f_start + np.cumsum(groups)
        wanted = [g for g, (e, n) in enumerate(zip(ends, groups)) if e > start and e - n < stop]
        first_row = int(ends[wanted[0]] - groups[wanted[0]])
        table = pa.concat_tables(_row_groups(fs, path, fingerprint, wanted))
        lo = max(start, first_row) - first_row
        pieces.append(table.slice(lo, min(stop, f_stop) - max(start, first_row)))
    table = pa.concat_tables(pieces, promote_options="default") if pieces else _empty(info)
    return table.append_column(ROW_COL, pa.array(np.arange(start, start + table.num_rows, dtype=np.int64)))


# A part is usually smaller than a row group (4,096 rows against pyarrow's default of 1 Mi rows, or 64 Ki), and the
# parts of one group tend to reach the same actor one after another: each worker keeps the row groups it read last,
# so a group is decoded about once per actor that reads from it instead of once per part (36 us a row otherwise).
_GROUPS: OrderedDict[tuple[str, int], pa.Table] = OrderedDict()
_GROUPS_MAX_BYTES = 256 * 2**20


def _row_groups(fs, path: str, fingerprint: str, wanted: list[int]) -> list[pa.Table]:
    """Row groups ``wanted`` of one file, from this process's cache where present.

    The cache is keyed by the file's fingerprint (path, size, modification time, rows), so a replaced file is read
    anew."""
    missing = [g for g in wanted if (fingerprint, g) not in _GROUPS]
    if missing:
        with fs.open_input_file(path) as f:
            reader = pq.ParquetFile(f)
            for g in missing:
                _GROUPS[(fingerprint, g)] = reader.read_row_group(g)
    out = []
    for g in wanted:
        _GROUPS.move_to_end((fingerprint, g))
        out.append(_GROUPS[(fingerprint, g)])
    while len(_GROUPS) > len(wanted) and sum(t.nbytes for t in _GROUPS.values()) > _GROUPS_MAX_BYTES:
        _GROUPS.popitem(last=False)
    return out


def _empty(info: IndexInfo) -> pa.Table:
    fs = resolve_filesystem(info.uri)[0]
    return pads.dataset(list(info.files), filesystem=fs, format="parquet").schema.empty_table()


def _file_value_errors(info: IndexInfo, files: list[int]) -> str | None:
    """A worker's share of the value checks: the first problem among ``files``, or None."""
    fs = resolve_filesystem(info.uri)[0]
    for i in files:
        with fs.open_input_file(info.files[i]) as f:
            labels = pq.ParquetFile(f).read(columns=[LABEL_COL])
        try:
            check_index_values(labels, f"{info.uri} ({info.files[i]})")
        except UserError as e:
            return str(e)
    return None


def index_value_errors(info: IndexInfo, files_per_task: int = 16) -> str | None:
    """The first problem found in the values of ``label`` (0 or 1, no nulls), or None.

    The check runs on the workers, reading that column only, where Ray runs (local or cluster); each task returns at
    most one line."""
    if LABEL_COL not in info.columns or not info.files:
        return None
    errors = [e for e in map_in_tasks(_file_value_errors, list(range(len(info.files))), files_per_task, info) if e]
    return errors[0] if errors else None


def check_values(info: IndexInfo) -> None:
    """``index_value_errors`` as a ``UserError`` (the jobs: exit 2 naming the problem, before any output)."""
    error = index_value_errors(info)
    if error:
        raise UserError(error)


def map_in_tasks(fn, items: list, per_task: int, first, *args) -> list:
    """Map ``fn(first, chunk, *args)`` over chunks of ``per_task`` items as Ray tasks; the results in chunk order.

    The tasks take 0.5 CPU each on the workers; ``first`` (an index description, an output URI) is put in the object
    store once."""
    import ray

    task = ray.remote(num_cpus=0.5)(fn)
    ref = ray.put(first)
    return ray.get([task.remote(ref, items[i:i + per_task], *args) for i in range(0, len(items), per_task)])


def _file_training_band(info: IndexInfo, files: list[int], seed: int, slots: int, lo: float,
                        hi: float) -> tuple[str | None, int, pa.Table | None]:
    """A worker's share of ``training_band``: (first value problem or None, training rows, band rows)."""
    fs = resolve_filesystem(info.uri)[0]
    starts = [s for s, _ in info.file_ranges()]
    columns = [c for c in (PATH_COL, LABEL_COL, SPLIT_COL) if c in info.columns]
    n_train, pieces = 0, []
    for i in files:
        with fs.open_input_file(info.files[i]) as f:
            table = pq.ParquetFile(f).read(columns=columns)
        try:
            check_index_values(table, f"{info.uri} ({info.files[i]})")
        except UserError as e:
            return str(e), 0, None
        table = table.append_column(ROW_COL, pa.array(np.arange(starts[i], starts[i] + table.num_rows,
                                                                dtype=np.int64)))
        train = training_rows(table)
        n_train += train.num_rows
        rows = train.column(ROW_COL).to_numpy()
        lower = lower_keys(rows, seed, slots)
        use = np.flatnonzero((lower >= lo) & (lower < hi))
        pieces.append(pa.table({ROW_COL: rows[use], "lower": lower[use],
                                PATH_COL: train.column(PATH_COL).take(pa.array(use)).cast(pa.string())}))
    return None, n_train, pa.concat_tables(pieces) if pieces else None


def training_band(info: IndexInfo, seed: int, slots: int, lo: float, hi: float,
                  files_per_task: int = 16) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """The normal training rows whose lower bank key lies in [lo, hi), found on the workers.

    Returns (training rows in the index, their rows, lower keys and paths in the band); the rows are
    ``training_rows``, the keys ``bank.lower_keys``.

    Each task reads the ``path``, ``label`` and ``split`` columns of a group of files and returns only its band, so the
    driver holds the band (about K rows for the bank's passes), never the index. The values of ``label`` are checked on
    the way.

    Raises:
        UserError: a label value other than 0 or 1, or a null label (the first such problem found).
    """
    results = map_in_tasks(_file_training_band, list(range(len(info.files))), files_per_task, info, seed, slots, lo, hi)
    errors = [e for e, _, _ in results if e]
    if errors:
        raise UserError(errors[0])
    tables = [t for _, _, t in results if t is not None and t.num_rows]
    n_train = sum(n for _, n, _ in results)
    if not tables:
        return n_train, np.empty(0, dtype=np.int64), np.empty(0), np.empty(0, dtype=object)
    band = pa.concat_tables(tables)
    return (n_train, band.column(ROW_COL).to_numpy(), band.column("lower").to_numpy(),
            np.asarray(band.column(PATH_COL).to_pylist(), dtype=object))


def _file_split_rows(info: IndexInfo, files: list[int], split: str, out: str) -> int:
    """A worker's share of ``write_split``: the rows of ``split`` in ``files``, one parquet file each where any."""
    fs = resolve_filesystem(info.uri)[0]
    ofs, opath = resolve_filesystem(out)
    n = 0
    for i in files:
        with fs.open_input_file(info.files[i]) as f:
            reader = pq.ParquetFile(f)
            if not pc.any(pc.equal(reader.read(columns=[SPLIT_COL]).column(SPLIT_COL), split)).as_py():
                continue  # the split column alone shows the file holds none: the rest is never read
            table = reader.read()
        table = table.filter(pc.equal(table.column(SPLIT_COL), split))
        if table.num_rows:
            with ofs.open_output_stream(f"{opath}/part-{i:06d}.parquet") as f:
                pq.write_table(table, f)
            n += table.num_rows
    return n


def write_split(info: IndexInfo, split: str, out: str, files_per_task: int = 16) -> int:
    """Write the rows of ``info`` whose ``split`` is ``split`` as a new index at ``out``; return their number.

    The new index is a directory of parquet files, in the index's order, written on the workers; 0, and nothing written,
    without a ``split`` column. Files of an earlier run at ``out`` are replaced."""
    if SPLIT_COL not in info.columns or not info.files:
        return 0
    fs, path = resolve_filesystem(out)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir_contents(path)
    fs.create_dir(path, recursive=True)
    return sum(map_in_tasks(_file_split_rows, list(range(len(info.files))), files_per_task, info, split, out))
