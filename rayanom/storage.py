"""Storage: filesystems for paths and URIs, the output-directory policy, retried reads and weight files."""

from __future__ import annotations

import hashlib
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import pyarrow as pa
import pyarrow.fs as pafs

from rayanom.config import UserError

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
    """How image files are read: retries of transient errors, and the largest file read.

    A transient storage error (``is_transient``) is retried up to ``retries`` times per
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
    """All bytes of a local file or URI, transient errors retried.

    On object stores in two requests (open: HEAD, then read: GET), each retried on transient errors (``ReadPolicy``). A
    missing file, a directory or a file above ``max_file_bytes`` is an error that says so."""
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
    return _read_whole(f, f.size, policy)


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
    return _read_whole(f, lambda: os.fstat(f.fileno()).st_size, policy)


def _read_whole(f, size_of: Callable[[], int], policy: ReadPolicy) -> bytes:
    """All bytes of the open file ``f`` (closed after), refused above ``max_file_bytes`` (``size_of()`` says)."""
    with f:
        size = size_of()
        if size > policy.max_file_bytes:
            msg = f"file too large: {size} bytes (--max-file-bytes {policy.max_file_bytes})"
            raise ValueError(msg)
        return with_retries(lambda: _read_all(f), policy)


def _read_all(f) -> bytes:
    f.seek(0)
    return f.read()


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

