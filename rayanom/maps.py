"""Pictures and tables derived from the scores: DFM anomaly maps and heat-map overlays, RKDE boxes and regions.

The anomaly maps go from the pooled map stored with each scored row to network-input or original resolution; RKDE gets
box overlays and one-row-per-region tables. This module draws and tabulates per image; ``pixels`` measures the same maps
against ground-truth masks (pixel AUROC, AUPRO).

    import pyarrow.parquet as pq
    from rayanom.maps import anomaly_map
    row = pq.read_table("runs/r1/scores").sort_by([("anomaly_score", "descending")]).slice(0, 1).to_pylist()[0]
    anomaly_map(row)                                          # pooled, e.g. (4, 4) at the defaults
    anomaly_map(row, (256, 256))                              # network input, as anomalib's anomaly_map
    anomaly_map(row, (row["image_height"], row["image_width"]))  # original image pixels

Upsampling is bilinear with ``align_corners=False``, as anomalib's DFM upsamples its map. The map at any resolution is
the per-location squared reconstruction residual summed over channels; its pooled sum equals the row's FRE score.
"""

from __future__ import annotations

import io
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from rayanom.columns import MAP_COL, MAP_SHAPE_COL, PATH_COL, SCORE_COL
from rayanom.scores import open_scores
from rayanom.storage import read_bytes, resolve_filesystem

logger = logging.getLogger(__name__)


def anomaly_map(row: dict, size: tuple[int, int] | None = None) -> np.ndarray:
    """The map of one scored row, (h, w) float32: pooled when ``size`` is None, else bilinearly resized to it."""
    if row.get(MAP_COL) is None:
        msg = "this row has no anomaly map (not a DFM-FRE score, or the row failed)"
        raise ValueError(msg)
    pooled = np.asarray(row[MAP_COL], dtype=np.float32).reshape(row[MAP_SHAPE_COL])
    return pooled if size is None else upsample(pooled, size)


def upsample(pooled: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear (align_corners=False) resize of an (h, w) map, or a stack (n, h, w) of maps, to ``size``; float32.

    ``size`` is (height, width); a stack is resized in one call."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(pooled, dtype=np.float32))
    stack = t.reshape(-1, 1, *t.shape[-2:])
    out = F.interpolate(stack, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)
    return out.reshape(*t.shape[:-2], *out.shape[-2:]).numpy()


def _jet(v: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB uint8 (a jet-like colour map: blue, cyan, yellow, red)."""
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)


def overlay(image_bytes: bytes, pooled: np.ndarray, vmax: float, alpha: float = 0.45):
    """The original image with its upsampled map blended on top (a PIL image)."""
    with Image.open(io.BytesIO(image_bytes)) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
    heat = upsample(pooled, rgb.shape[:2]) / max(vmax, np.finfo(np.float32).tiny)
    blended = (1 - alpha) * rgb + alpha * _jet(np.clip(heat, 0, 1)).astype(np.float32)
    return Image.fromarray(blended.clip(0, 255).astype(np.uint8))


def write_heatmaps(scores: str, out_dir: str, top_n: int) -> list[str]:
    """Overlay PNGs for the ``top_n`` highest-scoring rows of a DFM-FRE scores dataset; returns the files written.

    One colour scale for all (the largest map value among them), so the pictures compare with each other.
    """
    top = _top_rows(scores, ["row_index", PATH_COL, SCORE_COL, MAP_COL, MAP_SHAPE_COL], top_n, MAP_COL)
    if not top:
        return []
    vmax = max(float(np.max(r[MAP_COL])) for r in top)
    out_fs, out_path = resolve_filesystem(out_dir)
    out_fs.create_dir(out_path, recursive=True)
    written = []
    for rank, row in enumerate(top, 1):
        try:
            picture = overlay(read_bytes(row[PATH_COL]), anomaly_map(row), vmax)
        except Exception as e:  # noqa: BLE001 - a file that vanished since scoring must not stop the others
            logger.warning("heat map for row %d skipped: %s", row["row_index"], e)
            continue
        written.append(_save_png(picture, out_dir, rank, row))
    logger.info("%d heat maps written to %s", len(written), out_dir)
    return written


def _save_png(picture, out_dir: str, rank: int, row: dict) -> str:
    """Write ``picture`` as ``<rank>_row<row_index>_<image name>.png`` into ``out_dir``; return its path."""
    fs, path = resolve_filesystem(out_dir)
    name = f"{rank:04d}_row{row['row_index']}_{os.path.splitext(os.path.basename(row[PATH_COL]))[0]}.png"
    with fs.open_output_stream(f"{path}/{name}") as f:
        picture.save(f, format="PNG")
    return f"{out_dir.rstrip('/')}/{name}"


def _top_rows(scores: str, columns: list[str], top_n: int, valid_col: str) -> list[dict]:
    table = open_scores(scores).to_table(columns=columns)
    table = table.filter(pc.is_valid(table.column(valid_col)))
    return table.sort_by([(SCORE_COL, "descending"), ("row_index", "ascending")]).slice(0, top_n).to_pylist()


def write_box_overlays(scores: str, out_dir: str, top_n: int) -> list[str]:
    """RKDE: draw the ``top_n`` highest-scoring images with their boxes; return the files written.

    Boxes are coloured by box probability (blue = low, red = high, one scale for all pictures) and labelled with it."""
    top = _top_rows(scores, ["row_index", PATH_COL, SCORE_COL, "boxes", "box_scores"], top_n, "boxes")
    out_fs, out_path = resolve_filesystem(out_dir)
    out_fs.create_dir(out_path, recursive=True)
    written = []
    for rank, row in enumerate(top, 1):
        try:
            with Image.open(io.BytesIO(read_bytes(row[PATH_COL]))) as im:
                picture = im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - a file that vanished since scoring must not stop the others
            logger.warning("box overlay for row %d skipped: %s", row["row_index"], e)
            continue
        draw = ImageDraw.Draw(picture)
        width = max(2, round(max(picture.size) / 250))
        for box, p in zip(row["boxes"], row["box_scores"]):
            colour = tuple(int(c) for c in _jet(np.array([p]))[0])
            draw.rectangle([float(v) for v in box], outline=colour, width=width)
            draw.text((float(box[0]) + width, float(box[1]) + width), f"{p:.3f}", fill=colour)
        written.append(_save_png(picture, out_dir, rank, row))
    logger.info("%d box overlays written to %s", len(written), out_dir)
    return written


def write_region_rows(scores: str, out_dir: str) -> int:
    """RKDE: write one row per region into ``out_dir``; return the number of regions.

    A row holds row_index, path, region, box in original pixels and box_score; the rows are written part by part from
    the scores dataset, in bounded memory."""
    out_fs, out_path = resolve_filesystem(out_dir)
    out_fs.create_dir(out_path, recursive=True)
    total = 0
    for fragment in open_scores(scores).get_fragments():
        part = fragment.to_table(columns=["row_index", PATH_COL, "boxes", "box_scores"])
        counts = pa.compute.fill_null(pa.compute.list_value_length(part.column("boxes")), 0).to_numpy()
        rows = np.repeat(np.arange(part.num_rows), counts)
        regions = pa.table({
            "row_index": part.column("row_index").take(pa.array(rows)),
            PATH_COL: part.column(PATH_COL).take(pa.array(rows)),
            "region": pa.array(np.concatenate([np.arange(c) for c in counts]) if len(counts) else [], pa.int32()),
            "box": pa.compute.list_flatten(part.column("boxes")),
            "box_score": pa.compute.list_flatten(part.column("box_scores")),
        })
        with out_fs.open_output_stream(f"{out_path}/{os.path.basename(fragment.path)}") as f:
            pq.write_table(regions, f)
        total += regions.num_rows
    logger.info("%d region rows written to %s", total, out_dir)
    return total
