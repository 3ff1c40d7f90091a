"""Compose downloaded module artifacts on the client, exactly as the registry composes them.

The registry stores one module per class of every model (``GET /api/v1/modules/{id}/download``,
unpacked: ``weights.safetensors`` + ``manifest.json``). ``POST /api/v1/compositions`` with
``modules`` composes those stored modules as the parts of one classifier; a client holding the
same module directories and the datasets their manifests name rebuilds the same classifier
with :func:`compose_modules` (or ``mwt compose-local DIR...``), up to float noise: the fitting
images are drawn by a fixed seed from the datasets alone and the fit is the same routine
(:func:`mwt_core.compose.measure_parts`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from mwt_core.artifacts import load_artifact, read_manifest, source_kernels
from mwt_core.combine import (
    DEFAULT_COMBINE,
    DEFAULT_PER_CLASS,
    ComposedClassifier,
    CompositionError,
)
from mwt_core.compose import Part, distinct_labels, measure_parts
from mwt_core.compose_options import AUTO_COMBINE
from mwt_core.data.datasets import DatasetBundle, InputSpec
from mwt_core.pipeline import as_trained, composition_validation, load_training_data
from mwt_core.reuse import ModuleClassifier

__all__ = ["compose_modules", "is_module_dir", "load_module_parts", "module_part", "module_tag"]


def module_part(module: nn.Module, manifest: dict[str, Any]) -> Part:
    """A module artifact (``mwt_core.artifacts.load_artifact`` of a module directory, as the
    registry stores and serves them) as a part, normalising with its manifest's input spec."""
    if not isinstance(module, ModuleClassifier) or manifest.get("kind") != "module":
        raise CompositionError(
            f"a {manifest.get('kind')!r} artifact is not a module; compose module artifacts "
            "(one class each, as the registry's module downloads give them)")
    try:
        spec = InputSpec.from_json(manifest["input_spec"])
        names = [str(n) for n in manifest.get("class_names") or module.classes]
    except (KeyError, TypeError, ValueError) as exc:
        raise CompositionError(f"the module's manifest has no usable input spec: {exc}") from None
    if len(names) != len(module.classes):
        raise CompositionError("the module's manifest names a different number of classes "
                               "than its network has")
    if module.krr is None:
        raise CompositionError("the module's manifest records no KRR; is it a module artifact?")
    return Part(module.eval(), spec, list(module.classes), names, float(module.krr),
                source_kernels(manifest.get("config") or {}))


def is_module_dir(path: str | Path) -> bool:
    """Whether ``path`` is an artifact directory holding a module (not a model)."""
    p = Path(path)
    if not (p / "manifest.json").is_file():
        return False
    try:
        return read_manifest(p).get("kind") == "module"
    except ValueError:
        return False


def module_tag(manifest: dict[str, Any]) -> str:
    """What tells a module's source model apart in output labels: ``m<id>`` for a registry
    model (the tag the registry itself uses), else the start of the model's sha256."""
    registry = manifest.get("registry") or {}
    if registry.get("model_id") is not None:
        return f"m{registry['model_id']}"
    return str((manifest.get("source_model") or {}).get("sha256") or "?")[:8]


def load_module_parts(directories: Sequence[str | Path], data_dir: Path | None = None,
                      loaded: dict[tuple[str, str], DatasetBundle] | None = None
                      ) -> tuple[list[Part], list[DatasetBundle], list[dict[str, Any]]]:
    """Each module directory (sha256-checked) as a part, with the dataset its manifest names
    (from ``data_dir``) as its model was trained on it, and its manifest. ``loaded`` keeps
    the datasets read by ``(name, architecture)`` (each is read once; pass one dict to share
    them between calls)."""
    if not directories:
        raise CompositionError("give at least one module directory")
    loaded = {} if loaded is None else loaded
    parts: list[Part] = []
    datas: list[DatasetBundle] = []
    manifests: list[dict[str, Any]] = []
    for directory in directories:
        net, manifest = load_artifact(directory)
        if any(m.get("sha256") == manifest.get("sha256") for m in manifests):
            raise CompositionError(f"{directory}: the same module is given twice")
        parts.append(module_part(net, manifest))
        ref = manifest.get("dataset_ref") or manifest.get("dataset")
        if not isinstance(ref, str) or not ref:
            raise CompositionError(f"{directory}: the manifest names no dataset to fit on")
        arch = str((manifest.get("config") or {}).get("arch", ""))
        if (ref, arch) not in loaded:
            loaded[ref, arch] = load_training_data(ref, arch, data_dir)
        datas.append(as_trained(loaded[ref, arch], manifest, ref))
        manifests.append(manifest)
    return parts, datas, manifests


def compose_modules(
    directories: Sequence[str | Path],
    *,
    combine: str = DEFAULT_COMBINE,
    calibration_per_class: int = DEFAULT_PER_CLASS,
    data_dir: Path | None = None,
    device: str = "cpu",
) -> tuple[ComposedClassifier, dict[str, Any]]:
    """Compose module artifact directories (one model's or several's, in output order) into
    one classifier: the same parts, fitting images and fit as ``POST /api/v1/compositions``
    with ``modules``, so its outputs match the registry's composition of those modules.

    ``combine`` and ``calibration_per_class`` as in the API (defaults: the best measured
    method); ``data_dir``: where the datasets named in the manifests live (digits needs none).
    Returns the fitted classifier (images in [0, 1] in, one score per class out; save it with
    :func:`mwt_core.artifacts.save_artifact`) and its metrics on the test splits. There is no
    ``baseline_accuracy`` (the whole models are not at hand).

    Example::

        from mwt_core.module_parts import compose_modules
        net, metrics = compose_modules(["dl/digits-v1-class3", "dl/other-v2-class8"])
        scores = net(images)  # N x C x H x W floats in [0, 1]
    """
    parts, datas, manifests = load_module_parts(directories, data_dir)
    labels = distinct_labels([(module_tag(m), p.class_names)
                              for m, p in zip(manifests, parts, strict=True)])
    validation = None
    if combine == AUTO_COMBINE:
        validation = composition_validation([(m, d, p.classes)
                                             for m, d, p in zip(manifests, datas, parts, strict=True)])
    return measure_parts(parts, datas, calibration_per_class, labels, device=device,
                         combine=combine, validation=validation)
