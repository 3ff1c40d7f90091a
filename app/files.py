"""Files over HTTP: receiving uploads (staged, counted and hashed while they stream) and
serving artifact archives (ETag = sha256, If-None-Match -> 304, Range -> 206 resume)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from types import TracebackType
from typing import IO

from fastapi import HTTPException, Request, status
from starlette.responses import FileResponse, Response


class StagedUpload:
    """An upload being received: written to a temporary file beside its final path, counted
    against ``limit`` (413 with ``too_large`` past it) and hashed as it streams, so no body
    is ever held whole in memory; :meth:`commit` moves it into place, and anything not
    committed is removed on exit (a refused or broken upload leaves nothing behind)."""

    def __init__(self, final: Path, limit: int, too_large: str) -> None:
        self.final, self.limit, self.too_large = final, limit, too_large
        self.size = 0
        self._digest = hashlib.sha256()
        self._file: IO[bytes] | None = None
        self.path = final

    def __enter__(self) -> StagedUpload:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.final.parent, prefix=".upload-", suffix=self.final.suffix)
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb")
        return self

    def write(self, chunk: bytes) -> None:
        """Append ``chunk``; 413 once the upload passes its limit."""
        assert self._file is not None, "write() outside the with block"
        self.size += len(chunk)
        if self.size > self.limit:
            raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, self.too_large)
        self._digest.update(chunk)
        self._file.write(chunk)

    def received(self) -> Path:
        """Close the staged file (everything is written) and return its path, for validation."""
        if self._file is not None:
            self._file.close()
            self._file = None
        return self.path

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def commit(self) -> None:
        """Move the received file to its final path (atomically, same directory)."""
        os.replace(self.received(), self.final)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.received()
        if self.path != self.final:
            self.path.unlink(missing_ok=True)


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
