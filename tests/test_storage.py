"""Storage faults at the filesystem layer: transient errors retried with backoff, permanent ones final, two requests
per image, files above --max-file-bytes refused from their size.

The faults come from a pyarrow ``PyFileSystem`` whose handler wraps the local filesystem and makes chosen paths fail
their first k opens and k reads with the errors pyarrow's S3 client raises once the AWS SDK gives up.
"""


import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
from PIL import Image

import rayanom.storage as storage
from rayanom.decode import decode_batch
from rayanom.storage import ReadPolicy, is_transient, read_bytes

SLOW_DOWN = "AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate. (HTTP status 503)"
HEAD_503 = "AWS Error UNKNOWN (HTTP status 503) during HeadObject operation: No response body."
FAST = ReadPolicy(retries=6, backoff_s=0.0005, backoff_cap_s=0.002)


class _Reader:
    """A file object whose reads fail while its path's read budget of failures lasts."""

    def __init__(self, handler, path):
        self.handler, self.path = handler, path
        self.f = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.closed = False

    def read(self, n=-1):
        self.handler.calls[self.path].append("read")
        if self.handler.fail_reads.get(self.path, 0) > 0:
            self.handler.fail_reads[self.path] -= 1
            raise OSError(SLOW_DOWN)
        return self.f.read(n)

    def seek(self, pos, whence=0):
        return self.f.seek(pos, whence)

    def tell(self):
        return self.f.tell()

    def size(self):
        return __import__("os").path.getsize(self.path)

    def close(self):
        self.closed = True
        self.f.close()

    def readable(self):
        return True

    def seekable(self):
        return True


class Flaky(pafs.FileSystemHandler):
    def __init__(self):
        self.local = pafs.LocalFileSystem()
        self.fail_opens, self.fail_reads, self.errors = {}, {}, {}
        self.calls = {}

    def _count(self, path, what):
        self.calls.setdefault(path, []).append(what)

    def open_input_file(self, path):
        self._count(path, "open")
        if path in self.errors:
            raise self.errors[path]
        if self.fail_opens.get(path, 0) > 0:
            self.fail_opens[path] -= 1
            raise OSError(HEAD_503)
        if self.local.get_file_info(path).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"Path does not exist '{path}'")
        return pa.PythonFile(_Reader(self, path), mode="r")

    def get_file_info(self, paths):
        for p in paths:
            self._count(p, "info")
        return self.local.get_file_info(paths)

    def get_type_name(self):
        return "flaky"

    def normalize_path(self, path):
        return path

    def equals(self, other):
        return self is other

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def open_input_stream(self, path):
        return self.open_input_file(path)

    def create_dir(self, path, recursive):
        raise NotImplementedError

    delete_dir = delete_dir_contents = delete_root_dir_contents = delete_file = create_dir

    def move(self, src, dest):
        raise NotImplementedError

    copy_file = move

    def open_output_stream(self, path, metadata):
        raise NotImplementedError

    open_append_stream = open_output_stream


@pytest.fixture
def flaky(monkeypatch, tmp_path):
    handler = Flaky()
    fs = pafs.PyFileSystem(handler)
    real = storage.resolve_filesystem
    monkeypatch.setattr(storage, "resolve_filesystem",
                        lambda uri: (fs, uri[len("flaky://"):]) if uri.startswith("flaky://") else real(uri))
    paths = []
    rng = np.random.default_rng(0)
    for i in range(6):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return handler, paths


def test_transient_errors_are_retried_until_the_image_decodes(flaky):
    handler, paths = flaky
    for i, p in enumerate(paths):  # k failed opens and k failed reads, k below the retry budget
        handler.fail_opens[p], handler.fail_reads[p] = i % 4, (i + 1) % 4
    out = decode_batch({"path": np.array(["flaky://" + p for p in paths], dtype=object)}, (16, 16), FAST)
    clean = decode_batch({"path": np.array(paths, dtype=object)}, (16, 16))
    assert out["error"].tolist() == [None] * 6
    np.testing.assert_array_equal(out["image"], clean["image"])
    for i, p in enumerate(paths):  # each retry is one request: the failures, then one open and one read
        assert handler.calls[p].count("open") == i % 4 + 1 and handler.calls[p].count("read") == (i + 1) % 4 + 1


def test_two_requests_per_image_without_faults(flaky):
    handler, paths = flaky
    assert read_bytes("flaky://" + paths[0], FAST) == open(paths[0], "rb").read()
    assert handler.calls[paths[0]] == ["open", "read"]


def test_retries_run_out_and_the_row_says_so(flaky):
    handler, paths = flaky
    handler.fail_opens[paths[0]] = 100
    handler.fail_reads[paths[1]] = 100
    out = decode_batch({"path": np.array(["flaky://" + p for p in paths[:3]], dtype=object)}, (16, 16), FAST)
    for e in out["error"][:2]:
        assert e.startswith("RetriesExhausted: transient storage error persisted through 6 retries: OSError: AWS")
    assert out["error"][2] is None
    assert handler.calls[paths[0]].count("open") == 7  # the first try and 6 retries


def test_permanent_errors_are_not_retried(flaky, tmp_path):
    handler, paths = flaky
    handler.errors[paths[0]] = OSError("AWS Error ACCESS_DENIED during HeadObject operation: Access Denied")
    with pytest.raises(OSError, match="ACCESS_DENIED"):
        read_bytes("flaky://" + paths[0], FAST)
    assert handler.calls[paths[0]].count("open") == 1
    with pytest.raises(FileNotFoundError, match="missing file flaky://"):
        read_bytes("flaky://" + str(tmp_path / "absent.png"), FAST)
    assert handler.calls[str(tmp_path / "absent.png")] == ["open"]
    with pytest.raises(IsADirectoryError, match="is a directory"):
        read_bytes(str(tmp_path), FAST)  # the local filesystem: one more request says which


def test_files_above_max_file_bytes_are_refused_from_their_size(flaky):
    handler, paths = flaky
    size = len(open(paths[0], "rb").read())
    with pytest.raises(ValueError, match=f"file too large: {size} bytes"):
        read_bytes("flaky://" + paths[0], ReadPolicy(max_file_bytes=size - 1))
    assert "read" not in handler.calls[paths[0]]  # refused before a byte was read
    assert read_bytes("flaky://" + paths[0], ReadPolicy(max_file_bytes=size)) == open(paths[0], "rb").read()


@pytest.mark.parametrize("message,transient", [
    (SLOW_DOWN, True), (HEAD_503, True), ("AWS Error SERVICE_UNAVAILABLE during GetObject operation", True),
    ("AWS Error INTERNAL_FAILURE during GetObject operation", True), ("Connection reset by peer", True),
    ("google::cloud::Status(UNAVAILABLE: retry policy exhausted)", True),
    ("AWS Error ACCESS_DENIED during HeadObject operation", False), ("Cannot open for reading: path '/503'", False),
])
def test_transient_classification(message, transient):
    assert is_transient(OSError(message)) is transient
    assert is_transient(TimeoutError("read timed out")) and not is_transient(FileNotFoundError(SLOW_DOWN))


def test_summary_counts_failures_per_kind(tmp_path):
    import pyarrow.parquet as pq

    from rayanom.summary import failure_kinds

    errors = [None, "FileNotFoundError: missing file a", "RetriesExhausted: transient ... OSError: x: y", None,
              "FileNotFoundError: missing file b", "ValueError: not an image"]
    pq.write_table(pa.table({"anomaly_score": [1.0, None, None, 2.0, None, None], "error": errors}),
                   tmp_path / "p.parquet")
    assert failure_kinds(str(tmp_path)) == {"FileNotFoundError": 2, "RetriesExhausted": 1, "ValueError": 1}


def test_lease_one_writer_per_output_and_a_stale_one_is_taken_over(tmp_path, monkeypatch):
    import json
    import os
    import time

    from rayanom import parts
    from rayanom.config import UserError

    monkeypatch.setattr(parts, "HEARTBEAT_S", 0.05)
    out = str(tmp_path / "scores")
    first = parts.Lease(out, "job-a")
    first.acquire()
    lease_file = os.path.join(out, parts.LEASE)
    assert json.load(open(lease_file))["job"] == "job-a"
    with pytest.raises(UserError, match=r"being written by another job \(job-a on .*last heartbeat 0 s ago"):
        parts.Lease(out, "job-b").acquire()
    os.utime(lease_file, (time.time() - 1000, time.time() - 1000))  # the heartbeat brings it back to now
    time.sleep(0.3)
    assert parts.Lease(out, "job-c").age() < 5
    last_beat = open(lease_file).read()
    first.release()  # job-a dies: no more heartbeats, its last one left behind
    os.makedirs(out, exist_ok=True)
    with open(lease_file, "w") as f:
        f.write(last_beat)
    os.utime(lease_file, (time.time() - 1000, time.time() - 1000))
    taker = parts.Lease(out, "job-d")
    taker.acquire()  # stale by the store's clock: taken over
    assert json.load(open(lease_file))["job"] == "job-d"
    assert not parts.has_parts(out)  # a lease alone is not scores
    taker.release()
    assert not os.path.exists(lease_file)

    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with open(lease_file, "w") as f:  # fresh, but its process (on this machine) is gone: a job killed a moment ago
        json.dump({"job": "job-e", "host": __import__("socket").gethostname(), "pid": int(dead.stdout)}, f)
    resumed = parts.Lease(out, "job-f")
    resumed.acquire()
    assert json.load(open(lease_file))["job"] == "job-f"
    resumed.release()


def test_old_temporary_parts_are_removed_and_a_live_jobs_are_kept(tmp_path):
    import os
    import time

    from rayanom import parts

    out = tmp_path / "scores"
    manifest = {"format": "rayanom-scores", "n_parts": 2}
    assert parts.open_parts(str(out), manifest, overwrite=False) == set()  # writes the manifest
    old, live = out / ".part-00000000.parquet.deadjob.tmp", out / ".part-00000001.parquet.livejob.tmp"
    old.write_bytes(b"x")
    live.write_bytes(b"y")
    os.utime(old, (time.time() - 1000, time.time() - 1000))
    assert parts.open_parts(str(out), manifest, overwrite=False) == set()
    assert not old.exists() and live.exists()
