"""Fit an anomaly model on the normal training images of a parquet index, on Ray.

    python jobs/fit.py --model dfkde                         # demo: local Ray, generated images, fit + score
    python jobs/fit.py --model dfkde --index train.parquet --out runs/r1 --score test.parquet
    ray job submit --working-dir . -- python jobs/fit.py --model dfkde --index s3://b/train.parquet --out s3://b/r1

Writes OUT/model (config.json + head.safetensors) and, with --score, OUT/scores (parquet).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os

if __package__:  # python -m jobs.fit, or the rayanom-* console scripts
    from . import _cli
else:  # python jobs/fit.py (the README, ray job submit): jobs/ is the script's own directory
    import _cli

logger = logging.getLogger("rayanom.jobs.fit")

DEMO_ROOT = os.path.join("runs", "demo-data")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    from rayanom.config import CONFIG_CLASSES, DfkdeConfig

    p = _cli.parser(__doc__, add_help)
    p.add_argument("--model", required=True, choices=list(CONFIG_CLASSES), help="model to fit")
    p.add_argument("--index", help="parquet index with a 'path' column (default: a generated demo set)")
    p.add_argument("--out", help="run directory (default: runs/<model>-demo for the demo; required with --index)")
    p.add_argument("--score", metavar="INDEX",
                   help="score this index with the fitted model in the same job (default: none; the demo's test set)")
    _cli.add_threshold_flag(p, "(stored beside the model, OUT/model/threshold.json; default: the F1-adaptive "
                               "threshold of the labelled 'val' rows of the --score index, or without --score of "
                               "the fit index, scored into OUT/val-scores, when it has some)")
    _cli.add_report_flags(p, "OUT/report", "8 for the DFM/RKDE demo, else 0", "yes for the demo")
    m = p.add_argument_group("model, all (stored in the artifact)")
    m.add_argument("--max-training-points", type=int, default=DfkdeConfig.max_training_points,
                   help="memory bank cap, images (DFKDE, DFM) or regions (RKDE) (default: %(default)s)")
    m.add_argument("--seed", type=int, default=DfkdeConfig.seed,
                   help="bank sampling and random-weight seed (default: %(default)s)")
    groups: dict[tuple[str, ...], argparse._ArgumentGroup] = {}
    for name, models in model_flags().items():
        if models not in groups:
            names = ", ".join(models[:-1]) + " and " + models[-1] if len(models) > 1 else models[0]
            groups[models] = p.add_argument_group(f"model, {names} (stored in the artifact)")
        if name in FIELD_FLAGS:
            kwargs, what = FIELD_FLAGS[name]
            groups[models].add_argument("--" + name.replace("_", "-"), default=None,
                                        help=f"{what} ({default_of(name)})", **kwargs)
        else:
            kwargs, what = WEIGHT_FLAG_HELP[name]
            groups[models].add_argument("--" + name.replace("_", "-"), help=what, **kwargs)
    _cli.add_run_flags(p)
    return p


def main(args: argparse.Namespace) -> int:
    from rayanom.config import UserError

    _cli.setup_logging(args.quiet)
    config = build_config(args)
    index, score_index, out, pretrained = args.index, args.score, args.out, args.pretrained
    heatmaps, boxes, evaluate = args.heatmaps or 0, args.boxes or 0, bool(args.evaluate)
    if index is None:
        from rayanom.demo import make_demo

        # RKDE runs a Faster R-CNN at 800 x 1200 per image (~3 s on a 2-core CPU): a smaller demo set for it.
        root = DEMO_ROOT + "-rkde" if config.model == "rkde" else DEMO_ROOT
        index = os.path.join(root, "index.parquet")
        if not os.path.exists(index):
            sizes = {"n_train": 30, "n_test_normal": 10, "n_test_anomalous": 10} if config.model == "rkde" else {}
            make_demo(root, seed=0, **sizes)
        score_index = score_index or os.path.join(root, "test.parquet")
        out = out or os.path.join("runs", f"{args.model}-demo")
        pretrained = bool(pretrained)
        heatmaps = 8 if args.heatmaps is None and config.model == "dfm" else heatmaps
        boxes = 8 if args.boxes is None and config.model == "rkde" else boxes
        evaluate = args.evaluate is not False
    elif out is None:
        raise UserError("invalid out=None: --out RUN_DIR is required with --index")
    if pretrained is None:
        pretrained = not args.weights
    model_dir, scores_dir = _join(out, "model"), _join(out, "scores")

    # Everything a user can get wrong in flags and outputs is checked here, before Ray starts.
    # The index's schema is read from its footers here; its values (labels) and training rows are checked by the
    # workers once Ray has started, before any output is written.
    from rayanom import pipeline
    from rayanom.index import describe_index
    from rayanom.features import resolve_weights
    from rayanom.parts import check_parts_dir, has_parts

    train_info = describe_index(index)
    score_info = describe_index(score_index) if score_index else None
    if score_index:
        check_parts_dir(scores_dir)
        _cli.check_report(config, _join(out, "report"), evaluate, heatmaps, boxes, args.region_rows)
    elif evaluate or heatmaps or boxes or args.region_rows:
        raise UserError("invalid --evaluate/--heatmaps/--boxes/--region-rows: they report on scores; add --score")
    if config.model == "rkde":
        from rayanom.regions import rkde_weights

        _, source = rkde_weights(config, args.detector_weights, args.region_weights)
    else:  # read and checked here; each actor loads its own from the source (pipeline.load_weights)
        _, source = resolve_weights(config, args.weights, pretrained)
    fingerprint = pipeline.fit_fingerprint(train_info, config, source)
    artifact = _fitted_before(model_dir, fingerprint, args.overwrite, args.precision)
    if artifact is None and score_index and not args.overwrite and has_parts(scores_dir):
        raise UserError(f"output {scores_dir!r} holds scores of an earlier model; pass --overwrite to replace them")
    with contextlib.ExitStack() as stack:
        lease = stack.enter_context(_cli.output_lease(scores_dir)) if score_info is not None else None
        return _fit_and_score(args, config, train_info, score_info, index, source, artifact, lease, out,
                              (evaluate, heatmaps, boxes))


def _fit_and_score(args, config, train_info, score_info, index, source, artifact, lease, out, report) -> int:
    from rayanom import pipeline

    model_dir, scores_dir = _join(out, "model"), _join(out, "scores")
    evaluate, heatmaps, boxes = report
    run = _cli.init_ray(args, config, _cli.fitted_precision(artifact) if artifact else None)
    if score_info is not None:
        _cli.check_index_values(score_info)
    if artifact is None:
        result = pipeline.fit(train_info, config, source, run, index_name=index)
        artifact = result.artifact
        artifact.save(model_dir, overwrite=True)  # occupied directories were refused above
        print(f"fitted {args.model} on {result.n_read - result.n_failed} of {result.n_read} training rows read "
              f"({result.n_failed} failed; {result.n_train} in the index), bank {artifact.provenance['n_bank_rows']} x "
              f"{artifact.provenance['feature_dim']}")
    else:
        print("model already fitted with these settings, index and weights: reused")
    print(f"model: {model_dir}")
    code = _cli.check_failed_fraction("training", artifact.provenance["n_failed_rows"],  # of the rows read
                                      artifact.provenance.get("n_read_rows", artifact.provenance["n_train_rows"]),
                                      args.max_failed_fraction)
    if score_info is not None:
        import dataclasses

        from rayanom.decide import Threshold, load_threshold, save_threshold, settle

        fingerprint = pipeline.artifact_fingerprint(artifact)
        stored = load_threshold(model_dir, fingerprint)
        used = Threshold(args.threshold) if args.threshold is not None else stored
        summary = pipeline.score(score_info, artifact, scores_dir, run, overwrite=args.overwrite, job=lease.job,
                                 threshold=used)
        t = settle(scores_dir, used, args.threshold)
        if t is not None and t != stored:
            save_threshold(model_dir, t, fingerprint)
        summary["threshold"] = dataclasses.asdict(t) if t else None
        _cli.print_summary(summary)
        _cli.write_report(scores_dir, _join(out, "report"), evaluate, heatmaps, boxes, args.region_rows,
                          decision=t.value if t else None, config=artifact.config)
        code = code or _cli.check_failed_fraction("scored", summary["failed"], summary["rows"],
                                                  args.max_failed_fraction)
    else:
        _val_threshold(args, artifact, train_info, run, out)
    return code


def _val_threshold(args, artifact, train_info, run, out) -> None:
    """Without --score: the fit index's own labelled 'val' rows, when it has some, are written as an index
    (OUT/val-index, on the workers), scored (OUT/val-scores) and their F1-adaptive threshold stored beside the model
    (--threshold VALUE: that value, with their score range); nothing when a threshold for this model is stored."""
    import dataclasses

    from rayanom import pipeline
    from rayanom.decide import Threshold, load_threshold, save_threshold, settle
    from rayanom.index import describe_index, write_split

    model_dir = _join(out, "model")
    fingerprint = pipeline.artifact_fingerprint(artifact)
    stored = load_threshold(model_dir, fingerprint)
    if stored is not None and args.threshold in (None, stored.value):
        return
    val_index, val_scores = _join(out, "val-index"), _join(out, "val-scores")
    n = write_split(train_info, "val", val_index)
    if not n:
        if args.threshold is not None:
            save_threshold(model_dir, Threshold(args.threshold), fingerprint)
        return
    with _cli.output_lease(val_scores) as lease:  # this job's own output: replaced when the model changed
        used = Threshold(args.threshold) if args.threshold is not None else None
        summary = pipeline.score(describe_index(val_index), artifact, val_scores, run, overwrite=True, job=lease.job,
                                 threshold=used)
        t = settle(val_scores, used, args.threshold)
    if t is not None:
        save_threshold(model_dir, t, fingerprint)
    summary["threshold"] = dataclasses.asdict(t) if t else None
    print(f"validation rows of the fit index ({n}) scored into {val_scores}:")
    _cli.print_summary(summary)


def _fitted_before(model_dir: str, fingerprint: str, overwrite: bool, precision: str):
    """The artifact in ``model_dir`` if it was fitted from exactly these inputs (fitting is idempotent: reuse it) and,
    unless ``precision`` is auto, in that precision; None when there is none or ``overwrite``; an error when it holds
    another model."""
    from rayanom.artifact import CONFIG_FILE, MODEL_FILES, Artifact, check_output_dir
    from rayanom.config import UserError

    existing = check_output_dir(model_dir, MODEL_FILES.__contains__, overwrite=True)
    if overwrite or CONFIG_FILE not in existing:
        return None  # nothing there, replacing on request, or an incomplete save (config.json is written last)
    try:
        artifact = Artifact.load(model_dir)
    except UserError:
        artifact = None
    if artifact is not None and artifact.provenance.get("fit_fingerprint") == fingerprint:
        fitted = _cli.fitted_precision(artifact)
        if precision in ("auto", fitted):
            return artifact
        raise UserError(f"output {model_dir!r} holds this model fitted in {fitted}; pass --overwrite to refit it in "
                        f"{precision} (or --precision auto to reuse it)")
    raise UserError(f"output {model_dir!r} holds a model fitted with other settings, index or weights; "
                    "pass --overwrite to replace it")


def _pca_level(text: str) -> float | int:
    try:
        return int(text)
    except ValueError:
        return float(text)


# The model flags: each config field (the dataclasses hold the defaults) -> argparse keywords and what it is.
FIELD_FLAGS = {
    "backbone": ({}, "timm CNN name, optionally with a tag"),
    "layers": ({"nargs": "+"}, "feature layers, concatenated on the feature axis"),
    "image_size": ({"type": int, "nargs": "+", "metavar": "PX"},
                   "network input: SIZE or HEIGHT WIDTH (RKDE's is fixed)"),
    "n_pca_components": ({"type": int}, "PCA components"),
    "feature_scaling": ({"choices": ["scale", "norm"]}, "projections divided by the largest training norm, or unit"),
    "layer": ({}, "feature layer"),
    "pooling_kernel_size": ({"type": int}, "average-pooling kernel"),
    "pca_level": ({"type": _pca_level},
                  "variance fraction in (0, 1), or an integer number of components > 1"),
    "score_type": ({"choices": ["fre", "nll"]}, "feature reconstruction error (with anomaly maps) or Gaussian NLL"),
    "roi_stage": ({"choices": ["rcnn", "rpn"]}, "regions from the detector's boxes or from the RPN's proposals"),
    "roi_score_threshold": ({"type": float}, "lowest candidate score kept"),
    "min_box_size": ({"type": int}, "smallest box side, pixels of the 240x360 frame"),
    "iou_threshold": ({"type": float}, "class-agnostic NMS"),
    "max_detections_per_image": ({"type": int}, "regions kept per image"),
}
WEIGHT_FLAG_HELP = {
    "weights": ({"metavar": "PATH"}, "timm state dict (.safetensors, or .pth read with weights_only=True), local or a "
                "URI; every actor reads it, so on a cluster a path every node can read (default: none)"),
    "pretrained": ({"action": argparse.BooleanOptionalAction, "default": None},
                   "timm pretrained weights (needs network or the HF cache); default: yes with --index, no for the "
                   "demo (random weights seeded with --seed)"),
    "detector_weights": ({"metavar": "PATH"}, "torchvision Faster R-CNN ResNet-50 FPN state dict, COCO_V1 layout "
                         "(default: seeded random)"),
    "region_weights": ({"metavar": "PATH"}, "region feature extractor state dict, layout of anomalib's "
                       "rkde_feature_extractor.pth (default: seeded random)"),
}
# Flags that say where the weights come from (not config fields), and the models they apply to.
WEIGHT_FLAGS = {"weights": ("dfkde", "dfm"), "pretrained": ("dfkde", "dfm"), "detector_weights": ("rkde",),
                "region_weights": ("rkde",)}
COMMON = ("max_training_points", "seed")  # fields every model has, with one flag default


def model_flags() -> dict[str, tuple[str, ...]]:
    """Flag -> the models it applies to: each config dataclass's fields (the one list of them), and WEIGHT_FLAGS."""
    import dataclasses

    from rayanom.config import CONFIG_CLASSES

    out: dict[str, tuple[str, ...]] = {}
    for model, cls in CONFIG_CLASSES.items():
        for f in dataclasses.fields(cls):
            if f.init and f.name not in COMMON:
                out[f.name] = (*out.get(f.name, ()), model)
    return {**out, **WEIGHT_FLAGS}


def default_of(name: str) -> str:
    """``default: ...`` for a model flag, read from the config dataclasses (per model where they differ)."""
    import dataclasses

    from rayanom.config import CONFIG_CLASSES

    shown = {}
    for model, cls in CONFIG_CLASSES.items():
        for f in dataclasses.fields(cls):
            if f.name == name and f.init:
                v = f.default
                shown[model] = " ".join(map(str, v)) if isinstance(v, tuple) else str(v)
    if len(set(shown.values())) == 1:
        return f"default: {next(iter(shown.values()))}"
    by_value: dict[str, list[str]] = {}
    for model, v in shown.items():
        by_value.setdefault(v, []).append(model)
    return "default: " + ", ".join(f"{v} ({', '.join(models)})" for v, models in by_value.items())


def build_config(args: argparse.Namespace):
    """The model config from the flags; a flag of another model is an error, not silently ignored."""
    from rayanom.config import CONFIG_CLASSES, UserError

    kwargs = {"max_training_points": args.max_training_points, "seed": args.seed}
    for name, models in model_flags().items():
        value = getattr(args, name)
        if value is None:
            continue
        if args.model not in models:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"invalid {flag}: it applies to --model {' or '.join(models)}, not {args.model}")
        if name == "image_size":
            if len(value) not in (1, 2):
                raise UserError(f"invalid image_size={value}: expected SIZE or HEIGHT WIDTH")
            value = (value[0], value[-1])
        if name not in WEIGHT_FLAGS:
            kwargs[name] = tuple(value) if isinstance(value, list) else value
    return CONFIG_CLASSES[args.model](**kwargs)


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def cli() -> None:
    """The command line: flags parsed, the job run, the exit code set (``_cli.run_main``)."""
    _cli.run_main(lambda: main(get_args_parser().parse_args()))


if __name__ == "__main__":
    cli()
