"""Start MwT from weights the user already has: a safetensors state dict, checked first.

The file is read with safetensors (never unpickled) after its size is checked; names are
matched to the architecture (a converted torchvision network also accepts torchvision's
own names), every shape is compared before anything is loaded, and the mask generators
stay freshly initialised: they are what MwT trains on top of the given network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mwt_core.limits import LIMITS
from mwt_core.models.base import MwTNet
from mwt_core.models.convert import ConvertedNet


class WeightsError(ValueError):
    """The weights cannot start this architecture (the message names the tensor)."""


def _fresh(name: str) -> bool:
    """Tensors MwT creates itself: mask generators and slimming's keep buffers."""
    parts = name.split(".")
    return "gate" in parts or parts[-1] == "keep"


def read_weights(path: str | Path, max_bytes: int = LIMITS.init_weights_bytes) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file of at most ``max_bytes`` bytes."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"no weights file at {p}")
    size = p.stat().st_size
    if size > max_bytes:
        raise WeightsError(f"{p} has {size} bytes, more than the {max_bytes} allowed")
    try:
        with safe_open(str(p), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{p} is not a safetensors state dict: {exc}") from exc


# safetensors' dtype names -> torch's, for listings.
_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


@dataclass(frozen=True)
class WeightsHeader:
    """What a safetensors file's header says of its tensors (no tensor read)."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]  # tensor name -> torch dtype name ("float32")

    @property
    def params(self) -> int:
        """Elements in all tensors together."""
        return sum(math.prod(shape) for shape in self.shapes.values())

    @property
    def dtype_names(self) -> list[str]:
        """The distinct dtypes of the tensors, sorted."""
        return sorted(set(self.dtypes.values()))


def read_header(path: str | Path, max_bytes: int = LIMITS.init_weights_bytes) -> WeightsHeader:
    """Names, shapes and dtypes of a safetensors file's tensors, from its header only."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"no weights file at {p}")
    if p.stat().st_size > max_bytes:
        raise WeightsError(f"{p} has {p.stat().st_size} bytes, more than the {max_bytes} allowed")
    try:
        with safe_open(str(p), framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118  (safe_open has no __iter__)
            return WeightsHeader(
                shapes={k: tuple(s.get_shape()) for k, s in slices.items()},
                dtypes={k: _DTYPE_NAMES.get(s.get_dtype(), s.get_dtype().lower())
                        for k, s in slices.items()},
            )
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{p} is not a safetensors state dict: {exc}") from exc


def read_shapes(path: str | Path, max_bytes: int = LIMITS.init_weights_bytes) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a safetensors file's tensors, from its header (no tensor is read)."""
    return read_header(path, max_bytes).shapes


def match_weights(model: MwTNet, shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """Which of ``model``'s tensors each given name fills (mask generators left out).

    Every network tensor must be given with the architecture's shape; the first name that
    is unknown, mismatched or missing raises :class:`WeightsError` saying so.
    """
    arch = getattr(model, "config", {}).get("arch", type(model).__name__)
    target = model.state_dict()
    mapped: dict[str, str] = {}
    for key, shape in shapes.items():
        name = key
        if key not in target and isinstance(model, ConvertedNet):
            name = model.converted_key(key)
        if _fresh(name):
            continue  # a model trained with MwT before: its generators start fresh
        if name not in target:
            raise WeightsError(f"tensor {key!r} is not a weight of {arch}")
        expected = tuple(target[name].shape)
        if tuple(shape) != expected:
            raise WeightsError(
                f"tensor {key!r} has shape {list(shape)}, {arch} expects {list(expected)} "
                "(check num_classes and the input channels)"
            )
        mapped[key] = name
    given = set(mapped.values())
    missing = [k for k in target if not _fresh(k) and k not in given
               and not k.endswith("num_batches_tracked")]
    if missing:
        raise WeightsError(
            f"the weights lack {missing[0]!r}"
            + (f" and {len(missing) - 1} more tensors" if len(missing) > 1 else "")
            + f" of {arch}"
        )
    return mapped


def load_weights(model: MwTNet, state: dict[str, torch.Tensor]) -> int:
    """Copy ``state`` into ``model``'s network weights (checked by :func:`match_weights`);
    the mask generators keep their fresh initialisation. Returns how many tensors were loaded."""
    mapped = match_weights(model, {k: tuple(v.shape) for k, v in state.items()})
    model.load_state_dict({name: state[key] for key, name in mapped.items()}, strict=False)
    return len(mapped)


def init_from(model: MwTNet, path: str | Path) -> int:
    """:func:`read_weights` then :func:`load_weights`: how a run starts from the user's weights."""
    return load_weights(model, read_weights(path))
