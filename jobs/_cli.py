"""What the jobs share: their parsers' common flags, logging, exit codes and the lines they print.

Only ``jobs/`` configures logging and decides when Ray starts (``rayanom.launch`` starts it).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
import traceback
import typing
from collections.abc import Callable

from rayanom import launch
from rayanom.config import ModelConfig, RunConfig, UserError
from rayanom.decisions import NO_THRESHOLD

logger = logging.getLogger("rayanom.jobs")

# A wait on the cluster that ran out ends the job with a message naming the flag that sets it (launch's probe task,
# the actor pool's start and progress timeouts): the user's to change, so exit 2 with that one line.
TIMEOUT_FLAGS = ("--wait-for-actors", "--no-progress-timeout")
# A name in a message: "batch_size=" in "invalid batch_size=0: ...", or a bare "n_pca_components" (never a part of a
# path, a file name or a flag).
_NAMED = re.compile(r"(?<![\w/.-])([a-z][a-z0-9]*(?:_[a-z0-9]+)*)(?:(=)|(?![\w/=-]|\.\w))")


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose usage errors are one line (the full usage is a screen long): ``error: ...``, exit 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parser(doc: str, add_help: bool = True) -> argparse.ArgumentParser:
    """A job's parser: its module docstring as the description, kept as written."""
    return _Parser(description=doc, add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter)


class Renamed(argparse.Action):
    """Store a flag's value as argparse's default action does, warning on an old spelling.

    The option strings after the first are old spellings, kept for one release, and log a deprecation warning naming the
    new one."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if option_string is not None and option_string != self.option_strings[0]:
            logger.warning("%s is deprecated and will be removed in the next release: use %s", option_string,
                           self.option_strings[0])
        setattr(namespace, self.dest, values)


def add_model_dir_flag(parser: argparse.ArgumentParser, about: str, required: bool = False) -> None:
    """Add ``--model-dir MODEL_DIR``, an artifact directory, to a job that takes one.

    ``--model`` is its deprecated spelling, for one release (fit.py's ``--model`` is the model to fit)."""
    parser.add_argument("--model-dir", "--model", dest="model_dir", action=Renamed, required=required,
                        metavar="MODEL_DIR", help=f"{about}; --model: deprecated spelling")


def add_shared_path_flag(parser: argparse.ArgumentParser, paths: str) -> None:
    """``--shared-path``: the local output paths are on a filesystem every node mounts.

    ``paths``: the flags it speaks for, in its help; ``launch.check_output_location`` reads it."""
    parser.add_argument("--shared-path", action="store_true",
                        help=f"the local {paths} path is on a filesystem every node of the cluster mounts at the same "
                             "place (NFS, EFS, ...). Without it a local path is refused on a cluster that has or can "
                             "add more than one node, where each node would write to its own disk: use a URI "
                             "(s3://bucket/..., gs://...) or a shared mount with this flag. An embedded local Ray "
                             "never refuses (default: off)")


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """The run flags; their defaults are RunConfig's (written there once)."""
    g = parser.add_argument_group("run (resources and speed, recorded in the artifact's provenance; "
                                  "--precision is also part of the model's identity)")
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
    """INFO lines (and Ray Data's progress) unless ``quiet``: then warnings only."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if quiet:  # Ray Data's logger has its own handler at INFO ("Starting execution of Dataset ...")
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def start_ray(args: argparse.Namespace, config, fitted_precision: str | None = None):
    """``launch.start_ray`` with the run flags: the RunConfig for what Ray offers, ``--precision auto`` resolved."""
    return launch.start_ray(config, device=args.device, num_actors=args.num_actors,
                            threads_per_actor=args.threads_per_actor, precision=args.precision,
                            fitted_precision=fitted_precision, batch_size=args.batch_size,
                            rows_per_part=args.rows_per_part, io_retries=args.io_retries,
                            max_file_bytes=args.max_file_bytes, no_progress_s=args.no_progress_timeout,
                            start_timeout_s=args.wait_for_actors, progress=not args.quiet)


def run_main(main: Callable[[argparse.Namespace], int], get_parser: Callable[[], argparse.ArgumentParser],
             renamed: dict[str, str | None] | None = None) -> None:
    """Parse the flags and run ``main``, exiting 0 on success, 2 on a user error and 1 on an internal failure.

    A user error prints one line that names flags, no traceback. ``renamed``: names in messages whose flag is not the
    parser's dest of that name (``{"model": "--model-dir"}``; None: leave the name as it is)."""
    parser = get_parser()
    args = parser.parse_args()
    try:
        code = main(args)
    except UserError as e:
        code = user_error(str(e), flag_names(parser, renamed))
    except KeyboardInterrupt:
        code = 130
    except Exception as e:  # noqa: BLE001 - last resort: show the traceback and exit 1
        if not timed_out(e):
            traceback.print_exc()
            code = 1
        else:
            code = user_error(str(e), {})
    sys.exit(code)


def user_error(message: str, names: dict[str, str]) -> int:
    """``error: MESSAGE`` on one line, with its field names written as flags (``name_flags``); returns exit code 2."""
    print("error: " + " ".join(name_flags(message, names).split()), file=sys.stderr)
    return 2


def timed_out(e: BaseException) -> bool:
    """Whether ``e`` is a wait on the cluster that ran out.

    That is a RuntimeError naming the flag that sets the wait (``TIMEOUT_FLAGS``), or Ray's own ``GetTimeoutError``."""
    ray = sys.modules.get("ray")
    if ray is not None and isinstance(e, ray.exceptions.GetTimeoutError):
        return True
    return type(e) is RuntimeError and any(flag in str(e) for flag in TIMEOUT_FLAGS)


def flag_names(parser: argparse.ArgumentParser, renamed: dict[str, str | None] | None = None) -> dict[str, str]:
    """Map each name a message may use to the flag that sets it.

    The names: every dest of ``parser`` (``batch_size`` -> ``--batch-size``), the config fields whose flag has another
    name (their ``flag`` metadata: ``no_progress_s`` -> ``--no-progress-timeout``, DFM's ``layer`` -> ``--layers``)
    where ``parser`` has that flag, and ``renamed``."""
    # argparse has no public list of a parser's flags: its ``_actions`` is the one place they are all found.
    flags = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help"}
    names = dict(flags)
    for cls in (RunConfig, *typing.get_args(ModelConfig)):
        names.update({f.name: f.metadata["flag"] for f in dataclasses.fields(cls)
                      if f.metadata.get("flag") in flags.values()})
    names.update(renamed or {})
    return {k: v for k, v in names.items() if v}


def name_flags(message: str, names: dict[str, str]) -> str:
    """Rewrite ``message`` with each name of ``names`` written as its flag.

    A name is rewritten where it is a ``NAME=`` or a snake_case word: ``invalid batch_size=0: ...`` -> ``invalid
    --batch-size=0: ...``; ``lower n_pca_components`` -> ``lower --n-pca-components``. The library's messages name
    fields and keywords; the jobs' users know the flags."""

    def flag(m: re.Match) -> str:
        name, eq = m.groups()
        return names[name] + (eq or "") if name in names and (eq or "_" in name) else m.group(0)

    return _NAMED.sub(flag, message)


def print_summary(summary: dict) -> None:
    auroc = summary.get("auroc")
    kinds = summary.get("failed_by_kind") or {}
    line = (f"scored {summary['scored']} of {summary['rows']} rows, {summary['failed']} failed"
            + (" (" + ", ".join(f"{k} {n}" for k, n in kinds.items()) + ")" if kinds else "")
            + (f", image AUROC {auroc:.4f} ({summary['n_normal']} normal, {summary['n_anomalous']} anomalous)"
               if auroc is not None else ""))
    print(line)
    t = summary.get("threshold")

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
