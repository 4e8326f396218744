"""Backbone stage: timm CNN features for DFKDE (global average pool per layer, concatenated on the feature axis).

Weights come from a local or object-store file, timm's pretrained tag, or a seeded random init, and are validated
against the backbone: by the driver before any cluster work, then by each actor, which loads its own from the recorded
source (``stages.load_weights``), so that Ray can restart it on any node.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
import platform
import re
import time
import warnings
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load

from rayanom.config import ModelConfig, UserError
from rayanom.decode import IMAGENET_MEAN, IMAGENET_STD
from rayanom.storage import read_weights_file, same_file

logger = logging.getLogger(__name__)


def _create(backbone: str, **kwargs: Any) -> torch.nn.Module:
    import timm

    try:
        return timm.create_model(backbone, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            hint = ", ".join(timm.list_models(f"*{backbone.split('.')[0][:6]}*")[:8])
            msg = f"invalid backbone={backbone!r}: not a timm model (similar names: {hint or 'none'})"
            raise UserError(msg) from e
        raise


def layer_indices(backbone: str, layers: tuple[str, ...]) -> list[int]:
    """timm ``out_indices`` of the named layers, in the given order; unknown names are an error listing the valid."""
    probe = _create(backbone, pretrained=False, features_only=True)
    names = probe.feature_info.module_name()
    unknown = [name for name in layers if name not in names]
    if unknown:
        msg = f"invalid layers={list(layers)}: {unknown} not in {backbone}'s feature layers {names}"
        raise UserError(msg)
    return [names.index(name) for name in layers]


def build_backbone(config: ModelConfig, pretrained: bool = False) -> tuple[torch.nn.Module, list[int]]:
    """Features-only timm model for ``config.layers`` and, per requested layer, its position in the model's output."""
    idx = layer_indices(config.backbone, config.layers)
    out_indices = sorted(set(idx))
    model = _create(config.backbone, pretrained=pretrained, features_only=True, out_indices=tuple(out_indices))
    return model.eval(), [out_indices.index(i) for i in idx]


@contextmanager
def seeded(seed: int):
    """torch's CPU random state seeded inside the block, restored after it (a seeded random init)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def resolve_weights(config: ModelConfig, weights: str | None, pretrained: bool) -> tuple[dict[str, np.ndarray], dict]:
    """Backbone state dict (numpy arrays) and a JSON description of where it came from.

    ``weights``: a local timm state dict (``.safetensors``, or ``.pth``/``.pt``/``.bin`` read with
    ``weights_only=True``). It may be complete, or hold only the layers the model uses (the classifier and unused
    later stages may be absent); anything else missing, unexpected or of the wrong shape is an error.
    Without a file: timm's pretrained tag when ``pretrained``, else a random init seeded with ``config.seed``.
    """
    if weights:
        model, _ = build_backbone(config)
        state, sha = load_state_file(weights)
        full = set(_create(config.backbone, pretrained=False).state_dict())
        state = match_state(state, model, f"weights={weights!r}", f"backbone {config.backbone!r}", full,
                            "only the classifier and unused later stages may be absent")
        source = {"kind": "file", "path": weights, "sha256": sha}
    elif pretrained:
        try:
            model, _ = build_backbone(config, pretrained=True)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - hub/network failures come in many types
            msg = (f"cannot load timm's pretrained weights for backbone={config.backbone!r} ({type(e).__name__}: "
                   f"{' '.join(str(e).split())[:300]}); without network access pass --weights PATH "
                   f"or --no-pretrained ({timm_weights_source(config.backbone)})")
            raise UserError(msg) from e
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        tag = f"{cfg.get('architecture', config.backbone)}.{cfg.get('tag', '')}".rstrip(".")
        state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        source = {"kind": "timm", "tag": tag}
    else:
        with seeded(config.seed):
            model, _ = build_backbone(config)
        state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        source = {"kind": "random", "seed": config.seed}
    return state, source


def artifact_weights(config: ModelConfig, source: dict, weights: str | None) -> dict[str, np.ndarray]:
    """The backbone weights an artifact was fitted with (its ``weights`` source); a file must match its sha256.

    ``weights`` overrides the recorded file path (the file may sit elsewhere on this machine).
    """
    kind = source.get("kind")
    if kind == "file":
        state, got = resolve_weights(config, weights or source["path"], False)
        same_file(got, source, "weights")
        return state
    if weights:
        msg = f"invalid weights={weights!r}: this model was fitted with {kind} weights, not a file"
        raise UserError(msg)
    if kind == "timm":  # the recorded tag, not today's default tag for the name
        return resolve_weights(dataclasses.replace(config, backbone=source["tag"]), None, True)[0]
    if kind == "random":
        if source.get("seed") != config.seed:
            msg = f"invalid artifact: random weight seed {source.get('seed')} != config seed {config.seed}"
            raise UserError(msg)
        return resolve_weights(config, None, False)[0]
    msg = f"invalid artifact: unknown weight source {source!r}; expected kind 'file', 'timm' or 'random'"
    raise UserError(msg)


def timm_weights_source(backbone: str) -> str:
    """Where timm's pretrained weights for ``backbone`` come from, in words.

    The words name its tag and Hugging Face repository, the file to download once for ``--weights``, and the cache
    (``HF_HOME``) timm reads instead of the network."""
    import timm.models

    try:
        cfg = timm.models.get_pretrained_cfg(backbone)
    except Exception:  # noqa: BLE001 - an unknown name is reported where the backbone is built
        cfg = None
    hub = getattr(cfg, "hf_hub_id", None)
    if not hub:
        return f"timm has no pretrained tag on the Hugging Face Hub for backbone={backbone!r}"
    return (f"timm's tag {hub.split('/', 1)[-1]}: the file model.safetensors of the Hugging Face repository {hub}, "
            f"for --weights; or an HF_HOME cache that holds it, with HF_HUB_OFFLINE=1")


HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,})\.pth?$")  # torch.hub's file names: NAME-<first hex digits of sha256>.pth


def check_hash_in_name(path: str, sha: str, field: str = "weights") -> None:
    """Log the sha256 of a weights file, and warn where its name says another hash.

    Where the name follows torch.hub's convention (torchvision's ``fasterrcnn_resnet50_fpn_coco-258fb6c6.pth``: the
    first hex digits of the file's sha256), a WARNING when they differ (a partial download or another file under that
    name)."""
    found = HASH_IN_NAME.search(str(path).rsplit("/", 1)[-1])
    if found is None:
        logger.info("%s=%s: sha256 %s", field, path, sha)
    elif sha.startswith(found.group(1)):
        logger.info("%s=%s: sha256 %s (matches the %s in its name)", field, path, sha, found.group(1))
    else:
        logger.warning("%s=%s: sha256 %s does not start with the %s in its name: a partial download, or another "
                       "file under that name?", field, path, sha, found.group(1))


def load_state_file(path: str, field: str = "weights") -> tuple[dict[str, np.ndarray], str]:
    """Read a state dict without unpickling anything; returns (arrays, sha256 of the file), the sha256 logged."""
    data, sha = read_weights_file(path, field)
    check_hash_in_name(path, sha, field)
    try:
        if path.endswith(".safetensors"):
            state = load(data)
        else:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            if isinstance(obj, dict) and set(obj) <= {"state_dict", "model"} and len(obj) == 1:
                obj = next(iter(obj.values()))
            if not isinstance(obj, dict):
                msg = f"holds a {type(obj).__name__}, expected a state dict"
                raise ValueError(msg)
            state = {k: v.detach().cpu().numpy() for k, v in obj.items() if isinstance(v, torch.Tensor)}
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad user file
        msg = f"invalid {field}={path!r}: cannot read a state dict from it ({type(e).__name__}: {e})"
        raise UserError(msg) from e
    return state, sha


def match_state(state: dict[str, np.ndarray], model: torch.nn.Module, label: str, what: str,
                allowed: set[str] | None = None, hint: str = "") -> dict[str, np.ndarray]:
    """Exactly the arrays ``model`` needs from ``state``, or a UserError that names what is wrong.

    The error names ``label`` (the flag and file) and the missing, unexpected (not among ``allowed``, by default the
    model's own keys) and mis-shaped keys of the ``what``."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - (set(expected) if allowed is None else allowed))
    if missing or unexpected:
        msg = (f"invalid {label}: does not match the {what}: missing keys {missing[:5]}"
               f"{' ...' if len(missing) > 5 else ''} ({len(missing)}), unexpected keys {unexpected[:5]}"
               f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)}); "
               f"{hint or f'expected the {len(expected)} keys of the {what}'}")
        raise UserError(msg)
    wrong = [f"{k}: {tuple(np.shape(state[k]))} != {tuple(v.shape)}" for k, v in expected.items()
             if tuple(np.shape(state[k])) != tuple(v.shape)]
    if wrong:
        msg = f"invalid {label}: wrong shapes for the {what}: {wrong[:5]}{' ...' if len(wrong) > 5 else ''}"
        raise UserError(msg)
    return {k: np.asarray(state[k]) for k in expected}


def fp32_without_tf32() -> None:
    """Make fp32 mean fp32 on CUDA, where PyTorch lets cuDNN convolutions use TF32 by default.

    Through one API, the ``fp32_precision`` settings (torch 2.9+; mixing them with the legacy ``allow_tf32`` flags is an
    error there), or the legacy flags on an older torch. Process-wide, as these settings are."""
    if hasattr(torch.backends, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
    else:  # pragma: no cover - torch < 2.9
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def device_kind(device: str) -> str:
    """What ``device`` is, for the record: the GPU's name, or the CPU's model name (Linux) or architecture."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(dev)}"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        name = ""
    return f"cpu: {name or platform.machine() or 'unknown'}"


BF16_MIN_SPEEDUP = 1.3  # bf16 is chosen where it measures at least this much faster than fp32


def bf16_speedup(device: str, config: ModelConfig | None = None, image_size: int = 224, batch: int = 4,
                 repeats: int = 3, give_up: float = 0.0) -> float:
    """How many times faster ``config``'s backbone runs a forward pass here in bf16 than in fp32.

    The backbone has random weights (resnet18 without a config); bf16 is the ``bf16`` path (autocast + channels_last),
    fp32 the ``fp32`` path (contiguous NCHW); the result is the best of ``repeats`` timings of each, interleaved, after
    one warm-up each. It is measured, not read from CPU flags, because a flag list cannot tell a CPU with AMX from one
    with ``avx512_bf16`` only or one that emulates bf16 (slower than fp32); the images must be large enough for the
    ratio to be representative (benchmarks/README.md has the numbers). With ``give_up`` > 0, a warm-up ratio below
    ``1 / give_up`` (bf16 emulated: many times slower) ends the measurement there, with that ratio."""
    import torchvision

    dev = torch.device(device)
    if dev.type == "cuda" and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        return 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = (build_backbone(config)[0] if config is not None else torchvision.models.resnet18(weights=None))
        net = net.eval().to(dev)
    x = torch.rand(batch, 3, image_size, image_size, device=dev)
    setups = {"fp32": (net, x, False),
              "bf16": (copy.deepcopy(net).to(memory_format=torch.channels_last),
                       x.contiguous(memory_format=torch.channels_last), True)}
    best, warm = {name: float("inf") for name in setups}, {}
    for i in range(repeats + 1):
        for name, (model, inp, bf16) in setups.items():
            t0 = time.perf_counter()
            with torch.inference_mode(), torch.autocast(dev.type, torch.bfloat16, enabled=bf16):
                model(inp)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i:  # the first round warms up
                best[name] = min(best[name], time.perf_counter() - t0)
            else:
                warm[name] = time.perf_counter() - t0
        if not i and give_up and warm["bf16"] > give_up * warm["fp32"]:
            return warm["fp32"] / warm["bf16"]
    return best["fp32"] / best["bf16"]


def bf16_is_fast(device: str, config: ModelConfig | None = None) -> bool:
    """Whether ``--precision auto`` picks bf16 on ``device`` here.

    It does where :func:`probe_bf16`'s measured speed-up reaches ``BF16_MIN_SPEEDUP``."""
    return probe_bf16(device)[0] >= BF16_MIN_SPEEDUP


def probe_bf16(device: str) -> tuple[float, float]:
    """The ``--precision auto`` probe: resnet18's bf16 speed-up over fp32; returns (speed-up, seconds it took).

    It runs at 224², batch 2, with the threads of the process it runs in (an actor's), and is kept short; the warm-up
    decides alone where bf16 is emulated (4x slower or worse)."""
    t0 = time.perf_counter()
    speedup = bf16_speedup(device, None, image_size=224, batch=2, repeats=3, give_up=4.0)
    seconds = time.perf_counter() - t0
    logger.info("bf16 measured %.2fx fp32 on %s in %.1f s (bf16 from %.1fx)", speedup, device, seconds,
                BF16_MIN_SPEEDUP)
    return speedup, seconds


def input_tensor(images: np.ndarray, device) -> torch.Tensor:
    """Images (n, 3, h, w) as a tensor on ``device``, without a copy on the CPU.

    float32, or bfloat16 where the array holds bf16 bits (uint16, ``decode.bf16_bits``). The array may be read-only
    (the object store's): the feature stages never write their input."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        if images.dtype == np.uint16:
            return torch.from_numpy(np.ascontiguousarray(images).view(np.int16)).view(torch.bfloat16).to(device)
        return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(device)


class FeatureExtractor:
    """Backbone features of pre-processed images; arrays in, arrays out, usable without Ray.

    DFKDE: global average pool of each layer, concatenated on the feature axis -> (n, sum of channels).
    DFM: ``avg_pool2d(pooling_kernel_size)`` of its one layer, flattened channel-major as anomalib's ``view(n, -1)``
    -> (n, C * h' * w'); ``map_shape`` = (C, h', w') gives the layout back for anomaly maps.
    The Ray stage classes (``stages``) own the batch dicts; this class owns torch.
    """

    def __init__(self, config: ModelConfig, state: dict[str, np.ndarray], device: str = "cpu",
                 threads: int = 0, precision: str = "fp32") -> None:
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        # bf16 autocast + channels_last: faster on CPUs with AMX and on GPUs. fp32 stays contiguous NCHW. Either way the
        # same batch gives bit-identical features; a row in another batch may differ in its last bits (the
        # convolutions pick kernels by shape; heads.BATCH_RTOL).
        self.bf16 = precision == "bf16"
        if self.device.type == "cuda" and not self.bf16:
            fp32_without_tf32()
        self.memory_format = torch.channels_last if self.bf16 else torch.contiguous_format
        self.pool = getattr(config, "pooling_kernel_size", 0)  # DFM pools its one layer; else global average pool
        model, self.order = build_backbone(config)
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
        self.model = model.eval().to(self.device, memory_format=self.memory_format)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        probe = self._forward(torch.zeros((1, 3, *config.image_size), device=self.device))
        self.map_shape = tuple(probe.shape[1:])
        self.dim = int(np.prod(self.map_shape))

    def features(self, images: np.ndarray) -> torch.Tensor:
        """(n, 3, h, w) images -> (n, dim) float32 features, a tensor on the device (the heads score them there).

        The images are float32 RGB in [0, 1], or, in bf16 runs, normalised bf16 bits."""
        if len(images) == 0:
            return torch.zeros((0, self.dim), device=self.device)
        x = input_tensor(images, self.device)  # bf16 bits are normalised already: the first convolution's very input
        return self._forward(x, normalised=x.dtype == torch.bfloat16).reshape(len(x), -1).float()

    def _forward(self, x: torch.Tensor, normalised: bool = False) -> torch.Tensor:
        x = (x if normalised else (x - self.mean) / self.std).contiguous(memory_format=self.memory_format)
        with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
            maps = [m.float() for m in self.model(x)]
            if not self.pool:
                return torch.cat([maps[i].mean(dim=(2, 3)) for i in self.order], dim=1)
            f = maps[self.order[0]]
            return F.avg_pool2d(f, self.pool) if self.pool > 1 else f

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """(n, 3, h, w) float32 RGB in [0, 1] -> (n, dim) float32 features, a numpy array."""
        return self.features(images).cpu().numpy()
