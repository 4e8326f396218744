"""Model and run configuration: what changes the numbers (model config) versus what changes only speed (run config).

The model config is stored verbatim in the artifact; every field is validated in ``__post_init__`` so a bad value
fails on the laptop, before any cluster work, with the field name, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

MODELS = ("dfkde",)  # DFM and RKDE join here when they land (one entry each, no registry).
FEATURE_SCALINGS = ("scale", "norm")


class UserError(ValueError):
    """A bad flag, config, index or artifact: the jobs print its message and exit with code 2, no traceback."""


def _fail(name: str, value: Any, allowed: str) -> None:
    msg = f"invalid {name}={value!r}: expected {allowed}"
    raise UserError(msg)


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(name, value, f"an integer >= {low}")


@dataclass(frozen=True, kw_only=True)
class DfkdeConfig:
    """DFKDE: pooled backbone features -> PCA -> scaling -> Gaussian KDE (models.md A1, A3-A7).

    ``backbone`` defaults to resnet50 (2048-d layer4 features, as the DFKDE description specifies); anomalib's code
    default is resnet18, one flag away. Several ``layers`` are concatenated on the feature axis, in the given order.
    """

    backbone: str = "resnet50"
    layers: tuple[str, ...] = ("layer4",)
    image_size: tuple[int, int] = (256, 256)
    n_pca_components: int = 16
    feature_scaling: Literal["scale", "norm"] = "scale"
    max_training_points: int = 40_000
    seed: int = 0
    model: str = field(default="dfkde", init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.backbone, str) or not self.backbone:
            _fail("backbone", self.backbone, "a timm model name such as 'resnet50'")
        layers = tuple(self.layers) if isinstance(self.layers, (list, tuple)) else self.layers
        if not isinstance(layers, tuple) or not layers or not all(isinstance(x, str) and x for x in layers):
            _fail("layers", self.layers, "one or more layer names such as 'layer4'")
        if len(set(layers)) != len(layers):
            _fail("layers", self.layers, "distinct layer names")
        object.__setattr__(self, "layers", layers)
        size = tuple(self.image_size) if isinstance(self.image_size, (list, tuple)) else self.image_size
        if not isinstance(size, tuple) or len(size) != 2:
            _fail("image_size", self.image_size, "(height, width), two integers >= 32")
        for s in size:
            _check_int("image_size", s, 32)
        object.__setattr__(self, "image_size", size)
        _check_int("n_pca_components", self.n_pca_components, 1)
        if self.feature_scaling not in FEATURE_SCALINGS:
            _fail("feature_scaling", self.feature_scaling, f"one of {list(FEATURE_SCALINGS)}")
        _check_int("max_training_points", self.max_training_points, 2)
        if self.max_training_points <= self.n_pca_components:
            _fail("max_training_points", self.max_training_points,
                  f"more than n_pca_components={self.n_pca_components} (the KDE needs a full-rank covariance)")
        _check_int("seed", self.seed, 0)


ModelConfig = DfkdeConfig


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """How a job runs: resources and batching. Recorded in the artifact's provenance, never part of its identity."""

    batch_size: int = 32
    num_actors: int = 1
    num_gpus_per_actor: float = 0.0
    num_cpus_per_actor: float = 1.0
    decode_num_cpus: float = 0.5
    threads_per_actor: int = 0  # 0: keep what Ray sets (OMP_NUM_THREADS from num_cpus)
    device: str = "cpu"

    def __post_init__(self) -> None:
        _check_int("batch_size", self.batch_size, 1)
        _check_int("num_actors", self.num_actors, 1)
        _check_int("threads_per_actor", self.threads_per_actor, 0)
        for name in ("num_gpus_per_actor", "num_cpus_per_actor", "decode_num_cpus"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                _fail(name, v, "a number >= 0")
        if self.device not in ("cpu", "cuda"):
            _fail("device", self.device, "'cpu' or 'cuda'")


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """JSON-ready dict of a model config, with the ``model`` tag."""
    d = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Inverse of :func:`config_to_dict`; unknown keys and unknown models are errors naming the valid ones."""
    if not isinstance(d, dict):
        _fail("config", d, "a JSON object")
    model = d.get("model")
    if model not in MODELS:
        _fail("model", model, f"one of {list(MODELS)}")
    cls = DfkdeConfig
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d) - names - {"model"})
    if unknown:
        _fail("config keys", unknown, f"keys among {sorted(names)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k != "model"}
    return cls(**kwargs)
