"""Input stage: the parquet index (read and validated on the driver) and the CPU decode task (bytes -> float image).

The index needs one column, ``path`` (a local path or a pyarrow-filesystem URI such as ``s3://bucket/a.png``).
Optional: ``label`` (0 normal, 1 anomalous), ``split`` (fit keeps ``"train"`` rows when the column exists), and any
other column, carried unchanged into the scores.
"""

from __future__ import annotations

import io
import logging
import os
import random
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from rayanom.config import UserError

logger = logging.getLogger(__name__)

PATH_COL = "path"
LABEL_COL = "label"
SPLIT_COL = "split"
DEFECT_COL = "defect_type"  # optional index column: the kind of defect (``good`` for normal images)
MASK_COL = "mask_path"  # optional index column: the defect's ground-truth mask (pixel metrics)
ROW_COL = "row_index"  # position of the row in the index; the key of every output row
IMAGE_COL = "image"
ERROR_COL = "error"
SCORE_COL = "anomaly_score"
PROB_COL = "anomaly_probability"
HEIGHT_COL = "image_height"  # original image size, pixels
WIDTH_COL = "image_width"
MAP_COL = "anomaly_map"  # DFM: pooled-resolution map, flattened row-major
MAP_SHAPE_COL = "anomaly_map_shape"
NUM_REGIONS_COL = "num_regions"  # RKDE: regions per image, their boxes (original pixels) and probabilities
BOXES_COL = "boxes"
BOX_SCORES_COL = "box_scores"
DECISION_COL = "is_anomalous"  # anomaly_score >= the model's threshold (rayanom.decisions)
NORMALIZED_COL = "normalized_score"  # anomalib's min-max normalisation around the threshold
RESERVED_COLS = (ROW_COL, IMAGE_COL, ERROR_COL, SCORE_COL, PROB_COL, HEIGHT_COL, WIDTH_COL, MAP_COL, MAP_SHAPE_COL,
                 NUM_REGIONS_COL, BOXES_COL, BOX_SCORES_COL, DECISION_COL, NORMALIZED_COL)

MAX_IMAGE_PIXELS = 89_478_485  # PIL's default bomb limit (0.25 GiB of RGBA); larger images are refused from the header

# ImageNet statistics: the mean and std anomalib's default pre-processor normalises with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


_LOCAL = pafs.LocalFileSystem()  # one for the process: building one per image cost 6 us a row


def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI with a scheme (``s3://``, ``gs://``, ``file://``...)."""
    if "://" not in uri:
        return _LOCAL, uri
    scheme, rest = uri.split("://", 1)
    if scheme in ("s3", "gs", "gcs"):
        # One filesystem per bucket and process: building an S3 filesystem (region lookup) per file is slow.
        return bucket_filesystem(scheme, rest.split("/", 1)[0]), rest
    return pafs.FileSystem.from_uri(uri)


@lru_cache(maxsize=64)
def bucket_filesystem(scheme: str, bucket: str) -> pafs.FileSystem:
    """The process's filesystem for one bucket, made once (``cache_clear()`` forgets them: a new endpoint)."""
    return pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]


def check_output_dir(uri: str, is_ours: Callable[[str], bool], overwrite: bool) -> list[str]:
    """Names of our files already in the directory ``uri`` (local or object store); nothing is created.

    Refuses a file, a directory holding files that are not ours, and one holding ours unless ``overwrite``.
    """
    fs, path = resolve_filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        msg = f"output {uri!r} is a file, expected a directory"
        raise UserError(msg)
    if info.type != pafs.FileType.Directory:
        return []
    existing = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path, recursive=False)))
    foreign = [name for name in existing if not is_ours(name)]
    if foreign:
        msg = f"output {uri!r} holds other files {foreign[:5]}; choose an empty or new directory"
        raise UserError(msg)
    if existing and not overwrite:
        msg = f"output {uri!r} already holds {existing[:5]}; pass --overwrite to replace them"
        raise UserError(msg)
    return existing


def prepare_output_dir(uri: str, is_ours: Callable[[str], bool], overwrite: bool) -> list[str]:
    """:func:`check_output_dir`, then create the directory."""
    existing = check_output_dir(uri, is_ours, overwrite)
    fs, path = resolve_filesystem(uri)
    fs.create_dir(path, recursive=True)
    return existing


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


# Storage errors worth retrying: throttling, server errors, timeouts, dropped connections. Matched in the message of
# an OSError (pyarrow's S3, GCS and HDFS clients report the SDK's error code or HTTP status there) or by type.
TRANSIENT_PATTERN = re.compile(
    r"SLOW_?DOWN|SlowDown|THROTTL|Throttl|TooManyRequests|SERVICE_UNAVAILABLE|ServiceUnavailable|INTERNAL_FAILURE|"
    r"InternalError|REQUEST_TIMEOUT|RequestTimeout|NETWORK_CONNECTION|UNAVAILABLE|DEADLINE_EXCEEDED|"
    r"RESOURCE_EXHAUSTED|Connection reset|connection reset|Broken pipe|timed out|Timeout was reached|"
    r"Couldn't connect|HTTP (?:status|response code)[: ]*(?:429|5\d\d)")
TRANSIENT_TYPES = (TimeoutError, ConnectionError)


@dataclass(frozen=True)
class ReadPolicy:
    """How image files are read. A transient storage error (``is_transient``) is retried up to ``retries`` times per
    request, after a pause drawn uniformly from [0, min(cap, base * 2^attempt)] (full jitter, so throttled workers
    spread out; the draws change timing only, never a result). Files larger than ``max_file_bytes`` are refused from
    their size, before a byte is read."""

    retries: int = 40
    backoff_s: float = 0.05
    backoff_cap_s: float = 5.0
    max_file_bytes: int = 256 * 2**20


class RetriesExhausted(OSError):
    """A transient storage error that persisted through every retry."""


def is_transient(e: BaseException) -> bool:
    """Throttling (429, SlowDown), server errors (5xx), timeouts and dropped connections: worth another try."""
    if isinstance(e, (FileNotFoundError, IsADirectoryError, PermissionError)):
        return False
    return isinstance(e, TRANSIENT_TYPES) or (isinstance(e, OSError) and bool(TRANSIENT_PATTERN.search(str(e))))


def with_retries(request, policy: ReadPolicy):
    """``request()``, tried again after a transient storage error (``is_transient``) as ``policy`` says.

    Raises:
        RetriesExhausted: the error was still there after ``policy.retries`` retries.
    """
    for attempt in range(policy.retries + 1):
        try:
            return request()
        except Exception as e:
            if not is_transient(e):
                raise
            if attempt == policy.retries:
                msg = f"transient storage error persisted through {policy.retries} retries: {error_message(e)}"
                raise RetriesExhausted(msg) from e
            time.sleep(_JITTER.uniform(0.0, min(policy.backoff_cap_s, policy.backoff_s * 2**attempt)))
    raise AssertionError  # unreachable


_JITTER = random.Random()


def read_weights_file(path: str, field: str = "weights") -> tuple[bytes, str]:
    """A weights file's bytes and sha256; a UserError naming its flag (``field``) where it cannot be read."""
    import hashlib

    try:
        data = read_bytes(path)
    except (OSError, ValueError) as e:
        msg = f"invalid {field}={path!r}: {e}"
        raise UserError(msg) from e
    return data, hashlib.sha256(data).hexdigest()


def same_file(got: dict, recorded: dict, flag: str) -> None:
    """The weights file read (``got``: path and sha256) is the one the model recorded, else an error naming it."""
    if got["sha256"] != recorded["sha256"]:
        msg = (f"invalid {flag}={got['path']!r}: sha256 {got['sha256'][:12]}... differs from the file the model was "
               f"fitted with ({recorded['sha256'][:12]}...)")
        raise UserError(msg)


def read_bytes(path: str, policy: ReadPolicy = ReadPolicy()) -> bytes:
    """All bytes of a local file or URI, in two requests on object stores (open: HEAD, then read: GET), each retried
    on transient errors (``ReadPolicy``). A missing file, a directory or a file above ``max_file_bytes`` is an
    error that says so."""
    if path is None or not str(path).strip():
        msg = "empty path"
        raise ValueError(msg)
    if "://" not in str(path):
        return _read_local(str(path), policy)
    fs, p = resolve_filesystem(str(path))
    try:
        f = with_retries(lambda: fs.open_input_file(p), policy)
    except FileNotFoundError as e:
        msg = f"missing file {path}"
        raise FileNotFoundError(msg) from e
    except RetriesExhausted:
        raise
    except OSError as e:  # a directory, or another permanent error: one more request names which
        kind = with_retries(lambda: fs.get_file_info(p), policy).type
        if kind == pafs.FileType.NotFound:
            msg = f"missing file {path}"
            raise FileNotFoundError(msg) from e
        if kind == pafs.FileType.Directory:
            msg = f"{path} is a directory, expected an image file"
            raise IsADirectoryError(msg) from e
        raise
    with f:
        size = f.size()
        if size > policy.max_file_bytes:
            msg = f"file too large: {size} bytes (--max-file-bytes {policy.max_file_bytes})"
            raise ValueError(msg)
        return with_retries(lambda: _read_all(f), policy)


def _read_local(path: str, policy: ReadPolicy) -> bytes:
    """:func:`read_bytes` of a local path with Python's own file objects (a missing file costs a third of pyarrow's)."""
    try:
        f = with_retries(lambda: open(path, "rb"), policy)  # noqa: SIM115 - closed below
    except FileNotFoundError as e:
        msg = f"missing file {path}"
        raise FileNotFoundError(msg) from e
    except IsADirectoryError as e:
        msg = f"{path} is a directory, expected an image file"
        raise IsADirectoryError(msg) from e
    with f:
        size = os.fstat(f.fileno()).st_size
        if size > policy.max_file_bytes:
            msg = f"file too large: {size} bytes (--max-file-bytes {policy.max_file_bytes})"
            raise ValueError(msg)
        return with_retries(lambda: _read_all(f), policy)


def _read_all(f) -> bytes:
    f.seek(0)
    return f.read()


def decode_image(data: bytes, image_size: tuple[int, int]) -> np.ndarray:
    """Decode to RGB float in [0, 1] and resize to ``image_size`` (h, w), shape (3, h, w), float32.

    The resize is bilinear with antialiasing on float data, as anomalib v2 (torch ``interpolate(antialias=True)``);
    PIL's float-mode resize computes the same filter (agreement within 3e-6, pinned by a test).
    """
    return decode_image_sized(data, image_size)[0]


def decode_image_sized(data: bytes, image_size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`decode_image` and the original (height, width).

    Modes: anything PIL converts to RGB (grey, palette, RGBA, CMYK, ...) as anomalib (``convert("RGB")``; alpha is
    dropped); 16-bit grey is scaled by 1/65535 (anomalib's conversion clips it to white); float images are refused.
    The first frame of an animation is used. EXIF orientation is not applied, as anomalib: pixels as stored.
    Images over ``MAX_IMAGE_PIXELS`` are refused from the header, before any pixel is decoded.
    """
    if not data:
        msg = "empty file (0 bytes)"
        raise ValueError(msg)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            msg = f"image too large: {e}"
            raise ValueError(msg) from e
        except Image.UnidentifiedImageError as e:
            msg = "not an image (no known image format in the file)"
            raise ValueError(msg) from e
    with im:
        w, h = im.size
        if w * h > MAX_IMAGE_PIXELS:
            msg = f"image too large: {w}x{h} pixels (limit {MAX_IMAGE_PIXELS})"
            raise ValueError(msg)
        try:
            planes = _planes_float(im)
        except OSError as e:
            if "truncated" in str(e) or "broken" in str(e).lower():
                msg = f"truncated or corrupt image data ({e})"
                raise ValueError(msg) from e
            raise
    out_h, out_w = image_size
    resized = [np.asarray(Image.fromarray(p, mode="F").resize((out_w, out_h), Image.BILINEAR)) for p in planes]
    return np.stack(resized * 3 if len(resized) == 1 else resized), (h, w)


def _planes_float(im: Image.Image) -> np.ndarray:
    """Contiguous float32 planes in [0, 1]: (3, h, w) RGB, or (1, h, w) for 16-bit grey (its three channels are
    equal, so it is resized once)."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return np.clip(np.asarray(im, dtype=np.float32) / np.float32(65535.0), 0.0, 1.0)[None]
    if im.mode == "F":
        msg = "unsupported mode F (floating-point pixels): convert to 8- or 16-bit first"
        raise ValueError(msg)
    planes = np.ascontiguousarray(np.asarray(im.convert("RGB")).transpose(2, 0, 1), dtype=np.float32)
    planes /= np.float32(255.0)
    return planes


def error_message(e: BaseException) -> str:
    """A one-line reason for a failed row: the exception type and its message, whitespace collapsed."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[:500]


def ipc_bytes(table: pa.Table) -> bytes:
    """A table as Arrow IPC stream bytes (what a part's input fingerprint hashes, what crosses between the stages)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


@dataclass(frozen=True)
class Decoded:
    """A decoded batch: the input rows with ``image_height``, ``image_width`` and ``error``, and the images of the rows
    that decoded, (m, 3, h, w) in row order (a failed row has no image: nothing to allocate or ship): float32 RGB in
    [0, 1], or for bf16 runs normalised bfloat16 as uint16 bits (:func:`bf16_bits`)."""

    table: pa.Table
    images: np.ndarray

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    @property
    def ok(self) -> np.ndarray:
        """Which rows decoded (no ``error``)."""
        return self.table.column(ERROR_COL).is_null().to_numpy(zero_copy_only=False)

    def column(self, name: str):
        return self.table.column(name)

    def slice(self, start: int, n: int | None = None) -> Decoded:
        ok = self.ok
        stop = len(ok) if n is None else start + n
        first = int(ok[:start].sum())
        return Decoded(self.table.slice(start, stop - start), self.images[first:first + int(ok[start:stop].sum())])

    def images_where(self, rows: np.ndarray) -> np.ndarray:
        """The images of the rows selected by the mask ``rows`` (decoded rows only)."""
        return self.images[rows[self.ok]]

    def failed(self, message: str) -> Decoded:
        """Every row failed with ``message`` (a model stage then computes nothing for them)."""
        i = self.table.schema.get_field_index(ERROR_COL)
        table = self.table.set_column(i, ERROR_COL, pa.array([message] * self.num_rows, pa.string()))
        return Decoded(table, self.images[:0])

    @staticmethod
    def concat(parts: list[Decoded]) -> Decoded:
        return Decoded(pa.concat_tables([d.table for d in parts]), np.concatenate([d.images for d in parts]))


def bf16_bits(images: np.ndarray) -> np.ndarray:
    """Images (m, 3, h, w) float32 in [0, 1], normalised with the ImageNet mean and std as the feature stage does, then
    rounded to bfloat16 (to nearest, ties to even, as torch) as uint16 bits: half the bytes of float32, and the very
    values a bf16 run's first convolution gets (autocast rounds its input the same way)."""
    mean = np.asarray(IMAGENET_MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(IMAGENET_STD, np.float32).reshape(1, 3, 1, 1)
    bits = ((np.asarray(images, np.float32) - mean) / std).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def decode_table(table: pa.Table, image_size: tuple[int, int], policy: ReadPolicy = ReadPolicy()) -> Decoded:
    """The decode stage on an arrow table: every input column unchanged, plus the original ``image_height``/
    ``image_width`` and ``error`` (string), and the images of the rows that decoded."""
    images, sizes, errors = _decode_paths(table.column(PATH_COL).to_pylist(), image_size, policy)
    return Decoded(_with_decode_columns(table, sizes, errors), images)


def failed_table(table: pa.Table, image_size: tuple[int, int], message: str) -> Decoded:
    """What ``decode_table`` gives for rows that failed with ``message``, without reading them."""
    n = table.num_rows
    return Decoded(_with_decode_columns(table, np.zeros((n, 2), np.int32), [message] * n),
                   np.zeros((0, 3, *image_size), np.float32))


def _with_decode_columns(table: pa.Table, sizes: np.ndarray, errors) -> pa.Table:
    return (table.append_column(HEIGHT_COL, pa.array(sizes[:, 0]))
            .append_column(WIDTH_COL, pa.array(sizes[:, 1]))
            .append_column(ERROR_COL, pa.array(errors, pa.string())))


def _decode_paths(paths: list, image_size: tuple[int, int], policy: ReadPolicy):
    """Read and decode every path: the images that decoded (m, 3, h, w) float32, the original sizes (n, 2; 0 where a
    row failed) and each row's error (None when decoded). A failure is its row's error, never an exception."""
    images, sizes = [], np.zeros((len(paths), 2), dtype=np.int32)
    errors = [None] * len(paths)
    crash_on = os.environ.get("RAYANOM_FAILPOINT_EXIT_ON_PATH")  # tests: a file whose reading kills the worker
    for i, p in enumerate(paths):
        if crash_on and p and crash_on in str(p):
            os._exit(77)
        try:
            image, sizes[i] = decode_image_sized(read_bytes(p, policy), image_size)
            images.append(image)
        except Exception as e:  # noqa: BLE001 - any per-file failure is recorded in its row, the job goes on
            errors[i] = error_message(e)
    return (np.stack(images) if images else np.zeros((0, 3, *image_size), np.float32)), sizes, errors


def decode_batch(batch: dict[str, np.ndarray], image_size: tuple[int, int],
                 policy: ReadPolicy = ReadPolicy()) -> dict[str, np.ndarray]:
    """CPU stage: read and decode every row; a failure becomes that row's ``error``, never an exception.

    Returns a new dict: every input column, plus ``image`` (n, 3, h, w) float32 (zeros for failed rows),
    ``image_height``/``image_width`` (original size, 0 for failed rows) and ``error`` (None when decoded).
    """
    images, sizes, errors = _decode_paths(batch[PATH_COL], image_size, policy)
    errors = np.asarray(errors, dtype=object)
    out = dict(batch)
    out[IMAGE_COL] = np.zeros((len(errors), 3, *image_size), dtype=np.float32)
    out[IMAGE_COL][[e is None for e in errors]] = images
    out[HEIGHT_COL], out[WIDTH_COL] = sizes[:, 0], sizes[:, 1]
    out[ERROR_COL] = errors
    return out
