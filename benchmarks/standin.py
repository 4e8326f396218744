"""A stand-in accelerator fed by the plane's decode stage on CPU-only nodes: how busy does it stay?

    python benchmarks/standin.py                  # about a minute on 2 cores

A simulated cluster on this machine (Ray's test-cluster utilities: several raylets): a CPU-less head, one "GPU" node
with 1 CPU and 1 simulated GPU, and one CPU-only node with 2 CPUs. The plane (``rayanom.plane.run``) decodes real
PNGs (``--px`` pixels, resized to ``--size``) in tasks, which can only run on the CPU-only node (the GPU node's CPU is
the actor's), and feeds one actor that asks for the GPU and stands in for the model: it sleeps ``--sleep`` seconds a
forward batch, using no CPU, and records when each call started and ended. Busy = time inside calls / the steady
phase (from the first call's start to the last call's end). The issue's target: >= 0.9. Prints one line and writes
benchmarks/standin-results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


class SleepingModel:
    """Sleeps ``seconds`` per forward batch (a device that uses no CPU); returns each call's start and end."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, rows):
        import pyarrow as pa

        t0 = time.time()
        time.sleep(self.seconds * sum(rows.column("n").to_pylist()))  # per image in the call's batches
        return pa.table({"n": rows.column("n"), "decode_node": rows.column("decode_node"),
                         "start": pa.array([t0] * rows.num_rows), "end": pa.array([time.time()] * rows.num_rows)})


def _images(root: str, n: int, px: int) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(min(n, 64)):
        p = os.path.join(root, f"{i:04d}.png")
        Image.fromarray(rng.integers(0, 255, (px, px, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return [paths[i % len(paths)] for i in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=3072)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--px", type=int, default=128, help="PNG side in pixels")
    p.add_argument("--size", type=int, default=64, help="the model's input side")
    p.add_argument("--sleep", type=float, default=0.004, help="seconds the stand-in takes per image")
    p.add_argument("--out", default=os.path.join(HERE, "standin-results.json"))
    args = p.parse_args()

    import pyarrow as pa
    import ray
    from ray import cloudpickle
    from ray.cluster_utils import Cluster

    from rayanom import plane
    from rayanom.storage import ReadPolicy, ipc_bytes

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    root = tempfile.mkdtemp(prefix="standin")
    paths = _images(root, args.rows, args.px)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    gpu_node = cluster.add_node(num_cpus=1, num_gpus=1)
    cpu_node = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    table = pa.table({"path": paths, "row_index": np.arange(args.rows, dtype=np.int64)})
    bs = args.batch_size
    units = [{"part": i, "rows": ipc_bytes(table.slice(s, 8 * bs))} for i, s in enumerate(range(0, args.rows,
                                                                                                     8 * bs))]

    def rows_of(unit):
        rows = pa.ipc.open_stream(unit["rows"]).read_all()
        return rows, {"part": unit["part"], "first": 0, "stop": rows.num_rows, "retry": 0, "offset": 0,
                      "total": rows.num_rows}

    decode = {"rows_of": rows_of, "batch_size": bs, "image_size": (args.size, args.size), "policy": ReadPolicy()}
    plan = plane.Plan(num_actors=1, batches_per_call=1, num_cpus=1, num_gpus=1, memory=2**28, no_progress_s=300,
                      start_timeout_s=300)
    t0 = time.time()
    got = pa.concat_tables(plane.run(units, decode, SleepingModel, {"seconds": args.sleep}, plan, progress=False))
    wall = time.time() - t0
    start, end = np.asarray(got.column("start")), np.asarray(got.column("end"))
    calls = np.unique(np.stack([start, end], 1), axis=0)
    busy = float((calls[:, 1] - calls[:, 0]).sum() / (calls[:, 1].max() - calls[:, 0].min()))
    nodes = sorted(set(got.column("decode_node").to_pylist()))
    result = {"date": time.strftime("%Y-%m-%d"), "rows": int(got.column("n").to_numpy().sum()), "batch_size": bs,
              "png_px": args.px, "input": args.size, "sleep_per_image_s": args.sleep, "wall_s": round(wall, 1),
              "busy_steady": round(busy, 3), "decode_on_cpu_node_only": nodes == [cpu_node.node_id],
              "gpu_node_decoded": gpu_node.node_id in nodes}
    print(f"stand-in accelerator busy {busy:.3f} of the steady phase ({result['rows']} rows, {len(calls)} calls, "
          f"{wall:.1f} s); decode on the CPU-only node only: {result['decode_on_cpu_node_only']}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
