"""Listing cost: ``rayanom.listing`` (what ``jobs/index.py --list`` runs) on a local tree of tiny files and on objects
of moto's S3 server on loopback, in files per second, and what that implies per million objects.

    python benchmarks/listing.py [--local-files 100000] [--s3-objects 10000] [--repeats 3]
                                 [--out benchmarks/listing-results.json]

Cases: the local tree (20 folders of 25 folders of files, one file in 20 not an image) listed by one task and by the
default number of tasks; the same shape on S3 (10 x 10 prefixes); and a flat S3 prefix (every key directly under it,
which one task lists). Ray starts once (its start-up is reported apart) and a small listing warms its workers; each
case is then timed ``--repeats`` times (the fastest is reported, every run is kept): wall seconds of
``write_listing`` and the driver's own CPU seconds (``time.process_time``: the plan, the level-by-level results, the
summary; the listing itself runs in the workers). The index is written to a local temporary directory. moto's server
runs in its own process, so its CPU is not the driver's; it is a Python server sharing this machine's cores, so the
S3 rates are a floor, not what S3 answers. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)


def _name(i: int) -> str:
    return f"{i:07d}-a-typical-file-name" + (".txt" if i % 20 == 19 else ".png")


def _nested(n: int, outer: int, inner: int) -> list[str]:
    """``n`` relative paths in ``outer`` folders of ``inner`` folders."""
    per = -(-n // (outer * inner))
    return [f"d{i // (per * inner):03d}/e{i // per % inner:03d}/{_name(i)}" for i in range(n)]


def _local_tree(root: str, n: int) -> int:
    for rel in _nested(n, 20, 25):
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"x")
    return n


def _moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server in its own process on a free loopback port, and its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto_server did not start")


def _put(keys: list[str]) -> None:
    import boto3

    client = boto3.client("s3")
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: client.put_object(Bucket="bench", Key=k, Body=b"x"), keys))


def _time(root: str, tasks: int | None, files: int, repeats: int) -> dict:
    from rayanom.listing import plan_listing, write_listing

    runs = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            t0, c0 = time.perf_counter(), time.process_time()
            summary = write_listing(plan_listing([root], os.path.join(out, "index"), tasks=tasks))
            runs.append({"wall_s": time.perf_counter() - t0, "driver_cpu_s": time.process_time() - c0})
    assert summary["found"] == files, (summary, files)
    best = min(runs, key=lambda r: r["wall_s"])
    return {"files": files, "images": summary["rows"], "skipped": summary["skipped"], "level_tasks":
            summary["level_tasks"], "tree_tasks": summary["tree_tasks"], "index_files": summary["files"],
            "wall_s": round(best["wall_s"], 3), "driver_cpu_s": round(best["driver_cpu_s"], 3),
            "wall_s_median": round(statistics.median(r["wall_s"] for r in runs), 3),
            "files_per_s": round(files / best["wall_s"]),
            "per_million": {"total_s": round(best["wall_s"] / files * 1e6, 1),
                            "driver_s": round(best["driver_cpu_s"] / files * 1e6, 1)},
            "runs": [{k: round(v, 3) for k, v in r.items()} for r in runs]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--local-files", type=int, default=100_000)
    p.add_argument("--s3-objects", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join(HERE, "listing-results.json"))
    args = p.parse_args()
    load = os.getloadavg()[0]  # this machine is shared: the load beside the numbers
    moto, url = _moto()
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url, "AWS_EC2_METADATA_DISABLED": "true"})
    os.environ.pop("RAY_ADDRESS", None)  # Ray's workers inherit this environment: start it after
    import boto3
    import ray

    from rayanom.launch import start_ray_for_tasks

    try:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            _local_tree(os.path.join(tmp, "tree"), args.local_files)
            made = time.perf_counter() - t0
            boto3.client("s3").create_bucket(Bucket="bench")
            _put([f"nested/{k}" for k in _nested(args.s3_objects, 10, 10)])
            _put([f"flat/{_name(i)}" for i in range(args.s3_objects)])
            t0 = time.perf_counter()
            start_ray_for_tasks()
            ray_start = time.perf_counter() - t0
            _time(os.path.join(tmp, "tree", "d000"), None, args.local_files // 20, 1)  # workers started, warm
            cpus = int(ray.cluster_resources().get("CPU", 1))
            cases = {"local_one_task": _time(os.path.join(tmp, "tree"), 1, args.local_files, args.repeats),
                     "local": _time(os.path.join(tmp, "tree"), None, args.local_files, args.repeats),
                     "s3_one_task": _time("s3://bench/nested", 1, args.s3_objects, args.repeats),
                     "s3": _time("s3://bench/nested", None, args.s3_objects, args.repeats),
                     "s3_flat": _time("s3://bench/flat", None, args.s3_objects, args.repeats)}
    finally:
        moto.terminate()
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "ray_cpus": cpus,
              "date": time.strftime("%Y-%m-%d"), "load_average_1m": [round(load, 1), round(os.getloadavg()[0], 1)],
              "ray_start_s": round(ray_start, 2),
              "local_tree_written_s": round(made, 1), **cases}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for name, c in cases.items():
        print(f"{name:15s} {c['files']:>7d} files in {c['wall_s']:6.2f} s ({c['files_per_s']:>6d} files/s; "
              f"{c['level_tasks']} + {c['tree_tasks']} tasks), driver CPU {c['driver_cpu_s']:.2f} s; per million: "
              f"{c['per_million']['total_s']:.0f} s, driver {c['per_million']['driver_s']:.1f} s")
    print(f"ray start {ray_start:.1f} s; results: {args.out}")


if __name__ == "__main__":
    main()
