"""Benchmark suite: per-stage and end-to-end throughput, the bare-forward ceiling, the levers, and anomalib and a
plain PyTorch loop side by side, in one run.

    python benchmarks/bench.py                     # 400 train + 200 test PNGs of 512 x 512, resnet18 at 256
    python benchmarks/bench.py --image-px 1024     # MVTec-sized images
    python benchmarks/bench.py --quick             # 40 + 20 images, for a smoke run

Runs unchanged on a CUDA machine (the ceiling, the levers, the jobs and anomalib then use the GPU). Prints a table
and writes benchmarks/results.json (or --out). Not part of the test suite: timings on a shared 2-core VM swing, so
compare ratios measured in one run. The anomalib baseline needs a separate virtualenv (benchmarks/README.md);
without it that row is reported as missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
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
    from rayanom.decode import decode_image
    from rayanom.storage import read_bytes

    t = time.perf_counter()
    for p in paths:
        decode_image(read_bytes(p), (size, size))
    return len(paths) / (time.perf_counter() - t)


def _rate(step, batch: int, seconds: float) -> float:
    step()  # warm-up: kernel selection, allocator
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        step()
        n += batch
    return n / (time.perf_counter() - t)


def bench_forward(backbone: str, size: int, batch: int, precision: str, device: str, seconds: float = 6) -> float:
    """The ceiling: rayanom's FeatureExtractor (backbone + pooling) on in-memory tensors, nothing else."""
    from rayanom.config import DfkdeConfig
    from rayanom.features import FeatureExtractor, resolve_weights

    config = DfkdeConfig(backbone=backbone, image_size=(size, size))
    extractor = FeatureExtractor(config, resolve_weights(config, None, False)[0], device=device, precision=precision)
    x = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
    return _rate(lambda: extractor(x), batch, seconds)


def bench_lever(backbone: str, size: int, batch: int, device: str, bf16: bool, channels_last: bool,
                inference_mode: bool, seconds: float = 4) -> float:
    """One forward configuration on a device-resident batch: what each lever is worth alone."""
    import torch

    from rayanom.config import DfkdeConfig
    from rayanom.features import build_backbone

    model, _ = build_backbone(DfkdeConfig(backbone=backbone, image_size=(size, size)))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.eval().to(device, memory_format=fmt)
    x = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    grad = torch.inference_mode() if inference_mode else torch.no_grad()

    def step():
        with grad, torch.autocast(torch.device(device).type, torch.bfloat16, enabled=bf16):
            out = [m.float().mean(dim=(2, 3)) for m in model(x)]
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return _rate(step, batch, seconds)


def bench_kde(n_bank: int, n_query: int, exact: bool, device: str) -> float:
    """KDE head scoring (2048-d features -> PCA 16 -> KDE), queries/s against an ``n_bank``-point bank. The queries
    are one block of 50,000 random feature vectors scored repeatedly (identical work per block)."""
    from rayanom.heads import KdeHead

    rng = np.random.default_rng(0)
    head = KdeHead(16).fit(rng.normal(size=(n_bank, 2048)).astype(np.float32))
    block = rng.normal(size=(min(n_query, 50_000), 2048)).astype(np.float32)
    head.score_samples(block[:100], exact=exact, device=device)
    t, done = time.perf_counter(), 0
    while done < n_query:
        head.score_samples(block[:n_query - done], exact=exact, device=device)
        done += min(len(block), n_query - done)
    return n_query / (time.perf_counter() - t)


def bench_dfm_head(n_train: int, n_query: int, dim: int) -> float:
    from rayanom.heads import DfmHead

    rng = np.random.default_rng(0)
    head = DfmHead(0.97).fit(rng.normal(size=(n_train, dim)).astype(np.float32))
    q = rng.normal(size=(n_query, dim)).astype(np.float32)
    t = time.perf_counter()
    head.anomaly_scores(q)
    return n_query / (time.perf_counter() - t)


def run_job(args: list[str]) -> tuple[float, str, str]:
    """A job as a user runs it (embedded local Ray): process wall time, stdout, stderr."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return time.perf_counter() - t, proc.stdout, proc.stderr


def _stage_rates(stderr: str) -> dict:
    """The pipeline's own stage timings from its log: fit (training rows/s) and score (rows/s)."""
    out = {}
    m = re.search(r"gathered in ([\d.]+) s \(([\d.]+) training rows/s", stderr)
    if m:
        out["fit_stage_s"], out["fit_rows_per_s"] = float(m.group(1)), float(m.group(2))
    m = re.search(r"score: (\d+) rows in ([\d.]+) s \(([\d.]+) rows/s", stderr)
    if m:
        out["score_stage_s"], out["score_rows_per_s"] = float(m.group(2)), float(m.group(3))
    return out


def bench_plain_loop(index: str, backbone: str, size: int, batch: int, workers: int, device: str) -> float:
    """Single process: a torch DataLoader with workers -> backbone -> the same KDE head. Returns images/s (fit+score)."""
    import pyarrow.parquet as pq
    import torch

    from rayanom.config import DfkdeConfig
    from rayanom.decode import decode_image
    from rayanom.storage import read_bytes
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
    extractor = FeatureExtractor(config, resolve_weights(config, None, False)[0], device=device)
    t = time.perf_counter()

    def features(ps):
        loader = torch.utils.data.DataLoader(Images(ps), batch_size=batch, num_workers=workers)
        return np.concatenate([extractor(b.numpy()) for b in loader])

    head = KdeHead(16).fit(features([p for p, s in zip(paths, splits) if s == "train"]))
    head.score_samples(features([p for p, s in zip(paths, splits) if s == "test"]), device=device)
    return len(paths) / (time.perf_counter() - t)


def _subset(root: str, index: str, n_train: int, n_test: int) -> tuple[str, str]:
    """The first ``n_train`` training and ``n_test`` test rows (half normal, half anomalous) as an index pair."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(index)
    split, label = np.asarray(t.column("split").to_pylist()), np.asarray(t.column("label").to_pylist())
    tr = np.flatnonzero(split == "train")[:n_train]
    te = np.concatenate([np.flatnonzero((split == "test") & (label == v))[:n_test // 2] for v in (0, 1)])
    paths = (os.path.join(root, f"sub-{n_train}.parquet"), os.path.join(root, f"sub-{n_train}-test.parquet"))
    pq.write_table(t.take(pa.array(np.concatenate([tr, te]))), paths[0])
    pq.write_table(t.take(pa.array(te)), paths[1])
    return paths


def _repeated(root: str, index: str, times: int) -> str:
    """The index with its rows repeated: a longer scoring run (every row still decoded and run) for a steady rate."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = os.path.join(root, f"repeated-{times}.parquet")
    pq.write_table(pa.concat_tables([pq.read_table(index)] * times), path)
    return path


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="40 train + 20 test images, shorter timings")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--size", type=int, default=256, help="network input (default: %(default)s)")
    p.add_argument("--image-px", type=int, default=512, help="generated PNG side (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--models", default="dfkde,dfm,rkde", help="end-to-end rows for these (default: %(default)s)")
    p.add_argument("--out", default=os.path.join(HERE, "results.json"))
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = args.models.split(",")
    n_train, n_test = (40, 20) if args.quick else (400, 200)
    root = os.path.join(HERE, f"data-{n_train}-{args.image_px}")
    index = make_images(root, n_train, n_test, args.image_px)
    test = os.path.join(root, "test.parquet")
    import pyarrow.parquet as pq

    paths = pq.read_table(index).column("path").to_pylist()
    threads = torch.get_num_threads()
    rows = []

    def row(stage, value, unit="images/s", **extra):
        rows.append({"stage": stage, "value": round(value, 4 if unit == "ratio" else 2), "unit": unit, **extra})
        shown = {k: v for k, v in extra.items() if k not in ("inner",)}
        print(f"{stage:<66} {value:10.2f} {unit} {shown if shown else ''}", flush=True)

    common = {"batch_size": args.batch_size, "backbone": args.backbone, "device": device, "threads": threads}
    seconds = 2 if args.quick else 6
    row(f"decode + resize (1 process, {args.image_px}px PNG -> {args.size})", bench_decode(paths[:60], args.size))
    ceiling = {}
    for precision in ("fp32", "bf16"):
        ceiling[precision] = bench_forward(args.backbone, args.size, args.batch_size, precision, device, seconds)
        row(f"backbone forward ceiling, in-memory ({precision})", ceiling[precision], precision=precision, **common)
    # The levers, one at a time on the bare forward (device-resident batch).
    for bf16, cl, im in ((False, False, False), (False, False, True), (False, True, True), (True, False, True),
                         (True, True, True)):
        name = f"lever: {'bf16' if bf16 else 'fp32'}, {'channels_last' if cl else 'NCHW'}, " \
               f"{'inference_mode' if im else 'no_grad'}"
        row(name, bench_lever(args.backbone, args.size, args.batch_size, device, bf16, cl, im, seconds / 2), **common)
    for batch in (8, 16, 64):
        row(f"lever: batch {batch} (bf16, channels_last)",
            bench_lever(args.backbone, args.size, batch, device, True, True, True, seconds / 2),
            **{**common, "batch_size": batch})
    n_kde = 100_000 if args.quick else 1_000_000
    kde_rate = bench_kde(40_000, n_kde, False, device)
    row(f"KDE head, {n_kde:,} queries vs 40k bank (2048-d -> 16), float32", kde_rate, unit="queries/s",
        seconds_for_1M=round(1e6 / kde_rate, 1))
    row("KDE head, 40k bank, float64 (exact)", bench_kde(40_000, 20_000, True, device), unit="queries/s")
    row("DFM head (FRE), 16384-d, 0.97 variance", bench_dfm_head(2000, 20_000, 16384), unit="queries/s")

    common_job = ["--backbone", args.backbone, "--no-pretrained", "--batch-size", str(args.batch_size),
                  "--overwrite", "--image-size", str(args.size)]
    results = {}
    for model in models:
        precisions = ("fp32", "bf16") if model == "dfkde" else ("auto",)
        fit_index, score_index = index, test
        if model == "rkde":  # ~2 images/s per CPU core: a subset, at its fixed input size
            fit_index, score_index = _subset(root, index, 20 if args.quick else 60, 20 if args.quick else 40)
        for precision in precisions:
            flags = ["--precision", precision] + (common_job if model != "rkde" else
                                                  ["--overwrite", "--batch-size", "4"])
            out = os.path.join(root, f"run-{model}-{precision}")
            n_fit = pq.read_table(fit_index).num_rows
            wall, stdout, stderr = run_job(["jobs/fit.py", "--model", model, "--index", fit_index, "--score",
                                            score_index, "--out", out, *flags])
            auroc = stdout.split("image AUROC ")[1].split()[0] if "image AUROC" in stdout else "n/a"
            used = re.search(r"actor\(s\) on \w+, (\w+)", stderr)
            extra = {"model": model, "precision": used.group(1) if used else precision, "actors": 1,
                     "batch_size": 4 if model == "rkde" else args.batch_size, "auroc": auroc, "images": n_fit,
                     **_stage_rates(stderr)}
            results[(model, precision)] = wall
            row(f"{model}: jobs/fit.py --score, whole process ({extra['precision']})", wall, unit="s", **extra)
            if model == "dfkde":
                long = _repeated(root, index, 1 if args.quick else 3)
                n_long = pq.read_table(long).num_rows
                wall2, _, stderr2 = run_job(["jobs/score.py", "--model", os.path.join(out, "model"), "--index", long,
                                             "--out", out + "-long", "--overwrite", "--batch-size",
                                             str(args.batch_size)])
                rates = _stage_rates(stderr2) or {}
                stage = rates.get("score_rows_per_s", float("nan"))
                row(f"{model}: jobs/score.py on {n_long} rows, score stage ({precision})", stage, precision=precision,
                    process_s=round(wall2, 1), images=n_long, ratio_to_ceiling=round(stage / ceiling[precision], 3))
    row("plain PyTorch loop (DataLoader 2 workers -> backbone -> head), fp32",
        bench_plain_loop(index, args.backbone, args.size, args.batch_size, 2, device), precision="fp32")
    if os.path.exists(ANOMALIB_PY):
        t = time.perf_counter()
        proc = subprocess.run([ANOMALIB_PY, os.path.join(HERE, "anomalib_baseline.py"), "--root", root,
                               "--backbone", args.backbone, "--batch-size", str(args.batch_size)],
                              cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode == 0:
            inner = json.loads(proc.stdout.strip().splitlines()[-1])
            row("anomalib 2.7.0 Engine fit + test, whole process (fp32)", wall, unit="s", inner=inner,
                auroc=round(inner.get("metrics", {}).get("image_AUROC", float("nan")), 4))
            for precision in ("fp32", "bf16"):
                if ("dfkde", precision) in results:
                    row(f"speed-up of rayanom dfkde ({precision}) over anomalib, whole process",
                        wall / results[("dfkde", precision)], unit="ratio")
        else:
            row("anomalib 2.7.0 (failed)", float("nan"), unit="s", error=proc.stderr[-500:])
    else:
        row("anomalib 2.7.0 (no .venv-anomalib: see benchmarks/README.md)", float("nan"), unit="s")
    result = {"machine": {"cpus": os.cpu_count(), "device": device,
                          "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
                          "platform": platform.platform(), "python": sys.version.split()[0],
                          "torch": torch.__version__},
              "images": len(paths), "image_px": args.image_px, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
