"""Helpers shared by the routers: paging, 404s."""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Query, status
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from app.deps import SettingsDep

T = TypeVar("T")


class Paging:
    def __init__(self, limit: int, offset: int) -> None:
        self.limit = limit
        self.offset = offset


def paging(
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, description="page size")] = 50,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1, description="items to skip")] = 0,
) -> Paging:
    if limit > settings.page_size_max:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"limit must be at most {settings.page_size_max}, got {limit}",
        )
    return Paging(limit, offset)


PagingDep = Annotated[Paging, Depends(paging)]


def page(session: Session, stmt: Select[Any], p: Paging) -> tuple[list[Any], int, int | None]:
    total = session.scalar(select(func.count()).select_from(stmt.order_by(None).subquery())) or 0
    items = list(session.scalars(stmt.limit(p.limit).offset(p.offset)))
    nxt = p.offset + len(items) if p.offset + len(items) < total else None
    return items, total, nxt


def not_found(kind: str, ident: object) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, f"{kind} {ident} not found")
