"""How a job starts: a local output path refused on a cluster of several nodes, and what ``start_ray`` refuses before
Ray starts."""

import pytest

from rayanom.config import DfkdeConfig, RkdeConfig, UserError
from rayanom.launch import start_ray


@pytest.fixture
def cluster(monkeypatch):
    """A connected cluster as ``check_output_location`` sees it: set ``nodes`` (alive), ``now`` (resources up) and
    ``most`` (the autoscaler's node types, None: unknown)."""
    import ray

    import rayanom.pool

    state = {"nodes": 1, "now": {"CPU": 4.0}, "most": None}
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}] * state["nodes"] + [{"Alive": False}])
    monkeypatch.setattr(ray, "cluster_resources", lambda: state["now"])
    monkeypatch.setattr(rayanom.pool, "autoscaler_max_resources", lambda: state["most"])
    return state


def test_local_output_is_refused_on_a_cluster_of_several_nodes(cluster, monkeypatch):
    from rayanom.config import UserError
    from rayanom.launch import check_output_location

    check_output_location({"--out": "runs/r1"})  # one node (a dead one is not counted), no autoscaler
    cluster["most"] = {"CPU": 4.0}
    check_output_location({"--out": "runs/r1"})  # node types that add nothing beyond what is up
    cluster["nodes"] = 2
    refused = (r"invalid --out='runs/r1': a local path on a cluster of more than one node \(2 up now\), .* "
               r"\(s3://bucket/\.\.\., gs://bucket/\.\.\.\), .*--shared-path")
    with pytest.raises(UserError, match=refused):
        check_output_location({"--out": "runs/r1", "--model-dir": "s3://b/m"})
    cluster["nodes"], cluster["most"] = 1, {"CPU": 8.0, "GPU": 2.0}
    with pytest.raises(UserError, match=r"invalid --out='file:///x', --model-dir='/m': .* \(1 up now, its "
                                        r"autoscaler can add more\)"):
        check_output_location({"--out": "file:///x", "--model-dir": "/m"})
    check_output_location({"--out": "/mnt/nfs/r1", "--model-dir": "/mnt/nfs/m"}, shared=True)  # --shared-path
    check_output_location({"--out": "s3://bucket/r1", "--model-dir": "gs://bucket/m"})
    check_output_location({"--out": "runs/r1", "--model-dir": None}, shared=True)
    monkeypatch.delenv("RAY_ADDRESS")
    check_output_location({"--out": "runs/r1"})  # an embedded local Ray: one machine


def test_start_ray_refuses_bad_values_before_ray_starts(monkeypatch):
    """bf16 for a model whose feature stage runs in fp32 only, and a bad run value: refused before ``ray.init``."""
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    with pytest.raises(UserError, match=r"invalid precision='bf16' for rkde: its feature stage runs in fp32 only"):
        start_ray(RkdeConfig(), precision="bf16")
    with pytest.raises(UserError, match=r"invalid batch_size=0"):
        start_ray(DfkdeConfig(), batch_size=0)
