from __future__ import annotations

from typing import Annotated, Generic, TypeVar

from fastapi import Path, Query
from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")

MAX_ID = 2**31 - 1  # ids and counts fit a 32-bit signed integer column on every backend

DbId = Annotated[int, Field(ge=1, le=MAX_ID)]
PathId = Annotated[int, Path(ge=1, le=MAX_ID)]
QueryId = Annotated[int | None, Query(ge=1, le=MAX_ID)]
QueryIndex = Annotated[int | None, Query(ge=0, le=MAX_ID)]


class OrmModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int
    next_offset: int | None = None


class Message(BaseModel):
    detail: str


class ErrorItem(BaseModel):
    """One failed check of a request (from request validation)."""

    loc: list[str | int]
    msg: str
    type: str


class ErrorOut(BaseModel):
    """Every error response: ``detail`` says what to fix; validation errors list each check."""

    detail: str
    errors: list[ErrorItem] | None = None


_ERROR_TEXT = {
    400: "the request cannot be served as asked",
    401: "missing, unknown or revoked API key",
    403: "the API key lacks the scope (or does not own the resource)",
    404: "not found",
    409: "conflicts with the current state of the registry",
    410: "the artifact is gone from the store",
    413: "the body is too large",
    422: "invalid request: what to fix is in detail (and errors)",
    429: "too many requests of this kind at once; retry later",
    503: "a service the request needs is unavailable; retry later",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, object]]:
    """OpenAPI ``responses`` entries for the error codes a route raises, all with ErrorOut."""
    return {c: {"model": ErrorOut, "description": _ERROR_TEXT.get(c, "error")} for c in codes}
