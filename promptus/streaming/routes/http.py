"""Plain HTTP routes: the viewer page, the clip listing, the status, the files under the root."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from ...errors import PromptusError
from ..library import ClipForbidden, ClipNotFound
from . import state_of

STATIC = Path(__file__).resolve().parents[1] / "static"

router = APIRouter()


def mount_static(app) -> None:
    app.mount("/static", StaticFiles(directory=STATIC), name="static")


def _http_error(e: PromptusError) -> HTTPException:
    code = 404 if isinstance(e, ClipNotFound) else 403 if isinstance(e, ClipForbidden) else 422
    return HTTPException(code, str(e))


@router.get("/", include_in_schema=False)
async def index():
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/api/clips")
async def clips(request: Request):
    library = state_of(request).library
    return {"root": library.root.name, "clips": await asyncio.to_thread(library.list)}


@router.get("/api/clips/{name:path}")
async def clip_info(name: str, request: Request):
    try:
        return (await asyncio.to_thread(state_of(request).library.clip, name)).info()
    except PromptusError as e:
        raise _http_error(e) from None


@router.get("/api/status")
async def status(request: Request):
    return state_of(request).status()


@router.get("/files/{name:path}")
async def files(name: str, request: Request):
    try:
        path = state_of(request).library.resolve(name)
    except PromptusError as e:
        raise _http_error(e) from None
    media = "application/octet-stream" if path.suffix == ".promptus" else None
    return FileResponse(path, media_type=media, filename=path.name if media else None)
