"""Ingest: a parquet index from an image folder tree, MVTec AD's layout or anomalib's Folder layout.

Files are chosen by their extension (nothing is decoded) and listed through pyarrow's filesystems, so a tree on
object storage works as a local one. Every file that does not become a row is kept with the reason, never dropped
silently: other files, masks without an image, images without a mask in a folder whose other images have masks.

Columns: ``path``, ``label`` (0 normal, 1 anomalous), ``split`` (``train``, ``val``, ``test``), ``defect_type``
(``good`` for normal images; the folder below ``test``, nested folders joined with ``/``) and ``mask_path`` (null
where none). Rows are sorted by split (train, val, test) and then path: the order, and so each row's ``row_index``,
depends only on the files. ``val`` rows are carved from the test rows: in each defect type the share
``val_fraction`` (``VAL_FRACTION`` by default; rounded half to even, Python's ``round``) of its images with the
smallest seeded hash of their path below the layout's folder, so the choice depends neither on where the dataset
lives nor on the order of listing, and the defect types keep their proportions. ``val_fraction=0`` keeps every test
image for testing (no threshold is chosen then).

Any folder tree without a layout (every image below folders or prefixes, in Ray tasks): ``rayanom.listing``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rayanom.config import UserError
from rayanom.storage import resolve_filesystem

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
NOT_IMAGE = "not an image file (extension)"
# Half of each defect type's test images choose the threshold by default, so a labelled layout ends with decisions;
# the other half is what the report measures.
VAL_FRACTION = 0.5
SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


@dataclass
class FolderIndex:
    rows: list[dict]  # path, label, split, defect_type, mask_path (and key: the path below its folder)
    skipped: list[tuple[str, str]]  # (path, reason)

    def table(self) -> pa.Table:
        rows = sorted(self.rows, key=lambda r: (SPLIT_ORDER[r["split"]], r["path"]))
        return pa.table({
            "path": pa.array([r["path"] for r in rows], pa.string()),
            "label": pa.array([r["label"] for r in rows], pa.int64()),
            "split": pa.array([r["split"] for r in rows], pa.string()),
            "defect_type": pa.array([r["defect_type"] for r in rows], pa.string()),
            "mask_path": pa.array([r["mask_path"] for r in rows], pa.string()),
        })

    def summary(self) -> dict:
        return {"rows": len(self.rows),
                "by_split": dict(sorted(Counter(r["split"] for r in self.rows).items())),
                "by_defect_type": dict(sorted(Counter(r["defect_type"] for r in self.rows).items())),
                "with_mask": sum(r["mask_path"] is not None for r in self.rows),
                "skipped": len(self.skipped),
                "skipped_by_reason": dict(sorted(Counter(reason for _, reason in self.skipped).items()))}


def _files(uri: str) -> tuple[str, list[str]]:
    """(the folder as rows name it: an absolute path, or the URI; every file below it, relative to it, sorted)."""
    fs, root = resolve_filesystem(uri)
    root = root.rstrip("/") if "://" in uri else os.path.abspath(root)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        msg = f"invalid folder {uri!r}: not a directory"
        raise UserError(msg)
    found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    rel = sorted(i.path[len(root) + 1:] for i in found if i.type == pafs.FileType.File)
    return (uri.split("://", 1)[0] + "://" + root if "://" in uri else root), rel


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _row(path: str, label: int, split: str, defect: str, mask: str | None, key: str) -> dict:
    """An index row, with ``key``: its path below the folder it was listed from.

    The seeded splits hash the key, so they do not depend on where the dataset lives."""
    return {"path": path, "label": label, "split": split, "defect_type": defect, "mask_path": mask, "key": key}


def _seeded(seed: int):
    """The sort key of a seeded choice of rows: the hash of their ``key``."""
    return lambda r: hashlib.sha256(f"{seed}:{r['key']}".encode()).hexdigest()


def _carve_val(rows: list[dict], val_fraction: float, seed: int) -> None:
    """Move ``val_fraction`` of the test rows of each defect type to ``val`` (seeded hash of the path)."""
    if not 0.0 <= val_fraction < 1.0:
        msg = f"invalid val_fraction={val_fraction!r}: expected a number in [0, 1)"
        raise UserError(msg)
    if not val_fraction:
        return
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["split"] == "test":
            groups.setdefault(r["defect_type"], []).append(r)
    for group in groups.values():
        group.sort(key=_seeded(seed))
        for r in group[: round(val_fraction * len(group))]:
            r["split"] = "val"


def mvtec_index(uri: str, val_fraction: float = VAL_FRACTION, seed: int = 0) -> FolderIndex:
    """The index of one MVTec AD category folder.

    It reads ``train/good`` (normal training images), ``test/good`` and ``test/<defect>`` (nested folders allowed), and
    masks ``ground_truth/<defect>/<name>_mask.png``."""
    base, files = _files(uri)
    full = {f: f"{base}/{f}" for f in files}
    masks = {f for f in files if f.startswith("ground_truth/") and _is_image(f)}
    used_masks: set[str] = set()
    rows, skipped = [], []
    masked_dirs = {posixpath.dirname(m)[len("ground_truth/"):] for m in masks}
    for f in files:
        top, _, rest = f.partition("/")
        if top == "ground_truth" and f in masks:
            continue  # matched with its image below
        if not _is_image(f):
            skipped.append((full[f], NOT_IMAGE))
        elif top == "train":
            if posixpath.dirname(rest) == "good":
                rows.append(_row(full[f], 0, "train", "good", None, f))
            else:
                skipped.append((full[f], "training image outside train/good"))
        elif top == "test" and "/" in rest:
            defect = posixpath.dirname(rest)
            if defect == "good":
                rows.append(_row(full[f], 0, "test", "good", None, f))
                continue
            stem = posixpath.splitext(posixpath.basename(rest))[0]
            mask = next((m for m in (f"ground_truth/{defect}/{stem}_mask{ext}" for ext in IMAGE_EXTENSIONS)
                         if m in masks), None)
            if mask is None and defect in masked_dirs:
                skipped.append((full[f], "anomalous image without a mask where its defect type has masks"))
                continue
            if mask is not None:
                used_masks.add(mask)
            rows.append(_row(full[f], 1, "test", defect, full[mask] if mask else None, f))
        else:
            skipped.append((full[f], "outside train/good, test/<type> and ground_truth/<type>"))
    skipped += [(full[m], "mask without an image") for m in sorted(masks - used_masks)]
    _carve_val(rows, val_fraction, seed)
    return FolderIndex(rows, skipped)


def folder_index(normal: str, abnormal: str | None = None, normal_test: str | None = None, mask: str | None = None,
                 normal_test_fraction: float = 0.2, val_fraction: float = VAL_FRACTION,
                 seed: int = 0) -> FolderIndex:
    """The index of anomalib's Folder layout.

    ``normal`` images are for training (without ``normal_test``, the share ``normal_test_fraction`` of them, by seeded
    hash, is held out for testing, as anomalib's Folder does); ``abnormal`` images are test, label 1, ``defect_type``
    the folder below ``abnormal`` or ``abnormal``'s own name; optional ``normal_test`` images, and ``mask`` images named
    like the anomalous images they belong to."""
    rows, skipped = [], []

    def add(uri: str, label: int, split: str, masks: dict[str, str] | None = None) -> None:
        base, files = _files(uri)
        own = posixpath.basename(base)
        for f in files:
            path = f"{base}/{f}"
            if not _is_image(f):
                skipped.append((path, NOT_IMAGE))
                continue
            defect = "good" if not label else (posixpath.dirname(f) or own)
            m = None
            if masks is not None:
                m = masks.pop(f, None)
                if m is None and masks_given:
                    skipped.append((path, "anomalous image without a mask where masks exist"))
                    continue
            rows.append(_row(path, label, split, defect, m, f))

    masks: dict[str, str] = {}
    masks_given = mask is not None
    if mask is not None:
        mbase, mfiles = _files(mask)
        for f in mfiles:
            if _is_image(f):
                masks[f] = f"{mbase}/{f}"
            else:
                skipped.append((f"{mbase}/{f}", NOT_IMAGE))
    add(normal, 0, "train")
    if normal_test is not None:
        add(normal_test, 0, "test")
    else:
        if not 0.0 <= normal_test_fraction < 1.0:
            msg = f"invalid normal_test_fraction={normal_test_fraction!r}: expected a number in [0, 1)"
            raise UserError(msg)
        normal_rows = sorted((r for r in rows if r["split"] == "train"), key=_seeded(seed))
        for r in normal_rows[: round(normal_test_fraction * len(normal_rows))]:
            r["split"] = "test"
    if abnormal is not None:
        add(abnormal, 1, "test", masks)
    skipped += [(m, "mask without an image") for m in sorted(masks.values())]
    _carve_val(rows, val_fraction, seed)
    return FolderIndex(rows, skipped)


def write_index(index: FolderIndex, out: str, eval_out: str | None = None) -> dict:
    """Write the index as parquet at ``out`` and the skipped files beside it; return the summary.

    The summary is what ``jobs/index.py`` prints. The skipped files go to ``<out>.skipped.tsv`` (path, reason); with
    ``eval_out``, the index's ``val`` and ``test`` rows alone are written there too (what to score and evaluate)."""
    if not index.rows:
        msg = f"no image found for the index {out!r} ({len(index.skipped)} files skipped)"
        raise UserError(msg)
    fs, path = resolve_filesystem(out)
    parent = posixpath.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    table = index.table()
    with fs.open_output_stream(path) as f:
        pq.write_table(table, f)
    if eval_out is not None:
        efs, epath = resolve_filesystem(eval_out)
        with efs.open_output_stream(epath) as f:
            pq.write_table(table.filter(pc.is_in(table.column("split"), pa.array(["val", "test"]))), f)
    with fs.open_output_stream(path + ".skipped.tsv") as f:
        f.write("".join(f"{p}\t{reason}\n" for p, reason in index.skipped).encode())
    summary = index.summary()
    logger.info("index %s: %d rows %s, %d files skipped %s", out, summary["rows"], summary["by_split"],
                summary["skipped"], summary["skipped_by_reason"])
    return summary
