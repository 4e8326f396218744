"""What the jobs share: their parsers' common flags, logging, exit codes and the lines they print.

Only ``jobs/`` configures logging and decides when Ray starts (``rayanom.launch`` starts it).
"""

from __future__ import annotations

import argparse
import logging
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
                   help="output rows per parquet part, the unit of a scoring actor's work and of what an "
                        "interrupted job resumes from; 0: the layout the output holds, else about 64 parts of a power "
                        "of two rows: 1024 up to 65,536 rows, 4096 above 131,072 (default: %(default)s)")
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


def start_ray(args: argparse.Namespace, config, fitted_precision: str | None = None):
    """``launch.start_ray`` with the run flags: the RunConfig for what Ray offers, ``--precision auto`` resolved."""
    from rayanom.launch import start_ray as start

    return start(config, device=args.device, num_actors=args.num_actors, threads_per_actor=args.threads_per_actor,
                 precision=args.precision, fitted_precision=fitted_precision, batch_size=args.batch_size,
                 rows_per_part=args.rows_per_part, io_retries=args.io_retries, max_file_bytes=args.max_file_bytes,
                 no_progress_s=args.no_progress_timeout, start_timeout_s=args.wait_for_actors)


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


def print_report(written: dict, decision: float | None = None) -> None:
    """What ``report.write_report`` wrote, one line each: the metrics, the pictures, the region rows."""
    metrics = written.get("metrics")
    if metrics is not None:
        f1 = "n/a" if metrics["f1"] is None else f"{metrics['f1']:.4f}"
        t = "n/a" if metrics["threshold"] is None else f"{metrics['threshold']:.6g}"
        extra = "".join(f", {name} {metrics[key]:.4f}" for key, name in (("f1_max", "F1Max"),
                                                                      ("average_precision", "AP"))
                        if metrics.get(key) is not None)
        print(f"report: {written['report_dir']}/report.png, metrics.json (F1 {f1} at threshold {t}{extra})")
        px = metrics.get("pixel")
        if px and px["pixel_auroc"] is not None:
            print(f"pixel AUROC {px['pixel_auroc']:.4f}, AUPRO {px['aupro']:.4f} (FPR up to {px['aupro_fpr_limit']:g}) "
                  f"at {px['evaluation_size'][0]}x{px['evaluation_size'][1]}, {px['images']} images, "
                  f"{px['regions']} defect regions")
        at = metrics.get("decision")
        if at:
            print(f"at the decision threshold {decision:.6g}: F1 {at['f1']:.4f}, precision {at['precision']:.4f}, "
                  f"recall {at['recall']:.4f} ({at['rows']} rows)")
    for sub in ("heatmaps", "boxes"):
        if sub in written:
            print(f"{sub}: {written[sub][0]} ({written[sub][1]} images)")
    if "regions" in written:
        print(f"region rows: {written['regions'][0]} ({written['regions'][1]} regions)")


def check_failed_fraction(what: str, failed: int, rows: int, limit: float) -> int:
    """Exit code 2 (after everything is written) when more than ``limit`` of the rows failed, else 0."""
    if rows and failed / rows > limit:
        print(f"error: {failed} of {rows} {what} rows failed ({failed / rows:.1%}), more than "
              f"--max-failed-fraction {limit}; see the 'error' column", file=sys.stderr)
        return 2
    return 0
