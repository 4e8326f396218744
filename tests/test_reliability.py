"""Reliability: hostile files end to end, worker and node loss, interrupted jobs, rejected inputs.

Every scoring run here must come out with exactly one row per input row (duplicates included), each with a finite
score and no error, or no score and a one-line error.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SMALL, index_at
from test_hostile import make_hostile

from rayanom import workflows
from rayanom.bank import ALL_KEYS
from rayanom.config import DfkdeConfig, RunConfig
from rayanom.decode import decode_table
from rayanom.features import device_kind, resolve_weights
from rayanom.index import describe_index, read_rows
from rayanom.parts import table_fingerprint
from rayanom.plane import FaultHooks
from rayanom.storage import ReadPolicy

pytestmark = [pytest.mark.ray, pytest.mark.timeout(400)]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_FLAGS = ["--backbone", "resnet18", "--image-size", "64", "--n-pca-components", "4", "--no-pretrained",
               "--batch-size", "4", "--quiet"]


def check_accounting(out: str, index: pa.Table) -> pa.Table:
    scores = pq.read_table(out).sort_by("row_index")
    assert scores.column("row_index").to_pylist() == list(range(index.num_rows))  # every row once, no gaps
    assert scores.column("path").to_pylist() == index.column("path").to_pylist()
    score, err = scores.column("anomaly_score"), scores.column("error").to_pylist()
    for s, e in zip(score.to_pylist(), err):
        assert (s is not None and np.isfinite(s) and e is None) or (s is None and e and "\n" not in e)
    return scores


@pytest.fixture(scope="module")
def model(ray_local, demo_set):
    config = DfkdeConfig(**SMALL)
    state, source = resolve_weights(config, None, False)
    result = workflows.fit(describe_index(demo_set["index"]), config, source, RunConfig(batch_size=8))
    return result.artifact


def test_hostile_files_end_to_end(model, tmp_path):
    artifact = model
    (tmp_path / "files").mkdir()
    cases = make_hostile(tmp_path / "files")
    index = pa.table({"path": pa.array([p for _, p, _ in cases] * 2, pa.string())})  # duplicates included
    out = str(tmp_path / "scores")
    summary = workflows.score(index_at(tmp_path / "index.parquet", index), artifact, out,
                             RunConfig(batch_size=4, rows_per_part=8, num_actors=2))
    scores = check_accounting(out, index)
    errors = scores.column("error").to_pylist()
    for i, (name, _, expected) in enumerate(cases * 2):
        assert (errors[i] is None) if expected is None else (expected in errors[i]), (name, errors[i])
    n_bad = 2 * sum(e is not None for _, _, e in cases)
    assert (summary["rows"], summary["failed"]) == (index.num_rows, n_bad)


def _kill_once(pattern: str, after, killed: list):
    """SIGKILL the first process whose command line contains ``pattern`` once ``after()`` is true."""
    deadline = time.time() + 120
    while time.time() < deadline and not killed:
        if after():
            for pid in os.listdir("/proc"):
                try:
                    cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
                except (OSError, ValueError):
                    continue
                if pid.isdigit() and pattern in cmd:
                    os.kill(int(pid), signal.SIGKILL)
                    killed.append(int(pid))
                    return
        time.sleep(0.05)


def _parts(out):
    return [n for n in os.listdir(out) if n.startswith("part-")] if os.path.isdir(out) else []


def _long_index(demo_set, copies=12):
    test = pq.read_table(demo_set["test"])
    return pa.concat_tables([test] * copies)  # 144 rows


def test_actor_killed_mid_job_loses_nothing(model, demo_set, tmp_path):
    artifact = model
    index = _long_index(demo_set)
    info = index_at(tmp_path / "long.parquet", index)
    run = RunConfig(batch_size=2, rows_per_part=4, num_actors=1)
    reference = str(tmp_path / "reference")
    workflows.score(info, artifact, reference, run)
    out, killed = str(tmp_path / "scores"), []
    killer = threading.Thread(target=_kill_once, args=("ScoreBatches", lambda: len(_parts(out)) >= 2,
                                                       killed))
    killer.start()
    workflows.score(info, artifact, out, run)
    killer.join()
    assert killed, "the scoring actor was never killed: the test did not test anything"
    assert len(_parts(out)) == 36
    assert check_accounting(out, index).equals(pq.read_table(reference).sort_by("row_index"))


def test_parts_do_not_depend_on_the_number_of_actors(model, demo_set, tmp_path):
    artifact = model
    info = index_at(tmp_path / "index.parquet", _long_index(demo_set, copies=2))  # 24 rows, 6 parts
    outs = []
    for actors in (1, 2):
        outs.append(str(tmp_path / f"scores-{actors}"))
        workflows.score(info, artifact, outs[-1], RunConfig(batch_size=3, rows_per_part=4, num_actors=actors))
    assert sorted(_parts(outs[0])) == sorted(_parts(outs[1])) and len(_parts(outs[0])) == 6
    for name in _parts(outs[0]):  # part by part, rows and values bit for bit
        assert pq.read_table(os.path.join(outs[0], name)).equals(pq.read_table(os.path.join(outs[1], name))), name
    k = 2  # each part's metadata holds the sha256 of the index rows it was computed from
    meta = pq.read_schema(os.path.join(outs[0], f"part-{k:08d}.parquet")).metadata
    assert meta[b"rayanom_input_sha256"].decode() == table_fingerprint(read_rows(info, 4 * k, 4 * k + 4))
    # and where and how it was scored: the device kind and the precision
    assert meta[b"rayanom_device"].decode() == device_kind("cpu") and device_kind("cpu").startswith("cpu: ")
    assert meta[b"rayanom_precision"] == b"fp32"


def test_broken_complete_parts_are_written_again(model, demo_set, tmp_path):
    """A resume trusts a complete part only when its footer agrees with its rows: one truncated to garbage, one with
    the wrong rows and one with a row missing are written again; the result equals the uninterrupted run."""
    artifact = model
    info = index_at(tmp_path / "index.parquet", _long_index(demo_set, copies=2))  # 24 rows, 6 parts
    run = RunConfig(batch_size=3, rows_per_part=4, num_actors=1)
    reference, out = str(tmp_path / "reference"), str(tmp_path / "scores")
    workflows.score(info, artifact, reference, run)
    workflows.score(info, artifact, out, run)
    part = [os.path.join(out, f"part-{k:08d}.parquet") for k in range(6)]
    with open(part[1], "wb") as f:
        f.write(b"PAR1 not a parquet file")
    pq.write_table(pq.read_table(part[2]), part[3])  # part 2's rows under part 3's name
    pq.write_table(pq.read_table(part[4]).slice(0, 3), part[4])
    stamps = {k: os.stat(part[k]).st_mtime_ns for k in (0, 5)}
    workflows.score(info, artifact, out, run)
    for name in _parts(reference):
        assert pq.read_table(os.path.join(out, name)).equals(pq.read_table(os.path.join(reference, name))), name
    assert all(os.stat(part[k]).st_mtime_ns == stamps[k] for k in stamps)  # the sound parts were kept


def test_unreadable_manifest_changes_nothing(model, demo_set, tmp_path):
    """A manifest that cannot be read is an error that asks for a re-run and never suggests --overwrite."""
    from rayanom.config import UserError

    artifact = model
    info = index_at(tmp_path / "index.parquet", _long_index(demo_set, copies=1))
    out = str(tmp_path / "scores")
    workflows.score(info, artifact, out, RunConfig(batch_size=3, rows_per_part=4))
    manifest = os.path.join(out, "_rayanom_scores.json")
    os.replace(manifest, str(tmp_path / "manifest.bak"))
    os.mkdir(manifest)  # reading it now fails (a directory), as an unreachable object would
    with pytest.raises(UserError, match="cannot read the scores manifest") as e:
        workflows.score(info, artifact, out, RunConfig(batch_size=3, rows_per_part=4))
    assert "--overwrite" not in str(e.value) and len(_parts(out)) == 3


def test_a_second_job_on_the_same_output_is_refused(model, demo_set, tmp_path):
    """Two jobs/score.py processes on one output: the second is refused before Ray starts while the first writes;
    the first finishes with every row."""
    artifact = model
    artifact.save(str(tmp_path / "model"))
    index = _long_index(demo_set)
    pq.write_table(index, tmp_path / "long.parquet")
    out = str(tmp_path / "scores")
    cmd = [sys.executable, "jobs/score.py", "--model-dir", str(tmp_path / "model"), "--index",
           str(tmp_path / "long.parquet"), "--out", out, "--rows-per-part", "4", "--batch-size", "2", "--quiet"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(out, "_rayanom_lease.json")) and time.time() < deadline:
            time.sleep(0.05)
        second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "the first job ended before the second started: nothing was tested"
    finally:
        out1, err1 = first.communicate(timeout=300)
    assert second.returncode == 2 and "is being written by another job" in second.stderr, second.stderr[-2000:]
    assert first.returncode == 0, err1[-3000:]
    check_accounting(out, index)
    assert not os.path.exists(os.path.join(out, "_rayanom_lease.json"))  # released at the end


def _poisoned_index(demo_set, tmp_path):
    """The 12 test rows with row 5 pointing to a copy of its image named ``poison.png``."""
    import shutil

    test = pq.read_table(demo_set["test"])
    paths = test.column("path").to_pylist()
    poison = str(tmp_path / "poison.png")
    shutil.copy(paths[5], poison)
    paths[5] = poison
    return test.set_column(test.schema.get_field_index("path"), "path", pa.array(paths))


def raise_on_poison(table, ok):
    """A model-stage fault (``FaultHooks.model``): a batch holding a decoded ``poison.png`` raises."""
    if any("poison.png" in str(p) for p, good in zip(table.column("path").to_pylist(), ok) if good):
        msg = "failpoint: a batch holding 'poison.png'"
        raise RuntimeError(msg)


def oom_above_two(table, ok):
    """A model-stage fault: the out-of-memory error CUDA raises, on batches of more than two images."""
    import torch

    if int(ok.sum()) > 2:
        msg = "CUDA out of memory (failpoint: more than 2 images in a batch)"
        raise torch.cuda.OutOfMemoryError(msg)


def exit_on_poison(rows):
    """A decode-stage fault (``FaultHooks.decode``): reading ``poison.png`` kills the worker process."""
    if any("poison.png" in str(p) for p in rows.column("path").to_pylist()):
        os._exit(77)


def _score_part(artifact, info, out, batch_size=4, hook=None):
    """Part 0 (the whole index) scored by the two stages as plain objects, without Ray: the decode stage's batch rows
    fed one by one to a ``ScoreBatches`` actor (``hook``: its model-stage fault), which joins the part when its last
    batch is in."""
    import functools

    from rayanom.artifact import artifact_fingerprint
    from rayanom.plane import decode_units
    from rayanom.stages import ScoreBatches, score_unit_rows, score_units

    os.makedirs(out)
    artifact.save(os.path.join(out, "_rayanom_model"))
    scorer = ScoreBatches(os.path.join(out, "_rayanom_model"), artifact_fingerprint(artifact), artifact.weights, "cpu",
                          1, "fp32", out, "job", batch_size, info, hook=hook)
    units = pa.Table.from_pylist(score_units([{"part": 0, "start": 0, "stop": info.n_rows, "retry": 0}], 2 * batch_size))
    rows_of = functools.partial(score_unit_rows, index=info, output=out)
    written = [w for rows in decode_units(units, rows_of, batch_size, artifact.config.image_size, ReadPolicy())
               for w in scorer(rows)["written"].to_pylist()]
    assert written[-1] == info.n_rows and not any(written[:-1])  # the last batch in joins the part
    return scorer, pq.read_table(os.path.join(out, "part-00000000.parquet"))


def test_a_failing_batch_is_split_down_to_the_row_that_fails(model, demo_set, tmp_path):
    from rayanom.heads import BATCH_RTOL

    artifact = model
    info = index_at(tmp_path / "index.parquet", _poisoned_index(demo_set, tmp_path))
    _, clean = _score_part(artifact, info, str(tmp_path / "clean"))
    _, got = _score_part(artifact, info, str(tmp_path / "failing"), hook=raise_on_poison)
    errors = got.column("error").to_pylist()
    assert errors[5] == "RuntimeError: failpoint: a batch holding 'poison.png'" and got["anomaly_score"][5].as_py() is None
    assert errors[:5] + errors[6:] == [None] * 11
    a, b = np.array(clean["anomaly_score"].to_pylist(), dtype=float), got["anomaly_score"].to_pylist()
    keep = [i for i in range(12) if i != 5]
    np.testing.assert_allclose([b[i] for i in keep], a[keep], rtol=BATCH_RTOL)
    assert [b[i] for i in (0, 1, 2, 3, 8, 9, 10, 11)] == a[[0, 1, 2, 3, 8, 9, 10, 11]].tolist()  # other batches: bits


def test_fit_actor_narrows_a_failing_batch_to_its_row(model, demo_set, tmp_path):
    from rayanom.heads import BATCH_RTOL
    from rayanom.stages import BankFeatures

    artifact = model
    index = _poisoned_index(demo_set, tmp_path).append_column("row_index", pa.array(np.arange(12, dtype=np.int64)))
    rows = decode_table(index.slice(4, 4).select(["row_index", "path"]), artifact.config.image_size)  # row 5 poisoned
    actor = BankFeatures(artifact.config, artifact.weights, 1, "cpu", 1, batch_size=4)
    clean = actor.items(rows, 0.0, ALL_KEYS)
    actor.hook = raise_on_poison
    got = actor.items(rows, 0.0, ALL_KEYS)
    assert got["failed_rows"].tolist() == [5]
    assert got["errors"].tolist() == ["RuntimeError: failpoint: a batch holding 'poison.png'"]
    assert got["bank_id"].tolist() == [4, 6, 7] and clean["bank_id"].tolist() == [4, 5, 6, 7]
    np.testing.assert_allclose(got["features"], clean["features"][[0, 2, 3]], rtol=BATCH_RTOL, atol=1e-6)


def test_out_of_memory_lowers_the_actors_batch_size(model, demo_set, tmp_path):
    from rayanom.heads import BATCH_RTOL

    artifact = model
    info = index_at(tmp_path / "index.parquet", pq.read_table(demo_set["test"]))
    _, clean = _score_part(artifact, info, str(tmp_path / "clean"))
    scorer, got = _score_part(artifact, info, str(tmp_path / "oom"), hook=oom_above_two)
    assert scorer.max_batch == 2 and got.column("error").to_pylist() == [None] * 12
    np.testing.assert_allclose(got["anomaly_score"].to_pylist(), clean["anomaly_score"].to_pylist(), rtol=BATCH_RTOL)


@pytest.mark.timeout(600)
def test_a_row_that_kills_its_worker_is_recorded_and_the_job_finishes(model, demo_set, tmp_path):
    """A row whose reading kills its worker (a decode hook that ends the process) kills it again in row-by-row mode,
    then is skipped with a WorkerCrash error; the job finishes, every other row scored, no crash marker left."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import a test module by name
    index = _poisoned_index(demo_set, tmp_path)
    out = str(tmp_path / "scores")
    run = RunConfig(rows_per_part=4, batch_size=2, num_actors=1)
    summary = workflows.score(index_at(tmp_path / "index.parquet", index), model, out, run,
                              hooks=FaultHooks(decode=exit_on_poison))
    scores = check_accounting(out, index)
    errors = scores.column("error").to_pylist()
    assert errors[5].startswith("WorkerCrash: the worker process died while reading or scoring this row")
    assert errors[:5] + errors[6:] == [None] * 11
    assert (summary["scored"], summary["rows"], summary["failed_by_kind"]) == (11, 12, {"WorkerCrash": 1})
    assert not [n for n in os.listdir(out) if n.endswith(".crash.tmp")]


def test_retry_failed_rescores_exactly_the_failed_rows(model, demo_set, tmp_path):
    """Rows whose files were unreachable are scored again once they are back; every other row keeps its bits, and
    parts without a failed row are not rewritten."""
    import shutil

    from rayanom.heads import BATCH_RTOL

    artifact = model
    test = pq.read_table(demo_set["test"])
    paths = test.column("path").to_pylist()
    later = {2: str(tmp_path / "later-2.png"), 9: str(tmp_path / "later-9.png")}  # parts 0 and 2 of 3
    moved = test.set_column(test.schema.get_field_index("path"), "path",
                            pa.array([later.get(i, p) for i, p in enumerate(paths)]))
    info = index_at(tmp_path / "index.parquet", moved)
    run = RunConfig(batch_size=2, rows_per_part=4, num_actors=1)
    out = str(tmp_path / "scores")
    first = workflows.score(info, artifact, out, run)
    assert first["failed"] == 2 and first["failed_by_kind"] == {"FileNotFoundError": 2}
    before = {k: pq.read_table(os.path.join(out, f"part-{k:08d}.parquet")) for k in range(3)}
    stamp = os.stat(os.path.join(out, "part-00000001.parquet")).st_mtime_ns
    for i, p in later.items():
        shutil.copy(paths[i], p)
    again = workflows.score(info, artifact, out, run, retry_failed=True)
    assert again["failed"] == 0
    assert os.stat(os.path.join(out, "part-00000001.parquet")).st_mtime_ns == stamp
    clean = str(tmp_path / "clean")
    workflows.score(info, artifact, clean, run)
    for k in (0, 2):
        got = pq.read_table(os.path.join(out, f"part-{k:08d}.parquet"))
        ref = pq.read_table(os.path.join(clean, f"part-{k:08d}.parquet"))
        retried = [i - 4 * k for i in later if i // 4 == k]
        others = [i for i in range(4) if i not in retried]
        assert got.take(others).equals(before[k].take(others))  # untouched rows: bit for bit
        assert got.column("error").to_pylist() == [None] * 4
        np.testing.assert_allclose(got.take(retried)["anomaly_score"].to_pylist(),
                                   ref.take(retried)["anomaly_score"].to_pylist(), rtol=BATCH_RTOL)


def test_interrupted_score_job_resumes_to_the_same_output(demo_set, tmp_path):
    run_dir = str(tmp_path / "run")
    fit = subprocess.run([sys.executable, "jobs/fit.py", "--model", "dfkde", "--index", demo_set["index"],
                          "--out", run_dir, *SMALL_FLAGS], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert fit.returncode == 0, fit.stderr[-3000:]
    index_path = str(tmp_path / "long.parquet")
    index = _long_index(demo_set)
    pq.write_table(index, index_path)
    cmd = [sys.executable, "jobs/score.py", "--model-dir", os.path.join(run_dir, "model"), "--index", index_path,
           "--batch-size", "2", "--rows-per-part", "4", "--quiet", "--out"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full = subprocess.run(cmd + [str(tmp_path / "full")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]
    out = str(tmp_path / "interrupted")
    proc = subprocess.Popen(cmd + [out], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 240
    while len(_parts(out)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray die halfway
    proc.wait(timeout=60)
    before = {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in _parts(out)}
    assert 3 <= len(before) < 36, len(before)
    again = subprocess.run(cmd + [out], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"scored {index.num_rows} of {index.num_rows} rows" in again.stdout
    assert len(_parts(out)) == 36
    assert all(os.stat(os.path.join(out, n)).st_mtime_ns == t for n, t in before.items())  # kept, not redone
    assert check_accounting(out, index).equals(pq.read_table(str(tmp_path / "full")).sort_by("row_index"))


def test_max_failed_fraction_exits_2_after_writing_everything(demo_set, tmp_path):
    test = pq.read_table(demo_set["test"])
    index = pa.table({"path": test.column("path").to_pylist() + [str(tmp_path / "gone.png")] * 2})
    pq.write_table(index, str(tmp_path / "index.parquet"))
    run_dir = str(tmp_path / "run")
    proc = subprocess.run([sys.executable, "jobs/fit.py", "--model", "dfkde", "--index", demo_set["index"],
                           "--out", run_dir, "--score", str(tmp_path / "index.parquet"), *SMALL_FLAGS,
                           "--max-failed-fraction", "0.1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "2 of 14 scored rows failed (14.3%), more than --max-failed-fraction 0.1" in proc.stderr
    check_accounting(os.path.join(run_dir, "scores"), index)


@pytest.mark.parametrize("make,message", [
    (lambda t: t.set_column(t.schema.get_field_index("split"), "split", pa.array(["test"] * t.num_rows)),
     "0 normal training rows"),
    (lambda t: t.slice(0, 3), "needs at least 5"),
])
def test_training_set_too_small_is_rejected_before_any_output(demo_set, tmp_path, make, message):
    """Counted on the workers (the driver does not read the index), before an image is read or a file written."""
    path = str(tmp_path / "index.parquet")
    pq.write_table(make(pq.read_table(demo_set["index"])), path)
    proc = subprocess.run([sys.executable, "jobs/fit.py", "--model", "dfkde", "--index", path, "--out",
                           str(tmp_path / "r"), *SMALL_FLAGS], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not os.path.exists(tmp_path / "r" / "model")


@pytest.mark.timeout(500)
def test_node_lost_mid_job_loses_nothing(demo_set, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "node_loss_job.py"), demo_set["index"],
                           demo_set["test"], str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=450)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REMOVED True ROWS 144 FAILED 0" in proc.stdout, proc.stdout[-2000:]
    index = _long_index(demo_set)
    scores = check_accounting(str(tmp_path / "scores"), index)
    assert scores.equals(pq.read_table(str(tmp_path / "ref")).sort_by("row_index"))


class Stuck:
    """A model stage that sleeps ``seconds`` on every batch."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, row):
        time.sleep(self.seconds)
        return row.select(["part", "n"])


def one_row_unit(unit):
    rows = pa.table({"row_index": pa.array([unit["part"]], pa.int64()), "path": pa.array(["/nonexistent.png"])})
    return rows, {"part": unit["part"], "first": 0, "stop": 1, "retry": 0, "offset": 0, "total": 1}


def test_a_stalled_plane_ends_with_an_error(ray_local):
    """A model stage where no batch finishes within --no-progress-timeout raises, naming the stage and the flag; the
    same stage that keeps moving gives every unit's batch back."""
    from ray import cloudpickle

    from rayanom.plane import Plan, run

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import a test module by name
    decode = {"rows_of": one_row_unit, "batch_size": 1, "image_size": (8, 8), "policy": ReadPolicy()}
    units = [{"part": i} for i in range(7)]
    quick = Plan(num_actors=2, batches_per_call=1, num_cpus=0.5, num_gpus=0, memory=2**28, no_progress_s=60, start_timeout_s=120)
    got = pa.concat_tables(run(units, decode, Stuck, {"seconds": 0.0}, quick, progress=False))
    assert sorted(got.column("part").to_pylist()) == list(range(7))
    stuck = Plan(num_actors=1, batches_per_call=1, num_cpus=0.5, num_gpus=0, memory=2**28, no_progress_s=3, start_timeout_s=120)
    with pytest.raises(RuntimeError, match=r"no progress for 3 s in the Stuck plane \(raise --no-progress-timeout"):
        list(run(units, decode, Stuck, {"seconds": 60.0}, stuck, progress=False))
