"""Run by tests/test_plane.py in its own process: fit and score on a simulated multi-node Ray (several raylets on one
machine, Ray's own test-cluster utilities) and print where each stage ran. Arguments: kind (``gpu``: a CPU-less head,
two simulated GPU nodes with 1 CPU each and a CPU-only node with 2; ``cpu``: a CPU-less head and three 2-CPU nodes),
demo index, demo test index, output directory."""

import json
import logging
import os
import sys

from ray.cluster_utils import Cluster

kind, demo_index, demo_test, out_dir = sys.argv[1:5]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
if kind == "gpu":
    nodes = {"gpu": [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)], "cpu": [cluster.add_node(num_cpus=2)]}
else:
    nodes = {"cpu": [cluster.add_node(num_cpus=2) for _ in range(3)]}
cluster.wait_for_nodes()
os.environ["RAY_ADDRESS"] = cluster.address  # as `ray job submit` sets it: launch.start_ray joins the cluster
os.environ["RAYANOM_FAKE_GPUS"] = "1"  # the simulated GPUs are asked for; the model runs on the CPU
logging.basicConfig(level=logging.INFO, stream=sys.stderr)

from rayanom import workflows  # noqa: E402
from rayanom.config import DfkdeConfig  # noqa: E402
from rayanom.features import resolve_weights  # noqa: E402
from rayanom.index import describe_index  # noqa: E402
from rayanom.launch import start_ray  # noqa: E402

config = DfkdeConfig(backbone="resnet18", image_size=(64, 64), n_pca_components=4)
run = start_ray(config, precision="fp32", batch_size=2, rows_per_part=4, no_progress_s=240, progress=False)
_, source = resolve_weights(config, None, False)
artifact = workflows.fit(describe_index(demo_index), config, source, run).artifact
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

pq.write_table(pa.concat_tables([pq.read_table(demo_test)] * 6), out_dir + "/long.parquet")  # 36 batches
summary = workflows.score(describe_index(out_dir + "/long.parquet"), artifact, out_dir + "/scores", run)
killed = []
if kind == "gpu":  # decode runs as tasks here: score again, killing a decode task mid-job (SIGKILL)
    import signal  # noqa: E402
    import threading  # noqa: E402
    import time  # noqa: E402

    def kill_a_decode_task() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            procs = {}
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    procs[int(pid)] = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
                except OSError:
                    continue
            decoding = [pid for pid, cmd in procs.items() if "decode_units" in cmd and "MapWorker" not in cmd]
            if decoding:
                os.kill(decoding[0], signal.SIGKILL)
                killed.append(decoding[0])
                return
            time.sleep(0.02)

    threading.Thread(target=kill_a_decode_task, daemon=True).start()
    again = workflows.score(describe_index(out_dir + "/long.parquet"), artifact, out_dir + "/again", run)
    same = pq.read_table(out_dir + "/again").sort_by("row_index").equals(
        pq.read_table(out_dir + "/scores").sort_by("row_index"))
    killed.append(f"rows {again['rows']} failed {again['failed']} same {same}")
kinds = {n.node_id: k for k, ns in nodes.items() for n in ns}
where = {stage: sorted({kinds.get(node, "head") for node in rows}) for stage, rows in summary["nodes"].items()}
rows_on = {stage: {k: sum(n for node, n in rows.items() if kinds.get(node, "head") == k) for k in sorted(nodes)}
           for stage, rows in summary["nodes"].items()}
print("RESULT " + json.dumps({"rows": summary["rows"], "failed": summary["failed"], "actors": run.num_actors,
                              "killed": [str(k) for k in killed],
                              "cpus_per_actor": run.num_cpus_per_actor, "where": where, "rows_on": rows_on,
                              "model_nodes": len(summary["nodes"]["model"])}))
import ray  # noqa: E402

ray.shutdown()  # the driver first: a cluster refuses to remove the node its driver is connected to
cluster.shutdown()
