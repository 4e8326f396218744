"""Indexing any folder or prefix (``jobs/index.py --list``, ``rayanom.listing``): nested folders, other files and
unreadable entries on a local disk and on S3 (moto's server on loopback), counts that add up, an index of many files
read back in path order whatever the number of tasks, the label and split rules, bad flags refused before Ray."""

import http.client
import json
import os
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.fs as pafs
import pytest

from rayanom import listing
from rayanom.config import UserError
from rayanom.index import describe_index, read_rows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _touch(root, *names, data=b"not decoded"):
    for name in names:
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)  # chosen by extension: never read


# Images directly in the root and in a folder between sub-folders ("a.png" < "a/" < "b.png"): runs of files
# between folders, which the order across tasks must keep.
IMAGES = ["0.png", "a.png", "a/good/1.png", "a/good/2.JPG", "a/good/deep/3.png", "a/bad/4.png", "a/bad/x/5.tif",
          "a/mid.png", "b.png", "b/good/6.png", "b/bad/7.webp", "c/8.png", "c/good/9.jpeg", "d/e/f/g/10.png"]


@pytest.fixture
def tree(tmp_path):
    root = str(tmp_path / "tree")
    _touch(root, *IMAGES, "notes.txt", "a/good/Thumbs.db", "b/bad/7.json")
    _touch(root, "a/empty.png", data=b"")
    os.makedirs(os.path.join(root, "empty-folder"))
    os.symlink(os.path.join(root, "nowhere.png"), os.path.join(root, "c", "broken.png"))
    os.symlink(os.path.join(root, "a"), os.path.join(root, "c", "loop"))  # a link to a folder: not followed
    os.symlink(os.path.join(root, "b.png"), os.path.join(root, "d", "link.png"))  # a link to a file: an image
    return root


SKIPPED = {"notes.txt": listing.NOT_IMAGE, "a/good/Thumbs.db": listing.NOT_IMAGE, "b/bad/7.json": listing.NOT_IMAGE,
           "a/empty.png": listing.EMPTY, "c/broken.png": listing.BROKEN_LINK, "c/loop": listing.FOLDER_LINK}


def _index(out):
    info = describe_index(out)
    return info, read_rows(info, 0, info.n_rows).drop_columns(["row_index"])


@pytest.mark.ray
def test_a_local_tree_in_any_number_of_tasks_reads_back_in_path_order(ray_local, tree, tmp_path):
    expected = sorted([f"{tree}/{n}" for n in IMAGES] + [f"{tree}/d/link.png"])
    tables = []
    for tasks, rows_per_file in ((1, 1000), (5, 2), (64, 1)):
        out = str(tmp_path / f"index-{tasks}")
        summary = listing.write_listing(listing.plan_listing([tree + "/"], out, rows_per_file=rows_per_file,
                                                             tasks=tasks))
        assert (summary["found"], summary["rows"], summary["skipped"]) == (21, 15, 6)
        assert summary["found"] == summary["rows"] + sum(summary["skipped_by_reason"].values())
        assert summary["skipped_by_reason"] == dict(sorted(
            {r: list(SKIPPED.values()).count(r) for r in SKIPPED.values()}.items()))
        info, table = _index(out)
        assert table.column_names == ["path"] and table.column("path").to_pylist() == expected
        assert len(info.files) == summary["files"] >= -(-15 // rows_per_file)
        assert [os.path.basename(f) for f in info.files] == sorted(n for n in os.listdir(out) if n.endswith(".parquet"))
        skipped = [line.split("\t") for n in sorted(os.listdir(out)) if n.startswith("_skipped-")
                   for line in open(os.path.join(out, n)).read().splitlines()]
        assert {os.path.relpath(p, tree): r for p, r in skipped} == SKIPPED
        tables.append(table)
    assert tables[0].equals(tables[1]) and tables[0].equals(tables[2])  # the same rows, the same order
    # Listed again into the same directory with fewer files: the earlier listing's files are replaced, not mixed in.
    out = str(tmp_path / "index-64")
    listing.write_listing(listing.plan_listing([tree], out, rows_per_file=1000, tasks=1))
    assert _index(out)[1].equals(tables[0]) and len(describe_index(out).files) == 1


@pytest.mark.ray
def test_label_and_split_rules(ray_local, tree, tmp_path):
    out = str(tmp_path / "index")
    plan = listing.plan_listing([tree], out, label_rule="good=0, bad=1", split_rule="a=train,b=test", tasks=3)
    summary = listing.write_listing(plan)
    _, table = _index(out)
    assert table.column_names == ["path", "label", "split", "defect_type"]
    rows = {os.path.relpath(p, tree): (lab, s, d) for p, lab, s, d in zip(*(c.to_pylist() for c in table.columns))}
    # The deepest folder the rule names decides: a/bad/x/5.tif is "bad", a/good/deep/3.png "good".
    assert rows == {"a/good/1.png": (0, "train", "good"), "a/good/2.JPG": (0, "train", "good"),
                    "a/good/deep/3.png": (0, "train", "good"), "a/bad/4.png": (1, "train", "bad"),
                    "a/bad/x/5.tif": (1, "train", "bad"), "b/good/6.png": (0, "test", "good"),
                    "b/bad/7.webp": (1, "test", "bad")}
    reasons = summary["skipped_by_reason"]
    assert reasons[listing.NO_LABEL] == 7 and reasons[listing.NO_SPLIT] == 1  # c/good/9.jpeg: "c" gives no split
    assert summary["by_split"] == {"test": 2, "train": 5} and summary["by_defect_type"] == {"bad": 3, "good": 4}
    assert summary["found"] == 21 and summary["rows"] + summary["skipped"] == 21
    with pytest.raises(UserError, match="no image found below"):
        listing.write_listing(listing.plan_listing([tree], str(tmp_path / "none"), label_rule="nothing=1", tasks=2))


def test_a_folder_that_cannot_be_listed_is_skipped_with_its_reason(tree, monkeypatch):
    """Permission denied on one folder (simulated: these tests may run as root, whom chmod does not stop)."""
    real = os.scandir

    def scandir(path):
        if path.endswith("/a/good"):
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(listing.os, "scandir", scandir)
    files, dirs, bad = listing.list_folder(tree, "a", recursive=True)
    assert dirs == [] and ("a/good", listing.DENIED) in bad
    assert sorted(f for f, _ in files) == ["a/bad/4.png", "a/bad/x/5.tif", "a/empty.png", "a/mid.png"]
    _, dirs, bad = listing.list_folder(tree, "a/good", recursive=False)
    assert (dirs, bad) == ([], [("a/good", listing.DENIED)])


class DenyingProxy:
    """An HTTP proxy on loopback in front of moto's S3 server: 403 AccessDenied to every listing whose prefix starts
    with ``denied`` (what a bucket policy with an ``s3:prefix`` condition answers), every other request passed on."""

    def __init__(self, upstream: str, denied: str):
        host, port = upstream.replace("http://", "").split(":")
        proxy, self.denials = self, 0

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                body = self._body()
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                if self.command == "GET" and query.get("prefix", [""])[0].startswith(denied):
                    proxy.denials += 1
                    return self._reply(403, {"Content-Type": "application/xml"}, b"<?xml version=\"1.0\"?><Error>"
                                       b"<Code>AccessDenied</Code><Message>Access Denied</Message></Error>")
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("connection", "transfer-encoding", "content-length", "expect")}
                conn.request(self.command, self.path, body=body, headers={**headers, "Content-Length": str(len(body))})
                resp = conn.getresponse()
                data = resp.read()
                headers = {k: v for k, v in resp.getheaders()
                           if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date")}
                length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self._reply(resp.status, headers, b"" if self.command == "HEAD" else data, length)
                conn.close()

            def _reply(self, status, headers, data, length=None):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                data = b""  # the SDK streams uploads in chunks
                while (size := int(self.rfile.readline().split(b";")[0].strip(), 16)) > 0:
                    data += self.rfile.read(size)
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return data

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def s3(monkeypatch):
    """moto's S3 server on loopback, behind a ``DenyingProxy`` that refuses listings of ``imgs/locked``; this
    process's S3 filesystems and the environment (for jobs) point at the proxy."""
    import boto3
    from moto.server import ThreadedMotoServer

    from rayanom.storage import bucket_filesystem

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    proxy = DenyingProxy(f"http://{host}:{port}", "imgs/locked")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": proxy.url, "AWS_EC2_METADATA_DISABLED": "true"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3", endpoint_url=f"http://{host}:{port}")
    client.create_bucket(Bucket="rayanom-test")
    bucket_filesystem.cache_clear()  # filesystems made for another server's port
    try:
        yield {"client": client, "env": env, "proxy": proxy}
    finally:
        proxy.close()
        server.stop()
        bucket_filesystem.cache_clear()


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_an_s3_prefix_with_nested_folders_other_files_and_a_denied_prefix(s3, tmp_path):
    keys = {"imgs/good/1.png": b"x", "imgs/good/sub/2.jpg": b"x", "imgs/good/sub/deeper/3.png": b"x",
            "imgs/bad/4.png": b"x", "imgs/bad/readme.txt": b"x", "imgs/bad/empty.png": b"",
            "imgs/5.png": b"x", "imgs/manifest.csv": b"x", "imgs/locked/6.png": b"x", "imgs/locked/7.png": b"x",
            "other/8.png": b"x"}  # outside the prefix
    for key, data in keys.items():
        s3["client"].put_object(Bucket="rayanom-test", Key=key, Body=data)
    out = "s3://rayanom-test/indexes/imgs"
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **s3["env"]}
    proc = subprocess.run([sys.executable, "jobs/index.py", "--list", "s3://rayanom-test/imgs/", "--out", out,
                           "--label-from-dir", "good=0,bad=1", "--rows-per-file", "1", "--list-tasks", "3", "--quiet"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{\n"):proc.stdout.rindex("}") + 1])
    assert summary["skipped_by_reason"] == {listing.NO_LABEL: 1, listing.EMPTY: 1, listing.NOT_IMAGE: 2,
                                            listing.DENIED: 1}  # imgs/5.png; the locked prefix, one entry
    assert (summary["found"], summary["rows"], summary["skipped"], summary["files"]) == (9, 4, 5, 4)
    assert s3["proxy"].denials >= 1
    assert f"index: {out} (4 rows in 4 files; 5 of 9 entries skipped" in proc.stdout
    info, table = _index(out)
    assert len(info.files) == 4
    assert table.column("path").to_pylist() == ["s3://rayanom-test/imgs/bad/4.png", "s3://rayanom-test/imgs/good/1.png",
                                                "s3://rayanom-test/imgs/good/sub/2.jpg",
                                                "s3://rayanom-test/imgs/good/sub/deeper/3.png"]
    assert table.column("label").to_pylist() == [1, 0, 0, 0]
    from rayanom.storage import resolve_filesystem

    fs, path = resolve_filesystem(out)
    skipped = b"".join(fs.open_input_file(i.path).read() for i in sorted(
        fs.get_file_info(pafs.FileSelector(path)), key=lambda i: i.path) if i.base_name.startswith("_skipped-"))
    assert "s3://rayanom-test/imgs/locked\t" + listing.DENIED in skipped.decode()
    with pytest.raises(UserError, match=r"invalid roots='s3://rayanom-test/imgs/locked': cannot be read \(.*ACCESS"):
        listing.plan_listing(["s3://rayanom-test/imgs/locked/"], str(tmp_path / "i"))  # refused before any task


@pytest.fixture
def no_ray(monkeypatch):
    """Ray must not start: every flag is checked before."""
    import rayanom.launch

    def refuse(*args, **kwargs):
        raise AssertionError("Ray started before the flags were checked")

    monkeypatch.setattr(rayanom.launch, "start_ray_for_tasks", refuse)
    monkeypatch.setattr(rayanom.launch, "check_output_location", refuse)


@pytest.mark.parametrize("flags,message", [
    (["--label-from-dir", "good=2"], "invalid --label-from-dir='good=2': expected NAME=0|1 pairs, comma-separated"),
    (["--label-from-dir", "good=0,good=1"], "invalid --label-from-dir='good=0,good=1': expected NAME=0|1 pairs"),
    (["--label-from-dir", "a/b=1"], "invalid --label-from-dir='a/b=1'"),
    (["--label-from-dir", "good"], "('good' is not)"),
    (["--split-from-dir", "train=training"], "invalid --split-from-dir='train=training': expected "
                                             "NAME=train|val|test pairs"),
    (["--rows-per-file", "0"], "invalid --rows-per-file=0: expected a number of rows >= 1"),
    (["--list-tasks", "0"], "invalid --list-tasks=0: expected a number of tasks >= 1"),
    (["--val-fraction", "0.5"], "invalid --val-fraction with --list: a listing has no layout"),
    (["--eval-out", "e.parquet", "--mask", "m"], "invalid --mask/--eval-out with --list"),
    (["--list", "MISSING"], "invalid --list='MISSING': expected a folder or prefix that exists"),
    (["--list", "TREE", "TREE/a"], "invalid --list='TREE/a': expected folders that do not lie in one another"),
    (["--out", "TREE/index"], "invalid --out='TREE/index': expected a directory outside the listed folders"),
    (["--out", "FOREIGN"], "holds other files ['mine.csv']"),
])
def test_bad_flags_are_refused_before_ray_starts(tree, tmp_path, no_ray, monkeypatch, capsys, flags, message):
    from rayanom_jobs import index

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.csv").write_text("x")
    subs = {"TREE": tree, "MISSING": str(tmp_path / "missing"), "FOREIGN": str(foreign)}

    def sub(s):
        for k, v in subs.items():
            s = s.replace(k, v)
        return s

    extra = [sub(f) for f in flags]
    base = [] if "--list" in flags else ["--list", tree]
    base += [] if "--out" in flags else ["--out", str(tmp_path / "i")]
    monkeypatch.setattr(sys, "argv", ["index.py", *base, *extra])
    with pytest.raises(SystemExit) as e:
        index.cli()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and sub(message) in err and len(err.strip().splitlines()) == 1, err


def test_rules_belong_to_a_listing(tmp_path, no_ray, monkeypatch, capsys):
    from rayanom_jobs import index

    monkeypatch.setattr(sys, "argv", ["index.py", "--mvtec", str(tmp_path), "--out", str(tmp_path / "i.parquet"),
                                      "--split-from-dir", "train=train"])
    with pytest.raises(SystemExit) as e:
        index.cli()
    assert e.value.code == 2 and "invalid --split-from-dir without --list" in capsys.readouterr().err
