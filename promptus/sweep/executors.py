"""Executors that run sweep jobs: in order in this process, or one Ray task per point."""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from ..errors import PromptusError
from .jobs import run_point

log = logging.getLogger(__name__)


class LocalExecutor:
    """Runs jobs one after another in this process."""

    name = "local"

    def __init__(self) -> None:
        self._queue: deque[dict[str, Any]] = deque()

    def submit(self, spec: dict[str, Any], *, first: bool = False) -> None:
        (self._queue.appendleft if first else self._queue.append)(spec)

    def __bool__(self) -> bool:
        return bool(self._queue)

    def next_result(self) -> tuple[dict[str, Any], dict[str, Any] | BaseException]:
        spec = self._queue.popleft()
        try:
            return spec, run_point(spec)
        except (PromptusError, OSError, RuntimeError, ValueError) as e:
            return spec, e

    def close(self) -> None:
        pass


RAY_MISSING = "--ray needs Ray, which is not installed: pip install 'promptus[distributed]' (or pip install ray)"


class RayExecutor:
    """Runs each job as a Ray task: num_gpus=1 for promptus points where the cluster has GPUs, else num_cpus=1.

    ``address`` None starts (or joins) a local Ray instance. With a remote
    cluster, every node must see the sweep's --out folder and the clips at the
    same paths (a shared file system) and have promptus installed.
    """

    name = "ray"

    def __init__(self, address: str | None = None):
        try:
            import ray
        except ImportError as e:
            raise PromptusError(RAY_MISSING) from e
        self.ray = ray
        self._owned = False
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
            self._owned = True
        gpus = ray.cluster_resources().get("GPU", 0)
        self.gpu = gpus >= 1
        self._promptus = ray.remote(num_gpus=1 if self.gpu else 0, num_cpus=1)(run_point)
        self._baseline = ray.remote(num_gpus=0, num_cpus=1)(run_point)
        self._pending: dict[Any, dict[str, Any]] = {}
        log.info("ray: %s, %s per promptus point", ray.cluster_resources(),
                 "1 GPU" if self.gpu else "1 CPU (no GPU in the cluster)")

    def submit(self, spec: dict[str, Any], *, first: bool = False) -> None:
        task = self._promptus if spec["inputs"]["codec"] == "promptus" else self._baseline
        self._pending[task.remote(spec)] = spec

    def __bool__(self) -> bool:
        return bool(self._pending)

    def next_result(self) -> tuple[dict[str, Any], dict[str, Any] | BaseException]:
        done, _ = self.ray.wait(list(self._pending), num_returns=1)
        spec = self._pending.pop(done[0])
        try:
            return spec, self.ray.get(done[0])
        except Exception as e:  # a task's error arrives wrapped; keep the original where Ray gives it
            return spec, getattr(e, "cause", None) or e

    def close(self) -> None:
        for ref in self._pending:
            self.ray.cancel(ref)
        if self._owned:
            self.ray.shutdown()
