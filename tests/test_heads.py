"""Heads against independent references: numpy SVD for PCA, scipy.stats.gaussian_kde for the KDE."""

import numpy as np
import pytest
from scipy.stats import gaussian_kde
from sklearn.decomposition import PCA as SkPCA

from rayanom.config import UserError
from rayanom.heads import BATCH_RTOL, DEVICE_RTOL, PCA, GaussianKDE, KdeHead, anomaly_probability


def _features(n, d, seed=0):
    rng = np.random.default_rng(seed)
    scales = np.linspace(3.0, 0.2, d)  # distinct variances: a well-defined leading subspace
    return (rng.normal(size=(n, d)) * scales + rng.normal(size=d) * 5).astype(np.float32)


def _reference_log_density(train, query, k, scaling):
    """Independent pipeline: numpy thin SVD PCA -> scaling -> scipy gaussian_kde.logpdf."""
    x = train.astype(np.float64)
    mu = x.mean(0)
    _, _, vt = np.linalg.svd(x - mu, full_matrices=False)
    v = vt[:k].T
    p, q = (x - mu) @ v, (query.astype(np.float64) - mu) @ v
    if scaling == "scale":
        m = np.linalg.norm(p, axis=1).max()
        p, q = p / m, q / m
    else:
        p = p / np.linalg.norm(p, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    return gaussian_kde(p.T).logpdf(q.T)


@pytest.mark.parametrize("scaling", ["scale", "norm"])
@pytest.mark.parametrize("n,d", [(300, 64), (40, 64)])  # tall (covariance eigh) and wide (thin SVD) PCA paths
def test_kde_head_matches_scipy(scaling, n, d):
    train, query = _features(n, d), _features(50, d, seed=1) * 1.3
    head = KdeHead(16, scaling).fit(train)
    ref = _reference_log_density(train, query, 16, scaling)
    np.testing.assert_allclose(head.score_samples(query, exact=True), ref, rtol=1e-9)
    np.testing.assert_allclose(head.score_samples(query), ref, rtol=1e-6, atol=1e-4)  # float32 kernel sums
    on_train = _reference_log_density(train, train[:10], 16, scaling)
    np.testing.assert_allclose(head.score_samples(train[:10], exact=True), on_train, rtol=1e-9)
    np.testing.assert_allclose(head.score_samples(train[:10]), on_train, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("scaling", ["scale", "norm"])
def test_float32_head_within_device_rtol_of_float64(scaling):
    """Projection, scaling, whitening and kernel sums in float32 (the default, on the scoring device) against
    float64 (``exact``), with a torch tensor as input too (the actor's features stay on its device)."""
    import torch

    train, query = _features(2000, 256, seed=3), _features(200, 256, seed=4)
    head = KdeHead(16, scaling).fit(train)
    for q in (train[:200], query):
        exact = head.score_samples(q, exact=True)
        # |a - b| <= tol (1 + |b|)
        np.testing.assert_allclose(head.score_samples(q), exact, rtol=DEVICE_RTOL, atol=DEVICE_RTOL)
        np.testing.assert_array_equal(head.score_samples(torch.from_numpy(q)), head.score_samples(q))


def test_gaussian_kde_far_queries_do_not_underflow():
    z = np.random.default_rng(0).normal(size=(200, 4))
    kde = GaussianKDE().fit(z)
    far = np.array([[20.0] * 4, [30.0] * 4, [40.0] * 4])
    ref = gaussian_kde(z.T).logpdf(far.T)  # scipy also uses logsumexp in logpdf
    for exact, rtol in ((True, 1e-9), (False, 1e-6)):
        ours = kde.score_samples(far, exact=exact)
        # anomalib's float32 density is exactly 0 here (log = -inf, so they tie); the shifted sum keeps the ranking.
        assert np.isfinite(ours).all() and ours[0] > ours[1] > ours[2]
        np.testing.assert_allclose(ours, ref, rtol=rtol)


@pytest.mark.parametrize("exact", [True, False])
def test_gaussian_kde_tiles_and_shift_fallback(monkeypatch, exact):
    """Many query and support tiles, and queries whose nearest support points lie outside the first tile (the shift
    from the first tile would overflow: those rows are redone with the exact maximum); scipy is the reference."""
    import rayanom.heads as heads

    monkeypatch.setattr(heads, "SUPPORT_TILE", 64)
    monkeypatch.setattr(heads, "QUERY_TILE", 16)
    rng = np.random.default_rng(0)
    # A few far outliers in the bank, none in the first tile: queries beside them are ~20 bandwidths from every
    # first-tile point, so exp(first-tile shift - true maximum) would overflow float32 and float64 alike.
    z = np.concatenate([rng.normal(size=(264, 3)), 30.0 + rng.normal(size=(3, 3)) * 0.1])
    q = np.concatenate([rng.normal(size=(20, 3)), 30.0 + rng.normal(size=(5, 3)) * 0.1, np.full((3, 3), 200.0)])
    ours = GaussianKDE().fit(z).score_samples(q, exact=exact)
    ref = gaussian_kde(z.T).logpdf(q.T)
    np.testing.assert_allclose(ours, ref, rtol=1e-9) if exact else np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-4)


def test_inputs_are_not_mutated():
    train, query = _features(100, 32), _features(20, 32, seed=3)
    t0, q0 = train.copy(), query.copy()
    head = KdeHead(8).fit(train)
    head.score_samples(query)
    np.testing.assert_array_equal(train, t0)
    np.testing.assert_array_equal(query, q0)


def test_state_round_trip_is_bit_identical():
    train, query = _features(120, 48), _features(30, 48, seed=2)
    head = KdeHead(16).fit(train)
    copy = KdeHead.from_arrays({k: v.copy() for k, v in head.to_arrays().items()}, 16, "scale")
    assert np.array_equal(head.score_samples(query), copy.score_samples(query))


@pytest.mark.parametrize("n", [0, 5, 16])
def test_too_few_rows_is_a_clear_error(n):
    with pytest.raises(UserError, match="more training rows than n_pca_components=16"):
        KdeHead(16).fit(_features(max(n, 1), 32)[:n])


def test_constant_features_are_a_clear_error():
    with pytest.raises(UserError, match="identical"):
        KdeHead(4).fit(np.ones((50, 8), np.float32))


def test_unfitted_head_raises():
    with pytest.raises(RuntimeError, match="not fitted"):
        KdeHead().score_samples(np.zeros((1, 4)))


@pytest.mark.parametrize("fraction", [0.5, 0.8, 0.97])
@pytest.mark.parametrize("n", [500, 30])
def test_pca_fraction_follows_sklearn(fraction, n):
    x = _features(n, 40, seed=4)
    ours = PCA(fraction).fit(x)
    ref = SkPCA(fraction, svd_solver="full").fit(x.astype(np.float64))
    assert ours.components_.shape[0] == ref.n_components_
    np.testing.assert_allclose(np.abs(ours.components_ @ ref.components_.T), np.eye(ref.n_components_), atol=1e-6)


def test_anomaly_probability_formula():
    ll = np.array([-500.0, -20.0, 0.0, 12.0, 40.0])
    np.testing.assert_allclose(anomaly_probability(ll), 1.0 / (1.0 + np.exp(0.05 * (ll - 12.0))), rtol=1e-12)


def test_pca_scatter_accumulated_over_chunks_matches_svd():
    x = _features(10_000, 12, seed=8)  # several 4096-row chunks
    ours = PCA(5).fit(x)
    ref = SkPCA(5, svd_solver="full").fit(x.astype(np.float64))
    np.testing.assert_allclose(ours.mean_, ref.mean_, rtol=1e-10)
    np.testing.assert_allclose(np.abs(ours.components_ @ ref.components_.T), np.eye(5), atol=1e-8)


@pytest.mark.parametrize("exact", [True, False])
def test_kde_head_batch_contract(exact):
    """The same rows in the same batches score bit-identically (a fresh head from the same state included); the same
    row in another batch (alone, 5 rows, 300 rows) agrees within the stated tolerance: matrix kernels choose their
    summation order by shape and by a row's position (OpenBLAS's Haswell/Zen kernels on AMD CPUs do)."""
    train, query = _features(300, 64), _features(300, 64, seed=5)
    head = KdeHead(16).fit(train)
    copy = KdeHead.from_arrays(head.to_arrays(), 16, "scale")
    small = np.concatenate([head.score_samples(query[i:i + 5], exact=exact) for i in range(0, 300, 5)])
    again = np.concatenate([copy.score_samples(query[i:i + 5], exact=exact) for i in range(0, 300, 5)])
    assert np.array_equal(small, again)
    whole = head.score_samples(query, exact=exact)
    alone = np.concatenate([head.score_samples(query[i:i + 1], exact=exact) for i in range(0, 300, 37)])
    tol = 1e-12 if exact else BATCH_RTOL  # |a - b| <= tol * (1 + |b|)
    for a, b in ((alone, whole[::37]), (small, whole)):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def test_gaussian_kde_refit_scores_against_the_new_support():
    rng = np.random.default_rng(5)
    first, second = rng.normal(size=(300, 3)), rng.normal(2.0, 0.5, size=(200, 3))
    q = rng.normal(1.0, 1.0, size=(20, 3))
    kde = GaussianKDE().fit(first)
    kde.score_samples(q, exact=True)  # caches its support tiles
    kde.fit(second)
    np.testing.assert_allclose(kde.score_samples(q, exact=True), gaussian_kde(second.T).logpdf(q.T), rtol=1e-10)
