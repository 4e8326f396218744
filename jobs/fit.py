"""Fit an anomaly model on the normal training images of a parquet index, on Ray.

    python jobs/fit.py --model dfkde                         # demo: local Ray, generated images, fit + score
    python jobs/fit.py --model dfkde --index train.parquet --out runs/r1 --score test.parquet
    ray job submit --working-dir . -- python jobs/fit.py --model dfkde --index s3://b/train.parquet --out s3://b/r1

Writes OUT/model (config.json + head.safetensors) and, with --score, OUT/scores (parquet).
"""

from __future__ import annotations

import argparse
import logging
import os

import _cli

logger = logging.getLogger("rayanom.jobs.fit")

DEMO_ROOT = os.path.join("runs", "demo-data")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=["dfkde", "dfm"], help="model to fit")
    p.add_argument("--index", help="parquet index with a 'path' column (default: a generated demo set)")
    p.add_argument("--out", help="run directory (default: runs/<model>-demo for the demo; required with --index)")
    p.add_argument("--score", metavar="INDEX", help="score this index with the fitted model in the same job")
    p.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=None,
                   help="with --score and labels: write OUT/report/metrics.json and report.png (ROC curve, score "
                        "histograms); default: yes for the demo")
    p.add_argument("--heatmaps", type=int, default=None, metavar="N",
                   help="DFM (fre): heat-map overlays of the N most anomalous scored images in OUT/report/heatmaps "
                        "(default: 8 for the DFM demo, else 0)")
    m = p.add_argument_group("model, both (stored in the artifact)")
    m.add_argument("--backbone", default="resnet50", help="timm CNN name, optionally with a tag (default: %(default)s)")
    m.add_argument("--image-size", type=int, nargs="+", default=[256, 256], metavar="PX",
                   help="network input: SIZE or HEIGHT WIDTH (default: 256 256)")
    m.add_argument("--max-training-points", type=int, default=40_000, help="memory bank cap (default: %(default)s)")
    m.add_argument("--seed", type=int, default=0, help="bank sampling and random-weight seed (default: %(default)s)")
    k = p.add_argument_group("model, dfkde only")
    k.add_argument("--layers", nargs="+", default=None, help="feature layers, concatenated (default: layer4)")
    k.add_argument("--n-pca-components", type=int, default=None, help="default: 16")
    k.add_argument("--feature-scaling", choices=["scale", "norm"], default=None, help="default: scale")
    f = p.add_argument_group("model, dfm only")
    f.add_argument("--layer", default=None, help="feature layer (default: layer3)")
    f.add_argument("--pooling-kernel-size", type=int, default=None, help="average-pooling kernel (default: 4)")
    f.add_argument("--pca-level", type=_pca_level, default=None,
                   help="variance fraction in (0, 1), or an integer number of components > 1 (default: 0.97)")
    f.add_argument("--score-type", choices=["fre", "nll"], default=None, help="default: fre")
    w = p.add_argument_group("backbone weights")
    w.add_argument("--weights", metavar="PATH",
                   help="local timm state dict (.safetensors, or .pth read with weights_only=True)")
    w.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                   help="timm pretrained weights (needs network or the HF cache); default: yes with --index, "
                        "no for the demo (random weights seeded with --seed)")
    _cli.add_run_flags(p)
    return p


def main(args: argparse.Namespace) -> int:
    from rayanom.config import UserError

    _cli.setup_logging(args.quiet)
    config = build_config(args)
    index, score_index, out, pretrained = args.index, args.score, args.out, args.pretrained
    heatmaps, evaluate = args.heatmaps or 0, bool(args.evaluate)
    if index is None:
        from rayanom.demo import make_demo

        index = os.path.join(DEMO_ROOT, "index.parquet")
        if not os.path.exists(index):
            make_demo(DEMO_ROOT, seed=0)
        score_index = score_index or os.path.join(DEMO_ROOT, "test.parquet")
        out = out or os.path.join("runs", f"{args.model}-demo")
        pretrained = bool(pretrained)
        heatmaps = 8 if args.heatmaps is None and config.model == "dfm" else heatmaps
        evaluate = args.evaluate is not False
    elif out is None:
        raise UserError("invalid out=None: --out RUN_DIR is required with --index")
    if pretrained is None:
        pretrained = not args.weights
    model_dir, scores_dir = _join(out, "model"), _join(out, "scores")

    # Everything a user can get wrong is checked here, before Ray starts.
    from rayanom import pipeline
    from rayanom.data import read_index
    from rayanom.features import resolve_weights
    from rayanom.parts import check_parts_dir, has_parts

    train_table = read_index(index)
    pipeline.check_training_rows(train_table, config, index)
    score_table = read_index(score_index) if score_index else None
    if score_index:
        check_parts_dir(scores_dir)
        _cli.check_report(config, _join(out, "report"), evaluate, heatmaps)
    elif evaluate or heatmaps:
        raise UserError("invalid --evaluate/--heatmaps: they report on scores; add --score INDEX")
    state, source = resolve_weights(config, args.weights, pretrained)
    fingerprint = pipeline.fit_fingerprint(train_table, config, source)
    artifact = _fitted_before(model_dir, fingerprint, args.overwrite)
    if artifact is None and score_index and not args.overwrite and has_parts(scores_dir):
        raise UserError(f"output {scores_dir!r} holds scores of an earlier model; pass --overwrite to replace them")

    run = _cli.init_ray(args)
    if artifact is None:
        result = pipeline.fit(train_table, config, state, source, run, index_name=index)
        artifact = result.artifact
        artifact.save(model_dir, overwrite=True)  # occupied directories were refused above
        print(f"fitted {args.model} on {result.n_train - result.n_failed} of {result.n_train} training rows "
              f"({result.n_failed} failed), bank {artifact.provenance['n_bank_rows']} x "
              f"{artifact.provenance['feature_dim']}")
    else:
        print("model already fitted with these settings, index and weights: reused")
    print(f"model: {model_dir}")
    code = _cli.check_failed_fraction("training", artifact.provenance["n_failed_rows"],
                                      artifact.provenance["n_train_rows"], args.max_failed_fraction)
    if score_table is not None:
        summary = pipeline.score(score_table, artifact, state, scores_dir, run, overwrite=args.overwrite)
        _cli.print_summary(summary)
        _cli.write_report(scores_dir, _join(out, "report"), evaluate, heatmaps)
        code = code or _cli.check_failed_fraction("scored", summary["failed"], summary["rows"],
                                                  args.max_failed_fraction)
    return code


def _fitted_before(model_dir: str, fingerprint: str, overwrite: bool):
    """The artifact in ``model_dir`` if it was fitted from exactly these inputs (fitting is idempotent: reuse it);
    None when there is none or ``overwrite``; an error when it holds another model."""
    from rayanom.artifact import CONFIG_FILE, HEAD_FILE, Artifact, check_output_dir
    from rayanom.config import UserError

    existing = check_output_dir(model_dir, {CONFIG_FILE, HEAD_FILE}.__contains__, overwrite=True)
    if overwrite or CONFIG_FILE not in existing:
        return None  # nothing there, replacing on request, or an incomplete save (config.json is written last)
    try:
        artifact = Artifact.load(model_dir)
    except UserError:
        artifact = None
    if artifact is not None and artifact.provenance.get("fit_fingerprint") == fingerprint:
        return artifact
    raise UserError(f"output {model_dir!r} holds a model fitted with other settings, index or weights; "
                    "pass --overwrite to replace it")


MODEL_FLAGS = {"dfkde": ("layers", "n_pca_components", "feature_scaling"),
               "dfm": ("layer", "pooling_kernel_size", "pca_level", "score_type")}


def build_config(args: argparse.Namespace):
    """The model config from the flags; a flag of the other model is an error, not silently ignored."""
    from rayanom.config import CONFIG_CLASSES, UserError

    size = args.image_size
    if len(size) not in (1, 2):
        raise UserError(f"invalid image_size={size}: expected SIZE or HEIGHT WIDTH")
    kwargs = {"backbone": args.backbone, "image_size": (size[0], size[-1]),
              "max_training_points": args.max_training_points, "seed": args.seed}
    for model, names in MODEL_FLAGS.items():
        for name in names:
            value = getattr(args, name)
            if value is None:
                continue
            if model != args.model:
                flag = "--" + name.replace("_", "-")
                raise UserError(f"invalid {flag}: it applies to --model {model}, not {args.model}")
            kwargs[name] = tuple(value) if isinstance(value, list) else value
    return CONFIG_CLASSES[args.model](**kwargs)


def _pca_level(text: str) -> float | int:
    try:
        return int(text)
    except ValueError:
        return float(text)


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


if __name__ == "__main__":
    _cli.run_main(lambda: main(get_args_parser().parse_args()))
