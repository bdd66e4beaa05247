"""Per-session state: a private temporary folder, the clip, the encode job; removed when the session ends.

Sessions are keyed by the web framework's session id, which the browser sends: it is
only a key, never part of a path (folders get random names). The number of
sessions is bounded; the least recently used idle one is closed to make room.

A server's folder holds ``private/`` (every session's uploads, encodes and
checkpoints: never served) and ``public/`` (what a page shows or offers for
download). A file is published under a fresh random folder of its own
(:meth:`Session.publish`), so that its URL reveals no other file: not the session's
private folder, not another session's files.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import PromptusError
from .jobs import EncodeJob
from .uploads import ClipInfo

log = logging.getLogger(__name__)

#: How long closing a session waits for its encode to stop.
STOP_WAIT_S = 10.0


class Session:
    """One visitor's files and work: private ones under ``folder``, published ones under ``public``."""

    def __init__(self, folder: Path, public: Path | None = None):
        self.folder = folder
        self.public = public if public is not None else folder / "public"
        folder.mkdir(parents=True)
        self.public.mkdir(parents=True, exist_ok=True)
        self._published: list[Path] = []  # the random folders of published files
        self.clip: ClipInfo | None = None
        self.job: EncodeJob | None = None
        self.shown_job: EncodeJob | None = None  # whose results the page shows
        self.previewed: tuple | None = None  # (job, iterations done) of the preview on the page
        self.used = time.monotonic()
        self._views: dict[str, list[Path]] = {}
        self._view_count = 0

    @property
    def out(self) -> Path:
        """The session's .promptus file (fixed, so that a resume finds its checkpoint)."""
        return self.folder / "encode" / "clip.promptus"

    @property
    def upload_dir(self) -> Path:
        return self.folder / "clip"

    @property
    def busy(self) -> bool:
        return self.job is not None and not self.job.snapshot().finished

    def _public_folder(self) -> Path:
        folder = self.public / uuid.uuid4().hex
        folder.mkdir()
        self._published.append(folder)
        return folder

    def _unpublish(self, path: Path) -> None:
        shutil.rmtree(path.parent, ignore_errors=True)
        if path.parent in self._published:
            self._published.remove(path.parent)

    def publish(self, path: str | Path) -> Path:
        """A copy of the session's file ``path`` that the page may show or offer (a hard link where possible)."""
        path = Path(path)
        out = self._public_folder() / path.name
        try:
            os.link(path, out)
        except OSError:
            shutil.copyfile(path, out)
        return out

    def view(self, name: str, image: np.ndarray) -> Path:
        """``image`` (uint8 H×W×3) as a published PNG of this session, for the page to show.

        A new name every time (browsers cache by URL); older pictures of that ``name``
        are removed (the last two stay, one may still be loading), so that a long
        encode leaves two previews, not thousands.
        """
        self._view_count += 1
        path = self._public_folder() / f"{name}-{self._view_count}.png"
        Image.fromarray(image).save(path)
        shown = self._views.setdefault(name, [])
        shown.append(path)
        while len(shown) > 2:
            self._unpublish(shown.pop(0))
        return path

    def set_clip(self, clip: ClipInfo | None) -> None:
        """A new clip: earlier outputs and checkpoints belong to the old one."""
        self.stop()
        self.clip, self.job, self.shown_job = clip, None, None
        shutil.rmtree(self.out.parent, ignore_errors=True)

    def start(self, job: EncodeJob) -> EncodeJob:
        if self.busy:
            raise PromptusError("an encode is already running in this session; abort it first")
        self.job = job.start()
        return job

    def stop(self, wait: float = STOP_WAIT_S) -> None:
        if self.job is not None:
            self.job.abort()
            if not self.job.wait(wait):
                log.warning("studio: the encode of %s did not stop within %.0f s", self.folder, wait)

    def owns(self, path: str | Path) -> bool:
        """Whether ``path`` is one of this session's files (private or published)."""
        real = Path(path).resolve()
        return real.is_relative_to(self.folder.resolve()) or any(
            real.is_relative_to(p.resolve()) for p in self._published)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
        for folder in self._published:
            shutil.rmtree(folder, ignore_errors=True)
        self._published.clear()


ROOT_PREFIX = "promptus-studio-"
OWNER_FILE = "owner.pid"


def _remove_orphans(parent: Path) -> None:
    """Remove the folders of studio servers that died without cleaning up (killed, crashed)."""
    for root in parent.glob(ROOT_PREFIX + "*"):
        try:
            pid = int((root / OWNER_FILE).read_text())
            os.kill(pid, 0)  # raises when no such process
        except ProcessLookupError:
            log.info("studio: removing %s, left by server process %d", root, pid)
            shutil.rmtree(root, ignore_errors=True)
        except (OSError, ValueError):  # not ours to judge: no owner file, or another user's process
            continue


class SessionRegistry:
    """Sessions by id, each with its own folder under ``root``.

    ``root`` is a new folder made inside ``parent`` (the system's temp folder by
    default) and removed by :meth:`close_all`; nothing else in ``parent`` is touched.
    """

    def __init__(self, parent: str | Path | None = None, *, max_sessions: int = 64):
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        _remove_orphans(Path(parent) if parent is not None else Path(tempfile.gettempdir()))
        self.root = Path(tempfile.mkdtemp(prefix=ROOT_PREFIX, dir=parent))
        (self.root / OWNER_FILE).write_text(str(os.getpid()))
        self.private = self.root / "private"  # never served
        self.public = self.root / "public"  # published files, each in a random folder of its own
        self.private.mkdir()
        self.public.mkdir()
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, session_id: str | None) -> Session:
        if not session_id:
            raise PromptusError("this page has no session; reload it")
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None:
                self._make_room()
                s = self._sessions[session_id] = Session(self.private / uuid.uuid4().hex, self.public)
            self._sessions.move_to_end(session_id)
            s.used = time.monotonic()
            return s

    def _make_room(self) -> None:
        while len(self._sessions) >= self.max_sessions:
            idle = next((sid for sid, s in self._sessions.items() if not s.busy), None)
            if idle is None:
                raise PromptusError(f"the studio is busy with {len(self._sessions)} sessions; try again later")
            self._sessions.pop(idle).close()

    def close(self, session_id: str | None) -> None:
        """End a session: stop its encode and remove its folder."""
        with self._lock:
            s = self._sessions.pop(session_id, None) if session_id else None
        if s is not None:
            s.close()
            log.info("studio: session closed, removed %s", s.folder)

    def close_all(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for s in sessions:
            s.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def __len__(self) -> int:
        return len(self._sessions)

    def inside(self, path: str | Path) -> bool:
        """Whether ``path`` lies in this server's folder (any session's files, published or not)."""
        return Path(path).resolve().is_relative_to(self.root.resolve())

