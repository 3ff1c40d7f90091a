"""What the service can train: architectures."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from app.auth import ReadKey

router = APIRouter(tags=["meta"])


class ArchitectureOut(BaseModel):
    name: str
    min_input_size: int
    description: str
    source: str  # "built-in" or "torchvision" (converted to its masked form)
    width_multiplier: bool  # False: the layout is fixed, jobs must use width 1
    default_width: float  # what a job that names no width trains at
    features: list[str]  # layer kinds the conversion handles in it
    unsupported: str | None  # set: listed to say why it cannot be trained


@router.get(
    "/architectures", response_model=list[ArchitectureOut], summary="Architectures jobs can train"
)
def architectures(_: ReadKey) -> list[ArchitectureOut]:
    from mwt_core.models import architecture_info, list_architectures

    out = []
    for name in list_architectures():
        info = architecture_info(name)
        out.append(
            ArchitectureOut(
                name=info.name, min_input_size=info.min_input_size, description=info.description,
                source=info.source, width_multiplier=info.width_multiplier,
                default_width=info.default_width,
                features=list(info.features), unsupported=info.unsupported,
            )
        )
    return out
