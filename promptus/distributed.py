"""One clip on several devices: each segment's frames spread over processes, one per device.

The frames of a segment do not interact inside the networks, so the gradient of the
segment's loss is the sum of its frames' gradients: the memory plans' micro-batches
(:mod:`promptus.memory`) already sum them group by group in one process. Here the
groups run in different processes, one per device: rank ``r`` of ``N`` runs the frames
``[r·m, (r+1)·m)`` with ``m = ⌈n/N⌉`` (:func:`shard_bounds`), and before every
optimizer step the processes sum, with one ``torch.distributed`` all-reduce (NCCL on
GPUs, gloo on CPUs), their gradients of the prompt embedding (each process holds
zeros in the other processes' rows), the frames' losses and their MSEs. Every
process then backpropagates the same summed gradient through its own copy of the
factors U and V and takes the same Adam step: the copies never differ, and no
parameters are sent. Each sum adds one value to zeros, so it is exact: the result
is bit for bit that of one process whose memory plan splits the frames the same way.

This process is rank 0: it owns the clip, the closed loop, the checkpoint, the log,
the progress bars, the callback and ``should_stop``, and trains keyframe 0 (one frame:
the serial part) alone. The other ranks are worker processes
(:class:`DevicePool`, started with ``torch.multiprocessing``'s spawn and a TCP
rendezvous on a free localhost port); each loads the models on its device and runs
the same trainer for its frames of every segment it is sent. A worker that fails
sends its error before it exits; this process turns that, a worker that dies, or a
collective that waits longer than :data:`promptus.config.DISTRIBUTED_TIMEOUT_S`
into a :class:`~promptus.errors.PromptusError` (never a hang), and an abort or an
error ends every worker.
"""

from __future__ import annotations

import datetime
import logging
import os
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .config import DISTRIBUTED_HOST, DISTRIBUTED_TIMEOUT_S
from .errors import PromptusError

log = logging.getLogger(__name__)

DEVICES_HELP = ("a comma-separated list such as cuda:0,cuda:1 (one process per device; cpu,cpu runs two CPU "
                "processes with gloo), or 'all' (every CUDA device)")


def parse_devices(spec: str | Sequence[str | torch.device]) -> list[torch.device]:
    """The devices of ``--devices``: a list, a comma-separated string, or ``"all"`` (every CUDA device).

    All must be of one type (their precision differs); a CUDA device may appear once
    (NCCL runs one process per GPU); ``cpu`` may repeat (gloo, for tests).
    """
    if isinstance(spec, str):
        if spec.strip().lower() == "all":
            if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
                raise PromptusError("--devices all: this machine has no CUDA device; name the devices "
                                    "(cpu,cpu runs two CPU processes)")
            return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        items: list[Any] = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        items = list(spec)
    if not items:
        raise PromptusError(f"--devices: no device given; expected {DEVICES_HELP}")
    devices = []
    for d in items:
        try:
            dev = torch.device(d)
        except (RuntimeError, TypeError) as e:
            raise PromptusError(f"--devices: {d!r} is not a device ({e}); expected {DEVICES_HELP}") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise PromptusError(f"--devices: {d} asked for, but CUDA is not available on this machine")
            dev = torch.device("cuda", dev.index if dev.index is not None else 0)
            if dev.index >= torch.cuda.device_count():
                raise PromptusError(f"--devices: {d} does not exist; this machine has "
                                    f"{torch.cuda.device_count()} CUDA device(s)")
        elif dev.type != "cpu":
            raise PromptusError(f"--devices: {d}: only cpu and cuda devices can share an encode")
        devices.append(dev)
    if len({d.type for d in devices}) > 1:
        raise PromptusError("--devices: mix of CPU and CUDA devices; they train in different precisions, so "
                            "the processes would disagree: use devices of one type")
    cuda = [d for d in devices if d.type == "cuda"]
    if len(set(cuda)) != len(cuda):
        raise PromptusError("--devices: a CUDA device is named twice; NCCL runs one process per GPU")
    return devices


def shard_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """Frames ``[a, b)`` of an ``n``-frame segment that rank ``rank`` of ``world`` runs: groups of ⌈n/world⌉,
    as a memory plan with that micro-batch size splits them (the last ranks may get fewer, or none)."""
    m = -(-n // world)
    a = min(n, rank * m)
    return a, min(n, a + m)


def runs_distributed(n: int, world: int) -> bool:
    """Whether an ``n``-frame step is spread over processes (one frame runs on rank 0 alone)."""
    return world > 1 and n > 1


@dataclass(frozen=True)
class ModelSource:
    """How a worker process loads the models on its device (as :func:`promptus.models.load_models`).

    Give one to :class:`promptus.encoder.Encoder` (``worker_models=``) so that every
    worker reads the weights itself instead of receiving a copy of this process's.
    """

    spec: str = "auto"
    taesd: str | None = None
    checkpoints: str = "checkpoints"
    vae: bool = False

    def load(self, device: torch.device):
        from .backends import default_dtype
        from .models import load_models

        return load_models(self.spec, device=device, dtype=default_dtype(device), taesd=self.taesd,
                           vae=self.vae, checkpoints_dir=self.checkpoints)


class FrameShare:
    """This process's part of every distributed training step (rank, world size) and the sum over processes."""

    def __init__(self, rank: int, world: int, *, gather_frames: bool = False):
        self.rank, self.world, self.gather_frames = rank, world, gather_frames

    def bounds(self, n: int) -> tuple[int, int]:
        return shard_bounds(n, self.world, self.rank)

    def sum_over_processes(self, leaf: torch.Tensor, n: int, bounds: tuple[int, int], losses: list[torch.Tensor],
                           mses: list[torch.Tensor], images: list[torch.Tensor], *, like):
        """The embedding gradient, per-frame losses and MSEs (and frames, when gathered) of all ``n`` frames:
        this process's rows summed with every other process's in one all-reduce. Rows a process did not
        run are zeros there, so every sum is exact."""
        import torch.distributed as dist

        targets, device = like
        a, b = bounds
        grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        loss_dtype = losses[0].dtype if losses else torch.float32
        full_loss = torch.zeros(n, device=device, dtype=torch.float32)
        full_mse = torch.zeros(n, device=device, dtype=torch.float32)
        if losses:
            full_loss[a:b] = torch.cat(losses).float()
            full_mse[a:b] = torch.cat(mses).float()
        parts = [grad.reshape(-1).float(), full_loss, full_mse]
        frame_shape = (n, *targets.shape[1:])
        if self.gather_frames:
            full_image = torch.zeros(frame_shape, device=device, dtype=torch.float32)
            if images:
                full_image[a:b] = torch.cat(images).float()
            parts.append(full_image.reshape(-1))
        buf = torch.cat(parts)
        dist.all_reduce(buf)
        g = grad.numel()
        grad = buf[:g].view_as(grad).to(grad.dtype)
        per_frame = buf[g:g + n].to(loss_dtype)
        mse = buf[g + n:g + 2 * n]
        if self.gather_frames:
            image = buf[g + 2 * n:].view(frame_shape)
        else:  # the preview holds this process's frames only (others are zeros): gathering them costs bandwidth
            image = torch.zeros(frame_shape, device=device)
            if images:
                image[a:b] = torch.cat(images)
        return grad, per_frame, mse, image


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=DISTRIBUTED_TIMEOUT_S)


def _nccl_env() -> None:
    # collectives raise after the timeout instead of leaving the host blocked forever
    os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")


def _describe(e: BaseException) -> str:
    return str(e) if isinstance(e, PromptusError) else f"{type(e).__name__}: {e}"


def _worker_main(rank: int, world: int, device: torch.device, port: int, threads: int, log_level: int,
                 make_trainer: Callable[[torch.device], Any], conn) -> None:
    """A worker process: join the group, build the trainer on ``device``, then train what rank 0 sends."""
    import torch.distributed as dist

    logging.basicConfig(level=log_level, format=f"[{device} rank {rank}] %(levelname)s %(name)s: %(message)s")
    try:
        torch.set_num_threads(threads)  # CPU results depend on the thread count: the same as rank 0's
        if device.type == "cuda":
            torch.cuda.set_device(device)
            _nccl_env()
        store = dist.TCPStore(DISTRIBUTED_HOST, port, world, is_master=False, timeout=_timeout())
        conn.send(("joining",))
        dist.init_process_group(_backend(device), store=store, rank=rank, world_size=world, timeout=_timeout())
        trainer = make_trainer(device)
        conn.send(("ready", trainer.identity.hexdigest))
        share: FrameShare | None = None
        while True:
            try:
                msg = conn.recv()
            except EOFError:  # rank 0 is gone
                return
            if msg[0] == "stop":
                break
            if msg[0] == "setup":
                share = FrameShare(rank, world, gather_frames=msg[1])
                for n in msg[2]:
                    trainer.plan_for(max(1, share.bounds(n)[1] - share.bounds(n)[0]))
                conn.send(("planned",))
            elif msg[0] == "train":
                _, k, z, frames, prev, onestep = msg
                from .schedule import to_model_range

                targets = to_model_range(frames).to(device)
                trainer.train_keyframe(k, z, targets, prev, onestep, share=share)
                conn.send(("trained", k))
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - reported to rank 0, which raises it
        log.debug("worker failed:\n%s", traceback.format_exc())
        try:
            conn.send(("error", _describe(e)))
        except (OSError, EOFError):
            pass
        os._exit(1)  # a process group left half-open must not block the exit


class DevicePool:
    """Worker processes for ``devices[1:]``; this process is rank 0 on ``devices[0]``.

    ``make_trainer(device)`` (picklable: it is sent to the workers) builds a worker's
    trainer: an object with ``identity``, ``plan_for(frames)`` and
    ``train_keyframe(k, z, targets, prev, onestep, share=)``. ``identity`` is rank 0's
    model identity: every worker must have loaded the same weights. Use as a context
    manager; :attr:`share` is rank 0's :class:`FrameShare`.
    """

    def __init__(self, devices: Sequence[torch.device], make_trainer: Callable[[torch.device], Any], identity, *,
                 gather_frames: bool = False):
        self.devices = list(devices)
        self.world = len(self.devices)
        self.make_trainer, self.identity = make_trainer, identity
        self.share = FrameShare(0, self.world, gather_frames=gather_frames)
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        self._group = False

    # ------------------------------------------------------------- lifetime

    def __enter__(self) -> DevicePool:
        try:
            self._start()
        except BaseException:
            self._end_workers()
            self._close_group()
            raise
        return self

    def _start(self) -> None:
        import torch.distributed as dist
        import torch.multiprocessing as mp

        if dist.is_initialized():
            raise PromptusError("encoding on several devices starts its own process group, but this process "
                                "already has one (torch.distributed is initialised); encode on one device here")
        device = self.devices[0]
        if device.type == "cuda":
            _nccl_env()
        store = dist.TCPStore(DISTRIBUTED_HOST, 0, self.world, is_master=True, timeout=_timeout(),
                              wait_for_workers=False)
        ctx = mp.get_context("spawn")
        level = logging.getLogger("promptus").getEffectiveLevel()
        for rank, dev in enumerate(self.devices[1:], start=1):
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=_worker_main, daemon=True, name=f"promptus-{dev}-rank{rank}",
                            args=(rank, self.world, dev, store.port, torch.get_num_threads(), level,
                                  self.make_trainer, theirs))
            p.start()
            theirs.close()
            self.procs.append(p)
            self.conns.append(mine)
        log.info("encoding on %d devices (%s): rendezvous on %s:%d", self.world,
                 ", ".join(map(str, self.devices)), DISTRIBUTED_HOST, store.port)
        for i in range(len(self.procs)):
            self._receive(i, "joining", "while starting")
        dist.init_process_group(_backend(device), store=store, rank=0, world_size=self.world, timeout=_timeout())
        self._group = True
        for i in range(len(self.procs)):
            msg = self._receive(i, "ready", "while loading the models")
            if msg[1] != self.identity.hexdigest:
                raise PromptusError(f"the worker on {self.devices[i + 1]} loaded other model weights (digest "
                                    f"{msg[1][:12]}…, this process {self.identity.hexdigest[:12]}…); every device "
                                    "must train the same model")

    def prepare(self, lengths: Sequence[int]) -> None:
        """Tell the workers the segment lengths: each chooses its memory plans now (errors surface here)."""
        for conn in self.conns:
            conn.send(("setup", self.share.gather_frames, list(lengths)))
        for i in range(len(self.conns)):
            self._receive(i, "planned", "while choosing its memory plans")

    def train(self, k: int, z: torch.Tensor, frames: torch.Tensor, prev, onestep) -> None:
        """Start keyframe ``k`` on every worker (rank 0 then trains it too, meeting them in each all-reduce).
        ``frames``: the segment's uint8 frames."""
        self._check_workers()
        payload = ("train", k, z.detach().cpu(), frames.clone(), prev, onestep)
        for i, conn in enumerate(self.conns):
            try:
                conn.send(payload)
            except (OSError, EOFError):
                raise self._failure(i, "when sent keyframe %d" % k) from None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            for conn in self.conns:
                try:
                    conn.send(("stop",))
                except (OSError, EOFError):
                    pass
            for p in self.procs:
                p.join(timeout=60)
        failure = None
        if isinstance(exc, RuntimeError) and not isinstance(exc, PromptusError):
            failure = self._collective_failure(exc)  # a collective failed: say which worker and why
        self._end_workers()
        self._close_group()
        if failure is not None:
            raise failure from exc
        return False

    def _close_group(self) -> None:
        import torch.distributed as dist

        if self._group and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except (RuntimeError, ValueError) as e:  # a group broken by a dead peer may refuse a clean end
                log.warning("could not close the process group cleanly: %s", e)
        self._group = False

    def _end_workers(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=30)
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []

    # ------------------------------------------------------------- messages

    def _receive(self, i: int, want: str, when: str) -> tuple:
        conn, p = self.conns[i], self.procs[i]
        while True:
            if conn.poll(0.2):
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    raise self._failure(i, when) from None
                if msg[0] == "error":
                    raise PromptusError(f"the worker on {self.devices[i + 1]} failed {when}: {msg[1]}")
                if msg[0] == want:
                    return msg
            elif not p.is_alive():
                raise self._failure(i, when)

    def _check_workers(self) -> None:
        for i, (conn, p) in enumerate(zip(self.conns, self.procs)):
            while conn.poll():
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    raise self._failure(i, "during training") from None
                if msg[0] == "error":
                    raise PromptusError(f"the worker on {self.devices[i + 1]} failed: {msg[1]}")
            if not p.is_alive():
                raise self._failure(i, "during training")

    def _failure(self, i: int, when: str) -> PromptusError:
        conn, p = self.conns[i], self.procs[i]
        try:
            while conn.poll(1.0):
                msg = conn.recv()
                if msg[0] == "error":
                    return PromptusError(f"the worker on {self.devices[i + 1]} failed {when}: {msg[1]}")
        except (EOFError, OSError):
            pass
        p.join(timeout=5)
        return PromptusError(f"the worker on {self.devices[i + 1]} stopped {when} (exit code {p.exitcode}) "
                             "without saying why; see its messages above")

    def _collective_failure(self, exc: BaseException) -> PromptusError | None:
        """The error to raise for ``exc`` on rank 0: a worker's own error when one failed, a lost peer when
        a collective failed, or None (rank 0's own error, raised as it is)."""
        import torch.distributed as dist

        for i, p in enumerate(self.procs):
            p.join(timeout=2)
            if not p.is_alive():
                return PromptusError(f"{self._failure(i, 'during training')}; the finished keyframes are kept in "
                                     "the checkpoint: resume to continue")
        if isinstance(exc, getattr(dist, "DistError", ())) or "gloo" in str(exc).lower() or "nccl" in str(exc).lower():
            return PromptusError(f"the processes of the encode lost each other ({_describe(exc)}); the finished "
                                 "keyframes are kept in the checkpoint: resume to continue")
        return None
