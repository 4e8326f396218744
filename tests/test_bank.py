"""Memory bank: exact top-K selection, uniformity, determinism, bounded driver memory."""

import tracemalloc

import numpy as np
from scipy import stats

from rayanom.bank import BankSelector, key_threshold, row_keys, select_bank


def _stream(n, d, k_seed, batch=1000, order_seed=None):
    ids = np.arange(n)
    if order_seed is not None:
        ids = np.random.default_rng(order_seed).permutation(n)
    for s in range(0, n, batch):
        b = ids[s:s + batch]
        feats = np.repeat(b[:, None].astype(np.float32), d, axis=1)
        yield row_keys(b, k_seed), b, feats


def test_keys_are_deterministic_and_uniform():
    ids = np.arange(200_000)
    a, b = row_keys(ids, 7), row_keys(ids, 7)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, row_keys(ids, 8))
    assert ((a >= 0) & (a < 1)).all()
    assert stats.kstest(a, "uniform").pvalue > 1e-3


def test_selection_is_the_k_smallest_keys_in_any_order():
    n, k = 20_000, 500
    ids, feats = select_bank(_stream(n, 3, 1), k)
    keys = row_keys(np.arange(n), 1)
    expected = np.sort(np.argsort(keys)[:k])
    assert np.array_equal(ids, expected)
    assert np.array_equal(feats[:, 0], expected.astype(np.float32))
    ids2, feats2 = select_bank(_stream(n, 3, 1, batch=137, order_seed=3), k)
    assert np.array_equal(ids, ids2) and np.array_equal(feats, feats2)


def test_fewer_rows_than_cap_keeps_everything():
    ids, _ = select_bank(_stream(50, 2, 0), 100)
    assert np.array_equal(ids, np.arange(50))


def test_worker_threshold_loses_nothing():
    n, k = 100_000, 1000
    t = key_threshold(n, k)
    keys = row_keys(np.arange(n), 3)
    assert (keys < t).sum() >= k
    assert key_threshold(10, 100) == 1.0


def test_inclusion_is_uniform():
    # Each of 40 rows should be included in a 10-row bank with probability 1/4 across seeds.
    n, k, trials = 40, 10, 2000
    counts = np.zeros(n)
    for seed in range(trials):
        ids, _ = select_bank(_stream(n, 1, seed, batch=7), k)
        assert len(ids) == k and len(set(ids)) == k
        counts[ids] += 1
    chi2 = stats.chisquare(counts, np.full(n, trials * k / n))
    assert chi2.pvalue > 1e-3, counts


def test_driver_memory_is_bounded_by_the_bank():
    # 2 million rows x 64 features (~490 MiB if gathered) through a 2000-row bank.
    k, d, batch = 2000, 64, 5000
    selector = BankSelector(k)
    tracemalloc.start()
    for keys, ids, feats in _stream(2_000_000, d, 5, batch=batch):
        selector.add(keys, ids, feats)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert selector.rows_seen == 2_000_000
    assert selector.peak_rows < 2 * k + batch
    row_bytes = d * 4 + 16
    assert peak < 6 * (2 * k + batch) * row_bytes + (8 << 20), peak  # a few copies of the buffer, not the stream
    ids, _ = selector.result()
    assert len(ids) == k
