"""Pixel AUROC and AUPRO (rayanom.pixels) against scikit-learn, a direct exact computation, anomalib 2.7's own metric
classes (a committed fixture, benchmarks/anomalib_pixel_fixture.py) and their stated error bounds; mask reading,
map upsampling and the per-part summary."""

import os

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from rayanom.maps import upsample
from rayanom.pixels import (BINS, NBINS, PixelSummary, bin_index, evaluation_maps, part_pixel_summary, pixel_summary,
                            read_mask)

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "anomalib_pixel_metrics.npz")
FLOAT_TOL = 1e-6  # anomalib computes in float32


def random_set(seed: int, n: int = 8, size: int = 32, scale: float = 1.0):
    """Smooth positive maps (FRE-like, any scale) and blob masks; the first two images normal."""
    rng = np.random.default_rng(seed)
    masks = np.stack([ndimage.gaussian_filter(rng.normal(size=(size, size)), 2) > 0.35 for _ in range(n)])
    masks[:2] = False
    maps = np.exp(np.stack([ndimage.gaussian_filter(rng.normal(size=(size, size)), 1.5) for _ in range(n)]) * 3)
    maps = scale * maps * np.where(masks, rng.uniform(1.0, 4.0), 1.0)
    return maps, masks


def exact_aupro(maps: np.ndarray, masks: np.ndarray, limit: float) -> float:
    """AUPRO from its definition, every distinct value a threshold; regions labelled image by image."""
    normal = np.sort(maps[~masks])
    regions = []
    for m, v in zip(masks, maps):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [np.sort(v[lab == k]) for k in range(1, n + 1)]
    t = np.unique(maps)[::-1]  # thresholds, descending
    fpr = np.concatenate([[0.0], (normal.size - np.searchsorted(normal, t, side="left")) / normal.size])
    pro = np.concatenate([[0.0], np.mean([(r.size - np.searchsorted(r, t, side="left")) / r.size for r in regions],
                                         axis=0)])
    keep = fpr <= limit
    x, y = list(fpr[keep]), list(pro[keep])
    j = int(keep.sum())
    if x[-1] < limit:
        x.append(limit)
        y.append(pro[j - 1] + (pro[j] - pro[j - 1]) * (limit - fpr[j - 1]) / (fpr[j] - fpr[j - 1]))
    return float(np.sum((np.array(y[1:]) + np.array(y[:-1])) * np.diff(x)) / 2 / limit)


def test_bins_are_exact_at_the_edges():
    lower = np.concatenate([[0.0], np.geomspace(1e-12, 1e12, BINS + 1)])
    v = np.concatenate([lower, np.nextafter(lower, -np.inf), [-1.0, np.inf, 3e-13, 7e14]])
    j = bin_index(v)
    assert j.min() >= 0 and j.max() == NBINS - 1
    assert np.array_equal(j[: BINS + 2], np.arange(BINS + 2))  # an edge opens its bin
    assert np.array_equal(j[BINS + 3: 2 * BINS + 4], np.arange(BINS + 1))  # just below an edge: the bin before
    assert j[-4:].tolist() == [0, NBINS - 1, 0, NBINS - 1]


@pytest.mark.parametrize("seed,scale", [(0, 1.0), (1, 1e-6), (2, 3e4)])
def test_pixel_auroc_matches_sklearn_within_the_bound_and_merges(seed, scale):
    maps, masks = random_set(seed, scale=scale)
    whole = pixel_summary(maps, masks)
    auc, bound = whole.auroc()
    exact = roc_auc_score(masks.ravel(), maps.ravel())
    assert abs(auc - exact) <= bound + 1e-12
    assert 0 < bound < 2e-3
    merged = sum(pixel_summary(maps[i: i + 3], masks[i: i + 3]) for i in range(0, len(maps), 3))
    for name in ("normal", "anomalous", "vmin", "vmax"):
        assert np.array_equal(getattr(merged, name), getattr(whole, name)), name
    np.testing.assert_allclose(merged.overlap, whole.overlap, rtol=1e-12, atol=1e-15)
    assert (merged.regions, merged.images) == (whole.regions, whole.images) == (whole.regions, len(maps))
    assert merged.auroc()[0] == pytest.approx(auc, abs=1e-12)
    assert merged.aupro()[0] == pytest.approx(whole.aupro()[0], abs=1e-12)


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_matches_the_definition_within_the_bound(seed, limit):
    maps, masks = random_set(seed)
    value, bound = pixel_summary(maps, masks).aupro(limit)
    assert abs(value - exact_aupro(maps, masks, limit)) <= bound + 1e-12
    assert 0 < bound < 3e-3


def test_bounds_hold_when_the_bins_are_coarse():
    """All values inside a few bins: large errors, and the bounds still cover them."""
    maps, masks = random_set(5)
    maps = 1.0 + 1e-3 * maps / maps.max()
    s = pixel_summary(maps, masks)
    auc, auc_bound = s.auroc()
    aupro, aupro_bound = s.aupro()
    auc_err = abs(auc - roc_auc_score(masks.ravel(), maps.ravel()))
    aupro_err = abs(aupro - exact_aupro(maps, masks, 0.3))
    assert auc_err > 1e-3 and aupro_err > 1e-3  # binning loses something here...
    assert auc_err <= auc_bound and aupro_err <= aupro_bound  # ...and the bounds say how much at most


def test_ties_are_exact():
    """Values with ties, each bin one value: the bounds are 0 and the results exact."""
    maps, masks = random_set(6)
    maps = np.round(maps / maps.max() * 50) / 50
    s = pixel_summary(maps, masks)
    assert s.auroc() == (pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12), 0.0)
    assert s.aupro() == (pytest.approx(exact_aupro(maps, masks, 0.3), abs=1e-12), 0.0)


def test_regions_are_8_connected_per_image():
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 1:3, 1:3] = masks[0, 3:5, 3:5] = True  # touching at a corner: one region (anomalib, 8-connectivity)
    masks[0, 7, 7] = masks[1, 0, 0] = True  # same place in the stack, other image: two regions
    s = pixel_summary(np.ones((2, 8, 8)), masks)
    assert s.regions == 3
    assert s.overlap.sum() == pytest.approx(3.0)


def load_fixture():
    f = np.load(FIXTURE)
    masks = np.unpackbits(f["masks"], axis=-1)[..., : int(f["mask_shape"][-1])].astype(bool)
    return f, masks


@pytest.mark.parametrize("bits,levels", [("16", 65535), ("8", 255)])
def test_matches_anomalib(bits, levels):
    """anomalib 2.7.0's AUROC / AUPRO classes, run by benchmarks/anomalib_pixel_fixture.py."""
    f, masks = load_fixture()
    assert str(f["versions"][0]) == "anomalib 2.7.0"
    maps = f[f"levels{bits}"].astype(np.float32) / np.float32(levels)
    s = pixel_summary(maps, masks)
    assert s.regions == int(f["regions_cv2"]) == int(f["regions_kornia"])
    auc, bound = s.auroc()
    assert abs(auc - float(f[f"auroc{bits}"])) <= bound + FLOAT_TOL
    for limit in f["limits"]:
        value, bound = s.aupro(float(limit))
        assert abs(value - float(f[f"aupro{bits}_{limit}"])) <= bound + FLOAT_TOL, limit
        if bits == "8":
            assert bound == 0.0  # every bin holds one value: exact, up to anomalib's float32


def test_raw_scale_differs_from_anomalib_auroc_on_purpose():
    """Pinned difference: on maps outside [0, 1] (raw FRE) torchmetrics' ROC under anomalib's pixel AUROC applies a
    float32 sigmoid that ties most pixels; rayanom's AUROC depends on the order of the values only."""
    f, masks = load_fixture()
    maps = f["levels16"].astype(np.float32) / np.float32(65535)
    scaled = maps * np.float32(100)
    auc, bound = pixel_summary(scaled, masks).auroc()
    assert abs(auc - roc_auc_score(masks.ravel(), scaled.ravel())) <= bound
    assert abs(auc - float(f["auroc16"])) <= bound + FLOAT_TOL  # the same as anomalib's at the [0, 1] scale
    assert float(f["auroc16"]) - float(f["auroc16_x100"]) > 0.3  # anomalib's own drops on the raw scale


def write_mask(path, array, mode="L"):
    Image.fromarray(array).convert(mode).save(path)
    return str(path)


def test_read_mask_is_nearest_and_thresholded(tmp_path):
    rng = np.random.default_rng(0)
    raw = np.where(rng.random((10, 7)) < 0.4, rng.choice([1, 128, 255], size=(10, 7)), 0).astype(np.uint8)
    for name, mode in (("m.png", "L"), ("rgb.png", "RGB")):
        path = write_mask(tmp_path / name, raw, mode)
        for size in ((10, 7), (20, 14), (25, 9), (4, 3)):
            rows = np.floor(np.arange(size[0]) * 10 / size[0]).astype(int)
            cols = np.floor(np.arange(size[1]) * 7 / size[1]).astype(int)
            got = read_mask(path, size)
            assert got.dtype == bool and got.shape == size
            assert np.array_equal(got, (raw > 0)[rows][:, cols]), (name, size)
    assert np.array_equal(read_mask("file://" + path, (20, 14)), read_mask(path, (20, 14)))


def test_evaluation_maps_equal_upsample():
    rng = np.random.default_rng(1)
    shapes = [(4, 4), (4, 4), (3, 5), (4, 4)]
    rows = [{"anomaly_map": rng.random(h * w).astype(np.float32).tolist(), "anomaly_map_shape": [h, w]}
            for h, w in shapes]
    got = evaluation_maps(rows, (37, 29))
    assert got.shape == (4, 37, 29) and got.dtype == np.float32
    for row, g in zip(rows, got):
        expect = upsample(np.asarray(row["anomaly_map"], np.float32).reshape(row["anomaly_map_shape"]), (37, 29))
        assert np.array_equal(g, expect)


def test_part_pixel_summary(tmp_path):
    rng = np.random.default_rng(2)
    mask = np.zeros((12, 12), dtype=np.uint8)
    mask[2:6, 3:8] = 255
    mask[9:11, 9:11] = 255
    mask_path = write_mask(tmp_path / "mask.png", mask)
    pooled = [rng.random(16).astype(np.float32) * 5 for _ in range(8)]
    rows = [  # (label, split, mask_path, error): what becomes of each row
        (0, "test", None, None),  # normal, empty mask: in
        (1, "test", mask_path, None),  # in, two regions
        (1, "test", None, None),  # anomalous without a mask: counted in no_mask
        (1, "test", mask_path, "FileNotFoundError: missing file x"),  # failed: out
        (1, "val", mask_path, None),  # validation: out
        (1, "test", str(tmp_path / "missing.png"), None),  # unreadable mask: counted in mask_errors
        (0, None, None, None),  # normal, no split: in
        (None, "test", mask_path, None),  # unlabelled with a mask: in
    ]
    failed = [r[3] is not None for r in rows]
    table = pa.table({
        "anomaly_map": pa.array([None if f else p.tolist() for p, f in zip(pooled, failed)], pa.list_(pa.float32())),
        "anomaly_map_shape": pa.array([None if f else [4, 4] for f in failed], pa.list_(pa.int32())),
        "label": pa.array([r[0] for r in rows], pa.int64()), "split": pa.array([r[1] for r in rows], pa.string()),
        "mask_path": pa.array([r[2] for r in rows], pa.string()), "error": pa.array([r[3] for r in rows], pa.string()),
    })
    size = (24, 24)
    got = part_pixel_summary(table, size)
    used = [0, 1, 6, 7]
    maps = np.stack([upsample(pooled[i].reshape(4, 4), size) for i in used])
    empty, defect = np.zeros(size, bool), read_mask(mask_path, size)
    masks = np.stack([empty, defect, empty, defect])
    expect = pixel_summary(maps, masks)
    assert (got.images, got.regions, got.no_mask, got.mask_errors, got.non_finite) == (4, 4, 1, 1, 0)
    for name in ("normal", "anomalous", "overlap", "vmin", "vmax"):
        assert np.array_equal(getattr(got, name), getattr(expect, name)), name
    chunked = part_pixel_summary(table, size, chunk=2)
    assert np.array_equal(chunked.overlap, got.overlap) and chunked.no_mask == 1 and chunked.images == 4
    m = got.metrics()
    assert m["left_out"] == {"no_mask": 1, "mask_errors": 1, "non_finite": 0}
    assert m["pixel_auroc"] == got.auroc()[0] and m["aupro"] == got.aupro()[0] and m["regions"] == 4


def test_edge_cases():
    empty = PixelSummary.empty()
    assert empty.auroc() == (None, 0.0) and empty.aupro() == (None, 0.0)
    normal_only = pixel_summary(np.ones((2, 4, 4)), np.zeros((2, 4, 4), bool))
    assert normal_only.auroc() == (None, 0.0) and normal_only.aupro() == (None, 0.0)
    maps = np.ones((2, 4, 4))
    maps[1, 0, 0] = np.nan
    s = pixel_summary(maps, np.eye(4, dtype=bool)[None].repeat(2, 0))
    assert (s.images, s.non_finite, s.regions) == (1, 1, 1)
    with pytest.raises(ValueError, match="same shape"):
        pixel_summary(np.ones((2, 4, 4)), np.ones((2, 4, 5), bool))
    with pytest.raises(ValueError, match="fpr_limit"):
        s.aupro(0.0)
    with pytest.raises(ValueError, match="anomaly_map"):
        part_pixel_summary(pa.table({"anomaly_score": [1.0]}), (8, 8))
