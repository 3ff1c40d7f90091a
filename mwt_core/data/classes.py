"""Class lists: ``"3,5,8"`` or ``"cat,dog"`` (or ``[3, "dog"]``) -> class indices.

One parser for the CLI, the service's API and its client. A token that is one of the
class names means that class; otherwise a token of ASCII digits (with an optional sign)
is an index. Only ASCII digits count: ``str.isdigit`` also accepts characters such as
``'²'`` that ``int`` cannot parse. Standard library only (the service imports it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_INDEX = re.compile(r"[+-]?[0-9]+")


class ClassListError(ValueError):
    """A class list that does not name classes of the model or dataset at hand."""


def split_class_list(text: str) -> list[str]:
    """The comma-separated tokens of ``text``, stripped; an empty list or token is an error."""
    tokens = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in tokens):
        raise ClassListError(
            f"bad class list {text!r}: give comma-separated class indices or names, e.g. 3,5,8"
        )
    return tokens


def is_index(token: str) -> bool:
    """Whether ``token`` is written as a class index (ASCII digits, optional sign)."""
    return _INDEX.fullmatch(token) is not None


def resolve_classes(items: Sequence[int | str], class_names: Sequence[str], *,
                    owner: str = "") -> list[int]:
    """Class indices of ``items`` (indices or names), in order, validated against
    ``class_names``; ``owner`` (e.g. ``"model 3"``) names whose classes they are in errors."""
    names = [str(n) for n in class_names]
    k = len(names)
    of = f" of {owner}" if owner else ""
    if not items:
        raise ClassListError("choose at least one class")
    out: list[int] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int | str):
            raise ClassListError(f"class {item!r} is neither an index nor a name")
        if isinstance(item, str) and item in names:
            idx = names.index(item)
        elif isinstance(item, int) or is_index(item.strip()):
            idx = int(item)
            if not 0 <= idx < k:
                raise ClassListError(f"class index {idx} is out of range{of} (0..{k - 1})")
        else:
            shown = ", ".join(names[:20]) + (" ..." if k > 20 else "")
            raise ClassListError(f"unknown class: {owner or 'the data set'} has no class named "
                                 f"{item!r}; use an index 0..{k - 1} or one of: {shown}")
        if idx in out:
            raise ClassListError(f"class {item!r} is listed twice (classes must not repeat)")
        out.append(idx)
    return out


def parse_classes(text: str, class_names: Sequence[str], *, owner: str = "") -> list[int]:
    """``"3,5,8"`` (indices) or ``"cat,dog"`` (names) -> class indices, in the given order."""
    return resolve_classes(split_class_list(text), class_names, owner=owner)


def class_items(text: str) -> list[int | str]:
    """The tokens of a class list as they go to the service: indices as ints, names as text."""
    return [int(t) if is_index(t) else t for t in split_class_list(text)]
