"""Decisions: the threshold beside the model, is_anomalous and normalized_score, re-thresholding without scoring."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayanom.decisions import META_KEY, Threshold, decisions, with_decisions
from rayanom.workflows import threshold_from_val

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_decisions_follow_the_formula():
    scores = np.array([-3.0, 0.0, 2.0, 2.0 - 1e-12, 9.0, 1.0])
    scored = np.array([True, True, True, True, True, False])
    t = Threshold(2.0, -1.0, 5.0)
    anomalous, normalized = decisions(scores, scored, t)
    expected = [s >= 2.0 if ok else None for s, ok in zip(scores, scored)]
    assert anomalous.to_pylist() == expected
    direct = [min(1.0, max(0.0, (s - 2.0) / (5.0 - -1.0) + 0.5)) if ok else None for s, ok in zip(scores, scored)]
    assert normalized.to_pylist() == pytest.approx(direct)
    assert normalized.to_pylist()[2] == 0.5  # the threshold maps to 0.5
    a, n = decisions(scores, scored, Threshold(2.0))  # no statistics: decisions, no normalised score
    assert a.to_pylist() == expected and n.null_count == len(scores)
    a, n = decisions(scores, scored, None)
    assert a.null_count == n.null_count == len(scores)


def _scores_dir(path, rng, n=60, parts=3):
    """A scores directory as scoring writes it (the columns the decisions and the report read), in ``parts`` parts."""
    os.makedirs(path)
    labels = rng.integers(0, 2, n)
    scores = rng.normal(size=n) + 1.5 * labels
    split = np.where(np.arange(n) % 3 == 0, "val", "test")
    error = [None] * n
    error[5] = "OSError: gone"
    table = pa.table({"path": [f"/x/{i}.png" for i in range(n)], "label": labels, "split": split,
                      "row_index": np.arange(n), "anomaly_score": pa.array(scores, mask=np.arange(n) == 5),
                      "error": pa.array(error, pa.string())})
    per = -(-n // parts)
    for k in range(parts):
        pq.write_table(table.slice(k * per, per), os.path.join(path, f"part-{k:08d}.parquet"))
    return table


def test_threshold_from_val_is_the_best_f1_of_the_val_rows(tmp_path):
    table = _scores_dir(str(tmp_path / "s"), np.random.default_rng(0))
    t = threshold_from_val(str(tmp_path / "s"))
    val = [i for i, s in enumerate(table.column("split").to_pylist()) if s == "val" and i != 5]
    labels = table.column("label").to_numpy()[val]
    scores = table.column("anomaly_score").to_numpy(zero_copy_only=False)[val]

    def f1(c):  # predicted anomalous iff score >= c
        tp = int(((scores >= c) & (labels == 1)).sum())
        fp, fn = int(((scores >= c) & (labels == 0)).sum()), int(((scores < c) & (labels == 1)).sum())
        return 2 * tp / (2 * tp + fp + fn)

    best = max(f1(c) for c in scores)
    assert f1(t.value) == pytest.approx(best) and t.value == min(c for c in scores if f1(c) == pytest.approx(best))
    assert (t.min, t.max) == (scores.min(), scores.max())


@pytest.mark.ray
def test_new_threshold_rewrites_only_the_decisions(ray_local, tmp_path):
    from rayanom.parts import apply_to_parts

    out = str(tmp_path / "s")
    _scores_dir(out, np.random.default_rng(1))
    first, second = Threshold(0.5, -2.0, 3.0), Threshold(1.0, -2.0, 3.0, "manual")
    assert apply_to_parts(out, first) == 3
    originals = {k: pq.read_table(os.path.join(out, k)) for k in sorted(os.listdir(out))}
    assert apply_to_parts(out, first) == 0  # already decided with it: nothing read but the footers, nothing written
    assert apply_to_parts(out, second) == 3
    for name, before in originals.items():
        after = pq.read_table(os.path.join(out, name))
        assert after.equals(with_decisions(before, second))  # exactly as if decided with it in the first place
        assert after.drop_columns(["is_anomalous", "normalized_score"]).equals(
            before.drop_columns(["is_anomalous", "normalized_score"]))  # scores and every other column unchanged
        assert after.schema.metadata[META_KEY] == second.key()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_scoring_with_a_threshold_equals_rethresholding(ray_local, demo_set, tmp_path):
    from conftest import SMALL
    from rayanom import workflows
    from rayanom.config import DfkdeConfig, RunConfig
    from rayanom.parts import apply_to_parts
    from rayanom.features import resolve_weights
    from rayanom.index import describe_index

    config = DfkdeConfig(**SMALL)
    _, source = resolve_weights(config, None, False)
    artifact = workflows.fit(describe_index(demo_set["index"]), config, source, RunConfig(batch_size=8)).artifact
    info, run = describe_index(demo_set["test"]), RunConfig(batch_size=4, rows_per_part=5)
    scores = pq.read_table(demo_set["test"]).num_rows
    direct, redone = str(tmp_path / "direct"), str(tmp_path / "redone")
    t1 = Threshold(-5.0)
    summary = workflows.score(info, artifact, redone, run, threshold=t1)
    t2 = Threshold(float(np.median(pq.read_table(redone).column("anomaly_score").to_numpy())), -40.0, 10.0)
    workflows.score(info, artifact, direct, run, threshold=t2)
    assert summary["threshold"]["value"] == -5.0 and apply_to_parts(redone, t2) == -(-scores // 5)
    parts = sorted(n for n in os.listdir(direct) if n.startswith("part-"))
    for name in parts:
        assert pq.read_table(os.path.join(redone, name)).equals(pq.read_table(os.path.join(direct, name))), name
    decided = pq.read_table(direct).column("is_anomalous").to_pylist()
    assert 0 < sum(decided) < len(decided)


def test_the_threshold_is_not_part_of_the_models_identity(tmp_path):
    from rayanom.artifact import Artifact
    from rayanom.config import DfkdeConfig
    from rayanom.decisions import THRESHOLD_FILE, load_threshold, save_threshold
    from rayanom.heads import KdeHead
    from rayanom.artifact import artifact_fingerprint

    head = KdeHead(2).fit(np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32))
    artifact = Artifact(config=DfkdeConfig(n_pca_components=2), head=head, weights={"kind": "random", "seed": 0})
    model = str(tmp_path / "model")
    artifact.save(model)
    before = artifact_fingerprint(Artifact.load(model))
    save_threshold(model, Threshold(1.5, 0.0, 3.0, "F1-adaptive on 10 val rows"), before)
    assert artifact_fingerprint(Artifact.load(model)) == before
    assert load_threshold(model, before) == Threshold(1.5, 0.0, 3.0, "F1-adaptive on 10 val rows")
    assert load_threshold(model, "another model") is None  # chosen for another model: ignored
    artifact.save(model, overwrite=True)  # a refit replaces the model: its old threshold goes with it
    assert not os.path.exists(os.path.join(model, THRESHOLD_FILE))


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_fit_with_val_rows_then_a_new_threshold(demo_set, tmp_path):
    """fit.py on an index with a val split stores the threshold of those rows beside the model; fit.py --score
    decides every row with it; decide.py applies another one to the same scores, with a new report."""
    from rayanom.folders import mvtec_index, write_index

    index = str(tmp_path / "index.parquet")
    write_index(mvtec_index(os.path.join(demo_set["root"], "discs"), val_fraction=0.5, seed=0), index)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    small = ["--backbone", "resnet18", "--image-size", "64", "--n-pca-components", "4", "--no-pretrained",
             "--batch-size", "8", "--precision", "fp32", "--quiet"]
    run = str(tmp_path / "run")
    # Without --score: the fit index's own val rows are scored (OUT/val-scores) and choose the threshold.
    fit = subprocess.run([sys.executable, "jobs/fit.py", "--model", "dfkde", "--index", index, "--out", run, *small],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert fit.returncode == 0, fit.stderr[-3000:]
    stored = json.load(open(os.path.join(run, "model", "threshold.json")))
    n_val = pq.read_table(index).column("split").to_pylist().count("val")
    assert stored["source"] == f"F1-adaptive on {n_val} val rows"
    assert pq.read_table(os.path.join(run, "val-scores")).num_rows == n_val
    # With --score: the model and its stored threshold are reused, and every scored row is decided with it.
    fit = subprocess.run([sys.executable, "jobs/fit.py", "--model", "dfkde", "--index", index, "--out", run,
                          "--score", index, *small], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert fit.returncode == 0 and "model already fitted" in fit.stdout, fit.stderr[-3000:]
    assert json.load(open(os.path.join(run, "model", "threshold.json"))) == stored
    assert f"decisions: is_anomalous = anomaly_score >= {stored['value']:.6g} (F1-adaptive" in fit.stdout
    scores = pq.read_table(os.path.join(run, "scores"))
    ok = scores.column("error").is_null().to_numpy(zero_copy_only=False)
    assert scores.column("is_anomalous").is_valid().to_numpy(zero_copy_only=False).tolist() == ok.tolist()
    s = scores.column("anomaly_score").to_numpy(zero_copy_only=False)
    assert scores.column("is_anomalous").to_pylist() == [bool(v >= stored["value"]) for v in s]

    new = float(np.quantile(s, 0.8))
    decide = subprocess.run([sys.executable, "jobs/decide.py", "--scores", os.path.join(run, "scores"), "--threshold",
                             str(new), "--evaluate", "--quiet"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=200)
    assert decide.returncode == 0, decide.stderr[-3000:]
    again = pq.read_table(os.path.join(run, "scores"))
    assert again.column("is_anomalous").to_pylist() == [bool(v >= new) for v in s]
    assert again.column("anomaly_score").equals(scores.column("anomaly_score"))
    metrics = json.load(open(os.path.join(run, "scores-report", "metrics.json")))
    assert metrics["decision"]["threshold"] == new
