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
    p = _cli.parser(__doc__, add_help)
    p.add_argument("--model", required=True, choices=["dfkde", "dfm", "rkde"], help="model to fit")
    p.add_argument("--index", help="parquet index with a 'path' column (default: a generated demo set)")
    p.add_argument("--out", help="run directory (default: runs/<model>-demo for the demo; required with --index)")
    p.add_argument("--score", metavar="INDEX",
                   help="score this index with the fitted model in the same job (default: none; the demo's test set)")
    _cli.add_threshold_flag(p, "(stored beside the model, OUT/model/threshold.json; default: the F1-adaptive "
                               "threshold of the labelled 'val' rows of the --score index, or without --score of "
                               "the fit index, scored into OUT/val-scores, when it has some)")
    _cli.add_report_flags(p, "OUT/report", "8 for the DFM/RKDE demo, else 0", "yes for the demo")
    m = p.add_argument_group("model, all (stored in the artifact)")
    m.add_argument("--max-training-points", type=int, default=40_000,
                   help="memory bank cap, images (DFKDE, DFM) or regions (RKDE) (default: %(default)s)")
    m.add_argument("--seed", type=int, default=0, help="bank sampling and random-weight seed (default: %(default)s)")
    b = p.add_argument_group("model, dfkde and dfm")
    b.add_argument("--backbone", default=None, help="timm CNN name, optionally with a tag (default: resnet50)")
    b.add_argument("--image-size", type=int, nargs="+", default=None, metavar="PX",
                   help="network input: SIZE or HEIGHT WIDTH (default: 256 256; RKDE: fixed 240 360)")
    b.add_argument("--weights", metavar="PATH",
                   help="timm state dict (.safetensors, or .pth read with weights_only=True), local or a URI; every "
                        "actor reads it, so on a cluster a path every node can read (default: none)")
    b.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                   help="timm pretrained weights (needs network or the HF cache); default: yes with --index, "
                        "no for the demo (random weights seeded with --seed)")
    k = p.add_argument_group("model, dfkde and rkde")
    k.add_argument("--n-pca-components", type=int, default=None, help="default: 16")
    k.add_argument("--feature-scaling", choices=["scale", "norm"], default=None, help="default: scale")
    k.add_argument("--layers", nargs="+", default=None, help="dfkde: feature layers, concatenated (default: layer4)")
    f = p.add_argument_group("model, dfm only")
    f.add_argument("--layer", default=None, help="feature layer (default: layer3)")
    f.add_argument("--pooling-kernel-size", type=int, default=None, help="average-pooling kernel (default: 4)")
    f.add_argument("--pca-level", type=_pca_level, default=None,
                   help="variance fraction in (0, 1), or an integer number of components > 1 (default: 0.97)")
    f.add_argument("--score-type", choices=["fre", "nll"], default=None, help="default: fre")
    r = p.add_argument_group("model, rkde only")
    r.add_argument("--roi-stage", choices=["rcnn", "rpn"], default=None, help="default: rcnn")
    r.add_argument("--roi-score-threshold", type=float, default=None, help="default: 0.001")
    r.add_argument("--min-box-size", type=int, default=None, help="pixels of the 240x360 frame (default: 25)")
    r.add_argument("--iou-threshold", type=float, default=None, help="class-agnostic NMS (default: 0.3)")
    r.add_argument("--max-detections-per-image", type=int, default=None, help="default: 100")
    r.add_argument("--detector-weights", metavar="PATH",
                   help="torchvision Faster R-CNN ResNet-50 FPN state dict, COCO_V1 layout (default: seeded random)")
    r.add_argument("--region-weights", metavar="PATH",
                   help="region feature extractor state dict, layout of anomalib's rkde_feature_extractor.pth "
                        "(default: seeded random)")
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


MODEL_FLAGS = {  # flag -> the models it applies to
    "backbone": ("dfkde", "dfm"), "image_size": ("dfkde", "dfm"), "weights": ("dfkde", "dfm"),
    "pretrained": ("dfkde", "dfm"), "layers": ("dfkde",), "n_pca_components": ("dfkde", "rkde"),
    "feature_scaling": ("dfkde", "rkde"), "layer": ("dfm",), "pooling_kernel_size": ("dfm",), "pca_level": ("dfm",),
    "score_type": ("dfm",), "roi_stage": ("rkde",), "roi_score_threshold": ("rkde",), "min_box_size": ("rkde",),
    "iou_threshold": ("rkde",), "max_detections_per_image": ("rkde",), "detector_weights": ("rkde",),
    "region_weights": ("rkde",)}
NOT_CONFIG = ("weights", "pretrained", "detector_weights", "region_weights")  # where weights come from, not fields


def build_config(args: argparse.Namespace):
    """The model config from the flags; a flag of another model is an error, not silently ignored."""
    from rayanom.config import CONFIG_CLASSES, UserError

    kwargs = {"max_training_points": args.max_training_points, "seed": args.seed}
    for name, models in MODEL_FLAGS.items():
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
        if name not in NOT_CONFIG:
            kwargs[name] = tuple(value) if isinstance(value, list) else value
    return CONFIG_CLASSES[args.model](**kwargs)


def _pca_level(text: str) -> float | int:
    try:
        return int(text)
    except ValueError:
        return float(text)


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def cli() -> None:
    """The command line: flags parsed, the job run, the exit code set (``_cli.run_main``)."""
    _cli.run_main(lambda: main(get_args_parser().parse_args()))


if __name__ == "__main__":
    cli()
