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
                name=info.name, min_input_size=info.min_input_size, description=info.description
            )
        )
    return out
