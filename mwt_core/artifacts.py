"""Models and modules on disk: safetensors weights plus a JSON manifest.

The manifest describes the structure (architecture config, and for a module its
class list and kept-kernel indices) so loading rebuilds the network from code and
only reads tensors; nothing is ever unpickled. The weights' sha256 is recorded and
checked on every load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mwt_core.checksums import sha256_file
from mwt_core.compose import ComposedClassifier, NormalizedInput
from mwt_core.data.datasets import InputSpec
from mwt_core.models import MwTNet, UnknownArchitecture, create_model
from mwt_core.reuse import ModuleClassifier
from mwt_core.slimming import slim

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"
_BASE_KEYS = ("arch", "num_classes", "in_channels", "input_size", "width", "masked")


class ArtifactError(ValueError):
    """A missing, corrupt or inconsistent artifact."""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def structure_of(net: nn.Module) -> tuple[str, dict[str, Any]]:
    """``("model" | "module" | "composition", config)`` describing how to rebuild ``net``."""
    if isinstance(net, ModuleClassifier):
        module_config: dict[str, Any] = net.net.config  # type: ignore[assignment]  # a slimmed MwTNet
        return "module", {**module_config, "krr": net.krr}
    if isinstance(net, ComposedClassifier):
        parts = []
        for part in net.parts:
            if not (isinstance(part, NormalizedInput) and isinstance(part.net, ModuleClassifier)):
                raise ArtifactError("a composition can be saved only when built from modules")
            parts.append({"module": structure_of(part.net)[1], "input_spec": part.spec.to_json()})
        return "composition", {"labels": list(net.labels), "parts": parts, "combine": net.combine}
    config = getattr(net, "config", None)
    if config is None:
        raise ArtifactError("only networks built by mwt_core can be saved as artifacts")
    return "model", dict(config)


def build_net(kind: str, config: dict[str, Any]) -> nn.Module:
    """An untrained network with exactly the structure ``config`` describes."""
    if kind == "composition":
        return _build_composition(config)
    try:
        model = create_model(**{k: config[k] for k in _BASE_KEYS})
    except (KeyError, TypeError, UnknownArchitecture) as exc:
        raise ArtifactError(f"manifest config is incomplete or invalid: {exc}") from exc
    if kind == "model":
        return model
    if kind != "module":
        raise ArtifactError(f"unknown artifact kind {kind!r}")
    return _build_module(model, config)


def _build_composition(config: dict[str, Any]) -> ComposedClassifier:
    try:
        parts: list[nn.Module] = [
            NormalizedInput(build_net("module", p["module"]), InputSpec.from_json(p["input_spec"]))
            for p in config["parts"]
        ]
        labels = [str(label) for label in config["labels"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"manifest composition structure is invalid: {exc}") from exc
    if not parts:
        raise ArtifactError("manifest composition has no parts")
    combine = config.get("combine", "scale_bias")  # compositions saved before ``combine`` existed
    try:
        return ComposedClassifier(parts, labels, str(combine))
    except ValueError as exc:
        raise ArtifactError(f"manifest composition structure is invalid: {exc}") from exc


def _build_module(model: MwTNet, config: dict[str, Any]) -> ModuleClassifier:
    try:
        keep = []
        for idx, unit in zip(config["keep"], model.mask_units(), strict=True):
            k = torch.zeros(unit.out_channels, dtype=torch.bool)
            k[torch.tensor(idx, dtype=torch.long)] = True
            keep.append(k)
        classes = [int(c) for c in config["classes"]]
        multiple = int(config.get("channel_multiple", 1))
        net = slim(model, keep, keep_mask_generators=bool(config["keep_mask_generators"]),
                   classes=classes, channel_multiple=multiple)
    except (KeyError, ValueError, IndexError) as exc:
        raise ArtifactError(f"manifest module structure is invalid: {exc}") from exc
    net.config.update({k: config[k] for k in ("classes", "keep", "keep_mask_generators")})
    return ModuleClassifier(net, classes, config.get("krr"), restricted=True)


def source_kernels(config: dict[str, Any]) -> int:
    """How many maskable kernels the model a module was cut from has (its KRR's denominator),
    from the module's config; built on the meta device, so no weights are allocated."""
    try:
        with torch.device("meta"):
            model = create_model(**{k: config[k] for k in _BASE_KEYS})
    except (KeyError, TypeError, UnknownArchitecture) as exc:
        raise ArtifactError(f"manifest config is incomplete or invalid: {exc}") from exc
    return sum(model.kernel_counts())


# What save_artifact computes itself; the rest of a manifest is the caller's.
GENERATED_KEYS = ("format_version", "kind", "config", "weights_file", "sha256", "size_bytes", "params")


def caller_fields(manifest: dict[str, Any]) -> dict[str, Any]:
    """The caller's part of a written manifest (to save the same network again with it)."""
    return {k: v for k, v in manifest.items() if k not in GENERATED_KEYS}


def save_artifact(directory: str | Path, net: nn.Module, manifest: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """Write ``net`` to ``directory`` and return the manifest written beside it.

    ``manifest`` carries the caller's facts (class names, input spec, metrics...);
    the structure, format version, sha256 and sizes are added here.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    kind, config = structure_of(net)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    weights = directory / WEIGHTS_FILE
    tmp = directory / f".{WEIGHTS_FILE}.tmp{os.getpid()}"
    # One metadata key only: safetensors writes a dict's keys in no fixed order, and the
    # header is part of the bytes the sha256 covers.
    save_file(state, str(tmp), metadata={"mwt": f"{FORMAT_VERSION}:{kind}"})
    os.replace(tmp, weights)
    full = dict(manifest or {})
    full.update({
        "format_version": FORMAT_VERSION, "kind": kind, "config": config,
        "weights_file": WEIGHTS_FILE, "sha256": sha256_file(weights),
        "size_bytes": weights.stat().st_size,
        "params": sum(p.numel() for p in net.parameters()),
    })
    _atomic_write_bytes(directory / MANIFEST_FILE, json.dumps(full, indent=2).encode())
    return full


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of the artifact in ``directory`` (no weights read)."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"no {MANIFEST_FILE} in {directory}; is this an mwt artifact directory?")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path} is not a format-{FORMAT_VERSION} mwt manifest")
    return manifest


def load_artifact(directory: str | Path, device: str | torch.device = "cpu"
                  ) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild and load the network in ``directory`` after checking its sha256."""
    manifest = read_manifest(directory)
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise ArtifactError(f"missing {WEIGHTS_FILE} in {directory}")
    actual = sha256_file(weights)
    if actual != manifest.get("sha256"):
        raise ArtifactError(
            f"checksum mismatch for {weights}: manifest says {manifest.get('sha256')}, file is {actual}"
        )
    net = build_net(str(manifest.get("kind")), manifest.get("config") or {})
    try:
        state = load_file(str(weights), device=str(device))
        net.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError) as exc:
        raise ArtifactError(f"weights in {weights} do not fit the manifest: {exc}") from exc
    return net.to(device).eval(), manifest
