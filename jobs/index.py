"""Write a parquet index from an image folder tree: MVTec AD's layout, or anomalib's Folder layout.

    python jobs/index.py --mvtec data/mvtec/bottle --out runs/bottle/index.parquet --val-fraction 0.5 \
        --eval-out runs/bottle/eval.parquet
    python jobs/index.py --normal data/good --abnormal data/defects --mask data/masks --out index.parquet

Columns path, label, split (train, val, test), defect_type, mask_path; rows sorted by split, then path. Files are
chosen by their extension, nothing is decoded, and no Ray is started. Every file that does not become a row is listed
with the reason in OUT.skipped.tsv and counted in the summary.
"""

from __future__ import annotations

import argparse
import json

if __package__:  # python -m jobs.index, or the rayanom-* console scripts
    from . import _cli
else:  # python jobs/index.py (the README, ray job submit): jobs/ is the script's own directory
    import _cli


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = _cli.parser(__doc__, add_help)
    layout = p.add_mutually_exclusive_group(required=True)
    layout.add_argument("--mvtec", metavar="CATEGORY_DIR",
                        help="an MVTec AD category: train/good, test/<good or defect>, ground_truth/<defect>")
    layout.add_argument("--normal", metavar="DIR", help="anomalib Folder layout: the normal images")
    p.add_argument("--abnormal", metavar="DIR", help="Folder layout: the anomalous images (test)")
    p.add_argument("--normal-test", metavar="DIR", help="Folder layout: normal test images")
    p.add_argument("--mask", metavar="DIR", help="Folder layout: masks named like the anomalous images")
    p.add_argument("--normal-test-fraction", type=float, default=0.2,
                   help="Folder layout without --normal-test: share of the normal images held out for testing "
                        "(default: %(default)s, as anomalib's Folder)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="share of the test images, per defect type, moved to a 'val' split (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out and val choices (default: %(default)s)")
    p.add_argument("--out", required=True, help="the index to write (.parquet, local or a URI)")
    p.add_argument("--eval-out", metavar="PATH", help="also write its val and test rows alone there (to --score)")
    p.add_argument("--quiet", action="store_true", help="warnings and the summary only")
    return p


def main(args: argparse.Namespace) -> int:
    from rayanom.config import UserError
    from rayanom.folders import folder_index, mvtec_index, write_index

    _cli.setup_logging(args.quiet)
    if args.mvtec and (args.abnormal or args.normal_test or args.mask):
        raise UserError("invalid --abnormal/--normal-test/--mask with --mvtec: they describe the Folder layout")
    if args.mvtec:
        index = mvtec_index(args.mvtec, args.val_fraction, args.seed)
    else:
        index = folder_index(args.normal, args.abnormal, args.normal_test, args.mask, args.normal_test_fraction,
                             args.val_fraction, args.seed)
    summary = write_index(index, args.out, args.eval_out)
    print(json.dumps(summary, indent=2))
    print(f"index: {args.out} ({summary['rows']} rows; {summary['skipped']} files skipped, listed in "
          f"{args.out}.skipped.tsv)")
    return 0


def cli() -> None:
    """The command line: flags parsed, the job run, the exit code set (``_cli.run_main``)."""
    _cli.run_main(lambda: main(get_args_parser().parse_args()))


if __name__ == "__main__":
    cli()
