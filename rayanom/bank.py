"""Memory bank: a uniform, seeded random subset of at most ``max_training_points`` (K) items.

Every bank item (a training image for DFKDE/DFM, a region of one for RKDE) gets a deterministic key u in [0, 1) from
(row, item, seed); the K decoded items with the smallest keys are a uniform K-subset drawn without replacement,
whatever the block layout, the number of actors, retries or output order.

Fitting costs about K images of work, not the whole index: each training row also has a lower bound L on its items'
keys, computable before its file is read (DFKDE/DFM: the row's one key; RKDE: the smallest of the keys its
``slots`` = ``max_detections_per_image`` possible regions would get). :func:`collect_bank` reads rows in passes over
bands of L: a pass up to a threshold t reads the rows with L < t and keeps their items with keys below t, so it finds
every decoded item with a key below t; once K such items exist they are exactly the K smallest, and rows with L >= t
are never read. The first pass reads the K rows of smallest L; only when fewer than K items fall below its threshold
(rows that failed, or RKDE images with fewer than ``slots`` regions) does another pass raise the threshold.

On the driver :class:`BankSelector` keeps the K smallest keys in a preallocated K x d buffer, replacing the current
worst row in place: O(K d) memory and O(n log K) time for n offered rows.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
# Independent streams of uniforms per seed: the row key (0, as ``row_keys``), RKDE's position of the smallest region
# key among an image's slots, and RKDE's other region keys.
_POSITION_STREAM, _REGION_STREAM = 1, 2
ALL_KEYS = 2.0  # a key bound above every key (keys lie in [0, 1]): a band [lo, ALL_KEYS) holds every key from lo on
REGION_ID_STRIDE = 1 << 16  # bank id of region j of row r: r * stride + j (so at most 65536 regions an image)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def _uniforms(ids: np.ndarray, seed: int, stream: int = 0) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        salt = _splitmix64(np.full(ids.shape, seed, dtype=np.uint64))
        if stream:
            salt = _splitmix64(salt ^ np.uint64(stream))
        mixed = _splitmix64(ids ^ salt)
    return (mixed >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def row_keys(row_ids: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic pseudo-uniform keys in [0, 1), float64, one per (row id, seed): the bank keys of DFKDE/DFM."""
    return _uniforms(row_ids, seed)


def lower_keys(rows: np.ndarray, seed: int, slots: int) -> np.ndarray:
    """Per row, the smallest key any of its items can have (known before the row is read).

    ``slots == 1`` (one item a row): the row key. Otherwise the minimum of ``slots`` independent uniforms, drawn
    directly as 1 - (1 - u)^(1 / slots)."""
    u = row_keys(rows, seed)
    return u if slots == 1 else -np.expm1(np.log1p(-u) / slots)


def region_keys(rows: np.ndarray, regions: np.ndarray, seed: int, slots: int) -> np.ndarray:
    """Keys of region ``regions[i]`` (0 <= region < slots) of row ``rows[i]``.

    Slot ``p`` (a uniform position per row) holds the row's lower key L, every other slot L + (1 - L) v with v uniform:
    the joint law of ``slots`` independent uniforms given their minimum. So the keys of an image's first n regions are
    independent uniforms for any n <= slots, and none is below L."""
    rows, regions = np.asarray(rows, dtype=np.int64), np.asarray(regions, dtype=np.int64)
    if ((regions < 0) | (regions >= slots)).any():
        msg = f"region numbers must lie in [0, {slots}), got {regions.min()}..{regions.max()}"
        raise ValueError(msg)
    if slots == 1:
        return row_keys(rows, seed)
    low = lower_keys(rows, seed, slots)
    position = np.minimum((_uniforms(rows, seed, _POSITION_STREAM) * slots).astype(np.int64), slots - 1)
    v = _uniforms(rows * REGION_ID_STRIDE + regions, seed, _REGION_STREAM)
    return np.where(regions == position, low, low + (1.0 - low) * v)


class BankSelector:
    """Streaming top-K-smallest-(key, id) reduce on the driver: feed batches with :meth:`add`, then :meth:`result`.

    The kept rows live in a K x d buffer allocated on the first batch; once it is full a max-heap of (key, id) names
    the current worst row, which each better arriving row replaces in place. Rows of a batch are first compared with
    the worst at once (numpy), so only the few that can enter touch the heap."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.n = 0  # rows held
        self._keys = np.empty(k)
        self._ids = np.empty(k, dtype=np.int64)
        self._feats: np.ndarray | None = None
        self._heap: list[tuple[float, int, int]] = []  # (-key, -id, slot): the worst kept row on top

    def add(self, keys: np.ndarray, ids: np.ndarray, feats: np.ndarray) -> None:
        """Offer a batch: keys (n,), ids (n,), features (n, d)."""
        keys, ids = np.asarray(keys, dtype=np.float64), np.asarray(ids, dtype=np.int64)
        if not len(keys) or not self.k:
            return
        feats = np.asarray(feats)
        if self._feats is None:
            self._feats = np.empty((self.k, feats.shape[1]), dtype=feats.dtype)
        take = min(self.k - self.n, len(keys))
        if take:
            s = slice(self.n, self.n + take)
            self._keys[s], self._ids[s], self._feats[s] = keys[:take], ids[:take], feats[:take]
            self.n += take
            if self.n == self.k:
                self._heap = [(-self._keys[i], -int(self._ids[i]), i) for i in range(self.k)]
                heapq.heapify(self._heap)
        if take == len(keys):
            return
        keys, ids, feats = keys[take:], ids[take:], feats[take:]
        worst_key, worst_id = -self._heap[0][0], -self._heap[0][1]
        better = np.flatnonzero((keys < worst_key) | ((keys == worst_key) & (ids < worst_id)))
        for i in better[np.lexsort((ids[better], keys[better]))]:  # best first: stop at the first that cannot enter
            neg_key, neg_id, slot = self._heap[0]
            if (keys[i], ids[i]) >= (-neg_key, -neg_id):
                break
            heapq.heapreplace(self._heap, (-keys[i], -int(ids[i]), slot))
            self._keys[slot], self._ids[slot], self._feats[slot] = keys[i], ids[i], feats[i]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, features) of the bank, sorted by id so the fit does not depend on arrival order."""
        if self._feats is None:
            return np.empty(0, dtype=np.int64), np.empty((0, 0), dtype=np.float32)
        order = np.argsort(self._ids[:self.n], kind="stable")
        return self._ids[order], self._feats[order]


# A pass's items: (keys, bank ids, features) of the items kept, and (row, error) of the rows that failed.
PassBatches = Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, str]]]]


@dataclass
class Bank:
    ids: np.ndarray  # bank ids, sorted
    features: np.ndarray  # (len(ids), d)
    n_read: int  # distinct training rows read
    passes: int
    failures: dict[int, str] = field(default_factory=dict)  # row -> error, rows read that failed


class Candidates:
    """The training rows known so far, in ascending (lower key, row): those with a lower key below ``fetched``.

    ``fetch(lo, hi)`` returns the training rows whose lower key lies in [lo, hi): (rows, lower keys, paths or None).
    The pipeline's fetch runs on the workers over the index's files (``index.training_band``), so the driver holds
    about K rows of the index, not the index; ``from_rows`` serves rows already in memory."""

    def __init__(self, n: int, fetch: Callable[[float, float], tuple], fetched: float = 0.0,
                 first: tuple | None = None) -> None:
        self.n, self._fetch, self.fetched = n, fetch, fetched  # n: training rows in all
        self.rows, self.lower = np.empty(0, dtype=np.int64), np.empty(0)
        self.paths: np.ndarray | None = None
        if first is not None:
            self._add(*first)

    @classmethod
    def from_rows(cls, rows: np.ndarray, seed: int, slots: int) -> Candidates:
        rows = np.asarray(rows, dtype=np.int64)
        lower = lower_keys(rows, seed, slots)

        def fetch(lo: float, hi: float):
            use = (lower >= lo) & (lower < hi)
            return rows[use], lower[use], None

        return cls(len(rows), fetch)

    def fetch_below(self, hi: float) -> None:
        """Know every training row with a lower key below ``hi``."""
        if hi > self.fetched:
            self._add(*self._fetch(self.fetched, hi))
            self.fetched = hi

    def _add(self, rows: np.ndarray, lower: np.ndarray, paths: np.ndarray | None) -> None:
        rows, lower = np.asarray(rows, dtype=np.int64), np.asarray(lower, dtype=np.float64)
        self.rows, self.lower = np.r_[self.rows, rows], np.r_[self.lower, lower]
        if paths is not None:
            self.paths = np.r_[self.paths if self.paths is not None else np.empty(0, dtype=object),
                               np.asarray(paths, dtype=object)]
        order = np.lexsort((self.rows, self.lower))
        self.rows, self.lower = self.rows[order], self.lower[order]
        if self.paths is not None:
            self.paths = self.paths[order]


def collect_bank(rows: np.ndarray | Candidates, seed: int, k: int, slots: int,
                 run_pass: Callable[[np.ndarray, float, float], PassBatches]) -> Bank:
    """The K items of smallest key among the training ``rows`` that decode, reading few rows.

    ``rows``: the training row indices, or ``Candidates`` that fetch them by bands of lower key (the driver then
    holds about K of them). ``run_pass(todo, lo, hi)`` reads the rows ``todo`` (sorted) and yields their items with
    lo <= key < hi, and the rows that failed. Thresholds only grow, so each item is offered once (an RKDE image read
    again in a later pass offers only its regions in the new band)."""
    c = rows if isinstance(rows, Candidates) else Candidates.from_rows(rows, seed, slots)
    n = c.n
    if n > k:
        # The K + 1 smallest lower keys: fetch a band expected to hold them with 8 standard deviations to spare.
        t = min(1.0, (k + 8.0 * math.sqrt(k) + 16.0) / n)
        c.fetch_below(t)
        while len(c.rows) <= k:
            t = min(1.0, 2.0 * t)
            c.fetch_below(t if t < 1.0 else ALL_KEYS)
        hi = float(c.lower[k])
    else:
        c.fetch_below(ALL_KEYS)
        hi = ALL_KEYS
    selector = BankSelector(k)
    failures: dict[int, str] = {}
    lo, passes = 0.0, 0
    while True:
        c.fetch_below(hi)
        first = 0 if slots > 1 else int(np.searchsorted(c.lower, lo, "left"))
        stop = int(np.searchsorted(c.lower, hi, "left"))
        todo = np.sort(c.rows[first:stop])
        passes += 1
        logger.info("bank pass %d: reading %d rows, keys in [%.3g, %.3g)", passes, len(todo), lo, min(hi, 1.0))
        for keys, ids, feats, failed in run_pass(todo, lo, hi):
            selector.add(keys, ids, feats)
            for row, error in failed:  # counted when first read (an RKDE row read again fails again)
                if lower_keys(np.array([row]), seed, slots)[0] >= lo:
                    failures[int(row)] = error
        if selector.n == k or hi > 1.0:
            break
        # Fewer than K items below hi: scale the threshold by the shortfall (items are uniform in key), with the
        # margin of 8 standard deviations that makes a third pass improbable; at most 16x a pass.
        grow = min(16.0, (k + 8.0 * math.sqrt(k) + 16.0) / max(selector.n, 1))
        lo, hi = hi, (hi * grow if hi * grow < 1.0 else ALL_KEYS)
    ids, feats = selector.result()
    n_read = int(np.searchsorted(c.lower, hi, "left"))
    return Bank(ids=ids, features=feats, n_read=n_read, passes=passes, failures=failures)
