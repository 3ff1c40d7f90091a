"""API key management (admin scope)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, status
from sqlalchemy import select

from app.auth import AdminKey, create_key
from app.db.models import ApiKey, utcnow
from app.deps import DbDep
from app.routers._common import not_found
from app.schemas.common import PathId
from app.schemas.keys import KeyCreate, KeyCreated, KeyOut

router = APIRouter(prefix="/keys", tags=["keys"])


@router.post(
    "", response_model=KeyCreated, status_code=status.HTTP_201_CREATED, summary="Create an API key"
)
def create(body: KeyCreate, db: DbDep, _: AdminKey) -> KeyCreated:
    try:
        key, token = create_key(db, body.name, body.scopes)
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    db.commit()
    return KeyCreated(**KeyOut.model_validate(key).model_dump(), token=token)


@router.get("", response_model=list[KeyOut], summary="List API keys (never their tokens)")
def list_keys(db: DbDep, _: AdminKey) -> list[ApiKey]:
    return list(db.scalars(select(ApiKey).order_by(ApiKey.id)))


@router.delete("/{key_id}", response_model=KeyOut, summary="Revoke an API key")
def revoke(key_id: PathId, request: Request, db: DbDep, principal: AdminKey) -> ApiKey:
    key = db.get(ApiKey, key_id)
    if key is None:
        raise not_found("API key", key_id)
    if key.id == principal.key_id:
        raise HTTPException(
            status.HTTP_409_CONFLICT, "refusing to revoke the key making this request"
        )
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        db.commit()
    request.app.state.key_cache.clear()
    return key
