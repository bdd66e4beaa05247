"""Promptus Studio: a web page to encode a clip at a chosen bitrate, follow and abort the work,
and compare the regenerated video with the original (``promptus studio``; needs the ``studio`` extra).

    from promptus.studio import build_studio, mount_studio
    build_studio(model="tiny").promptus_studio.launch(port=7860)   # standalone
    mount_studio(fastapi_app, "/studio")                          # inside another server

The page is a thin layer (``app``) over plain modules that need no Gradio:
``settings`` (presets and the expected bitrate), ``uploads`` (checking what was
uploaded), ``jobs`` (the encode thread, abort, results, benchmark) and ``session``
(per-visitor folders, removed when the visit ends).
"""

from __future__ import annotations


def build_studio(*args, **kwargs):
    """The studio page as a ``gradio.Blocks`` (see :func:`promptus.studio.app.build_studio`)."""
    from .app import build_studio as _build

    return _build(*args, **kwargs)


def mount_studio(app, path: str = "/studio", **kwargs):
    """Serve the studio from a FastAPI app under ``path`` (see :func:`promptus.studio.app.mount_studio`)."""
    from .app import mount_studio as _mount

    return _mount(app, path, **kwargs)


__all__ = ["build_studio", "mount_studio"]
