"""End to end on a local Ray: fit and score against an in-process reference, determinism, row accounting, CLI."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SMALL, index_at

from rayanom import workflows
from rayanom.artifact import Artifact
from rayanom.bank import row_keys
from rayanom.config import DfkdeConfig, RunConfig
from rayanom.decode import decode_image
from rayanom.features import FeatureExtractor, resolve_weights
from rayanom.heads import BATCH_RTOL, KdeHead, anomaly_probability
from rayanom.index import describe_index, read_index, training_rows, with_row_index

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _features(config, state, paths):
    images = np.stack([decode_image(open(p, "rb").read(), config.image_size) for p in paths])
    return FeatureExtractor(config, state)(images)


@pytest.fixture(scope="module")
def fitted(ray_local, demo_set):
    config = DfkdeConfig(**{**SMALL, "max_training_points": 12})
    state, source = resolve_weights(config, None, False)
    index = read_index(demo_set["index"])
    result = workflows.fit(describe_index(demo_set["index"]), config, source,
                          RunConfig(batch_size=5, num_actors=1))
    return config, state, index, result


def test_fit_equals_in_process_reference(fitted):
    config, state, index, result = fitted
    train = training_rows(with_row_index(index))
    assert result.n_train == 24 and result.n_failed == 0 and result.n_read == 12  # only the bank's rows are read
    ids = train.column("row_index").to_numpy()
    bank_ids = np.sort(ids[np.argsort(row_keys(ids, config.seed))[:12]])  # the 12 smallest keys: uniform subset
    assert result.artifact.provenance["n_bank_rows"] == 12 and result.artifact.provenance["n_read_rows"] == 12
    paths = index.column("path").to_numpy(zero_copy_only=False)[bank_ids]
    # The pipeline's batches: the rows read, in row order, 5 at a time; so the same features, bit for bit.
    feats = np.concatenate([_features(config, state, paths[i:i + 5]) for i in range(0, 12, 5)])
    ref = KdeHead(config.n_pca_components, config.feature_scaling).fit(feats).to_arrays()
    ours = result.artifact.head.to_arrays()
    assert ours.keys() == ref.keys() and all(np.array_equal(ours[k], ref[k]) for k in ref)


def test_fit_reads_only_rows_that_can_enter_the_bank(ray_local, demo_set, tmp_path):
    """Rows outside the bank's keys point to files that do not exist: reading one would fail it. Then two of the bank's
    rows are missing too: a second pass tops the bank up to the 12 smallest keys of the rows that decode."""
    config = DfkdeConfig(**{**SMALL, "max_training_points": 12})
    state, source = resolve_weights(config, None, False)
    index = read_index(demo_set["index"])
    col = index.column_names.index("path")
    train = training_rows(with_row_index(index))
    ids = train.column("row_index").to_numpy()
    by_key = ids[np.argsort(row_keys(ids, config.seed))]
    paths = index.column("path").to_pylist()
    unread = [str(tmp_path / f"never-read-{r}.png") if r in by_key[12:] else p for r, p in enumerate(paths)]
    run = RunConfig(batch_size=5, num_actors=1)
    result = workflows.fit(index_at(tmp_path / "unread.parquet", index.set_column(col, "path", pa.array(unread))),
                          config, source, run)
    assert (result.n_read, result.n_failed, result.artifact.provenance["n_bank_rows"]) == (12, 0, 12)

    broken = by_key[[2, 7]]  # two of the 12 smallest keys
    missing = [str(tmp_path / f"missing-{r}.png") if r in broken else p for r, p in enumerate(paths)]
    result = workflows.fit(index_at(tmp_path / "missing.parquet", index.set_column(col, "path", pa.array(missing))),
                          config, source, run)
    assert result.n_failed == 2 and sorted(r for r, _ in result.failures) == sorted(broken.tolist())
    assert 12 < result.n_read <= 24
    expected = np.sort(by_key[~np.isin(by_key, broken)][:12])  # brute force: the 12 smallest keys that decode
    expected_sha = hashlib.sha256(np.ascontiguousarray(expected, dtype=np.int64).tobytes()).hexdigest()
    assert result.artifact.provenance["bank_row_index_sha256"] == expected_sha
    ref = KdeHead(config.n_pca_components, config.feature_scaling).fit(
        _features(config, state, np.array(paths)[expected]))
    query = np.random.default_rng(0).normal(size=(7, 512)).astype(np.float32)
    np.testing.assert_allclose(result.artifact.head.score_samples(query), ref.score_samples(query), rtol=BATCH_RTOL)


def test_same_artifact_with_one_or_two_actors(fitted, demo_set):
    config, state, index, result = fitted
    run = RunConfig(batch_size=5, num_actors=2, rows_per_part=10)  # chunks of 10 rows: both actors fit
    other = workflows.fit(describe_index(demo_set["index"]), config, {"kind": "random", "seed": 0}, run)
    a, b = result.artifact.head.to_arrays(), other.artifact.head.to_arrays()
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert result.artifact.provenance["bank_row_index_sha256"] == other.artifact.provenance["bank_row_index_sha256"]


def test_score_accounts_for_every_row(fitted, demo_set, tmp_path):
    config, state, _, result = fitted
    test = pq.read_table(demo_set["test"])
    good = test.column("path").to_pylist()
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(open(good[0], "rb").read()[:200])
    paths = good + [str(tmp_path / "missing.png"), str(corrupt), good[1], None]
    n = len(paths)
    index = pa.table({
        "path": pa.array(paths, pa.string()),
        "label": pa.array([*test.column("label").to_pylist(), 0, 1, 1, 0], pa.int64()),
        "item_id": pa.array([f"id-{i}" for i in range(n)]),
        "weight": pa.array([None if i % 3 == 0 else i * 0.5 for i in range(n)], pa.float32()),
    })
    out = str(tmp_path / "scores")
    summary = workflows.score(index_at(tmp_path / "index.parquet", index), result.artifact, out,
                             RunConfig(batch_size=4, num_actors=2))
    assert (summary["rows"], summary["scored"], summary["failed"]) == (n, n - 3, 3)
    scores = pq.read_table(out).sort_by("row_index")
    assert scores.column_names == ["path", "label", "item_id", "weight", "row_index", "anomaly_score",
                                   "anomaly_probability", "is_anomalous", "normalized_score", "error"]
    assert scores.column("is_anomalous").null_count == n  # scored without a threshold: no decisions
    assert scores.column("row_index").to_pylist() == list(range(n))
    for name in index.column_names:  # every input column unchanged, types included
        assert scores.column(name).combine_chunks().equals(index.column(name).combine_chunks()), name
    err, score = scores.column("error").to_pylist(), scores.column("anomaly_score").to_numpy(zero_copy_only=False)
    assert [e is None for e in err] == [True] * (n - 4) + [False, False, True, False]
    assert "missing" in err[n - 4] and err[n - 3] and err[n - 1] == "ValueError: empty path"
    ok = np.array([e is None for e in err])
    assert np.isfinite(score[ok]).all() and np.isnan(score[~ok]).all()
    # The batch contract (heads.BATCH_RTOL): in the pipeline's batches (blocks of 4 from row 0) bit-identical, in
    # any other batch within tolerance.
    head = result.artifact.head
    ref = np.concatenate([-head.score_samples(_features(config, state, good[i:i + 4])) for i in range(0, n - 4, 4)])
    np.testing.assert_array_equal(score[: n - 4], ref)
    np.testing.assert_allclose(score[: n - 4], -head.score_samples(_features(config, state, good)), rtol=BATCH_RTOL,
                               atol=BATCH_RTOL)
    assert abs(score[n - 2] - score[1]) <= BATCH_RTOL * (1 + abs(score[1]))  # the duplicate path, in another batch
    prob = scores.column("anomaly_probability").to_numpy(zero_copy_only=False)
    np.testing.assert_allclose(prob[ok], anomaly_probability(-score[ok]), rtol=1e-12)


def _job(*args, timeout=280):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_fit_py_with_score_then_score_py(demo_set, tmp_path):
    small = ["--backbone", "resnet18", "--image-size", "64", "--n-pca-components", "4", "--no-pretrained",
             "--batch-size", "8", "--precision", "fp32", "--quiet"]  # score.py's auto precision follows the model
    run_dir = str(tmp_path / "run")
    fit = _job("jobs/fit.py", "--model", "dfkde", "--index", demo_set["index"], "--out", run_dir,
               "--score", demo_set["test"], "--evaluate", *small)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "scored 12 of 12 rows, 0 failed, image AUROC" in fit.stdout
    # The report of OUT/scores is OUT/scores-report, as every job's report of a scores directory S is S-report.
    assert os.path.isfile(os.path.join(run_dir, "scores-report", "metrics.json"))
    assert not os.path.exists(os.path.join(run_dir, "report"))
    model = Artifact.load(os.path.join(run_dir, "model"))
    assert model.provenance["n_train_rows"] == 24 and model.weights == {"kind": "random", "seed": 0}
    again = _job("jobs/score.py", "--model-dir", os.path.join(run_dir, "model"), "--index", demo_set["test"],
                 "--out", str(tmp_path / "scores2"), "--evaluate", "--quiet")
    assert again.returncode == 0, again.stderr[-3000:]
    # Ray's line for actors whose constructor arguments are in the object store (Ray Data's pools pass their context by
    # reference, held by the driver): logged once per job process, however many actors and pools (fit: 2 pools).
    for proc in (fit, again):
        assert proc.stderr.count("constructor arguments in the object store") <= 1, proc.stderr[-3000:]
    metrics = json.load(open(tmp_path / "scores2-report" / "metrics.json"))
    assert (metrics["rows"], metrics["scored"], metrics["n_normal"], metrics["n_anomalous"]) == (12, 12, 6, 6)
    assert json.load(open(tmp_path / "scores2" / "_rayanom_scores.json"))["precision"] == "fp32"  # as fitted
    assert open(tmp_path / "scores2-report" / "report.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    first = pq.read_table(os.path.join(run_dir, "scores")).sort_by("row_index")
    second = pq.read_table(str(tmp_path / "scores2")).sort_by("row_index")
    assert first.equals(second)  # a reloaded artifact in a new process gives bit-identical scores


@pytest.mark.parametrize("args,message", [
    (["--n-pca-components", "0"], "invalid --n-pca-components=0: expected an integer >= 1"),
    (["--layers", "layer7"], "invalid --layers=['layer7']"),
    (["--index", "/nonexistent/index.parquet", "--out", "x"], "cannot read index '/nonexistent/index.parquet'"),
    (["--weights", "/nonexistent/w.pth"], "invalid --weights='/nonexistent/w.pth'"),
])
def test_user_errors_exit_2_without_traceback(demo_set, tmp_path, args, message):
    base = ["jobs/fit.py", "--model", "dfkde", "--backbone", "resnet18", "--quiet"]
    if "--index" not in args:
        base += ["--index", demo_set["index"], "--out", str(tmp_path / "r")]
    proc = _job(*base, *args, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_rkde_refuses_bf16_before_ray_starts(demo_set, tmp_path):
    proc = _job("jobs/fit.py", "--model", "rkde", "--index", demo_set["index"], "--out", str(tmp_path / "r"),
                "--precision", "bf16", "--no-pretrained", "--quiet", timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "invalid --precision='bf16' for rkde" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "r" / "model")


def test_dfm_fit_and_score_with_maps(ray_local, demo_set, tmp_path):
    from rayanom.config import DfmConfig
    from rayanom.heads import DfmHead
    from rayanom.maps import anomaly_map, write_heatmaps

    config = DfmConfig(backbone="resnet18", layer="layer3", pooling_kernel_size=2, pca_level=0.97,
                       image_size=(64, 64))
    state, source = resolve_weights(config, None, False)
    index = read_index(demo_set["index"])
    result = workflows.fit(describe_index(demo_set["index"]), config, source,
                          RunConfig(batch_size=5, num_actors=2))
    train = training_rows(with_row_index(index))
    ref = DfmHead(0.97, "fre").fit(_features(config, state, train.column("path").to_pylist()))
    assert np.array_equal(np.abs(result.artifact.head.pca_.components_).shape, ref.pca_.components_.shape)
    out = str(tmp_path / "scores")
    summary = workflows.score(describe_index(demo_set["test"]), result.artifact, out, RunConfig(batch_size=4))
    assert (summary["rows"], summary["failed"]) == (12, 0)
    rows = pq.read_table(out).sort_by("row_index").to_pylist()
    test_paths = [r["path"] for r in rows]
    np.testing.assert_allclose([r["anomaly_score"] for r in rows],
                               ref.anomaly_scores(_features(config, state, test_paths)), rtol=1e-6)
    for r in rows:
        assert r["anomaly_map_shape"] == [2, 2] and (r["image_height"], r["image_width"]) == (96, 96)
        assert np.sum(r["anomaly_map"]) == pytest.approx(r["anomaly_score"], rel=1e-5)  # the map sums to the FRE
        assert anomaly_map(r, (r["image_height"], r["image_width"])).shape == (96, 96)
    files = write_heatmaps(out, str(tmp_path / "heat"), 3)
    assert len(files) == 3 and all(open(f, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for f in files)
    best = max(rows, key=lambda r: r["anomaly_score"])
    assert f"_row{best['row_index']}_" in files[0]
    # Pixel metrics of the report (parts summarised by Ray tasks, merged on the driver) against scikit-learn on the
    # pixels: each map upsampled to the model's input size, each mask read and resized by nearest neighbour here.
    from PIL import Image
    from sklearn.metrics import roc_auc_score

    from rayanom.report import evaluate

    metrics = evaluate(out, str(tmp_path / "report"), pixel_size=(64, 64))
    maps = np.stack([anomaly_map(r, (64, 64)) for r in rows])
    pick = np.floor(np.arange(64) * 96 / 64).astype(int)  # torch's "nearest" (anomalib's mask resize): floor(i s)
    masks = np.stack([np.zeros((64, 64), bool) if r["mask_path"] is None else
                      (np.asarray(Image.open(r["mask_path"]).convert("L")) > 0)[np.ix_(pick, pick)] for r in rows])
    px = metrics["pixel"]
    assert (px["images"], px["left_out"]["no_mask"]) == (12, 0) and px["regions"] >= 6
    assert abs(px["pixel_auroc"] - roc_auc_score(masks.ravel(), maps.ravel())) <= px["pixel_auroc_error_bound"] + 1e-6


@pytest.mark.parametrize("args,message", [
    (["--model", "rkde", "--layers", "layer3"], "invalid --layers: it applies to --model dfkde or dfm, not rkde"),
    (["--model", "dfm", "--pca-level", "1"], "invalid --pca-level=1"),
    (["--model", "dfkde", "--heatmaps", "3", "--score", "TEST"], "heat maps need a DFM model with --score-type 'fre'"),
    (["--model", "rkde", "--backbone", "resnet18"], "invalid --backbone: it applies to --model dfkde or dfm, not rkde"),
    (["--model", "dfm", "--boxes", "2", "--score", "TEST"],
     "invalid --boxes=2, --region-rows=False: they need an RKDE"),
    (["--model", "rkde", "--roi-stage", "fast"], "argument --roi-stage: invalid choice"),
    (["--model", "rkde", "--iou-threshold", "1.5"], "invalid --iou-threshold=1.5: expected a number in [0, 1]"),
    (["--model", "rkde", "--detector-weights", "/nonexistent.pth"], "invalid --detector-weights='/nonexistent.pth'"),
])
def test_model_specific_flags(demo_set, tmp_path, args, message):
    args = [demo_set["test"] if a == "TEST" else a for a in args]
    proc = _job("jobs/fit.py", "--index", demo_set["index"], "--out", str(tmp_path / "r"), "--quiet", *args,
                timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def rkde_set(tmp_path_factory):
    from rayanom.demo import make_demo

    root = tmp_path_factory.mktemp("rkde")
    index = make_demo(str(root), n_train=5, n_test_normal=2, n_test_anomalous=2, size=96, seed=2)
    return {"index": index, "test": os.path.join(str(root), "test.parquet")}


@pytest.mark.timeout(600)
def test_rkde_fit_and_score_regions(ray_local, rkde_set, tmp_path):
    from rayanom.config import RkdeConfig
    from rayanom.regions import RegionModel, boxes_to_original, rkde_weights

    config = RkdeConfig(n_pca_components=4, max_training_points=60)
    state, source = rkde_weights(config, None, None)
    index = read_index(rkde_set["index"])
    result = workflows.fit(describe_index(rkde_set["index"]), config, source,
                          RunConfig(batch_size=2, num_actors=1))
    model = RegionModel(state["detector"], state["region"])
    train = training_rows(with_row_index(index))
    images = np.stack([decode_image(open(p, "rb").read(), (240, 360)) for p in train.column("path").to_pylist()])
    regions = model(images)
    n_regions = sum(len(b) for b, _ in regions)
    assert result.artifact.provenance["n_bank_rows"] == min(60, n_regions)  # regions, capped, uniform by key
    # Scoring: one row per image; boxes in original pixels; the image score is the largest region score.
    out = str(tmp_path / "scores")
    summary = workflows.score(describe_index(rkde_set["test"]), result.artifact, out, RunConfig(batch_size=2, num_actors=1))
    assert (summary["rows"], summary["failed"]) == (4, 0)
    rows = pq.read_table(out).sort_by("row_index").to_pylist()
    test_images = np.stack([decode_image(open(r["path"], "rb").read(), (240, 360)) for r in rows])
    reference = model(test_images[:2]) + model(test_images[2:])  # the actor's batches: the detector is batch-sensitive
    for row, (boxes, feats) in zip(rows, reference):
        assert row["num_regions"] == len(boxes) == len(row["boxes"]) == len(row["box_scores"])
        # The actor runs one torch thread, this process two: ~1e-5 relative, as the scores below (1.5e-5 measured on
        # an AMD EPYC: 81.5406 against 81.5418 px).
        np.testing.assert_allclose(row["boxes"], boxes_to_original(boxes, original_size=(96, 96)), rtol=1e-4,
                                   atol=1e-3)
        ld = result.artifact.head.score_samples(feats)
        assert row["anomaly_score"] == pytest.approx((-ld).max(), rel=1e-4)  # thread counts differ: ~1e-5
        assert row["anomaly_probability"] == pytest.approx(max(row["box_scores"]), rel=1e-12)
        assert all(0 <= x <= 96 for box in row["boxes"] for x in box)
    # Tiny, very elongated and region-less images score without errors and are counted correctly.
    import dataclasses

    from PIL import Image

    for name, size in (("one_pixel.png", (1, 1)), ("strip.png", (4000, 3))):
        Image.new("RGB", size, "gray").save(tmp_path / name)
    odd = index_at(tmp_path / "odd.parquet",
                   pa.table({"path": [str(tmp_path / "one_pixel.png"), str(tmp_path / "strip.png"), rows[0]["path"]]}))
    no_regions = dataclasses.replace(result.artifact, config=dataclasses.replace(config, roi_score_threshold=1.0))
    for artifact, out_name in ((result.artifact, "odd"), (no_regions, "none")):
        workflows.score(odd, artifact, str(tmp_path / out_name), RunConfig(batch_size=3))
        scored = pq.read_table(str(tmp_path / out_name)).sort_by("row_index").to_pylist()
        assert [r["error"] for r in scored] == [None] * 3
        for r, (h, w) in zip(scored, [(1, 1), (3, 4000), (96, 96)]):
            assert r["num_regions"] == len(r["boxes"]) == len(r["box_scores"])
            assert all(0 <= b[0] <= b[2] <= w and 0 <= b[1] <= b[3] <= h for b in r["boxes"])
            if artifact is no_regions:
                assert r["num_regions"] == 0 and r["anomaly_score"] == np.finfo(np.float64).min
                assert r["anomaly_probability"] == 0.0


def test_refit_is_skipped_for_the_same_inputs_and_precision(demo_set, tmp_path):
    flags = ["jobs/fit.py", "--model", "dfkde", "--index", demo_set["index"], "--out", str(tmp_path / "r"),
             "--backbone", "resnet18", "--image-size", "64", "--n-pca-components", "4", "--no-pretrained", "--quiet"]
    first = _job(*flags, "--precision", "fp32")
    assert first.returncode == 0 and "fitted dfkde" in first.stdout, first.stderr[-2000:]
    for precision in ("fp32", "auto"):  # auto reuses whatever precision the model was fitted in
        again = _job(*flags, "--precision", precision)
        assert again.returncode == 0 and "model already fitted" in again.stdout, again.stderr[-2000:]
    other = _job(*flags, "--precision", "bf16")
    assert other.returncode == 2 and "holds this model fitted in fp32; pass --overwrite" in other.stderr
    refit = _job(*flags, "--precision", "bf16", "--overwrite")
    assert refit.returncode == 0 and "fitted dfkde" in refit.stdout, refit.stderr[-2000:]
    assert Artifact.load(str(tmp_path / "r" / "model")).provenance["run"]["precision"] == "bf16"
