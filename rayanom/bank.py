"""Memory bank: a uniform, seeded random subset of at most ``max_training_points`` feature rows (models.md A7).

Every row gets a deterministic key u in [0, 1) from (row id, seed). The K rows with the smallest keys are a uniform
K-subset drawn without replacement, whatever the block layout, the number of actors, retries or output order.
Workers drop rows whose key is above a threshold (so most features never leave the actor); the driver streams the
survivors and keeps the K smallest keys in a buffer of at most 2K rows plus one batch: its memory is bounded by the
bank, never by the dataset.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import numpy as np

logger = logging.getLogger(__name__)

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def row_keys(row_ids: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic pseudo-uniform keys in [0, 1), float64, one per (row id, seed)."""
    ids = np.asarray(row_ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        mixed = _splitmix64(ids ^ _splitmix64(np.full(ids.shape, seed, dtype=np.uint64)))
    return (mixed >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def key_threshold(n_rows: int, k: int) -> float:
    """Keep-rate for the workers: enough that fewer than K rows survive only with negligible probability.

    The survivor count is Binomial(n, t); t is set 8 standard deviations (plus 16 rows) above K/n.
    """
    if n_rows <= k:
        return 1.0
    return min(1.0, (k + 8.0 * math.sqrt(k) + 16.0) / n_rows)


class BankSelector:
    """Streaming top-K-smallest-keys reduce on the driver. Feed batches with :meth:`add`, then call :meth:`result`."""

    def __init__(self, k: int) -> None:
        self.k = k
        self._keys = np.empty(0)
        self._ids = np.empty(0, dtype=np.int64)
        self._feats: np.ndarray | None = None
        self.rows_seen = 0
        self.peak_rows = 0

    def add(self, keys: np.ndarray, ids: np.ndarray, feats: np.ndarray) -> None:
        """Offer a batch: keys (n,), row ids (n,), features (n, d)."""
        self.rows_seen += len(keys)
        feats = np.asarray(feats)
        self._keys = np.concatenate([self._keys, np.asarray(keys, dtype=np.float64)])
        self._ids = np.concatenate([self._ids, np.asarray(ids, dtype=np.int64)])
        self._feats = feats.copy() if self._feats is None else np.concatenate([self._feats, feats])
        self.peak_rows = max(self.peak_rows, len(self._keys))
        if len(self._keys) >= 2 * self.k:
            self._trim()

    def _trim(self) -> None:
        order = np.lexsort((self._ids, self._keys))[: self.k]
        self._keys, self._ids = self._keys[order], self._ids[order]
        self._feats = self._feats[order]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(row ids, features) of the bank, sorted by row id so the fit does not depend on arrival order."""
        if self._feats is None:
            return np.empty(0, dtype=np.int64), np.empty((0, 0), dtype=np.float32)
        self._trim()
        order = np.argsort(self._ids, kind="stable")
        return self._ids[order], self._feats[order]


def select_bank(batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reduce a stream of (keys, row ids, features) batches to the K rows with the smallest keys."""
    selector = BankSelector(k)
    for keys, ids, feats in batches:
        selector.add(keys, ids, feats)
    return selector.result()
