"""The fitted model on disk: ``config.json`` (model config, weight source, provenance) + ``head.safetensors``.

No pickle anywhere. Backbone weights are not copied: they are identified by their source (timm tag, file path and
sha256, or random seed) and resolved again, and checked, when the artifact is used.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from rayanom.config import ModelConfig, UserError, config_from_dict, config_to_dict
from rayanom.data import resolve_filesystem
from rayanom.decide import THRESHOLD_FILE
from rayanom.heads import DfmHead, KdeHead

logger = logging.getLogger(__name__)

FORMAT = "rayanom-artifact"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
HEAD_FILE = "head.safetensors"
MODEL_FILES = frozenset({CONFIG_FILE, HEAD_FILE, THRESHOLD_FILE})  # the threshold lives beside the model (decide)


@dataclass
class Artifact:
    """A fitted model: its config, its head, where its backbone weights come from, and how it was made."""

    config: ModelConfig
    head: KdeHead | DfmHead
    weights: dict[str, Any]
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": self.config.model,
            "config": config_to_dict(self.config),
            "weights": self.weights,
            "provenance": self.provenance,
        }

    def save(self, uri: str, overwrite: bool = False) -> None:
        """Write ``config.json`` and ``head.safetensors`` into the directory ``uri`` (local or object store)."""
        from safetensors.numpy import save

        existing = prepare_output_dir(uri, MODEL_FILES.__contains__, overwrite)
        fs, path = resolve_filesystem(uri)
        if THRESHOLD_FILE in existing:  # chosen for the model this one replaces
            fs.delete_file(f"{path}/{THRESHOLD_FILE}")
        with fs.open_output_stream(f"{path}/{HEAD_FILE}") as f:
            f.write(save({k: np.ascontiguousarray(v) for k, v in self.head.to_state().items()}))
        with fs.open_output_stream(f"{path}/{CONFIG_FILE}") as f:
            f.write(json.dumps(self.to_json(), indent=2, sort_keys=True).encode())
        logger.info("model artifact written to %s", uri)

    @classmethod
    def load(cls, uri: str) -> Artifact:
        """Read and validate an artifact; a wrong format, version, model or a damaged file is a clear error."""
        from safetensors.numpy import load

        fs, path = resolve_filesystem(uri)
        try:
            with fs.open_input_file(f"{path}/{CONFIG_FILE}") as f:
                meta = json.loads(f.read())
            with fs.open_input_file(f"{path}/{HEAD_FILE}") as f:
                head_bytes = f.read()
        except (OSError, ValueError) as e:
            msg = f"invalid model={uri!r}: not a readable rayanom artifact ({type(e).__name__}: {e})"
            raise UserError(msg) from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            msg = f"invalid model={uri!r}: {CONFIG_FILE} is not a {FORMAT} file"
            raise UserError(msg)
        if meta.get("format_version") != FORMAT_VERSION:
            msg = (f"invalid model={uri!r}: format_version={meta.get('format_version')!r}, this rayanom reads "
                   f"format_version {FORMAT_VERSION}")
            raise UserError(msg)
        config = config_from_dict(meta.get("config"))
        try:
            state = load(head_bytes)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
            msg = f"invalid model={uri!r}: {HEAD_FILE} is damaged ({type(e).__name__}: {e})"
            raise UserError(msg) from e
        head = head_from_state(config, state, uri)
        return cls(config=config, head=head, weights=meta.get("weights", {}), provenance=meta.get("provenance", {}))


def head_from_state(config: ModelConfig, state: dict[str, np.ndarray], uri: str = "model") -> KdeHead | DfmHead:
    """Rebuild the head of ``config.model`` from its arrays, checking names and shapes."""
    if config.model == "dfm":
        need = {"pca_mean": 1, "pca_components": 2, "sigma": 1}
    else:
        need = {"pca_mean": 1, "pca_components": 2, "max_norm": 1, "kde_inv_chol": 2, "kde_support": 2,
                "kde_log_norm": 1}
    bad = [k for k, ndim in need.items() if k not in state or state[k].ndim != ndim]
    if bad:
        msg = f"invalid model={uri!r}: {HEAD_FILE} lacks or has malformed arrays {bad} for a {config.model} head"
        raise UserError(msg)
    if config.model == "dfm":
        return DfmHead.from_state(state, config.pca_level, config.score_type)
    return KdeHead.from_state(state, config.n_pca_components, config.feature_scaling)


def make_head(config: ModelConfig) -> KdeHead | DfmHead:
    """An unfitted head for ``config``."""
    if config.model == "dfm":
        return DfmHead(config.pca_level, config.score_type)
    return KdeHead(config.n_pca_components, config.feature_scaling)


def check_output_dir(uri: str, is_ours: Callable[[str], bool], overwrite: bool) -> list[str]:
    """Names of our files already in the directory ``uri`` (local or object store); nothing is created.

    Refuses a file, a directory holding files that are not ours, and one holding ours unless ``overwrite``.
    """
    fs, path = resolve_filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        msg = f"output {uri!r} is a file, expected a directory"
        raise UserError(msg)
    if info.type != pafs.FileType.Directory:
        return []
    existing = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path, recursive=False)))
    foreign = [name for name in existing if not is_ours(name)]
    if foreign:
        msg = f"output {uri!r} holds other files {foreign[:5]}; choose an empty or new directory"
        raise UserError(msg)
    if existing and not overwrite:
        msg = f"output {uri!r} already holds {existing[:5]}; pass --overwrite to replace them"
        raise UserError(msg)
    return existing


def prepare_output_dir(uri: str, is_ours: Callable[[str], bool], overwrite: bool) -> list[str]:
    """:func:`check_output_dir`, then create the directory."""
    existing = check_output_dir(uri, is_ours, overwrite)
    fs, path = resolve_filesystem(uri)
    fs.create_dir(path, recursive=True)
    return existing
