"""The scoring job's steady rate against the machine's pipeline bound, on CPU (issue 16's number for this machine).

    python benchmarks/cpu_bound.py                 # 2,048 PNGs of 512 x 512, resnet18 at 256, --precision auto
    python benchmarks/cpu_bound.py --rows 256       # a smoke run

One run measures, in this order: ``jobs/fit.py`` on 64 training images (the precision ``auto`` picks, recorded in the
model); ``jobs/score.py`` on the test rows, with parts of ``--rows-per-part`` rows, whose steady rate is the rows of
every part but the first finished ones over the time between the first and the last part written (start-up and the
tail excluded); then, in this process, the core-seconds per image of decode (``decode.decode_image``, one thread) and
of the model stage (``FeatureExtractor.features`` + the head, one torch thread, batches of ``--batch-size``), by
``time.process_time``. The bound for C cores is C / (decode + model core-seconds per image): what the job could reach
if it kept every core busy with nothing but those two. Prints one line per number and writes
benchmarks/cpu-bound-results.json (or --out). Timings on a shared VM swing: the ratio, measured in one run, is the
number to read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

from bench import make_images, run_job  # noqa: E402 - the benchmark suite's generator and job runner


def steady_rate(scores_dir: str) -> tuple[float, int]:
    """Rows per second between the first and the last part written (their files' modification times), counting the
    rows of the parts finished after the first; and the number of parts."""
    import pyarrow.parquet as pq

    files = [os.path.join(scores_dir, f) for f in os.listdir(scores_dir)
             if f.startswith("part-") and f.endswith(".parquet")]
    parts = sorted((os.path.getmtime(f), pq.read_metadata(f).num_rows) for f in files)
    if len(parts) < 3:
        return float("nan"), len(parts)
    return sum(n for _, n in parts[1:]) / (parts[-1][0] - parts[0][0]), len(parts)


def core_seconds(paths: list[str], model_dir: str, batch: int) -> dict:
    """Core-seconds per image of decode and of the model stage, one thread each, in the model's precision."""
    import torch

    from rayanom.artifact import Artifact
    from rayanom.decode import decode_image
    from rayanom.storage import read_bytes
    from rayanom.stages import Scorer

    torch.set_num_threads(1)
    artifact = Artifact.load(model_dir)
    precision = artifact.provenance.get("run", {}).get("precision", "fp32")
    size = artifact.config.image_size
    t = time.process_time()
    images = np.stack([decode_image(read_bytes(p), size) for p in paths])
    decode = (time.process_time() - t) / len(paths)
    scorer = Scorer(artifact.config, artifact.weights, artifact.head, "cpu", 1, precision)
    step = images[:batch]

    def model_stage():
        feats = scorer.extractor.features(step)
        return scorer.head.score_samples(feats)

    model_stage()  # warm-up
    t, n = time.process_time(), 0
    while n < max(len(paths), 3 * batch):
        model_stage()
        n += len(step)
    return {"decode_core_s": decode, "model_core_s": (time.process_time() - t) / n, "precision": precision}


def main() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2048, help="test rows scored (default: %(default)s)")
    p.add_argument("--image-px", type=int, default=512)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rows-per-part", type=int, default=128)
    p.add_argument("--out", default=os.path.join(HERE, "cpu-bound-results.json"))
    args = p.parse_args()
    root = os.path.join(HERE, f"data-cpu-{args.rows}-{args.image_px}")
    index = make_images(root, 64, args.rows, args.image_px)
    table = pq.read_table(index)
    split = np.asarray(table.column("split").to_pylist())
    train, test = os.path.join(root, "train.parquet"), os.path.join(root, "test.parquet")
    pq.write_table(table.filter(pa.array(split == "train")), train)
    out = os.path.join(root, "run")
    flags = ["--backbone", args.backbone, "--no-pretrained", "--image-size", str(args.size), "--batch-size",
             str(args.batch_size), "--overwrite"]
    run_job(["jobs/fit.py", "--model", "dfkde", "--index", train, "--out", out, *flags])
    wall, _, stderr = run_job(["jobs/score.py", "--model", os.path.join(out, "model"), "--index", test, "--out",
                               out + "-scores", "--rows-per-part", str(args.rows_per_part), "--batch-size",
                               str(args.batch_size), "--overwrite"])
    rate, n_parts = steady_rate(out + "-scores")
    paths = pq.read_table(test).column("path").to_pylist()[:128]
    cost = core_seconds(paths, os.path.join(out, "model"), args.batch_size)
    cores = os.cpu_count() or 1
    bound = cores / (cost["decode_core_s"] + cost["model_core_s"])
    result = {"machine": {"cpus": cores, "cpu": _cpu_name(), "platform": platform.platform(),
                          "torch": torch.__version__},
              "rows": len(split[split == "test"]), "parts": n_parts, "image_px": args.image_px, "size": args.size,
              "backbone": args.backbone, "precision": cost["precision"], "score_process_s": round(wall, 1),
              "steady_rows_per_s": round(rate, 2), "decode_core_ms": round(1e3 * cost["decode_core_s"], 2),
              "model_core_ms": round(1e3 * cost["model_core_s"], 2), "bound_rows_per_s": round(bound, 2),
              "ratio_to_bound": round(rate / bound, 3), "actors": _actors(stderr)}
    for k, v in result.items():
        print(f"{k:<22} {v}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


def _cpu_name() -> str:
    from rayanom.features import device_kind

    return device_kind("cpu")


def _actors(stderr: str) -> str:
    line = next((ln for ln in stderr.splitlines() if "actor(s) on" in ln), "")
    return line.split("ray: ", 1)[-1]


if __name__ == "__main__":
    main()
