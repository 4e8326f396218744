"""anomalib's own pixel AUROC and AUPRO on small deterministic maps and masks, saved as the fixture that
``tests/test_pixels.py`` compares ``rayanom.pixels`` with. anomalib is not a rayanom dependency: run this with the
separate virtualenv that has it (benchmarks/README.md), and commit the file it writes.

    .venv-anomalib/bin/python benchmarks/anomalib_pixel_fixture.py   # -> tests/fixtures/anomalib_pixel_metrics.npz

The images: 12 masks of 64 x 64. Four normal (empty masks), eight with 1 to 3 defect regions of 1 to about 400
pixels: a single pixel, a one-pixel-wide line, a region on the image border, two squares that touch only at a corner
(one region under anomalib's 8-connectivity, two under 4-connectivity) and blobs from thresholded smooth noise. The
maps: smooth background noise with hot spots on some normal images, plus a bump shifted off each defect (so the
overlap grows gradually), clipped to [0, 1], the range of the normalised maps that anomalib evaluates (outside [0, 1]
torchmetrics' ROC would apply a sigmoid first). Two versions of the same maps, as integer levels:

* ``levels16``: value = float32(level) / float32(65535), nearly continuous; bins of rayanom.pixels hold several
  values, so its error bounds are at work;
* ``levels8``: value = float32(level) / float32(255), many ties; every bin holds one value, so rayanom is exact.

Saved (``np.savez_compressed``): ``masks`` (bool, packed bits), ``levels16``, ``levels8``, anomalib's
``auroc16/8``, ``aupro16/8_<limit>`` for FPR limits 0.3 and 0.05, ``auroc16_x100`` (anomalib's pixel AUROC of the
16-bit maps times 100, as raw FRE maps could be: torchmetrics' sigmoid saturates in float32 and ties most pixels,
a difference that the test pins), the number of regions found by anomalib's CPU (OpenCV) and GPU-path (kornia)
connected components, and the versions.
"""

import argparse
import os

import numpy as np

SIZE = 64
LIMITS = (0.3, 0.05)
SCALE = 100  # the 16-bit maps times this: outside [0, 1], where torchmetrics' ROC applies a sigmoid (float32)


def masks(rng: np.random.Generator) -> np.ndarray:
    from scipy import ndimage

    m = np.zeros((12, SIZE, SIZE), dtype=bool)
    m[4, 5:15, 5:15] = True  # 100-pixel square
    m[4, 40, 50:52] = True  # 2 pixels
    yy, xx = np.mgrid[:SIZE, :SIZE]
    m[5] = (yy - 32) ** 2 + (xx - 30) ** 2 <= 64  # disk, about 200 pixels
    m[6, 10:14, 10:14] = m[6, 14:18, 14:18] = True  # touching at a corner only
    m[6, 50:64, 0:6] = True  # on the border
    m[7] = ((yy - 25) / 14.0) ** 2 + ((xx - 36) / 9.0) ** 2 <= 1  # ellipse, about 400 pixels
    m[8, 8, 8] = True  # a single pixel
    m[8, 30:33, 40:43] = True
    m[8, 50, 10:22] = True  # a line
    for i in (9, 10, 11):  # blobs from thresholded smooth noise
        field = ndimage.gaussian_filter(rng.normal(size=(SIZE, SIZE)), 4)
        m[i] = field > np.quantile(field, 0.93)
    return m


def maps(m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from scipy import ndimage

    out = np.empty(m.shape)
    for i, mask in enumerate(m):
        bg = ndimage.gaussian_filter(rng.normal(size=mask.shape), 3)
        bg = 0.05 + 0.5 * (bg - bg.min()) / (bg.max() - bg.min())
        if i in (1, 3):  # hot spots on normal images
            bg[rng.integers(5, 55), rng.integers(5, 55)] += 8.0
            bg = ndimage.gaussian_filter(bg, 1.5)
        shifted = np.roll(mask, (int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), axis=(0, 1))
        bump = ndimage.gaussian_filter(shifted.astype(float), 2.0)
        out[i] = np.clip(bg + 0.6 * bump / max(bump.max(), 1e-9) * rng.uniform(0.5, 1.0), 0, 1)
    return out


def anomalib_metrics(values: np.ndarray, m: np.ndarray) -> dict:
    """anomalib's pixel AUROC and AUPRO, fed in two batches as its Evaluator would."""
    import torch
    from anomalib.data import ImageBatch
    from anomalib.metrics import AUPRO, AUROC

    metrics = {"auroc": AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_")}
    metrics.update({f"aupro_{lim}": AUPRO(fields=["anomaly_map", "gt_mask"], fpr_limit=lim) for lim in LIMITS})
    for part in (slice(0, 6), slice(6, 12)):
        amap, gt = torch.from_numpy(values[part]), torch.from_numpy(m[part])
        batch = ImageBatch(image=torch.zeros(gt.shape[0], 3, SIZE, SIZE), anomaly_map=amap, gt_mask=gt)
        for metric in metrics.values():
            metric.update(batch)
    return {name: float(metric.compute()) for name, metric in metrics.items()}


def region_counts(m: np.ndarray) -> dict:
    import torch
    from anomalib.utils.cv import connected_components_cpu, connected_components_gpu

    t = torch.from_numpy(m).float()[:, None]
    cpu = connected_components_cpu(t)
    gpu = connected_components_gpu(t)  # kornia; runs on CPU tensors too
    return {"regions_cv2": int(cpu.unique().numel() - 1), "regions_kornia": int(gpu.unique().numel() - 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures",
                                                 "anomalib_pixel_metrics.npz"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    import anomalib
    import torch
    import torchmetrics

    rng = np.random.default_rng(args.seed)
    m = masks(rng)
    raw = maps(m, rng)
    levels = {"16": np.round(raw * 65535).astype(np.uint16), "8": np.round(raw * 255).astype(np.uint8)}
    saved = {"masks": np.packbits(m, axis=-1), "mask_shape": np.array(m.shape), "limits": np.array(LIMITS)}
    for bits, lv in levels.items():
        values = lv.astype(np.float32) / np.float32(65535 if bits == "16" else 255)
        saved[f"levels{bits}"] = lv
        for name, v in anomalib_metrics(values, m).items():
            saved[name.replace("_", bits + "_", 1) if "_" in name else name + bits] = np.float64(v)
    scaled = levels["16"].astype(np.float32) / np.float32(65535) * np.float32(SCALE)  # raw-map scale: sigmoid first
    saved[f"auroc16_x{SCALE}"] = np.float64(anomalib_metrics(scaled, m)["auroc"])
    saved.update({k: np.int64(v) for k, v in region_counts(m).items()})
    saved["versions"] = np.array([f"anomalib {anomalib.__version__}", f"torch {torch.__version__}",
                                  f"torchmetrics {torchmetrics.__version__}"])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, **saved)
    print({k: (v.tolist() if v.ndim == 0 else v.shape) for k, v in saved.items()})


if __name__ == "__main__":
    main()
