"""Pixel-level metrics of DFM ``fre`` anomaly maps against ground-truth masks: pixel AUROC and AUPRO.

They come from mergeable summaries of bounded size (a worker summarises its part, the driver adds the summaries).
This module measures the maps against masks; ``maps`` draws and tabulates them per image.

    from rayanom.pixels import PixelSummary, part_pixel_summary
    summaries = [part_pixel_summary(part, config.image_size) for part in parts]  # one per part, on the workers
    s = sum(summaries, PixelSummary.empty())                                     # on the driver
    s.auroc()   # (pixel AUROC, bound on its error)
    s.aupro()   # (AUPRO at FPR 0.3, bound on its error)

Definitions (those of anomalib 2.7's ``AUROC`` on ``(anomaly_map, gt_mask)`` and ``AUPRO(fpr_limit=0.3)``):

* The pixels are all pixels of every evaluated image at the evaluation resolution; a pixel is anomalous where its mask
  is true. Normal images (label 0) without a mask get an all-false mask (as anomalib); an anomalous or unlabelled
  image without a mask is left out and counted (``no_mask``).
* Pixel AUROC: the area under the exact ROC of all pixels, ties counted half (``sklearn.metrics.roc_auc_score`` on the
  flattened pixels).
* Regions: the 8-connected components of each image's mask (anomalib: ``cv2.connectedComponents``, whose default
  connectivity is 8, on CPU; kornia's 3x3 max-pool propagation on GPU). R = the number of regions of all images.
* With ``pixel >= t`` predicted anomalous: FPR(t) = normal pixels >= t / all normal pixels, and PRO(t) = the mean
  over regions of (region pixels >= t) / region size.
* AUPRO(L): the area under the polyline through (0, 0) and (FPR(t), PRO(t)) for every value t, from FPR 0 to L with
  the curve linearly interpolated at FPR = L, divided by L (anomalib's ``compute_pro`` + ``auc(...) / fpr[-1]``).

Evaluation resolution: the model's input size, as anomalib evaluates; ``evaluation_maps`` upsamples the stored pooled
maps bilinearly (``align_corners=False``, ``rayanom.maps.upsample``) and ``read_mask`` resizes a mask with torch's
``nearest`` (what torchvision's ``Resize`` does to anomalib's ``Mask``), then ``> 0``.

Binning and its error. Every summary uses the same fixed edges, so summaries merge by addition whatever the maps'
scale: ``BINS`` = 2^16 log-spaced bins between 1e-12 and 1e12 (relative width 8.4e-4), one bin below (0, and any
negative value) and one at or above 1e12 (+inf included). Per bin: normal and anomalous pixel counts, the sum over
regions of (region pixels in the bin) / region size, and the smallest and largest value seen. Counts at a bin edge
are exact, so the curve points at the edges are exact; only what happens inside a bin is unknown, and only in a bin
holding two or more distinct values (min < max; a bin of one value, ties included, is exact):

* AUROC: a (normal, anomalous) pair in such a bin is counted 1/2 where the truth is 0, 1/2 or 1, so
  |AUROC - exact| <= sum_b n0_b n1_b / (2 N0 N1) over those bins.
* AUPRO: the exact curve is monotone, so between two edge points it stays in their box; a bin's trapezoid is off by
  at most dFPR_b dPRO_b / 2, and the segment cut at L by at most (L - FPR_a) dPRO_b (the code takes the tighter
  larger one-sided gap); the bound is their sum / L.

Both bounds are hard bounds, checked in tests/test_pixels.py against exact computations, and both are 0 where every
bin holds one value. Differences from anomalib, deliberate: the metrics are computed on the raw maps (anomalib's
are min-max normalised and clamped to [0, 1] first, so clamped pixels tie), and with no sigmoid
(torchmetrics' ROC, under anomalib's pixel AUROC, applies one to values outside [0, 1], which float32 saturates).

A summary holds five arrays of 2^16 + 2 numbers whatever the number of pixels.
"""

from __future__ import annotations

import io
import logging
import sys
from dataclasses import dataclass, fields
from functools import lru_cache

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from rayanom.columns import ERROR_COL, LABEL_COL, MAP_COL, MAP_SHAPE_COL, MASK_COL, SPLIT_COL
from rayanom.maps import upsample
from rayanom.scores import VAL_SPLIT, open_scores
from rayanom.storage import read_bytes, resolve_filesystem

logger = logging.getLogger(__name__)

BINS = 1 << 16
LOW, HIGH = 1e-12, 1e12  # first and last edge; values below LOW share bin 0, values >= HIGH the last bin
NBINS = BINS + 2
FPR_LIMIT = 0.3  # anomalib's AUPRO default
_PARTS_PER_TASK = 8  # parts summarised by one Ray task (one summary comes back per task, not one per part)
_CHUNK = 32  # images upsampled and binned at once by part_pixel_summary (bounds its temporaries)
_EIGHT = np.zeros((3, 3, 3), dtype=bool)
_EIGHT[1] = True  # 8-connectivity inside each image of an (n, H, W) stack, nothing across images


@lru_cache(maxsize=1)
def _bounds() -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) edge of each of the NBINS bins: bin b holds lower[b] <= v < upper[b]."""
    edges = np.geomspace(LOW, HIGH, BINS + 1)
    return np.concatenate(([-np.inf], edges)), np.concatenate((edges, [np.inf]))


def bin_index(values: np.ndarray) -> np.ndarray:
    """The bin of each value (flattened), exact against the edges: a log estimate, then one step of correction."""
    v = np.asarray(values, dtype=np.float64).ravel()
    lower, upper = _bounds()
    step = (np.log(HIGH) - np.log(LOW)) / BINS
    j = np.floor((np.log(np.clip(v, LOW / 2, HIGH * 2)) - np.log(LOW)) / step).astype(np.int64) + 1
    np.clip(j, 0, NBINS - 1, out=j)
    j -= v < lower[j]
    j += (v >= upper[j]) & (j < NBINS - 1)  # +inf stays in the last bin
    return j


@dataclass(eq=False)  # arrays: compare the fields, not the summaries
class PixelSummary:
    """Per-bin pixel counts of a set of images; ``a + b`` is the summary of both sets (see the module docstring)."""

    normal: np.ndarray  # (NBINS,) int64: pixels whose mask is false
    anomalous: np.ndarray  # (NBINS,) int64: pixels whose mask is true
    overlap: np.ndarray  # (NBINS,) float64: sum over regions of (region pixels in the bin) / region size
    vmin: np.ndarray  # (NBINS,) float64: smallest value in the bin (+inf where empty)
    vmax: np.ndarray  # (NBINS,) float64: largest value in the bin (-inf where empty)
    regions: int = 0  # connected regions of all masks
    images: int = 0  # images evaluated
    no_mask: int = 0  # images left out: anomalous (or unlabelled) without a mask
    mask_errors: int = 0  # images left out: the mask could not be read
    non_finite: int = 0  # images left out: a non-finite map value

    @classmethod
    def empty(cls) -> PixelSummary:
        return cls(np.zeros(NBINS, np.int64), np.zeros(NBINS, np.int64), np.zeros(NBINS),
                   np.full(NBINS, np.inf), np.full(NBINS, -np.inf))

    def __add__(self, other: PixelSummary) -> PixelSummary:
        if not isinstance(other, PixelSummary):
            return NotImplemented
        arrays = {"vmin": np.minimum(self.vmin, other.vmin), "vmax": np.maximum(self.vmax, other.vmax)}
        return PixelSummary(**{f.name: arrays.get(f.name, getattr(self, f.name) + getattr(other, f.name))
                               for f in fields(self)})

    def __radd__(self, other):
        return self if other == 0 else self.__add__(other)  # sum() starts from 0

    def _mixed(self) -> np.ndarray:
        """Bins holding two or more distinct values: the only ones where binning loses anything."""
        return self.vmin < self.vmax

    def auroc(self) -> tuple[float | None, float]:
        """Pixel AUROC (ties counted half) and the bound on its error; (None, 0) without both kinds of pixel."""
        c0, c1 = self.normal.astype(np.float64), self.anomalous.astype(np.float64)
        n0, n1 = c0.sum(), c1.sum()
        if not n0 or not n1:
            return None, 0.0
        below = np.cumsum(c0) - c0  # normal pixels in lower bins
        auc = float((c1 * (below + 0.5 * c0)).sum() / (n0 * n1))
        return auc, float((c0 * c1)[self._mixed()].sum() / (2 * n0 * n1))

    def pro_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(FPR, PRO) at every bin edge from the top, starting at (0, 0): exact points of the curve, FPR ascending."""
        fpr = np.concatenate(([0], np.cumsum(self.normal[::-1]))) / max(int(self.normal.sum()), 1)
        pro = np.concatenate(([0.0], np.cumsum(self.overlap[::-1]))) / max(self.regions, 1)
        return fpr, np.minimum(pro, 1.0)

    def aupro(self, fpr_limit: float = FPR_LIMIT) -> tuple[float | None, float]:
        """AUPRO up to ``fpr_limit`` (normalised by it) and the bound on its error.

        (None, 0) without regions or without normal pixels."""
        if not 0 < fpr_limit <= 1:
            msg = f"invalid fpr_limit={fpr_limit!r}: expected a number in (0, 1]"
            raise ValueError(msg)
        if not self.regions or not self.normal.sum():
            return None, 0.0
        fpr, pro = self.pro_curve()
        mixed = self._mixed()[::-1]  # segment k (point k to k + 1) is bin NBINS - 1 - k
        i = int(np.searchsorted(fpr, fpr_limit, side="right")) - 1  # last point at or below the limit
        d_fpr, d_pro = np.diff(fpr[: i + 1]), np.diff(pro[: i + 1])
        area = float(((pro[1: i + 1] + pro[:i]) * d_fpr).sum() / 2)
        bound = float((d_fpr * d_pro)[mixed[:i]].sum() / 2)
        if fpr[i] < fpr_limit:  # the segment crossing the limit, cut there (linear interpolation)
            width = fpr_limit - fpr[i]
            p_lim = pro[i] + (pro[i + 1] - pro[i]) * width / (fpr[i + 1] - fpr[i])
            cut = width * (pro[i] + p_lim) / 2
            area += cut
            if mixed[i]:
                bound += max(cut - width * pro[i], width * pro[i + 1] - cut)
        return float(area / fpr_limit), float(bound / fpr_limit)

    def metrics(self, fpr_limit: float = FPR_LIMIT) -> dict:
        """The numbers a report shows: both metrics with their bounds, and the pixel, region and image counts."""
        auroc, auroc_bound = self.auroc()
        aupro, aupro_bound = self.aupro(fpr_limit)
        return {"pixel_auroc": auroc, "pixel_auroc_error_bound": auroc_bound, "aupro": aupro,
                "aupro_error_bound": aupro_bound, "aupro_fpr_limit": fpr_limit,
                "normal_pixels": int(self.normal.sum()), "anomalous_pixels": int(self.anomalous.sum()),
                "regions": self.regions, "images": self.images, "left_out": {
                    "no_mask": self.no_mask, "mask_errors": self.mask_errors, "non_finite": self.non_finite}}


def pixel_summary(maps: np.ndarray, masks: np.ndarray) -> PixelSummary:
    """The summary of ``maps`` (n, H, W) against ``masks`` (n, H, W, true = anomalous) at one resolution.

    An image with a non-finite map value is left out (counted in ``non_finite``)."""
    from scipy import ndimage

    maps, masks = np.asarray(maps, dtype=np.float64), np.asarray(masks, dtype=bool)
    if maps.ndim != 3 or maps.shape != masks.shape:
        msg = f"maps {maps.shape} and masks {masks.shape}: expected two arrays of the same shape (n, H, W)"
        raise ValueError(msg)
    finite = np.isfinite(maps).all(axis=(1, 2))
    maps, masks = maps[finite], masks[finite]
    out = PixelSummary.empty()
    out.images, out.non_finite = int(finite.sum()), int((~finite).sum())
    if not maps.size:
        return out
    values, flat_mask = maps.ravel(), masks.ravel()
    idx = bin_index(values)
    out.normal += np.bincount(idx[~flat_mask], minlength=NBINS)
    out.anomalous += np.bincount(idx[flat_mask], minlength=NBINS)
    labels, out.regions = ndimage.label(masks, structure=_EIGHT)
    labels = labels.ravel()[flat_mask]
    size = np.bincount(labels)
    out.overlap += np.bincount(idx[flat_mask], weights=1.0 / size[labels], minlength=NBINS)
    np.minimum.at(out.vmin, idx, values)
    np.maximum.at(out.vmax, idx, values)
    return out


def evaluation_maps(rows: list[dict], size: tuple[int, int]) -> np.ndarray:
    """The maps of scored DFM ``fre`` rows at ``size`` (the model's input size), (n, H, W) float32.

    Upsampling is bilinear, ``align_corners=False`` (``rayanom.maps.upsample``), the rows of one pooled shape in one
    call."""
    height, width = (int(s) for s in size)
    out = np.empty((len(rows), height, width), dtype=np.float32)
    shapes = [tuple(int(d) for d in r[MAP_SHAPE_COL]) for r in rows]
    for shape in set(shapes):
        pick = [i for i, s in enumerate(shapes) if s == shape]
        out[pick] = upsample(np.stack([np.asarray(rows[i][MAP_COL], dtype=np.float32).reshape(shape) for i in pick]),
                             (height, width))
    return out


def read_mask(path: str, size: tuple[int, int]) -> np.ndarray:
    """A mask file (local path or URI) as an (H, W) boolean array at ``size``.

    It is read as anomalib reads it (``convert("L")``, ``> 0``) and resized with torch's ``nearest``, as torchvision's
    ``Resize`` does to a ``Mask``."""
    import torch
    import torch.nn.functional as F

    with Image.open(io.BytesIO(read_bytes(path))) as im:
        mask = np.asarray(im.convert("L")) > 0
    t = torch.from_numpy(mask.astype(np.uint8))[None, None]
    return F.interpolate(t, size=tuple(int(s) for s in size), mode="nearest")[0, 0].numpy() > 0


def _column(table, name: str, default=None) -> list:
    return table.column(name).to_pylist() if name in table.column_names else [default] * table.num_rows


def part_pixel_summary(table, size: tuple[int, int], chunk: int = _CHUNK) -> PixelSummary:
    """The summary of one scored part: its scored rows outside ``split == "val"``, maps at ``size`` against their masks.

    The part is a pyarrow table with ``anomaly_map``, ``anomaly_map_shape``, and where the index has them ``label``,
    ``mask_path``, ``split``, ``error``. Left out and counted: anomalous or unlabelled rows without a mask
    (``no_mask``), masks that cannot be read (``mask_errors``, logged). Memory: ``chunk`` images at a time."""
    if MAP_COL not in table.column_names:
        msg = (f"pixel metrics need the {MAP_COL!r} column (DFM with score_type 'fre'); "
               f"the part has {table.column_names}")
        raise ValueError(msg)
    errors, splits = _column(table, ERROR_COL), _column(table, SPLIT_COL)
    labels, mask_paths = _column(table, LABEL_COL), _column(table, MASK_COL)
    has_map = table.column(MAP_COL).is_valid().to_numpy(zero_copy_only=False)
    keep = [i for i, (e, s) in enumerate(zip(errors, splits)) if e is None and s != VAL_SPLIT and has_map[i]]
    out = PixelSummary.empty()
    for start in range(0, len(keep), chunk):
        rows = table.take(keep[start: start + chunk]).select([MAP_COL, MAP_SHAPE_COL]).to_pylist()
        masks, use = _chunk_masks(keep[start: start + chunk], labels, mask_paths, size, out)
        if use:
            out = out + pixel_summary(evaluation_maps([rows[j] for j in use], size), masks)
    logger.debug("pixel summary of a part: %d images, %d regions, %d left out without a mask", out.images,
                 out.regions, out.no_mask)
    return out


def _chunk_masks(rows: list[int], labels: list, mask_paths: list, size: tuple[int, int],
                 counts: PixelSummary) -> tuple[np.ndarray, list[int]]:
    """The masks of ``rows`` at ``size`` and the positions (in ``rows``) of those evaluated; counts the others."""
    masks, use = [], []
    for j, i in enumerate(rows):
        if mask_paths[i] is None:
            if labels[i] != 0:
                counts.no_mask += 1
                continue
            masks.append(np.zeros(tuple(int(s) for s in size), dtype=bool))
        else:
            try:
                masks.append(read_mask(mask_paths[i], size))
            except Exception as e:  # noqa: BLE001 - one unreadable mask must not stop the part
                logger.warning("mask %s left out of the pixel metrics: %s", mask_paths[i], e)
                counts.mask_errors += 1
                continue
        use.append(j)
    return (np.stack(masks) if masks else np.zeros((0, *size), dtype=bool)), use


def pixel_metrics(scores_uri: str, size: tuple[int, int], fpr_limit: float = FPR_LIMIT) -> dict | None:
    """Pixel AUROC and AUPRO of a scores dataset (``PixelSummary.metrics``, with ``evaluation_size``), or None.

    None when it has no anomaly maps (not DFM ``fre``) or its index had no ``mask_path`` column. The parts are
    summarised where they lie: by Ray tasks, ``_PARTS_PER_TASK`` parts each, when Ray is running (the jobs), else in
    this process; the driver adds the summaries as they come back, holding one running sum and a bounded number in
    flight."""
    dataset = open_scores(scores_uri)
    if MAP_COL not in dataset.schema.names or MASK_COL not in dataset.schema.names:
        return None
    names = sorted(f.path.rsplit("/", 1)[-1] for f in dataset.get_fragments())
    groups = [names[i:i + _PARTS_PER_TASK] for i in range(0, len(names), _PARTS_PER_TASK)]
    size = tuple(int(s) for s in size)
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        task = ray.remote(num_cpus=1)(_summarize_parts)
        pending, total, todo = [], PixelSummary.empty(), list(groups)
        while todo or pending:
            while todo and len(pending) < 8:
                pending.append(task.remote(scores_uri, todo.pop(0), size))
            done, pending = ray.wait(pending, num_returns=1)
            total = total + ray.get(done[0])
    else:
        total = sum((_summarize_parts(scores_uri, g, size) for g in groups), PixelSummary.empty())
    return {**total.metrics(fpr_limit), "evaluation_size": list(size)}


def _summarize_parts(scores_uri: str, names: list[str], size: tuple[int, int]) -> PixelSummary:
    """The summary of the parts ``names`` of the scores at ``scores_uri`` (read with the columns it needs)."""
    fs, path = resolve_filesystem(scores_uri)
    out = PixelSummary.empty()
    for name in names:
        with fs.open_input_file(f"{path.rstrip('/')}/{name}") as f:
            schema = pq.read_schema(f)
            cols = [c for c in (MAP_COL, MAP_SHAPE_COL, LABEL_COL, MASK_COL, SPLIT_COL, ERROR_COL) if c in schema.names]
            table = pq.read_table(f, columns=cols)
        out = out + part_pixel_summary(table, size)
    return out
