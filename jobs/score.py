"""Score every row of a parquet index with a fitted model, on Ray.

    python jobs/score.py --model-dir runs/r1/model --index test.parquet --out runs/r1/scores-test
    ray job submit --working-dir . -- python jobs/score.py --model-dir s3://b/r1/model --index s3://b/all.parquet \\
        --out s3://b/r1/scores

Writes a parquet dataset: every input column unchanged, plus row_index, anomaly_score (the model's score, higher =
more anomalous: -log density for DFKDE and RKDE, the feature reconstruction error or Gaussian NLL for DFM),
is_anomalous and normalized_score (null without a threshold), error (null when scored), and the model's own columns
(DFKDE and RKDE: anomaly_probability; DFM fre: anomaly_map, anomaly_map_shape, image_height, image_width; RKDE:
num_regions, boxes, box_scores); one output row per input row. The report goes to OUT-report. On a cluster of several
nodes OUT and MODEL_DIR are URIs (s3://...) or shared mounts (--shared-path).
"""

from __future__ import annotations

import argparse

from rayanom import launch
from rayanom.artifact import Artifact
from rayanom.config import UserError
from rayanom.index import check_values, describe_index
from rayanom.parts import Lease, check_parts_dir
from rayanom.report import check_report, report_dir_of, write_report
from rayanom.specs import SPECS, spec_of
from rayanom.workflows import score_and_decide

if __package__:  # python -m jobs.score, or the rayanom-* console scripts
    from . import _cli
else:  # python jobs/score.py (the README, ray job submit): jobs/ is the script's own directory
    import _cli


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = _cli.parser(__doc__, add_help)
    _cli.add_model_dir_flag(p, "the model to score with: the artifact directory fit.py wrote (OUT/model)",
                            required=True)
    p.add_argument("--index", required=True, help="parquet index with a 'path' column")
    p.add_argument("--out", required=True, help="output directory for the scores (parquet)")
    _cli.add_shared_path_flag(p, "--out or --model-dir")
    # The weight files of every model: --weights (a timm backbone), RKDE's --detector-weights and --region-weights.
    for flag in dict.fromkeys(f for spec in SPECS.values() for f in spec.weight_files):
        models = ", ".join(spec.name for spec in SPECS.values() if flag in spec.weight_files)
        p.add_argument("--" + flag.replace("_", "-"), metavar="PATH",
                       help=f"{models}: where the actors find this weights file, if not at the path the model "
                            "recorded (its sha256 must match) (default: the recorded path)")
    p.add_argument("--retry-failed", action="store_true",
                   help="score again the rows of complete parts that failed (storage errors whose retries ran out, "
                        "...), leaving every other row as it was")
    _cli.add_threshold_flag(p, "for this run (default: the threshold stored beside the model, MODEL_DIR/"
                               "threshold.json, when there is one)")
    _cli.add_report_flags(p, "OUT-report", "0", "no")
    _cli.add_run_flags(p)
    return p


def main(args: argparse.Namespace) -> int:
    _cli.setup_logging(args.quiet)
    # On a cluster of several nodes the actors on every node read the model and write the parts: shared paths only.
    launch.check_output_location({"--out": args.out, "--model-dir": args.model_dir}, args.shared_path)
    # Everything a user can get wrong is checked here, before Ray starts (the index's schema from its footers) or,
    # for the label values, by a first pass on the workers before any output is written.
    artifact = Artifact.load(args.model_dir)
    model = spec_of(artifact.config)
    index = describe_index(args.index)
    check_parts_dir(args.out)
    report_dir = report_dir_of(args.out)
    check_report(artifact.config, report_dir, bool(args.evaluate), args.heatmaps or 0, args.boxes or 0,
                 args.region_rows)
    files = {f: getattr(args, f) for s in SPECS.values() for f in s.weight_files if getattr(args, f)}
    wrong = sorted(set(files) - set(model.weight_files))
    if wrong:
        raise UserError(f"invalid --{wrong[0].replace('_', '-')}: the model is {artifact.config.model}, whose weight "
                        f"files are {['--' + f.replace('_', '-') for f in model.weight_files]}")
    (model.check_weights or model.load_weights)(artifact.config, artifact.weights, files)  # each actor loads its own
    with Lease(args.out) as lease:  # one job per output, refused before Ray starts
        run = _cli.start_ray(args, artifact.config, artifact.precision)
        check_values(index)
        summary = score_and_decide(index, artifact, args.out, run, args.model_dir, args.threshold,
                                   overwrite=args.overwrite, job=lease.job, retry_failed=args.retry_failed,
                                   files=files)
    _cli.print_summary(summary)
    decision = summary["threshold"]["value"] if summary["threshold"] else None
    _cli.print_report(write_report(args.out, report_dir, bool(args.evaluate), args.heatmaps or 0, args.boxes or 0,
                                   args.region_rows, decision=decision, config=artifact.config), decision)
    return _cli.check_failed_fraction("scored", summary["failed"], summary["rows"], args.max_failed_fraction)


def cli() -> None:
    """The command line: flags parsed, the job run, the exit code set (``_cli.run_main``)."""
    _cli.run_main(main, get_args_parser, {"model": "--model-dir"})


if __name__ == "__main__":
    cli()
