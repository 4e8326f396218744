"""Score every row of a parquet index with a fitted model, on Ray.

    python jobs/score.py --model runs/r1/model --index test.parquet --out runs/r1/scores-test
    ray job submit --working-dir . -- python jobs/score.py --model s3://b/r1/model --index s3://b/all.parquet \
        --out s3://b/r1/scores

Writes a parquet dataset: every input column unchanged, plus row_index, anomaly_score (-log density, higher = more
anomalous), anomaly_probability and error (null when scored). One output row per input row.
"""

from __future__ import annotations

import argparse
import dataclasses

if __package__:  # python -m jobs.score, or the rayanom-* console scripts
    from . import _cli
else:  # python jobs/score.py (the README, ray job submit): jobs/ is the script's own directory
    import _cli


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = _cli.parser(__doc__, add_help)
    p.add_argument("--model", required=True, metavar="MODEL_DIR", help="artifact directory written by fit.py")
    p.add_argument("--index", required=True, help="parquet index with a 'path' column")
    p.add_argument("--out", required=True, help="output directory for the scores (parquet)")
    p.add_argument("--weights", metavar="PATH",
                   help="where the actors find the backbone weights file, if not at the path the model recorded "
                        "(its sha256 must match) (default: the recorded path)")
    p.add_argument("--detector-weights", metavar="PATH",
                   help="RKDE: where the actors find the detector weights file (its sha256 must match) "
                        "(default: the recorded path)")
    p.add_argument("--region-weights", metavar="PATH",
                   help="RKDE: where the actors find the region extractor weights file (its sha256 must match) "
                        "(default: the recorded path)")
    p.add_argument("--retry-failed", action="store_true",
                   help="score again the rows of complete parts that failed (storage errors whose retries ran out, "
                        "...), leaving every other row as it was")
    _cli.add_threshold_flag(p, "for this run (default: the threshold stored beside the model, MODEL_DIR/"
                               "threshold.json, when there is one)")
    _cli.add_report_flags(p, "OUT-report", "0", "no")
    _cli.add_run_flags(p)
    return p


def main(args: argparse.Namespace) -> int:
    from rayanom.artifact import Artifact
    from rayanom.features import artifact_weights
    from rayanom.index import describe_index
    from rayanom.parts import check_parts_dir

    _cli.setup_logging(args.quiet)
    # Everything a user can get wrong is checked here, before Ray starts (the index's schema from its footers) or,
    # for the label values, by a first pass on the workers before any output is written.
    artifact = Artifact.load(args.model)
    index = describe_index(args.index)
    check_parts_dir(args.out)
    report_dir = args.out.rstrip("/") + "-report"  # beside the scores: that directory holds parquet parts only
    _cli.check_report(artifact.config, report_dir, bool(args.evaluate), args.heatmaps or 0, args.boxes or 0,
                      args.region_rows)
    if artifact.config.model == "rkde":
        from rayanom.regions import rkde_artifact_weights

        rkde_artifact_weights(artifact.config, artifact.weights, args.detector_weights, args.region_weights)
    else:
        artifact_weights(artifact.config, artifact.weights, args.weights)  # checked here; each actor loads its own

    from rayanom import pipeline

    weights = pipeline.weights_at(artifact.weights, args.weights, args.detector_weights, args.region_weights)
    with _cli.output_lease(args.out) as lease:  # one job per output, refused before Ray starts
        run = _cli.init_ray(args, artifact.config, _cli.fitted_precision(artifact))
        _cli.check_index_values(index)
        from rayanom.decide import Threshold, load_threshold, settle

        used = (Threshold(args.threshold) if args.threshold is not None else
                load_threshold(args.model, pipeline.artifact_fingerprint(artifact)))
        summary = pipeline.score(index, artifact, args.out, run, overwrite=args.overwrite, job=lease.job,
                                 retry_failed=args.retry_failed, weights=weights, threshold=used)
        t = settle(args.out, used, args.threshold)
        summary["threshold"] = dataclasses.asdict(t) if t else None
    _cli.print_summary(summary)
    _cli.write_report(args.out, report_dir, bool(args.evaluate), args.heatmaps or 0, args.boxes or 0,
                      args.region_rows, decision=t.value if t else None, config=artifact.config)
    return _cli.check_failed_fraction("scored", summary["failed"], summary["rows"], args.max_failed_fraction)


def cli() -> None:
    """The command line: flags parsed, the job run, the exit code set (``_cli.run_main``)."""
    _cli.run_main(lambda: main(get_args_parser().parse_args()))


if __name__ == "__main__":
    cli()
