"""Run by tests/test_reliability.py in its own process: fit and score on a multi-node Ray (several raylets on one
machine, Ray's own test-cluster utilities), removing a worker node mid-job. Arguments: demo index, demo test index,
output directory."""

import logging
import os
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.cluster_utils import Cluster

demo_index, demo_test, out_dir = sys.argv[1:4]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
# 3 CPUs a worker: after the loss both scoring actors (1 CPU each) may restart on the surviving node, and a footer
# task (0.5 CPU) must still fit beside them there (an actor holds its CPU for the whole run, so actors on every CPU
# leave a task none and the dataset hangs).
workers = [cluster.add_node(num_cpus=3) for _ in range(2)]
ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
from rayanom import workflows
from rayanom.config import DfkdeConfig, RunConfig
from rayanom.index import describe_index
from rayanom.features import resolve_weights
config = DfkdeConfig(backbone="resnet18", image_size=(64, 64), n_pca_components=4)
_, source = resolve_weights(config, None, False)
artifact = workflows.fit(describe_index(demo_index), config, source, RunConfig(batch_size=8)).artifact
pq.write_table(pa.concat_tables([pq.read_table(demo_test)] * 12), out_dir + "/long.parquet")
from rayanom.index import describe_index
index = describe_index(out_dir + "/long.parquet")
run = RunConfig(batch_size=2, rows_per_part=4, num_actors=2, no_progress_s=180)
workflows.score(index, artifact, out_dir + "/ref", run)
out = out_dir + "/scores"
removed = []
def remove_when_started():
    """Once two parts are written, remove a worker node that holds a scoring actor (found by Ray's state API)."""
    from ray.util.state import list_actors

    deadline = time.time() + 120
    while time.time() < deadline:
        if os.path.isdir(out) and sum(n.startswith("part-") for n in os.listdir(out)) >= 2:
            alive = list_actors(filters=[("state", "=", "ALIVE")])
            held = {a.node_id for a in alive if "ScoreBatches" in a.class_name}  # Ray Data's MapWorker(...) actors
            victim = next((w for w in workers if w.node_id in held), None)
            if victim is not None:
                cluster.remove_node(victim)
                removed.append(time.time())
                return
        time.sleep(0.05)
t = threading.Thread(target=remove_when_started); t.start()
t0 = time.time()
summary = workflows.score(index, artifact, out, run)
t.join()
print("REMOVED", bool(removed), "ROWS", summary["rows"], "FAILED", summary["failed"], "TIME", round(time.time() - t0, 1))
ray.shutdown(); cluster.shutdown()
