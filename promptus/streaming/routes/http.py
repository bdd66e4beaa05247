"""Plain HTTP routes: the viewer page, the clip listing, the status and readiness, the files under the root."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from ...config import CodecConfig
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


@router.get("/api/ready")
async def ready(request: Request, fps: float = CodecConfig.fps):
    """200 when one more viewer at ``fps`` frames/s would be served in real time now, else 503."""
    if not fps > 0:
        raise HTTPException(422, "fps must be a positive number of frames per second")
    ok, why = state_of(request).ready(fps)
    return JSONResponse({"ready": ok, "fps": fps, "reason": why}, 200 if ok else 503)


@router.get("/files/{name:path}")
async def files(name: str, request: Request):
    try:
        path = state_of(request).library.resolve(name)
    except PromptusError as e:
        raise _http_error(e) from None
    media = "application/octet-stream" if path.suffix == ".promptus" else None
    return FileResponse(path, media_type=media, filename=path.name if media else None)
