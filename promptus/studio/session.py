"""Per-session state: a private temporary folder, the clip, the encode job; removed when the session ends.

Sessions are keyed by the web framework's session id, which the browser sends: it is
only a key, never part of a path (folders get random names). The number of
sessions is bounded; the least recently used idle one is closed to make room.
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
    """One visitor's files and work, all under ``folder``."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True)
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

    def view(self, name: str, image: np.ndarray) -> Path:
        """``image`` (uint8 H×W×3) as a PNG of this session, for the page to show.

        A new name every time (browsers cache by URL); older pictures of that ``name``
        are removed (the last two stay, one may still be loading), so that a long
        encode leaves two previews, not thousands.
        """
        self._view_count += 1
        path = self.folder / "view" / f"{name}-{self._view_count}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(image).save(path)
        shown = self._views.setdefault(name, [])
        shown.append(path)
        while len(shown) > 2:
            shown.pop(0).unlink(missing_ok=True)
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

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


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
                s = self._sessions[session_id] = Session(self.root / uuid.uuid4().hex)
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

