"""Fit an anomaly model on the normal training images of a parquet index, on Ray.

    python jobs/fit.py --model dfkde                         # demo: local Ray, generated images, fit + score
    python jobs/fit.py --model dfkde --index train.parquet --out runs/r1 --score test.parquet
    ray job submit --working-dir . -- python jobs/fit.py --model dfkde --index s3://b/train.parquet --out s3://b/r1

Writes OUT/model (config.json + head.safetensors) and, with --score, OUT/scores (parquet) and its report,
OUT/scores-report. On a cluster of several nodes OUT is a URI (s3://...) or a shared mount (--shared-path).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import types
import typing
from dataclasses import dataclass

from rayanom import demo, launch, workflows
from rayanom.artifact import fitted_before
from rayanom.columns import BOXES_COL, MAP_COL
from rayanom.config import UserError
from rayanom.index import check_values, describe_index
from rayanom.parts import Lease, check_parts_dir, has_parts
from rayanom.report import check_report, report_dir_of, write_report
from rayanom.specs import SPECS, report_weights, spec
from rayanom.workflows import score_and_decide, threshold_from_fit_index

if __package__:  # python -m jobs.fit, or the rayanom-* console scripts
    from . import _cli
else:  # python jobs/fit.py (the README, ray job submit): jobs/ is the script's own directory
    import _cli


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = _cli.parser(__doc__, add_help)
    p.add_argument("--model", required=True, choices=list(SPECS), help="model to fit")
    p.add_argument("--index", help="parquet index with a 'path' column (default: a generated demo set)")
    p.add_argument("--out", help="run directory (default: runs/<model>-demo for the demo; required with --index)")
    _cli.add_shared_path_flag(p, "--out")
    p.add_argument("--score", metavar="INDEX",
                   help="score this index with the fitted model in the same job (default: none; the demo's test set)")
    _cli.add_threshold_flag(p, "(stored beside the model, OUT/model/threshold.json; default: the F1-adaptive "
                               "threshold of the labelled 'val' rows of the --score index, or without --score of "
                               "the fit index, scored into OUT/val-scores, when it has some)")
    _cli.add_report_flags(p, "OUT/scores-report", "8 for the demo of a model with maps or boxes, else 0",
                          "yes for the demo")
    groups = {}  # models -> the argument group of the flags they share (``add_argument_group``)
    for name, (models, kwargs, about) in model_flags().items():
        if models not in groups:
            names = "all" if models == tuple(SPECS) else ", ".join(models[:-1]) + " and " + models[-1] \
                if len(models) > 1 else models[0]
            groups[models] = p.add_argument_group(f"model, {names} (stored in the artifact)")
        old = [a for a in dict.fromkeys(_old_flag(f) for f in _fields(name)) if a]  # deprecated spellings
        more = {"action": _cli.Renamed, "help": f"{about}; {', '.join(old)}: deprecated spelling"} if old else {}
        groups[models].add_argument(_flag(name), *old, **{"help": about, **more, **kwargs})
    _cli.add_run_flags(p)
    return p


@dataclass
class Plan:
    """What a fit job does, from its flags: the demo's defaults filled in."""

    index: str
    score_index: str | None
    out: str
    download: bool  # timm's pretrained weights unless --weights or --no-pretrained (never for the demo)
    evaluate: bool
    heatmaps: int
    boxes: int

    def at(self, name: str) -> str:
        return self.out.rstrip("/") + "/" + name


def plan(args: argparse.Namespace, spec, config) -> Plan:
    """The embedded default run (no --index): the model's demo set, fit and score, the report and its pictures.

    The pictures are heat maps or box overlays of 8 images, where ``config``'s outputs hold anomaly maps or boxes."""
    if args.index is not None:
        if args.out is None:
            raise UserError("missing --out RUN_DIR: it is required with --index")
        return Plan(args.index, args.score, args.out, True, bool(args.evaluate), args.heatmaps or 0, args.boxes or 0)

    index, test = demo.demo_set(spec)
    columns = spec.columns(config)
    pictures = {flag: 8 if value is None and column in columns else value or 0
                for flag, value, column in (("heatmaps", args.heatmaps, MAP_COL), ("boxes", args.boxes, BOXES_COL))}
    return Plan(index, args.score or test, args.out or f"runs/{spec.name}-demo", False, args.evaluate is not False,
                **pictures)


def main(args: argparse.Namespace) -> int:
    _cli.setup_logging(args.quiet)
    config = build_config(args)
    model = spec(args.model)
    job = plan(args, model, config)
    # on a cluster of several nodes: shared or a URI
    launch.check_output_location({"--out": job.out}, args.shared_path)
    # Everything a user can get wrong in flags and outputs is checked here, before Ray starts. The index's schema is
    # read from its footers here; its values (labels) and training rows are checked by the workers once Ray has
    # started, before any output is written.
    train_info = describe_index(job.index)
    score_info = describe_index(job.score_index) if job.score_index else None
    if score_info is not None:
        check_parts_dir(job.at("scores"))
        check_report(config, report_dir_of(job.at("scores")), job.evaluate, job.heatmaps, job.boxes, args.region_rows)
    elif job.evaluate or job.heatmaps or job.boxes or args.region_rows:
        raise UserError("invalid --evaluate/--heatmaps/--boxes/--region-rows: they report on scores; add --score")
    # The weights are read and checked here; each actor loads its own from the source (stages.load_weights).
    _, source = model.weights(config, {k: getattr(args, k) for k in model.weight_flags}, job.download)
    print(report_weights(config, source, demo=args.index is None))  # the sha256 of each file; random: a WARNING
    fingerprint_of = functools.partial(workflows.fit_fingerprint, train_info, config, source)
    artifact = fitted_before(job.at("model"), fingerprint_of, args.overwrite, args.precision)
    if artifact is None and score_info is not None and not args.overwrite and has_parts(job.at("scores")):
        raise UserError(f"output {job.at('scores')!r} holds scores of an earlier model; pass --overwrite to replace "
                        "them")
    with contextlib.ExitStack() as stack:  # one job per scores directory, refused before Ray starts
        lease = stack.enter_context(Lease(job.at("scores"))) if score_info is not None else None
        run = _cli.start_ray(args, config, artifact.precision if artifact else None)
        if score_info is not None:
            check_values(score_info)  # on the workers, before any output is written
        if artifact is None:
            artifact = _fit(job, train_info, config, source, run)
        else:
            print("model already fitted with these settings, index and weights: reused")
        print(f"model: {job.at('model')}")
        code = _cli.check_failed_fraction("training", artifact.provenance["n_failed_rows"],  # of the rows read
                                          artifact.provenance.get("n_read_rows", artifact.provenance["n_train_rows"]),
                                          args.max_failed_fraction)
        return _score(args, job, artifact, score_info, train_info, run, lease) or code


def _fit(job: Plan, train_info, config, source: dict, run):
    result = workflows.fit(train_info, config, source, run, index_name=job.index)
    result.artifact.save(job.at("model"), overwrite=True)  # occupied directories were refused before Ray started
    print(f"fitted {config.model} on {result.n_read - result.n_failed} of {result.n_read} training rows read "
          f"({result.n_failed} failed; {result.n_train} in the index), bank {result.artifact.provenance['n_bank_rows']}"
          f" x {result.artifact.provenance['feature_dim']}")
    return result.artifact


def _score(args, job: Plan, artifact, score_info, train_info, run, lease) -> int:
    """The --score index scored, decided and reported; without one, the threshold from the fit index's val rows."""
    if score_info is None:
        n, summary = threshold_from_fit_index(train_info, artifact, job.at("model"), job.at("val-index"),
                                              job.at("val-scores"), run, args.threshold)
        if summary is not None:
            print(f"validation rows of the fit index ({n}) scored into {job.at('val-scores')}:")
            _cli.print_summary(summary)
        return 0
    summary = score_and_decide(score_info, artifact, job.at("scores"), run, job.at("model"), args.threshold,
                               store=True, overwrite=args.overwrite, job=lease.job)
    _cli.print_summary(summary)
    decision = summary["threshold"]["value"] if summary["threshold"] else None
    _cli.print_report(write_report(job.at("scores"), report_dir_of(job.at("scores")), job.evaluate, job.heatmaps,
                                   job.boxes, args.region_rows, decision=decision, config=artifact.config), decision)
    return _cli.check_failed_fraction("scored", summary["failed"], summary["rows"], args.max_failed_fraction)


def model_flags() -> dict[str, tuple[tuple[str, ...], dict, str]]:
    """Map each flag's dest to (the models it applies to, argparse keywords, help).

    The flags are each model's config fields (their types, descriptions and defaults, per model where they differ; a
    field whose ``flag`` metadata names another flag joins that one, DFM's ``layer`` joins ``--layers``) and its weight
    flags (``ModelSpec.weight_flags``)."""
    out: dict[str, tuple[tuple[str, ...], dict, str]] = {}
    helps: dict[str, list[str]] = {}
    for name, model in SPECS.items():
        for dest, (f, hint) in _config_fields(model).items():
            models, kwargs, _ = out.get(dest, ((), None, ""))
            if kwargs is None or typing.get_origin(hint) is tuple:  # several values where one model takes several
                kwargs = {"default": None, **_flag_kwargs(hint)}
            out[dest] = (*models, name), kwargs, ""
            _add_help(helps.setdefault(dest, []), f.metadata.get("help", f.name.replace("_", " ")))
        for flag, (kwargs, about) in model.weight_flags.items():
            models = (*out[flag][0], name) if flag in out else (name,)
            out[flag] = (models, kwargs, about)
    for dest, texts in helps.items():
        out[dest] = (*out[dest][:2], f"{'; '.join(texts)} ({default_of(dest)})")
    return out


def _add_help(texts: list[str], text: str) -> None:
    """One help for a flag several models share: each model's text once, a longer one replacing its start."""
    for i, seen in enumerate(texts):
        if text.startswith(seen):
            texts[i] = text
            return
        if seen.startswith(text):
            return
    texts.append(text)


def _config_fields(model) -> dict[str, tuple[dataclasses.Field, typing.Any]]:
    """Flag's dest -> (field, type) of the fields of ``model``'s config that a flag sets."""
    hints = typing.get_type_hints(model.config)
    return {dest_of(f): (f, hints[f.name]) for f in dataclasses.fields(model.config) if f.init}


def dest_of(f: dataclasses.Field) -> str:
    """The dest of the flag that sets config field ``f``.

    That is its name, or that of the flag its ``flag`` metadata names (DFM's ``layer``: ``--layers``). The field names
    stay: config.json stores them and fingerprints hash them."""
    return f.metadata.get("flag", "--" + f.name)[2:].replace("-", "_")


def _fields(dest: str) -> list[dataclasses.Field]:
    return [f for model in SPECS.values() for d, (f, _) in _config_fields(model).items() if d == dest]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _old_flag(f: dataclasses.Field) -> str | None:
    """The field's own spelling, where its flag has another name: a deprecated alias for one release."""
    return _flag(f.name) if dest_of(f) != f.name else None


def _flag_kwargs(hint) -> dict:
    """argparse keywords for a config field of type ``hint``: choices for a Literal, several values for a tuple."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return {"choices": list(args)}
    if origin is tuple:
        return {"nargs": "+", "type": args[0]}
    if origin in (typing.Union, types.UnionType):  # float | int: an integer when it reads as one
        return {"type": _int_or_float}
    return {"type": hint}


def _int_or_float(text: str) -> float | int:
    try:
        return int(text)
    except ValueError:
        return float(text)


def default_of(dest: str) -> str:
    """``default: ...`` for a model flag, read from the config dataclasses (per model where they differ)."""
    by_value: dict[str, list[str]] = {}
    for model in SPECS.values():
        f = _config_fields(model).get(dest, (None,))[0]
        if f is not None:
            v = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else str(f.default)
            by_value.setdefault(v, []).append(model.name)
    if len(by_value) == 1:
        return f"default: {next(iter(by_value))}"
    return "default: " + ", ".join(f"{v} ({', '.join(models)})" for v, models in by_value.items())


def build_config(args: argparse.Namespace):
    """The model config from the flags; a flag of another model is an error, not silently ignored."""
    model = spec(args.model)
    fields = _config_fields(model)
    kwargs = {}
    for name, (models, _, _) in model_flags().items():
        value = getattr(args, name)
        if value is None or (name in model.weight_flags and args.model in models):
            continue
        if args.model not in models:
            raise UserError(f"invalid {_flag(name)}: it applies to --model {' or '.join(models)}, not {args.model}")
        f, hint = fields[name]
        if isinstance(value, list) and typing.get_origin(hint) is not tuple:  # a flag another model gives several
            if len(value) != 1:
                raise UserError(f"invalid {_flag(name)}={value}: --model {args.model} takes exactly one value")
            value = value[0]
        kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    size = kwargs.get("image_size")
    if size is not None:  # SIZE or HEIGHT WIDTH
        if len(size) not in (1, 2):
            raise UserError(f"invalid --image-size={list(size)}: expected SIZE or HEIGHT WIDTH")
        kwargs["image_size"] = (size[0], size[-1])
    return model.config(**kwargs)


def cli() -> None:
    """The command line: flags parsed, the job run, the exit code set (``_cli.run_main``)."""
    _cli.run_main(main, get_args_parser, {"model": None})  # "model=" in a message: an artifact, not --model


if __name__ == "__main__":
    cli()
