"""Compare two scoring runs over the same images (a new model, new weights) or two production batches (drift).

    python jobs/compare.py --a runs/r1/scores --b runs/r2/scores --out runs/r1-vs-r2

Writes OUT/compare.json and OUT/compare.png: Spearman's rank correlation of the scores, the decisions flipped (and
the flipped images that moved most, with thumbnails), and the shift of the normalised-score distribution per defect
type (Kolmogorov-Smirnov). Rows are joined on row_index when both runs scored the same index, else on path; the
distributions compare each run's scored rows, joined or not. Streams the parts: driver memory stays bounded. No Ray.
"""

from __future__ import annotations

import argparse

if __package__:  # python -m jobs.compare, or the rayanom-* console scripts
    from . import _cli
else:  # python jobs/compare.py (the README, ray job submit): jobs/ is the script's own directory
    import _cli


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = _cli.parser(__doc__, add_help)
    p.add_argument("--a", required=True, metavar="SCORES", help="the first (earlier) scores directory")
    p.add_argument("--b", required=True, metavar="SCORES", help="the second (later) scores directory")
    p.add_argument("--out", required=True, help="directory for compare.json and compare.png (local path or URI)")
    p.add_argument("--top", type=int, default=16, help="flipped images listed, most moved first (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="warnings and the summary only")
    return p


def main(args: argparse.Namespace) -> int:
    from rayanom.compare import compare_runs
    from rayanom.config import UserError

    _cli.setup_logging(args.quiet)
    if args.top < 0:
        raise UserError(f"invalid top={args.top}: expected an integer >= 0")
    r = compare_runs(args.a, args.b, args.out, args.top)
    p = r["per_image"]
    rho = "n/a" if p["spearman"] is None else f"{p['spearman']:.4f}"
    flipped = "n/a (no decisions in both)" if p["flipped_fraction"] is None else (
        f"{p['flipped']} of {p['decided_in_both']} ({p['to_anomalous']} to anomalous, {p['to_normal']} to normal)")
    print(f"compared {p['joined']} images joined on {r['joined_on']}: Spearman {rho}; decisions flipped {flipped}")
    for name, s in r["per_defect_type"].items():
        if s["ks_statistic"] is not None:
            print(f"  {name}: KS {s['ks_statistic']:.4f} (p {s['ks_pvalue']:.3g}), median {r['distribution_of']} "
                  f"{s['median_a']:.4g} -> {s['median_b']:.4g} ({s['rows_a']} vs {s['rows_b']} rows)")
    print(f"comparison: {args.out}/compare.json, compare.png")
    return 0


def cli() -> None:
    """The command line: flags parsed, the job run, the exit code set (``_cli.run_main``)."""
    _cli.run_main(lambda: main(get_args_parser().parse_args()))


if __name__ == "__main__":
    cli()
