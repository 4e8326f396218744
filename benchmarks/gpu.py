"""One GPU without Ray: the score stage's ceiling, its decode bound and its end-to-end rate, per model and format.

    python benchmarks/gpu.py                                  # on the GPU machine, from the repo root: ~3-5 minutes
    python benchmarks/gpu.py --models dfkde --rows 1024       # one model, quicker
    python benchmarks/gpu.py --device cpu --models dfkde,dfm --backbone resnet18 --image-size 64 --rows 64   # CPU

No install and no Ray needed: the script puts the repo root on ``sys.path`` and drives the real score-stage actor class,
``rayanom.pipeline.PartScorer``, as a plain object (what Ray would run in an actor, minus Ray). It generates normal
images (``--distinct`` textured parts of ``--file-px``², written as PNG and as JPEG into a temporary directory, removed
at the end), fits each model's head in-process on the backbone features of ``--fit-images`` of them (random weights
from a seed, as ``resolve_weights`` / ``rkde_weights`` give them: nothing is downloaded), saves the artifact as
``pipeline.score`` does and measures, for DFKDE, DFM (resnet50 unless ``--backbone``) and RKDE:

* **ceiling**: the actor's own ``Scorer`` on one decoded batch (``rayanom.data.decode_table``) held in memory and
  scored again and again: backbone + head + output table, no decode, no I/O; its input staged on the device once
  (``Scorer.stage``, as the decode threads stage each batch), and in brackets from the host arrays (their copy to
  the device in every call, not overlapped). RKDE, or a ``Scorer`` without ``stage``: the host arrays only;
* **decode bound**: ``decode_table`` (read, decode, resize to the model's size) over the files in batches, on a
  thread pool of every CPU and on a process pool of every CPU (``decode_batch``, images pickled back); the better
  pool is the bound, PNG and JPEG apart;
* **end to end**: ``PartScorer.score_part`` on parts of a parquet index of those files (read the rows, decode in its
  ``_Decoder`` threads, score, write the part), ``--decode-threads`` as the actor takes it (0: its default);
* **torch-JPEG**: with CUDA, file bytes read ahead in threads -> ``torchvision.io.decode_jpeg(..., device="cuda")``
  -> /255 -> ``interpolate(bilinear, antialias=True)`` to the model's size -> the same ``Scorer``, the tensor handed
  over as its staged input ("staged"; RKDE, or a ``Scorer`` without ``stage``: images back to the host, "host"); no
  parquet read or write. And how far those images, and their fp32 features, are from ``rayanom.data.decode_image`` on
  the same files (decode moves into torch only if the features stay within 1e-4);
* **GPU util**: the mean of ``torch.cuda.utilization()`` (or ``nvidia-smi``) sampled every 0.2 s in each steady phase
  (after the warm-up batches or part).

Every rate is images/s in a steady phase (after warm-up), each measurement capped at ``--seconds``. It prints one
table (also ``--json PATH``), a row per model and format, with ratio = e2e / min(ceiling, decode bound), and how many
decode CPUs one GPU needs to reach its ceiling (ceiling / decode rate per CPU). Nothing of Ray is used (the GPU
machine has none). Not part of the test suite (``tests/test_gpu_bench.py`` runs it
tiny on CPU).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MODELS = ("dfkde", "dfm", "rkde")
FORMATS = ("png", "jpeg")
JPEG_PART_OFFSET = 100_000  # part numbers of the JPEG index's parts (the PNG index's start at 0), one output dir
PARITY_IMAGES = 16

logger = logging.getLogger("benchmarks.gpu")


# --- Inputs: generated files and their indexes ----------------------------------------------------------------------

def _image(seed: int, px: int) -> np.ndarray:
    """A normal part: a grey disc with concentric texture on a gradient, sensor noise (compresses like a photo)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:px, 0:px].astype(np.float32)
    r = np.hypot(xx - px / 2 - rng.normal(0, px * 0.01), yy - px / 2 - rng.normal(0, px * 0.01))
    disc = 150 + 12 * np.sin(r / px * 90 + rng.uniform(0, 2 * np.pi))
    grey = np.where(r < px * 0.36, disc, 40 + 10 * yy / px)
    img = np.stack([grey * 0.98, grey, grey * 1.03], axis=-1) + rng.normal(0, 3, (px, px, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_files(root: str, distinct: int, px: int, quality: int, workers: int) -> dict[str, list[str]]:
    """``distinct`` images written as PNG and as JPEG (``quality``, 4:2:0) under ``root``."""
    from PIL import Image

    def write(i: int) -> tuple[str, str]:
        img = Image.fromarray(_image(i, px))
        png, jpeg = os.path.join(root, f"img-{i:05d}.png"), os.path.join(root, f"img-{i:05d}.jpg")
        img.save(png)
        img.save(jpeg, quality=quality)
        return png, jpeg

    t = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        pairs = list(pool.map(write, range(distinct)))
    sizes = {fmt: np.mean([os.path.getsize(p[i]) for p in pairs]) / 1024 for i, fmt in enumerate(FORMATS)}
    logger.info("%d images of %d² as PNG (%.0f KiB each) and JPEG q%d (%.0f KiB) in %.1f s", distinct, px,
                sizes["png"], quality, sizes["jpeg"], time.perf_counter() - t)
    return {"png": [p for p, _ in pairs], "jpeg": [j for _, j in pairs]}


def write_index(path: str, files: list[str], n: int):
    """A parquet index of ``n`` rows cycling through ``files`` (``path``, ``label``), described for the workers."""
    import pyarrow.parquet as pq

    from rayanom.index import describe_index

    pq.write_table(pa.table({"path": [files[i % len(files)] for i in range(n)],
                             "label": pa.array(np.zeros(n, dtype=np.int64))}), path)
    return describe_index(path)


# --- The model: config, fitted head, artifact, the actor ------------------------------------------------------------

def model_config(name: str, args: argparse.Namespace):
    """Each model's defaults (``rayanom.config``), with ``--backbone``/``--image-size`` for DFKDE and DFM."""
    from rayanom.models import spec

    if name == "rkde":
        return spec(name).config()
    kwargs = {"image_size": (args.image_size, args.image_size)}
    if args.backbone:
        kwargs["backbone"] = args.backbone
    return spec(name).config(**kwargs)


def _fit_extractor(config, device: str, precision: str):
    """The feature stage with seeded random weights, and the weight source an artifact records for them."""
    from rayanom.models import spec_of

    state, source = spec_of(config).weights(config, {}, False)
    return spec_of(config).extractor(config, state, device, 0, precision), source


def fit_artifact(config, paths: list[str], device: str, precision: str, batch: int):
    """An artifact as ``pipeline.fit`` makes one: the head fitted on the features of ``paths`` (regions for RKDE)."""
    from rayanom.artifact import Artifact
    from rayanom.data import decode_batch
    from rayanom.models import spec_of

    t = time.perf_counter()
    extractor, source = _fit_extractor(config, device, precision)
    feats = []
    for s in range(0, len(paths), batch):
        feats.append(spec_of(config).items(extractor, decode_batch({"path": paths[s:s + batch]},
                                                                   config.image_size)["image"])[1])
    feats = np.concatenate(feats)
    head = spec_of(config).head(config).fit(feats)
    del extractor
    _empty_cache(device)
    logger.info("%s: head fitted on %d x %d features of %d images in %.1f s", config.model, *feats.shape, len(paths),
                time.perf_counter() - t)
    provenance = {"benchmark": "benchmarks/gpu.py", "run": {"precision": precision}, "n_bank_rows": len(feats)}
    return Artifact(config=config, head=head, weights=source, provenance=provenance)


def part_scorer(artifact, output: str, device: str, precision: str, batch: int, decode_threads: int):
    """The score-stage actor as ``pipeline.score`` builds it: from the model copy saved beside the parts."""
    from rayanom.parts import MODEL_COPY
    from rayanom.pipeline import PartScorer, artifact_fingerprint

    model = f"{output.rstrip('/')}/{MODEL_COPY}"
    artifact.save(model, overwrite=True)
    return PartScorer(model=model, fingerprint=artifact_fingerprint(artifact), weights=artifact.weights,
                      device=device, threads=0, precision=precision, output=output, job=uuid.uuid4().hex[:12],
                      batch_size=batch, decode_threads=decode_threads)


def _empty_cache(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.empty_cache()


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# --- GPU utilisation ------------------------------------------------------------------------------------------------

class UtilSampler:
    """Mean GPU utilisation (%) while the block runs, sampled every ``period`` s and once at its end (NVML's figure
    covers its last sample period, 1/6 s to 1 s): ``torch.cuda.utilization()``, else ``nvidia-smi``; None on CPU or
    where neither answers."""

    def __init__(self, device: str, period: float = 0.2) -> None:
        self.period, self.samples = period, []
        self.read = _util_reader() if device == "cuda" else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            value = self.read()
            if value is not None:
                self.samples.append(value)

    def __enter__(self) -> UtilSampler:
        if self.read:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.read:
            self._stop.set()
            self._thread.join()
            value = self.read()
            if value is not None:
                self.samples.append(value)

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


@functools.lru_cache(maxsize=1)
def _util_reader():
    import torch

    try:
        torch.cuda.utilization()
        return lambda: float(torch.cuda.utilization())
    except Exception as e:  # noqa: BLE001 - no NVML bindings: nvidia-smi instead
        logger.info("torch.cuda.utilization() unavailable (%s): sampling nvidia-smi", type(e).__name__)
    gpu = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
    cmd = ["nvidia-smi", f"--id={gpu}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]

    def smi() -> float | None:
        try:
            return float(subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout.split()[0])
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return None

    return smi if smi() is not None else None


# --- Measurements ---------------------------------------------------------------------------------------------------

def ceiling(call, rows: int, device: str, images: int, seconds: float) -> tuple[float, float | None]:
    """images/s of ``call()`` (the scorer on one decoded batch of ``rows`` rows in memory), again and again after 2
    warm-up calls."""
    for _ in range(2):
        call()
    _sync(device)
    n = 0
    with UtilSampler(device) as util:
        t = time.perf_counter()
        while n < images and time.perf_counter() - t < seconds:
            out = call()
            n += rows
        _sync(device)
        dt = time.perf_counter() - t
    _check_scored(out, "ceiling")
    return n / dt, util.mean


def ceilings(scorer, decoded: pa.Table, env: Env, images: int) -> dict:
    """The scorer's ceiling on in-memory input: with ``Scorer.stage`` (input staged on the device once, as the decode
    threads stage each batch) and on the host arrays (their copy to the device in every call, not overlapped)."""
    n = decoded.num_rows
    host, host_util = ceiling(lambda: scorer(decoded), n, env.device, images, env.seconds)
    out = {"ceiling_ips": host, "gpu_util_ceiling": host_util, "ceiling_input": "host", "ceiling_host_ips": host}
    staged = scorer.stage(decoded) if hasattr(scorer, "stage") else None  # Scorer.stage: None for RKDE
    if staged is not None:
        rate, util = ceiling(lambda: scorer(decoded, staged), n, env.device, images, env.seconds)
        out.update(ceiling_ips=rate, gpu_util_ceiling=util, ceiling_input="staged")
    return out


def _check_scored(table: pa.Table, what: str) -> None:
    """A benchmark of rows that failed fast would be meaningless: every row must be scored."""
    errors = [e for e in table.column("error").to_pylist() if e is not None]
    if errors:
        msg = f"{what}: {len(errors)} of {table.num_rows} rows failed, e.g. {errors[0]}"
        raise RuntimeError(msg)


def pool_rate(submit, chunks: list, window: int, seconds: float, check=None) -> float:
    """images/s of ``submit(chunk)`` (a future) over ``chunks``, ``window`` in flight; the first ``window`` results
    are the warm-up, the steady phase is timed from the last of them (new chunks stop after ``seconds``). ``check``
    is called on each result."""
    pending, i = deque(), 0
    while i < len(chunks) and len(pending) < window:
        pending.append((len(chunks[i]), submit(chunks[i])))
        i += 1
    done, n, t = 0, 0, None
    while pending:
        rows, future = pending.popleft()
        result = future.result()
        if check:
            check(result)
        done += 1
        if t is None and done == window:
            t = time.perf_counter()
        elif t is not None:
            n += rows
        if i < len(chunks) and (t is None or time.perf_counter() - t < seconds):
            pending.append((len(chunks[i]), submit(chunks[i])))
            i += 1
    if not n:
        msg = f"pool_rate: {len(chunks)} chunks leave nothing after a warm-up of {window}"
        raise ValueError(msg)
    return n / (time.perf_counter() - t)


def decode_bound(paths: list[str], image_size: tuple[int, int], env: Env) -> dict[str, float]:
    """images/s of the decode stage on every CPU: ``decode_table`` on a thread pool, ``decode_batch`` on a process
    pool (images pickled back to this process), in batches of ``--batch-size``; at least 3 windows of batches."""
    from rayanom.data import decode_batch, decode_table

    batch, cpus = env.batch, env.cpus
    n = max(env.decode_images, 3 * cpus * batch)
    chunks = [[paths[j % len(paths)] for j in range(s, min(s + batch, n))] for s in range(0, n, batch)]
    rates = {}
    if "threads" in env.pools:
        with ThreadPoolExecutor(cpus) as pool:
            rates["threads"] = pool_rate(lambda c: pool.submit(decode_table, pa.table({"path": c}), image_size),
                                         chunks, cpus, env.seconds, lambda t: _check_decoded(t.column("error")))
    if "procs" in env.pools:
        rates["procs"] = pool_rate(lambda c: env.procs().submit(decode_batch, {"path": c}, image_size), chunks,
                                   cpus, env.seconds, lambda d: _check_decoded(d["error"]))
    return rates


def _check_decoded(errors) -> None:
    errors = [e for e in (errors.to_pylist() if hasattr(errors, "to_pylist") else list(errors)) if e is not None]
    if errors:
        msg = f"decode bound: {len(errors)} files failed to decode, e.g. {errors[0]}"
        raise RuntimeError(msg)


def end_to_end(ps, info, first_part: int, rows: int, per_part: int, env: Env) -> tuple[float, float | None, int]:
    """images/s of ``PartScorer.score_part`` over parts of the index after a warm-up part of 2 batches; parts of
    ``per_part`` rows until ``rows`` rows or ``--seconds``. Returns (rate, GPU util, rows timed)."""
    from rayanom.parts import failed_rows

    def part(k: int, start: int, stop: int) -> int:
        descriptor = {"part": k, "start": start, "stop": stop, "retry": 0, "index": info.part_of(start, stop)}
        return int(ps.score_part(descriptor)["rows"])

    warm = 2 * env.batch
    part(first_part, 0, warm)
    done, ks = 0, []
    with UtilSampler(env.device) as util:
        t = time.perf_counter()
        for k, start in enumerate(range(warm, warm + rows, per_part), first_part + 1):
            done += part(k, start, min(start + per_part, warm + rows))
            ks.append(k)
            if time.perf_counter() - t > env.seconds:
                break
        dt = time.perf_counter() - t
    failed = {k: n for k, n in failed_rows(ps.output, [first_part, *ks]).items() if n}
    if failed:
        import pyarrow.parquet as pq

        from rayanom.parts import part_name

        errors = pq.read_table(os.path.join(ps.output, part_name(min(failed))), columns=["error"]).column(0)
        msg = (f"end to end: {sum(failed.values())} rows failed in {ps.output}, e.g. "
               f"{next(e for e in errors.to_pylist() if e is not None)}")
        raise RuntimeError(msg)
    return done / dt, util.mean, done


# --- Decode in torch (GPU JPEG) -------------------------------------------------------------------------------------

def torch_images(datas: list[bytes], fmt: str, image_size: tuple[int, int], device: str):
    """Decode with torchvision (JPEG: ``decode_jpeg`` of the whole list on ``device``; PNG: ``decode_png`` on CPU,
    then moved), /255, resize to ``image_size`` with ``interpolate(bilinear, antialias=True)`` on ``device``: a
    (n, 3, h, w) float32 tensor on ``device``, as ``rayanom.data.decode_image`` computes, and each original (h, w)."""
    import torch
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg, decode_png

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    if fmt == "jpeg":
        imgs = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
    else:
        imgs = [decode_png(t, mode=ImageReadMode.RGB).to(device) for t in tensors]

    def resize(x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255.0)
        return F.interpolate(x, size=tuple(image_size), mode="bilinear", antialias=True, align_corners=False)

    if len({tuple(i.shape) for i in imgs}) == 1:
        out = resize(torch.stack(imgs))
    else:
        out = torch.cat([resize(i[None]) for i in imgs])
    return out, [tuple(i.shape[1:]) for i in imgs]


def torch_scored(scorer, rows: pa.Table, datas: list[bytes], image_size: tuple[int, int], device: str) -> pa.Table:
    """``rows`` (JPEG files) decoded by ``torch_images`` and scored. With ``Scorer.stage`` (DFKDE, DFM) the tensor
    stays on the device and is handed over as the staged input, the table's image column left unread (zeros, never
    touched); else the images go back to the host in the table ``decode_table`` would give."""
    from rayanom.data import _decoded_table

    x, sizes = torch_images(datas, "jpeg", image_size, device)
    hw = np.array(sizes, dtype=np.int32).reshape(-1, 2)
    on_device = _feeds_device(scorer)
    images = np.zeros(tuple(x.shape), dtype=np.float32) if on_device else x.cpu().numpy()
    table = _decoded_table(rows, images, hw[:, 0], hw[:, 1], [None] * rows.num_rows)
    return scorer(table, (table, x)) if on_device else scorer(table)


def _feeds_device(scorer) -> bool:
    """Whether the scorer takes a device tensor as its input (``Scorer.stage``; not RKDE, whose stage is None)."""
    return hasattr(scorer, "stage") and scorer.config.model != "rkde"


def torch_jpeg_e2e(scorer, index_path: str, rows: int, image_size: tuple[int, int],
                   env: Env) -> tuple[float, float | None]:
    """images/s of: the index's rows in batches -> file bytes (``read_bytes`` on ``env.cpus`` threads, as many
    batches ahead) -> ``torch_scored``; 2 warm-up batches, then up to ``rows`` rows or ``--seconds``."""
    import pyarrow.parquet as pq

    from rayanom.data import read_bytes, with_row_index

    table = with_row_index(pq.read_table(index_path).select(["path", "label"]))
    batches = [table.slice(s, env.batch) for s in range(0, min(2 * env.batch + rows, table.num_rows), env.batch)]

    def read(b: pa.Table) -> list[bytes]:
        return [read_bytes(p) for p in b.column("path").to_pylist()]

    with ThreadPoolExecutor(env.cpus) as pool:
        ahead = deque(pool.submit(read, b) for b in batches[:env.cpus])

        def step(i: int) -> pa.Table:
            datas = ahead.popleft().result()
            if i + env.cpus < len(batches):
                ahead.append(pool.submit(read, batches[i + env.cpus]))
            return torch_scored(scorer, batches[i], datas, image_size, env.device)

        for i in range(2):
            step(i)
        _sync(env.device)
        n = 0
        with UtilSampler(env.device) as util:
            t = time.perf_counter()
            for i in range(2, len(batches)):
                out = step(i)
                n += batches[i].num_rows
                if time.perf_counter() - t > env.seconds:
                    break
            _sync(env.device)
            dt = time.perf_counter() - t
        for f in ahead:
            f.cancel()
    _check_scored(out, "torch-JPEG")
    return n / dt, util.mean


def _fp32_extractor(scorer, artifact, device: str):
    """The feature stage in fp32, where decode parity is judged (``--precision fp32`` is the parity path): the
    scorer's own when it runs fp32, else a second one with the same weights; None for RKDE (its regions move)."""
    if artifact.config.model == "rkde":
        return None
    if not scorer.extractor.bf16:
        return scorer.extractor
    from rayanom.features import FeatureExtractor
    from rayanom.pipeline import load_weights

    return FeatureExtractor(artifact.config, load_weights(artifact.config, artifact.weights), device, 0, "fp32")


def decode_parity(scorer, artifact, files: dict[str, list[str]], device: str) -> dict[str, float | None]:
    """Max |difference| from ``rayanom.data.decode_image`` on the same files: torch's JPEG images and their fp32
    features (DFKDE, DFM), and torch's resize alone (PNG: the same pixels, torch's resize against Pillow's)."""
    import torch

    from rayanom.data import decode_image, read_bytes

    image_size = artifact.config.image_size
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32  # an fp32 extractor turns it off
    extractor = _fp32_extractor(scorer, artifact, device)
    out = {"files": min(PARITY_IMAGES, len(files["jpeg"]))}
    try:
        for fmt in FORMATS:
            datas = [read_bytes(p) for p in files[fmt][:PARITY_IMAGES]]
            ref = np.stack([decode_image(d, image_size) for d in datas])
            got = torch_images(datas, fmt, image_size, device)[0].cpu().numpy()
            out[f"{fmt}_image_max_abs_diff"] = float(np.abs(got - ref).max())
            if fmt == "jpeg":
                out["jpeg_feature_max_abs_diff"] = (None if extractor is None else
                                                    float(np.abs(extractor(got) - extractor(ref)).max()))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return out


# --- The run --------------------------------------------------------------------------------------------------------

@dataclass
class Env:
    """What every measurement shares: the machine, the files, their indexes, the pools, the settings."""

    root: str
    device: str
    precision: str
    cpus: int
    batch: int
    seconds: float
    pools: tuple[str, ...]
    decode_images: int
    files: dict[str, list[str]] = field(default_factory=dict)
    indexes: dict[str, tuple[str, object]] = field(default_factory=dict)
    decode: dict[tuple, dict[str, float]] = field(default_factory=dict)
    _procs: ProcessPoolExecutor | None = None

    def procs(self) -> ProcessPoolExecutor:
        """One spawned process pool for the run (spawn: safe beside CUDA), warmed up once."""
        if self._procs is None:
            import multiprocessing

            self._procs = ProcessPoolExecutor(self.cpus, mp_context=multiprocessing.get_context("spawn"))
            for f in [self._procs.submit(time.sleep, 0.2) for _ in range(2 * self.cpus)]:
                f.result()
        return self._procs

    def index(self, fmt: str, rows: int):
        path = os.path.join(self.root, f"index-{fmt}.parquet")
        if fmt not in self.indexes:
            self.indexes[fmt] = (path, write_index(path, self.files[fmt], rows))
        return self.indexes[fmt]

    def decode_rates(self, fmt: str, image_size: tuple[int, int]) -> dict[str, float]:
        key = (fmt, tuple(image_size))
        if key not in self.decode:
            self.decode[key] = decode_bound(self.files[fmt], image_size, self)
            logger.info("decode bound %s -> %s: %s", fmt, image_size,
                        ", ".join(f"{k} {v:.1f}/s" for k, v in self.decode[key].items()))
        return self.decode[key]


def bench_model(name: str, args: argparse.Namespace, env: Env) -> list[dict]:
    """One model's rows: fit, build the actor, then ceiling, decode bound, e2e (and torch-JPEG) per format."""
    from rayanom.data import decode_table
    from rayanom.index import read_rows

    config = model_config(name, args)
    precision = "fp32" if name == "rkde" else env.precision  # the region model runs in fp32 only
    rows = args.rkde_rows if name == "rkde" else args.rows
    fit_n = min(args.fit_images, 32) if name == "rkde" else args.fit_images
    artifact = fit_artifact(config, env.files["png"][:fit_n], env.device, precision, env.batch)
    ps = part_scorer(artifact, os.path.join(env.root, f"scores-{name}"), env.device, precision, env.batch,
                     args.decode_threads)
    _, png_info = env.index("png", 2 * env.batch + max(args.rows, args.rkde_rows))
    decoded = decode_table(read_rows(png_info, 0, env.batch), config.image_size)
    ceil = ceilings(ps.scorer, decoded, env, rows)
    logger.info("%s: ceiling %.1f images/s (%s input; host arrays %.1f)", name, ceil["ceiling_ips"],
                ceil["ceiling_input"], ceil["ceiling_host_ips"])
    torch_jpeg = args.torch_jpeg == "on" or (args.torch_jpeg == "auto" and env.device == "cuda")
    parity = decode_parity(ps.scorer, artifact, env.files, env.device) if torch_jpeg else {}
    per_part = min(args.rows_per_part, max(env.batch, rows // 4))  # several parts: --seconds can stop after any
    out = []
    for offset, fmt in enumerate(FORMATS):
        rates = env.decode_rates(fmt, config.image_size)
        pool = max(rates, key=rates.get)
        path, info = env.index(fmt, 2 * env.batch + max(args.rows, args.rkde_rows))
        e2e, e2e_util, timed = end_to_end(ps, info, offset * JPEG_PART_OFFSET, rows, per_part, env)
        logger.info("%s %s: end to end %.1f images/s (%d rows)", name, fmt, e2e, timed)
        tj, tj_util = (torch_jpeg_e2e(ps.scorer, path, rows, config.image_size, env)
                       if torch_jpeg and fmt == "jpeg" else (None, None))
        out.append({"model": name, "format": fmt, "backbone": getattr(config, "backbone", "faster-rcnn r50-fpn"),
                    "image_size": list(config.image_size), "precision": precision, "batch_size": env.batch,
                    **ceil, "decode_ips": rates[pool],
                    "decode_pool": pool, "decode_cpus": env.cpus, "decode_rates": rates, "e2e_ips": e2e,
                    "e2e_rows": timed, "e2e_decode_threads": ps.decoder.threads, "gpu_util_e2e": e2e_util,
                    "torch_jpeg_ips": tj, "gpu_util_torch_jpeg": tj_util,
                    "torch_jpeg_input": None if tj is None else "staged" if _feeds_device(ps.scorer) else "host",
                    "ratio": e2e / min(ceil["ceiling_ips"], rates[pool]), "parity": parity})
    ps.decoder.pool.shutdown()
    del ps
    _empty_cache(env.device)
    return out


def cpus_needed(rows: list[dict]) -> dict[str, float]:
    """Per model and format: decode CPUs one GPU needs to reach its ceiling = ceiling / (decode bound / CPUs)."""
    return {f"{r['model']}/{r['format']}": r["ceiling_ips"] / (r["decode_ips"] / r["decode_cpus"]) for r in rows}


def _num(x: float | None) -> str:
    """A rate: whole numbers from 100 up, else 3 significant digits."""
    return "n/a" if x is None else f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f}"


def table(rows: list[dict]) -> str:
    """The result table, one line per model and format."""
    head = ["model", "format", "prec", "ceiling/s (host in)", "decode/s (pool x CPUs)", "e2e/s (dec thr)",
            "torch-JPEG e2e/s (in)", "GPU% ceil", "GPU% e2e", "GPU% tJPEG", "e2e/min(ceil,dec)"]
    lines = [[r["model"], r["format"], r["precision"],
              _num(r["ceiling_ips"]) + (f" ({_num(r['ceiling_host_ips'])})" if r["ceiling_input"] == "staged" else ""),
              f"{_num(r['decode_ips'])} ({r['decode_pool']} x {r['decode_cpus']})",
              f"{_num(r['e2e_ips'])} ({r['e2e_decode_threads']})",
              "-" if r["format"] != "jpeg" else "n/a" if r["torch_jpeg_ips"] is None else
              f"{_num(r['torch_jpeg_ips'])} ({r['torch_jpeg_input']})", _pct(r["gpu_util_ceiling"]),
              _pct(r["gpu_util_e2e"]), _pct(r["gpu_util_torch_jpeg"]) if r["format"] == "jpeg" else "-",
              f"{r['ratio']:.2f}"] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, lines)])


def summary_lines(rows: list[dict]) -> list[str]:
    """Below the table: decode CPUs per GPU, and how far torch's decode is from Pillow's."""
    need = cpus_needed(rows)
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        parts = [f"{fmt.upper()} {need[f'{model}/{fmt}']:.3g}" for fmt in FORMATS if f"{model}/{fmt}" in need]
        out.append(f"decode CPUs one GPU needs to reach its ceiling, {model}: {', '.join(parts)} "
                   "(ceiling / decode rate per CPU)")
    for r in rows:
        p = r["parity"]
        if r["format"] != "jpeg" or not p:
            continue
        feats = p["jpeg_feature_max_abs_diff"]
        out.append(f"torch decode vs rayanom.data.decode_image, {r['model']} ({p['files']} files): JPEG images "
                   f"max |diff| {p['jpeg_image_max_abs_diff']:.3g}, their fp32 features "
                   f"{'n/a' if feats is None else f'{feats:.3g}'} (decode moves into torch only within 1e-4); "
                   f"PNG, same pixels, torch's resize: images {p['png_image_max_abs_diff']:.3g}")
    return out


def header(env: Env) -> str:
    import torch
    import torchvision

    from rayanom.features import device_kind

    return (f"device {device_kind(env.device)}, {env.cpus} CPUs; torch {torch.__version__}, torchvision "
            f"{torchvision.__version__}; precision {env.precision} (rkde fp32); batch {env.batch}; "
            f"ray importable: {_ray_importable()}")


def _ray_importable() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("ray") is not None
    except ValueError:  # sys.modules["ray"] = None
        return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="dfkde,dfm,rkde", help="comma-separated, of dfkde, dfm, rkde")
    p.add_argument("--rows", type=int, default=3072, help="images per end-to-end measurement (DFKDE, DFM)")
    p.add_argument("--rkde-rows", type=int, default=192, help="images per end-to-end measurement (RKDE)")
    p.add_argument("--rows-per-part", type=int, default=512, help="rows per part scored end to end")
    p.add_argument("--image-size", type=int, default=256, help="DFKDE/DFM network input (RKDE: 240 x 360)")
    p.add_argument("--backbone", help="DFKDE/DFM timm backbone (default: the model's, resnet50)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="DFKDE/DFM; auto: bf16 where it measures fast (rayanom.features.bf16_is_fast)")
    p.add_argument("--seconds", type=float, default=8.0, help="cap on each measurement's steady phase")
    p.add_argument("--decode-threads", type=int, default=0, help="PartScorer's decode threads (0: its default)")
    p.add_argument("--decode-pools", default="threads,procs", help="decode-bound pools: threads, procs or both")
    p.add_argument("--torch-jpeg", choices=["auto", "on", "off"], default="auto",
                   help="torch-JPEG row and decode parity; auto: with CUDA only (on: also on CPU, to test the path)")
    p.add_argument("--file-px", type=int, default=512, help="generated images are FILE_PX x FILE_PX")
    p.add_argument("--distinct", type=int, default=128, help="distinct generated images (the indexes cycle them)")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--fit-images", type=int, default=64,
                   help="distinct images the heads are fitted on (RKDE: at most 32); at most --distinct")
    p.add_argument("--json", help="also write the rows and settings here")
    p.add_argument("--verbose", action="store_true", help="rayanom's INFO logs too")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    pools = tuple(x for x in args.decode_pools.split(",") if x)
    if not models or set(models) - set(MODELS) or not pools or set(pools) - {"threads", "procs"}:
        p.error(f"--models: some of {list(MODELS)}; --decode-pools: threads and/or procs")
    if args.fit_images > args.distinct:  # a repeated image makes the KDE's bandwidth degenerate
        p.error(f"--fit-images {args.fit_images} > --distinct {args.distinct}: the heads need distinct images")
    args.models, args.decode_pools = models, pools
    return args


def make_env(args: argparse.Namespace, root: str) -> Env:
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    precision = args.precision
    if precision == "auto" and set(args.models) - {"rkde"}:
        from rayanom.features import bf16_is_fast

        precision = "bf16" if bf16_is_fast(device) else "fp32"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    env = Env(root=root, device=device, precision="fp32" if precision == "auto" else precision, cpus=cpus,
              batch=args.batch_size, seconds=args.seconds, pools=args.decode_pools, decode_images=args.rows)
    env.files = make_files(os.path.join(root, "files"), args.distinct, args.file_px, args.jpeg_quality, cpus)
    return env


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logger.setLevel(logging.INFO)
    if args.verbose:
        logging.getLogger("rayanom").setLevel(logging.INFO)
    sys.path.insert(0, REPO)
    t = time.perf_counter()
    root = tempfile.mkdtemp(prefix="rayanom-gpu-bench-")
    env = None
    try:
        os.makedirs(os.path.join(root, "files"))
        env = make_env(args, root)
        rows = [row for name in args.models for row in bench_model(name, args, env)]
    finally:
        if env is not None and env._procs is not None:
            env._procs.shutdown(cancel_futures=True)
        shutil.rmtree(root, ignore_errors=True)
    print(header(env))
    print(table(rows))
    for line in summary_lines(rows):
        print(line)
    print(f"total {time.perf_counter() - t:.0f} s", flush=True)
    if args.json:
        meta = {"header": header(env), "args": vars(args), "cpus_needed": cpus_needed(rows),
                "total_s": time.perf_counter() - t}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
