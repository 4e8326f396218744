"""Compare two scoring runs over the same images (a new model, new weights) or two production batches (drift).

    python jobs/compare.py --before runs/r1/scores --after runs/r2/scores --names r1 r2 --out runs/r1-vs-r2

Writes OUT/compare.json and OUT/compare.png: Spearman's rank correlation of the scores, the decisions flipped (and
the flipped images that moved most, with thumbnails), and the shift of the normalised-score distribution per defect
type (Kolmogorov-Smirnov). Rows are joined on row_index when both runs scored the same index, else on path; the
distributions compare each run's scored rows, joined or not. Streams the parts: driver memory stays bounded. No Ray.
"""

from __future__ import annotations

import argparse
import re

from rayanom.compare import compare_runs
from rayanom.config import UserError

if __package__:  # python -m jobs.compare, or the rayanom-* console scripts
    from . import _cli
else:  # python jobs/compare.py (the README, ray job submit): jobs/ is the script's own directory
    import _cli


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = _cli.parser(__doc__, add_help)
    p.add_argument("--before", "--a", dest="before", action=_cli.Renamed, required=True, metavar="SCORES",
                   help="the earlier run's scores directory (run 'a' of compare.json); --a: deprecated spelling")
    p.add_argument("--after", "--b", dest="after", action=_cli.Renamed, required=True, metavar="SCORES",
                   help="the later run's scores directory (run 'b' of compare.json); --b: deprecated spelling")
    p.add_argument("--names", nargs=2, default=["before", "after"], metavar=("BEFORE_NAME", "AFTER_NAME"),
                   help="the two runs' names in the printed summary (default: before after)")
    p.add_argument("--out", required=True, help="directory for compare.json and compare.png (local path or URI)")
    p.add_argument("--top", type=int, default=16, help="flipped images listed, most moved first (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="warnings and the summary only")
    return p


def main(args: argparse.Namespace) -> int:
    _cli.setup_logging(args.quiet)
    if args.top < 0:
        raise UserError(f"invalid --top={args.top}: expected an integer >= 0")
    try:
        r = compare_runs(args.before, args.after, args.out, args.top)
    except UserError as e:  # "scores=URI": the run's own flag
        runs = {f"scores={uri!r}": f"{flag}={uri!r}" for flag, uri in (("--before", args.before),
                                                                          ("--after", args.after))}
        raise UserError(re.sub("|".join(map(re.escape, runs)), lambda m: runs[m.group(0)], str(e))) from None
    p, (a, b) = r["per_image"], args.names
    rho = "n/a" if p["spearman"] is None else f"{p['spearman']:.4f}"
    flipped = "n/a (no decisions in both)" if p["flipped_fraction"] is None else (
        f"{p['flipped']} of {p['decided_in_both']} ({p['to_anomalous']} to anomalous, {p['to_normal']} to normal)")
    print(f"compared {a} -> {b}, {p['joined']} images joined on {r['joined_on']}: Spearman {rho}; decisions flipped "
          f"{flipped}")
    for name, s in r["per_defect_type"].items():
        if s["ks_statistic"] is not None:
            print(f"  {name}: KS {s['ks_statistic']:.4f} (p {s['ks_pvalue']:.3g}), median {r['distribution_of']} "
                  f"{s['median_a']:.4g} ({a}) -> {s['median_b']:.4g} ({b}), {s['rows_a']} vs {s['rows_b']} rows")
    print(f"comparison: {args.out}/compare.json, compare.png")
    return 0


def cli() -> None:
    """The command line: flags parsed, the job run, the exit code set (``_cli.run_main``)."""
    _cli.run_main(main, get_args_parser)


if __name__ == "__main__":
    cli()
