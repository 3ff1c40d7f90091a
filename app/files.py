"""Serving artifact archives: ETag = sha256, If-None-Match -> 304, Range -> 206 (resume)."""

from __future__ import annotations

from pathlib import Path

from fastapi import HTTPException, Request, status
from starlette.responses import FileResponse, Response


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    if header.strip() == "*":
        return True
    tags = [t.strip() for t in header.split(",")]
    return any(t.removeprefix("W/") == etag for t in tags)


def artifact_response(
    request: Request, path: Path, sha256: str, filename: str, media_type: str = "application/x-tar"
) -> Response:
    """A download whose ETag is the sha256 the registry recorded for the file."""
    if not path.is_file():
        raise HTTPException(
            status.HTTP_410_GONE,
            f"the archive of this artifact is missing from the store ({filename}); re-create it",
        )
    etag = f'"{sha256}"'
    headers = {
        "etag": etag,
        "x-checksum-sha256": sha256,
        "cache-control": "private, no-cache",
        "accept-ranges": "bytes",
    }
    if _etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    return FileResponse(path, media_type=media_type, filename=filename, headers=headers)
