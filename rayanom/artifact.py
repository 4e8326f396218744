"""The fitted model on disk: ``config.json`` (model config, weight source, provenance) + ``head.safetensors``.

No pickle anywhere. Backbone weights are not copied: they are identified by their source (timm tag, file path and
sha256, or random seed) and resolved again, and checked, when the artifact is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from rayanom.config import ModelConfig, UserError, config_to_dict
from rayanom.decisions import THRESHOLD_FILE
from rayanom.specs import ModelSpec, config_from_dict, spec_of
from rayanom.storage import check_output_dir, prepare_output_dir, resolve_filesystem

logger = logging.getLogger(__name__)

FORMAT = "rayanom-artifact"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
HEAD_FILE = "head.safetensors"
MODEL_FILES = frozenset({CONFIG_FILE, HEAD_FILE, THRESHOLD_FILE})  # the threshold lives beside the model (decisions)


@dataclass
class Artifact:
    """A fitted model: its config, its head, where its backbone weights come from, and how it was made."""

    config: ModelConfig
    head: Any  # the model's head (``specs.ModelSpec.head``)
    weights: dict[str, Any]
    provenance: dict[str, Any] = field(default_factory=dict)
    # The precision it was fitted in: part of its identity (bf16 moves the bank features, so the head; scoring
    # defaults to it). Written and read here only (``to_json``, ``load``).
    precision: str = "fp32"

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": self.config.model,
            "config": config_to_dict(self.config),
            "precision": self.precision,
            "weights": self.weights,
            "provenance": self.provenance,
        }

    def save(self, uri: str, overwrite: bool = False) -> None:
        """Write ``config.json`` and ``head.safetensors`` into the directory ``uri`` (local or object store)."""
        existing = prepare_output_dir(uri, MODEL_FILES.__contains__, overwrite)
        fs, path = resolve_filesystem(uri)
        if THRESHOLD_FILE in existing:  # chosen for the model this one replaces
            fs.delete_file(f"{path}/{THRESHOLD_FILE}")
        with fs.open_output_stream(f"{path}/{HEAD_FILE}") as f:
            f.write(save_safetensors({k: np.ascontiguousarray(v) for k, v in self.head.to_arrays().items()}))
        with fs.open_output_stream(f"{path}/{CONFIG_FILE}") as f:
            f.write(json.dumps(self.to_json(), indent=2, sort_keys=True).encode())
        logger.info("model artifact written to %s", uri)

    @classmethod
    def load(cls, uri: str, spec=None) -> Artifact:
        """Read and validate an artifact; a wrong format, version, model or a damaged file is a clear error.

        ``spec``: its model (``specs.ModelSpec``), for a model registered in another process (the actors get it with
        their arguments); else found by name."""
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
        config = config_from_dict(meta.get("config"), spec)
        try:
            arrays = load_safetensors(head_bytes)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
            msg = f"invalid model={uri!r}: {HEAD_FILE} is damaged ({type(e).__name__}: {e})"
            raise UserError(msg) from e
        head = head_from_arrays(config, arrays, uri, spec)
        provenance = meta.get("provenance", {})
        precision = meta.get("precision", provenance.get("run", {}).get("precision", "fp32"))  # before: the run's
        if precision not in ("fp32", "bf16"):
            msg = f"invalid artifact {uri!r}: precision {precision!r}, expected 'fp32' or 'bf16'"
            raise UserError(msg)
        return cls(config=config, head=head, weights=meta.get("weights", {}), provenance=provenance,
                   precision=precision)


def head_from_arrays(config, arrays: dict[str, np.ndarray], uri: str = "model", model: ModelSpec | None = None):
    """The fitted head of a model from its arrays, checked against the head's ``ARRAYS``.

    ``model``: its spec (else found by the config's name); ``arrays``: ``head.to_arrays()``'s, names and ranks
    checked."""
    head = (model or spec_of(config)).head(config)
    bad = [k for k, ndim in head.ARRAYS.items() if k not in arrays or arrays[k].ndim != ndim]
    if bad:
        msg = f"invalid model={uri!r}: {HEAD_FILE} lacks or has malformed arrays {bad} for a {config.model} head"
        raise UserError(msg)
    return head.load_arrays(arrays)


def artifact_fingerprint(artifact: Artifact) -> str:
    """sha256 of an artifact's JSON and head arrays: what a scores directory was made with."""
    h = hashlib.sha256(json.dumps(artifact.to_json(), sort_keys=True).encode())
    for name, array in sorted(artifact.head.to_arrays().items()):
        h.update(name.encode() + np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def fitted_before(model_dir: str, fingerprint_of: Callable[[str], str], overwrite: bool = False,
                  precision: str = "auto") -> Artifact | None:
    """The artifact in ``model_dir`` if it was fitted from exactly these inputs in ``precision``, else None.

    Fitting is idempotent, so such an artifact is reused; with ``precision`` auto, in the precision it was fitted in.
    None when there is none or ``overwrite``; an error when the directory holds another model.
    ``fingerprint_of(precision)`` is the fit's fingerprint (``workflows.fit_fingerprint``) in that precision."""
    existing = check_output_dir(model_dir, MODEL_FILES.__contains__, overwrite=True)
    if overwrite or CONFIG_FILE not in existing:
        return None  # nothing there, replacing on request, or an incomplete save (config.json is written last)
    try:
        artifact = Artifact.load(model_dir)
    except UserError:
        artifact = None
    fitted = artifact.provenance.get("fit_fingerprint") if artifact is not None else None
    if fitted is not None and fitted == fingerprint_of(precision if precision != "auto" else artifact.precision):
        return artifact
    if fitted is not None and fitted == fingerprint_of(artifact.precision):
        msg = (f"output {model_dir!r} holds this model fitted in {artifact.precision}; pass --overwrite to refit it in "
               f"{precision} (or --precision auto to reuse it)")
        raise UserError(msg)
    msg = (f"output {model_dir!r} holds a model fitted with other settings, index or weights; pass --overwrite to "
           "replace it")
    raise UserError(msg)
