"""The data plane (``rayanom.plane``): units and batches at fixed offsets, batch rows, crash markers, and where the
stages run on simulated clusters."""

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SMALL, index_at

from rayanom import plane
from rayanom.decode import decode_batch, decode_table
from rayanom.index import with_row_index
from rayanom.parts import CrashMarker, part_name
from rayanom.stages import score_units
from rayanom.storage import ReadPolicy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("n,per_part,batch,expected", [
    (1500, 1024, 32, 32),  # a small job: about 64 units of whole batches
    (10**8, 4096, 32, 4096),  # a large one: a unit a part
    (20_000, 1024, 32, 320),
    (10, 4, 3, 3),  # parts that are not a multiple of the batch: units still cut at multiples of it
])
def test_unit_rows_against_a_direct_computation(n, per_part, batch, expected):
    want = -(-n // 64)
    assert plane.unit_rows(n, per_part, batch) == expected
    assert expected == min(-(-per_part // batch) * batch, max(batch, -(-want // batch) * batch))
    assert expected % batch == 0


def test_units_tile_their_parts_at_multiples_of_the_batch():
    todo = [{"part": k, "start": 10 * k, "stop": min(10 * k + 10, 37), "retry": int(k == 2)} for k in range(4)]
    units = score_units(todo, 4)
    for t in todo:
        mine = [u for u in units if u["part"] == t["part"]]
        assert [u["start"] for u in mine][0] == t["start"] and mine[-1]["end"] == t["stop"]
        assert all(a["end"] == b["start"] for a, b in zip(mine, mine[1:]))  # no gap, no overlap
        assert all((u["start"] - t["start"]) % 4 == 0 for u in mine)
        assert all(u["first"] == t["start"] and u["stop"] == t["stop"] for u in mine)
    assert [u["end"] - u["start"] for u in units if u["part"] == 2] == [10]  # a retried part is one unit


def test_a_batch_row_gives_back_the_decoded_table(demo_set):
    """Images and every other column come back as decoded; a failed row's image (zeros) is not shipped."""
    rows = with_row_index(pq.read_table(demo_set["test"])).slice(0, 5)
    paths = rows.column("path").to_pylist()
    rows = rows.set_column(rows.schema.get_field_index("path"), "path", pa.array(paths[:2] + ["/missing.png"] +
                                                                               paths[3:]))
    decoded = decode_table(rows, SMALL["image_size"])
    assert decoded.column("error").null_count == 4 and len(decoded.images) == 4
    row = plane.batch_rows_table([plane.to_batch_row(
        decoded, {"part": 3, "first": 0, "stop": 9, "retry": 0, "offset": 4, "total": 9, "n": 5}, 0.1, "node")])
    assert row.num_rows == 1 and row["part"][0].as_py() == 3 and row["offset"][0].as_py() == 4
    back = plane.from_batch_row(row["meta"][0], row["pixels"][0], SMALL["image_size"])
    assert back.table.equals(decoded.table) and np.array_equal(back.images, decoded.images)
    assert len(row["pixels"][0].as_py()) == plane.batch_bytes(4, SMALL["image_size"])  # the 4 rows that decoded
    full = decode_batch({"path": np.array(rows.column("path").to_pylist(), dtype=object)}, SMALL["image_size"])
    np.testing.assert_array_equal(back.images, full["image"][[0, 1, 3, 4]])  # the images as the row-aligned decode


@pytest.mark.parametrize("where,problem", [
    ({"offset": 4, "total": 10, "n": 3}, "holds 3 rows \\(expected 4\\)"),  # a short batch where a full one belongs
    ({"offset": 8, "total": 10, "n": 4}, "holds 4 rows \\(expected 2\\)"),  # merged with the next part's rows
    ({"offset": 2, "total": 10, "n": 4}, "offset 2 is not a multiple of the batch size 4"),
])
def test_a_batch_of_the_wrong_rows_is_refused(where, problem):
    rows = pa.table({"row_index": pa.array(np.arange(where["n"], dtype=np.int64))})
    with pytest.raises(RuntimeError, match=problem):
        plane.check_batch({"part": 0, **where}, rows, 4)
    right = pa.table({"row_index": pa.array(np.arange(4, dtype=np.int64))})
    plane.check_batch({"part": 0, "offset": 4, "total": 10, "n": 4}, right, 4)  # the right one passes


def _marker_after_deaths(out, name, row):
    """A crash marker as two dead workers leave it: begun twice, the second time at ``row``."""
    marker = CrashMarker(out, name)
    state = marker.begin()
    marker.begin()
    marker.at({**state, "attempts": 2}, row)
    return marker


def test_decode_stage_skips_the_row_that_killed_its_worker_twice(demo_set, tmp_path):
    out = str(tmp_path)
    rows = with_row_index(pq.read_table(demo_set["test"])).slice(0, 6)
    marker = _marker_after_deaths(out, "unit", 3)
    tables = list(plane.decode_rows(rows, {"part": 0, "first": 0, "stop": 6, "retry": 0, "offset": 0, "total": 6}, 4,
                                    SMALL["image_size"], ReadPolicy(), marker))
    got = [d for t in tables for _, d in plane.checked_batches(t, SMALL["image_size"], 4)]
    errors = pa.concat_tables([d.table for d in got]).column("error").to_pylist()
    assert errors[3].startswith("WorkerCrash: the worker process died while reading or scoring this row (2 deaths")
    assert errors[:3] + errors[4:] == [None] * 5
    assert [t.num_rows for t in got] == [4, 2]  # the same batches as an undisturbed run
    assert not os.path.exists(marker.file)  # cleared when the unit is done


@pytest.mark.ray
def test_model_stage_skips_the_row_that_killed_its_worker_twice(fitted_small, demo_set, tmp_path):
    from rayanom.artifact import artifact_fingerprint
    from rayanom.stages import ScoreBatches, score_unit_rows

    artifact, out = fitted_small, str(tmp_path / "scores")
    info = index_at(tmp_path / "index.parquet", pq.read_table(demo_set["test"]).slice(0, 6))
    os.makedirs(out)
    artifact.save(os.path.join(out, "_rayanom_model"))
    scorer = ScoreBatches(os.path.join(out, "_rayanom_model"), artifact_fingerprint(artifact), artifact.weights,
                          "cpu", 1, "fp32", out, "job", 4, info)
    _marker_after_deaths(out, f"{part_name(0)}.batch-4", 5)
    units = pa.Table.from_pylist(score_units([{"part": 0, "start": 0, "stop": 6, "retry": 0}], 8))
    rows_of = functools.partial(score_unit_rows, index=info, output=out)
    for rows in plane.decode_units(units, rows_of, 4, artifact.config.image_size, ReadPolicy()):
        for i in range(rows.num_rows):  # calls of one batch each, as a plan with batches_per_call 1 makes them
            scorer(rows.slice(i, 1))
    errors = pq.read_table(os.path.join(out, part_name(0))).column("error").to_pylist()
    assert errors[5].startswith("WorkerCrash") and errors[:5] == [None] * 5
    assert not [n for n in os.listdir(out) if n.endswith(".crash.tmp")]


@pytest.mark.ray
def test_a_bf16_run_ships_half_the_bytes_and_scores_as_from_float32(fitted_small, demo_set, tmp_path):
    from rayanom.index import read_rows
    from rayanom.artifact import artifact_fingerprint
    from rayanom.stages import ScoreBatches, score_unit_rows

    artifact, out, size = fitted_small, str(tmp_path / "scores"), fitted_small.config.image_size
    info = index_at(tmp_path / "index.parquet", pq.read_table(demo_set["test"]).slice(0, 6))
    os.makedirs(out)
    artifact.save(os.path.join(out, "_rayanom_model"))
    scorer = ScoreBatches(os.path.join(out, "_rayanom_model"), artifact_fingerprint(artifact), artifact.weights,
                          "cpu", 1, "bf16", out, "job", 4, info)
    units = pa.Table.from_pylist(score_units([{"part": 0, "start": 0, "stop": 6, "retry": 0}], 8))
    rows_of = functools.partial(score_unit_rows, index=info, output=out)
    tables = list(plane.decode_units(units, rows_of, 4, size, ReadPolicy(), bf16=True))
    assert sum(len(p.as_py()) for t in tables for p in t["pixels"]) == plane.batch_bytes(6, size, bf16=True)
    for t in tables:
        scorer(t)
    got = pq.read_table(os.path.join(out, part_name(0))).column("anomaly_score").to_pylist()
    rows = read_rows(info, 0, 6)  # the same batches of float32 images, normalised on the same bf16 actor
    expected = [x for s in (0, 4) for x in scorer.scorer(decode_table(rows.slice(s, 4), size))["anomaly_score"]]
    assert got == [x.as_py() for x in expected]


@pytest.fixture(scope="module")
def fitted_small(ray_local, demo_set):
    from rayanom.config import DfkdeConfig, RunConfig
    from rayanom.features import resolve_weights
    from rayanom.index import describe_index
    from rayanom.workflows import fit

    config = DfkdeConfig(**SMALL)
    _, source = resolve_weights(config, None, False)
    return fit(describe_index(demo_set["index"]), config, source, RunConfig(batch_size=8, progress=False)).artifact


def _cluster_job(kind, demo_set, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAYANOM_FAKE_GPUS")}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "plane_cluster_job.py"), kind,
                           demo_set["index"], demo_set["test"], str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])


@pytest.mark.ray
@pytest.mark.timeout(480)
def test_decode_runs_on_cpu_nodes_and_the_model_on_gpu_nodes(demo_set, tmp_path):
    """GPU nodes with one CPU each (the actor's) and a CPU-only node: decode ran on the CPU-only node, every model
    call on the GPU nodes, nothing lost; scored again with a decode task killed mid-job, the same bits."""
    got = _cluster_job("gpu", demo_set, tmp_path)
    assert (got["rows"], got["failed"], got["actors"]) == (72, 0, 2)
    # Scored again, a decode task killed mid-job: Ray Data ran it again, every row scored, the same bits.
    assert len(got["killed"]) == 2 and got["killed"][1] == "rows 72 failed 0 same True", got["killed"]
    # Decode on the CPU-only node; a decode task may take a GPU node's one CPU before that node's actor starts (Ray's
    # placement: real GPU nodes have CPUs to spare, and decode may use them), never the model a CPU-only node.
    assert got["where"]["model"] == ["gpu"] and got["rows_on"]["model"] == {"cpu": 0, "gpu": 72}, got
    assert got["rows_on"]["decode"]["cpu"] > 36, got  # most of the rows


@pytest.mark.ray
@pytest.mark.timeout(480)
def test_a_cpu_only_cluster_sizes_its_pool_to_its_cpus(demo_set, tmp_path):
    """Three 2-CPU nodes and no GPU: three actors of 2 CPUs (2 threads) each, decode fused into them, and every node
    runs scoring work."""
    got = _cluster_job("cpu", demo_set, tmp_path)
    assert (got["rows"], got["failed"], got["actors"], got["cpus_per_actor"]) == (72, 0, 3, 2.0)
    assert got["where"] == {"decode": ["cpu"], "model": ["cpu"]} and got["model_nodes"] == 3, got
