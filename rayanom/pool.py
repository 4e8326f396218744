"""Model stage: a pool of actors on Ray core, for the bank items of a fit and the parts of a scoring job.

Every constructor argument is a small value, checked to stay below ``MAX_ARG_BYTES`` once serialised, so Ray keeps
it inline in the actor's creation task and a restarted actor needs nothing else: the actors read the backbone
weights and the fitted head themselves, from where every worker can reach them (``pipeline.load_weights``, the model
copy beside the parts). Ray Data's actor pools cannot do that: they hand every actor Ray Data's own context and the
UDF as object-store references (measured in Ray 2.60: a ``map_batches`` over a class without constructor arguments
still logs "has constructor arguments in the object store and max_restarts > 0" once per actor), and Ray cannot
restart an actor whose object-store arguments were lost (Ray issue 53727).

The pool grows with the cluster: all its actors are asked for at once, those the cluster cannot place yet wait as
resource demand that Ray's autoscaler answers by starting nodes, and work goes to each actor as soon as it has
started, at most ``in_flight`` calls each (the next call waits in the actor while the current one runs). The job goes
on with the actors it has; when none has started after ``start_timeout_s`` it ends with an error. An actor whose
process or node dies is restarted by Ray, on another node if need be, and its calls are retried (``max_restarts`` and
``max_task_retries`` unlimited; ``pipeline.PartScorer``'s crash marker bounds a row that kills it every time); decode
runs inside the actors, so restarted actors can never starve it. When no call finishes for ``no_progress_s`` seconds
the job ends with an error that says what it was waiting for.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator

import ray

logger = logging.getLogger(__name__)

MAX_ARG_BYTES = 64 * 1024  # Ray passes arguments up to 100 KiB inline (max_direct_call_object_size)
WAIT_LOG_S = 30.0  # how often a wait without progress is logged


def check_inline(kwargs: dict, what: str) -> None:
    """Raise ValueError when a constructor argument would reach the object store (too large, or a reference)."""
    from ray import cloudpickle

    for name, value in kwargs.items():
        size = len(cloudpickle.dumps(value))
        if size > MAX_ARG_BYTES or isinstance(value, ray.ObjectRef):
            msg = (f"{what}: constructor argument {name!r} is {size} bytes serialised (at most {MAX_ARG_BYTES}, "
                   "no object references): actors must be able to restart from their creation task alone")
            raise ValueError(msg)


def _node_of(_actor) -> str:
    return ray.get_runtime_context().get_node_id()


class ActorPool:
    """Up to ``size`` actors of ``cls`` (``num_cpus`` and ``num_gpus`` each), created from ``kwargs``; a context
    manager that kills them on exit and logs how many ran on which nodes."""

    def __init__(self, cls: type, kwargs: dict, size: int, num_cpus: float, num_gpus: float = 0.0,
                 no_progress_s: float = 1800.0, start_timeout_s: float = 600.0) -> None:
        check_inline(kwargs, cls.__name__)
        self.name, self.no_progress_s, self.start_timeout_s = cls.__name__, no_progress_s, start_timeout_s
        self.resources = f"{num_cpus:g} CPU{f', {num_gpus:g} GPU' if num_gpus else ''}"
        remote = ray.remote(cls).options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=-1, max_task_retries=-1,
                                         scheduling_strategy="SPREAD")
        self.actors = [remote.remote(**kwargs) for _ in range(max(1, size))]
        self._starting = {a.__ray_call__.remote(_node_of): a for a in self.actors}  # started: its node's id
        self.ready: list = []
        self.nodes: dict = {}  # started actor -> the node it started on
        self.t0 = time.monotonic()

    def __enter__(self) -> ActorPool:
        return self

    def __exit__(self, *exc) -> None:
        for ref in self._starting:  # actors never started: their start-up call is dropped, not retried
            ray.cancel(ref)
        for a in self.actors:
            ray.kill(a)
        per_node = Counter(self.nodes.values())
        logger.info("%s: %d of %d actors (%s each) ran, on %d node(s): %s", self.name, len(self.ready),
                    len(self.actors), self.resources, len(per_node),
                    ", ".join(f"{n} on node ...{node[-12:]}" for node, n in sorted(per_node.items())) or "none")

    def map_unordered(self, method: str, items: Iterable, in_flight: int = 2) -> Iterator:
        """``getattr(actor, method)(*item)`` for every item (a tuple of arguments), results as they finish (callers
        make them order-free). An actor holds up to ``in_flight`` calls while more items wait than actors are ready,
        then one (the last items go to actors that are free, not behind another call)."""
        queue = list(items)[::-1]
        busy: dict = {}  # call -> actor
        load = {a: 0 for a in self.actors}
        last = time.monotonic()
        while queue or busy:
            for actor in self.ready:
                while queue and load[actor] < (in_flight if len(queue) > len(self.ready) else 1):
                    busy[getattr(actor, method).remote(*queue.pop())] = actor
                    load[actor] += 1
            waiting = list(busy) + list(self._starting)
            left = (self.no_progress_s - (time.monotonic() - last) if self.ready else
                    self.start_timeout_s - (time.monotonic() - self.t0))
            done, _ = ray.wait(waiting, num_returns=1, timeout=max(0.1, min(WAIT_LOG_S, left)))
            if not done:
                stalled = time.monotonic() - last
                if not self.ready and time.monotonic() - self.t0 >= self.start_timeout_s:
                    msg = (f"no {self.name} actor ({self.resources}) could start in {self.start_timeout_s:.0f} s of "
                           f"waiting: the cluster has no room for one ({_offer()}). Raise --wait-for-actors while "
                           "its autoscaler is still starting nodes, or ask for what it has (--device, --num-actors)")
                    raise RuntimeError(msg)
                if self.ready and stalled >= self.no_progress_s:  # before the first start: start_timeout_s
                    msg = (f"no progress for {stalled:.0f} s: {len(self.ready)} of {len(self.actors)} {self.name} "
                           f"actors ({self.resources} each) started, {len(busy)} calls running, {len(queue)} waiting "
                           "(raise --no-progress-timeout if the cluster is slow to give resources)")
                    raise RuntimeError(msg)
                logger.info("waiting %.0f s: %d of %d %s actors (%s each) started, %d calls running, %d waiting%s",
                            stalled, len(self.ready), len(self.actors), self.name, self.resources, len(busy),
                            len(queue), "" if self.ready else f" ({_offer()})")
                continue
            last = time.monotonic()
            ref = done[0]
            if ref in self._starting:
                actor = self._starting.pop(ref)
                self.nodes[actor] = ray.get(ref)  # raises when the actor could not start (its constructor failed)
                self.ready.append(actor)
                if len(self.ready) in (1, len(self.actors)):
                    logger.info("%s: %d of %d actors started after %.0f s", self.name, len(self.ready),
                                len(self.actors), time.monotonic() - self.t0)
                continue
            load[busy.pop(ref)] -= 1
            yield ray.get(ref)


def _offer() -> str:
    now = ray.cluster_resources()
    most = autoscaler_max_resources()
    return (f"{now.get('CPU', 0):g} CPUs and {now.get('GPU', 0):g} GPUs up now; "
            + (f"its autoscaler's node types add up to {most.get('CPU', 0):g} CPUs and {most.get('GPU', 0):g} GPUs"
               if most is not None else "no autoscaler's node types found"))


def autoscaler_max_resources() -> dict[str, float] | None:
    """The most of each resource the cluster's node types can add up to (each type's ``max_workers`` times its
    resources, the head's once), or None where no autoscaler config is found.

    From Ray's own record of the autoscaler's config (``get_max_resources_from_cluster_config``, which Ray Data and
    Ray Train use; filled by autoscaler v2 and KubeRay) or, on a head started by ``ray up`` with autoscaler v1 (which
    does not fill that record), from the config file that autoscaler reads: ``~/ray_bootstrap_config.yaml``, or the
    file named by ``RAYANOM_CLUSTER_CONFIG``. The driver of ``ray job submit`` runs on the head, where it is.
    """
    try:
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - a private API: its absence or failure means "unknown"
        most = None
    if most:
        return {k: float(v) for k, v in most.items()}
    path = os.environ.get("RAYANOM_CLUSTER_CONFIG") or os.path.expanduser("~/ray_bootstrap_config.yaml")
    if not os.path.isfile(path):
        return None
    import yaml

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
    """The actors' device for ``--device`` ``requested`` (auto, cpu, cuda) on a cluster with ``gpus_now`` GPUs up and
    node types adding up to ``gpus_most`` (None: unknown); and why, for the log.

    Raises:
        UserError: ``cuda`` where neither the nodes up nor the node types the autoscaler can start have a GPU.
    """
    from rayanom.config import UserError

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
