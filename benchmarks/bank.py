"""Fit cost follows the bank, not the index: the driver's bank reduce, and a fit on a 100x larger training index.

    python benchmarks/bank.py                      # both measurements
    python benchmarks/bank.py --only reduce        # the reduce alone (seconds)
    python benchmarks/bank.py --bank-module FILE   # the reduce of another bank.py (e.g. an older checkout's)

* **reduce**: K single rows of 2,048 float32 offered one at a time to ``BankSelector(K)`` (the worst case for a
  buffer that is copied per block), for K = 4,000 / 8,000 / 16,000 / 40,000 (``--ks``).
* **fit**: ``jobs/fit.py`` as a user runs it (embedded local Ray, whole process) on a 200,000-row training index that
  repeats 2,000 distinct 64 x 64 PNGs, and on its first 2,000 rows; resnet18 at ``--image-size 64``,
  ``--max-training-points 1000``, random weights. The ratio of the two wall times is the number to watch (<= 2x).

Prints a table and writes benchmarks/bank-results.json (or --out). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def bench_reduce(ks: list[int], module_path: str | None) -> dict:
    if module_path:
        spec = importlib.util.spec_from_file_location("bank_under_test", module_path)
        bank = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bank)
    else:
        from rayanom import bank
    out = {}
    row = np.random.default_rng(0).random((1, 2048), dtype=np.float32)
    for k in ks:
        keys = bank.row_keys(np.arange(k), 0)
        selector = bank.BankSelector(k)
        t = time.perf_counter()
        for i in range(k):
            selector.add(keys[i:i + 1], np.array([i]), row)
        ids, _ = selector.result()
        out[k] = round(time.perf_counter() - t, 3)
        assert len(ids) == k
        print(f"reduce: {k} single rows of 2048 floats: {out[k]:.2f} s", flush=True)
    return out


def make_index(root: str, distinct: int, rows: int) -> tuple[str, str]:
    """A training index of ``rows`` rows cycling over ``distinct`` 64 x 64 PNGs, and one of its first ``distinct``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rayanom.demo import make_demo

    big, small = os.path.join(root, f"train-{rows}.parquet"), os.path.join(root, f"train-{distinct}.parquet")
    if not os.path.exists(big):
        flat = pq.read_table(make_demo(os.path.join(root, "images"), n_train=distinct, n_test_normal=0,
                                       n_test_anomalous=0, size=64, seed=0))
        paths = np.asarray(flat.column("path").to_pylist(), dtype=object)
        table = pa.table({"path": pa.array(paths[np.arange(rows) % distinct].tolist()),
                          "label": pa.array(np.zeros(rows, dtype=np.int64))})
        pq.write_table(table.slice(0, distinct), small)
        pq.write_table(table, big)
    return small, big


def run_fit(index: str, out: str) -> dict:
    cmd = [sys.executable, os.path.join(REPO, "jobs", "fit.py"), "--model", "dfkde", "--index", index, "--out", out,
           "--backbone", "resnet18", "--image-size", "64", "--max-training-points", "1000", "--no-pretrained",
           "--overwrite"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    line = next(x for x in proc.stdout.splitlines() if x.startswith("fitted"))
    read = int(re.search(r"of (\d+) training rows read", line).group(1))
    print(f"fit: {index}: {wall:.1f} s; {line}", flush=True)
    return {"wall_s": round(wall, 1), "rows_read": read, "summary": line}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["reduce", "fit"])
    parser.add_argument("--ks", default="4000,8000,16000,40000")
    parser.add_argument("--bank-module", help="benchmark the BankSelector of this bank.py instead")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--distinct", type=int, default=2_000)
    parser.add_argument("--out", default=os.path.join(HERE, "bank-results.json"))
    args = parser.parse_args()
    sys.path.insert(0, REPO)
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
               "date": time.strftime("%Y-%m-%d")}
    if args.only != "fit":
        results["reduce_s"] = bench_reduce([int(k) for k in args.ks.split(",")], args.bank_module)
    if args.only != "reduce":
        root = os.path.join(HERE, f"data-bank-{args.distinct}")
        small, big = make_index(root, args.distinct, args.rows)
        results["fit_small"] = run_fit(small, os.path.join(root, "run-small"))
        results["fit_large"] = run_fit(big, os.path.join(root, "run-large"))
        ratio = results["fit_large"]["wall_s"] / results["fit_small"]["wall_s"]
        results["fit_ratio"] = round(ratio, 2)
        print(f"fit on {args.rows} rows / on {args.distinct} rows: {ratio:.2f}x wall time", flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
