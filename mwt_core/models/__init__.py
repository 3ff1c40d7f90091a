"""Networks: masked conv units, the architecture registry and the built-in CNNs.

Importing the package registers the built-in architectures, so every path to
``create_model`` sees them without an import cycle between registry and builders.
"""

from mwt_core.models import architectures as _builtins  # noqa: F401  (registers the built-ins)
from mwt_core.models import catalogue as _catalogue  # noqa: F401  (registers torchvision's CNNs)
from mwt_core.models.base import MwTNet
from mwt_core.models.registry import (
    ArchInfo,
    UnknownArchitecture,
    architecture_info,
    check_architecture,
    create_model,
    default_width,
    list_architectures,
    register_model,
)

__all__ = [
    "ArchInfo",
    "MwTNet",
    "UnknownArchitecture",
    "architecture_info",
    "check_architecture",
    "create_model",
    "default_width",
    "list_architectures",
    "register_model",
]
