"""Model stage: a pool of actors on Ray core, for the bank items of a fit and the parts of a scoring job.

Every constructor argument is a small value, checked to stay below ``MAX_ARG_BYTES`` once serialised, so Ray keeps
it inline in the actor's creation task and a restarted actor needs nothing else: the actors read the backbone
weights and the fitted head themselves, from where every worker can reach them (``pipeline.load_weights``, the model
copy beside the parts). Ray Data's actor pools cannot do that: they hand every actor Ray Data's own context and the
UDF as object-store references (measured in Ray 2.60: a ``map_batches`` over a class without constructor arguments
still logs "has constructor arguments in the object store and max_restarts > 0" once per actor), and Ray cannot
restart an actor whose object-store arguments were lost (Ray issue 53727).

Work goes only to actors that have started, at most ``in_flight`` calls each (the next call waits in the actor while
the current one runs). An actor whose process dies is restarted by Ray and its calls are retried (``max_restarts``
and ``max_task_retries`` unlimited; ``pipeline.PartScorer``'s crash marker bounds a row that kills it every time).
When no call finishes for ``no_progress_s`` seconds the job ends with an error that says what it was waiting for.
"""

from __future__ import annotations

import logging
import time
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


class ActorPool:
    """``size`` actors of ``cls`` (``num_cpus`` and ``num_gpus`` each), created from ``kwargs``; a context manager
    that kills them on exit."""

    def __init__(self, cls: type, kwargs: dict, size: int, num_cpus: float, num_gpus: float = 0.0,
                 no_progress_s: float = 1800.0) -> None:
        check_inline(kwargs, cls.__name__)
        self.name, self.no_progress_s = cls.__name__, no_progress_s
        self.resources = f"{num_cpus:g} CPU{f', {num_gpus:g} GPU' if num_gpus else ''}"
        remote = ray.remote(cls).options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=-1, max_task_retries=-1,
                                         scheduling_strategy="SPREAD")
        self.actors = [remote.remote(**kwargs) for _ in range(max(1, size))]
        self._starting = {a.__ray_ready__.remote(): a for a in self.actors}
        self.ready: list = []

    def __enter__(self) -> ActorPool:
        return self

    def __exit__(self, *exc) -> None:
        for a in self.actors:
            ray.kill(a)

    def map_unordered(self, method: str, items: Iterable, in_flight: int = 2) -> Iterator:
        """``getattr(actor, method)(*item)`` for every item (a tuple of arguments), results as they finish (callers
        make them order-free)."""
        queue = list(items)[::-1]
        busy: dict = {}  # call -> actor
        load = {a: 0 for a in self.actors}
        last = time.monotonic()
        while queue or busy:
            for actor in self.ready:
                while queue and load[actor] < in_flight:
                    busy[getattr(actor, method).remote(*queue.pop())] = actor
                    load[actor] += 1
            waiting = list(busy) + list(self._starting)
            left = self.no_progress_s - (time.monotonic() - last)
            done, _ = ray.wait(waiting, num_returns=1, timeout=max(0.1, min(WAIT_LOG_S, left)))
            if not done:
                stalled = time.monotonic() - last
                if stalled >= self.no_progress_s:
                    msg = (f"no progress for {stalled:.0f} s: {len(self.ready)} of {len(self.actors)} {self.name} "
                           f"actors ({self.resources} each) started, {len(busy)} calls running, {len(queue)} waiting "
                           "(raise --no-progress-timeout if the cluster is slow to give resources)")
                    raise RuntimeError(msg)
                logger.info("waiting %.0f s: %d of %d %s actors (%s each) started, %d calls running, %d waiting",
                            stalled, len(self.ready), len(self.actors), self.name, self.resources, len(busy),
                            len(queue))
                continue
            last = time.monotonic()
            ref = done[0]
            if ref in self._starting:
                actor = self._starting.pop(ref)
                ray.get(ref)  # raises when the actor could not start (its constructor failed)
                self.ready.append(actor)
                continue
            load[busy.pop(ref)] -= 1
            yield ray.get(ref)
