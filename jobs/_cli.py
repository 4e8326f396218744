"""What both jobs share: logging, Ray start-up (embedded locally, connect on a cluster), run flags, exit codes.

Only ``jobs/`` configures logging and calls ``ray.init()``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import traceback
from collections.abc import Callable

logger = logging.getLogger("rayanom.jobs")


def parser(doc: str, add_help: bool = True) -> argparse.ArgumentParser:
    """A job's parser: its module docstring as the description, kept as written."""
    return argparse.ArgumentParser(description=doc, add_help=add_help,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """The run flags; their defaults are RunConfig's (written there once)."""
    from rayanom.config import RunConfig

    g = parser.add_argument_group("run (speed only; recorded in the artifact's provenance)")
    g.add_argument("--batch-size", type=int, default=RunConfig.batch_size,
                   help="images per forward pass (default: %(default)s)")
    g.add_argument("--num-actors", type=int, default=None,
                   help="feature/scoring actors, the most a pool asks for (default: one per GPU the cluster has or "
                        "its autoscaler can add; locally on CPU one per core, at most 4; else 1)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="actor device; auto = cuda, one GPU per actor, when the cluster has GPUs up or its "
                        "autoscaler's node types have some, else cpu (default: auto)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="backbone precision. bf16 autocast is 1.6-3.5x faster on CPUs with AMX or avx512_bf16 and "
                        "on Ampere or newer GPUs and moves scores slightly (demo AUROC within 0.005); fp32 is the "
                        "parity path. auto: for fit, bf16 where it measures at least 1.3x faster than fp32 on the "
                        "actors' hardware (DFKDE, DFM), else fp32; for scoring, the precision the model was fitted "
                        "with (default: %(default)s)")
    g.add_argument("--threads-per-actor", type=int, default=None,
                   help="torch threads per actor (default: what Ray sets; locally, the cores divided by the actors)")
    g.add_argument("--rows-per-part", type=int, default=RunConfig.rows_per_part,
                   help="output rows per parquet part, the unit an interrupted job resumes from (default: %(default)s)")
    g.add_argument("--io-retries", type=int, default=RunConfig.io_retries,
                   help="retries of a transient storage error (throttling, 5xx, timeouts, dropped connections) per "
                        "request, with jittered exponential backoff from 0.05 s up to 5 s (default: %(default)s)")
    g.add_argument("--max-file-bytes", type=int, default=RunConfig.max_file_bytes,
                   help="image files larger than this are refused from their size, before reading (default: "
                        "%(default)s, 256 MiB)")
    g.add_argument("--no-progress-timeout", type=float, default=RunConfig.no_progress_s, metavar="SECONDS",
                   help="end the job with an error when no actor call (a part, a chunk of training rows) finishes "
                        "for this long, locally or on a cluster (default: %(default)s)")
    g.add_argument("--wait-for-actors", type=float, default=RunConfig.start_timeout_s, metavar="SECONDS",
                   help="end the job with an error when no actor could start for this long (on an autoscaling "
                        "cluster, the time to start a node) (default: %(default)s)")
    g.add_argument("--max-failed-fraction", type=float, default=0.01,
                   help="exit with code 2, after writing everything, when more rows than this fraction failed "
                        "(default: %(default)s)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace this tool's outputs of another run (re-running the same command resumes instead)")
    g.add_argument("--quiet", action="store_true", help="warnings and the final summary only, no progress lines")


def setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def init_ray(args: argparse.Namespace, config, fitted_precision: str | None = None):
    """Connect to ``RAY_ADDRESS`` when set (``ray job submit`` sets it), else start an embedded local Ray.

    Returns the RunConfig sized for what Ray offers, with ``--precision auto`` resolved: ``fitted_precision`` when
    scoring a fitted model, else bf16 when the actors' hardware runs ``config``'s backbone fast (timed where the
    actors will run, once per run; the choice is recorded in the artifact and reused when scoring).
    Locally the actors reserve at most all but two logical CPUs, so the index and footer tasks that run beside them
    can always be placed (actors holding every CPU starve the tasks: the job hangs, as measured on 2 cores).
    """
    from rayanom.config import RunConfig, UserError

    import ray

    model = config.model
    if model == "rkde" and args.precision == "bf16":
        raise UserError("invalid precision='bf16' for rkde: the region model runs in fp32 only (use fp32 or auto)")
    if not args.no_progress_timeout > 0:
        raise UserError(f"invalid no_progress_timeout={args.no_progress_timeout}: expected seconds > 0")
    if not args.wait_for_actors > 0:
        raise UserError(f"invalid wait_for_actors={args.wait_for_actors}: expected seconds > 0")
    cluster = bool(os.environ.get("RAY_ADDRESS"))
    num_actors = args.num_actors
    device, why, gpus = _devices(args.device, cluster)
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
    threads = args.threads_per_actor
    if threads is None:
        threads = 0 if cluster else max(1, (os.cpu_count() or 1) // num_actors)
    # Tests and dry runs on machines without CUDA: the actors ask for GPUs (so Ray places them, and an autoscaler
    # starts GPU nodes, as for real) and run the model on the CPU.
    fake_gpus = device == "cuda" and os.environ.get("RAYANOM_FAKE_GPUS") == "1"
    # A hang (local or on a cluster) becomes an error instead of a silent wait (pool.ActorPool).
    run = RunConfig(batch_size=args.batch_size, rows_per_part=args.rows_per_part, num_actors=num_actors,
                    device="cpu" if fake_gpus else device, num_gpus_per_actor=1.0 if device == "cuda" else 0.0,
                    threads_per_actor=threads, io_retries=args.io_retries, max_file_bytes=args.max_file_bytes,
                    no_progress_s=args.no_progress_timeout, start_timeout_s=args.wait_for_actors)
    logger.info("ray: device %s (%s)%s", device, why, "; RAYANOM_FAKE_GPUS=1: GPUs asked for, model on CPU"
                if fake_gpus else "")
    precision = args.precision
    if precision == "auto":
        precision = fitted_precision or ("fp32" if model == "rkde" else _fast_precision(run, cluster, config))
    run = dataclasses.replace(run, precision=precision)
    logger.info("ray: %s, up to %d actor(s) on %s, %s",
                "cluster at " + os.environ["RAY_ADDRESS"] if cluster else "local", num_actors, device, precision)
    return run


def _devices(choice: str, cluster: bool) -> tuple[str, str, float]:
    """The actors' device for ``--device choice``, why, and the GPUs there are or an autoscaler can add. On a cluster
    this connects to it (``ray.init``); locally it counts this machine's GPUs (Ray is started by the caller)."""
    import ray

    from rayanom.config import UserError
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


def output_lease(output: str):
    """The lease of a scores directory for this job (``parts.Lease``): a second job on it is refused."""
    import uuid

    from rayanom.parts import Lease

    return Lease(output, uuid.uuid4().hex[:12])


def check_index_values(index) -> None:
    """The index's label values, checked on the workers before any output is written (exit 2 naming the problem)."""
    from rayanom.config import UserError
    from rayanom.index import index_value_errors

    error = index_value_errors(index)
    if error:
        raise UserError(error)


def fitted_precision(artifact) -> str:
    """The backbone precision a model was fitted with (its provenance; fp32 for models that do not record one)."""
    return artifact.provenance.get("run", {}).get("precision", "fp32")


def _fast_precision(run, cluster: bool, config) -> str:
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


def run_main(main: Callable[[], int]) -> None:
    """Exit codes: 0 success, 2 user error (one clear message, no traceback), 1 internal failure."""
    from rayanom.config import UserError

    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    except Exception:  # noqa: BLE001 - last resort: show the traceback and exit 1
        traceback.print_exc()
        code = 1
    sys.exit(code)


def print_summary(summary: dict) -> None:
    auroc = summary.get("auroc")
    kinds = summary.get("failed_by_kind") or {}
    line = (f"scored {summary['scored']} of {summary['rows']} rows, {summary['failed']} failed"
            + (" (" + ", ".join(f"{k} {n}" for k, n in kinds.items()) + ")" if kinds else "")
            + (f", image AUROC {auroc:.4f} ({summary['n_normal']} normal, {summary['n_anomalous']} anomalous)"
               if auroc is not None else ""))
    print(line)
    t = summary.get("threshold")
    from rayanom.decide import NO_THRESHOLD

    print(f"decisions: is_anomalous = anomaly_score >= {t['value']:.6g} ({t['source']})" if t else
          f"decisions: {NO_THRESHOLD}")
    print(f"scores: {summary['output']}")


REPORT_FILES = ("metrics.json", "report.png", "heatmaps", "boxes", "regions")


def add_threshold_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--threshold", type=float, default=None, metavar="VALUE",
                        help="decide is_anomalous = anomaly_score >= VALUE " + what)


def add_report_flags(parser: argparse.ArgumentParser, where: str, pictures_default: str, evaluate_default: str) -> None:
    g = parser.add_argument_group(f"report (written to {where})")
    g.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=None,
                   help="the scored index has labels: metrics.json (AUROC, F1 at the adaptive and the decision "
                        "thresholds, F1Max, average precision, per defect type) and report.png (one page: ROC and PR "
                        "curves, score histograms, scores per defect type and its table) "
                        f"(default: {evaluate_default})")
    g.add_argument("--heatmaps", type=int, default=None, metavar="N",
                   help=f"DFM (fre): heat-map overlays of the N most anomalous images (default: {pictures_default})")
    g.add_argument("--boxes", type=int, default=None, metavar="N",
                   help=f"RKDE: boxes coloured by score on the N most anomalous images (default: {pictures_default})")
    g.add_argument("--region-rows", action="store_true",
                   help="RKDE: also write one row per region (row_index, path, region, box, box_score) to regions/")


def check_report(config, report_dir: str, evaluate: bool, heatmaps: int, boxes: int = 0,
                 region_rows: bool = False) -> None:
    """Pictures and region rows need the right model; the report directory may hold only report files (rewritten
    each run)."""
    from rayanom.artifact import check_output_dir
    from rayanom.config import UserError

    if heatmaps and (heatmaps < 0 or config.model != "dfm" or config.score_type != "fre"):
        raise UserError(f"invalid heatmaps={heatmaps}: heat maps need a DFM model with score_type 'fre' and N > 0")
    if (boxes or region_rows) and (boxes < 0 or config.model != "rkde"):
        raise UserError(f"invalid boxes={boxes}, region_rows={region_rows}: they need an RKDE model (and N > 0)")
    if evaluate or heatmaps or boxes or region_rows:
        check_output_dir(report_dir, REPORT_FILES.__contains__, overwrite=True)
        for sub, suffix in (("heatmaps", ".png"), ("boxes", ".png"), ("regions", ".parquet")):
            check_output_dir(f"{report_dir}/{sub}", lambda n, s=suffix: n.endswith(s), overwrite=True)


def write_report(scores_dir: str, report_dir: str, evaluate: bool, heatmaps: int, boxes: int = 0,
                 region_rows: bool = False, decision: float | None = None, config=None) -> None:
    """Into ``report_dir``: metrics.json + report.png (--evaluate; with ``decision``, the threshold the scores were
    decided with, the metrics at it too; with a DFM ``fre`` ``config``, the pixel metrics where the index had masks),
    heat maps (--heatmaps N), box overlays (--boxes N), one row per region (--region-rows)."""
    from rayanom import maps
    from rayanom.artifact import prepare_output_dir
    from rayanom.data import resolve_filesystem
    from rayanom.report import evaluate as evaluate_scores

    if not (evaluate or heatmaps or boxes or region_rows):
        return
    prepare_output_dir(report_dir, REPORT_FILES.__contains__, overwrite=True)
    if evaluate:
        fre = config is not None and config.model == "dfm" and config.score_type == "fre"
        metrics = evaluate_scores(scores_dir, report_dir, decision=decision,
                                  pixel_size=config.image_size if fre else None)
        f1 = "n/a" if metrics["f1"] is None else f"{metrics['f1']:.4f}"
        t = "n/a" if metrics["threshold"] is None else f"{metrics['threshold']:.6g}"
        extra = "".join(f", {name} {metrics[key]:.4f}" for key, name in (("f1_max", "F1Max"),
                                                                      ("average_precision", "AP"))
                        if metrics.get(key) is not None)
        print(f"report: {report_dir}/report.png, metrics.json (F1 {f1} at threshold {t}{extra})")
        px = metrics.get("pixel")
        if px and px["pixel_auroc"] is not None:
            print(f"pixel AUROC {px['pixel_auroc']:.4f}, AUPRO {px['aupro']:.4f} (FPR up to {px['aupro_fpr_limit']:g}) "
                  f"at {px['evaluation_size'][0]}x{px['evaluation_size'][1]}, {px['images']} images, "
                  f"{px['regions']} defect regions")
        at = metrics.get("decision")
        if at:
            print(f"at the decision threshold {decision:.6g}: F1 {at['f1']:.4f}, precision {at['precision']:.4f}, "
                  f"recall {at['recall']:.4f} ({at['rows']} rows)")
    for sub, count, suffix, write in (("heatmaps", heatmaps, ".png", maps.write_heatmaps),
                                      ("boxes", boxes, ".png", maps.write_box_overlays),
                                      ("regions", int(region_rows), ".parquet", None)):
        if not count:
            continue
        target = f"{report_dir}/{sub}"
        fs, path = resolve_filesystem(target)
        for name in prepare_output_dir(target, lambda n, s=suffix: n.endswith(s), overwrite=True):
            fs.delete_file(f"{path}/{name}")  # files of an earlier run
        if write is None:
            print(f"region rows: {target} ({maps.write_region_rows(scores_dir, target)} regions)")
        else:
            print(f"{sub}: {target} ({len(write(scores_dir, target, count))} images)")


def check_failed_fraction(what: str, failed: int, rows: int, limit: float) -> int:
    """Exit code 2 (after everything is written) when more than ``limit`` of the rows failed, else 0."""
    if rows and failed / rows > limit:
        print(f"error: {failed} of {rows} {what} rows failed ({failed / rows:.1%}), more than "
              f"--max-failed-fraction {limit}; see the 'error' column", file=sys.stderr)
        return 2
    return 0
