"""Region stage of RKDE: detector boxes in the 240 x 360 network frame, then a 4096-d feature per box.

What anomalib 1.2.0's ``RegionExtractor`` and ``FeatureExtractor`` compute:
a torchvision Faster R-CNN ResNet-50 FPN (COCO_V1 layout) proposes boxes, ``postprocess`` keeps the large,
non-overlapping, best-scoring ones, and the AlexNet-style Fast R-CNN trunk gives each box its fc7 activations
(RoIAlign 6 x 6 at stride 16 -> fc6 -> fc7). Images come in resized to 240 x 360 (H x W), RGB in [0, 1], not
normalised: both networks normalise internally. Weights are resolved once, on the driver, like the backbones
(``rayanom.features``): a local file or URI (read without unpickling; its sha256 recorded) or a seeded random init;
nothing is downloaded. The pretrained files (torchvision's ``fasterrcnn_resnet50_fpn_coco-258fb6c6.pth`` and
anomalib's ``rkde_feature_extractor.pth``) and their URLs are listed once, in ``config.RKDE_FILES``.

Deviations from anomalib 1.2.0, each deliberate:

* Boxes are rescaled with x by the width ratio and y by the height ratio (anomalib's ``scale_boxes`` swaps them).
  RPN proposals are rescaled from the resized image size, not the padded batch size (anomalib shrinks y by
  1200/1216 ~ 1.3 %). In the region feature extractor the fix changes nothing at 240 x 360 (both ratios are 2.5).
* Boxes can be mapped to original image pixels (``boxes_to_original``); anomalib stops at the 240 x 360 frame.
* RPN stage: every proposal scores 1, so the class-agnostic NMS order is a tie. Here NMS ranks proposals by their
  RPN order (descending objectness) explicitly. That is what anomalib gets on CPU, where torchvision's NMS sort is
  stable, and it no longer depends on how a device's sort breaks ties.
* The detector is built as ``fasterrcnn_resnet50_fpn(pretrained=True)`` builds it (FrozenBatchNorm2d with eps 0, no
  ``num_batches_tracked``) and then given a state dict. ``fasterrcnn_resnet50_fpn(weights=None)`` would build plain
  BatchNorm2d layers (eps 1e-5), whose key layout differs from the COCO_V1 file and whose numbers differ from anomalib.
* Random region-extractor weights are He-normal with zero biases (PyTorch's default init makes random fc7
  activations vanishingly small); random detector weights are torchvision's own init. Both only serve tests and demos.
* anomalib rescales the caller's rois in place; nothing here mutates its inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Literal

import numpy as np
import pyarrow as pa
import torch
import torchvision.transforms.functional as TF
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import nms, remove_small_boxes, roi_align
from torchvision.ops.misc import FrozenBatchNorm2d

from rayanom.columns import BOXES_COL, BOX_SCORES_COL, HEIGHT_COL, NUM_REGIONS_COL, PROB_COL, SCORE_COL, WIDTH_COL
from rayanom.config import RKDE_FRAME, RkdeConfig, UserError, rkde_files_needed
from rayanom.decode import IMAGENET_MEAN, IMAGENET_STD
from rayanom.features import input_tensor, load_state_file, match_state, seeded
from rayanom.heads import anomaly_probability
from rayanom.storage import same_file

logger = logging.getLogger(__name__)

FRAME_SIZE = RKDE_FRAME  # (H, W) the images are resized to, as by anomalib 1.2.0's RKDE transform
FEATURE_DIM = 4096
COCO_CLASSES = 91  # COCO_V1 detector: 90 classes and background
EXTRACTOR_SIZE, EXTRACTOR_MAX_SIZE = 600, 1000  # the region extractor's Resize(size=600, max_size=1000)


def build_detector(roi_stage: Literal["rcnn", "rpn"] = "rcnn", roi_score_threshold: float = 0.001,
                   max_detections_per_image: int = 100) -> FasterRCNN:
    """Faster R-CNN ResNet-50 FPN, without weights, exactly as anomalib's RegionExtractor configures it.

    The body of ``fasterrcnn_resnet50_fpn`` on its pretrained path: FrozenBatchNorm2d with eps 0 (torchvision's
    ``overwrite_eps`` for COCO_V1), 3 trainable layers (which only sets ``requires_grad``), 91 classes.
    """
    rpn = roi_stage == "rpn"
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None,
                                   norm_layer=partial(FrozenBatchNorm2d, eps=0.0), trainable_layers=3)
    model = FasterRCNN(
        backbone,
        num_classes=COCO_CLASSES,
        rpn_post_nms_top_n_test=max_detections_per_image if rpn else 1000,
        rpn_score_thresh=roi_score_threshold if rpn else 0.0,
        box_score_thresh=roi_score_threshold,
        box_nms_thresh=1.0,  # per-class NMS off: one class-agnostic NMS follows in postprocess
        box_detections_per_img=1000,
    )
    return model.eval()


class RegionFeatureNet(nn.Module):
    """The AlexNet-style Fast R-CNN region feature extractor of anomalib's RKDE, keys as ``rkde_feature_extractor.pth``.

    ``features.{0,3,6,8,10}`` are the convolutions and ``classifier.{0,2}`` fc6 and fc7; there is no third max-pool,
    so the trunk's stride is 16.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(
            nn.Linear(256 * 6 * 6, FEATURE_DIM), nn.ReLU(inplace=True),
            nn.Linear(FEATURE_DIM, FEATURE_DIM), nn.ReLU(inplace=True),
        )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] and (R, 5) rois [batch index, x1, y1, x2, y2] in that frame -> (R, 4096)."""
        x = TF.resize(images, [EXTRACTOR_SIZE], max_size=EXTRACTOR_MAX_SIZE, antialias=True)
        boxes = rois[:, 1:] * _xy_ratios(images.shape[-2:], x.shape[-2:], rois.device)
        x = self.features((x - self.mean) / self.std)
        x = roi_align(x, torch.cat([rois[:, :1], boxes], dim=1), (6, 6), spatial_scale=1 / 16, sampling_ratio=0,
                      aligned=False)
        return self.classifier(x.flatten(1))


def _xy_ratios(old_hw: tuple[int, int], new_hw: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(rW, rH, rW, rH) for xyxy boxes, float32 as torchvision computes them.

    x is scaled by the width ratio and y by the height ratio (anomalib's ``scale_boxes`` swaps them)."""
    ratio = torch.tensor([new_hw[1], new_hw[0]], dtype=torch.float32) / torch.tensor([old_hw[1], old_hw[0]],
                                                                                     dtype=torch.float32)
    return ratio.repeat(2).to(device)


def _he_init(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
    return model


def _numpy_state(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def _network_weights(path: str | None, seed: int, build: Callable[[], nn.Module], what: str,
                     field: str) -> tuple[dict[str, np.ndarray], dict]:
    if path:
        with torch.device("meta"):  # only the key layout and shapes are needed: no init, no memory
            model = build()
        state, sha = load_state_file(path, field)
        state = match_state(state, model, f"{field}={path!r}", what)
        source = {"kind": "file", "path": path, "sha256": sha}
    else:
        with seeded(seed):
            state = _numpy_state(build())
        source = {"kind": "random", "seed": seed}
    logger.info("%s weights: %s", what, source)
    return state, source


def detector_state(path: str | None, seed: int) -> tuple[dict[str, np.ndarray], dict]:
    """Faster R-CNN ResNet-50 FPN state dict (COCO_V1 layout) as numpy, and a JSON description of its source.

    Args:
        path: a local state dict (``.safetensors``, or ``.pth`` read with ``weights_only=True``), e.g. torchvision's
            ``fasterrcnn_resnet50_fpn_coco-258fb6c6.pth``; None for torchvision's random init seeded with ``seed``
            (the global torch RNG is left untouched).
        seed: seed of the random init.

    Returns:
        (state, source), source ``{"kind": "file", "path", "sha256"}`` or ``{"kind": "random", "seed"}``.

    Raises:
        UserError: unreadable file, missing or unexpected keys, wrong shapes.
    """
    return _network_weights(path, seed, build_detector, "Faster R-CNN ResNet-50 FPN detector", "detector_weights")


def region_extractor_state(path: str | None, seed: int) -> tuple[dict[str, np.ndarray], dict]:
    """Region feature extractor state dict (keys of anomalib's ``rkde_feature_extractor.pth``) and its source.

    Same contract as ``detector_state``; the random init is He-normal with zero biases.
    """
    return _network_weights(path, seed, lambda: _he_init(RegionFeatureNet()), "RKDE region feature extractor",
                            "region_weights")


def _keep(boxes: torch.Tensor, scores: torch.Tensor, score_threshold: float | None, min_box_size: float,
          iou_threshold: float, max_detections_per_image: int) -> torch.Tensor:
    idx = torch.arange(len(boxes), device=boxes.device)
    if score_threshold is not None:
        idx = idx[scores > score_threshold]
    idx = idx[remove_small_boxes(boxes[idx], min_box_size)]
    idx = idx[nms(boxes[idx], scores[idx], iou_threshold)]
    return idx[:max_detections_per_image]


def postprocess(boxes: np.ndarray, scores: np.ndarray, *, score_threshold: float | None = 0.001,
                min_box_size: float = 25, iou_threshold: float = 0.3,
                max_detections_per_image: int = 100) -> np.ndarray:
    """Indices of the regions RKDE keeps among one image's candidates, best score first, as anomalib keeps them.

    The rule is that of anomalib's ``RegionExtractor``. In order: ``score > score_threshold`` (torchvision's
    ``box_score_thresh`` rule; None skips it), boxes at least ``min_box_size`` wide and high, class-agnostic NMS
    dropping boxes with IoU > ``iou_threshold`` with a better kept box, then the first ``max_detections_per_image``.

    Args:
        boxes: (n, 4) [x1, y1, x2, y2].
        scores: (n,).
        score_threshold: minimum score (exclusive), or None.
        min_box_size: minimum width and height, pixels.
        iou_threshold: NMS IoU threshold.
        max_detections_per_image: at most this many indices.

    Returns:
        (k,) int64 indices into ``boxes``, by descending score.
    """
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4)
    s = torch.as_tensor(np.asarray(scores, dtype=np.float32)).reshape(-1)
    if len(b) != len(s):
        msg = f"invalid scores: {len(s)} scores for {len(b)} boxes"
        raise ValueError(msg)
    return _keep(b, s, score_threshold, min_box_size, iou_threshold, max_detections_per_image).numpy()


def boxes_to_original(boxes: np.ndarray, frame_size: tuple[int, int] = FRAME_SIZE, *,
                      original_size: tuple[int, int]) -> np.ndarray:
    """Map (k, 4) [x1, y1, x2, y2] boxes from the network frame (H x W) to original image pixels, float64.

    x is scaled by ``w / W`` and y by ``h / H`` (anomalib's ``scale_boxes`` swaps the two). Coordinates are
    continuous pixel edges, as torchvision's, so a box covering original columns [a, b) comes back as x1 = a, x2 = b;
    they are clipped to [0, w] x [0, h]. ``original_size`` may hold arrays, one (h, w) per box: the boxes of many
    images mapped at once.
    """
    (fh, fw), (h, w) = frame_size, (np.asarray(v, dtype=np.float64)[..., None] for v in original_size)
    scale = np.concatenate([w / fw, h / fh, w / fw, h / fh], axis=-1)
    # Clipped to the image: float32 boxes at the frame's edge (360.00001) would otherwise poke out by a hair.
    return np.clip(np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * scale, 0, np.concatenate([w, h, w, h], -1))


class RegionModel:
    """Regions and their features for a batch of 240 x 360 images; arrays in, arrays out, usable without Ray.

    Args:
        detector_state: from ``detector_state``.
        extractor_state: from ``region_extractor_state``.
        roi_stage: "rcnn" (detector boxes and class scores) or "rpn" (RPN proposals).
        roi_score_threshold: minimum box score ("rcnn") or RPN objectness ("rpn").
        min_box_size: minimum box width and height in frame pixels.
        iou_threshold: class-agnostic NMS threshold.
        max_detections_per_image: at most this many regions per image.
        device: torch device.
    """

    dim = FEATURE_DIM  # features per region

    def __init__(self, detector_state: dict[str, np.ndarray], extractor_state: dict[str, np.ndarray], *,
                 roi_stage: Literal["rcnn", "rpn"] = "rcnn", roi_score_threshold: float = 0.001,
                 min_box_size: float = 25, iou_threshold: float = 0.3, max_detections_per_image: int = 100,
                 device: str = "cpu") -> None:
        RkdeConfig(roi_stage=roi_stage, roi_score_threshold=roi_score_threshold, min_box_size=min_box_size,
                   iou_threshold=iou_threshold, max_detections_per_image=max_detections_per_image)  # the checks
        self.roi_stage = roi_stage
        self.options = {"score_threshold": roi_score_threshold if roi_stage == "rcnn" else None,
                        "min_box_size": min_box_size, "iou_threshold": iou_threshold,
                        "max_detections_per_image": max_detections_per_image}
        self.device = torch.device(device)
        self.detector = _loaded(build_detector(roi_stage, roi_score_threshold, max_detections_per_image),
                                detector_state, "detector", self.device)
        self.extractor = _loaded(RegionFeatureNet(), extractor_state, "region_extractor", self.device)

    def __call__(self, images: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Regions and features of each image.

        Args:
            images: (n, 3, 240, 360) float32 RGB in [0, 1] (another size works; boxes are then in that frame).

        Returns:
            Per image, boxes (k, 4) float32 [x1, y1, x2, y2] in the network frame, best score first, and their
            features (k, 4096) float32; k may be 0.
        """
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1] != 3:
            msg = f"invalid images: shape {images.shape}, expected (n, 3, height, width)"
            raise ValueError(msg)
        if not len(images):
            return []
        x = input_tensor(images, self.device)
        with torch.inference_mode():
            boxes = [b[_keep(b, s, **self.options)] for b, s in self._candidates(x)]
            features = self._features(x, boxes)
        logger.debug("regions per image: %s", [len(b) for b in boxes])
        return [(b.float().cpu().numpy(), f.float().cpu().numpy()) for b, f in zip(boxes, features, strict=True)]

    def _candidates(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image, candidate boxes in the input frame and the scores NMS ranks them by."""
        if self.roi_stage == "rcnn":
            return [(p["boxes"], p["scores"]) for p in self.detector(x)]
        images, _ = self.detector.transform(x)
        proposals, _ = self.detector.rpn(images, self.detector.backbone(images.tensors))
        out = []
        for boxes, size in zip(proposals, images.image_sizes, strict=True):
            # Already clipped to the resized image by the RPN; rescale from that size, not the padded one (anomalib
            # rescales from the padded one with swapped ratios: y shrinks by 1200/1216 at 240 x 360).
            boxes = boxes * _xy_ratios(size, x.shape[-2:], boxes.device)
            rank = torch.arange(len(boxes), 0, -1, dtype=boxes.dtype, device=boxes.device)  # RPN order, see top
            out.append((boxes, rank))
        return out

    def _features(self, x: torch.Tensor, boxes: list[torch.Tensor]) -> list[torch.Tensor]:
        counts = [len(b) for b in boxes]
        if not sum(counts):
            return [x.new_zeros((0, FEATURE_DIM)) for _ in boxes]
        index = torch.repeat_interleave(torch.arange(len(boxes), device=x.device),
                                        torch.tensor(counts, device=x.device))
        rois = torch.cat([index[:, None].to(x.dtype), torch.cat(boxes)], dim=1)
        return list(self.extractor(x, rois).split(counts))


def _loaded(model: nn.Module, state: dict[str, np.ndarray], what: str, device: torch.device) -> nn.Module:
    state = match_state(state, model, f"{what}_state", what)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
    return model.eval().to(device)


def rkde_weights(config, detector_path: str | None, region_path: str | None,
                 pretrained: bool = False) -> tuple[dict, dict]:
    """Both RKDE networks' weights, ``{"detector": state, "region": state}``, and their JSON source.

    Without a file, a random init seeded with ``config.seed`` (tests and the offline demo), unless ``pretrained``:
    then a missing file is refused, the error naming both files, their URLs and flags (``config.RKDE_FILES``). Files
    are read in order, so a bad file given before a missing one is reported first.
    """
    paths = {"detector_weights": detector_path, "region_weights": region_path}
    missing = [flag for flag, path in paths.items() if pretrained and not path]
    states, sources = {}, {}
    for part, flag, resolve in (("detector", "detector_weights", detector_state),
                                ("region", "region_weights", region_extractor_state)):
        if flag in missing:
            raise rkde_files_needed(missing)
        states[part], sources[part] = resolve(paths[flag], config.seed)
    return states, {"kind": "rkde", **sources}


def rkde_artifact_weights(config, source: dict, detector_path: str | None = None,
                          region_path: str | None = None) -> dict:
    """The weights an RKDE artifact was fitted with, checked.

    Files (at their recorded or the given paths) must match their recorded sha256, random inits their seed."""
    if source.get("kind") != "rkde":
        msg = f"invalid artifact: weight source {source!r} is not an RKDE source"
        raise UserError(msg)
    states = {}
    for part, override, resolve, flag in (("detector", detector_path, detector_state, "detector_weights"),
                                          ("region", region_path, region_extractor_state, "region_weights")):
        recorded = source.get(part, {})
        if recorded.get("kind") == "file":
            state, got = resolve(override or recorded["path"], config.seed)
            same_file(got, recorded, flag)
        elif recorded.get("kind") == "random" and recorded.get("seed") == config.seed and not override:
            state, _ = resolve(None, config.seed)
        else:
            msg = f"invalid {flag}: the model was fitted with {recorded!r}"
            raise UserError(msg)
        states[part] = state
    return states


def region_outputs(b) -> dict:
    """RKDE's output columns for a decoded batch (``models.Batch``).

    Per image: the largest region score (-log density), the largest region probability, the boxes in original pixels
    with their probabilities. No region: the lowest float64 score, probability 0, no boxes. Computed over all regions of
    the batch at once (no Python loop over rows or boxes)."""
    n = b.n
    results = b.extractor(b.images) if b.ok.any() else []
    counts = np.zeros(n, np.int64)
    counts[np.flatnonzero(b.ok)] = [len(boxes) for boxes, _ in results]
    owner = np.repeat(np.arange(n), counts)  # the row of each region
    feats = np.concatenate([f for _, f in results]) if counts.sum() else np.zeros((0, FEATURE_DIM), np.float32)
    log_density = b.head.score_samples(feats, device=b.device) if len(feats) else np.zeros(0)
    score, prob = np.full(n, np.finfo(np.float64).min), np.zeros(n)
    np.maximum.at(score, owner, -log_density)
    score[np.bincount(owner, ~np.isfinite(log_density), minlength=n) > 0] = np.nan  # any non-finite region
    valid = b.valid(score, "region score")
    region_prob = anomaly_probability(log_density)
    np.maximum.at(prob, owner, region_prob)
    heights, widths = b.table.column(HEIGHT_COL).to_numpy(), b.table.column(WIDTH_COL).to_numpy()
    boxes = np.concatenate([bx for bx, _ in results]) if counts.sum() else np.zeros((0, 4), np.float32)
    boxes = boxes_to_original(boxes, b.config.image_size, original_size=(heights[owner], widths[owner]))
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    per_row = pa.FixedSizeListArray.from_arrays(pa.array(boxes.ravel(), pa.float64()), 4)
    missing = pa.array(~valid)
    return {SCORE_COL: pa.array(score, pa.float64(), mask=~valid), PROB_COL: pa.array(prob, pa.float64(), mask=~valid),
            NUM_REGIONS_COL: pa.array(counts, pa.int32(), mask=~valid),
            BOXES_COL: pa.ListArray.from_arrays(offsets, per_row, mask=missing),
            BOX_SCORES_COL: pa.ListArray.from_arrays(offsets, pa.array(region_prob, pa.float64()), mask=missing)}
