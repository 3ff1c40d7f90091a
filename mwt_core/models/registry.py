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
    """What a registered architecture is and what it supports."""

    name: str
    min_input_size: int
    description: str
    source: str = "built-in"  # or "torchvision" (converted to its masked form)
    width_multiplier: bool = True  # False: fixed layout, width must be 1
    # The width a run takes when it names none: the one definition of that default
    # (TrainConfig, POST /jobs and the command lines read it from here).
    default_width: float = 1.0
    features: tuple[str, ...] = ()  # layer kinds the conversion handles in it (for listings)
    unsupported: str | None = None  # why it is listed but cannot be built


Builder = Callable[..., MwTNet]
_BUILDERS: dict[str, tuple[Builder, ArchInfo]] = {}


def _normal(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def register_model(
    name: str, *, min_input_size: int, description: str, **info: object,
) -> Callable[[Builder], Builder]:
    """Register ``builder(num_classes, in_channels, input_size, width, masked)`` under ``name``.

    ``info`` sets the other :class:`ArchInfo` fields (source, width_multiplier, ...).
    """

    def wrap(builder: Builder) -> Builder:
        if _normal(name) in {_normal(n) for n in _BUILDERS}:
            raise ValueError(f"architecture {name!r} is already registered")
        arch = ArchInfo(name, min_input_size, description, **info)  # type: ignore[arg-type]
        if not 0 < arch.default_width <= LIMITS.width or (
            not arch.width_multiplier and arch.default_width != 1
        ):
            raise ValueError(f"architecture {name!r} declares a default width it cannot run at")
        _BUILDERS[name] = (builder, arch)
        return builder

    return wrap


def list_architectures() -> list[str]:
    return sorted(_BUILDERS)


def architecture_info(arch: str) -> ArchInfo:
    """The registered architecture ``arch`` names (case, ``-`` and ``_`` ignored)."""
    key = _normal(arch)
    aliases = {"vgg16bn": "vgg16"}
    key = aliases.get(key, key)
    names = {_normal(n): n for n in _BUILDERS}
    if key not in names:
        raise UnknownArchitecture(
            f"unknown architecture {arch!r}; choose one of: {', '.join(sorted(_BUILDERS))}"
        )
    return _BUILDERS[names[key]][1]


def default_width(arch: str) -> float:
    """The width a run of ``arch`` takes when it names none (1 for a fixed layout)."""
    return architecture_info(arch).default_width


def check_architecture(arch: str, width: float) -> ArchInfo:
    """``arch``'s info if a run may use it at ``width``, else ``ValueError`` saying what to change.

    The one place where an architecture name and its width are validated (the run config
    and ``create_model`` both call it).
    """
    info = architecture_info(arch)
    if info.unsupported is not None:
        raise ValueError(f"{info.name} cannot be trained with MwT: {info.unsupported}")
    if not 0 < width <= LIMITS.width:
        raise ValueError(f"width must be in (0, {LIMITS.width:g}], got {width}")
    if not info.width_multiplier and width != 1:
        raise ValueError(
            f"{info.name} keeps the {info.source} layout (no width multiplier): set width to 1, "
            f"got {width}"
        )
    return info


def create_model(
    arch: str,
    num_classes: int,
    in_channels: int = 3,
    input_size: int = 32,
    width: float = 1.0,
    masked: bool = True,
) -> MwTNet:
    """Build a registered architecture; ``masked`` adds mask generators (MwT training)."""
    info = check_architecture(arch, width)
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be positive, got {in_channels}")
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
