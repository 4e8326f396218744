"""Benchmark suite: per-stage and end-to-end throughput, the bare-forward ceiling, and anomalib side by side.

    python benchmarks/bench.py                     # 400 train + 200 test PNGs of 512 x 512, DFKDE resnet18
    python benchmarks/bench.py --quick             # 40 + 20 images, for a smoke run

Prints a table and writes benchmarks/results.json. Not part of the test suite: timings on a shared 2-core VM swing,
so compare ratios measured in one run. The anomalib baseline needs a separate virtualenv (benchmarks/README.md);
without it that row is reported as missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
ANOMALIB_PY = os.path.join(REPO, ".venv-anomalib", "bin", "python")


def make_images(root: str, n_train: int, n_test: int, size: int) -> str:
    """Demo parts at ``size`` pixels, laid out as anomalib's Folder wants (train/good, test/good, test/bad), plus
    rayanom's index. Returns the index path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rayanom.demo import make_demo

    index = os.path.join(root, "index.parquet")
    if os.path.exists(index):
        return index
    flat = make_demo(os.path.join(root, "flat"), n_train=n_train, n_test_normal=n_test // 2,
                     n_test_anomalous=n_test - n_test // 2, size=size, seed=0)
    table = pq.read_table(flat)
    paths = []
    for path, split, label in zip(table.column("path").to_pylist(), table.column("split").to_pylist(),
                                  table.column("label").to_pylist()):
        sub = os.path.join(root, split, "bad" if label else "good")
        os.makedirs(sub, exist_ok=True)
        target = os.path.join(sub, os.path.basename(path))
        os.replace(path, target)
        paths.append(os.path.abspath(target))
    table = table.set_column(0, "path", pa.array(paths))
    pq.write_table(table, index)
    pq.write_table(table.filter(pa.array(np.asarray(table.column("split").to_pylist()) == "test")),
                   os.path.join(root, "test.parquet"))
    return index


def bench_decode(paths: list[str], size: int) -> float:
    from rayanom.data import decode_image, read_bytes

    t = time.perf_counter()
    for p in paths:
        decode_image(read_bytes(p), (size, size))
    return len(paths) / (time.perf_counter() - t)


def bench_forward(backbone: str, size: int, batch: int, precision: str, threads: int) -> float:
    """The ceiling: backbone + pooling on in-memory tensors, nothing else."""
    from rayanom.config import DfkdeConfig
    from rayanom.features import FeatureExtractor, resolve_weights

    config = DfkdeConfig(backbone=backbone, image_size=(size, size))
    extractor = FeatureExtractor(config, resolve_weights(config, None, False)[0], threads=threads, precision=precision)
    x = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
    extractor(x)
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < 8:
        extractor(x)
        n += batch
    return n / (time.perf_counter() - t)


def bench_head(n_bank: int, n_query: int) -> float:
    """KDE scoring throughput (queries/s) against an ``n_bank``-point bank, 2048-d features -> PCA 16."""
    from rayanom.heads import KdeHead

    rng = np.random.default_rng(0)
    head = KdeHead(16).fit(rng.normal(size=(n_bank, 2048)).astype(np.float32))
    q = rng.normal(size=(n_query, 2048)).astype(np.float32)
    t = time.perf_counter()
    head.score_samples(q)
    return n_query / (time.perf_counter() - t)


def run_job(args: list[str]) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return time.perf_counter() - t, proc.stdout


def bench_plain_loop(index: str, backbone: str, size: int, batch: int, workers: int) -> float:
    """Single process: a torch DataLoader with workers -> backbone -> the same KDE head. Returns images/s (fit+score)."""
    import pyarrow.parquet as pq
    import torch

    from rayanom.config import DfkdeConfig
    from rayanom.data import decode_image, read_bytes
    from rayanom.features import FeatureExtractor, resolve_weights
    from rayanom.heads import KdeHead

    table = pq.read_table(index)
    paths, splits = table.column("path").to_pylist(), table.column("split").to_pylist()

    class Images(torch.utils.data.Dataset):
        def __init__(self, ps):
            self.ps = ps

        def __len__(self):
            return len(self.ps)

        def __getitem__(self, i):
            return torch.from_numpy(decode_image(read_bytes(self.ps[i]), (size, size)))

    config = DfkdeConfig(backbone=backbone, image_size=(size, size))
    extractor = FeatureExtractor(config, resolve_weights(config, None, False)[0])
    t = time.perf_counter()

    def features(ps):
        loader = torch.utils.data.DataLoader(Images(ps), batch_size=batch, num_workers=workers)
        return np.concatenate([extractor(b.numpy()) for b in loader])

    head = KdeHead(16).fit(features([p for p, s in zip(paths, splits) if s == "train"]))
    head.score_samples(features([p for p, s in zip(paths, splits) if s == "test"]))
    return len(paths) / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="40 train + 20 test images")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--size", type=int, default=256, help="network input (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    n_train, n_test = (40, 20) if args.quick else (400, 200)
    root = os.path.join(HERE, "data-quick" if args.quick else "data")
    index = make_images(root, n_train, n_test, 512)
    test = os.path.join(root, "test.parquet")
    import pyarrow.parquet as pq

    paths = pq.read_table(index).column("path").to_pylist()
    threads = os.cpu_count() or 1
    rows = []

    def row(stage, value, unit="images/s", **extra):
        rows.append({"stage": stage, "value": round(value, 2), "unit": unit, **extra})
        print(f"{stage:<58} {value:10.2f} {unit} {extra if extra else ''}", flush=True)

    common = {"batch_size": args.batch_size, "backbone": args.backbone, "threads": threads}
    row("decode + resize (1 process, 512x512 PNG -> 256)", bench_decode(paths[:60], args.size))
    for precision in ("fp32", "bf16"):
        row(f"backbone forward ceiling, in-memory ({precision})",
            bench_forward(args.backbone, args.size, args.batch_size, precision, threads), precision=precision, **common)
    row("KDE head scoring, 40k bank (2048-d -> 16)", bench_head(40_000, 20_000), unit="queries/s")
    job = ["jobs/fit.py", "--model", "dfkde", "--index", index, "--score", test, "--backbone", args.backbone,
           "--no-pretrained", "--batch-size", str(args.batch_size), "--quiet", "--overwrite"]
    for precision in ("fp32", "bf16"):
        out = os.path.join(root, f"run-{precision}")
        wall, stdout = run_job([*job, "--out", out, "--precision", precision])
        auroc = stdout.split("image AUROC ")[1].split()[0] if "image AUROC" in stdout else "n/a"
        row(f"rayanom jobs/fit.py --score, whole process ({precision})", wall, unit="s", precision=precision,
            auroc=auroc, images=len(paths))
        row(f"rayanom end to end ({precision})", len(paths) / wall, precision=precision)
    row("plain PyTorch loop (DataLoader 2 workers -> backbone -> head)",
        bench_plain_loop(index, args.backbone, args.size, args.batch_size, 2), precision="fp32")
    if os.path.exists(ANOMALIB_PY):
        t = time.perf_counter()
        proc = subprocess.run([ANOMALIB_PY, os.path.join(HERE, "anomalib_baseline.py"), "--root", root,
                               "--backbone", args.backbone, "--batch-size", str(args.batch_size)],
                              cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode == 0:
            inner = json.loads(proc.stdout.strip().splitlines()[-1])
            row("anomalib 2.7.0 Engine fit + test, whole process (fp32)", wall, unit="s", inner=inner)
        else:
            row("anomalib 2.7.0 (failed)", float("nan"), unit="s", error=proc.stderr[-500:])
    else:
        row("anomalib 2.7.0 (no .venv-anomalib: see benchmarks/README.md)", float("nan"), unit="s")
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
              "images": len(paths), "rows": rows}
    with open(os.path.join(HERE, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"results: {os.path.join(HERE, 'results.json')}")


if __name__ == "__main__":
    main()
