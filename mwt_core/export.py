"""Self-contained exports of models, modules and compositions: TorchScript and ONNX.

An exported file runs without this project: it takes images scaled to ``[0, 1]``
(``N x C x H x W``, float32, any batch size) and normalises them itself with the
artifact's own statistics, then outputs one score per class (logits). What a caller
needs to use it travels inside the file as JSON (:func:`export_metadata`): class names
in output order, the input spec, and how to turn scores into probabilities. TorchScript
keeps it in the ``mwt.json`` extra file, ONNX in the model's ``metadata_props``.

Serving (``predict``) uses the same wrapped network (:func:`servable`), the same image
preparation (:func:`prepare_images`) and the same scoring rule (:func:`probabilities`),
so an exported file and the service answer alike.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mwt_core.artifacts import load_artifact
from mwt_core.compose import NormalizedInput
from mwt_core.data.datasets import InputSpec
from mwt_core.tracing import exclusive_trace, save_traced

ExportFormat = Literal["torchscript", "onnx"]
FORMATS: tuple[str, ...] = ("torchscript", "onnx")
SUFFIXES: dict[str, str] = {"torchscript": ".torchscript.pt", "onnx": ".onnx"}
# Bumped whenever exported files change meaning, so caches keyed on it are rebuilt.
EXPORT_VERSION = 1
METADATA_FILE = "mwt.json"  # TorchScript extra file / ONNX metadata key holding the JSON
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
ONNX_OPSET = 17  # supported by torch >= 2.4's exporter and every current onnxruntime


class ExportError(ValueError):
    """An artifact that cannot be exported (no input spec, unknown format...)."""


def check_format(fmt: str) -> str:
    """``fmt`` if it is a known export format, else :class:`ExportError` naming the choices."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def input_spec_of(manifest: dict[str, Any]) -> InputSpec:
    """The input spec recorded in an artifact's manifest."""
    try:
        return InputSpec.from_json(manifest["input_spec"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportError(f"the manifest has no valid input_spec: {exc}") from exc


def scoring(num_outputs: int) -> str:
    """How scores become probabilities: ``softmax`` over the classes, or, for a net with a
    single output (a one-class module), ``sigmoid`` of that one score.

    A softmax of one logit is always 1.0 and says nothing; the sigmoid at least moves with
    the module's evidence. It is not a calibrated probability: the logit was trained inside
    a softmax over all of the model's classes, so compare it between images rather than
    reading 0.5 as a decision threshold.
    """
    return "sigmoid" if num_outputs == 1 else "softmax"


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """``N x K`` logits -> ``N x K`` probabilities by :func:`scoring`'s rule."""
    if logits.shape[1] == 1:
        return torch.sigmoid(logits)
    return F.softmax(logits, dim=1)


def servable(net: nn.Module, manifest: dict[str, Any]) -> nn.Module:
    """``net`` taking images in ``[0, 1]``: its manifest's normalisation is applied first.

    A composition's manifest carries the identity normalisation (its parts normalise
    for themselves), so wrapping it changes nothing.
    """
    return NormalizedInput(net, input_spec_of(manifest)).eval().cpu()


def class_names_of(manifest: dict[str, Any], num_outputs: int) -> list[str]:
    """Class names in output order (indices as strings when the manifest has none)."""
    names = [str(n) for n in manifest.get("class_names") or []]
    if len(names) != num_outputs:
        # A model's manifest may predate class names; never ship a list that does not fit.
        names = [str(i) for i in range(num_outputs)]
    return names


def _num_outputs(net: nn.Module, spec: InputSpec) -> int:
    with torch.no_grad():
        return int(net(torch.zeros(1, *spec.shape)).shape[1])


def export_metadata(manifest: dict[str, Any], num_outputs: int) -> dict[str, Any]:
    """What an exported file says about itself (JSON-able)."""
    spec = input_spec_of(manifest)
    return {
        "mwt_export_version": EXPORT_VERSION,
        "kind": manifest.get("kind"),
        "dataset": manifest.get("dataset"),
        "source_sha256": manifest.get("sha256"),
        "class_names": class_names_of(manifest, num_outputs),
        "input": {
            "name": INPUT_NAME,
            "shape": ["N", spec.channels, spec.size, spec.size],
            "dtype": "float32",
            "layout": "NCHW",
            "range": [0.0, 1.0],
            "color": "grayscale" if spec.channels == 1 else "RGB",
            # Applied inside the exported network; listed so callers know what it does.
            "normalization": {"mean": list(spec.mean), "std": list(spec.std), "applied": "inside"},
        },
        "input_spec": spec.to_json(),
        "output": {"name": OUTPUT_NAME, "shape": ["N", num_outputs], "scoring": scoring(num_outputs)},
    }


def _write_atomically(path: Path, write: Any) -> Path:
    """Call ``write(tmp_path)`` then move the result to ``path`` (readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def export_torchscript(net: nn.Module, manifest: dict[str, Any], path: str | Path) -> Path:
    """Trace ``net`` (wrapped by :func:`servable`) to a TorchScript file with its metadata.

    ``torch.jit.load(path)(x)`` needs nothing but torch; the metadata is read back with
    ``torch.jit.load(path, _extra_files={"mwt.json": ""})`` or :func:`read_export_metadata`.
    """
    wrapped = servable(net, manifest)
    spec = input_spec_of(manifest)
    meta = export_metadata(manifest, _num_outputs(wrapped, spec))
    # Batch 2: tracing records no batch size, and BN/mask code sees a real batch axis.
    example = torch.rand(2, *spec.shape)
    extra = {METADATA_FILE: json.dumps(meta)}

    def write(tmp: str) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            # Tracer notes, and newer torch's FutureWarning that TorchScript is deprecated:
            # it still loads everywhere with torch alone, which is the point of this file.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", FutureWarning)
            save_traced(wrapped, example, tmp, extra)

    return _write_atomically(Path(path), write)


def export_onnx(net: nn.Module, manifest: dict[str, Any], path: str | Path,
                opset: int = ONNX_OPSET) -> Path:
    """Export ``net`` (wrapped by :func:`servable`) to ONNX with a dynamic batch dimension.

    Uses torch's TorchScript-based exporter (``dynamo=False`` where the argument exists):
    it needs only the ``onnx`` package, where the newer exporter needs ``onnxscript`` too.
    The metadata JSON goes to ``metadata_props`` under ``mwt.json``; ``class_names`` and
    ``input_spec`` also get keys of their own for tools that show metadata as a table.
    """
    try:
        import onnx
    except ImportError as exc:  # the exporter itself needs it
        raise ExportError("ONNX export needs the 'onnx' package (pip install onnx)") from exc
    wrapped = servable(net, manifest)
    spec = input_spec_of(manifest)
    meta = export_metadata(manifest, _num_outputs(wrapped, spec))
    kwargs: dict[str, Any] = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False

    def write(tmp: str) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notes
            with exclusive_trace():
                torch.onnx.export(
                    wrapped, (torch.rand(2, *spec.shape),), tmp,
                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
                    opset_version=opset, do_constant_folding=True, **kwargs,
                )
        model = onnx.load(tmp)
        entries = {METADATA_FILE: json.dumps(meta), "class_names": json.dumps(meta["class_names"]),
                   "input_spec": json.dumps(meta["input_spec"])}
        del model.metadata_props[:]
        for key, value in entries.items():
            prop = model.metadata_props.add()
            prop.key, prop.value = key, value
        model.doc_string = ("MwT Hub export: images in [0, 1], N x C x H x W -> one logit per "
                            "class; see metadata 'mwt.json'")
        onnx.checker.check_model(model)
        onnx.save(model, tmp)

    return _write_atomically(Path(path), write)


def export(net: nn.Module, manifest: dict[str, Any], path: str | Path, fmt: str) -> Path:
    """Export in format ``fmt`` (``torchscript`` or ``onnx``)."""
    if check_format(fmt) == "onnx":
        return export_onnx(net, manifest, path)
    return export_torchscript(net, manifest, path)


def export_artifact(directory: str | Path, fmt: str, path: str | Path) -> Path:
    """Load the artifact in ``directory`` (sha256 checked) and export it to ``path``."""
    check_format(fmt)
    net, manifest = load_artifact(directory, device="cpu")
    return export(net, manifest, path, fmt)


def read_export_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata JSON embedded in an exported file (format told by its suffix)."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        props = {p.key: p.value for p in model.metadata_props}
        if METADATA_FILE not in props:
            raise ExportError(f"{path} carries no {METADATA_FILE} metadata; not an MwT Hub export")
        return json.loads(props[METADATA_FILE])
    files = {METADATA_FILE: ""}
    torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    if not files[METADATA_FILE]:
        raise ExportError(f"{path} carries no {METADATA_FILE}; not an MwT Hub export")
    return json.loads(files[METADATA_FILE])


# Float values of one image converted and resized in one call; a larger image is resized in
# strips of rows (first across, then down), so its float copy never exists whole: a legal
# photo-sized input would otherwise cost several times its pixels in float32 at once.
RESIZE_CHUNK_VALUES = 1 << 20
_GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as Pillow converts RGB to L


def _as_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 ``C x H x W`` -> float with ``channels`` channels (grey repeated to RGB, RGB
    averaged to grey with the ITU-R 601 weights Pillow uses)."""
    f = x.to(torch.float32)
    if f.shape[0] == 1 and channels == 3:
        return f.expand(3, -1, -1)
    if f.shape[0] == 3 and channels == 1:
        return (f * torch.tensor(_GREY).view(3, 1, 1)).sum(0, keepdim=True)
    return f


def _resize(x: torch.Tensor, size: tuple[int, int], antialias: bool) -> torch.Tensor:
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False,
                         antialias=antialias)[0]


def _resize_in_strips(img: torch.Tensor, channels: int, size: int, antialias: bool
                      ) -> torch.Tensor:
    """:func:`_resize` of ``_as_channels(img)`` to ``size x size``, a strip of rows at a time
    along the width, then the ``H x size`` intermediate along the height.

    The float buffers are allocated once and reused: a fresh one per strip leaves the
    allocator's heap fragmented and growing by about a strip each time. Grey to RGB is
    resized once and repeated (the channels are resized alike).
    """
    c_in, h, w = (int(n) for n in img.shape)
    step = max(1, RESIZE_CHUNK_VALUES // (c_in * w))
    buffer = torch.empty(c_in * min(step, h) * w)
    weighted = torch.empty_like(buffer) if (c_in, channels) == (3, 1) else None
    grey_buffer = torch.empty(min(step, h) * w) if weighted is not None else None
    grey = torch.tensor(_GREY).view(3, 1, 1)
    mid = torch.empty((c_in if weighted is None else 1, h, size))
    for top in range(0, h, step):
        rows = min(step, h - top)
        x = buffer[: c_in * rows * w].view(c_in, rows, w)
        x.copy_(img[:, top : top + rows])
        if weighted is not None and grey_buffer is not None:
            products = weighted[: 3 * rows * w].view(3, rows, w)
            torch.mul(x, grey, out=products)
            x = grey_buffer[: rows * w].view(1, rows, w)
            torch.sum(products, 0, keepdim=True, out=x)
        mid[:, top : top + rows] = _resize(x, (rows, size), antialias)
    out = _resize(mid, (size, size), antialias)
    return out.expand(3, -1, -1) if (out.shape[0], channels) == (1, 3) else out


def prepare_image(img: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """One uint8 ``C x H x W`` image (C = 1 or 3, any size) -> float ``C' x S x S`` by the
    spec, in [0, 255] and rounded to 8 bits (see :func:`prepare_images`).

    Memory stays near the image's own bytes whatever its size: past
    :data:`RESIZE_CHUNK_VALUES` values the image is resized in strips of rows along its
    width, then the ``H x S`` intermediate along its height, as the one-call resize does
    (same result). A tall image narrower than ``S`` goes the other way round (columns down
    first, as rows of its transpose), where the result may differ from the one-call resize
    by float rounding.
    """
    if img.dim() != 3 or img.shape[0] not in (1, 3):
        raise ExportError(f"expected C x H x W with C 1 or 3, got {tuple(img.shape)}")
    s = spec.size
    h, w = int(img.shape[1]), int(img.shape[2])
    shrink = h > s or w > s
    if img.numel() <= RESIZE_CHUNK_VALUES or (h, w) == (s, s):
        x = _as_channels(img, spec.channels)
        if (h, w) != (s, s):
            x = _resize(x, (s, s), shrink)
    elif w >= h or w >= s:
        x = _resize_in_strips(img, spec.channels, s, shrink)
    else:  # across first would enlarge every row of this tall, narrow image
        x = _resize_in_strips(img.transpose(1, 2), spec.channels, s, shrink).transpose(1, 2)
    return x.round().clamp_(0, 255)


def prepare_images(images: list[torch.Tensor], spec: InputSpec) -> torch.Tensor:
    """uint8 ``C x H x W`` images (C = 1 or 3, any size) -> float ``N x C x S x S`` in [0, 1].

    Channels follow the spec (grey repeated to RGB, RGB averaged to grey with the ITU-R 601
    weights Pillow uses); each image is resized bilinearly to the spec's square size
    (aspect ratio not kept, as the datasets' own resize does) and rounded to 8 bits like
    the datasets' resize, so a dataset image and its PNG give the same tensor. Shrinking
    uses antialiasing, which the datasets never need (they only enlarge). Large images are
    resized piecewise (:func:`prepare_image`), so memory follows the largest image, not a
    float copy of it.
    """
    out = torch.empty((len(images), spec.channels, spec.size, spec.size))
    for i, img in enumerate(images):
        try:
            out[i] = prepare_image(img, spec)
        except ExportError as exc:
            raise ExportError(f"image {i}: {exc}") from None
    return out.div_(255.0)
