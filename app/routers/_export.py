"""The export downloads shared by models, modules and compositions (TorchScript, ONNX)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import HTTPException, Query, Request, Response, status

from app.files import artifact_response
from app.services import export as export_svc
from app.settings import Settings

FormatQuery = Annotated[
    Literal["torchscript", "onnx"],
    Query(
        alias="format",
        description="torchscript (`torch.jit.load`) or onnx (onnxruntime); both take images in "
        "[0, 1], N x C x H x W, and carry class names and input spec as embedded JSON `mwt.json`",
    ),
]

EXPORT_DESCRIPTION = (
    "A self-contained file that runs without this project: `torch.jit.load(f)(x)` or an "
    "onnxruntime session with `x` images scaled to [0, 1], N x C x H x W (any N) as in the "
    "embedded input spec; it normalises them itself and outputs one logit per class, in the "
    "order of the embedded `class_names` (softmax for probabilities; a one-class module's single "
    "logit: sigmoid). Metadata: TorchScript extra file `mwt.json` "
    "(`torch.jit.load(f, _extra_files={'mwt.json': ''})`), ONNX `metadata_props['mwt.json']`. "
    "Built on first request and cached; ETag = the file's sha256."
)


def export_response(
    request: Request,
    settings: Settings,
    what: str,
    artifact_path: str | None,
    source_sha256: str | None,
    fmt: str,
    filename_stem: str,
) -> Response:
    """The cached ``fmt`` export of an artifact as a download, or the 4xx that says why not."""
    if artifact_path is None or source_sha256 is None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"{what} has no artifact yet; nothing to export")
    try:
        path, digest = export_svc.exported(settings, artifact_path, fmt, source_sha256)
    except (FileNotFoundError, ValueError) as exc:
        raise HTTPException(
            status.HTTP_410_GONE, f"{what}'s artifact cannot be loaded for export: {exc}"
        ) from None
    return artifact_response(
        request,
        path,
        digest,
        filename_stem + export_svc.filename_suffix(fmt),
        "application/octet-stream",
    )
