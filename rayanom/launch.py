"""How a job starts: join a Ray cluster or start an embedded local Ray, choose the actors' device, their number and
threads, and resolve ``precision="auto"``. The jobs in ``jobs/`` call it; the rest of the library never starts Ray.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from rayanom.config import RunConfig, UserError

logger = logging.getLogger(__name__)


def start_ray(config, *, device: str = "auto", num_actors: int | None = None, threads_per_actor: int | None = None,
              precision: str = "auto", fitted_precision: str | None = None, **run) -> RunConfig:
    """Connect to ``RAY_ADDRESS`` when set (``ray job submit`` sets it), else start an embedded local Ray; returns
    the RunConfig for what Ray offers (``run``: its other fields, checked before Ray starts).

    ``device`` auto: cuda, one GPU per actor, when the cluster has GPUs up or its autoscaler's node types have some,
    else cpu. ``precision`` auto: ``fitted_precision`` when scoring a fitted model (``Artifact.precision``), else bf16
    when the actors' hardware runs ``config``'s backbone fast (timed where the actors will run, once per run), fp32
    for a model whose feature stage runs in fp32 only (``ModelSpec.bf16``). Locally the actors reserve at most all but
    two logical CPUs, so the index and footer tasks that run beside them can always be placed (actors holding every
    CPU starve the tasks: the job hangs, as measured on 2 cores).
    """
    import ray

    from rayanom.models import spec_of

    spec = spec_of(config)
    if precision == "bf16" and not spec.bf16:
        raise UserError(f"invalid precision='bf16' for {config.model}: its feature stage runs in fp32 only (use fp32 "
                        "or auto)")
    RunConfig(**run)  # a bad value is refused before Ray starts
    cluster = bool(os.environ.get("RAY_ADDRESS"))
    device, why, gpus = _devices(device, cluster)
    if num_actors is None:
        # With GPUs, one actor per GPU the cluster has or its autoscaler can add: the pool asks for them all and
        # works with those that start. Locally on CPU, one actor per core up to 4 (each decodes its own parts,
        # beside its forward passes). Measured on 2 cores, 2 actors against 1: rows whose files are missing (pure
        # pipeline cost) about 2x the rate, resnet18 fp32 at 64^2 52 s against 60 s for 20,000 PNGs, resnet50 bf16 at
        # 256^2 73 s against 77 s for 2,048; each actor holds its own copy of the model.
        num_actors = max(1, int(gpus)) if device == "cuda" else (1 if cluster else min(4, os.cpu_count() or 1))
    if not cluster:
        # At least two CPUs beyond the actors' so tasks always find room; every core where there are more.
        ray.init(num_cpus=max(num_actors + 2, os.cpu_count() or 1), num_gpus=gpus, include_dashboard=False,
                 logging_level=logging.WARNING)
    if threads_per_actor is None:
        threads_per_actor = 0 if cluster else max(1, (os.cpu_count() or 1) // num_actors)
    # Tests and dry runs on machines without CUDA: the actors ask for GPUs (so Ray places them, and an autoscaler
    # starts GPU nodes, as for real) and run the model on the CPU.
    fake_gpus = device == "cuda" and os.environ.get("RAYANOM_FAKE_GPUS") == "1"
    result = RunConfig(**run, num_actors=num_actors, device="cpu" if fake_gpus else device,
                       num_gpus_per_actor=1.0 if device == "cuda" else 0.0, threads_per_actor=threads_per_actor)
    logger.info("ray: device %s (%s)%s", device, why, "; RAYANOM_FAKE_GPUS=1: GPUs asked for, model on CPU"
                if fake_gpus else "")
    if precision == "auto":
        precision = fitted_precision or (_fast_precision(result, cluster, config) if spec.bf16 else "fp32")
    logger.info("ray: %s, up to %d actor(s) on %s, %s",
                "cluster at " + os.environ["RAY_ADDRESS"] if cluster else "local", num_actors, device, precision)
    return dataclasses.replace(result, precision=precision)


def _devices(choice: str, cluster: bool) -> tuple[str, str, float]:
    """The actors' device for ``choice``, why, and the GPUs there are or an autoscaler can add. On a cluster this
    connects to it (``ray.init``); locally it counts this machine's GPUs (Ray is started by the caller)."""
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
        return device, why, max(gpus, (most or {}).get("GPU", 0))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # throw-away embedded head: no token auth
    gpus = 0
    if choice != "cpu":
        import torch

        gpus = torch.cuda.device_count()  # a workstation's GPUs serve the embedded Ray too
    device = choice if choice != "auto" else ("cuda" if gpus else "cpu")
    if device == "cuda" and not gpus:
        raise UserError("invalid device='cuda': this machine has no GPU (use --device cpu or auto)")
    return device, f"{gpus} GPU(s) on this machine" if choice == "auto" else f"--device {choice}", gpus


def start_ray_for_tasks() -> None:
    """Ray for a job of small tasks only (no actors): connect to ``RAY_ADDRESS`` when set, else an embedded Ray."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # throw-away embedded head: no token auth
        ray.init(num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, logging_level=logging.WARNING)


def _fast_precision(run: RunConfig, cluster: bool, config) -> str:
    """bf16 when ``config``'s backbone runs fast in it where the actors run: on a cluster a probe task with an actor's
    resources answers."""
    import ray

    from rayanom.features import bf16_is_fast

    if not cluster:
        return "bf16" if bf16_is_fast(run.device, config) else "fp32"
    probe = ray.remote(bf16_is_fast).options(num_cpus=run.num_cpus_per_actor, num_gpus=run.num_gpus_per_actor)
    try:
        fast = ray.get(probe.remote(run.device, config), timeout=run.start_timeout_s)
    except ray.exceptions.GetTimeoutError:
        msg = (f"no node could run a task with an actor's resources ({run.num_cpus_per_actor:g} CPU, "
               f"{run.num_gpus_per_actor:g} GPU) in {run.start_timeout_s:.0f} s (--wait-for-actors); pass --precision "
               "to skip this probe, or ask for what the cluster has (--device, --num-actors)")
        raise RuntimeError(msg) from None
    return "bf16" if fast else "fp32"
