"""Autoscaling clusters: a pool that no node can hold, and a whole job on Ray's own autoscaler with simulated nodes.

The simulated cluster is Ray's ``fake_multinode`` node provider (what ``ray.cluster_utils.AutoscalingCluster`` uses),
started by hand: that class reads an ``example.yaml`` the wheel lacks, and its start and shutdown run
``ray stop --force``, which kills every Ray on the machine (the suite's own included). Here the head gets a private
temp dir and free ports, and is stopped by killing only the processes of that temp dir (``conftest.kill_ray_of``).
"""

import os
import subprocess
import sys
import tempfile
import time

import pytest
import yaml
from conftest import free_ports, kill_ray_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.ray
def test_a_pool_that_no_node_can_hold_ends_with_a_clear_error(ray_local):
    """No actor can start (the local Ray has 4 CPUs, the actors ask for 64 each): after the timeout an error names
    what the cluster has, instead of a silent wait."""
    import test_reliability
    from ray import cloudpickle
    from test_reliability import Stuck, one_row_unit

    from rayanom.config import UserError
    from rayanom.storage import ReadPolicy
    from rayanom.plane import Plan, run

    cloudpickle.register_pickle_by_value(test_reliability)  # workers cannot import a test module by name
    decode = {"rows_of": one_row_unit, "batch_size": 1, "image_size": (8, 8), "policy": ReadPolicy()}
    plan = Plan(num_actors=2, batches_per_call=1, num_cpus=64, num_gpus=0, memory=2**28, no_progress_s=60, start_timeout_s=2)
    with pytest.raises(UserError, match=r"no Stuck actor \(64 CPU, 0 GPU\) could start in 2 s of waiting: the "
                                        r"cluster has no room for one \(4 CPUs and 0 GPUs up now; "):
        list(run([{"part": 0}], decode, Stuck, {"seconds": 0.0}, plan, progress=False))


@pytest.fixture
def autoscaling_head():
    """A head with no CPUs for tasks and a GPU worker type starting at zero nodes (2 CPUs and 1 simulated GPU each, at
    most 2), run by Ray's autoscaler with the fake_multinode provider."""
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    gcs, dashboard, agent, metrics, client = free_ports(5)
    temp = tempfile.mkdtemp(prefix="ras", dir="/tmp")  # short: Ray's unix socket paths are length-limited
    config = {
        "cluster_name": "rayanom-test", "max_workers": 2, "upscaling_speed": 2.0, "idle_timeout_minutes": 5,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{gcs}"},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "gpu_worker": {"resources": {"CPU": 2, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2}},
        "head_node_type": "ray.head.default",
        **{k: [] for k in ("cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands",
                           "setup_commands", "head_setup_commands", "worker_setup_commands",
                           "head_start_ray_commands", "worker_start_ray_commands")},
        "file_mounts": {}, "file_mounts_sync_continuously": False}
    path = os.path.join(temp, "autoscaler.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    env.pop("RAY_ADDRESS", None)
    start = [ray_cli, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true",
             "--dashboard-agent-listen-port", str(agent), "--metrics-export-port", str(metrics),
             "--ray-client-server-port", str(client), "--num-cpus", "0", "--num-gpus", "0", "--temp-dir", temp,
             "--disable-usage-stats", f"--autoscaling-config={path}"]
    try:
        proc = subprocess.run(start, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        yield {"address": f"http://127.0.0.1:{dashboard}", "gcs": f"127.0.0.1:{gcs}", "env": env, "ray": ray_cli,
               "config": path}
    finally:
        kill_ray_of(temp)
        time.sleep(1)
        import shutil

        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.timeout(420)
def test_fit_and_score_scale_up_a_cluster_from_zero_gpu_nodes(autoscaling_head, demo_set, tmp_path):
    """`jobs/fit.py --score` with `--device auto` on a cluster with no GPU up: the job reads the node types, asks
    for GPU actors, the autoscaler starts the nodes, the actors land on them and every row comes back. Its local
    --out is refused there first (the cluster can add nodes, each with its own disk), then accepted with
    --shared-path (the simulated nodes share this machine's disk)."""
    out = str(tmp_path / "run")
    env = {**autoscaling_head["env"], "RAY_ADDRESS": autoscaling_head["gcs"],
           "RAYANOM_CLUSTER_CONFIG": autoscaling_head["config"]}
    refused = subprocess.run([sys.executable, os.path.join(REPO, "jobs", "fit.py"), "--model", "dfkde", "--index",
                              demo_set["index"], "--out", out, "--backbone", "resnet18", "--no-pretrained", "--quiet"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert refused.returncode == 2, refused.stderr[-3000:]
    error = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert error == [f"error: invalid --out={out!r}: a local path on a cluster of more than one node (1 up now, its "
                     "autoscaler can add more), where each node would write to its own disk: use a URI every node "
                     "reaches (s3://bucket/..., gs://bucket/...), or a filesystem every node mounts at the same place "
                     "(NFS, EFS) with --shared-path"], refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr and not os.path.exists(out)  # before any work
    runtime_env = ('{"env_vars": {"RAYANOM_FAKE_GPUS": "1", "RAYANOM_CLUSTER_CONFIG": "%s"}}'
                   % autoscaling_head["config"])
    # No --working-dir here (test_cluster.py's job test covers it): the simulated nodes share this machine's disk and
    # the head's temp dir, so one node's runtime-env agent deleting its copy of the package deletes the others' too
    # (seen as a FileNotFoundError for the current directory). The job runs from the repository as installed.
    submit = [autoscaling_head["ray"], "job", "submit", "--address", autoscaling_head["address"],
              "--runtime-env-json", runtime_env, "--",
              sys.executable, os.path.join(REPO, "jobs", "fit.py"), "--model", "dfkde", "--index", demo_set["index"],
              "--out", out, "--shared-path",
              "--score", demo_set["test"], "--backbone", "resnet18", "--image-size", "64", "--n-pca-components", "4",
              "--no-pretrained", "--batch-size", "8", "--rows-per-part", "4", "--precision", "fp32",
              "--wait-for-actors", "240"]
    t0 = time.time()
    proc = subprocess.run(submit, env=autoscaling_head["env"], capture_output=True, text=True, timeout=400)
    log = proc.stdout + proc.stderr
    print(f"job on the autoscaling cluster: {time.time() - t0:.0f} s")
    print("\n".join(line for line in log.splitlines() if "actors" in line or "device" in line))
    assert proc.returncode == 0 and "succeeded" in log, log[-4000:]
    assert "scored 12 of 12 rows, 0 failed" in log
    assert "device cuda (no GPU up now; the autoscaler's node types can add 2" in log
    assert "RAYANOM_FAKE_GPUS=1: GPUs asked for, model on CPU" in log
    # The head has no CPU and no GPU: every actor that ran, ran on a node the autoscaler started (one or both of the
    # two it may start, depending on how soon the second node comes up for so small a job).
    import re

    for stage in ("fit pass", "score"):
        assert re.search(stage + r": \d+ rows in .* model [\d.]+ rows/s per actor on [12] node\(s\)", log), log[-4000:]
    import pyarrow.parquet as pq

    scores = pq.read_table(os.path.join(out, "scores"))
    assert sorted(scores.column("row_index").to_pylist()) == list(range(12))
