"""Ingest at scale: an index of every image below local folders or object-store prefixes, listed in Ray tasks.

Files are chosen by their extension (nothing is decoded). No labels by default: the index holds ``path`` alone, what
scoring needs. Labels and splits can come from a rule on folder names (``parse_rule``): a row's label is the value of
the deepest folder below the listed one whose name the rule gives (``defect_type`` is that name), its split likewise;
an image below no such folder is skipped with that reason. Columns: ``path``, then with a label rule ``label``, with
a split rule ``split``, with a label rule ``defect_type``.

Sharing out. Each root is listed one level at a time (a non-recursive listing, on object storage a request with
``delimiter="/"``), in tasks, level after level, until there are at least as many folders as tasks or ``MAX_DEPTH``
levels are listed; then groups of consecutive folders are listed recursively, each group by one task that also
classifies its entries and writes its rows. The files directly in a folder listed level by level come from that
listing, through the object store, not the driver. A flat prefix (millions of keys directly under it) is therefore
listed by one task: S3 lists a prefix sequentially (1,000 keys a request, each request naming the last key), and
pyarrow's selector has no start key, so key ranges would need a second S3 client and a guess at how the keys are
distributed; the task that lists it runs beside the others and the driver never holds its keys. The driver holds
the folder names of the levels listed one at a time and the counts, nothing that grows with the files.

Order. Every path below a folder starts with ``folder/``, so a folder's subtree is one contiguous range of the sorted
paths, and so is each run of a folder's direct files between two of its sub-folders. Sorted by their first path (a
folder's by ``folder/``), these pieces give the paths in order; group ``G`` writes its rows as
``part-GGGGGG-FFFFFF.parquet`` (``F`` counts its files of at most ``rows_per_file`` rows), so the files sorted by name
hold the rows sorted by path, whatever the number of tasks (``index.describe_index`` reads a directory's files in
name order).

Skipped entries are counted by reason and listed in ``_skipped-GGGGGG.tsv`` (path, reason; parquet readers ignore
names starting with ``_``): other files, empty files, broken symbolic links, links to folders (not followed, so no
loop is walked), other entries that are not regular files, and folders that could not be listed (permission denied,
or another error that is not transient). Transient storage errors are retried; when they persist the job fails rather
than leave a folder out. Every entry found is indexed or skipped: ``found == rows + skipped``.
"""

from __future__ import annotations

import bisect
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rayanom.columns import DEFECT_COL, LABEL_COL, PATH_COL, SPLIT_COL
from rayanom.config import UserError, raise_invalid
from rayanom.folders import IMAGE_EXTENSIONS, NOT_IMAGE
from rayanom.storage import ReadPolicy, RetriesExhausted, check_output_dir, resolve_filesystem, with_retries

logger = logging.getLogger(__name__)

ROWS_PER_FILE = 100_000
MAX_DEPTH = 4  # levels listed one at a time at most, before the recursive listings
SPLITS = ("train", "val", "test")
_TALLIED = (SPLIT_COL, DEFECT_COL)  # the columns whose values the summary counts
OURS = re.compile(r"part-\d{6}-\d{6}\.parquet|_skipped-\d{6}\.tsv")

EMPTY = "empty file (0 bytes)"
BROKEN_LINK = "unreadable: broken symbolic link"
FOLDER_LINK = "link to a folder (not followed)"
SPECIAL = "not a regular file"
DENIED = "unreadable folder: permission denied"
UNLISTABLE = "unreadable folder: listing failed"
NO_LABEL = "below no folder named in the label rule"
NO_SPLIT = "below no folder named in the split rule"


@dataclass(frozen=True)
class Listing:
    """What to list and where to write it, checked on the driver before Ray starts (``plan_listing``)."""

    roots: tuple[str, ...]  # absolute local paths or URIs, no trailing '/', none inside another
    out: str  # the index: a directory of parquet files
    labels: tuple[tuple[str, int], ...] = ()  # (folder name, label)
    splits: tuple[tuple[str, str], ...] = ()  # (folder name, split)
    rows_per_file: int = ROWS_PER_FILE
    tasks: int | None = None  # listing tasks; None: two per CPU of the cluster, at least 4


def parse_rule(text: str | None, name: str, values: dict) -> tuple[tuple[str, object], ...]:
    """Parse ``NAME=VALUE,NAME=VALUE`` into (folder name, what it gives) pairs; () for None.

    ``values`` maps each allowed spelling to what it gives. Refused, naming ``name`` (the rule's keyword): an empty or
    repeated NAME, a NAME with '/', a value not allowed."""
    if text is None:
        return ()
    pairs: dict[str, object] = {}
    for item in text.split(","):
        folder, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not folder or "/" in folder or folder in pairs or value not in values:
            raise_invalid(name, text, f"NAME={'|'.join(values)} pairs, comma-separated, each NAME a folder name given "
                                      f"once ({item.strip()!r} is not)")
        pairs[folder] = values[value]
    return tuple(pairs.items())


def _root(uri: str) -> str:
    """A root as rows name it: a local folder's absolute path, a URI without its trailing '/'."""
    return uri.rstrip("/") if "://" in uri else os.path.abspath(uri)


def plan_listing(roots: list[str], out: str, label_rule: str | None = None, split_rule: str | None = None,
                 rows_per_file: int = ROWS_PER_FILE, tasks: int | None = None) -> Listing:
    """The listing of ``roots`` into the index ``out``, every value checked before any task runs.

    The checks cost one storage request per root and one for ``out``.

    Raises:
        UserError: a bad rule, ``rows_per_file`` or ``tasks`` below 1, a root that is no folder or lies in another,
            ``out`` inside a root or holding files other than an index's.
    """
    labels = parse_rule(label_rule, "label_rule", {"0": 0, "1": 1})
    splits = parse_rule(split_rule, "split_rule", {s: s for s in SPLITS})
    if rows_per_file < 1:
        raise_invalid("rows_per_file", rows_per_file, "a number of rows >= 1")
    if tasks is not None and tasks < 1:
        raise_invalid("tasks", tasks, "a number of tasks >= 1")
    named = sorted({_root(r) for r in roots})
    for a in named:
        for b in named:
            if b.startswith(a + "/"):
                raise_invalid("roots", b, f"folders that do not lie in one another (it is in {a!r})")
    for root in named:
        fs, path = resolve_filesystem(root)
        try:
            found = fs.get_file_info(path).type
        except OSError as e:  # no credentials, access denied, no such bucket: the user's to fix
            raise UserError(f"invalid roots={root!r}: cannot be read ({' '.join(str(e).split())})") from e
        if found != pafs.FileType.Directory:
            raise_invalid("roots", root, "a folder or prefix that exists")
    out = _root(out)
    inside = [r for r in named if out.startswith(r + "/") or out == r]
    if inside:
        raise_invalid("out", out, f"a directory outside the listed folders (it is in {inside[0]!r})")
    check_output_dir(out, lambda name: bool(OURS.fullmatch(name)), overwrite=True)
    return Listing(tuple(named), out, labels, splits, rows_per_file, tasks)


def _path(root: str, rel: str) -> str:
    return f"{root}/{rel}" if rel else root


def _local_kind(entry: os.DirEntry) -> tuple[str, int]:
    """("dir", 0), ("file", size) or (the reason it is skipped, 0): links to files are followed, to folders not."""
    try:
        if entry.is_dir(follow_symlinks=False):
            return "dir", 0
        if entry.is_file():
            return "file", entry.stat().st_size
        if entry.is_symlink():
            return (FOLDER_LINK if entry.is_dir() else BROKEN_LINK), 0
    except OSError:
        return BROKEN_LINK if entry.is_symlink() else SPECIAL, 0
    return SPECIAL, 0


def _scan_local(base: str, rel: str, recursive: bool) -> tuple[list, list, list]:
    """``list_folder`` on a local folder with ``os.scandir`` (pyarrow's local listing leaves broken links out)."""
    files, dirs, bad = [], [], []
    stack = [rel]
    while stack:
        here = stack.pop()
        try:
            with os.scandir(_path(base, here)) as it:
                entries = list(it)
        except OSError as e:
            logger.warning("cannot list %s: %s", _path(base, here), e)
            bad.append((here, DENIED if isinstance(e, PermissionError) else UNLISTABLE))
            continue
        for entry in entries:
            name = f"{here}/{entry.name}" if here else entry.name
            kind, size = _local_kind(entry)
            if kind == "dir":
                (stack if recursive else dirs).append(name)
            elif kind == "file":
                files.append((name, size))
            else:
                bad.append((name, kind))
    return files, dirs, bad


def _list_remote(fs: pafs.FileSystem, base: str, rel: str, recursive: bool) -> tuple[list, list, list]:
    """``list_folder`` on object storage (or any pyarrow filesystem), transient errors retried (``ReadPolicy``)."""
    path = _path(base, rel)
    try:
        infos = with_retries(lambda: fs.get_file_info(pafs.FileSelector(path, recursive=recursive)), ReadPolicy())
    except RetriesExhausted:
        raise
    except OSError as e:
        logger.warning("cannot list %s: %s", path, e)
        denied = isinstance(e, PermissionError) or re.search(r"ACCESS_DENIED|AccessDenied|\b403\b", str(e))
        return [], [], [(rel, DENIED if denied else UNLISTABLE)]
    files, dirs, bad = [], [], []
    for info in infos:
        name = info.path[len(base) + 1:]
        if info.type == pafs.FileType.File:
            files.append((name, info.size))
        elif info.type == pafs.FileType.Directory:
            if not recursive:
                dirs.append(name)
        else:
            bad.append((name, SPECIAL))
    return files, dirs, bad


def list_folder(root: str, rel: str, recursive: bool) -> tuple[list, list, list]:
    """The folder ``rel`` below ``root``: files as (path, size), sub-folders, and entries to skip as (path, reason).

    Paths are relative throughout. Sub-folders are returned when not ``recursive``; with ``recursive``, the files are
    everything below it."""
    fs, base = resolve_filesystem(root)
    if isinstance(fs, pafs.LocalFileSystem):
        return _scan_local(base, rel, recursive)
    return _list_remote(fs, base, rel, recursive)


def _entries(files: list, bad: list) -> pa.Table:
    """Files and skipped entries as one table sorted by path: ``rel``, ``size``, ``reason`` (null for a file)."""
    rows = sorted([(r, s, None) for r, s in files] + [(r, 0, why) for r, why in bad], key=lambda row: row[0])
    return pa.table({"rel": pa.array([r[0] for r in rows], pa.string()),
                     "size": pa.array([r[1] for r in rows], pa.int64()),
                     "reason": pa.array([r[2] for r in rows], pa.string())})


def _list_level(root: str, rel: str) -> tuple[tuple[list[str], list[tuple[str, int, int]]], pa.Table]:
    """A task that lists one folder's direct entries.

    Returns (its sub-folders, the runs of its entries between them as (first path, start, stop)), and the entries
    (``_entries``) for the tasks that write them."""
    files, dirs, bad = list_folder(root, rel, recursive=False)
    entries = _entries(files, bad)
    rels = entries.column("rel").to_pylist()
    cuts = sorted({0, len(rels), *(bisect.bisect_left(rels, d + "/") for d in dirs)})
    return (sorted(dirs), [(rels[a], a, b) for a, b in zip(cuts, cuts[1:]) if b > a]), entries


def _pieces(roots: tuple[str, ...], tasks: int) -> tuple[list[tuple], int]:
    """The listing shared out in path order, and the number of folders listed one level at a time for it.

    A piece is ("tree", root, folder), everything below a folder, or ("run", root, entries, start, stop), a run of a
    folder's direct entries already listed (``entries``: an object reference)."""
    import ray

    level = ray.remote(num_cpus=0.5)(_list_level).options(num_returns=2)
    pieces = [(root + "/", ("tree", root, "")) for root in roots]  # (first path, piece)
    levels = 0
    for _ in range(MAX_DEPTH):
        trees = [p for _, p in pieces if p[0] == "tree"]
        if not trees or len(trees) >= tasks:
            break
        pieces = [(k, p) for k, p in pieces if p[0] != "tree"]
        calls = [(root, level.remote(root, rel)) for _, root, rel in trees]
        levels += len(calls)
        for root, (meta, entries) in calls:
            dirs, runs = ray.get(meta)
            pieces += [(_path(root, d) + "/", ("tree", root, d)) for d in dirs]
            pieces += [(_path(root, first), ("run", root, entries, a, b)) for first, a, b in runs]
    return [p for _, p in sorted(pieces, key=lambda kp: kp[0])], levels


def _piece_entries(piece: tuple) -> pa.Table:
    import ray

    if piece[0] == "tree":
        files, _, bad = list_folder(piece[1], piece[2], recursive=True)
        return _entries(files, bad)
    _, _, ref, start, stop = piece
    return ray.get(ref).slice(start, stop - start)


def _lookup(rel: str, rule: dict) -> tuple[str, object] | None:
    """(name, value) of the deepest folder of ``rel`` that ``rule`` names, or None."""
    for name in reversed(rel.split("/")[:-1]):
        if name in rule:
            return name, rule[name]
    return None


def _classify(rel: str, size: int, reason: str | None, labels: dict, splits: dict) -> tuple[dict | None, str | None]:
    """(the row's values other than its path, None), or (None, why the entry is skipped).

    ``labels`` and ``splits`` are the rules (folder name: value), empty where none."""
    if reason is not None:
        return None, reason
    if not rel.lower().endswith(IMAGE_EXTENSIONS):
        return None, NOT_IMAGE
    if size == 0:
        return None, EMPTY
    values: dict = {}
    if labels:
        hit = _lookup(rel, labels)
        if hit is None:
            return None, NO_LABEL
        values[DEFECT_COL], values[LABEL_COL] = hit
    if splits:
        hit = _lookup(rel, splits)
        if hit is None:
            return None, NO_SPLIT
        values[SPLIT_COL] = hit[1]
    return values, None


def _table(listing: Listing, paths: list[str], values: list[dict]) -> pa.Table:
    columns = {PATH_COL: pa.array(paths, pa.string())}
    if listing.labels:
        columns[LABEL_COL] = pa.array([v[LABEL_COL] for v in values], pa.int64())
    if listing.splits:
        columns[SPLIT_COL] = pa.array([v[SPLIT_COL] for v in values], pa.string())
    if listing.labels:
        columns[DEFECT_COL] = pa.array([v[DEFECT_COL] for v in values], pa.string())
    return pa.table(columns)


def _write_group(listing: Listing, group: int, pieces: list[tuple]) -> dict:
    """A task that classifies the entries of ``pieces`` and writes them in order; returns the counts.

    Pieces that are folders are listed here; the rows go to ``part-GGGGGG-FFFFFF.parquet`` and the skipped entries to
    ``_skipped-GGGGGG.tsv``."""
    paths, values, skipped = [], [], []
    found, rules = 0, (dict(listing.labels), dict(listing.splits))
    for piece in pieces:
        entries = _piece_entries(piece)
        found += entries.num_rows
        for rel, size, reason in zip(*(entries.column(c).to_pylist() for c in ("rel", "size", "reason"))):
            row, why = _classify(rel, size, reason, *rules)
            if row is None:
                skipped.append((_path(piece[1], rel), why))
            else:
                paths.append(_path(piece[1], rel))
                values.append(row)
    table = _table(listing, paths, values)
    fs, out = resolve_filesystem(listing.out)
    starts = range(0, table.num_rows, listing.rows_per_file)
    for k, start in enumerate(starts):
        with fs.open_output_stream(f"{out}/part-{group:06d}-{k:06d}.parquet") as f:
            pq.write_table(table.slice(start, listing.rows_per_file), f)
    if skipped:
        with fs.open_output_stream(f"{out}/_skipped-{group:06d}.tsv") as f:
            f.write("".join(f"{p}\t{why}\n" for p, why in skipped).encode())
    return {"found": found, "rows": table.num_rows, "files": len(starts), "skipped": Counter(w for _, w in skipped),
            **{c: Counter(table.column(c).to_pylist() if c in table.column_names else []) for c in _TALLIED}}


def _clear(out: str) -> None:
    """The index directory, created, without the files of an earlier listing (``plan_listing`` refused others)."""
    fs, path = resolve_filesystem(out)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        old = [i.path for i in fs.get_file_info(pafs.FileSelector(path)) if OURS.fullmatch(i.base_name)]
        if old:
            logger.info("index %s: %d files of an earlier listing replaced", out, len(old))
        for p in old:
            fs.delete_file(p)
    fs.create_dir(path, recursive=True)


def write_listing(listing: Listing) -> dict:
    """List ``listing``'s roots in Ray tasks and write the index; return the summary.

    Ray is started by the caller. The summary: entries found, rows (images indexed), parquet files, skipped entries in
    all and per reason, the tasks that listed one level and those that listed below it (and wrote the rows), rows per
    split and per defect type where the rules give them.

    Raises:
        UserError: no image found (the skipped entries are listed all the same).
    """
    import ray

    tasks = listing.tasks or max(4, 2 * int(ray.cluster_resources().get("CPU", 1)))
    _clear(listing.out)
    pieces, levels = _pieces(listing.roots, tasks)
    per = max(1, -(-len(pieces) // tasks))
    write = ray.remote(num_cpus=0.5)(_write_group)
    results = ray.get([write.remote(listing, g, pieces[i:i + per]) for g, i in enumerate(range(0, len(pieces), per))])
    skipped = sum((r["skipped"] for r in results), Counter())
    summary = {"found": sum(r["found"] for r in results), "rows": sum(r["rows"] for r in results),
               "files": sum(r["files"] for r in results), "skipped": sum(skipped.values()),
               "skipped_by_reason": dict(sorted(skipped.items())), "level_tasks": levels,
               "tree_tasks": len(results),
               **{f"by_{c}": dict(sorted(sum((r[c] for r in results), Counter()).items())) for c in _TALLIED}}
    logger.info("index %s: %d rows in %d files from %d entries, %d skipped %s", listing.out, summary["rows"],
                summary["files"], summary["found"], summary["skipped"], summary["skipped_by_reason"])
    if not summary["rows"]:
        msg = (f"no image found below {list(listing.roots)} ({summary['skipped']} entries skipped, listed in "
               f"{listing.out}/_skipped-*.tsv)")
        raise UserError(msg)
    return summary
