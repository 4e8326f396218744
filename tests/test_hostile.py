"""Hostile inputs: every kind of broken or unusual file gets a score or a one-line reason, never a crash or a hang.

The files are generated here. ``HOSTILE`` lists each with what must happen: ``None`` = decoded and scored, a string =
a fragment of the expected error.
"""

import io
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rayanom.decode import decode_batch


def _png_bomb(path):
    """A valid PNG header declaring 60000 x 60000 pixels with a tiny body: decoding it would need ~10 GiB."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" * 1024)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def _save(path, img, **kw):
    img.save(path, **kw)


def make_hostile(root):
    """Write the hostile set under ``root``; return [(name, path or None, expected)]."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8))
    cases = []

    def add(name, expected, writer=None, filename=None):
        path = root / (filename or name)
        if writer is not None:
            writer(path)
        cases.append((name, str(path), expected))

    add("ok.png", None, lambda p: _save(p, rgb))
    add("zero_bytes.png", "empty file (0 bytes)", lambda p: p.write_bytes(b""))
    add("text.jpg", "not an image", lambda p: p.write_text("this is not a picture\n" * 20))
    add("random.png", "not an image", lambda p: p.write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()))
    jpeg = io.BytesIO()
    rgb.save(jpeg, format="JPEG")
    add("truncated.jpg", "truncated", lambda p: p.write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2]))
    png = io.BytesIO()
    rgb.save(png, format="PNG")
    add("truncated.png", "truncated", lambda p: p.write_bytes(png.getvalue()[: len(png.getvalue()) // 2]))
    add("a_directory.png", "is a directory", lambda p: p.mkdir())
    add("missing.png", "missing file")
    add("grey.png", None, lambda p: _save(p, rgb.convert("L")))
    add("grey16.png", None, lambda p: _save(p, Image.fromarray((rng.random((50, 70)) * 65535).astype(np.uint16))))
    add("palette.png", None, lambda p: _save(p, rgb.convert("P")))
    add("rgba.png", None, lambda p: _save(p, rgb.convert("RGBA")))
    add("cmyk.jpg", None, lambda p: _save(p, rgb.convert("CMYK")))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    add("exif_rotated.jpg", None, lambda p: _save(p, rgb, exif=exif))
    frames = [Image.new("RGB", (40, 30), c) for c in ("red", "green", "blue")]
    add("animated.gif", None, lambda p: frames[0].save(p, save_all=True, append_images=frames[1:], duration=50))
    add("image.webp", None, lambda p: _save(p, rgb))
    add("image.tiff", None, lambda p: _save(p, rgb))
    add("float.tiff", "unsupported mode F", lambda p: _save(p, Image.fromarray(rng.random((20, 20)).astype(np.float32))))
    add("one_pixel.png", None, lambda p: _save(p, Image.new("RGB", (1, 1), "white")))
    add("strip_4000x3.png", None, lambda p: _save(p, Image.new("RGB", (4000, 3), "gray")))
    big = Image.fromarray(np.tile(rng.integers(0, 256, (1, 4000, 3), dtype=np.uint8), (3000, 1, 1)))
    add("12_megapixel.jpg", None, lambda p: _save(p, big, quality=80))
    add("bomb_60000x60000.png", "image too large", _png_bomb)
    unicode_dir = root / "répertoire ünïcode"
    unicode_dir.mkdir()
    add("unicode path", None, lambda p: _save(p, rgb), filename="répertoire ünïcode/фото 写真.png")
    add("dotdot path", None, None, filename="répertoire ünïcode/../ok.png")
    cases.append(("empty path", "", "empty path"))
    cases.append(("null path", None, "empty path"))
    return cases


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    return make_hostile(tmp_path_factory.mktemp("hostile"))


def test_each_hostile_file_decodes_or_says_why(hostile):
    paths = np.array([p for _, p, _ in hostile], dtype=object)
    out = decode_batch({"path": paths}, (64, 64))
    for i, (name, _, expected) in enumerate(hostile):
        err = out["error"][i]
        if expected is None:
            assert err is None, (name, err)
            assert out["image"][i].shape == (3, 64, 64) and np.isfinite(out["image"][i]).all()
            assert 0 <= out["image"][i].min() and out["image"][i].max() <= 1
        else:
            assert err is not None and expected in err and "\n" not in err, (name, err)
            assert not out["image"][i].any()


def test_sixteen_bit_is_scaled_not_clipped(hostile):
    path = next(p for n, p, _ in hostile if n == "grey16.png")
    img = decode_batch({"path": np.array([path], dtype=object)}, (32, 32))["image"][0]
    assert 0.3 < img.mean() < 0.7  # anomalib's convert("RGB") clips 16-bit grey to nearly all white


def test_bomb_is_refused_without_allocating(hostile):
    import tracemalloc

    path = next(p for n, p, _ in hostile if n.startswith("bomb"))
    tracemalloc.start()
    out = decode_batch({"path": np.array([path], dtype=object)}, (64, 64))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "image too large" in out["error"][0]
    assert peak < 50 << 20


def write_hostile_index(hostile, path):
    table = pa.table({"path": pa.array([p for _, p, _ in hostile], pa.string()),
                      "name": [n for n, _, _ in hostile]})
    pq.write_table(table, path)
    return table
