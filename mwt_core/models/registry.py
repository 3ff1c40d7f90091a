"""Architectures by name: a decorator registers a builder, ``create_model`` builds one.

The built-ins register themselves when :mod:`mwt_core.models` is imported, which
importing this module always does first (it is the package's submodule).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mwt_core.limits import LIMITS
from mwt_core.models.base import MwTNet


class UnknownArchitecture(ValueError):
    """Raised for an architecture name that no builder is registered under."""


@dataclass(frozen=True)
class ArchInfo:
    name: str
    min_input_size: int
    description: str


Builder = Callable[..., MwTNet]
_BUILDERS: dict[str, tuple[Builder, ArchInfo]] = {}


def register_model(name: str, *, min_input_size: int, description: str) -> Callable[[Builder], Builder]:
    """Register ``builder(num_classes, in_channels, input_size, width, masked)`` under ``name``."""

    def wrap(builder: Builder) -> Builder:
        if name in _BUILDERS:
            raise ValueError(f"architecture {name!r} is already registered")
        _BUILDERS[name] = (builder, ArchInfo(name, min_input_size, description))
        return builder

    return wrap


def list_architectures() -> list[str]:
    return sorted(_BUILDERS)


def architecture_info(arch: str) -> ArchInfo:
    key = arch.lower().replace("-", "").replace("_", "")
    aliases = {"vgg16bn": "vgg16", "vgg16": "vgg16"}
    key = aliases.get(key, key)
    if key not in _BUILDERS:
        raise UnknownArchitecture(
            f"unknown architecture {arch!r}; choose one of: {', '.join(sorted(_BUILDERS))}"
        )
    return _BUILDERS[key][1]


def create_model(
    arch: str,
    num_classes: int,
    in_channels: int = 3,
    input_size: int = 32,
    width: float = 1.0,
    masked: bool = True,
) -> MwTNet:
    """Build a registered architecture; ``masked`` adds mask generators (MwT training)."""
    info = architecture_info(arch)
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be positive, got {in_channels}")
    if not 0 < width <= LIMITS.width:
        raise ValueError(f"width must be in (0, {LIMITS.width:g}], got {width}")
    if input_size < info.min_input_size:
        raise ValueError(
            f"{info.name} needs inputs of at least {info.min_input_size}x{info.min_input_size} "
            f"pixels, got {input_size}; resize the data (datasets do it with min_input_size)"
        )
    builder = _BUILDERS[info.name][0]
    net = builder(
        num_classes=num_classes,
        in_channels=in_channels,
        input_size=input_size,
        width=width,
        masked=masked,
    )
    net.config = {
        "arch": info.name,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "input_size": input_size,
        "width": width,
        "masked": masked,
    }
    return net
