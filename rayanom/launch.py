"""How a job starts: join a Ray cluster or start an embedded local Ray, and size the actors.

It chooses the actors' device, their number and threads, and resolves ``precision="auto"``. The jobs in ``jobs/`` call
it; the rest of the library never starts Ray.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from rayanom.config import RunConfig, UserError
from rayanom.specs import spec_of

logger = logging.getLogger(__name__)

CPU_ACTOR_CPUS = 2  # CPUs (and threads) of each actor on a CPU-only cluster


def start_ray(config, *, device: str = "auto", num_actors: int | None = None, threads_per_actor: int | None = None,
              precision: str = "auto", fitted_precision: str | None = None, **run) -> RunConfig:
    """Connect to ``RAY_ADDRESS`` when set, else start an embedded local Ray; return the RunConfig for what Ray offers.

    ``ray job submit`` sets ``RAY_ADDRESS``; ``run`` holds the RunConfig's other fields, checked before Ray starts.

    ``device`` auto: cuda, one GPU per actor, when the cluster has GPUs up or its autoscaler's node types have some,
    else cpu. ``precision`` auto: ``fitted_precision`` when scoring a fitted model (``Artifact.precision``), else bf16
    when the actors' hardware runs ``config``'s backbone fast (timed where the actors will run, once per run), fp32 for
    a model whose feature stage runs in fp32 only (``ModelSpec.bf16``). Locally the actors reserve at most all but two
    logical CPUs, so the index and footer tasks that run beside them can always be placed (actors holding every CPU
    starve the tasks and the job hangs).
    """
    import ray

    spec = spec_of(config)
    if precision == "bf16" and not spec.bf16:
        raise UserError(f"invalid precision='bf16' for {config.model}: its feature stage runs in fp32 only (use fp32 "
                        "or auto)")
    RunConfig(**run)  # a bad value is refused before Ray starts
    cluster = bool(os.environ.get("RAY_ADDRESS"))
    device, why, gpus, cpus = _devices(device, cluster)
    # A CPU-only cluster runs an actor per CPU_ACTOR_CPUS of the CPUs it has or can add, each with that many threads
    # (decode runs inside them: Ray Data fuses it into the actors where both ask for the same resources).
    per_actor = CPU_ACTOR_CPUS if cluster and device == "cpu" else 1
    if num_actors is None:
        # With GPUs, one actor per GPU the cluster has or its autoscaler can add; locally on CPU one per core, at
        # most 4 (each holds its own copy of the model).
        num_actors = (max(1, int(gpus)) if device == "cuda" else
                      max(1, int(cpus) // per_actor) if cluster else min(4, os.cpu_count() or 1))
    if not cluster:
        # At least two CPUs beyond the actors' so tasks always find room; every core where there are more.
        # address="local": an embedded Ray of its own, never one a `ray start` left running on this machine
        ray.init(address="local", num_cpus=max(num_actors + 2, os.cpu_count() or 1), num_gpus=gpus,
                 include_dashboard=False, logging_level=logging.WARNING)
    if threads_per_actor is None:
        threads_per_actor = per_actor if cluster else max(1, (os.cpu_count() or 1) // num_actors)
    # Tests and dry runs on machines without CUDA: the actors ask for GPUs (so Ray places them, and an autoscaler
    # starts GPU nodes, as for real) and run the model on the CPU.
    fake_gpus = device == "cuda" and os.environ.get("RAYANOM_FAKE_GPUS") == "1"
    result = RunConfig(**run, num_actors=num_actors, device="cpu" if fake_gpus else device,
                       num_gpus_per_actor=1.0 if device == "cuda" else 0.0, num_cpus_per_actor=float(per_actor),
                       threads_per_actor=threads_per_actor)
    logger.info("ray: device %s (%s)%s", device, why, "; RAYANOM_FAKE_GPUS=1: GPUs asked for, model on CPU"
                if fake_gpus else "")
    speedup = 0.0  # 0: not measured
    if precision == "auto":
        precision = fitted_precision or "fp32"
        if not fitted_precision and spec.bf16:
            precision, speedup = _fast_precision(result)
            logger.info("ray: --precision auto: bf16 measured %.2fx fp32 where the actors run: %s", speedup,
                        precision)
    logger.info("ray: %s, up to %d actor(s) on %s, %s",
                "cluster at " + os.environ["RAY_ADDRESS"] if cluster else "local", num_actors, device, precision)
    return dataclasses.replace(result, precision=precision, bf16_speedup=round(speedup, 3))


def _devices(choice: str, cluster: bool) -> tuple[str, str, float, float]:
    """The actors' device for ``choice``, why, and the GPUs and CPUs there are or an autoscaler can add.

    On a cluster this connects to it (``ray.init``); locally it counts this machine's GPUs (Ray is started by the
    caller)."""
    import ray

    from rayanom.pool import autoscaler_max_resources, choose_device

    if cluster:
        ray.init(logging_level=logging.WARNING)
        gpus = ray.cluster_resources().get("GPU", 0)
        most = autoscaler_max_resources()
        try:
            device, why = choose_device(choice, gpus, most.get("GPU", 0) if most is not None else None)
        except UserError:
            ray.shutdown()
            raise
        cpus = max(ray.cluster_resources().get("CPU", 0), (most or {}).get("CPU", 0))
        return device, why, max(gpus, (most or {}).get("GPU", 0)), cpus
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # throw-away embedded head: no token auth
    gpus = 0
    if choice != "cpu":
        import torch

        gpus = torch.cuda.device_count()  # a workstation's GPUs serve the embedded Ray too
    device = choice if choice != "auto" else ("cuda" if gpus else "cpu")
    if device == "cuda" and not gpus:
        raise UserError("invalid device='cuda': this machine has no GPU (use --device cpu or auto)")
    why = f"{gpus} GPU(s) on this machine" if choice == "auto" else f"--device {choice}"
    return device, why, gpus, float(os.cpu_count() or 1)


def start_ray_for_tasks() -> None:
    """Ray for a job of small tasks only (no actors): connect to ``RAY_ADDRESS`` when set, else an embedded Ray."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # throw-away embedded head: no token auth
        ray.init(address="local", num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False,
                 logging_level=logging.WARNING)


def _fast_precision(run: RunConfig) -> tuple[str, float]:
    """bf16 when it runs fast where the actors run, and the speed-up measured.

    A probe task with an actor's resources and threads answers (``features.probe_bf16``), before the pool exists and
    while nothing else runs there.

    Raises:
        UserError: no node could run the probe within ``--wait-for-actors``.
    """
    import ray

    from rayanom.features import BF16_MIN_SPEEDUP

    probe = ray.remote(_probe).options(num_cpus=run.num_cpus_per_actor, num_gpus=run.num_gpus_per_actor)
    try:
        speedup = ray.get(probe.remote(run.device, run.threads_per_actor), timeout=run.start_timeout_s)
    except ray.exceptions.GetTimeoutError:
        msg = (f"no node could run a task with an actor's resources ({run.num_cpus_per_actor:g} CPU, "
               f"{run.num_gpus_per_actor:g} GPU) in {run.start_timeout_s:.0f} s (--wait-for-actors); pass --precision "
               "to skip this probe, or ask for what the cluster has (--device, --num-actors)")
        raise UserError(msg) from None
    return ("bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32"), speedup


def _probe(device: str, threads: int) -> float:
    """``features.probe_bf16`` with an actor's threads (a Ray task's body)."""
    import torch

    from rayanom.features import probe_bf16

    if threads > 0:
        torch.set_num_threads(threads)
    return probe_bf16(device)[0]


def check_output_location(paths: dict[str, str | None], shared: bool = False) -> None:
    """Refuse local output paths on a Ray cluster that has or can add more than one node.

    On such a cluster each node would write its share to its own disk; the check runs right after connecting, before any
    work.

    ``paths``: flag -> path (``{"--out": "runs/r1"}``; None: not given). A URI with a scheme (``s3://``, ``gs://``)
    passes; a local path (no scheme, or ``file://``) passes where ``shared`` says it is a filesystem every node mounts
    at the same place (``--shared-path``: NFS, EFS, ...), on an embedded local Ray (no ``RAY_ADDRESS``: one machine),
    and on a cluster of one node whose autoscaler can add none. Nodes: those alive now, and more where the node types'
    resources (``pool.autoscaler_max_resources``) exceed what is up. Connects for the check when Ray is not connected
    yet, and then disconnects again.

    Raises:
        UserError: a local path on a cluster of several nodes, or one that can add nodes.
    """
    import ray

    from rayanom.pool import autoscaler_max_resources

    local = {flag: p for flag, p in paths.items() if p and ("://" not in p or p.startswith("file://"))}
    if shared or not local or not os.environ.get("RAY_ADDRESS"):
        return
    connected = ray.is_initialized()
    if not connected:
        ray.init(logging_level=logging.WARNING)
    try:
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        now, most = ray.cluster_resources(), autoscaler_max_resources() or {}
        grows = any(value > now.get(key, 0) for key, value in most.items())
    finally:
        if not connected:
            ray.shutdown()
    logger.info("output location: %d node(s) up%s", nodes, ", the autoscaler can add more" if grows else "")
    if nodes > 1 or grows:
        named = ", ".join(f"{flag}={p!r}" for flag, p in local.items())
        raise UserError(f"invalid {named}: a local path on a cluster of more than one node ({nodes} up now"
                        f"{', its autoscaler can add more' if grows else ''}), where each node would write to its own "
                        "disk: use a URI every node reaches (s3://bucket/..., gs://bucket/...), or a filesystem every "
                        "node mounts at the same place (NFS, EFS) with --shared-path")
