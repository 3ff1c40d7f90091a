"""FastAPI dependencies: settings, DB session, artifact store, dispatcher."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.settings import Settings

if TYPE_CHECKING:
    from app.dispatch import Dispatcher


async def get_db(request: Request) -> AsyncIterator[Session]:
    """One session per request, from the app's own session factory; rolled back if not committed.

    Async so that opening and closing it cost no worker-thread hops: creating a session does no
    I/O, and closing one only returns its connection to the pool (a rollback if one was used)."""
    session: Session = request.app.state.sessionmaker()
    try:
        yield session
    finally:
        session.close()


# The cheap dependencies are async: a sync one costs a worker-thread hop per request.
async def app_settings(request: Request) -> Settings:
    """The settings the app was created with (one object per app, see ``create_app``)."""
    return request.app.state.settings


async def get_dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher


SettingsDep = Annotated[Settings, Depends(app_settings)]
DbDep = Annotated[Session, Depends(get_db)]
DispatcherDep = Annotated["Dispatcher", Depends(get_dispatcher)]
