"""One GPU without Ray: the bare forward, the accelerator stage alone, decode per core, and the CPUs one GPU needs.

    python benchmarks/gpu.py                        # on the GPU machine, from the repo root: ~2-3 minutes (estimated)
    python benchmarks/gpu.py --models dfkde --seconds 5             # one model, quicker
    python benchmarks/gpu.py --device cpu --backbone resnet18 --image-size 64 --file-px 96 --rows 16 --batch-size 8 \
        --distinct 32 --fit-images 32 --precision fp32 --seconds 1          # CPU smoke run (tests/test_gpu_bench.py)

No install and no Ray needed: the script puts the repo root on ``sys.path`` and drives the two stages of the scoring
plane as plain objects, as ``tests/test_reliability.py`` does: the decode stage (``plane.decode_units`` over
``stages.score_units`` / ``score_unit_rows``: one row a forward batch, ``plane.to_batch_row``) and the model stage
(``stages.ScoreBatches``, one batch row a call). Where ``import ray`` fails (the GPU machine) and the library
imports it anyway, a stand-in module that says Ray is not initialised is registered first (``_import_stages``).

It generates normal images (``--distinct`` textured parts of ``--file-px``², PNG and JPEG, in a temporary directory
removed at the end), fits each model's head in-process on the backbone features of ``--fit-images`` of them (random
weights from a seed: nothing is downloaded), saves the artifact beside the parts as ``workflows.score`` does, builds
one ``ScoreBatches`` on a parquet index of those files, and measures for DFKDE and DFM (resnet50 unless
``--backbone``, at ``--image-size``², batches of ``--batch-size``):

1. **bare forward**: the backbone (``FeatureExtractor.model``, its memory format) on one random input tensor already
   on the device, under ``inference_mode`` and, in bf16, autocast: the accelerator's ceiling;
2. **stage**: the accelerator stage alone, fed decoded batches from memory: batch rows made once (``decode_units``,
   hence ``to_batch_row``; ``--rows`` rows, whole parts), then ``plane.from_batch_row`` + ``ScoreBatches._score``
   (staging, forward, head, output table: no I/O) on them again and again, as a fraction of the bare forward
   (target >= 0.8). And **actor call**: ``ScoreBatches.__call__`` on the same rows (also its crash marker, the
   fragment written per batch to a temporary output directory, each part joined when its last batch is in; the rows
   given new part numbers each pass), timed from part to part (each part read back: no row failed);
3. **decode per core**: ``decode.decode_table`` (read, decode, resize to the model's input size) in this one process on
   one thread, over the ``--file-px``² PNG and JPEG files; and from 1-3 the decode CPUs one GPU needs: bare forward
   (and stage) images/s / decode images/s per core;
4. **end to end** (unless ``--skip-e2e``): both stages in this one process, per format: ``decode_units`` in batch-sized
   units on a thread pool of every CPU (as many units ahead) feeding ``ScoreBatches.__call__`` on this thread, which
   writes fragments and parts (not a number for a cluster, where decode runs on other nodes).

Every rate is images/s in a steady phase (after warm-up), each capped at ``--seconds``; GPU utilisation is the mean of
``torch.cuda.utilization()`` (or ``nvidia-smi``) sampled every 0.2 s in each steady phase (n/a on CPU). It prints
one table (also ``--json PATH``), a row per model, then the decode rates per core, the CPUs one GPU needs and whether
the stage meets its targets. Not part of the test suite (``tests/test_gpu_bench.py`` runs it tiny on CPU).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import types
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MODELS = ("dfkde", "dfm")
FORMATS = ("png", "jpeg")
PASS_PARTS = 100_000  # the stage's pass c scores its rows as parts c * PASS_PARTS + k (part names have 8 digits)
STAGE_TARGET, UTIL_TARGET = 0.8, 80.0  # issue 28: the stage alone >= 0.8 of the bare forward, GPU busy >= 80 %

logger = logging.getLogger("benchmarks.gpu")


def _import_stages() -> None:
    """Import ``rayanom.stages`` (hence ``plane``). Where Ray is absent and the library imports it anyway, a
    stand-in ``ray`` module whose ``is_initialized()`` is False is registered first: the stages then run as plain
    objects (``plane.node_id`` gives ""); nothing of Ray is called on that path."""
    try:
        import rayanom.stages  # noqa: F401
    except ImportError as e:
        if e.name != "ray":
            raise
        logger.info("no Ray here (%s): a stand-in ray module for the library's imports", e)
        stub = types.ModuleType("ray")
        stub.is_initialized = lambda: False
        sys.modules["ray"] = stub
        import rayanom.stages  # noqa: F401


# --- Inputs: generated files and their index ------------------------------------------------------------------------

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


def write_index(path: str, files: dict[str, list[str]], per_format: int):
    """A parquet index (``path``, ``label``): ``per_format`` rows cycling through the PNG files, then as many through
    the JPEG files; described for the stages."""
    import pyarrow.parquet as pq

    from rayanom.index import describe_index

    paths = [files[fmt][i % len(files[fmt])] for fmt in FORMATS for i in range(per_format)]
    pq.write_table(pa.table({"path": paths, "label": pa.array(np.zeros(len(paths), dtype=np.int64))}), path)
    return describe_index(path)


# --- The model: config, fitted head, the model stage ----------------------------------------------------------------

def model_config(name: str, args: argparse.Namespace):
    """The model's defaults (``rayanom.config``), with ``--backbone`` and ``--image-size``."""
    from rayanom.specs import spec

    kwargs = {"image_size": (args.image_size, args.image_size)}
    if args.backbone:
        kwargs["backbone"] = args.backbone
    return spec(name).config(**kwargs)


def fit_artifact(config, paths: list[str], device: str, precision: str, batch: int):
    """An artifact as ``workflows.fit`` makes one: the head fitted on the features of ``paths``, with seeded random
    weights and the weight source an artifact records for them."""
    from rayanom.artifact import Artifact
    from rayanom.decode import decode_batch
    from rayanom.specs import spec_of

    t = time.perf_counter()
    spec = spec_of(config)
    state, source = spec.weights(config, {}, False)
    extractor = spec.extractor(config, state, device, 0, precision)
    feats = np.concatenate([spec.items(extractor, decode_batch({"path": paths[s:s + batch]},
                                                                config.image_size)["image"])[1]
                            for s in range(0, len(paths), batch)])
    head = spec.head(config).fit(feats)
    del extractor
    _empty_cache(device)
    logger.info("%s: head fitted on %d x %d features of %d images in %.1f s", config.model, *feats.shape, len(paths),
                time.perf_counter() - t)
    provenance = {"benchmark": "benchmarks/gpu.py", "run": {"precision": precision}, "n_bank_rows": len(feats)}
    return Artifact(config=config, head=head, weights=source, provenance=provenance)


def score_batches(artifact, output: str, info, env: Env):
    """The model stage as ``workflows.score`` builds its actors: from the model copy saved beside the parts."""
    from rayanom.parts import MODEL_COPY
    from rayanom.artifact import artifact_fingerprint
    from rayanom.stages import ScoreBatches

    model = f"{output.rstrip('/')}/{MODEL_COPY}"
    artifact.save(model, overwrite=True)
    return ScoreBatches(model=model, fingerprint=artifact_fingerprint(artifact), weights=artifact.weights,
                        device=env.device, threads=0, precision=env.precision, output=output,
                        job=uuid.uuid4().hex[:12], batch_size=env.batch, index=info)


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

def steady(work: Iterator[int], device: str, seconds: float, warm: int) -> dict:
    """images/s of ``work`` (each step does some work and yields its images) after ``warm`` steps, until ``seconds``
    have passed or the work runs out; with the mean GPU utilisation and the images timed."""
    try:
        for _ in range(warm):
            next(work)
        _sync(device)
        n = 0
        with UtilSampler(device) as util:
            t = time.perf_counter()
            for rows in work:
                n += rows
                if time.perf_counter() - t >= seconds:
                    break
            _sync(device)
            dt = time.perf_counter() - t
    finally:
        work.close()
    if not n:
        msg = f"nothing left to time after a warm-up of {warm} steps"
        raise RuntimeError(msg)
    return {"ips": n / dt, "gpu_util": util.mean, "rows": n}


def bare_forward(extractor, image_size: tuple[int, int], env: Env) -> Iterator[int]:
    """The backbone alone on one random input already on the device, batch after batch (not synchronised: the device
    runs as fast as the launches let it; ``steady`` synchronises at the end)."""
    import torch

    x = torch.rand(env.batch, 3, *image_size, device=extractor.device).contiguous(memory_format=extractor.memory_format)
    while True:
        with torch.inference_mode(), torch.autocast(extractor.device.type, torch.bfloat16, enabled=extractor.bf16):
            extractor.model(x)
        yield env.batch


def stage_alone(sb, rows: list[pa.Table]) -> Iterator[int]:
    """``from_batch_row`` + ``ScoreBatches._score`` on the batch rows, again and again (no I/O)."""
    from rayanom.plane import from_batch_row

    for row in itertools.cycle(rows):
        out = sb._score(from_batch_row(row["meta"][0], row["pixels"][0], sb.image_size, sb.bf16))
        _check_scored(out, "stage")
        yield out.num_rows


def actor_calls(sb, rows: list[pa.Table]) -> Iterator[int]:
    """``ScoreBatches.__call__`` on the batch rows, pass after pass, pass c as parts c * PASS_PARTS + k; yields the
    rows of each part it joins (so ``steady`` stops between parts)."""
    col = rows[0].schema.get_field_index("part")
    for c in itertools.count(1):
        if c * PASS_PARTS >= 10**8:
            return
        for row in rows:
            k = c * PASS_PARTS + row.column("part")[0].as_py()
            written = sb(row.set_column(col, "part", pa.array([k], pa.int64())))["written"][0].as_py()
            if written:
                yield _joined(sb, k, written, row)


def _joined(sb, k: int, written: int, row: pa.Table) -> int:
    """The rows of part ``k`` just joined, checked: all of the part's rows, none failed."""
    from rayanom.parts import failed_rows

    expected = row.column("stop")[0].as_py() - row.column("first")[0].as_py()
    failed = failed_rows(sb.output, [k])[k]
    if written != expected or failed:
        msg = f"part {k}: {written} rows joined of {expected}, {failed} failed"
        raise RuntimeError(msg)
    return written


def _check_scored(table: pa.Table, what: str) -> None:
    """A benchmark of rows that failed fast would be meaningless: every row must be scored."""
    errors = [e for e in table.column("error").to_pylist() if e is not None]
    if errors:
        msg = f"{what}: {len(errors)} of {table.num_rows} rows failed, e.g. {errors[0]}"
        raise RuntimeError(msg)


def decode_unit(unit: dict, info, output: str, batch: int, image_size: tuple[int, int],
                bf16: bool = False) -> list[pa.Table]:
    """The decode stage on one unit, as the job runs it (``decode_units`` with the unit's rows and crash marker):
    its batch rows."""
    from rayanom.storage import ReadPolicy
    from rayanom.stages import score_unit_marker, score_unit_rows
    from rayanom.plane import decode_units

    tables = decode_units(pa.Table.from_pylist([unit]), functools.partial(score_unit_rows, index=info, output=output),
                          batch, image_size, ReadPolicy(), functools.partial(score_unit_marker, output=output), bf16)
    return [t.slice(i, 1) for t in tables for i in range(t.num_rows)]


def parts_of(first: int, stop: int, per_part: int) -> list[dict]:
    """The parts (``workflows.score``'s descriptors) of rows [first, stop), at multiples of ``per_part``."""
    return [{"part": s // per_part, "start": s, "stop": min(s + per_part, stop), "retry": 0}
            for s in range(first, stop, per_part)]


def batch_rows(sb, info, parts: list[dict], env: Env) -> list[pa.Table]:
    """The batch rows of ``parts``, decoded once on a thread pool of every CPU, in order."""
    from rayanom.stages import score_units

    decode = functools.partial(decode_unit, info=info, output=sb.output, batch=env.batch, image_size=sb.image_size,
                               bf16=sb.bf16)
    with ThreadPoolExecutor(env.cpus) as pool:
        return [row for rows in pool.map(decode, score_units(parts, env.batch)) for row in rows]


def end_to_end(sb, info, parts: list[dict], env: Env) -> Iterator[int]:
    """Both stages in this process: units of one forward batch decoded on ``env.cpus`` threads, as many ahead,
    each batch row then given to ``ScoreBatches.__call__`` here (each part it joins checked); yields each batch's
    images."""
    from rayanom.stages import score_units

    decode = functools.partial(decode_unit, info=info, output=sb.output, batch=env.batch, image_size=sb.image_size,
                               bf16=sb.bf16)
    units = iter(score_units(parts, env.batch))
    with ThreadPoolExecutor(env.cpus) as pool:
        ahead = deque(pool.submit(decode, u) for u in itertools.islice(units, env.cpus))
        try:
            while ahead:
                rows = ahead.popleft().result()
                ahead.extend(pool.submit(decode, u) for u in itertools.islice(units, 1))
                for row in rows:
                    written = sb(row)["written"][0].as_py()
                    if written:
                        _joined(sb, row.column("part")[0].as_py(), written, row)
                    yield row.column("n")[0].as_py()
        finally:
            for f in ahead:
                f.cancel()


def decode_per_core(paths: list[str], image_size: tuple[int, int], env: Env) -> float:
    """images/s of ``decode_table`` on one thread of this process, in batches cycling through ``paths``."""
    from rayanom.decode import decode_table

    def work() -> Iterator[int]:
        for s in itertools.count(0, env.batch):
            chunk = [paths[(s + j) % len(paths)] for j in range(env.batch)]
            _check_scored(decode_table(pa.table({"path": chunk}), image_size).table, "decode")
            yield len(chunk)

    return steady(work(), "cpu", env.seconds, warm=1)["ips"]


# --- The run --------------------------------------------------------------------------------------------------------

@dataclass
class Env:
    """What every measurement shares: the machine, the files, the settings, the decode rates per input size."""

    root: str
    device: str
    precision: str
    cpus: int
    batch: int
    seconds: float
    file_px: int
    ray_importable: bool
    files: dict[str, list[str]] = field(default_factory=dict)
    decode: dict[tuple, dict[str, float]] = field(default_factory=dict)

    def decode_rates(self, image_size: tuple[int, int]) -> dict[str, float]:
        key = tuple(image_size)
        if key not in self.decode:
            self.decode[key] = {fmt: decode_per_core(self.files[fmt], image_size, self) for fmt in FORMATS}
            logger.info("decode per core to %s: %s", image_size,
                        ", ".join(f"{k} {v:.1f}/s" for k, v in self.decode[key].items()))
        return self.decode[key]


def bench_model(name: str, args: argparse.Namespace, env: Env) -> dict:
    """One model's row: fit, build the model stage, then bare forward, stage, actor call, decode, end to end."""
    config = model_config(name, args)
    artifact = fit_artifact(config, env.files["png"][:args.fit_images], env.device, env.precision, env.batch)
    per_part = min(args.rows_per_part, args.rows)
    stage_rows = max(1, args.rows // per_part) * per_part  # whole parts: each pass joins them
    per_format = -(-max(args.e2e_rows, stage_rows) // per_part) * per_part
    root = os.path.join(env.root, name)
    os.makedirs(root)
    info = write_index(os.path.join(root, "index.parquet"), env.files, per_format)
    sb = score_batches(artifact, os.path.join(root, "scores"), info, env)
    t = time.perf_counter()
    rows = batch_rows(sb, info, parts_of(0, stage_rows, per_part), env)
    logger.info("%s: %d batch rows of %d images decoded in %.1f s", name, len(rows), stage_rows,
                time.perf_counter() - t)
    out = {"model": name, "backbone": config.backbone, "image_size": list(config.image_size),
           "precision": env.precision, "batch_size": env.batch, "stage_rows": stage_rows, "rows_per_part": per_part}
    for key, work, warm in (("bare", bare_forward(sb.scorer.extractor, config.image_size, env), 3),
                            ("stage", stage_alone(sb, rows), 2), ("call", actor_calls(sb, rows), 1)):
        r = steady(work, env.device, env.seconds, warm)
        out.update({f"{key}_ips": r["ips"], f"gpu_util_{key}": r["gpu_util"], f"{key}_timed": r["rows"]})
        logger.info("%s: %s %.1f images/s (GPU %s %%)", name, key, r["ips"], _pct(r["gpu_util"]))
    del rows
    out["stage_ratio"], out["call_ratio"] = out["stage_ips"] / out["bare_ips"], out["call_ips"] / out["bare_ips"]
    out["decode_per_core"] = env.decode_rates(config.image_size)
    out["cpus_needed"] = {fmt: {k: out[f"{k}_ips"] / out["decode_per_core"][fmt] for k in ("bare", "stage")}
                          for fmt in FORMATS}
    out["e2e"] = {} if args.skip_e2e else {fmt: e2e_rate(sb, info, i, per_format, per_part, env)
                                           for i, fmt in enumerate(FORMATS)}
    del sb
    _empty_cache(env.device)
    return out


def e2e_rate(sb, info, i: int, per_format: int, per_part: int, env: Env) -> dict:
    """End to end over the parts of format ``i``'s rows (the index's rows [i F, (i + 1) F))."""
    r = steady(end_to_end(sb, info, parts_of(i * per_format, (i + 1) * per_format, per_part), env), env.device,
               env.seconds, warm=env.cpus)
    logger.info("%s %s: end to end %.1f images/s (%d images)", sb.scorer.config.model, FORMATS[i], r["ips"], r["rows"])
    return r


def _num(x: float | None) -> str:
    """A rate: whole numbers from 100 up, else 3 significant digits."""
    return "n/a" if x is None else f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f}"


def table(rows: list[dict]) -> str:
    """The result table, one line per model: images/s, and in brackets the fraction of the bare forward and the GPU
    utilisation (%)."""
    head = ["model", "prec", "backbone", "input", "bare fwd/s (GPU%)", "stage/s (x bare, GPU%)",
            "call/s (x bare, GPU%)", *[f"e2e {fmt.upper()}/s (GPU%)" for fmt in FORMATS]]
    lines = []
    for r in rows:
        e2e = r.get("e2e") or {}
        lines.append([r["model"], r["precision"], r["backbone"], "x".join(map(str, r["image_size"])),
                      f"{_num(r['bare_ips'])} ({_pct(r['gpu_util_bare'])})",
                      *[f"{_num(r[f'{k}_ips'])} ({r[f'{k}_ratio']:.2f}, {_pct(r[f'gpu_util_{k}'])})"
                        for k in ("stage", "call")],
                      *[f"{_num(e2e[fmt]['ips'])} ({_pct(e2e[fmt]['gpu_util'])})" if fmt in e2e else "-"
                        for fmt in FORMATS]])
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, lines)])


def summary_lines(rows: list[dict], env: Env) -> list[str]:
    """Below the table: decode per core, the decode CPUs one GPU needs, the stage against its targets."""
    out = []
    for size in dict.fromkeys(tuple(r["image_size"]) for r in rows):
        rates = env.decode[size]
        out.append(f"decode per core (one thread, decode_table {env.file_px}² -> {size[0]}x{size[1]}): "
                   + ", ".join(f"{fmt.upper()} {_num(rates[fmt])}/s" for fmt in FORMATS))
    for r in rows:
        need = r["cpus_needed"]
        out.append(f"decode CPUs one GPU needs, {r['model']}: "
                   + ", ".join(f"{fmt.upper()} {need[fmt]['bare']:.3g} (bare forward) / {need[fmt]['stage']:.3g} "
                               "(stage)" for fmt in FORMATS))
    for r in rows:
        util = r["gpu_util_stage"]
        out.append(f"target, {r['model']}: stage {r['stage_ratio']:.2f} of the bare forward (>= {STAGE_TARGET}: "
                   f"{'met' if r['stage_ratio'] >= STAGE_TARGET else 'missed'}), GPU {_pct(util)} % (>= "
                   f"{UTIL_TARGET:.0f}: {'n/a' if util is None else 'met' if util >= UTIL_TARGET else 'missed'})")
    return out


def header(env: Env) -> str:
    import torch

    from rayanom.features import device_kind

    return (f"device {device_kind(env.device)}, {env.cpus} CPUs; torch {torch.__version__}; precision "
            f"{env.precision}; batch {env.batch}; seconds {env.seconds:g}; ray importable: {env.ray_importable}")


def _ray_importable() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("ray") is not None
    except ValueError:  # sys.modules["ray"] = None
        return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="dfkde,dfm", help="comma-separated, of dfkde, dfm")
    p.add_argument("--rows", type=int, default=1024,
                   help="images decoded once for the stage measurements (whole parts of --rows-per-part)")
    p.add_argument("--rows-per-part", type=int, default=512, help="rows per part (at most --rows)")
    p.add_argument("--e2e-rows", type=int, default=16384, help="most images per format end to end")
    p.add_argument("--skip-e2e", action="store_true", help="no end-to-end measurement")
    p.add_argument("--image-size", type=int, default=256, help="network input")
    p.add_argument("--backbone", help="timm backbone (default: the model's, resnet50)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 where it measures fast (rayanom.features.bf16_is_fast)")
    p.add_argument("--seconds", type=float, default=8.0, help="cap on each measurement's steady phase")
    p.add_argument("--file-px", type=int, default=512, help="generated images are FILE_PX x FILE_PX")
    p.add_argument("--distinct", type=int, default=128, help="distinct generated images (the index cycles them)")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--fit-images", type=int, default=64, help="distinct images the heads are fitted on")
    p.add_argument("--json", help="also write the rows and settings here")
    p.add_argument("--verbose", action="store_true", help="rayanom's INFO logs too")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    if not args.models or set(args.models) - set(MODELS):
        p.error(f"--models: some of {list(MODELS)}")
    if args.fit_images > args.distinct:  # a repeated image makes the KDE's bandwidth degenerate
        p.error(f"--fit-images {args.fit_images} > --distinct {args.distinct}: the heads need distinct images")
    if min(args.rows, args.rows_per_part, args.batch_size) < 1:
        p.error("--rows, --rows-per-part and --batch-size: at least 1")
    return args


def make_env(args: argparse.Namespace, root: str, ray_importable: bool) -> Env:
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    precision = args.precision
    if precision == "auto":
        from rayanom.features import bf16_is_fast

        precision = "bf16" if bf16_is_fast(device, model_config(args.models[0], args)) else "fp32"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    env = Env(root=root, device=device, precision=precision, cpus=cpus, batch=args.batch_size, seconds=args.seconds,
              file_px=args.file_px, ray_importable=ray_importable)
    os.makedirs(os.path.join(root, "files"))
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
    ray_importable = _ray_importable()
    _import_stages()
    root = tempfile.mkdtemp(prefix="rayanom-gpu-bench-")
    try:
        env = make_env(args, root, ray_importable)
        rows = [bench_model(name, args, env) for name in args.models]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(header(env))
    print(table(rows))
    for line in summary_lines(rows, env):
        print(line)
    print(f"total {time.perf_counter() - t:.0f} s", flush=True)
    if args.json:
        meta = {"header": header(env), "args": vars(args), "total_s": time.perf_counter() - t,
                "decode_per_core": {"x".join(map(str, k)): v for k, v in env.decode.items()}}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
