"""A generated demo image set: textured discs on a background, and the same discs with visible defects.

Written as an MVTec AD category (``train/good``, ``test/<good or defect>``, ``ground_truth/<defect>/<name>_mask.png``)
and indexed through ``rayanom.folders``, the way a user's folders are. The jobs' embedded default (no ``--index``,
``demo_set``) sets aside the same val split as ``jobs/index.py`` (``folders.VAL_FRACTION`` of each defect type's test
images), so the demo ends with decisions and the threshold they used; the tests' sets have none unless they ask.
Deterministic for a given seed.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from rayanom.folders import VAL_FRACTION, mvtec_index, write_index

logger = logging.getLogger(__name__)

DEFECTS = ("scratch", "stain", "hole", "crack")


def _disc(rng: np.random.Generator, size: int) -> Image.Image:
    """A normal disc: grey, with fine concentric texture, small pose/lighting jitter, sensor noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = size / 2 + rng.normal(0, size * 0.01, 2)
    r = np.hypot(xx - cx, yy - cy)
    radius = size * (0.36 + rng.normal(0, 0.004))
    background = 40 + 10 * (yy / size)
    disc = 150 + 12 * np.sin(r / size * 90 + rng.uniform(0, 2 * np.pi)) + rng.normal(0, 2)
    grey = np.where(r < radius, disc, background)
    grey = np.where(r < radius * 0.25, background + 5, grey)  # centre bore
    img = np.stack([grey * 0.98, grey, grey * 1.03], axis=-1) + rng.normal(0, 3, (size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _defect(img: Image.Image, kind: str, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """The disc with a defect of ``kind``, and the defect's mask (255 where it is drawn)."""
    size = img.size[0]
    mask = Image.new("L", img.size, 0)
    draws = [(ImageDraw.Draw(img), None), (ImageDraw.Draw(mask), 255)]
    c = size / 2
    ang = rng.uniform(0, 2 * np.pi)
    px, py = c + np.cos(ang) * size * 0.18, c + np.sin(ang) * size * 0.18
    s = size * rng.uniform(0.11, 0.15)
    if kind == "crack":  # a bright zig-zag
        pts = [(px + rng.uniform(-s, s), py + rng.uniform(-s, s)) for _ in range(6)]
    for draw, white in draws:
        if kind == "scratch":
            dx, dy = np.cos(ang + 1.57) * s * 1.3, np.sin(ang + 1.57) * s * 1.3
            draw.line([(px - dx, py - dy), (px + dx, py + dy)], fill=white or (20, 20, 25), width=max(6, size // 14))
        elif kind == "stain":
            draw.ellipse([px - s, py - s * 0.7, px + s, py + s * 0.7], fill=white or (170, 60, 30))
        elif kind == "hole":
            draw.ellipse([px - s * 0.7, py - s * 0.7, px + s * 0.7, py + s * 0.7], fill=white or (5, 5, 5))
        else:
            draw.line(pts, fill=white or (250, 250, 235), width=max(5, size // 18))
    return img, mask


def make_demo(root: str, n_train: int = 100, n_test_normal: int = 30, n_test_anomalous: int = 30,
              size: int = 320, seed: int = 0, val_fraction: float = 0.0) -> str:
    """Write the demo's PNGs as the MVTec AD category ``root/discs``, with its indexes; return the index path.

    The index ``root/index.parquet`` comes from ``folders.mvtec_index`` with ``val_fraction`` and ``seed`` (path, label,
    split, defect_type, mask_path; the files it skipped in ``index.parquet.skipped.tsv``); its val and test rows alone
    go to ``root/test.parquet``, what the demo scores (the val rows choose the threshold, the test rows are
    reported)."""
    rng = np.random.default_rng(seed)
    category = os.path.abspath(os.path.join(root, "discs"))
    plan = [("train", None)] * n_train + [("test", None)] * n_test_normal
    plan += [("test", DEFECTS[i % len(DEFECTS)]) for i in range(n_test_anomalous)]
    for i, (split, defect) in enumerate(plan):
        img = _disc(rng, size)
        folder = os.path.join(category, split, defect or "good")
        os.makedirs(folder, exist_ok=True)
        if defect:
            img, mask = _defect(img, defect, rng)
            os.makedirs(os.path.join(category, "ground_truth", defect), exist_ok=True)
            mask.save(os.path.join(category, "ground_truth", defect, f"{i:05d}_mask.png"))
        img.save(os.path.join(folder, f"{i:05d}.png"))
    index = os.path.join(root, "index.parquet")
    folder_index = mvtec_index(category, val_fraction, seed)
    summary = write_index(folder_index, index, eval_out=os.path.join(root, "test.parquet"))
    logger.info("demo set: %d images (%s) in %s", len(plan), ", ".join(f"{n} {s}" for s, n in
                                                                       summary["by_split"].items()), category)
    return index


DEMO_ROOT = os.path.join("runs", "demo-data")


def demo_set(spec) -> tuple[str, str]:
    """The demo set for a model (``models.ModelSpec``): the index to fit on and the scored index.

    Generated on first use under ``runs/``. The scored index's val rows (``folders.VAL_FRACTION`` of each defect type's
    test images) choose the threshold; its test rows are reported. A model with smaller ``demo_sizes`` (a slow one) gets
    its own, smaller set."""
    root = f"{DEMO_ROOT}-{spec.name}" if spec.demo_sizes else DEMO_ROOT
    index = os.path.join(root, "index.parquet")
    if not os.path.exists(index) or "val" not in pq.read_table(index, columns=["split"]).column("split").to_pylist():
        make_demo(root, seed=0, val_fraction=VAL_FRACTION, **spec.demo_sizes)  # an older set, without val: anew
    return index, os.path.join(root, "test.parquet")
