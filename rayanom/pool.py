"""What the cluster offers the plane's actors: the most resources it can have, and the actors' device.

The resources are what its autoscaler's node types add up to; ``launch`` decides with them, and ``plane`` names them
when no actor can start."""

from __future__ import annotations

import os
from collections import Counter

import ray
import yaml

from rayanom.config import UserError


def offer() -> str:
    """What the cluster has now and what its autoscaler can add, for an error message."""
    now = ray.cluster_resources()
    most = autoscaler_max_resources()
    return (f"{now.get('CPU', 0):g} CPUs and {now.get('GPU', 0):g} GPUs up now; "
            + (f"its autoscaler's node types add up to {most.get('CPU', 0):g} CPUs and {most.get('GPU', 0):g} GPUs"
               if most is not None else "no autoscaler's node types found"))


def autoscaler_max_resources() -> dict[str, float] | None:
    """The most of each resource the cluster's node types can add up to, or None where no autoscaler config is found.

    That is each type's ``max_workers`` times its resources, the head's once.

    From Ray's own record of the autoscaler's config (``get_max_resources_from_cluster_config``, which Ray Data and Ray
    Train use; filled by autoscaler v2 and KubeRay) or, on a head started by ``ray up`` with autoscaler v1 (which does
    not fill that record), from the config file that autoscaler reads: ``~/ray_bootstrap_config.yaml``, or the file
    named by ``RAYANOM_CLUSTER_CONFIG``. The driver of ``ray job submit`` runs on the head, where it is.
    """
    try:
        # Ray has no public API for this record (Ray Data and Ray Train read it here too).
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - a private API: its absence or failure means "unknown"
        most = None
    if most:
        return {k: float(v) for k, v in most.items()}
    path = os.environ.get("RAYANOM_CLUSTER_CONFIG") or os.path.expanduser("~/ray_bootstrap_config.yaml")
    if not os.path.isfile(path):
        return None

    with open(path) as f:
        config = yaml.safe_load(f) or {}
    total: Counter = Counter()
    head = config.get("head_node_type")
    for name, node_type in (config.get("available_node_types") or {}).items():
        count = 1 if name == head else int(node_type.get("max_workers", config.get("max_workers", 0)) or 0)
        for key, value in (node_type.get("resources") or {}).items():
            total[key] += count * float(value)
    return dict(total)


def choose_device(requested: str, gpus_now: float, gpus_most: float | None) -> tuple[str, str]:
    """The actors' device for ``--device`` ``requested`` (auto, cpu, cuda), and why, for the log.

    The cluster has ``gpus_now`` GPUs up and node types adding up to ``gpus_most`` (None: unknown).

    Raises:
        UserError: ``cuda`` where neither the nodes up nor the node types the autoscaler can start have a GPU.
    """
    if requested == "cpu":
        return "cpu", "--device cpu"
    if gpus_now:
        return "cuda", f"{gpus_now:g} GPU(s) up now"
    if gpus_most:
        return "cuda", f"no GPU up now; the autoscaler's node types can add {gpus_most:g}, the job waits for them"
    if requested == "cuda":
        if gpus_most == 0:
            raise UserError("invalid device='cuda': the cluster has no GPU and none of its autoscaler's node types "
                            "has one (use --device cpu or auto)")
        return "cuda", "--device cuda; no GPU up now and no autoscaler config found: the job waits for GPUs"
    return "cpu", ("no GPU up now and none among the autoscaler's node types" if gpus_most == 0 else
                   "no GPU up now and no autoscaler config found (--device cuda waits for GPUs)")
