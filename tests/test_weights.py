"""Weights a user can trust: one documented source per model, RKDE's pretrained files required (not silently random),
a WARNING on random weights anywhere but the demo, and the sha256 of each weights file logged and printed.

No test reaches for the network: timm's pretrained weights are never asked for (``--no-pretrained`` or a file), RKDE's
refusal comes before any download could, and the fit job is stopped where Ray would start.
"""

import hashlib
import logging

import pytest
import torch

from rayanom.config import RKDE_FILES, DfkdeConfig, RkdeConfig, UserError
from rayanom.specs import SPECS, random_weights_warning, report_weights

DETECTOR_URL = "https://download.pytorch.org/models/fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"
REGION_URL = "https://github.com/openvinotoolkit/anomalib/releases/download/rkde-weights/rkde_feature_extractor.pth"
SMALL = ["--backbone", "resnet18", "--image-size", "64", "--n-pca-components", "4", "--quiet"]


class _RayWouldStart(Exception):
    """Raised where the fit job would start Ray: everything before it (flags, index, weights) has run."""


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _fit_until_ray(monkeypatch, argv: list[str]):
    """jobs/fit.py's ``main`` on ``argv`` up to where it starts Ray; returns the stop (or raises its UserError)."""
    import rayanom.launch
    from rayanom_jobs import fit

    def stop(*args, **kwargs):
        raise _RayWouldStart

    monkeypatch.setattr(rayanom.launch, "start_ray", stop)
    with pytest.raises(_RayWouldStart):
        fit.main(fit.get_args_parser().parse_args(argv))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "rayanom.specs"]


# ---------------------------------------------------------------------------------------------------------------------
# the warning on random weights


def test_random_weights_warn_on_a_user_index_and_not_on_the_demo(caplog):
    config = DfkdeConfig(backbone="resnet18", seed=5)
    random = {"kind": "random", "seed": 5}
    with caplog.at_level(logging.INFO, logger="rayanom.specs"):
        assert random_weights_warning(config, random, demo=True) is None
        assert not _warnings(caplog)
        msg = random_weights_warning(config, random, demo=False)
    assert _warnings(caplog) == [msg]
    assert "random backbone weights (seed 5)" in msg
    assert "low-level image statistics" in msg and "not learned defects" in msg and "not meaningful" in msg
    # how to get them: the flags, timm's tag and its Hugging Face repository
    assert "--no-pretrained" in msg and "--weights PATH|URI" in msg and "timm/resnet18.a1_in1k" in msg
    caplog.clear()
    for source in ({"kind": "timm", "tag": "resnet18.a1_in1k"}, {"kind": "file", "path": "w.pth", "sha256": "ab"}):
        assert random_weights_warning(config, source, demo=False) is None
    assert not _warnings(caplog)


def test_rkde_random_parts_warn_with_the_files_urls(caplog):
    config = RkdeConfig()
    file = {"kind": "file", "path": "d.pth", "sha256": "cd" * 32}
    source = {"kind": "rkde", "detector": file, "region": {"kind": "random", "seed": 0}}
    with caplog.at_level(logging.WARNING, logger="rayanom.specs"):
        assert random_weights_warning(config, source, demo=True) is None
        msg = random_weights_warning(config, source, demo=False)
        assert random_weights_warning(config, {**source, "region": file}, demo=False) is None
    assert _warnings(caplog) == [msg]
    assert "random region weights" in msg and "detector" not in msg.split("weights")[0]
    for text in ("--detector-weights", DETECTOR_URL, "--region-weights", REGION_URL, "not meaningful"):
        assert text in msg


def test_fit_job_warns_on_a_user_index_and_not_on_the_demo(demo_set, tmp_path, monkeypatch, caplog, capsys):
    """Through jobs/fit.py's own code path (stopped where Ray would start): ``--no-pretrained`` on an index warns;
    the demo (no --index, here the fixture's set standing in for the generated one) does not."""
    from rayanom import demo

    with caplog.at_level(logging.WARNING, logger="rayanom.specs"):
        _fit_until_ray(monkeypatch, ["--model", "dfkde", "--index", demo_set["index"], "--out", str(tmp_path / "a"),
                                     "--no-pretrained", *SMALL])
    assert len(_warnings(caplog)) == 1 and "random backbone weights (seed 0)" in _warnings(caplog)[0]
    assert "weights: random, seed 0" in capsys.readouterr().out
    caplog.clear()
    monkeypatch.setattr(demo, "demo_set", lambda spec: (demo_set["index"], demo_set["test"]))
    with caplog.at_level(logging.WARNING, logger="rayanom.specs"):
        _fit_until_ray(monkeypatch, ["--model", "dfkde", "--out", str(tmp_path / "b"), *SMALL])
    assert not _warnings(caplog)
    assert "weights: random, seed 0" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------------
# RKDE: pretrained means its two files


def test_rkde_pretrained_without_files_is_refused():
    weights = SPECS["rkde"].weights
    config = RkdeConfig()
    for flags, download in (({}, True), ({"pretrained": True}, False), ({"pretrained": None}, True)):
        with pytest.raises(UserError) as err:
            weights(config, flags, download)
        msg = str(err.value)
        assert msg.startswith("invalid --detector-weights/--region-weights=None: RKDE's pretrained weights"), msg
        for text in (DETECTOR_URL, REGION_URL, "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth",
                     "rkde_feature_extractor.pth", "--detector-weights PATH|URI", "--region-weights PATH|URI",
                     "--no-pretrained"):
            assert text in msg, text
        assert "\n" not in msg  # one line
    assert {k for k in RKDE_FILES} == {"detector_weights", "region_weights"}


def test_rkde_refusal_names_only_the_missing_file_and_reads_given_ones_first(tmp_path):
    weights = SPECS["rkde"].weights
    config = RkdeConfig()
    region = str(tmp_path / "rkde_feature_extractor.pth")
    torch.save({"x": torch.zeros(1)}, region)  # never read: the missing detector is refused first
    with pytest.raises(UserError, match=r"^invalid --detector-weights=None: RKDE's pretrained weights"):
        weights(config, {"region_weights": region}, True)
    with pytest.raises(UserError, match=r"invalid detector_weights='/nonexistent.pth': missing file"):
        weights(config, {"detector_weights": "/nonexistent.pth"}, True)


def test_rkde_random_weights_on_the_demo_and_with_no_pretrained():
    from rayanom.regions import region_extractor_state

    weights = SPECS["rkde"].weights
    config = RkdeConfig(seed=3)
    expected = region_extractor_state(None, 3)[0]
    for flags, download in (({}, False), ({"pretrained": False}, True), ({"pretrained": None}, False)):
        state, source = weights(config, flags, download)
        assert source == {"kind": "rkde", "detector": {"kind": "random", "seed": 3},
                          "region": {"kind": "random", "seed": 3}}
        assert state["region"].keys() == expected.keys()


def test_fit_job_refuses_rkde_on_an_index_without_files(demo_set, tmp_path, monkeypatch):
    """``--pretrained`` is RKDE's flag too (no longer 'applies to dfkde or dfm'); on an index it is the default, and
    without the two files the job stops before Ray with the refusal."""
    import rayanom.launch
    from rayanom_jobs import fit

    monkeypatch.setattr(rayanom.launch, "start_ray", lambda *a, **k: pytest.fail("Ray started"))
    base = ["--model", "rkde", "--index", demo_set["index"], "--out", str(tmp_path / "r"), "--quiet"]
    for extra in ([], ["--pretrained"]):
        with pytest.raises(UserError, match="RKDE's pretrained weights .* two files to download once"):
            fit.main(fit.get_args_parser().parse_args([*base, *extra]))
    help_text = fit.get_args_parser().format_help()
    assert "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth" in help_text and "rkde_feature_extractor.pth" in help_text


# ---------------------------------------------------------------------------------------------------------------------
# sha256: recorded, logged, printed


def _resnet18_file(path) -> str:
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_weights_file_sha256_is_recorded_logged_and_printed(demo_set, tmp_path, monkeypatch, caplog, capsys):
    path = tmp_path / "w.pth"
    sha = _resnet18_file(path)
    with caplog.at_level(logging.INFO):
        _fit_until_ray(monkeypatch, ["--model", "dfkde", "--index", demo_set["index"], "--out", str(tmp_path / "r"),
                                     "--weights", str(path), *SMALL])
    assert f"weights: file {path} sha256 {sha}" in capsys.readouterr().out
    assert any(sha in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    assert not _warnings(caplog)  # a file is not random
    _, source = SPECS["dfkde"].weights(DfkdeConfig(backbone="resnet18", n_pca_components=4), {"weights": str(path)},
                                       True)
    assert source == {"kind": "file", "path": str(path), "sha256": sha}
    assert report_weights(DfkdeConfig(), source, demo=False) == f"weights: file {path} sha256 {sha}"


def test_rkde_sources_are_described_part_by_part():
    file = {"kind": "file", "path": "s3://b/det.pth", "sha256": "ef" * 32}
    source = {"kind": "rkde", "detector": file, "region": {"kind": "random", "seed": 0}}
    assert report_weights(RkdeConfig(), source, demo=True) == (
        f"weights: detector file s3://b/det.pth sha256 {'ef' * 32}; region random, seed 0")


def test_hash_prefix_in_a_torch_hub_file_name_is_checked(tmp_path, caplog):
    """torchvision names its files after the first hex digits of their sha256 (``...coco-258fb6c6.pth``): a file
    that carries such a name is checked against it, a WARNING where they differ."""
    from rayanom.features import load_state_file

    data = tmp_path / "w.pth"
    torch.save({"a": torch.arange(3.0)}, str(data))
    sha = hashlib.sha256(data.read_bytes()).hexdigest()
    good, bad = tmp_path / f"net-{sha[:8]}.pth", tmp_path / "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"
    good.write_bytes(data.read_bytes())
    bad.write_bytes(data.read_bytes())
    with caplog.at_level(logging.INFO, logger="rayanom.features"):
        for path in (data, good):
            assert load_state_file(str(path))[1] == sha
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert f"matches the {sha[:8]} in its name" in caplog.text
        load_state_file(str(bad), "detector_weights")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "does not start with the 258fb6c6 in its name" in warned[0], warned
    assert "detector_weights=" in warned[0] and sha in warned[0]


def test_timm_weights_source_names_the_tag_repository_and_cache():
    from rayanom.features import timm_weights_source

    text = timm_weights_source("resnet50")
    assert "resnet50.a1_in1k" in text and "timm/resnet50.a1_in1k" in text and "model.safetensors" in text
    assert "HF_HOME" in text
    assert "no pretrained tag" in timm_weights_source("no_such_net_xyz")
