"""Names and defaults of composition methods, and the composition error.

Kept free of torch so the service can validate requests and build its schema at start-up
without loading PyTorch; ``mwt_core.combine`` implements the methods named here.
"""

from __future__ import annotations

METHODS: tuple[str, ...] = ("raw", "scale_bias", "log_softmax", "energy", "gauss", "gauss_map",
                            "head", "gauss_head")
ZERO_LABEL_METHODS: tuple[str, ...] = ("raw", "log_softmax", "energy", "gauss", "gauss_map")
LABELLED_METHODS: tuple[str, ...] = ("scale_bias", "head", "gauss_head")
# Not a method: the zero-label method whose composition scores best on the sources' validation
# slices (mwt_core.compose.choose_combine). Why: which method rejects the other sources' images
# best depends on the models (dense or sparse masks, easy or hard data), and the slices the
# sources held out of training are labelled images of exactly the composed task.
AUTO_COMBINE = "auto"
# What an entry point (the API, both CLIs, the bench) may be asked for: a method or "auto".
CHOICES: tuple[str, ...] = (*METHODS, AUTO_COMBINE)
# What the API, both CLIs and the bench compose with when asked for no method.
DEFAULT_COMBINE = AUTO_COMBINE
# The method "auto" runs where the sources hold no validation slice, and the library's default
# where a method must be named: the best no-label method measured by bench/compose.py on a
# held-out part of digits' training split (docs/defaults.md, "Composition").
FALLBACK_COMBINE = "gauss_map"
DEFAULT_PER_CLASS = 20  # labelled training images per class for the labelled methods


class CompositionError(ValueError):
    """A request that cannot be composed: bad classes, sources of different input shapes, an
    unknown combine method or one that lacks the images it needs. The API answers it with a
    4xx and the CLIs with one line."""


def check_choice(method: str) -> str:
    """``method`` if it is a method or ``AUTO_COMBINE`` (what an entry point may be asked)."""
    return method if method == AUTO_COMBINE else check_method(method)


def check_method(method: str) -> str:
    """``method`` if known, else a :class:`CompositionError` listing the known ones."""
    if method not in METHODS:
        raise CompositionError(
            f"unknown combine method {method!r}; choose one of {', '.join(METHODS)}")
    return method
