"""The scoring data plane at scale: pipeline cost per row, driver memory, and real images against an in-process loop.

    python benchmarks/pipeline.py                 # everything (about 15 minutes on 2 cores)
    python benchmarks/pipeline.py --only cost     # pipeline cost and driver memory only

* **cost**: ``jobs/score.py`` (a whole process, as a user runs it, default flags) on indexes of files that do not
  exist (no decode, no model work: the pipeline's own cost) at 50,000 and 200,000 rows; rate = extra rows / extra
  seconds, so start-up cancels; each size run ``--repeats`` times, the fastest kept (the start-up alone swings by
  seconds on this VM). Side by side, the plain Ray Data pipeline with the same per-row work: ``read_parquet`` ->
  ``map_batches`` that tries to open each file -> ``map_batches`` with a 1-actor pool -> ``write_parquet``, batches
  of 256. The same rates between 200,000 and 1,000,000 rows (one run each), where the extra work is 16 s, not 3.
* **memory**: the peak RSS of the ``jobs/score.py`` driver process (polled) at 200,000 and 1,000,000 rows, and the
  CPU seconds the driver process itself used (not Ray's processes) from 50,000 to 1,000,000 rows, per row.
* **images**: 5,000 and 20,000 rows of 64 x 64 PNGs (200 distinct, repeated), resnet18 at 64^2, against an
  in-process loop on the 20,000 (decode -> forward -> KDE head, the same threads and batch size, no parquet, no
  Ray): the whole process, and the rate of the 15,000 extra rows (start-up cancels).

Prints a table and writes benchmarks/pipeline-results.json (or --out; with --only, the other section's numbers in it
are kept). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
ENV = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def _write_missing(path: str, n: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not os.path.exists(path):
        pq.write_table(pa.table({"path": [f"/nonexistent/dir/image-{i:09d}.png" for i in range(n)],
                                 "label": pa.array(np.arange(n) % 2)}), path, row_group_size=65536)
    return path


def _rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (Linux /proc), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) ``pid`` itself has used so far (Linux /proc; its children not counted), 0 once it
    is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15
    except (OSError, IndexError, ValueError):
        return 0.0


def _run(cmd: list[str]) -> tuple[float, int, float]:
    """Wall seconds, the peak RSS (bytes) and the CPU seconds of the process ``cmd`` itself (polled every 0.1 s: the
    CPU of its last tenth of a second is not counted; Ray's own processes, its children, never are)."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, cpu = [0], [0.0]

    def poll():
        while proc.poll() is None:
            peak[0] = max(peak[0], _rss(proc.pid))
            cpu[0] = max(cpu[0], _cpu(proc.pid))
            time.sleep(0.1)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    out, err = proc.communicate()
    poller.join()
    if proc.returncode not in (0, 2):  # 2: missing files exceed --max-failed-fraction, as intended
        raise RuntimeError(err[-3000:])
    return time.perf_counter() - t, peak[0], cpu[0]


PLAIN = r'''
import os, sys, logging
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1"); os.environ.setdefault("RAY_AUTH_MODE", "disabled")
import numpy as np, ray, ray.data
from ray.data import ActorPoolStrategy
index, out = sys.argv[1:3]
ray.init(num_cpus=max(3, os.cpu_count()), include_dashboard=False, logging_level=logging.WARNING)
def try_open(batch):
    errors = []
    for p in batch["path"]:
        try:
            open(p, "rb").close(); errors.append(None)
        except OSError as e:
            errors.append(f"{type(e).__name__}: {e}")
    batch["error"] = np.array(errors, dtype=object)
    return batch
class Model:
    def __call__(self, batch):
        batch["anomaly_score"] = np.full(len(batch["path"]), np.nan)
        return batch
(ray.data.read_parquet(index).map_batches(try_open, batch_size=256)
 .map_batches(Model, compute=ActorPoolStrategy(size=1), batch_size=256).write_parquet(out))
'''


def bench_cost(root: str, model: str, sizes: tuple[int, ...], memory_sizes: tuple[int, ...], repeats: int) -> dict:
    plain = os.path.join(root, "plain.py")
    with open(plain, "w") as f:
        f.write(PLAIN)
    out: dict = {"score_py": {}, "plain": {}}
    for n in sorted(set(sizes) | set(memory_sizes)):
        index = _write_missing(os.path.join(root, f"missing-{n}.parquet"), n)
        walls, peak, cpus = [], 0, []
        for _ in range(repeats if n in sizes else 1):
            wall, rss, cpu = _run([sys.executable, "jobs/score.py", "--model", model, "--index", index, "--out",
                                   os.path.join(root, f"scores-{n}-{time.time_ns()}"), "--quiet"])
            walls.append(wall)
            peak = max(peak, rss)
            cpus.append(cpu)
        out["score_py"][n] = {"wall_s": round(min(walls), 1), "walls_s": [round(w, 1) for w in walls],
                              "peak_rss_mb": round(peak / 2**20, 1), "driver_cpu_s": round(min(cpus), 1),
                              "driver_cpus_s": [round(c, 1) for c in cpus]}
        print(f"score.py on {n} missing rows: {_fmt(walls)} s, driver peak RSS {peak / 2**20:.0f} MB, driver CPU "
              f"{_fmt(cpus)} s", flush=True)
        walls = [_run([sys.executable, plain, index, os.path.join(root, f"plain-{n}-{time.time_ns()}")])[0]
                 for _ in range(repeats if n in sizes else 1)]
        out["plain"][n] = {"wall_s": round(min(walls), 1), "walls_s": [round(w, 1) for w in walls]}
        print(f"plain Ray Data pipeline on {n} rows: {_fmt(walls)} s", flush=True)
    for key, (a, b) in (("rows_per_s", (min(sizes), max(sizes))), ("rows_per_s_large", (max(sizes), max(memory_sizes)))):
        for name in ("score_py", "plain"):
            extra = out[name][b]["wall_s"] - out[name][a]["wall_s"]
            out[name][key] = round((b - a) / max(extra, 1e-9))
        out["ratio_to_plain" + key[len("rows_per_s"):]] = round(out["score_py"][key] / out["plain"][key], 2)
    lo, hi = min(memory_sizes), max(memory_sizes)
    out["rss_growth_mb"] = round(out["score_py"][hi]["peak_rss_mb"] - out["score_py"][lo]["peak_rss_mb"], 1)
    a, b = min(sizes), max(memory_sizes)
    growth = out["score_py"][b]["driver_cpu_s"] - out["score_py"][a]["driver_cpu_s"]
    out["driver_cpu_us_per_row"] = round(growth / (b - a) * 1e6, 2)  # the issue measured about 1,200 before
    print(f"pipeline cost {min(sizes)} -> {max(sizes)} rows (best of {repeats}): score.py "
          f"{out['score_py']['rows_per_s']} rows/s, plain {out['plain']['rows_per_s']} rows/s "
          f"({out['ratio_to_plain']}x); {max(sizes)} -> {hi} rows: {out['score_py']['rows_per_s_large']} vs "
          f"{out['plain']['rows_per_s_large']} rows/s ({out['ratio_to_plain_large']}x); driver RSS growth {lo} -> "
          f"{hi} rows: {out['rss_growth_mb']} MB; driver CPU {a} -> {b} rows: {growth:.1f} s "
          f"({out['driver_cpu_us_per_row']} us a row)", flush=True)
    return out


def _fmt(walls: list[float]) -> str:
    return ", ".join(f"{w:.1f}" for w in walls)


def _image_index(root: str, n: int, distinct: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rayanom.demo import make_demo

    index = os.path.join(root, f"images-{n}.parquet")
    if not os.path.exists(index):
        flat = pq.read_table(make_demo(os.path.join(root, "images"), n_train=distinct, n_test_normal=0,
                                       n_test_anomalous=0, size=64, seed=0))
        paths = np.asarray(flat.column("path").to_pylist(), dtype=object)[np.arange(n) % distinct]
        pq.write_table(pa.table({"path": paths.tolist()}), index)
    return index


def bench_images(root: str, model: str, sizes: tuple[int, int], distinct: int, batch: int) -> dict:
    import pyarrow.parquet as pq

    walls = {}
    for n in sizes:
        index = _image_index(root, n, distinct)
        walls[n] = _run([sys.executable, "jobs/score.py", "--model", model, "--index", index, "--out",
                         os.path.join(root, f"scores-images-{time.time_ns()}"), "--batch-size", str(batch),
                         "--quiet"])[0]
        print(f"images: score.py {n} rows in {walls[n]:.1f} s (whole process)", flush=True)
    # In-process loop: the same decode, extractor and head, one process, the machine's threads.
    from rayanom.artifact import Artifact
    from rayanom.decode import decode_batch
    from rayanom.features import FeatureExtractor, artifact_weights

    n = max(sizes)
    artifact = Artifact.load(model)
    state = artifact_weights(artifact.config, artifact.weights, None)
    t = time.perf_counter()
    extractor = FeatureExtractor(artifact.config, state, precision=artifact.provenance["run"]["precision"])
    paths = pq.read_table(_image_index(root, n, distinct)).column("path").to_pylist()
    for s in range(0, n, batch):
        images = decode_batch({"path": paths[s:s + batch]}, artifact.config.image_size)["image"]
        artifact.head.score_samples(extractor(images))
    loop = time.perf_counter() - t
    a, b = sizes
    marginal = (b - a) / (walls[b] - walls[a])
    out = {"score_py_wall_s": {str(k): round(v, 1) for k, v in walls.items()}, "loop_s": round(loop, 1),
           "score_py_images_per_s": round(n / walls[n], 1), "score_py_marginal_images_per_s": round(marginal, 1),
           "loop_images_per_s": round(n / loop, 1), "ratio": round(loop / walls[n], 2),
           "ratio_marginal": round(marginal / (n / loop), 2)}
    print(f"images: score.py {n} rows in {walls[n]:.1f} s ({n / walls[n]:.0f}/s, whole process; {marginal:.0f}/s "
          f"for the {b - a} extra rows over {a}), in-process loop {loop:.1f} s ({n / loop:.0f}/s): whole "
          f"{out['ratio']}, marginal {out['ratio_marginal']}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["cost", "images"])
    parser.add_argument("--out", default=os.path.join(HERE, "pipeline-results.json"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="runs per size of the cost comparison (best kept)")
    args = parser.parse_args()
    sys.path.insert(0, REPO)
    root = os.path.join(HERE, "data-pipeline")
    os.makedirs(root, exist_ok=True)
    model_dir = os.path.join(root, "run")
    if not os.path.exists(os.path.join(model_dir, "model")):
        demo = os.path.join(root, "demo")
        from rayanom.demo import make_demo

        train = make_demo(demo, n_train=40, n_test_normal=0, n_test_anomalous=0, size=64, seed=0)
        subprocess.run([sys.executable, "jobs/fit.py", "--model", "dfkde", "--index", train, "--out", model_dir,
                        "--backbone", "resnet18", "--image-size", "64", "--no-pretrained", "--precision", "fp32",
                        "--quiet"], cwd=REPO, env=ENV, check=True, capture_output=True)
    model = os.path.join(model_dir, "model")
    results = {}
    if args.only and os.path.exists(args.out):  # one section measured again: the other one's numbers are kept
        with open(args.out) as f:
            results = json.load(f)
    results.update({"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                    "date": time.strftime("%Y-%m-%d")})
    if args.only != "images":
        results["cost"] = bench_cost(root, model, (50_000, 200_000), (200_000, 1_000_000), args.repeats)
        results["cost"]["date"] = results["date"]  # sections kept by --only keep their own date
    if args.only != "cost":
        results["images"] = bench_images(root, model, (5_000, 20_000), 200, args.batch_size)
        results["images"]["date"] = results["date"]
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
