"""bf16 against fp32 on this machine: the backbone's speed, and what bf16 does to the demo set's scores and ranking.

    python benchmarks/precision.py [--threads 2] [--batch-size 32] [--no-dfm] [--out benchmarks/precision-results.json]

Measures, in one run (about 2 minutes on 2 CPU cores):

* **speed**: ``rayanom.features.FeatureExtractor`` (the production feature path: ``fp32`` = contiguous NCHW fp32,
  ``bf16`` = autocast bf16 + channels_last) for DFKDE on resnet18 and resnet50 at 256², batch 32, 2 threads: images/s,
  the best of 3 timed batches after one warm-up, fp32 and bf16 interleaved (only ratios measured in one run mean
  anything on a shared VM); and the auto-precision probe ``features.bf16_speedup``: its wall time and its ratio.
* **quality** on the demo set that ``jobs/fit.py --model dfkde`` generates (``demo.make_demo(seed=0)``: 100 train,
  30 normal + 30 anomalous test images, all of them), decoded at the model's image size: per backbone and precision,
  features of the train split (batches of 32, as the jobs) -> the DFKDE head (``KdeHead``, 16 components, "scale")
  -> anomaly scores (-log density) of the test split; the same for DFM (default config: resnet50 layer3, pooled 4,
  PCA 0.97, FRE) unless ``--no-dfm``. Reported: AUROC fp32 / bf16, Spearman correlation of the two score vectors, the
  largest and median absolute rank change of a test image, decisions that flip when both score vectors are
  thresholded at one fp32 threshold (the F1-optimal one, ``decisions.f1_adaptive_threshold``, and the 95th percentile of
  the normal test images' fp32 scores), and how far the bf16 features lie from fp32's.

Backbones have random weights from the default seed (``features.resolve_weights``, no download), as the demo job.
Prints a table and writes benchmarks/precision-results.json (or --out), with the load average at the start and the
end: run it on an otherwise idle machine (with other work on the 2 cores every rate drops, and the probe's ratio
fell to 1.1-1.3x, below its 1.3x bar, in such a run). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

logger = logging.getLogger("rayanom.benchmarks.precision")

PRECISIONS = ("fp32", "bf16")
BACKBONES = ("resnet18", "resnet50")


def machine() -> dict:
    """CPU model, the bf16-relevant CPU flags, core count and library versions."""
    import timm
    import torch

    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    wanted = ("amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512f", "avx512_vnni", "avx2")
    return {"cpu_model": model, "cpu_flags": {f: f in flags for f in wanted}, "cpus": os.cpu_count(),
            "platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
            "timm": timm.__version__, "torch_threads": torch.get_num_threads()}


def code_state() -> dict:
    """The commit measured and the files of ``rayanom/`` that differed from it when the run started."""
    import subprocess

    def git(*cmd: str) -> str:
        proc = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD"),
            "uncommitted_in_rayanom": git("status", "--porcelain", "--", "rayanom").splitlines()}


def demo_images(root: str, image_size: tuple[int, int]) -> dict:
    """The demo set of ``jobs/fit.py --model dfkde`` (``make_demo(root, seed=0)``), decoded: images, labels, splits."""
    import pyarrow.parquet as pq

    from rayanom.decode import decode_image
    from rayanom.storage import read_bytes
    from rayanom.demo import make_demo

    t0 = time.perf_counter()
    table = pq.read_table(make_demo(root, seed=0))
    paths = table.column("path").to_pylist()
    images = np.stack([decode_image(read_bytes(p), image_size) for p in paths])
    split = np.asarray(table.column("split").to_pylist())
    labels = np.asarray(table.column("label").to_pylist(), dtype=int)
    defect = np.asarray(table.column("defect_type").to_pylist(), dtype=object)
    logger.info("demo set: %d images decoded at %s in %.1f s", len(paths), image_size, time.perf_counter() - t0)
    return {"train": images[split == "train"], "test": images[split == "test"], "labels": labels[split == "test"],
            "defect": defect[split == "test"], "names": [os.path.basename(p) for p, s in zip(paths, split)
                                                         if s == "test"]}


def extractors(config, threads: int) -> dict:
    """One ``FeatureExtractor`` per precision, both on the seeded random weights the demo job uses."""
    from rayanom.features import FeatureExtractor, resolve_weights

    state, source = resolve_weights(config, None, False)
    logger.info("%s %s: weights %s", config.model, config.backbone, source)
    return {p: FeatureExtractor(config, state, threads=threads, precision=p) for p in PRECISIONS}


def time_forward(extr: dict, x: np.ndarray, repeats: int = 3) -> dict:
    """images/s of each extractor on batch ``x``: the best of ``repeats`` timed calls after one warm-up each, the
    precisions interleaved (so that a slow spell of the VM hits both)."""
    best = {p: float("inf") for p in extr}
    for i in range(repeats + 1):
        for p, e in extr.items():
            t0 = time.perf_counter()
            e(x)
            if i:  # round 0 warms up (oneDNN kernel selection, allocator)
                best[p] = min(best[p], time.perf_counter() - t0)
    rates = {p: len(x) / best[p] for p in extr}
    return {"images_per_s": {p: round(r, 2) for p, r in rates.items()},
            "best_batch_s": {p: round(t, 4) for p, t in best.items()},
            "bf16_over_fp32": round(rates["bf16"] / rates["fp32"], 3)}


def time_probe(calls: int = 3) -> dict:
    """Wall time and ratio of ``features.bf16_speedup("cpu")``, the ``--precision auto`` probe; the first call
    includes torchvision's import and first-use costs."""
    from rayanom.features import BF16_MIN_SPEEDUP, bf16_speedup

    runs = []
    for _ in range(calls):
        t0 = time.perf_counter()
        ratio = bf16_speedup("cpu")
        runs.append({"wall_s": round(time.perf_counter() - t0, 3), "speedup": round(ratio, 3)})
    return {"calls": runs, "threshold": BF16_MIN_SPEEDUP,
            "auto_picks": ["bf16" if r["speedup"] >= BF16_MIN_SPEEDUP else "fp32" for r in runs]}


def features(extractor, images: np.ndarray, batch: int) -> np.ndarray:
    """Features in forward batches of ``batch`` rows, as the jobs' actors run them."""
    return np.concatenate([extractor(images[s:s + batch]) for s in range(0, len(images), batch)])


def feature_diff(f32: np.ndarray, f16: np.ndarray) -> dict:
    """How far bf16 features lie from fp32's: the largest element difference relative to the largest fp32 feature
    (a per-element relative difference explodes on pooled ReLU features near 0), and per row |d| / |f32| (L2)."""
    scale = float(np.abs(f32).max())
    rows = np.linalg.norm(f16 - f32, axis=1) / np.maximum(np.linalg.norm(f32, axis=1), np.finfo(np.float32).tiny)
    big = np.abs(f32) >= 0.01 * scale  # elements that are not near 0
    elem = np.abs(f16 - f32)[big] / np.abs(f32)[big]
    return {"max_abs_diff_over_max_abs": float(np.abs(f16 - f32).max() / scale),
            "row_rel_l2_max": float(rows.max()), "row_rel_l2_median": float(np.median(rows)),
            "elem_rel_max_where_ge_1pct_of_max": float(elem.max()) if elem.size else 0.0, "dim": int(f32.shape[1])}


def compare_scores(labels: np.ndarray, s32: np.ndarray, s16: np.ndarray) -> dict:
    """AUROC of each, their rank agreement, and decisions flipped at one fp32 threshold (anomalous iff score >= t)."""
    from scipy.stats import rankdata, spearmanr
    from sklearn.metrics import roc_auc_score

    from rayanom.decisions import f1_adaptive_threshold

    moved = np.abs(rankdata(s32) - rankdata(s16))
    out = {"auroc_fp32": float(roc_auc_score(labels, s32)), "auroc_bf16": float(roc_auc_score(labels, s16)),
           "spearman": float(spearmanr(s32, s16).statistic),
           "rank_change_max": float(moved.max()), "rank_change_median": float(np.median(moved)),
           "rank_change_mean": float(moved.mean()), "n_test": int(len(labels)),
           "score_max_abs_diff": float(np.abs(s16 - s32).max()), "score_fp32_std": float(s32.std())}
    out["auroc_delta"] = out["auroc_bf16"] - out["auroc_fp32"]
    thresholds = {"f1_optimal_fp32": f1_adaptive_threshold(labels, s32),
                  "p95_normal_fp32": float(np.percentile(s32[labels == 0], 95))}
    for name, t in thresholds.items():
        d32, d16 = s32 >= t, s16 >= t
        out[f"flips_at_{name}"] = int((d32 != d16).sum())
        out[f"threshold_{name}"] = t
        out[f"errors_at_{name}"] = {"fp32": int((d32 != labels.astype(bool)).sum()),
                                    "bf16": int((d16 != labels.astype(bool)).sum())}
    return out


def quality(config, extr: dict, demo: dict, batch: int) -> dict:
    """Fit the config's head on each precision's train features, score the test split, compare the two."""
    from rayanom.specs import spec_of

    feats, scores, timing = {}, {}, {}
    for p, e in extr.items():
        t0 = time.perf_counter()
        feats[p] = {s: features(e, demo[s], batch) for s in ("train", "test")}
        head = spec_of(config).head(config).fit(feats[p]["train"])
        if config.model == "dfkde":
            scores[p] = -head.score_samples(feats[p]["test"])
        else:
            scores[p] = head.anomaly_scores(feats[p]["test"])
        timing[p] = round(time.perf_counter() - t0, 2)
        if not np.isfinite(scores[p]).all():
            logger.warning("%s %s %s: non-finite scores", config.model, config.backbone, p)
    result = compare_scores(demo["labels"], scores["fp32"], scores["bf16"])
    result["features_train"] = feature_diff(feats["fp32"]["train"], feats["bf16"]["train"])
    result["features_test"] = feature_diff(feats["fp32"]["test"], feats["bf16"]["test"])
    t = result["threshold_f1_optimal_fp32"]
    result["flipped_at_f1_optimal_fp32"] = [
        {"image": demo["names"][i], "label": int(demo["labels"][i]), "defect": demo["defect"][i] or "good"}
        for i in np.flatnonzero((scores["fp32"] >= t) != (scores["bf16"] >= t))]
    result["extract_fit_score_s"] = timing
    return result


def run_model(config, demo: dict, args, timed: bool) -> dict:
    """Speed (when ``timed``) and quality of one model config, both precisions on the same extractors."""
    extr = extractors(config, args.threads)
    row = {"model": config.model, "backbone": config.backbone, "layers": list(config.layers),
           "image_size": list(config.image_size), "feature_dim": extr["fp32"].dim}
    if timed:
        x = np.concatenate([demo["train"], demo["test"]])[:args.batch_size]
        row["speed"] = time_forward(extr, x)
        logger.info("%s %s speed: %s", config.model, config.backbone, row["speed"])
    row["quality"] = quality(config, extr, demo, args.batch_size)
    q = row["quality"]
    logger.info("%s %s: AUROC %.4f / %.4f, Spearman %.5f", config.model, config.backbone, q["auroc_fp32"],
                q["auroc_bf16"], q["spearman"])
    return row


def print_table(result: dict) -> None:
    head = (f"{'model':<6} {'backbone':<9} {'fp32 im/s':>9} {'bf16 im/s':>9} {'x':>5} {'AUROC fp32':>10} "
            f"{'AUROC bf16':>10} {'delta':>7} {'Spearman':>8} {'rank max/med':>12} {'flips F1/p95':>12} "
            f"{'feat rel':>8}")
    print(head)
    print("-" * len(head))
    for r in result["models"]:
        s, q = r.get("speed"), r["quality"]
        speed = (f"{s['images_per_s']['fp32']:>9.1f} {s['images_per_s']['bf16']:>9.1f} {s['bf16_over_fp32']:>5.2f}"
                 if s else f"{'-':>9} {'-':>9} {'-':>5}")
        print(f"{r['model']:<6} {r['backbone']:<9} {speed} {q['auroc_fp32']:>10.4f} {q['auroc_bf16']:>10.4f} "
              f"{q['auroc_delta']:>+7.4f} {q['spearman']:>8.5f} "
              f"{q['rank_change_max']:>5.0f}/{q['rank_change_median']:<6.1f} "
              f"{q['flips_at_f1_optimal_fp32']:>5d}/{q['flips_at_p95_normal_fp32']:<6d} "
              f"{q['features_test']['row_rel_l2_max']:>8.4f}")
    p = result["probe"]
    print("bf16_speedup probe (resnet18 224², batch 4): " + ", ".join(
        f"{c['speedup']:.2f}x in {c['wall_s']:.2f} s" for c in p["calls"]) + f"; auto picks {p['auto_picks']}")
    print(f"total {result['wall_s']:.0f} s, load average {result['load_average_at_start'][0]} at the start, "
          f"{result['load_average_at_end'][0]} at the end; {result['machine']['cpu_model']}, flags "
          f"{ {k: v for k, v in result['machine']['cpu_flags'].items() if 'bf16' in k or 'amx' in k} }")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="forward batch (default: %(default)s)")
    p.add_argument("--no-dfm", action="store_true", help="skip DFM (resnet50 layer3)")
    p.add_argument("--out", default=os.path.join(HERE, "precision-results.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    import torch

    from rayanom.config import DfkdeConfig, DfmConfig

    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    configs = [(DfkdeConfig(backbone=b), True) for b in BACKBONES] + ([] if args.no_dfm else [(DfmConfig(), False)])
    sizes = {c.image_size for c, _ in configs}
    assert len(sizes) == 1, sizes  # one decode of the demo set serves every config
    result = {"benchmark": "bf16 vs fp32: FeatureExtractor speed and demo-set score quality",
              "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": machine(), "code": code_state(),
              "load_average_at_start": [round(v, 2) for v in os.getloadavg()], "threads": args.threads,
              "batch_size": args.batch_size, "weights": "random, seeded with the config's default seed (0)",
              "threshold_note": "flips: test images whose decision (score >= t) differs between fp32 and bf16 scores "
                                "at one fp32 threshold t: the F1-optimal one on the test labels "
                                "(decisions.f1_adaptive_threshold), and the 95th percentile of the normal test images",
              "probe": time_probe()}
    with tempfile.TemporaryDirectory() as tmp:
        demo = demo_images(os.path.join(tmp, "demo"), sizes.pop())
    result["demo_set"] = {"generator": "rayanom.demo.make_demo(root, seed=0), as jobs/fit.py --model dfkde",
                          "n_train": len(demo["train"]), "n_test": len(demo["test"]),
                          "n_test_anomalous": int(demo["labels"].sum()), "subset": False}
    result["models"] = [run_model(c, demo, args, timed) for c, timed in configs]
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]  # > threads: other work shared the cores
    print_table(result)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
