"""Workflows: a scoring run's threshold settled before its parts are written, so each part is written once."""

import os
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import SMALL, index_at
from rayanom import workflows
from rayanom.artifact import artifact_fingerprint
from rayanom.config import DfkdeConfig, RunConfig
from rayanom.decisions import Threshold, load_threshold
from rayanom.features import resolve_weights
from rayanom.index import describe_index
from rayanom.parts import PART_RE, VAL_DIR, apply_to_parts
from rayanom.workflows import score_and_decide, threshold_from_val


class PartWrites:
    """Every version of each part file of ``out`` seen while a run writes them, as (inode, mtime) pairs: a part is
    written to a temporary file and moved into place, so each write is a new pair."""

    def __init__(self, out: str, every_s: float = 0.02) -> None:
        self.out, self.every_s, self.seen = out, every_s, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _poll(self) -> None:
        if not os.path.isdir(self.out):
            return
        for entry in os.scandir(self.out):
            if PART_RE.match(entry.name):
                try:
                    st = entry.stat()
                except FileNotFoundError:  # replaced between listing and stat: the next poll sees the new one
                    continue
                self.seen.setdefault(entry.name, set()).add((st.st_ino, st.st_mtime_ns))

    def _watch(self) -> None:
        while not self._stop.wait(self.every_s):
            self._poll()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()


@pytest.fixture(scope="module")
def labelled(ray_local, demo_set, tmp_path_factory):
    """A small model, and the demo's test rows with every other row in the ``val`` split (both classes there)."""
    config = DfkdeConfig(**SMALL)
    _, source = resolve_weights(config, None, False)
    artifact = workflows.fit(describe_index(demo_set["index"]), config, source, RunConfig(batch_size=8)).artifact
    table = pq.read_table(demo_set["test"])
    split = pa.array(["val" if i % 2 else "test" for i in range(table.num_rows)])
    table = table.set_column(table.schema.get_field_index("split"), "split", split)
    root = tmp_path_factory.mktemp("labelled")
    model = str(root / "model")
    artifact.save(model)
    return artifact, model, index_at(root / "index.parquet", table), table


def _scored_watching_parts(labelled, out: str, rows_per_part: int, *args, **kwargs) -> dict:
    """``score_and_decide`` on the labelled rows while ``PartWrites`` watches ``out``; checks that every part of the
    index was written exactly once, and returns the summary."""
    artifact, _, info, table = labelled
    with PartWrites(out) as writes:
        summary = score_and_decide(info, artifact, out, RunConfig(batch_size=4, rows_per_part=rows_per_part), *args,
                                   **kwargs)
    assert len(writes.seen) == -(-table.num_rows // rows_per_part)
    assert all(len(versions) == 1 for versions in writes.seen.values()), writes.seen  # no part written twice
    return summary


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_a_threshold_from_the_val_rows_writes_every_part_once(labelled, tmp_path):
    artifact, model, _, table = labelled
    out = str(tmp_path / "scores")
    summary = _scored_watching_parts(labelled, out, 3, model, store=True)
    t = Threshold(**summary["threshold"])
    n_val = table.column("split").to_pylist().count("val")
    assert t.source == f"F1-adaptive on {n_val} val rows" and t.min is not None
    assert t == threshold_from_val(os.path.join(out, VAL_DIR, "scores"))  # the val rows, scored first
    assert load_threshold(model, artifact_fingerprint(artifact)) == t  # stored beside the model
    assert apply_to_parts(out, t) == 0  # every part decided with it already
    scores = pq.read_table(out)  # the val rows' own directory is hidden: the scores are the index's rows only
    assert scores.num_rows == table.num_rows
    s = scores.column("anomaly_score").to_numpy(zero_copy_only=False)
    assert scores.column("is_anomalous").to_pylist() == [bool(v >= t.value) for v in s]


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_a_manual_threshold_takes_the_val_rows_range_and_writes_every_part_once(labelled, tmp_path):
    out = str(tmp_path / "scores")
    summary = _scored_watching_parts(labelled, out, 5, manual=-20.0)
    stats = threshold_from_val(os.path.join(out, VAL_DIR, "scores"))
    assert summary["threshold"] == {"value": -20.0, "min": stats.min, "max": stats.max, "source": "manual"}
    scores = pq.read_table(out)
    normalized = scores.column("normalized_score").to_numpy(zero_copy_only=False)
    assert np.isfinite(normalized).all() and ((normalized >= 0) & (normalized <= 1)).all()
