"""Apply a new threshold to existing scores: new decisions and a new report, without scoring again.

    python jobs/decide.py --scores runs/r1/scores --from-val --model-dir runs/r1/model    # F1 on the 'val' rows
    python jobs/decide.py --scores runs/r1/scores --threshold 12.5 --evaluate

Rewrites is_anomalous and normalized_score of each part decided with another threshold, part by part on the workers
(never through the driver); anomaly_score and every other column stay as they were. With --model-dir the threshold
is stored beside that model (MODEL_DIR/threshold.json), which must be the model the scores were made with. The report
goes to SCORES-report. On a cluster of several nodes SCORES and MODEL_DIR are URIs (s3://...) or shared mounts
(--shared-path).
"""

from __future__ import annotations

import argparse
import time

from rayanom import launch
from rayanom.artifact import Artifact, artifact_fingerprint
from rayanom.config import UserError
from rayanom.decisions import THRESHOLD_FILE, save_threshold
from rayanom.parts import Lease, read_manifest
from rayanom.report import check_report, report_dir_of, write_report
from rayanom.workflows import decide_scores

if __package__:  # python -m jobs.decide, or the rayanom-* console scripts
    from . import _cli
else:  # python jobs/decide.py (the README, ray job submit): jobs/ is the script's own directory
    import _cli


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = _cli.parser(__doc__, add_help)
    p.add_argument("--scores", required=True, help="a scores directory written by score.py or fit.py --score")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--threshold", type=float, metavar="VALUE", help="is_anomalous = anomaly_score >= VALUE")
    which.add_argument("--from-val", action="store_true",
                       help="the F1-adaptive threshold of the scores' labelled 'val' rows")
    _cli.add_model_dir_flag(p, "store the threshold beside this model, the one the scores were made with")
    _cli.add_shared_path_flag(p, "--scores or --model-dir")
    p.add_argument("--evaluate", action="store_true",
                   help="write SCORES-report: metrics.json and report.png, with the metrics at this threshold")
    p.add_argument("--quiet", action="store_true", help="warnings and the summary only")
    return p


def main(args: argparse.Namespace) -> int:
    _cli.setup_logging(args.quiet)
    # On a cluster of several nodes the tasks on every node rewrite the parts: shared paths only.
    launch.check_output_location({"--scores": args.scores, "--model-dir": args.model_dir}, args.shared_path)
    manifest = read_manifest(args.scores)  # before Ray starts: a directory without scores is refused here
    if args.model_dir:
        if artifact_fingerprint(Artifact.load(args.model_dir)) != manifest.get("model"):
            raise UserError(f"invalid --model-dir={args.model_dir!r}: the scores at {args.scores!r} were made with "
                            "another model")
    report_dir = report_dir_of(args.scores)
    if args.evaluate:
        check_report(None, report_dir, True)
    with Lease(args.scores):  # no scoring job may write the parts meanwhile
        launch.start_ray_for_tasks()
        t0 = time.time()
        t, n = decide_scores(args.scores, None if args.from_val else args.threshold)
        print(f"decisions: is_anomalous = anomaly_score >= {t.value:.6g} ({t.source}); {n} parts decided again in "
              f"{time.time() - t0:.1f} s")
    if args.model_dir:
        save_threshold(args.model_dir, t, manifest["model"])
        print(f"threshold: {args.model_dir}/{THRESHOLD_FILE}")
    _cli.print_report(write_report(args.scores, report_dir, args.evaluate, decision=t.value), t.value)
    return 0


def cli() -> None:
    """The command line: flags parsed, the job run, the exit code set (``_cli.run_main``)."""
    _cli.run_main(main, get_args_parser, {"model": "--model-dir"})


if __name__ == "__main__":
    cli()
