"""What clients may read of the server's own messages: no filesystem paths of the server.

Error details (HTTP answers, a failed job's ``error``) often carry an exception's text
(``FileNotFoundError: /srv/mwt/...``): clients must not learn the server's layout, and the
part below a directory the operator configured is all they can use.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from app.settings import Settings

# A directory is replaced only where its whole name stands: not inside a longer path
# (``/srv/mwt`` is neither the start of ``/srv/mwt2`` nor a part of ``/home/srv/mwt``).
_BEFORE = r"(?<![\w.~/\\-])"
_AFTER = r"(?![\w.~-])"


def path_scrubber(settings: Settings) -> Callable[[str], str]:
    """A function that replaces the server's directories in a message by their setting names.

    The data, artifact and dataset directories become ``<MWT_DATA_DIR>`` and the like (so
    ``<MWT_DATA_DIR>/weights/x.safetensors`` still says which file), the system's temporary
    directory ``<TMPDIR>``; each in every spelling it may take (as configured, resolved).
    """
    named: dict[str, str] = {}
    for label, d in (  # a directory set to another's (datasets: the data dir by default) keeps the first name
        ("<MWT_DATA_DIR>", settings.data_dir),
        ("<MWT_ARTIFACT_DIR>", settings.artifacts),
        ("<MWT_DATASET_DIR>", settings.datasets),
        ("<TMPDIR>", Path(tempfile.gettempdir())),
    ):
        for form in (str(d), str(d.resolve()), d.as_posix(), d.resolve().as_posix()):
            form = form.rstrip("/\\")
            if form not in ("", ".") and form not in named:
                named[form] = label
    ordered = sorted(named, key=len, reverse=True)  # longest first: the most precise name wins
    pattern = re.compile(_BEFORE + "(?:" + "|".join(re.escape(f) for f in ordered) + ")" + _AFTER)

    def scrub(message: str) -> str:
        return pattern.sub(lambda m: named[m.group(0)], message)

    return scrub
