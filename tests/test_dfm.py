"""DFM: head formulas against references (anomalib's FRE, scikit-learn's component count, scipy's Gaussian),
features against a direct timm computation, maps and their upsampling."""

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from scipy.stats import multivariate_normal
from sklearn.decomposition import PCA as SkPCA

from rayanom.config import DfmConfig, UserError
from rayanom.features import FeatureExtractor, resolve_weights
from rayanom.heads import DEVICE_RTOL, DfmHead
from rayanom.maps import anomaly_map, upsample


def _features(n, d, seed=0, mean=5.0):
    rng = np.random.default_rng(seed)
    scales = np.geomspace(4.0, 0.05, d)
    return (rng.normal(size=(n, d)) * scales + mean).astype(np.float32)


def _anomalib_fre(train, query, k):
    """anomalib's PCA.fit (float64 thin SVD, float32 V_k and mean) then DFM FRE in float32."""
    x = torch.from_numpy(train.copy())
    mean = x.mean(dim=0)
    x -= mean
    _, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
    v = vh.transpose(-2, -1)[:, :k].float()
    q = torch.from_numpy(query.copy())
    q -= mean
    z = q @ v
    rec = z @ v.transpose(-2, -1)
    return torch.sum((q - rec) ** 2, dim=1).numpy()


@pytest.mark.parametrize("n,d", [(60, 200), (300, 50)])
def test_fre_equals_anomalib_formula(n, d):
    train, query = _features(n, d), _features(25, d, seed=1) * 1.2
    head = DfmHead(10, "fre").fit(train)
    np.testing.assert_allclose(head.anomaly_scores(query), _anomalib_fre(train, query, 10), rtol=1e-5)


def test_fre_is_the_textbook_reconstruction_error():
    train, query = _features(80, 120), _features(10, 120, seed=2)
    head = DfmHead(0.9, "fre").fit(train)
    mu = train.astype(np.float64).mean(0)
    _, _, vt = np.linalg.svd(train - mu, full_matrices=False)
    v = vt[: head.pca_.components_.shape[0]].T
    xc = query - mu
    np.testing.assert_allclose(head.anomaly_scores(query, exact=True), ((xc - xc @ v @ v.T) ** 2).sum(1), rtol=1e-9)
    np.testing.assert_allclose(head.residuals(query).sum(1), head.anomaly_scores(query, exact=True), rtol=1e-12)


@pytest.mark.parametrize("level", [0.5, 0.9, 0.97, 0.999])
def test_component_count_follows_sklearn(level):
    train = _features(150, 60, seed=3)
    head = DfmHead(level, "fre").fit(train)
    assert head.pca_.components_.shape[0] == SkPCA(level, svd_solver="full").fit(train.astype(np.float64)).n_components_


def test_nll_equals_scipy_gaussian_in_pca_space():
    train, query = _features(200, 30, seed=4), _features(15, 30, seed=5)
    head = DfmHead(8, "nll").fit(train)
    x = train.astype(np.float64)
    mu = x.mean(0)
    _, s, vt = np.linalg.svd(x - mu, full_matrices=False)
    z = (query - mu) @ vt[:8].T
    cov = np.diag(s[:8] ** 2 / len(x))  # anomalib's Gaussian: biased covariance
    ref = -2 * multivariate_normal(np.zeros(8), cov).logpdf(z) - 8 * np.log(2 * np.pi)
    np.testing.assert_allclose(head.anomaly_scores(query, exact=True), ref, rtol=1e-9)


def test_nll_is_centred_on_the_training_mean():
    # anomalib's double centring (it subtracts the training mean twice) measures from the origin of the uncentred
    # projection: with a training mean of 5 everywhere, the origin looked most normal there. Here the training mean
    # is the most normal point.
    train = _features(300, 20, seed=6, mean=5.0)
    head = DfmHead(6, "nll").fit(train)
    at_mean = head.anomaly_scores(train.mean(0, keepdims=True))[0]
    at_origin = head.anomaly_scores(np.zeros((1, 20), np.float32))[0]
    typical = np.median(head.anomaly_scores(train))
    assert at_mean < typical < at_origin


@pytest.mark.parametrize("score_type", ["fre", "nll"])
def test_float32_scores_and_maps_within_device_rtol_of_float64(score_type):
    """The default float32 head against float64 (``exact``) and against numpy: scores within DEVICE_RTOL relative
    for queries among the training data and beyond it; the maps are the channel sums of numpy's residuals."""
    c, h, w = 16, 4, 4
    train, query = _features(400, c * h * w, seed=11), _features(60, c * h * w, seed=12) * 1.5
    head = DfmHead(0.97, score_type).fit(train)
    for q in (train[:60], query):
        fast, maps = head.score_with_maps(q, map_shape=(c, h, w))
        exact, exact_maps = head.score_with_maps(q, exact=True, map_shape=(c, h, w))
        np.testing.assert_allclose(fast, exact, rtol=DEVICE_RTOL, atol=DEVICE_RTOL)  # |a - b| <= tol (1 + |b|)
        if score_type == "fre":
            ref_maps = head.residuals(q).reshape(-1, c, h, w).sum(1).reshape(-1, h * w)
            np.testing.assert_allclose(exact_maps, ref_maps, rtol=1e-6)
            np.testing.assert_allclose(maps, ref_maps, rtol=1e-4, atol=1e-6 * ref_maps.max())
            np.testing.assert_allclose(fast, ref_maps.sum(1), rtol=DEVICE_RTOL, atol=DEVICE_RTOL)  # |a - b| <= tol (1 + |b|)
        else:
            assert maps is None and exact_maps is None


def test_degenerate_training_sets():
    with pytest.raises(UserError, match="pca_level=10 components need more than 10 training rows"):
        DfmHead(10, "fre").fit(_features(8, 50))
    with pytest.raises(UserError, match="identical"):
        DfmHead(0.97, "nll").fit(np.ones((20, 30), np.float32))
    # Duplicated images: rank-deficient but valid; every score finite.
    dup = np.repeat(_features(5, 40), 4, axis=0)
    for score_type in ("fre", "nll"):
        head = DfmHead(0.999, score_type).fit(dup)
        assert np.isfinite(head.anomaly_scores(_features(6, 40, seed=9))).all()
    with pytest.raises(UserError):
        DfmConfig(pca_level=1.0)


def test_no_mutation_and_bit_identical_state_round_trip():
    train, query = _features(50, 64), _features(7, 64, seed=7)
    t0, q0 = train.copy(), query.copy()
    for score_type in ("fre", "nll"):
        head = DfmHead(0.95, score_type).fit(train)
        copy = DfmHead.from_arrays({k: v.copy() for k, v in head.to_arrays().items()}, 0.95, score_type)
        assert np.array_equal(head.anomaly_scores(query), copy.anomaly_scores(query))
    np.testing.assert_array_equal(train, t0)
    np.testing.assert_array_equal(query, q0)


def test_dfm_features_match_direct_reference():
    config = DfmConfig(backbone="resnet18", layer="layer3", pooling_kernel_size=2, image_size=(128, 128))
    state, _ = resolve_weights(config, None, False)
    rng = np.random.default_rng(0)
    state = {k: (rng.uniform(0.5, 2, v.shape).astype(v.dtype) if k.endswith(("running_var", "bn2.weight")) else v)
             for k, v in state.items()}
    images = rng.random((3, 3, 128, 128), dtype=np.float32)
    extractor = FeatureExtractor(config, state)
    ours = extractor(images)
    model = timm.create_model("resnet18", pretrained=False, features_only=True, exportable=True, out_indices=[3])
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    x = (torch.from_numpy(images) - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor(
        [0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        ref = F.avg_pool2d(model.eval()(x)[0], 2).reshape(3, -1).numpy()  # C-major flatten, as view(N, -1)
    assert extractor.map_shape == (256, 4, 4) and ours.shape == (3, 256 * 16)
    assert np.abs(ours - ref).max() <= 1e-4


def test_map_upsampling_is_bilinear_align_corners_false():
    pooled = np.array([[0.0, 1.0], [2.0, 3.0]], np.float32)
    up = upsample(pooled, (4, 4))
    # align_corners=False: output pixel i samples source coordinate (i + 0.5) / 2 - 0.5, clamped at the border.
    coords = np.clip((np.arange(4) + 0.5) / 2 - 0.5, 0, 1)
    expected = 2 * coords[:, None] + coords[None, :]
    np.testing.assert_allclose(up, expected, atol=1e-6)
    row = {"anomaly_map": pooled.ravel().tolist(), "anomaly_map_shape": [2, 2]}
    assert anomaly_map(row).shape == (2, 2)
    big = anomaly_map(row, (30, 50))
    assert big.shape == (30, 50) and big[-1, -1] == pytest.approx(big.max()) and big[0, 0] == big.min() == 0.0
    with pytest.raises(ValueError, match="no anomaly map"):
        anomaly_map({"anomaly_map": None})
