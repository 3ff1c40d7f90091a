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


def check_image_size(name: str, width: int, height: int, settings: Settings) -> None:
    """Refuse (413) an image whose side, aspect ratio or pixel count is past the limits.

    Decoding and resizing cost follows the pixels; a long thin strip costs more still in the
    resize and means nothing once squashed to the model's square input.
    """
    side, ratio = settings.predict_max_image_side, settings.predict_max_aspect_ratio
    if width < 1 or height < 1:
        raise PredictInputError(f"{name}: {width}x{height} pixels holds no image")
    if max(width, height) > side:
        raise PredictInputError(
            f"{name}: {width}x{height} pixels; each side may be at most {side} pixels", 413
        )
    if width * height > settings.predict_max_pixels:
        raise PredictInputError(
            f"{name}: {width}x{height} pixels is more than the {settings.predict_max_pixels} "
            "allowed",
            413,
        )
    if max(width, height) > ratio * min(width, height):
        raise PredictInputError(
            f"{name}: {width}x{height} pixels; the longer side may be at most {ratio:g} times "
            "the shorter (crop or pad the image)",
            413,
        )


def _open(data: bytes, name: str) -> Any:
    """The image in ``data``, opened (only its header read) as a PNG or JPEG."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise PredictInputError(f"{name}: the file is empty")
    try:
        return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:  # Pillow's own cap, above ours
        raise PredictInputError(f"{name}: far more pixels than allowed ({exc})", 413) from None
    except UnidentifiedImageError as exc:
        raise PredictInputError(
            f"{name}: not a PNG or JPEG image ({type(exc).__name__})"
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:  # a header that cannot be read
        raise PredictInputError(f"{name}: the image cannot be decoded: {exc}") from None


def check_files(files: list[tuple[str, bytes]], settings: Settings) -> None:
    """Check every file's size from its header alone, and their pixels together against
    ``predict_max_request_pixels``, before any of them is decoded."""
    total = 0
    for name, data in files:
        with _open(data, name) as im:
            width, height = im.size
        check_image_size(name, width, height, settings)
        total += width * height
        if total > settings.predict_max_request_pixels:
            raise PredictInputError(
                f"the images hold more than {settings.predict_max_request_pixels} pixels together "
                f"(reached at {name}); send fewer or smaller images per request",
                413,
            )


# Pixels converted per strip when decoding: Pillow's own full-size copies (a converted image,
# ``tobytes``) would each cost as much as the decoded image again.
DECODE_STRIP_PIXELS = 1 << 20


def decode_image(data: bytes, name: str, spec: InputSpec, settings: Settings) -> torch.Tensor:
    """A PNG or JPEG file -> uint8 ``C x H x W`` with the spec's channel count.

    The size is checked from the header before any pixel is decoded; the decoded image is
    then converted and copied out in strips of rows, so memory peaks near the decoded image
    plus its ``C x H x W`` copy.
    """
    import numpy as np
    import torch
    from PIL import Image

    mode = "L" if spec.channels == 1 else "RGB"
    with _open(data, name) as im:
        width, height = im.size
        check_image_size(name, width, height, settings)
        out = np.empty((spec.channels, height, width), dtype=np.uint8)
        step = max(1, DECODE_STRIP_PIXELS // width)
        try:
            im.load()
            for top in range(0, height, step):
                with im.crop((0, top, width, min(height, top + step))) as strip:
                    rows = np.asarray(strip if strip.mode == mode else strip.convert(mode))
                out[:, top : top + step] = rows[None] if rows.ndim == 2 else rows.transpose(2, 0, 1)
        except Image.DecompressionBombError as exc:
            raise PredictInputError(f"{name}: far more pixels than allowed ({exc})", 413) from None
        except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt image data
            raise PredictInputError(f"{name}: the image cannot be decoded: {exc}") from None
    return torch.from_numpy(out)


def parse_json_batch(body: bytes | bytearray, spec: InputSpec, settings: Settings
                     ) -> torch.Tensor:
    """A JSON body (an array of images in the spec's shape) -> float ``N x C x H x W``.

    Python's parser builds an object per number and per array, several times the body in
    memory. Before it runs, the body's commas and brackets are counted against what the
    largest allowed batch in the spec's shape holds (``predict_max_images`` images of C x H x
    W values), so a body too big for any legal batch is refused without being parsed.
    """
    import json

    c, h, w = spec.shape
    n = settings.predict_max_images
    values, arrays = n * c * h * w, 1 + n * (1 + c * (1 + h))
    if body.count(b",") >= values or body.count(b"[") > arrays:
        raise PredictInputError(
            f"the JSON body holds more numbers or arrays than {n} images of {list(spec.shape)} "
            f"(C x H x W, the input spec); send at most {n} images per request",
            413,
        )
    try:
        items = json.loads(body)
    except RecursionError:
        raise PredictInputError(
            f"the JSON arrays are nested too deeply; each image is {list(spec.shape)} (C x H x W)"
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise PredictInputError(f"the body is not valid JSON: {exc}") from None
    return json_batch(items, spec, settings)


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
    """Uploaded image files -> float ``N x C x S x S`` in [0, 1], by the input spec.

    One image is decoded at a time and shrunk to the spec's size before the next, so memory
    follows the largest image rather than the whole request.
    """
    import torch

    from mwt_core.export import prepare_image

    check_files(files, settings)
    out = torch.empty((len(files), *spec.shape))
    for i, (name, data) in enumerate(files):
        out[i] = prepare_image(decode_image(data, name, spec, settings), spec)
    return out.div_(255.0)


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

