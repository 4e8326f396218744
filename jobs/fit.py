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
    p.add_argument("--model", required=True, choices=["dfkde"], help="model to fit")
    p.add_argument("--index", help="parquet index with a 'path' column (default: a generated demo set)")
    p.add_argument("--out", help="run directory (default: runs/<model>-demo for the demo; required with --index)")
    p.add_argument("--score", metavar="INDEX", help="score this index with the fitted model in the same job")
    m = p.add_argument_group("model (stored in the artifact)")
    m.add_argument("--backbone", default="resnet50", help="timm CNN name, optionally with a tag (default: %(default)s)")
    m.add_argument("--layers", nargs="+", default=["layer4"], help="feature layers (default: layer4)")
    m.add_argument("--image-size", type=int, nargs="+", default=[256, 256], metavar="PX",
                   help="network input: SIZE or HEIGHT WIDTH (default: 256 256)")
    m.add_argument("--n-pca-components", type=int, default=16, help="default: %(default)s")
    m.add_argument("--feature-scaling", choices=["scale", "norm"], default="scale", help="default: %(default)s")
    m.add_argument("--max-training-points", type=int, default=40_000, help="memory bank cap (default: %(default)s)")
    m.add_argument("--seed", type=int, default=0, help="bank sampling and random-weight seed (default: %(default)s)")
    w = p.add_argument_group("backbone weights")
    w.add_argument("--weights", metavar="PATH",
                   help="local timm state dict (.safetensors, or .pth read with weights_only=True)")
    w.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                   help="timm pretrained weights (needs network or the HF cache); default: yes with --index, "
                        "no for the demo (random weights seeded with --seed)")
    _cli.add_run_flags(p)
    return p


def main(args: argparse.Namespace) -> int:
    from rayanom.config import DfkdeConfig, UserError

    _cli.setup_logging(args.quiet)
    size = args.image_size
    if len(size) not in (1, 2):
        raise UserError(f"invalid image_size={size}: expected SIZE or HEIGHT WIDTH")
    config = DfkdeConfig(backbone=args.backbone, layers=tuple(args.layers), image_size=(size[0], size[-1]),
                         n_pca_components=args.n_pca_components, feature_scaling=args.feature_scaling,
                         max_training_points=args.max_training_points, seed=args.seed)
    index, score_index, out, pretrained = args.index, args.score, args.out, args.pretrained
    if index is None:
        from rayanom.demo import make_demo

        index = os.path.join(DEMO_ROOT, "index.parquet")
        if not os.path.exists(index):
            make_demo(DEMO_ROOT, seed=0)
        score_index = score_index or os.path.join(DEMO_ROOT, "test.parquet")
        out = out or os.path.join("runs", f"{args.model}-demo")
        pretrained = bool(pretrained)
    elif out is None:
        raise UserError("invalid out=None: --out RUN_DIR is required with --index")
    if pretrained is None:
        pretrained = not args.weights
    model_dir, scores_dir = _join(out, "model"), _join(out, "scores")

    # Everything a user can get wrong is checked here, before Ray starts.
    from rayanom.artifact import CONFIG_FILE, HEAD_FILE, check_output_dir
    from rayanom.data import read_index
    from rayanom.features import resolve_weights

    train_table = read_index(index)
    score_table = read_index(score_index) if score_index else None
    check_output_dir(model_dir, {CONFIG_FILE, HEAD_FILE}.__contains__, args.overwrite)
    if score_index:
        check_output_dir(scores_dir, lambda n: n.endswith(".parquet"), args.overwrite)
    state, source = resolve_weights(config, args.weights, pretrained)

    from rayanom import pipeline

    run = _cli.init_ray(args)
    result = pipeline.fit(train_table, config, state, source, run, index_name=index)
    result.artifact.save(model_dir, overwrite=args.overwrite)
    print(f"fitted {args.model} on {result.n_train - result.n_failed} of {result.n_train} training rows "
          f"({result.n_failed} failed), bank {result.artifact.provenance['n_bank_rows']} x "
          f"{result.artifact.provenance['feature_dim']}")
    print(f"model: {model_dir}")
    if score_table is not None:
        summary = pipeline.score(score_table, result.artifact, state, scores_dir, run, overwrite=args.overwrite)
        _cli.print_summary(summary)
    return 0


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


if __name__ == "__main__":
    _cli.run_main(lambda: main(get_args_parser().parse_args()))
