"""Memory bank: exact top-K selection, uniformity, determinism, reads bounded by the bank, bounded driver memory."""

import tracemalloc

import numpy as np
import pytest
from scipy import stats

from rayanom.bank import REGION_ID_STRIDE, BankSelector, collect_bank, lower_keys, region_keys, row_keys


def _stream(n, d, k_seed, batch=1000, order_seed=None):
    ids = None if order_seed is None else np.random.default_rng(order_seed).permutation(n)
    for s in range(0, n, batch):
        b = np.arange(s, min(s + batch, n)) if ids is None else ids[s:s + batch]
        feats = np.repeat(b[:, None].astype(np.float32), d, axis=1)
        yield row_keys(b, k_seed), b, feats


def _select(batches, k):
    selector = BankSelector(k)
    for keys, ids, feats in batches:
        selector.add(keys, ids, feats)
    return selector.result()


def test_keys_are_deterministic_and_uniform():
    ids = np.arange(200_000)
    a, b = row_keys(ids, 7), row_keys(ids, 7)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, row_keys(ids, 8))
    assert ((a >= 0) & (a < 1)).all()
    assert stats.kstest(a, "uniform").pvalue > 1e-3


@pytest.mark.parametrize("batch,order_seed", [(1, None), (1, 5), (137, 3), (1000, None), (20_000, 1)])
def test_selection_is_the_k_smallest_keys_in_any_order(batch, order_seed):
    n, k = 20_000, 500
    ids, feats = _select(_stream(n, 3, 1, batch=batch, order_seed=order_seed), k)
    keys = row_keys(np.arange(n), 1)
    expected = np.sort(np.argsort(keys)[:k])
    assert np.array_equal(ids, expected)
    assert np.array_equal(feats, np.repeat(expected[:, None].astype(np.float32), 3, axis=1))


def test_ties_in_key_are_broken_by_id_as_brute_force():
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 20, 3000).astype(np.float64)  # many equal keys
    ids = rng.permutation(3000)
    selector = BankSelector(100)
    for s in range(0, 3000, 7):
        selector.add(keys[s:s + 7], ids[s:s + 7], ids[s:s + 7, None].astype(np.float32))
    got, feats = selector.result()
    expected = np.sort(ids[np.lexsort((ids, keys))[:100]])
    assert np.array_equal(got, expected) and np.array_equal(feats[:, 0], expected.astype(np.float32))


def test_fewer_rows_than_cap_keeps_everything():
    ids, _ = _select(_stream(50, 2, 0), 100)
    assert np.array_equal(ids, np.arange(50))


def test_inclusion_is_uniform():
    # Each of 40 rows should be included in a 10-row bank with probability 1/4 across seeds.
    n, k, trials = 40, 10, 2000
    counts = np.zeros(n)
    for seed in range(trials):
        ids, _ = _select(_stream(n, 1, seed, batch=7), k)
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
    row_bytes = d * 4 + 16
    # The stream's own batch (made by _stream) plus the K-row buffer and its heap: nothing grows with the stream.
    assert peak < 4 * (k + batch) * row_bytes + (1 << 20), peak
    ids, _ = selector.result()
    assert len(ids) == k


# --- collect_bank: which rows are read, and that the bank is still exact ---------------------------------------------

class FakeRows:
    """A stand-in for the Ray pass: rows with a given number of items (regions), some of which fail to decode.

    Records every row read; yields in chunks of 7 rows, in reverse order (arrival order must not matter)."""

    def __init__(self, n, counts, failing, seed, slots):
        self.counts, self.failing, self.seed, self.slots = counts, set(failing), seed, slots
        self.reads = []
        self.rows = np.arange(n) * 3 + 11  # row indices need not be 0..n-1 (training rows of a larger index)

    def items(self, rows):
        owner = np.repeat(rows, self.counts[self.position(rows)])
        starts = np.cumsum(self.counts[self.position(rows)]) - self.counts[self.position(rows)]
        region = np.arange(len(owner)) - np.repeat(starts, self.counts[self.position(rows)])
        keys = region_keys(owner, region, self.seed, self.slots)
        ids = owner * REGION_ID_STRIDE + region if self.slots > 1 else owner
        return keys, ids

    def position(self, rows):
        return (np.asarray(rows) - 11) // 3

    def __call__(self, todo, lo, hi):
        assert np.array_equal(todo, np.sort(todo))
        self.reads.extend(todo.tolist())
        chunks = [todo[s:s + 7] for s in range(0, len(todo), 7)][::-1]
        for chunk in chunks:
            failed = [(int(r), "OSError: boom") for r in chunk if r in self.failing]
            good = np.array([r for r in chunk if r not in self.failing], dtype=np.int64)
            keys, ids = self.items(good)
            keep = (keys >= lo) & (keys < hi)
            yield keys[keep], ids[keep], ids[keep, None].astype(np.float64), failed

    def brute_force(self, k):
        good = np.array([r for r in self.rows if r not in self.failing], dtype=np.int64)
        keys, ids = self.items(good)
        return np.sort(ids[np.lexsort((ids, keys))[:k]])


@pytest.mark.parametrize("n,k", [(5000, 300), (300, 300), (200, 300)])
def test_without_failures_one_pass_reads_exactly_k_rows(n, k):
    fake = FakeRows(n, np.ones(n, dtype=np.int64), [], seed=4, slots=1)
    bank = collect_bank(fake.rows, 4, k, 1, fake)
    assert bank.passes == 1 and not bank.failures
    assert sorted(fake.reads) == sorted(set(fake.reads)) and bank.n_read == len(fake.reads) == min(n, k)
    # the rows read are exactly those of the K smallest keys: every other row is never touched
    assert set(fake.reads) == set(fake.rows[np.argsort(row_keys(fake.rows, 4))[:k]].tolist())
    assert np.array_equal(bank.ids, fake.brute_force(k))
    assert np.array_equal(bank.features[:, 0], bank.ids.astype(np.float64))


@pytest.mark.parametrize("fail_fraction", [0.01, 0.3, 0.9])
def test_failures_are_topped_up_exactly(fail_fraction):
    n, k, seed = 20_000, 400, 9
    rng = np.random.default_rng(1)
    rows = np.arange(n) * 3 + 11
    failing = rows[rng.random(n) < fail_fraction]
    fake = FakeRows(n, np.ones(n, dtype=np.int64), failing, seed, slots=1)
    bank = collect_bank(fake.rows, seed, k, 1, fake)
    assert np.array_equal(bank.ids, fake.brute_force(k))
    assert len(fake.reads) == len(set(fake.reads)) == bank.n_read  # no row read twice
    assert bank.passes >= 2 and set(bank.failures) == set(fake.reads) & set(failing.tolist())
    assert bank.n_read - len(bank.failures) >= k
    assert bank.n_read < 3 * k / (1 - fail_fraction) + 200  # about K good rows read, not the index


def test_everything_failing_reads_everything_and_finds_nothing():
    fake = FakeRows(500, np.ones(500, dtype=np.int64), np.arange(500) * 3 + 11, seed=0, slots=1)
    bank = collect_bank(fake.rows, 0, 50, 1, fake)
    assert len(bank.ids) == 0 and bank.n_read == 500 and len(bank.failures) == 500


@pytest.mark.parametrize("max_regions,fail_fraction", [(8, 0.0), (3, 0.1), (30, 0.0)])
def test_regions_bank_is_exact_and_reads_a_fraction(max_regions, fail_fraction):
    n, k, slots, seed = 6000, 300, 30, 2
    rng = np.random.default_rng(3)
    counts = rng.integers(0, max_regions + 1, n)  # 0 to max_regions regions an image, of 30 slots
    rows = np.arange(n) * 3 + 11
    fake = FakeRows(n, counts, rows[rng.random(n) < fail_fraction], seed, slots)
    bank = collect_bank(fake.rows, seed, k, slots, fake)
    assert np.array_equal(bank.ids, fake.brute_force(k))
    assert len(np.unique(bank.ids)) == k  # no region offered twice over the passes
    # images read: those whose lower key lies below the final threshold, about k * slots / (mean regions) of them
    good_regions = counts[[r not in fake.failing for r in rows]].sum() / n
    assert bank.n_read == len(set(fake.reads)) <= min(n, 2 * k * slots / good_regions)
    if max_regions == 30:
        assert bank.n_read < n / 5
    assert set(bank.failures) == set(fake.reads) & fake.failing


def test_region_keys_are_independent_uniforms_above_the_lower_key():
    rows = np.arange(20_000)
    slots = 12
    low = lower_keys(rows, 5, slots)
    keys = np.stack([region_keys(rows, np.full(len(rows), j), 5, slots) for j in range(slots)], axis=1)
    assert (keys >= low[:, None]).all() and np.array_equal(keys.min(axis=1), low)
    for j in (0, 3, 11):
        assert stats.kstest(keys[:, j], "uniform").pvalue > 1e-3
    assert abs(np.corrcoef(keys[:, 0], keys[:, 1])[0, 1]) < 0.03
    with pytest.raises(ValueError, match=r"region numbers must lie in \[0, 12\)"):
        region_keys(rows[:1], np.array([12]), 5, slots)


def test_region_inclusion_is_uniform():
    # 12 regions over 5 images (counts 1, 2, 3, 4, 2), a 4-region bank: each region is in it with probability 1/3.
    counts = np.array([1, 2, 3, 4, 2])
    inclusion = np.zeros(counts.sum())
    trials = 3000
    for seed in range(trials):
        fake = FakeRows(5, counts, [], seed, slots=4)
        bank = collect_bank(fake.rows, seed, 4, 4, fake)
        owner, region = bank.ids // REGION_ID_STRIDE, bank.ids % REGION_ID_STRIDE
        inclusion[np.cumsum(counts)[fake.position(owner)] - counts[fake.position(owner)] + region] += 1
    chi2 = stats.chisquare(inclusion, np.full(len(inclusion), trials * 4 / len(inclusion)))
    assert chi2.pvalue > 1e-3, inclusion
