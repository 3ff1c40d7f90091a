"""Helpers shared by the routers: paging, sorting, 404s."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Query, status
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from app.deps import SettingsDep
from app.schemas.common import Page

T = TypeVar("T")


class Paging:
    def __init__(self, limit: int, offset: int) -> None:
        self.limit = limit
        self.offset = offset


async def paging(
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


def page(session: Session, stmt: Select[Any], p: Paging, out: Callable[[Any], T]) -> Page[T]:
    """One page of ``stmt``'s rows, each converted by ``out``, with the total and next offset."""
    total = session.scalar(select(func.count()).select_from(stmt.order_by(None).subquery())) or 0
    items = list(session.scalars(stmt.limit(p.limit).offset(p.offset)))
    nxt = p.offset + len(items) if p.offset + len(items) < total else None
    return Page[T](
        items=[out(i) for i in items], total=total, limit=p.limit, offset=p.offset, next_offset=nxt
    )


def sort_pattern(columns: Mapping[str, Any]) -> str:
    """The regex of a valid ``sort`` value, so the OpenAPI document states what sorted_by takes."""
    return "^-?(" + "|".join(re.escape(c) for c in columns) + ")$"


def sorted_by(stmt: Select[Any], sort: str, columns: Mapping[str, Any], tiebreak: Any) -> Select[Any]:
    """Order by ``sort`` (a key of ``columns``, '-' first for descending), ``tiebreak`` second."""
    col = columns.get(sort.lstrip("-"))
    if col is None:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"sort must be one of {', '.join(columns)} (optionally '-' first)",
        )
    if sort.startswith("-"):
        return stmt.order_by(col.desc(), tiebreak.desc())
    return stmt.order_by(col.asc(), tiebreak.asc())


def not_found(kind: str, ident: object) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, f"{kind} {ident} not found")
