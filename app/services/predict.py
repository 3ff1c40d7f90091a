"""Predict: decode uploaded images (or a JSON batch), run a stored classifier, rank its classes.

Images are prepared by the artifact's input spec exactly as exports expect them
(:func:`mwt_core.export.prepare_images`: channels, bilinear resize to the spec's square size,
pixels scaled to [0, 1]); the network then applies its own normalisation
(:func:`mwt_core.export.servable`). Loaded classifiers are kept in a bounded LRU keyed by the
artifact's kind, id and sha256, so a replaced artifact is never answered from the cache.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from app import storage
from app.lru import Lru
from app.settings import Settings

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mwt_core.data.datasets import InputSpec

IMAGE_FORMATS = ("PNG", "JPEG")


class PredictInputError(ValueError):
    """Inputs the classifier cannot take; ``status_code`` is the HTTP status to answer with."""

    def __init__(self, message: str, status_code: int = 422) -> None:
        super().__init__(message)
        self.status_code = status_code


@dataclass
class Classifier:
    """A stored artifact ready to answer: the network takes images in [0, 1]."""

    net: nn.Module
    spec: InputSpec
    class_names: list[str]
    scoring: str


def load_classifier(settings: Settings, artifact_path: str) -> Classifier:
    """Load (sha256-checked) the artifact at ``artifact_path`` in the store as a classifier."""
    import torch

    from mwt_core.artifacts import load_artifact
    from mwt_core.export import class_names_of, input_spec_of, scoring, servable

    net, manifest = load_artifact(storage.resolve(settings.artifacts, artifact_path), device="cpu")
    wrapped = servable(net, manifest)
    spec = input_spec_of(manifest)
    with torch.no_grad():
        outputs = int(wrapped(torch.zeros(1, *spec.shape)).shape[1])
    return Classifier(wrapped, spec, class_names_of(manifest, outputs), scoring(outputs))


class ClassifierCache(Lru[tuple[str, int, str], Classifier]):
    """Recently used classifiers (LRU, at most ``size``), keyed by ``(kind, id, sha256)``."""

    def load(self, settings: Settings, key: tuple[str, int, str], artifact_path: str) -> Classifier:
        return self.get(key, lambda: load_classifier(settings, artifact_path))


def decode_image(data: bytes, name: str, spec: InputSpec, settings: Settings) -> torch.Tensor:
    """A PNG or JPEG file -> uint8 ``C x H x W`` with the spec's channel count."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise PredictInputError(f"{name}: the file is empty")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            w, h = im.size  # from the header: checked before any pixel is decoded
            if w * h > settings.predict_max_pixels:
                raise PredictInputError(
                    f"{name}: {w}x{h} pixels is more than the {settings.predict_max_pixels} allowed",
                    413,
                )
            arr = np.asarray(im.convert("L" if spec.channels == 1 else "RGB"), dtype=np.uint8)
    except PredictInputError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise PredictInputError(
            f"{name}: not a PNG or JPEG image ({type(exc).__name__})"
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt image data
        raise PredictInputError(f"{name}: the image cannot be decoded: {exc}") from None
    x = torch.from_numpy(arr.copy())
    return x[None] if x.dim() == 2 else x.permute(2, 0, 1).contiguous()


def json_batch(items: Any, spec: InputSpec, settings: Settings) -> torch.Tensor:
    """A JSON array of images, each ``C x H x W`` as in the spec with values in [0, 1] (a
    one-channel spec also takes ``H x W``), -> float ``N x C x H x W``."""
    import numpy as np
    import torch

    shape = list(spec.shape)
    if not isinstance(items, list):
        raise PredictInputError(
            f"the JSON body must be an array of images, each {shape} (C x H x W) in [0, 1]"
        )
    if not items:
        raise PredictInputError("the JSON array holds no image")
    if len(items) > settings.predict_max_images:
        raise PredictInputError(
            f"{len(items)} images; at most {settings.predict_max_images} per request", 413
        )
    try:
        x = np.asarray(items, dtype=np.float32)
    except (ValueError, TypeError):
        raise PredictInputError(
            f"the JSON images must be numeric arrays of one shape, each {shape} (C x H x W)"
        ) from None
    if x.ndim == 3 and spec.channels == 1:
        x = x[:, None]
    if list(x.shape[1:]) != shape:
        raise PredictInputError(
            f"each JSON image must be {shape} (C x H x W, the input spec); got {list(x.shape[1:])}"
        )
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise PredictInputError("JSON image values must be finite and scaled to [0, 1]")
    return torch.from_numpy(x)


def prepare_files(files: list[tuple[str, bytes]], spec: InputSpec, settings: Settings
                  ) -> torch.Tensor:
    """Uploaded image files -> float ``N x C x S x S`` in [0, 1], by the input spec."""
    from mwt_core.export import prepare_images

    return prepare_images([decode_image(data, name, spec, settings) for name, data in files], spec)


def rank(clf: Classifier, x: torch.Tensor, names: list[str], top_k: int) -> list[dict[str, Any]]:
    """The ``top_k`` classes of each image, most probable first (ties: output order)."""
    import torch

    from mwt_core.export import probabilities

    with torch.no_grad():
        logits = clf.net(x)
        probs = probabilities(logits)
    if not bool(torch.isfinite(logits).all()):
        raise PredictInputError("the classifier's scores for these inputs are not finite numbers")
    k = min(top_k, logits.shape[1])
    out = []
    for i, name in enumerate(names):
        order = sorted(range(logits.shape[1]), key=lambda j: (-float(probs[i, j]), j))[:k]
        out.append({
            "input": name,
            "top": [
                {"class_name": clf.class_names[j], "index": j,
                 "probability": float(probs[i, j]), "logit": float(logits[i, j])}
                for j in order
            ],
        })
    return out

