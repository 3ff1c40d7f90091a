"""The export downloads shared by models, modules and compositions (TorchScript, ONNX)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import HTTPException, Query, Request, Response, status

from app.files import artifact_response
from app.schemas.common import error_responses
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

# What every export route answers (GET .../export, a composition's .../torchscript), from
# export_response and artifact_response: written once, used by every such route.
_EXPORT_ERRORS = {
    404: "no such model, module or composition",
    409: "it has no artifact yet (its job has not finished)",
    410: "its artifact is gone from the store or cannot be loaded for export",
    503: None,  # the registry database is unavailable: the shared text
}
EXPORT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the exported file (ETag: its sha256)",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    206: {"description": "the requested byte range"},
    304: {"description": "not modified (If-None-Match)"},
    416: {"description": "the requested range is not satisfiable"},
    **{
        code: {**spec, "description": _EXPORT_ERRORS[int(code)] or spec["description"]}
        for code, spec in error_responses(*_EXPORT_ERRORS).items()
    },
}

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
