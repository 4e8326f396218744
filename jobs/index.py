"""Write a parquet index from image folders: MVTec AD's layout, anomalib's Folder layout, or a listing.

    python jobs/index.py --mvtec data/mvtec/bottle --out runs/bottle/index.parquet --eval-out runs/bottle/eval.parquet
    python jobs/index.py --normal data/good --abnormal data/defects --mask data/masks --out index.parquet
    python jobs/index.py --list s3://bucket/line7/2026-12/ --out s3://bucket/indexes/line7-2026-12
    python jobs/index.py --list data/inspected --label-from-dir ok=0,scratch=1,dent=1 --out runs/inspected-index

--mvtec and --normal: columns path, label, split (train, val, test), defect_type, mask_path; rows sorted by split,
then path; by default half of each defect type's test images become the 'val' split, whose labels choose the
decision threshold when they are scored. No Ray is started. Every file that does not become a row is listed with the
reason in OUT.skipped.tsv and counted in the summary.

--list: every image below the folders or object-store prefixes, recursively, listed in parallel Ray tasks (on a
cluster when RAY_ADDRESS is set, else a local Ray); column path, plus label, split and defect_type from folder names
when a rule says so. The index is a directory of parquet files (part-GGGGGG-FFFFFF.parquet) whose name order is the
row order, rows sorted by path. Skipped entries (other files, empty files, broken links, links to folders, folders
that cannot be listed) are counted per reason and listed in OUT/_skipped-*.tsv.

Files are chosen by their extension and nothing is decoded.
"""

from __future__ import annotations

import argparse
import json

from rayanom import launch
from rayanom.config import UserError
from rayanom.folders import VAL_FRACTION, folder_index, mvtec_index, write_index
from rayanom.listing import ROWS_PER_FILE, plan_listing, write_listing

if __package__:  # python -m jobs.index, or the rayanom-* console scripts
    from . import _cli
else:  # python jobs/index.py (the README, ray job submit): jobs/ is the script's own directory
    import _cli


# The listing's keywords in its messages, written as the flags that set them.
RENAMED = {"roots": "--list", "label_rule": "--label-from-dir", "split_rule": "--split-from-dir",
           "tasks": "--list-tasks"}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = _cli.parser(__doc__, add_help)
    layout = p.add_mutually_exclusive_group(required=True)
    layout.add_argument("--mvtec", metavar="CATEGORY_DIR",
                        help="an MVTec AD category: train/good, test/<good or defect>, ground_truth/<defect>")
    layout.add_argument("--normal", metavar="DIR", help="anomalib Folder layout: the normal images")
    layout.add_argument("--list", nargs="+", metavar="DIR_OR_URI",
                        help="every image below these folders or prefixes (local, s3://bucket/prefix/, gs://...), "
                             "recursively; no labels unless --label-from-dir; --out is a directory")
    p.add_argument("--abnormal", metavar="DIR", help="Folder layout: the anomalous images (test)")
    p.add_argument("--normal-test", metavar="DIR", help="Folder layout: normal test images")
    p.add_argument("--mask", metavar="DIR", help="Folder layout: masks named like the anomalous images")
    p.add_argument("--normal-test-fraction", type=float, default=0.2,
                   help="Folder layout without --normal-test: share of the normal images held out for testing "
                        "(default: %(default)s, as anomalib's Folder)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="--mvtec, --normal: share of the test images, per defect type, moved to a 'val' split "
                        "(seeded), whose labels choose the decision threshold; 0 keeps them all for testing "
                        f"(default: {VAL_FRACTION}). --list takes 'val' rows from --split-from-dir")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out and val choices (default: %(default)s)")
    p.add_argument("--out", required=True,
                   help="the index to write (local or a URI): a .parquet file, with --list a directory")
    p.add_argument("--eval-out", metavar="PATH", help="also write its val and test rows alone there (to --score)")
    p.add_argument("--quiet", action="store_true", help="warnings and the summary only")
    g = p.add_argument_group("--list")
    g.add_argument("--label-from-dir", metavar="NAME=0|1,...",
                   help="label each image from the deepest folder below a listed one whose NAME the rule gives: 0 "
                        "normal, 1 anomalous; defect_type is that folder's name; images below no such folder are "
                        "skipped (e.g. good=0,scratch=1,dent=1). Without it the index has no labels")
    g.add_argument("--split-from-dir", metavar="NAME=SPLIT,...",
                   help="the split likewise: SPLIT is train, val or test (e.g. train=train,holdout=val,test=test). "
                        "Without it and with labels, fit trains on the label 0 rows")
    g.add_argument("--rows-per-file", type=int, default=ROWS_PER_FILE, metavar="N",
                   help="rows per parquet file of the index, at most (default: %(default)s)")
    g.add_argument("--list-tasks", type=int, default=None, metavar="N",
                   help="share the listing among about N tasks (default: 2 per CPU of the cluster, at least 4)")
    _cli.add_shared_path_flag(g, "--list or --out")
    return p


def _listing(args: argparse.Namespace) -> int:
    """--list: the flags checked before Ray starts, then the listing in Ray tasks."""
    layout = [flag for flag, value in (("--abnormal", args.abnormal), ("--normal-test", args.normal_test),
                                        ("--mask", args.mask), ("--val-fraction", args.val_fraction),
                                        ("--eval-out", args.eval_out)) if value is not None]
    if layout:
        raise UserError(f"invalid {'/'.join(layout)} with --list: a listing has no layout (labels and splits come "
                        "from --label-from-dir and --split-from-dir)")
    listing = plan_listing(args.list, args.out, args.label_from_dir, args.split_from_dir, args.rows_per_file,
                           args.list_tasks)
    # On a cluster the tasks list and write where they run: a local folder must be one every node mounts.
    local_roots = [r for r in listing.roots if "://" not in r or r.startswith("file://")]
    launch.check_output_location({"--out": listing.out, "--list": local_roots[0] if local_roots else None},
                                 args.shared_path)
    launch.start_ray_for_tasks()
    summary = write_listing(listing)
    print(json.dumps(summary, indent=2))
    print(f"index: {listing.out} ({summary['rows']} rows in {summary['files']} files; {summary['skipped']} of "
          f"{summary['found']} entries skipped, listed in {listing.out}/_skipped-*.tsv)")
    return 0


def main(args: argparse.Namespace) -> int:
    _cli.setup_logging(args.quiet)
    if args.list:
        return _listing(args)
    rule = [flag for flag, value in (("--label-from-dir", args.label_from_dir),
                                     ("--split-from-dir", args.split_from_dir)) if value is not None]
    if rule:
        raise UserError(f"invalid {'/'.join(rule)} without --list: --mvtec and --normal label by their layout")
    if args.mvtec and (args.abnormal or args.normal_test or args.mask):
        raise UserError("invalid --abnormal/--normal-test/--mask with --mvtec: they describe the Folder layout")
    val_fraction = VAL_FRACTION if args.val_fraction is None else args.val_fraction
    if args.mvtec:
        index = mvtec_index(args.mvtec, val_fraction, args.seed)
    else:
        index = folder_index(args.normal, args.abnormal, args.normal_test, args.mask, args.normal_test_fraction,
                             val_fraction, args.seed)
    summary = write_index(index, args.out, args.eval_out)
    print(json.dumps(summary, indent=2))
    print(f"index: {args.out} ({summary['rows']} rows; {summary['skipped']} files skipped, listed in "
          f"{args.out}.skipped.tsv)")
    return 0


def cli() -> None:
    """The command line: flags parsed, the job run, the exit code set (``_cli.run_main``)."""
    _cli.run_main(main, get_args_parser, RENAMED)


if __name__ == "__main__":
    cli()
