"""Shared fixtures: a tiny generated image set, and one local Ray for the whole session (marker ``ray``); tests marked
``gpu`` skip where there is no CUDA GPU."""

import logging
import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # Ray Data's progress lines: noise in test logs
logging.getLogger("ray.data").setLevel(logging.WARNING)

# Small and fast: resnet18 at 64 x 64 on a few dozen 96-pixel images.
SMALL = dict(backbone="resnet18", image_size=(64, 64), n_pca_components=4, max_training_points=40_000, seed=0)


def pytest_runtest_setup(item):
    """A test marked ``gpu`` is skipped, with the reason, on a machine without a CUDA GPU."""
    if item.get_closest_marker("gpu") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU (marker gpu): torch.cuda.is_available() is False here")


@pytest.fixture(scope="session")
def demo_set(tmp_path_factory):
    from rayanom.demo import make_demo

    root = tmp_path_factory.mktemp("demo")
    index = make_demo(str(root), n_train=24, n_test_normal=6, n_test_anomalous=6, size=96, seed=1)
    return {"root": str(root), "index": index, "test": os.path.join(str(root), "test.parquet")}


@pytest.fixture(scope="session")
def ray_local():
    import ray

    # 4 logical CPUs on 2 cores: actors (1 CPU each, at most 2) always leave room for the index tasks (an actor holds
    # its CPU for the whole run, so actors on every CPU leave a task none and the dataset hangs).
    # Every test has a timeout (pyproject.toml), so a deadlock fails its test instead of hanging CI.
    # address="local": a Ray of its own, never one that another process started on this machine with `ray start`.
    ray.init(address="local", num_cpus=4, num_gpus=0, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    yield ray
    ray.shutdown()


def index_at(path, table):
    """Write ``table`` as a parquet index at ``path`` and describe it (``rayanom.index.describe_index``)."""
    import pyarrow.parquet as pq

    from rayanom.index import describe_index

    pq.write_table(table, str(path))
    return describe_index(str(path))


def free_ports(n):
    """``n`` TCP ports free on loopback now (for a private Ray head)."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def kill_ray_of(temp_dir: str) -> None:
    """Stop a private Ray head (and the nodes it started) without ``ray stop``, which kills every Ray on the machine,
    this test session's own included: SIGKILL every process whose command line names its temp dir (the raylets,
    GCS, dashboard, autoscaler); their workers exit with their raylet."""
    import signal

    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmd:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
