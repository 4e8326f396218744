"""Cluster and ecosystem: the cluster files against Ray's own validation, a real `ray job submit` to a local head, and
object storage through a real S3 API (moto's server) on loopback."""

import copy
import json
import os
import re
import shlex
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


# --- the cluster files: Ray's own offline checks, and what each file promises ---------------------------------------

def _constraints() -> dict[str, str]:
    """constraints.txt's pins, name -> version."""
    with open(os.path.join(REPO, "constraints.txt")) as f:
        pins = [line.split("#")[0].strip() for line in f]
    return dict(pin.split("==") for pin in pins if pin)


TEST_ONLY = {"pytest", "pytest-timeout", "moto"}  # pins of constraints.txt that the cluster's image needs not have


def _ray_checked(name: str) -> dict:
    """The cluster file ``name`` as `ray up` has it before it touches the cloud: checked against Ray's schema, merged
    with the provider's defaults and checked again with the semantic checks (``prepare_config``, ``validate_config``).
    """
    with open(os.path.join(REPO, name)) as f:
        config = yaml.safe_load(f)
    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        schema = json.load(f)
    jsonschema.validate(config, schema)
    full = prepare_config(copy.deepcopy(config))
    validate_config(full)
    return full


def _check_node_types(full: dict, image_of, is_spot) -> None:
    """What both cluster files promise: every node type names its machine image (``image_of(node_config)``, else the
    provider's default, too old for the pinned torch, would be used); a head that takes no task or actor; a CPU-only
    worker type; two GPU types, spot (``is_spot(node_config)``) tried first and on-demand; the worker types' maxima
    add up to the cluster's; nothing installed at boot (the image has it); token authentication on every node."""
    types = full["available_node_types"]
    unnamed = [name for name, t in types.items() if not image_of(t["node_config"])]
    assert not unnamed, f"node types without an image: {unnamed}"
    assert types[full["head_node_type"]]["resources"] == {"CPU": 0}
    workers = {name: t for name, t in types.items() if name != full["head_node_type"]}
    assert any(t["resources"].get("CPU") and not t["resources"].get("GPU") for t in workers.values())
    gpu = sorted((t for t in workers.values() if t["resources"].get("GPU")), key=lambda t: -t.get("priority", 0))
    assert [is_spot(t["node_config"]) for t in gpu] == [True, False]
    assert gpu[0]["priority"] > gpu[1].get("priority", 0)
    assert sum(t["max_workers"] for t in workers.values()) == full["max_workers"]
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert not any("pip " in command for command in full[key]), (key, full[key])
    token = [m for m in full["file_mounts"] if m.endswith("/auth_token")]
    options = full["docker"]["run_options"]
    assert "--env RAY_AUTH_MODE=token" in options and len(token) == 1
    assert f"--env RAY_AUTH_TOKEN_PATH={token[0].replace('~/', '/home/ray/')}" in options  # the image's $HOME


def _most_resources(name: str) -> dict:
    """The resources the job's --device auto reads on the head from the cluster file ``name``."""
    from rayanom.pool import autoscaler_max_resources

    os.environ["RAYANOM_CLUSTER_CONFIG"] = os.path.join(REPO, name)
    try:
        return autoscaler_max_resources()
    finally:
        del os.environ["RAYANOM_CLUSTER_CONFIG"]


def test_cluster_yaml_is_valid_for_ray_up():
    """AWS: Ray's checks, the node types' promises, the instance profiles and their policies, the device choice."""
    from rayanom.pool import choose_device

    full = _ray_checked("cluster.yaml")
    dlami = "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"

    def image_of(node_config):
        return node_config.get("ImageId") == dlami

    def is_spot(node_config):
        return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"

    _check_node_types(full, image_of, is_spot)
    for name in ("gpu_on_demand", "cpu_worker", "head"):  # the check fails where a node type names no image
        bad = copy.deepcopy(full)
        del bad["available_node_types"][name]["node_config"]["ImageId"]
        with pytest.raises(AssertionError, match=f"without an image: \\['{name}'\\]"):
            _check_node_types(bad, image_of, is_spot)
    # S3 (and the ECR pull) through instance profiles: the head's may launch the workers, the workers' may not.
    profiles = {name: t["node_config"]["IamInstanceProfile"]["Arn"] for name, t in full["available_node_types"].items()}
    assert all(arn.startswith("arn:aws:iam::<ACCOUNT>:instance-profile/rayanom-") for arn in profiles.values())
    assert {arn for name, arn in profiles.items() if name != "head"} == {profiles["head"].replace("-head", "-worker")}
    with open(os.path.join(REPO, "cluster-iam-policy.json")) as f:
        actions = {a for s in json.load(f)["Statement"] for a in s["Action"]}
    assert {"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket", "ecr:GetAuthorizationToken",
            "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"} <= actions
    with open(os.path.join(REPO, "cluster-iam-head-policy.json")) as f:
        head = {a: s.get("Resource") for s in json.load(f)["Statement"] for a in s["Action"]}
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:CreateTags", "ssm:GetParameters"} <= set(head)
    assert head["iam:PassRole"].endswith(":role/rayanom-worker")
    assert any(c.startswith("aws ecr get-login-password") for c in full["initialization_commands"])
    # What --device auto reads on the head (the file ray up copies there): 8 GPU nodes' worth, so it chooses cuda.
    most = _most_resources("cluster.yaml")
    assert most == {"CPU": 128.0, "GPU": 8.0} and choose_device("auto", 0, most["GPU"])[0] == "cuda"


def test_cluster_gcp_yaml_is_valid_for_ray_up():
    """GCP: Ray's checks, the node types' promises, each GPU VM's accelerator, driver and maintenance policy."""
    full = _ray_checked("cluster-gcp.yaml")
    assert full["provider"]["type"] == "gcp"

    def image_of(node_config):
        boot = [d for d in node_config.get("disks", []) if d.get("boot")]
        return len(boot) == 1 and boot[0]["initializeParams"]["sourceImage"].startswith(
            "projects/deeplearning-platform-release/global/images/family/")

    def is_spot(node_config):
        return node_config.get("scheduling", {}).get("provisioningModel") == "SPOT"

    _check_node_types(full, image_of, is_spot)
    bad = copy.deepcopy(full)
    bad["available_node_types"]["gpu_spot"]["node_config"]["disks"] = []
    with pytest.raises(AssertionError, match="without an image: \\['gpu_spot'\\]"):
        _check_node_types(bad, image_of, is_spot)
    for t in full["available_node_types"].values():
        config = t["node_config"]
        if t["resources"].get("GPU"):  # a GPU VM: its accelerator, its driver, and no live migration
            assert [a["acceleratorCount"] for a in config["guestAccelerators"]] == [t["resources"]["GPU"]]
            assert {"key": "install-nvidia-driver", "value": "True"} in config.get("metadata", {}).get("items", [])
            assert config.get("scheduling", {}).get("onHostMaintenance") == "TERMINATE"
        else:
            assert "guestAccelerators" not in config
    assert _most_resources("cluster-gcp.yaml") == {"CPU": 128.0, "GPU": 8.0}


def _image_names() -> dict[str, str]:
    """The image each cluster file and the KubeRay manifest run: file -> image."""
    names = {name: _ray_checked(name)["docker"]["image"] for name in ("cluster.yaml", "cluster-gcp.yaml")}
    with open(os.path.join(REPO, "k8s", "rayjob.yaml")) as f:
        cluster = yaml.safe_load(f)["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    images = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1, images
    return {**names, "k8s/rayjob.yaml": images.pop()}


def test_dockerfile_pins_equal_constraints():
    """The image the cluster files run: FROM the Ray of constraints.txt, the project's dependencies installed under
    constraints.txt (torch and torchvision spelled out), the default backbones' pretrained weights in HF_HOME, and its
    name the same in every file that runs it, tagged with the project's version."""
    import tomllib

    from rayanom.config import DfkdeConfig, DfmConfig

    pins = _constraints()
    with open(os.path.join(REPO, "Dockerfile")) as f:
        text = f.read()
    lines = text.replace("\\\n", " ").splitlines()  # continuation lines joined
    base = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert base == [f"rayproject/ray:{pins['ray']}-py311-gpu"], base
    install = [line.split() for line in lines if line.startswith("RUN pip install ")]
    assert len(install) == 1 and "COPY constraints.txt /tmp/constraints.txt" in lines
    words = install[0][:install[0].index("&&")] if "&&" in install[0] else install[0]
    assert "-c" in words and words[words.index("-c") + 1] == "/tmp/constraints.txt"  # every version as pinned
    packages = [w.strip('"') for w in words[3:] if not w.startswith("-") and w != "/tmp/constraints.txt"]
    installed = {re.split(r"\[|==", p)[0]: p for p in packages}
    assert installed["torch"] == f"torch=={pins['torch']}"
    assert installed["torchvision"] == f"torchvision=={pins['torchvision']}"
    assert installed["ray"].endswith(f"=={pins['ray']}")
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    needed = {re.split(r"[\[=<>]", d)[0] for d in project["dependencies"]} | (set(pins) - TEST_ONLY)
    assert needed <= set(installed), needed - set(installed)
    assert "ENV HF_HOME=/opt/hf-cache" in " ".join(lines)
    backbones = [line for line in lines if line.startswith("ARG BACKBONES=")]
    assert len(backbones) == 1 and {DfkdeConfig().backbone, DfmConfig().backbone} <= set(
        backbones[0].split("=", 1)[1].strip('"').split())
    assert "timm.create_model(name, pretrained=True)" in text and "$BACKBONES" in text
    names = _image_names()
    assert names["cluster.yaml"] == names["k8s/rayjob.yaml"] == "<ACCOUNT>.dkr.ecr.<REGION>.amazonaws.com/rayanom:0.1.0"
    assert {n.rsplit("/", 1)[1] for n in names.values()} == {f"rayanom:{project['version']}"}, names


def test_k8s_rayjob_runs_fit_on_the_same_image():
    """The KubeRay example: a RayJob of this Ray, a CPU head that takes no task or actor, a CPU and a GPU worker group,
    the fit job's flags as fit.py parses them, its code and its outputs in the bucket."""
    from rayanom.pool import choose_device
    from rayanom_jobs import fit

    with open(os.path.join(REPO, "k8s", "rayjob.yaml")) as f:
        docs = list(yaml.safe_load_all(f))
    assert [(d["apiVersion"], d["kind"]) for d in docs] == [("ray.io/v1", "RayJob")]
    spec = docs[0]["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == _constraints()["ray"] and cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpus = {}
    for group in cluster["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        gpus[group["groupName"]] = group["maxReplicas"] * int(limits.get("nvidia.com/gpu", 0))
        assert float(limits["cpu"]) > 1
    assert sorted(gpus.values())[0] == 0 and sorted(gpus.values())[-1] > 0 and len(gpus) == 2  # a CPU and a GPU group
    assert choose_device("auto", 0, sum(gpus.values()))[0] == "cuda"  # what the job reads from KubeRay's record
    names = _image_names()  # one image in every pod: the one cluster.yaml runs
    assert names["k8s/rayjob.yaml"] == names["cluster.yaml"]
    args = shlex.split(spec["entrypoint"])
    assert args[:2] == ["python", "jobs/fit.py"]
    parsed = fit.get_args_parser().parse_args(args[2:])
    assert parsed.model == "dfkde" and parsed.index.startswith("s3://") and parsed.out.startswith("s3://")
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"].startswith("s3://")


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
    # Ray Data's pools pass their context by reference: Ray logs that once per job process, never per actor.
    assert (proc.stdout + proc.stderr).count("constructor arguments in the object store") <= 1
    artifact = Artifact.load(os.path.join(out, "model"))
    assert artifact.provenance["n_train_rows"] == 24
    # --precision auto, resolved by a probe task on a worker: bf16 only where it measured fast, the ratio recorded.
    from rayanom.features import BF16_MIN_SPEEDUP

    run = artifact.provenance["run"]
    assert run["bf16_speedup"] > 0 and run["precision"] == ("bf16" if run["bf16_speedup"] >= BF16_MIN_SPEEDUP else "fp32")
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
    from rayanom.storage import bucket_filesystem

    bucket_filesystem.cache_clear()  # this process's filesystems for the bucket: made for another server's port
    try:
        yield {"bucket": "s3://rayanom-test", "env": env}
    finally:
        server.stop()
        bucket_filesystem.cache_clear()


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_fit_and_score_on_s3(s3, demo_set):
    from rayanom.artifact import Artifact
    from rayanom.storage import resolve_filesystem

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
    from rayanom.storage import resolve_filesystem

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
