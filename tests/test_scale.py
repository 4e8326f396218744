"""Scale: the driver's memory during ``workflows.fit`` is bounded by the memory bank, not by the training index.

The same fit runs on a 30-row and on a 3000-row index (100x) of tiny PNGs with a 16-row bank cap. The driver is this
test process: its peak Python heap (``tracemalloc``, which traces numpy's buffers too) and its peak Arrow allocations
(the default memory pool) are measured during each fit. RSS is not measured: Ray's shared memory makes it noisy.
"""

import gc
import threading
import time
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import index_at

from rayanom import workflows
from rayanom.config import DfmConfig, RunConfig
from rayanom.features import resolve_weights
from rayanom.index import describe_index

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

SMALL_ROWS, LARGE_ROWS = 30, 3000
CAP = 16
BATCH = 32
# DFM on resnet18 layer1 at 32 x 32, no pooling: 64 x 8 x 8 = 4096 features a row, so a row of features (16 KiB)
# outweighs its index row and Ray Data's per-row bookkeeping, as on real data (2048 to 16384 features a row).
CONFIG = DfmConfig(backbone="resnet18", layer="layer1", pooling_kernel_size=1, pca_level=0.97, image_size=(32, 32),
                   max_training_points=CAP)
DIM = 64 * 8 * 8


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory):
    from rayanom.demo import make_demo

    root = tmp_path_factory.mktemp("scale")
    path = make_demo(str(root), n_train=LARGE_ROWS, n_test_normal=0, n_test_anomalous=0, size=16, seed=3)
    return index_at(root / "small.parquet", pq.read_table(path).slice(0, SMALL_ROWS)), describe_index(path)


def _driver_peak(fn):
    """fn() with this process's peak Python heap growth and peak Arrow allocation growth (bytes) during the call.

    Arrow: the default pool's bytes sampled every millisecond, and its all-time maximum when the call raised it
    (then that maximum is the call's exact peak).
    """
    gc.collect()
    pool = pa.default_memory_pool()
    arrow_base, arrow_max_before = pa.total_allocated_bytes(), pool.max_memory()
    arrow_peak = [arrow_base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            arrow_peak[0] = max(arrow_peak[0], pa.total_allocated_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    tracemalloc.start()
    try:
        result = fn()
        _, heap_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        stop.set()
        sampler.join()
    if pool.max_memory() > arrow_max_before:
        arrow_peak[0] = max(arrow_peak[0], pool.max_memory())
    return result, heap_peak, arrow_peak[0] - arrow_base


def test_driver_memory_is_bounded_by_the_bank_when_the_index_grows_100x(ray_local, tiny_index):
    small, large = tiny_index
    state, source = resolve_weights(CONFIG, None, False)
    run = RunConfig(batch_size=BATCH, num_actors=1)

    def fit(index):
        return workflows.fit(index, CONFIG, source, run)

    fit(small)  # warm-up: the first fit of a process imports and caches several MiB (7.7 MiB measured)
    peaks = {}
    for name, index in (("1x", small), ("100x", large)):
        result, heap, arrow = _driver_peak(lambda index=index: fit(index))
        prov = result.artifact.provenance
        assert (result.n_train, result.n_failed) == (index.n_rows, 0)
        assert prov["n_bank_rows"] == min(CAP, index.n_rows) and prov["feature_dim"] == DIM
        peaks[name] = heap + arrow
        # Bound: bank + the rows the workers send back + Ray Data's per-block bookkeeping + a fixed allowance.
        # * bank: the buffer holds at most 2 x CAP float32 rows (CAP x DIM x 8 bytes) plus one arriving batch (few
        #   rows: the actors drop rows whose key cannot reach the bank); concatenation, trimming, the sort by row id
        #   and the head's float64 SVD make a few copies: 4x.
        # * index: the driver never reads it; the workers send back the rows whose keys can enter the bank (about
        #   CAP + 8 sqrt(CAP) + 16 rows: row, key, path), a few KiB.
        # * Ray Data keeps per-block metadata and stats on the driver: 3 to 6 KiB a block measured, 16 KiB allowed.
        # * fixed: 4 MiB (a warm 1x fit peaks at 2 MiB in all, much of it copies of the features of its one block).
        n_blocks = -(-min(index.n_rows, 4 * CAP) // BATCH)
        bound = 4 * CAP * DIM * 8 + n_blocks * (16 << 10) + (4 << 20)
        assert peaks[name] < bound, (name, heap, arrow, bound)
    # Holding every feature row of the 100x index would cost 3000 x 4096 x 4 bytes = 46.9 MiB; the measured growth
    # from 1x to 100x is about 1.8 MiB (the index copies and per-block bookkeeping above), under 1/10 of that.
    all_features = LARGE_ROWS * DIM * 4
    growth = peaks["100x"] - peaks["1x"]
    assert growth < all_features / 10, (peaks, all_features)


def test_scoring_driver_holds_no_rows_when_the_index_grows_10x(ray_local, tmp_path):
    """Scoring 2,000 and 20,000 rows (files that do not exist: the rows cost the pipeline, not the model) grows the
    driver's peak by what the closing summary reads back (score, label, flags), not by the index: the index is read,
    decoded, scored and written by the workers; the driver sees one descriptor and one summary per part."""
    import numpy as np
    import pyarrow.parquet as pq

    from rayanom.artifact import Artifact
    from rayanom.config import DfkdeConfig
    from rayanom.heads import KdeHead
    from rayanom.index import describe_index

    config = DfkdeConfig(backbone="resnet18", image_size=(32, 32), n_pca_components=2)
    state, source = resolve_weights(config, None, False)
    head = KdeHead(2).fit(np.random.default_rng(0).normal(size=(20, 512)))
    artifact = Artifact(config=config, head=head, weights=source)
    run = RunConfig(batch_size=BATCH, num_actors=1, rows_per_part=4096)

    def score(n, name):
        path = str(tmp_path / f"{name}.parquet")
        pq.write_table(pa.table({"path": [f"/nonexistent/{name}/{i:07d}-with-a-longer-name.png" for i in range(n)],
                                 "label": pa.array(np.arange(n) % 2)}), path)
        index = describe_index(path)
        return _driver_peak(lambda: workflows.score(index, artifact, str(tmp_path / f"out-{name}"), run))

    score(500, "warm")
    # A sampled Arrow peak can only fall short of the true one; a baseline that fell short would inflate the growth
    # (it did once in CI: 382 KB against 0.75-1.0 MB in other runs), so the baseline is the larger of two runs.
    (small, heap_s, arrow_s), (_, heap_s2, arrow_s2) = score(2_000, "1x"), score(2_000, "1x-again")
    heap_s, arrow_s = max(heap_s, heap_s2), max(arrow_s, arrow_s2)
    large, heap_l, arrow_l = score(20_000, "10x")
    assert (small["rows"], small["failed"], large["rows"], large["failed"]) == (2_000, 2_000, 20_000, 20_000)
    # The 18,000 extra rows. Python heap: flat (measured +42 KiB): no row object reaches the driver; the old
    # driver-side path held the index's IPC bytes (1.2 MB here) and ~3-6 KiB of Ray Data bookkeeping per 32-row
    # block. Arrow: only the closing summary's read-back of score, label and flags (measured 126 bytes a row at its
    # peak, with its casts and copies; summary.read_score_columns), where the old path also held the index twice.
    assert heap_l - heap_s < 512 << 10, (heap_s, heap_l)
    assert arrow_l - arrow_s < 18_000 * 192, (arrow_s, arrow_l)
