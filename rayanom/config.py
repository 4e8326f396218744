"""Model and run configuration: what changes the numbers (model config) versus what changes only speed (run config).

The model config is stored verbatim in the artifact; every field is validated in ``__post_init__`` so a bad value
fails on the laptop, before any cluster work, with the field name, the value and what is allowed (the jobs
show the flag that sets the field instead: ``jobs/_cli.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from rayanom.bank import REGION_ID_STRIDE

FEATURE_SCALINGS = ("scale", "norm")
SCORE_TYPES = ("fre", "nll")
ROI_STAGES = ("rcnn", "rpn")
RKDE_FRAME = (240, 360)  # (H, W): RKDE's detector and region extractor work on images resized to it, as anomalib's
MAX_TRAINING_POINTS = 40_000  # the memory bank cap of every model: images, or regions (RKDE)


class UserError(ValueError):
    """A bad flag, config, index or artifact: the jobs print its message and exit with code 2, no traceback."""


def raise_invalid(name: str, value: Any, allowed: str) -> None:
    """Raise a UserError that names the field, its bad value and what it allows."""
    msg = f"invalid {name}={value!r}: expected {allowed}"
    raise UserError(msg)


def _field(default: Any, about: str, flag: str | None = None):
    """A config field with its description, which the fit job's flag shows with the default.

    ``flag``: the flag that sets it where that is not ``--`` and the field's name (the field's own spelling stays a
    deprecated alias); the field names never change, since they are stored in config.json and hashed into
    fingerprints."""
    return field(default=default, metadata={"help": about, **({"flag": flag} if flag else {})})


_BACKBONE = "timm CNN name, optionally with a tag"
_IMAGE_SIZE = "network input: SIZE or HEIGHT WIDTH"
_BANK = "memory bank cap: images, or regions for a model that banks regions"
_SEED = "bank sampling and random-weight seed"
_PCA = "PCA components"
_SCALING = "projections divided by the largest training norm, or unit"


def min_rows(n_components: int | float) -> int:
    """Training rows a PCA of ``n_components`` needs: k + 1 for k components, 2 for a variance fraction.

    This is the one home of the rule: centred data has rank <= n - 1, and the KDE's bandwidth covariance needs full
    rank."""
    return n_components + 1 if isinstance(n_components, int) and not isinstance(n_components, bool) else 2


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise_invalid(name, value, f"an integer >= {low}")


@dataclass(frozen=True, kw_only=True)
class DfkdeConfig:
    """DFKDE: pooled backbone features -> PCA -> scaling -> Gaussian KDE.

    ``backbone`` defaults to resnet50 (2048-d layer4 features, as the DFKDE description specifies); anomalib's code
    default is resnet18, one flag away. Several ``layers`` are concatenated on the feature axis, in the given order.
    """

    backbone: str = _field("resnet50", _BACKBONE)
    layers: tuple[str, ...] = _field(("layer4",), "feature layers, concatenated on the feature axis")
    image_size: tuple[int, int] = _field((256, 256), _IMAGE_SIZE)
    n_pca_components: int = _field(16, _PCA)
    feature_scaling: Literal["scale", "norm"] = _field("scale", _SCALING)
    max_training_points: int = _field(MAX_TRAINING_POINTS, _BANK)
    seed: int = _field(0, _SEED)
    model: str = field(default="dfkde", init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", _check_common(self))
        layers = tuple(self.layers) if isinstance(self.layers, (list, tuple)) else self.layers
        if not isinstance(layers, tuple) or not layers or not all(isinstance(x, str) and x for x in layers):
            raise_invalid("layers", self.layers, "one or more layer names such as 'layer4'")
        if len(set(layers)) != len(layers):
            raise_invalid("layers", self.layers, "distinct layer names")
        object.__setattr__(self, "layers", layers)
        _check_kde(self)

    @property
    def min_training_rows(self) -> int:
        """The KDE needs more rows than PCA components for a full-rank bandwidth covariance."""
        return min_rows(self.n_pca_components)


def _check_common(config) -> tuple[int, int]:
    if not isinstance(config.backbone, str) or not config.backbone:
        raise_invalid("backbone", config.backbone, "a timm model name such as 'resnet50'")
    size = tuple(config.image_size) if isinstance(config.image_size, (list, tuple)) else config.image_size
    if not isinstance(size, tuple) or len(size) != 2:
        raise_invalid("image_size", config.image_size, "(height, width), two integers >= 32")
    for s in size:
        _check_int("image_size", s, 32)
    _check_int("max_training_points", config.max_training_points, 2)
    _check_int("seed", config.seed, 0)
    return size


def _check_kde(config) -> None:
    """The KDE head's settings (DFKDE, RKDE): PCA components, scaling, and a bank cap above the component count."""
    _check_int("n_pca_components", config.n_pca_components, 1)
    if config.feature_scaling not in FEATURE_SCALINGS:
        raise_invalid("feature_scaling", config.feature_scaling, f"one of {list(FEATURE_SCALINGS)}")
    _check_int("max_training_points", config.max_training_points, 2)
    if config.max_training_points < min_rows(config.n_pca_components):
        raise_invalid("max_training_points", config.max_training_points,
                      f"more than n_pca_components={config.n_pca_components} (the KDE needs a full-rank covariance)")


@dataclass(frozen=True, kw_only=True)
class DfmConfig:
    """DFM: one backbone layer -> avg-pool -> PCA keeping a variance fraction -> FRE or Gaussian NLL.

    ``pca_level`` in (0, 1) keeps the smallest number of components reaching that explained-variance fraction
    (scikit-learn's rule); an integer > 1 keeps exactly that many.
    """

    backbone: str = _field("resnet50", _BACKBONE)
    layer: str = _field("layer3", "DFM: exactly one feature layer", flag="--layers")
    pooling_kernel_size: int = _field(4, "average-pooling kernel")
    pca_level: float | int = _field(0.97, "variance fraction in (0, 1), or an integer number of components > 1")
    score_type: Literal["fre", "nll"] = _field("fre", "feature reconstruction error (with anomaly maps) or Gaussian "
                                                      "NLL")
    image_size: tuple[int, int] = _field((256, 256), _IMAGE_SIZE)
    max_training_points: int = _field(MAX_TRAINING_POINTS, _BANK)
    seed: int = _field(0, _SEED)
    model: str = field(default="dfm", init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", _check_common(self))
        if not isinstance(self.layer, str) or not self.layer:
            raise_invalid("layer", self.layer, "one layer name such as 'layer3'")
        _check_int("pooling_kernel_size", self.pooling_kernel_size, 1)
        level = self.pca_level
        if isinstance(level, float) and level.is_integer() and level > 1:
            level = int(level)
            object.__setattr__(self, "pca_level", level)
        fraction = isinstance(level, float) and 0 < level < 1
        integer = isinstance(level, int) and not isinstance(level, bool) and level > 1
        if not (fraction or integer):
            raise_invalid("pca_level", self.pca_level,
                          "a variance fraction in (0, 1) or an integer number of components > 1")
        if self.score_type not in SCORE_TYPES:
            raise_invalid("score_type", self.score_type, f"one of {list(SCORE_TYPES)}")
        if self.max_training_points < self.min_training_rows:
            raise_invalid("max_training_points", self.max_training_points, f"at least {self.min_training_rows} for "
                          f"pca_level={self.pca_level}")

    @property
    def layers(self) -> tuple[str, ...]:
        return (self.layer,)

    @property
    def min_training_rows(self) -> int:
        """An integer ``pca_level`` k needs k + 1 rows (centred data has rank <= n - 1); a fraction needs 2."""
        return min_rows(self.pca_level)


@dataclass(frozen=True, kw_only=True)
class RkdeConfig:
    """RKDE: Faster R-CNN regions -> RoI features (4096-d) -> PCA + scaling + Gaussian KDE per region.

    The image score is the largest region score; boxes are reported in original image pixels."""

    roi_stage: Literal["rcnn", "rpn"] = _field("rcnn", "regions from the detector's boxes or from the RPN's "
                                                       "proposals")
    roi_score_threshold: float = _field(0.001, "lowest candidate score kept")
    min_box_size: int = _field(25, "smallest box side, pixels of the RKDE frame")
    iou_threshold: float = _field(0.3, "class-agnostic NMS")
    max_detections_per_image: int = _field(100, "regions kept per image")
    n_pca_components: int = _field(16, _PCA)
    feature_scaling: Literal["scale", "norm"] = _field("scale", _SCALING)
    image_size: tuple[int, int] = _field(RKDE_FRAME, f"{_IMAGE_SIZE}; fixed for RKDE")
    max_training_points: int = _field(MAX_TRAINING_POINTS, _BANK)
    seed: int = _field(0, _SEED)
    model: str = field(default="rkde", init=False)

    def __post_init__(self) -> None:
        size = tuple(self.image_size) if isinstance(self.image_size, (list, tuple)) else self.image_size
        if size != RKDE_FRAME:
            raise_invalid("image_size", self.image_size,
                          f"{RKDE_FRAME}: RKDE's detector and region extractor work on that frame")
        object.__setattr__(self, "image_size", size)
        if self.roi_stage not in ROI_STAGES:
            raise_invalid("roi_stage", self.roi_stage, f"one of {list(ROI_STAGES)}")
        for name in ("roi_score_threshold", "iou_threshold"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise_invalid(name, v, "a number in [0, 1]")
        _check_int("min_box_size", self.min_box_size, 0)
        _check_int("max_detections_per_image", self.max_detections_per_image, 1)
        if self.max_detections_per_image > REGION_ID_STRIDE:
            raise_invalid("max_detections_per_image", self.max_detections_per_image,
                          f"at most {REGION_ID_STRIDE} (bank ids)")
        _check_kde(self)
        _check_int("seed", self.seed, 0)

    @property
    def min_training_rows(self) -> int:
        """At least one image; the region count is checked when the bank is gathered (more than n_pca_components)."""
        return 1


ModelConfig = DfkdeConfig | DfmConfig | RkdeConfig


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """How a job runs: resources and batching, recorded in the artifact's provenance.

    None of it is part of a model's identity except ``precision``: bf16 moves the numbers, so a fitted model keeps the
    precision it was fitted in (``Artifact.precision``) and scoring uses it unless told otherwise."""

    batch_size: int = 32
    rows_per_part: int = 0  # output rows per parquet part (the unit of work of a scoring actor and of resumption); 0:
    # from the index and what the output holds (parts.rows_per_part)
    num_actors: int = 1
    num_gpus_per_actor: float = 0.0
    num_cpus_per_actor: float = 1.0
    progress: bool = True  # Ray Data's progress bars (one block of lines per interval where stdout is no terminal)
    threads_per_actor: int = 0  # 0: keep what Ray sets (OMP_NUM_THREADS from num_cpus)
    device: str = "cpu"
    precision: str = "fp32"  # "bf16": autocast where it measures fast (launch.start_ray); scores move slightly
    bf16_speedup: float = 0.0  # what --precision auto measured where the actors run (0: not measured)
    io_retries: int = 40  # retries of a transient storage error, per request (storage.ReadPolicy)
    max_file_bytes: int = 256 * 2**20  # larger image files are refused from their size, before reading
    # A model stage where no call finishes for this long ends the job (Ray Data's no-progress guard); one where no
    # actor could start for this long, too. ``flag``: the job flag that sets the field (messages name it).
    no_progress_s: float = field(default=1800.0, metadata={"flag": "--no-progress-timeout"})
    start_timeout_s: float = field(default=600.0, metadata={"flag": "--wait-for-actors"})

    def __post_init__(self) -> None:
        _check_int("batch_size", self.batch_size, 1)
        _check_int("io_retries", self.io_retries, 0)
        _check_int("max_file_bytes", self.max_file_bytes, 1)
        _check_int("rows_per_part", self.rows_per_part, 0)
        _check_int("num_actors", self.num_actors, 1)
        _check_int("threads_per_actor", self.threads_per_actor, 0)
        for name in ("num_gpus_per_actor", "num_cpus_per_actor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise_invalid(name, v, "a number >= 0")
        if self.device not in ("cpu", "cuda"):
            raise_invalid("device", self.device, "'cpu' or 'cuda'")
        if self.precision not in ("fp32", "bf16"):
            raise_invalid("precision", self.precision, "'fp32' or 'bf16'")
        for name in ("no_progress_s", "start_timeout_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise_invalid(name, v, "seconds > 0")


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """JSON-ready dict of a model config, with the ``model`` tag."""
    d = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# RKDE's pretrained weights: two files a user downloads once (nothing is downloaded here), passed as a path or URI.
# torchvision names its file after the first 8 hex digits of its sha256 (torch.hub's convention, checked on reading:
# ``features.check_hash_in_name``); anomalib's file name has no hash.
RKDE_FILES = {
    "detector_weights": ("torchvision's COCO_V1 Faster R-CNN ResNet-50 FPN",
                         "https://download.pytorch.org/models/fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"),
    "region_weights": ("anomalib's RKDE region feature extractor (fc6/fc7)",
                       "https://github.com/openvinotoolkit/anomalib/releases/download/rkde-weights/"
                       "rkde_feature_extractor.pth"),
}


def rkde_file_help(flag: str) -> str:
    """Where RKDE's weights file for ``flag`` comes from: what it is, its name and its download URL."""
    what, url = RKDE_FILES[flag]
    name = url.rsplit("/", 1)[-1]
    return f"{what}: {name} from {url}"


def rkde_files_needed(missing: list[str]) -> UserError:
    """The refusal of RKDE's pretrained weights without their files: which to download from where, which flags."""
    flags = "/".join("--" + f.replace("_", "-") for f in missing)
    where = "; ".join(f"--{f.replace('_', '-')} PATH|URI: {rkde_file_help(f)}" for f in RKDE_FILES)
    return UserError(f"invalid {flags}=None: RKDE's pretrained weights (--pretrained, the default with --index) are "
                     f"two files to download once, nothing is downloaded here: {where}; or --no-pretrained for "
                     "random weights seeded with --seed (scores then reflect low-level image statistics, not "
                     "learned defects)")
