"""Executors that run sweep jobs: in order in this process, or on long-lived Ray actors."""

from __future__ import annotations

import contextlib
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
#: Times a promptus point is tried when the actor running it dies (or fails with anything but a PromptusError).
POINT_ATTEMPTS = 2


class PointActor:
    """A long-lived sweep worker (a Ray actor): one per GPU, or per ``gpus_per_point`` GPUs.

    It runs promptus points one after another in one process, so the models load once
    (:func:`promptus.sweep.jobs.load_models` is cached per process) and a compiled
    training step, kept per process by the encoder, serves every later point of the
    same shape. With several GPUs each point encodes on all of them (``--devices all``
    within the GPUs Ray gave the actor).
    """

    def __init__(self, gpus_per_point: int = 1):
        self.gpus_per_point = gpus_per_point
        self.points = 0

    def ping(self) -> dict[str, Any]:
        from .jobs import worker_info

        return worker_info()

    def run(self, spec: dict[str, Any], attempt: int = 1) -> dict[str, Any]:
        import time

        import torch

        t0 = time.perf_counter()
        spec = dict(spec)
        if self.gpus_per_point > 1 and torch.cuda.is_available() and torch.cuda.device_count() > 1:
            spec["devices"] = "all"  # execution only: the GPUs Ray gave this actor
        result = run_point(spec)
        self.points += 1
        total = time.perf_counter() - t0
        result["worker"].update(executor="ray-actor", actor_points=self.points, attempt=attempt,
                                gpus_per_point=self.gpus_per_point, seconds=total,
                                outside_training_s=total - result.get("training_s", 0.0))
        return result


def estimated_seconds(spec: dict[str, Any]) -> float:
    """A point's relative cost, to schedule the longest first: its training iterations × frames per step,
    with the memory model's per-step overhead (:mod:`promptus.memory`)."""
    from ..memory import FRAME_MS, LAUNCH_MS

    i = spec["inputs"]
    if i["codec"] != "promptus":
        return 0.0
    frames, interval = i["frame_count"], i["interval"]
    segments = -(-(frames - 1) // interval)
    ms = i["iters_first"] * (LAUNCH_MS + FRAME_MS) + segments * i["iters"] * (LAUNCH_MS + interval * FRAME_MS)
    return ms / 1000


class RayExecutor:
    """Runs promptus points on long-lived Ray actors and baseline points (ffmpeg, CPU) as Ray tasks.

    One actor per ``gpus_per_point`` GPUs of the cluster (one per CPU, at most one per
    point, on a cluster without GPUs). Points wait in a queue and go to the next idle
    actor longest first (:func:`estimated_seconds`). When an actor dies (killed, lost
    node, crashed process) or a point fails with anything but a
    :class:`~promptus.errors.PromptusError`, the actor is replaced and the point is
    tried once more on another actor; it continues from its checkpoint.

    ``address`` None starts (or joins) a local Ray instance. With a remote
    cluster, every node must see the sweep's --out folder and the clips at the
    same paths (a shared file system) and have promptus installed (docs/many-gpus.md).
    """

    name = "ray"

    def __init__(self, address: str | None = None, *, gpus_per_point: int = 1, max_actors: int | None = None):
        try:
            import ray
        except ImportError as e:
            raise PromptusError(RAY_MISSING) from e
        if gpus_per_point < 1:
            raise PromptusError(f"--gpus-per-point {gpus_per_point} must be ≥ 1")
        self.ray = ray
        self._owned = False
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
            self._owned = True
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        self.gpu = gpus >= 1
        if self.gpu and gpus < gpus_per_point:
            raise PromptusError(f"--gpus-per-point {gpus_per_point}: the Ray cluster has {gpus} GPU(s)")
        self.gpus_per_point = gpus_per_point if self.gpu else 1
        slots = gpus // self.gpus_per_point if self.gpu else max(1, int(resources.get("CPU", 1)))
        self.max_actors = min(slots, max_actors) if max_actors else slots
        self._actor_cls = ray.remote(num_gpus=self.gpus_per_point if self.gpu else 0, num_cpus=1,
                                     max_restarts=0)(PointActor)
        self._baseline = ray.remote(num_gpus=0, num_cpus=1)(run_point)
        self._idle: list[Any] = []
        self._actors: list[Any] = []
        self._queue: list[tuple[dict[str, Any], int]] = []  # (spec, attempt)
        self._running: dict[Any, tuple[dict[str, Any], int, Any]] = {}  # ref -> (spec, attempt, actor or None)
        log.info("ray: %s; up to %d actor(s) with %s each", resources, self.max_actors,
                 f"{self.gpus_per_point} GPU(s)" if self.gpu else "1 CPU (no GPU in the cluster)")

    def submit(self, spec: dict[str, Any], *, first: bool = False) -> None:
        if spec["inputs"]["codec"] != "promptus":
            self._running[self._baseline.remote(spec)] = (spec, 1, None)
            return
        self._queue.append((spec, 1))

    def __bool__(self) -> bool:
        return bool(self._queue or self._running)

    def _new_actor(self):
        actor = self._actor_cls.remote(self.gpus_per_point)
        self._actors.append(actor)
        return actor

    def _dispatch(self) -> None:
        # longest first: the queue's order among equals is the submission order
        self._queue.sort(key=lambda item: -estimated_seconds(item[0]))
        while self._queue:
            if self._idle:
                actor = self._idle.pop()
            elif len(self._actors) < self.max_actors:
                actor = self._new_actor()
            else:
                return
            spec, attempt = self._queue.pop(0)
            self._running[actor.run.remote(spec, attempt)] = (spec, attempt, actor)

    def next_result(self) -> tuple[dict[str, Any], dict[str, Any] | BaseException]:
        ray = self.ray
        while True:
            self._dispatch()
            done, _ = ray.wait(list(self._running), num_returns=1)
            spec, attempt, actor = self._running.pop(done[0])
            try:
                result = ray.get(done[0])
            except Exception as e:  # a task's error arrives wrapped; keep the original where Ray gives it
                cause = getattr(e, "cause", None) or e
                actor_died = isinstance(e, (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError))
                if actor is not None and (actor_died or not isinstance(cause, PromptusError)):
                    self._retire(actor)
                    if attempt < POINT_ATTEMPTS:
                        log.warning("point %s/%s: %s (%s); trying it once more on another actor",
                                    spec["inputs"]["clip"], spec["point"],
                                    "its actor died" if actor_died else "it failed on its actor", cause)
                        self._queue.insert(0, (spec, attempt + 1))
                        continue
                elif actor is not None:
                    self._idle.append(actor)
                return spec, cause
            if actor is not None:
                self._idle.append(actor)
            if not self._queue:  # no promptus point left to start: idle actors give their GPUs/CPUs back
                for idle in list(self._idle):
                    self._retire(idle)
            return spec, result

    def _retire(self, actor) -> None:
        with contextlib.suppress(Exception):
            self.ray.kill(actor)
        self._actors = [a for a in self._actors if a is not actor]
        self._idle = [a for a in self._idle if a is not actor]

    def close(self) -> None:
        for ref in self._running:
            with contextlib.suppress(Exception):
                self.ray.cancel(ref)
        for actor in self._actors:
            with contextlib.suppress(Exception):
                self.ray.kill(actor)
        self._actors, self._idle, self._running, self._queue = [], [], {}, []
        if self._owned:
            self.ray.shutdown()
