"""The CPU decode stage: pre-processing parity with torch's antialiased resize, errors kept per row."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rayanom.decode import decode_batch, decode_image


def _png(path, h, w, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return str(path)


@pytest.mark.parametrize("h,w", [(300, 200), (64, 64), (1000, 37)])
def test_decode_matches_torch_antialiased_resize(tmp_path, h, w):
    path = _png(tmp_path / "a.png", h, w)
    ours = decode_image(open(path, "rb").read(), (64, 80))
    x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
    ref = F.interpolate(x[None], size=(64, 80), mode="bilinear", align_corners=False, antialias=True)[0].numpy()
    assert ours.shape == (3, 64, 80) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-5)  # float32 rounding: 2e-7 downscaling, 2e-6 upscaling


def test_grayscale_becomes_three_equal_channels(tmp_path):
    path = _png(tmp_path / "g.png", 50, 50, mode="L")
    img = decode_image(open(path, "rb").read(), (32, 32))
    assert np.array_equal(img[0], img[1]) and np.array_equal(img[1], img[2])


def test_decode_batch_records_errors_per_row(tmp_path):
    good = _png(tmp_path / "ok.png", 40, 40)
    text = tmp_path / "text.png"
    text.write_text("not an image")
    (tmp_path / "dir.png").mkdir()
    paths = np.array([good, str(tmp_path / "missing.png"), str(text), str(tmp_path / "dir.png"), "", None],
                     dtype=object)
    out = decode_batch({"path": paths, "row_index": np.arange(6)}, (32, 32))
    assert out["error"][0] is None and out["image"][0].any()
    assert "missing" in out["error"][1]
    assert out["error"][2] == "ValueError: not an image (no known image format in the file)"
    assert "directory" in out["error"][3]
    assert out["error"][4] == out["error"][5] == "ValueError: empty path"
    assert all("\n" not in e for e in out["error"][1:])
    assert np.array_equal(out["row_index"], np.arange(6))


def test_decode_stage_does_not_import_torch():
    # Ray workers import the module of the function they run: a decode worker that imported torch paid ~1.5 s of
    # CPU while the feature actor was starting on the same cores (fit.py --score 37 -> 29 s when it stopped).
    import subprocess
    import sys

    # The decode workers import the stage's function (plane) and the unit helpers they are given (stages).
    code = ("import sys, rayanom.decode, rayanom.plane, rayanom.stages; assert callable(rayanom.plane.decode_units); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
