"""Artifact: JSON + safetensors round trip, and clear errors for anything else."""

import json
import os

import numpy as np
import pytest

from rayanom.artifact import Artifact
from rayanom.config import DfkdeConfig, RunConfig, UserError, config_to_dict
from rayanom.heads import KdeHead
from rayanom.specs import config_from_dict


@pytest.fixture
def saved(tmp_path):
    rng = np.random.default_rng(0)
    config = DfkdeConfig(backbone="resnet18", n_pca_components=8, seed=3)
    head = KdeHead(8).fit(rng.normal(size=(80, 32)).astype(np.float32))
    artifact = Artifact(config=config, head=head, weights={"kind": "random", "seed": 3}, provenance={"n": 80})
    path = str(tmp_path / "model")
    artifact.save(path)
    return artifact, path


def test_round_trip_scores_are_bit_identical(saved):
    artifact, path = saved
    loaded = Artifact.load(path)
    query = np.random.default_rng(1).normal(size=(25, 32))
    assert np.array_equal(artifact.head.score_samples(query), loaded.head.score_samples(query))
    assert loaded.config == artifact.config and loaded.weights == artifact.weights
    assert sorted(os.listdir(path)) == ["config.json", "head.safetensors"]
    meta = json.load(open(os.path.join(path, "config.json")))
    assert meta["model"] == "dfkde" and meta["config"]["n_pca_components"] == 8


def _edit_config(path, fn):
    p = os.path.join(path, "config.json")
    meta = json.load(open(p))
    fn(meta)
    json.dump(meta, open(p, "w"))


@pytest.mark.parametrize("fn,match", [
    (lambda m: m.update(format_version=99), "format_version=99, this rayanom reads format_version 1"),
    (lambda m: m.update(format="other"), "not a rayanom-artifact file"),
    (lambda m: m["config"].update(model="patchcore"), r"invalid model='patchcore': expected one of \['dfkde', 'dfm', 'rkde'\]"),
    (lambda m: m["config"].update(colour="red"), r"invalid config keys=\['colour'\]"),
    (lambda m: m["config"].update(n_pca_components=0), "invalid n_pca_components=0"),
])
def test_bad_config_json_is_rejected(saved, fn, match):
    _, path = saved
    _edit_config(path, fn)
    with pytest.raises(UserError, match=match):
        Artifact.load(path)


def test_truncated_head_is_rejected(saved):
    _, path = saved
    p = os.path.join(path, "head.safetensors")
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])
    with pytest.raises(UserError, match="head.safetensors is damaged"):
        Artifact.load(path)


def test_missing_artifact_and_occupied_output(saved, tmp_path):
    artifact, path = saved
    with pytest.raises(UserError, match="not a readable rayanom artifact"):
        Artifact.load(str(tmp_path / "nothing"))
    with pytest.raises(UserError, match="pass --overwrite"):
        artifact.save(path)
    artifact.save(path, overwrite=True)
    (tmp_path / "model" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"holds other files \['notes.txt'\]"):
        artifact.save(path, overwrite=True)


def test_config_dict_round_trip_and_validation():
    config = DfkdeConfig(layers=("layer3", "layer4"), image_size=(224, 320))
    assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config
    with pytest.raises(UserError, match=r"invalid feature_scaling='zscore': expected one of \['scale', 'norm'\]"):
        DfkdeConfig(feature_scaling="zscore")
    with pytest.raises(UserError, match="invalid layers"):
        DfkdeConfig(layers=("layer4", "layer4"))
    with pytest.raises(UserError, match="invalid max_training_points=10"):
        DfkdeConfig(max_training_points=10)
    with pytest.raises(UserError, match="invalid batch_size=0"):
        RunConfig(batch_size=0)
    with pytest.raises(UserError, match="invalid rows_per_part=-1"):
        RunConfig(rows_per_part=-1)
    with pytest.raises(UserError, match="invalid no_progress_s=0"):
        RunConfig(no_progress_s=0)


def test_dfm_round_trip_and_head_of_another_model(saved, tmp_path):
    from rayanom.config import DfmConfig
    from rayanom.heads import DfmHead

    rng = np.random.default_rng(2)
    head = DfmHead(0.9, "nll").fit(rng.normal(size=(40, 64)).astype(np.float32))
    dfm = Artifact(config=DfmConfig(pca_level=0.9, score_type="nll"), head=head, weights={"kind": "random", "seed": 0})
    path = str(tmp_path / "dfm")
    dfm.save(path)
    query = rng.normal(size=(9, 64))
    assert np.array_equal(Artifact.load(path).head.anomaly_scores(query), head.anomaly_scores(query))
    # A DFKDE head under a DFM config (a hand-mixed artifact) is refused, naming what is missing.
    _, kde_path = saved
    os.replace(os.path.join(kde_path, "head.safetensors"), os.path.join(path, "head.safetensors"))
    with pytest.raises(UserError, match=r"lacks or has malformed arrays \['sigma'\] for a dfm head"):
        Artifact.load(path)


def test_precision_is_part_of_the_artifact_and_of_its_reuse(saved, tmp_path):
    """Written and read back with the artifact (an artifact of before, which kept it in its run's provenance, reads
    it from there); a fitted model is reused in its own precision or with auto, refused in the other."""
    from rayanom.artifact import fitted_before

    artifact, _ = saved
    path = str(tmp_path / "bf16")
    fingerprint_of = {"fp32": "a" * 64, "bf16": "b" * 64}.__getitem__
    bf16 = Artifact(config=artifact.config, head=artifact.head, weights=artifact.weights,
                    provenance={"fit_fingerprint": fingerprint_of("bf16")}, precision="bf16")
    bf16.save(path)
    assert Artifact.load(path).precision == "bf16"
    assert fitted_before(path, fingerprint_of, precision="bf16").precision == "bf16"
    assert fitted_before(path, fingerprint_of, precision="auto").precision == "bf16"
    with pytest.raises(UserError, match="holds this model fitted in bf16; pass --overwrite to refit it in fp32"):
        fitted_before(path, fingerprint_of, precision="fp32")
    assert fitted_before(path, fingerprint_of, overwrite=True, precision="fp32") is None
    _edit_config(path, lambda m: (m.pop("precision"), m["provenance"].update(run={"precision": "bf16"})))
    assert Artifact.load(path).precision == "bf16"  # as artifacts written before it was a field
    _edit_config(path, lambda m: m.update(precision="fp16"))
    with pytest.raises(UserError, match="precision 'fp16', expected 'fp32' or 'bf16'"):
        Artifact.load(path)
