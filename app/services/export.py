"""Exports of stored artifacts (TorchScript, ONNX), built once and cached next to the artifact.

``models/<id>/model`` -> ``models/<id>/model.onnx``; ``models/<id>/modules/3`` ->
``models/<id>/modules/3.onnx``; ``compositions/<token>/artifact`` ->
``compositions/<token>/composition.onnx`` (and ``.torchscript.pt`` likewise). A hidden
``.<file>.json`` beside each records its sha256 (the download's ETag) and what it was built
from, so a file from another artifact version or an older exporter is rebuilt, never served.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from app import storage
from app.settings import Settings

_locks: dict[Path, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock_for(path: Path) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(path, threading.Lock())


def export_path(artifact_dir: Path, fmt: str) -> Path:
    """Where the ``fmt`` export of the artifact in ``artifact_dir`` is cached."""
    from mwt_core.export import SUFFIXES, check_format

    stem = {"artifact": "composition"}.get(artifact_dir.name, artifact_dir.name)
    return artifact_dir.parent / f"{stem}{SUFFIXES[check_format(fmt)]}"


def exported(settings: Settings, artifact_path: str, fmt: str, source_sha256: str) -> tuple[Path, str]:
    """The ``fmt`` export of a stored artifact and its sha256, exporting it on first use.

    ``source_sha256`` is the registry's checksum of the artifact: a cached file made from
    anything else (or by another export version) is replaced. Raises ``ValueError``
    (``ArtifactError``, ``ExportError``) or ``FileNotFoundError`` when the artifact cannot be
    loaded or exported.
    """
    from mwt_core.export import EXPORT_VERSION, export_artifact

    art = storage.resolve(settings.artifacts, artifact_path)
    path = export_path(art, fmt)
    record = path.with_name(f".{path.name}.json")
    want = {"source_sha256": source_sha256, "export_version": EXPORT_VERSION}
    with _lock_for(path):  # one export per file at a time; other requests wait for it
        if path.is_file() and record.is_file():
            try:
                seen = json.loads(record.read_text())
                if {k: seen.get(k) for k in want} == want:
                    return path, str(seen["sha256"])
            except (ValueError, KeyError):
                pass  # unreadable record: export again
        if not art.is_dir():
            raise FileNotFoundError(f"artifact directory {artifact_path} is missing from the store")
        export_artifact(art, fmt, path)
        digest = storage.sha256_file(path)
        tmp = record.with_name(f"{record.name}.tmp{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(json.dumps({**want, "sha256": digest}))
        os.replace(tmp, record)
    return path, digest


def filename_suffix(fmt: str) -> str:
    """The download's file-name ending for ``fmt`` (``.torchscript.pt`` or ``.onnx``)."""
    from mwt_core.export import SUFFIXES, check_format

    return SUFFIXES[check_format(fmt)]
