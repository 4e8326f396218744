"""What differs between the models, in one table: ``SPECS``, one ``ModelSpec`` per model.

For each model: its config class, where its weights come from (the fit flags, the files a score job may find
elsewhere, the loader the actors use), its feature stage, its head, how many bank items an image gives, its output
columns, and whether its feature stage runs in bf16. ``stages``, ``workflows``, ``artifact`` and ``jobs/`` ask
``spec_of(config)`` and name no model.

A new model is one more ``ModelSpec``: a config dataclass (its fields are the fit flags, its defaults written once),
a head (``fit``, ``score_samples`` higher = more normal, ``to_arrays``), the weight functions and an ``outputs``
function (``score_outputs`` for an image-level model). ``register`` adds one at run time (tests/test_specs.py
defines a toy fourth model so). The spec travels to the actors with their arguments (Ray pickles it), so a model
registered in the driver alone runs on every worker.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from rayanom.columns import (
    BOXES_COL, BOX_SCORES_COL, HEIGHT_COL, MAP_COL, MAP_SHAPE_COL, NUM_REGIONS_COL, PROB_COL, SCORE_COL, WIDTH_COL,
)
from rayanom.config import RKDE_FILES, DfkdeConfig, DfmConfig, RkdeConfig, raise_invalid, rkde_file_help
from rayanom.heads import DfmHead, KdeHead, anomaly_probability
from rayanom.storage import read_weights_file, same_file

logger = logging.getLogger(__name__)


@dataclass
class ScoringBatch:
    """A decoded batch as a model's ``outputs`` sees it.

    The table (``decode_table``'s), which rows decoded (``ok``) and their images, the error of each row (a list the
    outputs may fill), and the actor's feature stage, head and device."""

    table: pa.Table
    ok: np.ndarray
    errors: list
    extractor: Any
    head: Any
    config: Any
    device: str
    images: np.ndarray  # (m, 3, h, w) float32: the ``ok`` rows' images

    @property
    def n(self) -> int:
        return self.table.num_rows

    def features(self):
        """The ``ok`` rows' features from the feature stage (a tensor on the device)."""
        return self.extractor.features(self.images)

    def valid(self, score: np.ndarray, what: str = "anomaly score") -> np.ndarray:
        """Rows with a score: decoded, no error, a finite ``score``.

        A decoded row whose score is not finite gets an error saying so."""
        for i in np.flatnonzero(self.ok & ~np.isfinite(score)):
            if self.errors[i] is None:
                self.errors[i] = f"ValueError: non-finite {what} (non-finite features?)"
        return np.array([e is None for e in self.errors], dtype=bool)


def masked(values: np.ndarray, valid: np.ndarray, type_=pa.float64()) -> pa.Array:
    """``values`` as an Arrow column, null where not ``valid``."""
    return pa.array(values, type_, mask=~valid)


def image_scores(b: ScoringBatch) -> np.ndarray:
    """Per row, -``head.score_samples`` of the image's features (higher = more anomalous); NaN where not decoded."""
    score = np.full(b.n, np.nan)
    if b.ok.any():
        score[b.ok] = -b.head.score_samples(b.features(), device=b.device)
    return score


def score_outputs(b: ScoringBatch) -> dict[str, pa.Array]:
    """An image-level model's outputs: ``anomaly_score`` only."""
    score = image_scores(b)
    return {SCORE_COL: masked(score, b.valid(score))}


def _kde_outputs(b: ScoringBatch) -> dict[str, pa.Array]:
    """DFKDE: ``anomaly_score`` (-log density) and ``anomaly_probability`` (anomalib's sigmoid of the log density)."""
    score = image_scores(b)
    valid = b.valid(score)
    return {SCORE_COL: masked(score, valid), PROB_COL: masked(anomaly_probability(-score), valid)}


def _dfm_outputs(b: ScoringBatch) -> dict[str, pa.Array]:
    """DFM's output columns: ``anomaly_score`` (FRE or NLL) and, for FRE, the anomaly map.

    The map holds the channel sums of the squared residuals at the pooled resolution, flattened row-major, with its
    shape and the original image size (for upsampling: ``maps``)."""
    fre = b.config.score_type == "fre"
    score, maps = np.full(b.n, np.nan), None
    if b.ok.any():
        shape = b.extractor.map_shape if fre else None
        score[b.ok], maps = b.head.score_with_maps(b.features(), device=b.device, map_shape=shape)
    valid = b.valid(score)
    out = {SCORE_COL: masked(score, valid)}
    if not fre:
        return out
    _, h, w = b.extractor.map_shape
    full = np.zeros((b.n, h * w), dtype=np.float32)
    if maps is not None:
        full[b.ok] = maps
    return {**out, MAP_COL: pa.array(list(full), pa.list_(pa.float32()), mask=~valid),
            MAP_SHAPE_COL: pa.array([[h, w] if v else None for v in valid], pa.list_(pa.int32())),
            HEIGHT_COL: b.table.column(HEIGHT_COL), WIDTH_COL: b.table.column(WIDTH_COL)}


def _region_outputs(b: ScoringBatch) -> dict[str, pa.Array]:
    from rayanom.regions import region_outputs

    return region_outputs(b)


# --- weights: timm backbones (DFKDE, DFM) and the two RKDE networks ------------------------------------------

PRETRAINED_FLAG = ({"action": argparse.BooleanOptionalAction, "default": None},
                   "pretrained weights: timm's pretrained tag (the network or an HF_HOME cache), or RKDE's two files "
                   "(--detector-weights, --region-weights: required then); default: yes with --index, no for the "
                   "demo (random weights seeded with --seed; on a user index a WARNING says what its scores mean)")
TIMM_WEIGHT_FLAGS = {
    "weights": ({"metavar": "PATH"}, "timm state dict (.safetensors, e.g. model.safetensors of the Hugging Face repo "
                "timm/<name>.<tag>, or .pth read with weights_only=True), local or a URI; every actor reads it, so on "
                "a cluster a path every node can read; its sha256 is recorded (default: none)"),
    "pretrained": PRETRAINED_FLAG,
}


RKDE_WEIGHT_FLAGS = {
    flag: ({"metavar": "PATH"}, f"{rkde_file_help(flag)}, downloaded once, local or a URI (as --weights); its sha256 "
           "is recorded (default: none, seeded random weights with --no-pretrained or for the demo)")
    for flag in RKDE_FILES
}
RKDE_WEIGHT_FLAGS["pretrained"] = PRETRAINED_FLAG


def _pretrained(flags: dict, download: bool) -> bool:
    """``--pretrained`` / ``--no-pretrained``, by default ``download`` (a user index; never the demo)."""
    pretrained = flags.get("pretrained")
    return bool(download if pretrained is None else pretrained)


def timm_weights(config, flags: dict, download: bool) -> tuple[dict, dict]:
    """The backbone's state and source from the fit flags.

    ``--weights PATH``, else timm's pretrained tag when ``--pretrained`` (by default when ``download``, a user index;
    never for the demo), else a seeded random init."""
    from rayanom.features import resolve_weights

    return resolve_weights(config, flags.get("weights"), not flags.get("weights") and _pretrained(flags, download))


def timm_weights_help(config) -> str:
    """How to get pretrained weights for ``config``'s timm backbone."""
    from rayanom.features import timm_weights_source

    return f"drop --no-pretrained, or pass --weights PATH|URI ({timm_weights_source(config.backbone)})"


def load_timm_weights(config, source: dict, files: dict) -> dict:
    from rayanom.features import artifact_weights

    return artifact_weights(config, source, files.get("weights"))


def _same_file(path: str, recorded: dict, flag: str) -> None:
    same_file({"path": path, "sha256": read_weights_file(path, flag)[1]}, recorded, flag)
    logger.info("%s=%s: sha256 %s, the file the model was fitted with", flag, path, recorded["sha256"])


def check_timm_weights(config, source: dict, files: dict) -> None:
    """Check ``load_timm_weights``' source without building the backbone (nor importing torch).

    In the two usual cases: a file is the one recorded (its sha256; it was checked against the backbone at fit time),
    a random init has the config's seed. Anything else is loaded: timm's pretrained weights (the one proof that they
    can be), and the errors."""
    kind, moved = source.get("kind"), files.get("weights")
    if kind == "file":
        _same_file(moved or source["path"], source, "weights")
    elif not (kind == "random" and source.get("seed") == config.seed and not moved):
        load_timm_weights(config, source, files)


def _rkde_weights(config, flags: dict, download: bool) -> tuple[dict, dict]:
    """Both RKDE networks' states and source from the fit flags.

    Their files, required with ``--pretrained`` (by default when ``download``, a user index), else seeded random
    inits where a file is not given."""
    from rayanom.regions import rkde_weights

    return rkde_weights(config, flags.get("detector_weights"), flags.get("region_weights"),
                        pretrained=_pretrained(flags, download))


def _rkde_weights_help(config) -> str:
    """How to get RKDE's pretrained weights: its two files' flags, names and URLs."""
    return "pass " + " and ".join(f"--{f.replace('_', '-')} PATH|URI ({rkde_file_help(f)})" for f in RKDE_FILES)


def _load_rkde_weights(config, source: dict, files: dict) -> dict:
    from rayanom.regions import rkde_artifact_weights

    return rkde_artifact_weights(config, source, files.get("detector_weights"), files.get("region_weights"))


def _check_rkde_weights(config, source: dict, files: dict) -> None:
    """Check ``_load_rkde_weights``' source without building the networks where it can.

    Where each is a recorded file or a seeded random init (as ``check_timm_weights``); anything else is loaded, for
    its error."""
    for part, flag in (("detector", "detector_weights"), ("region", "region_weights")):
        recorded = source.get(part, {}) if source.get("kind") == "rkde" else {}
        if recorded.get("kind") == "file":
            _same_file(files.get(flag) or recorded["path"], recorded, flag)
        elif not (recorded.get("kind") == "random" and recorded.get("seed") == config.seed and not files.get(flag)):
            _load_rkde_weights(config, source, files)
            return


RANDOM_MEANING = ("its features are random, so its scores reflect low-level image statistics (brightness, colour, "
                  "texture), not learned defects: they are not meaningful for real defects")


def random_parts(source: dict) -> list[str]:
    """The networks of a weight source that are random inits.

    None, ``["backbone"]``, or parts of a source of several networks (RKDE's ``detector``, ``region``)."""
    if source.get("kind") == "random":
        return ["backbone"]
    return [name for name, part in source.items() if isinstance(part, dict) and part.get("kind") == "random"]


def random_weights_warning(config, source: dict, demo: bool) -> str | None:
    """The one decision on random weights: the WARNING for a fit on random weights, or None.

    A fit on any index but the demo's with a random init logs a WARNING that says what its scores mean and how to get
    the pretrained weights (``ModelSpec.weights_help``) and returns it; None for pretrained weights or files, or the
    demo."""
    parts = random_parts(source)
    if demo or not parts:
        return None
    msg = (f"{config.model} is fitted with random {' and '.join(parts)} weights (seed {config.seed}) on an index "
           f"that is not the demo's: {RANDOM_MEANING}. Pretrained weights: {spec_of(config).weights_help(config)}")
    logger.warning("%s", msg)
    return msg


def describe_weights(source: dict) -> str:
    """A weight source in one line: a file's path and the sha256 recorded for it, timm's tag, or the random seed."""
    kind = source.get("kind")
    if kind == "file":
        return f"file {source.get('path')} sha256 {source.get('sha256')}"
    if kind == "timm":
        return f"timm {source.get('tag')}"
    if kind == "random":
        return f"random, seed {source.get('seed')}"
    parts = [f"{name} {describe_weights(part)}" for name, part in source.items() if isinstance(part, dict)]
    return "; ".join(parts) or repr(source)


def report_weights(config, source: dict, demo: bool) -> str:
    """What the fit job says of its weights.

    The warning on random weights (``random_weights_warning``) is logged, and the line it prints (``weights: ...``,
    with each file's recorded sha256) returned."""
    random_weights_warning(config, source, demo)
    return f"weights: {describe_weights(source)}"


# --- feature stages and heads ---------------------------------------------------------------------------------

def backbone_extractor(config, state: dict, device: str, threads: int, precision: str):
    """A timm backbone's pooled features (``features.FeatureExtractor``)."""
    from rayanom.features import FeatureExtractor

    return FeatureExtractor(config, state, device, threads, precision)


def _region_extractor(config, state: dict, device: str, threads: int, precision: str):
    import torch

    from rayanom.regions import RegionModel

    if threads > 0:
        torch.set_num_threads(threads)
    return RegionModel(state["detector"], state["region"], roi_stage=config.roi_stage,
                       roi_score_threshold=config.roi_score_threshold, min_box_size=config.min_box_size,
                       iou_threshold=config.iou_threshold, max_detections_per_image=config.max_detections_per_image,
                       device=device)


def image_items(extractor, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bank items of an image-level model: one feature row per image."""
    return np.ones(len(images), np.int64), extractor(images)


def _region_items(extractor, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RKDE's bank items: one feature row per region of each image."""
    results = extractor(images)
    counts = np.array([len(b) for b, _ in results], dtype=np.int64)
    feats = np.concatenate([f for _, f in results]) if counts.sum() else np.zeros((0, extractor.dim), np.float32)
    return counts, feats


def _kde_head(config):
    return KdeHead(config.n_pca_components, config.feature_scaling)


def _dfm_head(config):
    return DfmHead(config.pca_level, config.score_type)


@dataclass(frozen=True)
class ModelSpec:
    """One model's choices: what differs per model lives here.

    Ray pickles a spec with cloudpickle: the library's functions by reference, lambdas and the functions of a model
    defined in a test or a notebook by value. ``outputs`` must give ``anomaly_score`` and then exactly
    ``columns(config)`` (the scorer checks it: the report's checks before any work rely on it)."""

    name: str
    config: type  # its config dataclass: defaults, validation, and (its fields) the fit flags
    head: Callable[[Any], Any]  # config -> an unfitted head: fit(x), score_samples(x, device=), to_arrays(), ARRAYS
    extractor: Callable[..., Any]  # (config, state, device, threads, precision) -> the feature stage
    weights: Callable[[Any, dict, bool], tuple[dict, dict]]  # (config, weight flags, download) -> state, source
    load_weights: Callable[[Any, dict, dict], dict]  # (config, source, moved files) -> state, checked against source
    outputs: Callable[[ScoringBatch], dict[str, pa.Array]]  # a batch -> its output columns (anomaly_score first)
    columns: Callable[[Any], tuple[str, ...]]  # config -> the output columns beyond anomaly_score and error
    weight_flags: dict[str, tuple[dict, str]] = field(default_factory=lambda: dict(TIMM_WEIGHT_FLAGS))
    items: Callable[[Any, np.ndarray], tuple[np.ndarray, np.ndarray]] = image_items  # bank items per image, features
    slots: Callable[[Any], int] = lambda config: 1  # the most bank items an image gives
    bf16: bool = True  # the feature stage runs in bf16 (--precision bf16 / auto)
    subset_note: str = ""  # said when the bank is a subset of the training rows, where that departs from anomalib
    demo_sizes: dict = field(default_factory=dict)  # a smaller demo set (``demo.make_demo``'s sizes) for a slow model
    # The score job's check on the driver, before Ray starts, that the actors will find the weights ``load_weights``
    # loads (same arguments); it need not build the network. None: ``load_weights`` itself.
    check_weights: Callable[[Any, dict, dict], None] | None = None
    # config -> how to get the pretrained weights (flags, files, URLs), for the random-weights warning
    weights_help: Callable[[Any], str] = timm_weights_help

    @property
    def weight_files(self) -> tuple[str, ...]:
        """The weight flags that name files (a score job may find them at other paths)."""
        return tuple(k for k, (kwargs, _) in self.weight_flags.items() if kwargs.get("metavar") == "PATH")


def _rkde_slots(config) -> int:
    return config.max_detections_per_image


SPECS: dict[str, ModelSpec] = {
    "dfkde": ModelSpec(name="dfkde", config=DfkdeConfig, head=_kde_head, extractor=backbone_extractor,
                       weights=timm_weights, load_weights=load_timm_weights, check_weights=check_timm_weights,
                       outputs=_kde_outputs, columns=lambda config: (PROB_COL,)),
    "dfm": ModelSpec(name="dfm", config=DfmConfig, head=_dfm_head, extractor=backbone_extractor,
                     weights=timm_weights, load_weights=load_timm_weights, check_weights=check_timm_weights,
                     outputs=_dfm_outputs,
                     columns=lambda config: ((MAP_COL, MAP_SHAPE_COL, HEIGHT_COL, WIDTH_COL)
                                             if config.score_type == "fre" else ()),
                     subset_note="anomalib fits DFM on all of them"),
    "rkde": ModelSpec(name="rkde", config=RkdeConfig, head=_kde_head, extractor=_region_extractor,
                      weights=_rkde_weights, load_weights=_load_rkde_weights, check_weights=_check_rkde_weights,
                      outputs=_region_outputs,
                      columns=lambda config: (PROB_COL, NUM_REGIONS_COL, BOXES_COL, BOX_SCORES_COL),
                      weight_flags=dict(RKDE_WEIGHT_FLAGS), weights_help=_rkde_weights_help, items=_region_items,
                      slots=_rkde_slots, bf16=False,
                      # a Faster R-CNN at 800 x 1200 per image (~3 s on a 2-core CPU): a smaller demo set
                      demo_sizes={"n_train": 30, "n_test_normal": 10, "n_test_anomalous": 10}),
}


def register(spec: ModelSpec) -> None:
    """Add a model (tests, notebooks, plugins); its name must be new."""
    if spec.name in SPECS:
        raise_invalid("model", spec.name, f"a name not among {list(SPECS)}")
    SPECS[spec.name] = spec


def spec(name: str) -> ModelSpec:
    if name not in SPECS:
        raise_invalid("model", name, f"one of {list(SPECS)}")
    return SPECS[name]


def spec_of(config) -> ModelSpec:
    return spec(config.model)


def config_from_dict(d: dict[str, Any], model: ModelSpec | None = None):
    """Inverse of ``config.config_to_dict``; unknown keys and models are errors naming the valid ones.

    ``model``: the spec to read it with (else found by the ``model`` tag)."""
    if not isinstance(d, dict):
        raise_invalid("config", d, "a JSON object")
    if model is not None and d.get("model") != model.name:
        raise_invalid("model", d.get("model"), repr(model.name))
    cls = (model or spec(d.get("model"))).config
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d) - names - {"model"})
    if unknown:
        raise_invalid("config keys", unknown, f"keys among {sorted(names)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k != "model"})
