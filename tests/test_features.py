"""Backbone features against anomalib's resize, normalisation and pooling computed directly with timm + torchvision,
and weight files."""

import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image

from rayanom.config import DfkdeConfig, UserError
from rayanom.decode import decode_image
from rayanom.features import FeatureExtractor, artifact_weights, build_backbone, layer_indices, resolve_weights
from rayanom.heads import BATCH_RTOL


def _perturbed_state(config, seed=0):
    """Random weights whose every layer matters: timm zero-initialises the last BN of each block, so perturb BNs."""
    state, _ = resolve_weights(config, None, False)
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in state.items():
        if k.endswith("running_var"):
            v = rng.uniform(0.5, 2.0, v.shape).astype(v.dtype)
        elif k.endswith("running_mean") or (k.endswith(".bias") and "bn" in k):
            v = rng.normal(0, 0.1, v.shape).astype(v.dtype)
        elif k.endswith(".weight") and "bn" in k:
            v = rng.uniform(0.5, 1.5, v.shape).astype(v.dtype)
        out[k] = v
    return out


def _reference(path, state, backbone, out_index, size):
    """anomalib v2: PIL RGB -> float [0,1] -> v2 Resize(antialias) -> Normalize -> timm features -> avg pool."""
    x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
    x = TF.resize(x, list(size), antialias=True)
    x = TF.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    model = timm.create_model(backbone, pretrained=False, features_only=True, exportable=True, out_indices=[out_index])
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items() if k in model.state_dict()})
    with torch.no_grad():
        return F.adaptive_avg_pool2d(model.eval()(x[None])[0], 1).flatten(1)[0].numpy()


def _images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(300, 260), (128, 128), (90, 400)]):
        base = np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.3, 1, (1, 1, 3))
        arr = np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
        p = tmp_path / f"img{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(arr).save(p)
        paths.append(str(p))
    return paths


@pytest.mark.parametrize("backbone,layer,index", [("resnet18", "layer4", 4), ("resnet18", "layer3", 3)])
def test_features_match_direct_reference(tmp_path, backbone, layer, index):
    config = DfkdeConfig(backbone=backbone, layers=(layer,), image_size=(128, 128), n_pca_components=4)
    state = _perturbed_state(config)
    extractor = FeatureExtractor(config, state)
    paths = _images(tmp_path)
    ours = extractor(np.stack([decode_image(open(p, "rb").read(), config.image_size) for p in paths]))
    ref = np.stack([_reference(p, state, backbone, index, config.image_size) for p in paths])
    assert ours.shape == ref.shape == (3, extractor.dim)
    assert np.abs(ours - ref).max() <= 1e-4
    assert ours.std(axis=0).mean() > 1e-3  # the images really differ in feature space


def test_several_layers_concatenate_on_the_feature_axis_in_given_order():
    config = DfkdeConfig(backbone="resnet18", layers=("layer4", "layer2"), image_size=(64, 64), n_pca_components=4)
    state = _perturbed_state(config)
    images = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    both = FeatureExtractor(config, state)(images)
    assert both.shape == (2, 512 + 128)
    for layer, cols in (("layer4", slice(0, 512)), ("layer2", slice(512, None))):
        single = DfkdeConfig(backbone="resnet18", layers=(layer,), image_size=(64, 64), n_pca_components=4)
        keys = build_backbone(single)[0].state_dict().keys()
        sub = {k: v for k, v in state.items() if k in keys}
        np.testing.assert_array_equal(FeatureExtractor(single, sub)(images), both[:, cols])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_batch_contract_of_features(precision):
    """Same rows in the same batches: bit-identical (also from a second extractor). Another batch, a batch of one
    included (the convolutions pick other kernels for it): within BATCH_RTOL of the largest feature in fp32."""
    config = DfkdeConfig(backbone="resnet18", image_size=(64, 64), n_pca_components=4)
    state = _perturbed_state(config)
    extractor = FeatureExtractor(config, state, precision=precision)
    images = np.random.default_rng(1).random((5, 3, 64, 64), dtype=np.float32)
    parts = np.concatenate([extractor(images[:2]), extractor(images[2:])])
    again = FeatureExtractor(config, state, precision=precision)
    np.testing.assert_array_equal(parts, np.concatenate([again(images[:2]), again(images[2:])]))
    if precision == "fp32":
        whole = extractor(images)
        alone = np.concatenate([extractor(images[i:i + 1]) for i in range(5)])
        scale = np.abs(whole).max()
        for other in (parts, alone):
            np.testing.assert_allclose(other, whole, rtol=0, atol=BATCH_RTOL * scale)


def test_bf16_images_between_the_stages_give_the_very_features_of_float32_ones():
    """A bf16 run's decode stage ships normalised bf16 bits (half the bytes): the features are bit-identical to those
    of float32 images normalised on the actor, and the bits are torch's own rounding of the normalised values."""
    import torch

    from rayanom.decode import IMAGENET_MEAN, IMAGENET_STD, bf16_bits

    config = DfkdeConfig(backbone="resnet18", image_size=(64, 64), n_pca_components=4)
    extractor = FeatureExtractor(config, _perturbed_state(config), precision="bf16")
    images = np.random.default_rng(2).random((4, 3, 64, 64), dtype=np.float32)
    bits = bf16_bits(images)
    assert bits.dtype == np.uint16 and bits.nbytes == images.nbytes // 2
    x = (torch.from_numpy(images) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1)
    np.testing.assert_array_equal(bits, x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
    np.testing.assert_array_equal(extractor(bits), extractor(images))


def test_unknown_layer_and_backbone_are_clear_errors():
    with pytest.raises(UserError, match=r"\['layer9'\] not in resnet18's feature layers \['act1', 'layer1'"):
        layer_indices("resnet18", ("layer9",))
    with pytest.raises(UserError, match="invalid backbone='resnet_nope'"):
        layer_indices("resnet_nope", ("layer4",))


def test_random_weights_are_seeded():
    a = DfkdeConfig(backbone="resnet18", n_pca_components=4, seed=1)
    s1, src = resolve_weights(a, None, False)
    s2, _ = resolve_weights(a, None, False)
    s3, _ = resolve_weights(DfkdeConfig(backbone="resnet18", n_pca_components=4, seed=2), None, False)
    assert src == {"kind": "random", "seed": 1}
    assert all(np.array_equal(s1[k], s2[k]) for k in s1)
    assert not np.array_equal(s1["conv1.weight"], s3["conv1.weight"])


def _full_state():
    torch.manual_seed(3)
    return timm.create_model("resnet18", pretrained=False).state_dict()


def test_weight_files_load_without_pickle(tmp_path):
    from safetensors.torch import save_file

    config = DfkdeConfig(backbone="resnet18", layers=("layer3",), n_pca_components=4)
    full = _full_state()
    pth, st = str(tmp_path / "w.pth"), str(tmp_path / "w.safetensors")
    torch.save(full, pth)  # complete model, classifier included
    save_file({k: v for k, v in full.items() if not k.startswith(("fc.", "layer4."))}, st)  # only what is used
    for path in (pth, st):
        state, source = resolve_weights(config, path, False)
        assert source["kind"] == "file" and len(source["sha256"]) == 64
        assert set(state) == set(build_backbone(config)[0].state_dict())
        np.testing.assert_array_equal(state["conv1.weight"], full["conv1.weight"].numpy())
        assert artifact_weights(config, source, None).keys() == state.keys()


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.pop("layer1.0.conv1.weight"), r"missing keys \['layer1.0.conv1.weight'\]"),
    (lambda s: s.update({"head.extra": torch.zeros(1)}), r"unexpected keys \['head.extra'\]"),
    (lambda s: s.update({"conv1.weight": torch.zeros(64, 3, 3, 3)}), "wrong shapes"),
])
def test_mismatched_weights_are_rejected(tmp_path, edit, match):
    state = _full_state()
    edit(state)
    path = str(tmp_path / "w.pth")
    torch.save(state, path)
    with pytest.raises(UserError, match=match):
        resolve_weights(DfkdeConfig(backbone="resnet18", n_pca_components=4), path, False)


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pickled_objects_are_refused(tmp_path, capsys):
    path = str(tmp_path / "evil.pth")
    torch.save({"conv1.weight": _Evil()}, path)
    with pytest.raises(UserError, match="cannot read a state dict"):
        resolve_weights(DfkdeConfig(backbone="resnet18", n_pca_components=4), path, False)
    assert "unpickled!" not in capsys.readouterr().out


def test_changed_weight_file_is_detected(tmp_path):
    config = DfkdeConfig(backbone="resnet18", n_pca_components=4)
    path = str(tmp_path / "w.pth")
    torch.save(_full_state(), path)
    _, source = resolve_weights(config, path, False)
    other = _full_state()
    other["conv1.weight"] += 1
    torch.save(other, path)
    with pytest.raises(UserError, match="differs from the file the model was fitted with"):
        artifact_weights(config, source, None)


def test_score_job_checks_weights_without_building_the_backbone(tmp_path):
    """The score job's driver check (``ModelSpec.check_weights``): the same verdicts as the actors' full load on
    files (sha256) and random inits (seed), in a process that never imports torch."""
    import shutil
    import subprocess
    import sys

    from rayanom.specs import check_timm_weights

    config = DfkdeConfig(backbone="resnet18", n_pca_components=4, seed=3)
    path, moved = str(tmp_path / "w.pth"), str(tmp_path / "elsewhere.pth")
    torch.save(_full_state(), path)
    _, source = resolve_weights(config, path, False)
    shutil.copy(path, moved)
    check_timm_weights(config, source, {})
    check_timm_weights(config, source, {"weights": moved})  # the same file at another path
    with pytest.raises(UserError, match="invalid weights=.*missing file"):
        check_timm_weights(config, source, {"weights": str(tmp_path / "gone.pth")})
    other = _full_state()
    other["conv1.weight"] += 1
    torch.save(other, moved)
    for check in (check_timm_weights, lambda c, s, f: artifact_weights(c, s, f.get("weights"))):
        with pytest.raises(UserError, match="differs from the file the model was fitted with"):
            check(config, source, {"weights": moved})
    random = {"kind": "random", "seed": 3}
    check_timm_weights(config, random, {})
    for bad, files, match in (({"kind": "random", "seed": 4}, {}, "random weight seed 4 != config seed 3"),
                              (random, {"weights": path}, "fitted with random weights, not a file"),
                              ({"kind": "pickle"}, {}, "unknown weight source")):
        with pytest.raises(UserError, match=match):
            check_timm_weights(config, bad, files)
    code = ("import json, sys\nfrom rayanom.config import DfkdeConfig\nfrom rayanom.specs import check_timm_weights\n"
            f"c = DfkdeConfig(backbone='resnet18', n_pca_components=4, seed=3)\n"
            f"check_timm_weights(c, {{'kind': 'random', 'seed': 3}}, {{}})\n"
            f"check_timm_weights(c, json.loads({json.dumps(json.dumps(source))}), {{}})\n"
            "print('torch' in sys.modules, 'timm' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr[-2000:]


def test_pretrained_without_network_is_a_clear_error(tmp_path):
    # HF_HUB_OFFLINE makes the hub fail at once instead of reaching for the network.
    import subprocess
    import sys

    code = ("from rayanom.config import DfkdeConfig, UserError\nfrom rayanom.features import resolve_weights\n"
            "try:\n    resolve_weights(DfkdeConfig(backbone='resnet18', n_pca_components=4), None, True)\n"
            "except UserError as e:\n    print('USERERROR', e)\n")
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "USERERROR cannot load timm's pretrained weights for backbone='resnet18'" in proc.stdout, proc.stderr
    assert "--weights PATH or --no-pretrained" in proc.stdout


def test_auto_precision_is_decided_by_measuring_bf16_against_fp32(monkeypatch):
    """bf16 where it measures >= BF16_MIN_SPEEDUP x fp32 here, not from a CPU-flag list; no bf16 without CUDA."""
    from rayanom import features

    speedup = features.bf16_speedup("cpu", repeats=2)
    assert np.isfinite(speedup) and speedup > 0
    # The backbone the run fits (here a resnet18 cut after layer2, random weights), not a stand-in.
    on_config = features.bf16_speedup("cpu", DfkdeConfig(backbone="resnet18", layers=("layer2",)), image_size=64,
                                      batch=2, repeats=1)
    assert np.isfinite(on_config) and on_config > 0
    with pytest.raises(UserError, match="not in resnet18's feature layers"):
        features.bf16_speedup("cpu", DfkdeConfig(backbone="resnet18", layers=("layer9",)))
    assert features.bf16_speedup("cuda") == 0.0 and not features.bf16_is_fast("cuda")  # this machine has no CUDA
    for measured, chosen in ((features.BF16_MIN_SPEEDUP - 0.01, False), (features.BF16_MIN_SPEEDUP, True), (0.5, False),
                             (3.9, True)):
        monkeypatch.setattr(features, "bf16_speedup", lambda device, config=None, m=measured, **kw: m)
        assert features.bf16_is_fast("cpu") is chosen


def test_the_precision_probe_gives_up_early_where_bf16_is_many_times_slower(monkeypatch):
    """The probe's warm-up alone decides where bf16 is emulated: a warm-up ratio under 1/give_up ends it there (the
    timings are stubbed: the first bf16 pass 5x the fp32 one); otherwise it measures every repeat."""
    from rayanom import features

    calls = []
    clock = iter([0.0, 1.0, 1.0, 6.0] + [float(t) for t in range(10, 100)])
    monkeypatch.setattr(features.time, "perf_counter", lambda: calls.append(1) or next(clock))
    assert features.bf16_speedup("cpu", None, image_size=32, batch=1, repeats=3, give_up=4.0) == pytest.approx(0.2)
    assert len(calls) == 4  # one fp32 and one bf16 warm-up pass, nothing more
    monkeypatch.undo()  # the real clock: the probe as the jobs run it
    speedup, seconds = features.probe_bf16("cpu")
    assert speedup > 0 and seconds > 0


def test_fp32_turns_tf32_off_through_one_api():
    """fp32 on CUDA is fp32: cuDNN convolutions and CUDA matmuls set to IEEE through the ``fp32_precision`` API alone
    (mixing it with the legacy ``allow_tf32`` flags raises in torch 2.9+, so no legacy flag is touched)."""
    import warnings

    from rayanom.features import fp32_without_tf32

    conv, matmul = torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    assert conv == "tf32"  # PyTorch's default: what made "fp32" on a GPU not fp32
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fp32_without_tf32()
            assert torch.backends.cudnn.conv.fp32_precision == "ieee"
            assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    finally:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = conv, matmul
