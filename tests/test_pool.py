"""What the cluster offers: the device ``--device`` chooses from the GPUs up and the autoscaler's node types, the
node types' resources added up, and the line that says so in an error."""

import pytest
import yaml


@pytest.mark.parametrize("requested, now, most, device", [
    ("auto", 2, None, "cuda"),  # GPUs up now
    ("auto", 0, 8, "cuda"),  # none up, the autoscaler can start GPU nodes: ask and wait
    ("auto", 0, 0, "cpu"),  # node types known, none with a GPU
    ("auto", 0, None, "cpu"),  # no autoscaler config found
    ("cuda", 0, None, "cuda"),  # stated by the user: ask and wait (with a timeout)
    ("cpu", 4, 8, "cpu"),
])
def test_device_auto_decides_from_gpus_up_and_node_types(requested, now, most, device):
    from rayanom.pool import choose_device

    assert choose_device(requested, now, most)[0] == device


def test_device_cuda_is_refused_where_no_node_type_has_a_gpu():
    from rayanom.config import UserError
    from rayanom.pool import choose_device

    with pytest.raises(UserError, match="invalid device='cuda': the cluster has no GPU and none of its autoscaler's"):
        choose_device("cuda", 0, 0)


def test_node_types_add_up_from_the_autoscaler_config(tmp_path, monkeypatch):
    from rayanom.pool import autoscaler_max_resources

    config = {"head_node_type": "head", "max_workers": 10, "available_node_types": {
        "head": {"resources": {"CPU": 0}, "max_workers": 0},
        "gpu": {"resources": {"CPU": 8, "GPU": 1}, "min_workers": 0, "max_workers": 8},
        "big": {"resources": {"CPU": 48, "GPU": 4}, "max_workers": 2}}}
    path = tmp_path / "bootstrap.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("RAYANOM_CLUSTER_CONFIG", str(path))
    assert autoscaler_max_resources() == {"CPU": 8 * 8 + 2 * 48, "GPU": 8 + 2 * 4}
    monkeypatch.setenv("RAYANOM_CLUSTER_CONFIG", str(tmp_path / "absent.yaml"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert autoscaler_max_resources() is None


def test_offer_names_what_is_up_and_what_the_node_types_add(monkeypatch):
    import ray

    from rayanom import pool

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    monkeypatch.setattr(pool, "autoscaler_max_resources", lambda: {"CPU": 160.0, "GPU": 16.0})
    assert pool.offer() == ("4 CPUs and 0 GPUs up now; its autoscaler's node types add up to 160 CPUs and 16 GPUs")
    monkeypatch.setattr(pool, "autoscaler_max_resources", lambda: None)
    assert pool.offer() == "4 CPUs and 0 GPUs up now; no autoscaler's node types found"
