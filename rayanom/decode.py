"""The CPU decode stage: image bytes -> float images, a failure kept as its row's ``error``.

It imports no torch: decode workers stay light.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image

from rayanom.columns import ERROR_COL, HEIGHT_COL, IMAGE_COL, PATH_COL, WIDTH_COL
from rayanom.storage import ReadPolicy, error_message, read_bytes

MAX_IMAGE_PIXELS = 89_478_485  # PIL's default bomb limit (0.25 GiB of RGBA); larger images are refused from the header

# ImageNet statistics: the mean and std anomalib's default pre-processor normalises with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

def decode_image(data: bytes, image_size: tuple[int, int]) -> np.ndarray:
    """Decode to RGB float in [0, 1] and resize to ``image_size`` (h, w), shape (3, h, w), float32.

    The resize is bilinear with antialiasing on float data, as anomalib v2 (torch ``interpolate(antialias=True)``);
    PIL's float-mode resize computes the same filter (agreement within 3e-6, pinned by a test).
    """
    return decode_image_sized(data, image_size)[0]


def decode_image_sized(data: bytes, image_size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`decode_image` and the original (height, width).

    Modes: anything PIL converts to RGB (grey, palette, RGBA, CMYK, ...) as anomalib (``convert("RGB")``; alpha is
    dropped); 16-bit grey is scaled by 1/65535 (anomalib's conversion clips it to white); float images are refused.
    The first frame of an animation is used. EXIF orientation is not applied, as anomalib: pixels as stored.
    Images over ``MAX_IMAGE_PIXELS`` are refused from the header, before any pixel is decoded.
    """
    if not data:
        msg = "empty file (0 bytes)"
        raise ValueError(msg)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            msg = f"image too large: {e}"
            raise ValueError(msg) from e
        except Image.UnidentifiedImageError as e:
            msg = "not an image (no known image format in the file)"
            raise ValueError(msg) from e
    with im:
        w, h = im.size
        if w * h > MAX_IMAGE_PIXELS:
            msg = f"image too large: {w}x{h} pixels (limit {MAX_IMAGE_PIXELS})"
            raise ValueError(msg)
        try:
            planes = _planes_float(im)
        except OSError as e:
            if "truncated" in str(e) or "broken" in str(e).lower():
                msg = f"truncated or corrupt image data ({e})"
                raise ValueError(msg) from e
            raise
    out_h, out_w = image_size
    resized = [np.asarray(Image.fromarray(p, mode="F").resize((out_w, out_h), Image.BILINEAR)) for p in planes]
    return np.stack(resized * 3 if len(resized) == 1 else resized), (h, w)


def _planes_float(im: Image.Image) -> np.ndarray:
    """An image's pixels as float32 planes in [0, 1].

    Contiguous (3, h, w) RGB, or (1, h, w) for 16-bit grey (its three channels are equal, so it is resized once)."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return np.clip(np.asarray(im, dtype=np.float32) / np.float32(65535.0), 0.0, 1.0)[None]
    if im.mode == "F":
        msg = "unsupported mode F (floating-point pixels): convert to 8- or 16-bit first"
        raise ValueError(msg)
    planes = np.ascontiguousarray(np.asarray(im.convert("RGB")).transpose(2, 0, 1), dtype=np.float32)
    planes /= np.float32(255.0)
    return planes


@dataclass(frozen=True)
class Decoded:
    """A decoded batch: its rows with their decode columns, and the images of the rows that decoded.

    The input rows with ``image_height``, ``image_width`` and ``error``; the images of the rows that decoded,
    (m, 3, h, w) in row order (a failed row has no image: nothing to allocate or ship): float32 RGB in [0, 1], or
    for bf16 runs normalised bfloat16 as uint16 bits (:func:`bf16_bits`)."""

    table: pa.Table
    images: np.ndarray

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    @property
    def ok(self) -> np.ndarray:
        """Which rows decoded (no ``error``)."""
        return self.table.column(ERROR_COL).is_null().to_numpy(zero_copy_only=False)

    def column(self, name: str):
        return self.table.column(name)

    def slice(self, start: int, n: int | None = None) -> Decoded:
        ok = self.ok
        stop = len(ok) if n is None else start + n
        first = int(ok[:start].sum())
        return Decoded(self.table.slice(start, stop - start), self.images[first:first + int(ok[start:stop].sum())])

    def images_where(self, rows: np.ndarray) -> np.ndarray:
        """The images of the rows selected by the mask ``rows`` (decoded rows only)."""
        return self.images[rows[self.ok]]

    def failed(self, message: str) -> Decoded:
        """Every row failed with ``message`` (a model stage then computes nothing for them)."""
        i = self.table.schema.get_field_index(ERROR_COL)
        table = self.table.set_column(i, ERROR_COL, pa.array([message] * self.num_rows, pa.string()))
        return Decoded(table, self.images[:0])

    @staticmethod
    def concat(parts: list[Decoded]) -> Decoded:
        return Decoded(pa.concat_tables([d.table for d in parts]), np.concatenate([d.images for d in parts]))


def bf16_bits(images: np.ndarray) -> np.ndarray:
    """Images normalised as the feature stage does, rounded to bfloat16, as uint16 bits.

    Images (m, 3, h, w) float32 in [0, 1], normalised with the ImageNet mean and std as the feature stage does, then
    rounded to bfloat16 (to nearest, ties to even, as torch) as uint16 bits: half the bytes of float32, and the very
    values a bf16 run's first convolution gets (autocast rounds its input the same way)."""
    mean = np.asarray(IMAGENET_MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(IMAGENET_STD, np.float32).reshape(1, 3, 1, 1)
    bits = ((np.asarray(images, np.float32) - mean) / std).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def decode_table(table: pa.Table, image_size: tuple[int, int], policy: ReadPolicy = ReadPolicy(),
                 hook: Callable[[pa.Table], None] | None = None) -> Decoded:
    """The decode stage on an arrow table: its rows with their decode columns and images.

    Every input column unchanged, plus the original ``image_height``/``image_width`` and ``error`` (string), and the
    images of the rows that decoded.

    ``hook(table)``, where given, runs first: a fault a caller injects (tests), which may raise or end the process.
    """
    if hook is not None:
        hook(table)
    images, sizes, errors = _decode_paths(table.column(PATH_COL).to_pylist(), image_size, policy)
    return Decoded(_with_decode_columns(table, sizes, errors), images)


def failed_table(table: pa.Table, image_size: tuple[int, int], message: str) -> Decoded:
    """What ``decode_table`` gives for rows that failed with ``message``, without reading them."""
    n = table.num_rows
    return Decoded(_with_decode_columns(table, np.zeros((n, 2), np.int32), [message] * n),
                   np.zeros((0, 3, *image_size), np.float32))


def _with_decode_columns(table: pa.Table, sizes: np.ndarray, errors) -> pa.Table:
    return (table.append_column(HEIGHT_COL, pa.array(sizes[:, 0]))
            .append_column(WIDTH_COL, pa.array(sizes[:, 1]))
            .append_column(ERROR_COL, pa.array(errors, pa.string())))


def _decode_paths(paths: list, image_size: tuple[int, int], policy: ReadPolicy):
    """Read and decode every path; a failure is its row's error, never an exception.

    Returns the images that decoded (m, 3, h, w) float32, the original sizes (n, 2; 0 where a row failed) and each
    row's error (None when decoded)."""
    images, sizes = [], np.zeros((len(paths), 2), dtype=np.int32)
    errors = [None] * len(paths)
    for i, p in enumerate(paths):
        try:
            image, sizes[i] = decode_image_sized(read_bytes(p, policy), image_size)
            images.append(image)
        except Exception as e:  # noqa: BLE001 - any per-file failure is recorded in its row, the job goes on
            errors[i] = error_message(e)
    return (np.stack(images) if images else np.zeros((0, 3, *image_size), np.float32)), sizes, errors


def decode_batch(batch: dict[str, np.ndarray], image_size: tuple[int, int],
                 policy: ReadPolicy = ReadPolicy()) -> dict[str, np.ndarray]:
    """CPU stage: read and decode every row; a failure becomes that row's ``error``, never an exception.

    Returns a new dict: every input column, plus ``image`` (n, 3, h, w) float32 (zeros for failed rows),
    ``image_height``/``image_width`` (original size, 0 for failed rows) and ``error`` (None when decoded).
    """
    images, sizes, errors = _decode_paths(batch[PATH_COL], image_size, policy)
    errors = np.asarray(errors, dtype=object)
    out = dict(batch)
    out[IMAGE_COL] = np.zeros((len(errors), 3, *image_size), dtype=np.float32)
    out[IMAGE_COL][[e is None for e in errors]] = images
    out[HEIGHT_COL], out[WIDTH_COL] = sizes[:, 0], sizes[:, 1]
    out[ERROR_COL] = errors
    return out
