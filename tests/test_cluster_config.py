"""cluster.yaml passes the validation `ray up` runs before it touches the cloud (ray.md 4.3)."""

import copy
import json
import os

import jsonschema
import ray.autoscaler
import yaml
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
    pins = " ".join(config["setup_commands"])
    with open(os.path.join(REPO, "constraints.txt")) as f:
        for line in f:
            name = line.split("#")[0].strip()
            if name and not name.startswith(("pytest", "scipy")):
                assert name.split("==")[0] in pins and name.split("==")[1] in pins, name
