"""FastAPI dependencies: settings, DB session, artifact store, dispatcher."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.settings import Settings, get_settings

if TYPE_CHECKING:
    from app.dispatch import Dispatcher


def get_db(request: Request) -> Iterator[Session]:
    """One session per request, from the app's own session factory; rolled back if not committed."""
    session: Session = request.app.state.sessionmaker()
    try:
        yield session
    finally:
        session.close()


def get_dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher


SettingsDep = Annotated[Settings, Depends(get_settings)]
DbDep = Annotated[Session, Depends(get_db)]
DispatcherDep = Annotated["Dispatcher", Depends(get_dispatcher)]
