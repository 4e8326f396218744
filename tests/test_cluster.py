"""Cluster and ecosystem: cluster.yaml against Ray's own validation, a real `ray job submit` to a local head, and
object storage through a real S3 API (moto's server) on loopback."""

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile

import jsonschema
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray.autoscaler
import yaml
from conftest import free_ports, kill_ray_of
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cluster_yaml_is_valid_for_ray_up():
    with open(os.path.join(REPO, "cluster.yaml")) as f:
        config = yaml.safe_load(f)
    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        schema = json.load(f)
    jsonschema.validate(config, schema)
    full = prepare_config(copy.deepcopy(config))
    validate_config(full)
    assert full["available_node_types"]["gpu_worker"]["max_workers"] == 8
    # What --device auto reads on the head (the file ray up copies there): 8 GPU nodes' worth, so it chooses cuda.
    from rayanom.pool import autoscaler_max_resources, choose_device

    os.environ["RAYANOM_CLUSTER_CONFIG"] = os.path.join(REPO, "cluster.yaml")
    try:
        most = autoscaler_max_resources()
    finally:
        del os.environ["RAYANOM_CLUSTER_CONFIG"]
    assert most == {"CPU": 64.0, "GPU": 8.0} and choose_device("auto", 0, most["GPU"])[0] == "cuda"
    pins = " ".join(config["setup_commands"])
    with open(os.path.join(REPO, "constraints.txt")) as f:
        for line in f:
            name = line.split("#")[0].strip()
            if name and not name.startswith(("pytest", "scipy", "moto")):  # test-only pins
                assert name.split("==")[0] in pins and name.split("==")[1] in pins, name


# --- a real `ray job submit` against a real local head -------------------------------------------------------------

SMALL_FLAGS = ["--backbone", "resnet18", "--image-size", "64", "--n-pca-components", "4", "--no-pretrained",
               "--batch-size", "8", "--quiet"]


@pytest.fixture
def ray_head():
    """`ray start --head` on free loopback ports, in its own temp dir; stopped even when the test fails."""
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    gcs, dashboard, agent, metrics, client = free_ports(5)
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's unix socket paths are length-limited
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    start = [ray_cli, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true",
             "--dashboard-agent-listen-port", str(agent), "--metrics-export-port", str(metrics),
             "--ray-client-server-port", str(client), "--num-cpus", "4", "--num-gpus", "0", "--temp-dir", temp,
             "--disable-usage-stats"]
    try:
        proc = subprocess.run(start, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        yield {"address": f"http://127.0.0.1:{dashboard}", "env": env, "ray": ray_cli}
    finally:
        kill_ray_of(temp)  # never `ray stop`: it would kill this session's own Ray too
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_ray_job_submit_fit_with_score(ray_head, demo_set, tmp_path):
    from rayanom.artifact import Artifact

    out = str(tmp_path / "run")
    env = {**ray_head["env"], "RAY_ADDRESS": ray_head["address"]}
    submit = [ray_head["ray"], "job", "submit", "--working-dir", REPO, "--",
              sys.executable, "jobs/fit.py", "--model", "dfkde", "--index", demo_set["index"], "--out", out,
              "--score", demo_set["test"], *SMALL_FLAGS]
    proc = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0 and "succeeded" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-4000:]
    assert "scored 12 of 12 rows, 0 failed" in proc.stdout
    assert "constructor arguments in the object store" not in proc.stdout + proc.stderr  # actors restart anywhere
    artifact = Artifact.load(os.path.join(out, "model"))
    assert artifact.provenance["n_train_rows"] == 24
    # --precision auto, resolved by a probe task on a worker: bf16 only where it is fast (this CPU has AMX or not).
    from rayanom.features import bf16_is_fast

    assert artifact.provenance["run"]["precision"] == ("bf16" if bf16_is_fast("cpu") else "fp32")
    scores = pq.read_table(os.path.join(out, "scores"))
    assert sorted(scores.column("row_index").to_pylist()) == list(range(12))


# --- object storage: a real S3 API (moto's server) on loopback -------------------------------------------------------

@pytest.fixture
def s3(monkeypatch):
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3").create_bucket(Bucket="rayanom-test")
    from rayanom.data import _bucket_filesystem

    _bucket_filesystem.cache_clear()  # this process's filesystems for the bucket: made for another server's port
    try:
        yield {"bucket": "s3://rayanom-test", "env": env}
    finally:
        server.stop()
        _bucket_filesystem.cache_clear()


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_fit_and_score_on_s3(s3, demo_set):
    from rayanom.artifact import Artifact
    from rayanom.data import resolve_filesystem

    fs, _ = resolve_filesystem(s3["bucket"] + "/x")
    bucket = s3["bucket"]
    table = pq.read_table(demo_set["index"])
    uris = []
    for path in table.column("path").to_pylist():
        uri = f"{bucket}/images/{os.path.basename(path)}"
        with fs.open_output_stream(uri[len("s3://"):]) as f:
            f.write(open(path, "rb").read())
        uris.append(uri)
    table = table.set_column(0, "path", pa.array(uris))
    for name, t in (("index", table), ("test", table.filter(pc.equal(table.column("split"), "test")))):
        with fs.open_output_stream(f"rayanom-test/{name}.parquet") as f:
            pq.write_table(t, f)
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **s3["env"]}
    fit = subprocess.run([sys.executable, "jobs/fit.py", "--model", "dfkde", "--index", f"{bucket}/index.parquet",
                          "--out", f"{bucket}/run", "--score", f"{bucket}/test.parquet", *SMALL_FLAGS],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert fit.returncode == 0, fit.stderr[-4000:]
    assert "scored 12 of 12 rows, 0 failed" in fit.stdout
    artifact = Artifact.load(f"{bucket}/run/model")
    assert artifact.provenance["n_train_rows"] == 24
    info = fs.get_file_info(pafs.FileSelector("rayanom-test/run/scores"))
    scores = pq.read_table("rayanom-test/run/scores", filesystem=fs)
    assert len(info) >= 1 and scores.num_rows == 12
    assert all(p.startswith("s3://rayanom-test/images/") for p in scores.column("path").to_pylist())

    # The same job with 85 % of the image requests (HEAD and GET) answered 503 SlowDown or 500 InternalError by a
    # proxy in front of the S3 server: the SDK's retries and ours lose no row, and the numbers are the same.
    from faulty_proxy import FaultyProxy

    with FaultyProxy(s3["env"]["AWS_ENDPOINT_URL"], rate=0.85, seed=1) as proxy:
        faulty = subprocess.run([sys.executable, "jobs/fit.py", "--model", "dfkde", "--index",
                                 f"{bucket}/index.parquet", "--out", f"{bucket}/run-faulty", "--score",
                                 f"{bucket}/test.parquet", *SMALL_FLAGS], cwd=REPO,
                                env={**env, "AWS_ENDPOINT_URL": proxy.url}, capture_output=True, text=True,
                                timeout=540)
    assert faulty.returncode == 0, faulty.stderr[-4000:]
    print(f"faulty S3: {proxy.faults} image requests failed, {proxy.passed} passed")
    assert proxy.faults > 50 and proxy.faults / (proxy.faults + proxy.passed) > 0.75, (proxy.faults, proxy.passed)
    assert "scored 12 of 12 rows, 0 failed" in faulty.stdout, faulty.stdout
    again = Artifact.load(f"{bucket}/run-faulty/model")
    assert again.provenance["n_failed_rows"] == 0
    a, b = artifact.head.to_arrays(), again.head.to_arrays()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    rescored = pq.read_table("rayanom-test/run-faulty/scores", filesystem=fs).sort_by("row_index")
    assert rescored.column("anomaly_score").equals(scores.sort_by("row_index").column("anomaly_score"))


def test_lease_on_s3_is_created_with_a_conditional_write(s3):
    """S3's If-None-Match: * write: the second writer of the lease key loses, whatever the timing; a second job is
    refused naming the first."""
    from rayanom import parts
    from rayanom.config import UserError
    from rayanom.data import resolve_filesystem

    fs, path = resolve_filesystem(s3["bucket"] + "/race/key.json")
    assert parts.s3_put_if_absent(fs, path, b"first") is True
    assert parts.s3_put_if_absent(fs, path, b"second") is False
    with fs.open_input_file(path) as f:
        assert f.read() == b"first"
    out = s3["bucket"] + "/scores"
    first = parts.Lease(out, "job-a")
    first.acquire()
    try:
        with pytest.raises(UserError, match=r"being written by another job \(job-a on "):
            parts.Lease(out, "job-b").acquire()
    finally:
        first.release()
    assert fs.get_file_info(f"rayanom-test/scores/{parts.LEASE}").type == pafs.FileType.NotFound
