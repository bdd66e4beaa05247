"""The inversion trainer: video → keyframe prompts → .promptus bitstream (docs/design.md, "The method").

Keyframe 0 is fitted to frame 0 alone. Keyframe k > 0 is fitted so that the T
interpolated frames of segment k−1 → k, generated as **one batch** sharing one z,
match the real frames; keyframe k−1 is frozen at its transmitted (dequantized)
value. After each keyframe the segment is regenerated from the transmitted prompts
by the decoder's own code (:class:`promptus.decoder.ClipState`) in the decoder's
precision, and the last latent of that regeneration is the next segment's z_prev
(closed loop): the decoder reproduces exactly what the encoder measured.

Training runs in the decoder's precision (fp16 weights on CUDA, with loss scaling;
fp32 on the CPU), with no gradients for model weights. Work is checkpointed
atomically after every keyframe; ``resume=True`` continues an interrupted run and
writes a byte-identical file.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.checkpoint
from tqdm import tqdm

from .backends.base import Backend
from .bitstream import Bitstream, Header, InitLatent, Keyframe, write
from .checkpoint import (CHECKPOINT_VERSION, KeyframeResult, ResumeCheckpoint, checkpoint_paths,  # noqa: F401
                         frames_digest, read_checkpoint)
from .checkpoint import mean_psnr as _mean_psnr
from .config import CodecConfig, TrainConfig
from .decoder import ClipState
from .encoding_schedules import Schedule
from .distributed import DevicePool, FrameShare, ModelSource, parse_devices, runs_distributed
from .errors import EncodeAborted, PromptusError, VideoError
from .files import OutputLock, check_writable
from .memory import MemoryPlan, PlanChoice, choose_plan, estimate, resolve_budget
from .metrics.frames import clip_psnr, psnr_from_mse
from .prompts import QuantizedTensor, RunningRange, embedding, fake_quantize, interpolate_factors, kbps, quantize
from .schedule import OneStep, to_model_range

log = logging.getLogger(__name__)

@dataclass
class EncodeResult:
    path: Path
    bytes: int
    frame_count: int
    keyframes: list[KeyframeResult] = field(default_factory=list)
    reconstruction: torch.Tensor | None = None  # uint8 N×H×W×3 from the closed loop (CPU)
    fps: float = CodecConfig.fps

    @property
    def duration_s(self) -> float:
        return self.frame_count / self.fps

    @property
    def kbps(self) -> float:
        """Every byte of the file over the clip's duration (:func:`promptus.prompts.kbps`)."""
        return kbps(self.bytes, self.duration_s)

    @property
    def mean_psnr(self) -> float:
        """The segments' closed-loop PSNRs averaged with their frame counts as weights (finite ones only)."""
        return _mean_psnr(self.keyframes)


class TrainingStep:
    """Forward and backward of one training iteration: prompt embeddings → frames → per-frame loss → gradients.

    ``step(plan, z, timestep, ctx, targets, target_feats, weights, scale)`` generates
    the frames of ``ctx`` (n×77×1024, requiring grad) from ``z``, scores them against
    ``targets`` and backpropagates ``scale(Σ weights·loss / Σ weights)`` into ``ctx``'s
    graph (so into the factors), following the :class:`~promptus.memory.MemoryPlan`:
    every plan leaves the same gradient, up to floating-point rounding. Returns the
    per-frame losses, MSEs and generated frames (detached). ``compile`` is a
    ``torch.compile`` mode (or "off") for the generate-and-score forward; autograd
    compiles its backward too.
    """

    def __init__(self, unet, decoder, loss_fn, onestep: OneStep, dtype: torch.dtype, autocast, *,
                 compile: str = "off", compile_backend: str = "inductor"):
        self.unet, self.decoder, self.loss_fn, self.onestep = unet, decoder, loss_fn, onestep
        self.dtype, self.autocast = dtype, autocast
        self.compile = compile
        self.forward = self._forward
        if compile != "off":
            # static shapes: a segment's frame count is fixed, a shorter last segment compiles once more
            self.forward = torch.compile(self._forward, mode=None if compile == "default" else compile,
                                         backend=compile_backend, dynamic=False)

    def target_features(self, targets: torch.Tensor) -> list[torch.Tensor] | None:
        """VGG-19 features of the real frames (None when the perceptual term is off)."""
        with torch.no_grad(), self.autocast():
            return self.loss_fn.target_features(targets)

    def _forward(self, z, timestep, ctx, targets, target_feats, checkpoint: tuple[str, ...]):
        """Frames (float32, [-1, 1]) and per-frame losses, recomputing the parts in ``checkpoint`` on backward."""
        def generate(z, timestep, ctx):
            return self.unet(z, timestep, encoder_hidden_states=ctx.to(self.dtype), return_dict=False)[0]

        def decode(x0):
            return self.decoder(x0.to(self.dtype)).float()

        eps = _maybe_checkpoint("unet" in checkpoint, generate, z, timestep, ctx)
        x0 = self.onestep.x0(z.float(), eps.float())
        image = _maybe_checkpoint("decoder" in checkpoint, decode, x0)
        with self.autocast():
            # the loss checkpoints VGG stage by stage itself: as one piece it would come back whole
            # during its backward, while the UNet's and decoder's activations are still held
            per_frame = self.loss_fn(image, targets, ctx, target_feats=target_feats, checkpoint="loss" in checkpoint)
        return image, per_frame

    def __call__(self, plan: MemoryPlan, z, timestep, ctx, targets, target_feats, weights, scale,
                 share: FrameShare | None = None):
        """One iteration. With ``share`` (several processes, :mod:`promptus.distributed`) this process
        runs only the frames ``share.bounds(n)`` (``plan`` is the plan for that many frames and
        ``target_feats`` holds their features), and the processes sum their embedding gradients,
        losses and MSEs before the gradient goes back through the factors: the micro-batch path
        below with the groups spread over processes, so the same bits as one process whose plan
        splits the frames the same way."""
        n = z.shape[0]
        if self.compile == "reduce-overhead" and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
            torch.compiler.cudagraph_mark_step_begin()  # the previous iteration's graph outputs are dead
        a, b = share.bounds(n) if share is not None else (0, n)
        mb = plan.micro(max(b - a, 1))
        if share is None and mb >= n:  # one pass: the gradient flows straight from the loss into the factors
            if target_feats is None:
                target_feats = self.target_features(targets)
            image, per_frame = self.forward(z, timestep, ctx, targets, target_feats, plan.checkpoint)
            scale((per_frame * weights).sum() / weights.sum()).backward()
            with torch.no_grad():
                mse = (image.clamp(-1, 1) - targets).pow(2).mean(dim=(1, 2, 3))
            return per_frame.detach(), mse, self._keep(image.detach())
        # Micro-batches: backpropagate each group into a detached copy of the embedding, whose gradient
        # rows are summed there; then once through the factors. The loss is normalised by the whole
        # batch's weights, so the groups' losses add up to the full batch's.
        leaf = ctx.detach().requires_grad_()
        total = weights.sum()
        losses, mses, images = [], [], []
        for i in range(a, b, mb):
            sl = slice(i, min(i + mb, b))
            feats = ([f[i - a:sl.stop - a] for f in target_feats] if target_feats is not None
                     else self.target_features(targets[sl]))
            image, per_frame = self.forward(z[sl], timestep[sl], leaf[sl], targets[sl], feats, plan.checkpoint)
            scale((per_frame * weights[sl]).sum() / total).backward()
            with torch.no_grad():
                mses.append((image.clamp(-1, 1) - targets[sl]).pow(2).mean(dim=(1, 2, 3)))
            losses.append(per_frame.detach().clone())  # a CUDA graph's output is overwritten by its next replay
            images.append(image.detach().clone())
            del image, per_frame, feats
        if share is None:
            ctx.backward(leaf.grad)
            return torch.cat(losses), torch.cat(mses), torch.cat(images)
        grad, per_frame, mse, image = share.sum_over_processes(leaf, n, (a, b), losses, mses, images,
                                                               like=(targets, z.device))
        ctx.backward(grad)
        return per_frame, mse, image

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        # outputs of a CUDA-graph replay are overwritten by the next one: copy what outlives the step
        return t.clone() if self.compile == "reduce-overhead" else t


def _maybe_checkpoint(enabled: bool, fn, *args):
    if not enabled:
        return fn(*args)
    # Non-reentrant: the frozen networks' inputs need not require grad; nothing random to replay.
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)


#: Compiled training steps of this process, by (models, loss, timestep, precision, device, mode): a step
#: holds strong references to its networks, so an id in a key cannot be reused while the entry lives.
_COMPILED_STEPS: dict[tuple, TrainingStep] = {}
#: Compiled steps kept at once (each holds its compiled graphs and references its models).
MAX_COMPILED_STEPS = 4


class Encoder:
    """Turns a clip into a .promptus bitstream.

    ``models`` is a :class:`promptus.models.Models`; it is moved to ``device`` in the
    decoder's precision. ``backend`` is the decoder backend the closed loop
    regenerates segments with (as :class:`promptus.decoder.Decoder` takes one);
    decoding with the same kind of backend reproduces the encoder's reconstruction
    bit for bit. Without one, the eager backend on ``device`` is used; with one,
    ``device`` defaults to the backend's. ``callback(metrics: dict)`` is called after
    every training iteration with keyframe, iteration, loss, psnr, lr (psnr: of
    the iteration's unquantized frames, range [-1, 1] so peak 2) and frames (those
    generated frames, n×3×H×W in [-1, 1], detached: a preview). ``should_stop()`` is
    polled after every iteration; when it returns true the encode raises
    :class:`promptus.errors.EncodeAborted` and the finished keyframes stay in the
    checkpoint for ``resume=True``.

    Memory: ``train.max_memory`` (bytes, "auto" or "none") bounds the training step's
    peak; for each segment length the fastest :class:`~promptus.memory.MemoryPlan`
    that fits is chosen and logged ("auto": the GPU's free memory, no limit on the
    CPU). ``plan`` forces one plan instead. Every plan gives the same gradients up to
    floating-point rounding; without a limit the default plan runs, as before.

    Several devices: ``devices=["cuda:0", "cuda:1"]`` (or ``"all"``; ``["cpu", "cpu"]``
    with gloo) spreads each segment's frames over one process per device, which sum
    their gradients before every step (:mod:`promptus.distributed`): the same bits as
    one process whose plan splits the frames the same way. This process trains on the
    first device; ``models`` must be there (or are moved there). Each worker loads
    ``worker_models`` (a :class:`~promptus.distributed.ModelSource`) on its device, or
    else receives a copy of ``models``; ``train.max_memory`` applies to each device.

    ``engine_dir``: with ``train.compile`` on, the compiled training step is loaded from and
    stored in ``<engine_dir>/trainer/`` (:mod:`promptus.trainer_cache`), so that a new
    process skips the compilation of every step shape it has seen before.
    """

    def __init__(self, codec: CodecConfig, train: TrainConfig, models, *, device: str | torch.device | None = None,
                 vgg: str | torch.nn.Module | None = None, callback: Callable[[dict], None] | None = None, progress: bool = True,
                 backend: Backend | None = None, should_stop: Callable[[], bool] | None = None,
                 plan: MemoryPlan | None = None, devices: str | list | None = None,
                 worker_models: ModelSource | None = None, engine_dir: str | os.PathLike | None = None):
        from .backends import BASELINE, backend_for_clip, default_dtype, resolve_device

        self.codec, self.train, self.models = codec, train, models
        self.devices = parse_devices(devices) if devices is not None else None
        if self.devices is not None:
            if device is not None and resolve_device(device) != self.devices[0]:
                raise PromptusError(f"device={device} but devices starts with {self.devices[0]}: this process "
                                    "trains on the first of the devices; give one of the two")
            device = self.devices[0]
        if device is None and backend is not None:
            device = backend.device
        self.device = resolve_device(device)
        self._vgg, self.worker_models, self.engine_dir = vgg, worker_models, engine_dir
        self.dtype = default_dtype(self.device)
        self.callback = callback
        self.should_stop = should_stop
        self.progress = progress
        if backend is None:
            backend = backend_for_clip(codec, models, name=BASELINE, device=self.device, dtype=self.dtype)
        elif not isinstance(backend, Backend):
            raise PromptusError(f"backend must be a promptus Backend (promptus.backends.make_backend), "
                                f"got {type(backend).__name__}")
        elif backend.device.type != self.device.type or backend.dtype != self.dtype:
            raise PromptusError(f"the closed-loop backend runs on {backend.device} in {backend.dtype} but the encoder "
                                f"trains on {self.device} in {self.dtype}; build the backend with make_backend(name, "
                                "models, device) for the encoder's device and its default precision")
        self.backend = backend
        if models.vae is not None:
            torch.nn.Module.to(models.vae, self.device, self.dtype)
        torch.nn.Module.to(models.taesd, self.device, self.dtype)
        models.geometry().check(codec)
        self.loss_fn = self._make_loss(vgg)
        self.identity = models.identity()
        # fp16 gradients through a UNet underflow without loss scaling.
        self.use_scaler = self.device.type == "cuda" and self.dtype == torch.float16
        self.forced_plan = plan
        self._trainer_store = None  # the compiled trainer on disk (built with the first compiled step)
        self.schedule = Schedule.of(train)
        self._plans: dict[int, PlanChoice] = {}
        self._step: TrainingStep | None = None

    # ------------------------------------------------------------ memory

    def resident_bytes(self) -> int:
        """Bytes held before a training step: on CUDA all this process has allocated, else the weights."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        modules = [self.models.unet, self.models.taesd, self.models.vae]
        if self.loss_fn.perceptual is not None:
            modules.append(self.loss_fn.perceptual)
        return sum(t.numel() * t.element_size() for m in modules if m is not None
                   for t in (*m.parameters(), *m.buffers()))

    def plan_for(self, frames: int) -> PlanChoice:
        """The memory plan for segments of ``frames`` frames (chosen once per length, logged)."""
        if frames in self._plans:
            return self._plans[frames]
        c = self.codec
        budget, source = resolve_budget(self.train.max_memory, self.device)
        resident = self.resident_bytes()
        perceptual = self.loss_fn.uses_perceptual
        if self.forced_plan is not None:
            choice = PlanChoice(estimate(self.forced_plan.for_frames(frames), frames, c.width * c.height, resident,
                                         perceptual=perceptual), budget, "given by the caller")
        else:
            choice = choose_plan(frames, c.width * c.height, budget, resident, perceptual=perceptual, source=source)
        level = logging.DEBUG if choice.plan.is_default and budget is None else logging.INFO
        log.log(level, "memory plan for %d-frame steps: %s (%s)", frames, choice.estimate.describe(), choice.reason)
        self._plans[frames] = choice
        return choice

    def step_for(self, onestep: OneStep) -> TrainingStep:
        """The training step (built once, so that a compiled step is compiled once per shape).

        A compiled step is also kept for the life of the process (:data:`_COMPILED_STEPS`): a later
        Encoder of the same models, loss and precision (the next point of a sweep on the same worker)
        reuses it and its compiled graphs instead of compiling again."""
        if self._step is not None and self._step.onestep == onestep:
            return self._step
        if self.train.compile == "off":
            self._step = TrainingStep(self.models.unet, self.models.taesd.decoder, self.loss_fn, onestep, self.dtype,
                                      self._loss_autocast, compile="off")
            return self._step
        t = self.train
        net = getattr(self.loss_fn.perceptual, "vgg", None)  # the VGG module, shared by a sweep's points
        key = (id(self.models.unet), id(self.models.taesd.decoder), id(net) if net is not None else None,
               (t.mse_weight, t.perceptual_weight, t.reg_weight), onestep, self.dtype, str(self.device), t.compile)
        step = _COMPILED_STEPS.pop(key, None)
        if step is None:
            step = TrainingStep(self.models.unet, self.models.taesd.decoder, self.loss_fn, onestep, self.dtype,
                                self._loss_autocast, compile=t.compile)
        else:
            log.info("reusing this process's compiled training step (no new compilation for known shapes)")
        _COMPILED_STEPS[key] = step  # most recently used last
        while len(_COMPILED_STEPS) > MAX_COMPILED_STEPS:
            _COMPILED_STEPS.pop(next(iter(_COMPILED_STEPS)))
        self._step = step
        return step

    def _compiled_store(self, onestep: OneStep):
        """The compiled trainer on disk (:mod:`promptus.trainer_cache`), when compiling with an engine folder."""
        from .trainer_cache import CompiledTrainerStore, mechanism_available

        if self.train.compile == "off" or self.engine_dir is None or not mechanism_available():
            return None
        if self._trainer_store is None or self._trainer_store.timestep != onestep.timestep:
            t = self.train
            modules = [self.models.unet, self.models.taesd.decoder]
            vgg = getattr(self.loss_fn.perceptual, "vgg", None)
            if vgg is not None:
                modules.append(vgg)
            options = (f"{t.compile},perceptual={'on' if vgg is not None else 'off'},"
                       f"weights={t.mse_weight:g}/{t.perceptual_weight:g}/{t.reg_weight:g}")
            self._trainer_store = CompiledTrainerStore(self.engine_dir, modules, size=self.codec.width,
                                                       dtype=self.dtype, timestep=onestep.timestep,
                                                       device=self.device, options=options)
        return self._trainer_store

    def _make_loss(self, vgg):
        from .losses import InversionLoss, PerceptualLoss, load_vgg19

        t = self.train
        perceptual = None
        if t.perceptual:
            net = vgg if isinstance(vgg, torch.nn.Module) else load_vgg19(vgg)
            perceptual = PerceptualLoss(net.to(self.device))
        return InversionLoss(perceptual, mse_weight=t.mse_weight, perceptual_weight=t.perceptual_weight,
                             reg_weight=t.reg_weight)

    def _loss_autocast(self):
        # VGG in bf16 on the GPU: its deep activations overflow fp16; the MSEs stay float32.
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    # ------------------------------------------------------------ inputs

    def load_frames(self, source, max_frames: int | None = None) -> torch.Tensor:
        """uint8 N×H×W×3 frames from a path (folder or video) or a tensor/array."""
        from .video import read_frames

        c = self.codec
        if isinstance(source, (str, os.PathLike)):
            frames = read_frames(source, c.width, c.height, max_frames)
        else:
            frames = torch.as_tensor(np.asarray(source) if not isinstance(source, torch.Tensor) else source)
            if max_frames is not None:
                frames = frames[:max_frames]
        if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
            raise VideoError(f"frames must be uint8 N×H×W×3 (RGB), got {frames.dtype} {tuple(frames.shape)}")
        if tuple(frames.shape[1:3]) != (c.height, c.width):
            raise VideoError(f"frames are {frames.shape[2]}×{frames.shape[1]} but the codec is set to "
                             f"{c.width}×{c.height}; pass a path to have them cropped and resized")
        if frames.shape[0] <= c.interval:
            raise VideoError(
                f"the clip has {frames.shape[0]} frames but interval {c.interval} needs at least {c.interval + 1} "
                "(keyframes 0 and T); use a longer clip or a smaller --interval"
            )
        return frames.contiguous()

    def init_latent(self, frame0: torch.Tensor) -> InitLatent:
        """The transmitted init latent of frame 0 (after its storage precision)."""
        which = self.train.init_latent
        if which == "vae" and self.models.vae is None:
            raise PromptusError("--init-latent vae needs the SD VAE encoder, which these weights lack; "
                                "add it (a full SD-Turbo checkpoint has it) or use --init-latent taesd")
        x = to_model_range(frame0[None]).to(self.device, self.dtype)
        with torch.no_grad():
            lat = self.models.encode_init_latent(x, which=which).float().cpu().numpy()
        return InitLatent.from_array(lat, self.train.init_precision)

    # ----------------------------------------------------------- training

    def _init_factors(self, k: int, prev: Keyframe | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Keyframe k's starting factors on the device, and whether they are a warm start (the schedule's policy)."""
        U, V, warm = self.schedule.initial_factors(self.codec, k, *((prev.U, prev.V) if prev is not None else ()))
        return U.to(self.device).requires_grad_(), V.to(self.device).requires_grad_(), warm

    def train_keyframe(self, k: int, z: torch.Tensor, targets: torch.Tensor, prev: Keyframe | None,
                       onestep: OneStep, bar: tqdm | None = None, *, share: FrameShare | None = None
                       ) -> tuple[Keyframe, dict]:
        """Fit keyframe ``k``: its factors such that the frames generated from ``z``
        (1×4×h×w, float32) match ``targets`` (n×3×H×W in [-1, 1]).

        With ``prev`` (keyframe k−1, transmitted) the n frames use factors
        interpolated at s/T, s = 1..n; without it, one frame uses the factors as is.
        Returns the quantized best iterate and training statistics. With ``share`` this
        process runs only its frames of the segment and meets the other processes in
        every step (:mod:`promptus.distributed`); all of them compute the same iterates. The schedule
        (``train.schedule``) sets the start and when to stop; the bar shows why it stopped.
        """
        t, c = self.train, self.codec
        first = prev is None
        rule = self.schedule.stop_rule(first)
        iters, stopper, stop = rule.max_iters, rule.stopper(), None
        patience = t.patience_first if first else t.patience
        n = targets.shape[0]
        device, dtype = self.device, self.dtype

        U, V, warm = self._init_factors(k, prev)
        rU, rV = RunningRange(), RunningRange()
        lr = self.schedule.lr(warm)
        opt = torch.optim.Adam([U, V], lr=lr)
        scaler = torch.amp.GradScaler("cuda", enabled=self.use_scaler)
        z_in = z.to(device, dtype).expand(n, -1, -1, -1)
        timestep = torch.full((n,), c.timestep, device=device, dtype=torch.long)
        if prev is not None:
            U0, V0 = prev.U.to(device), prev.V.to(device)
        a, b = share.bounds(n) if share is not None else (0, n)
        plan = self.plan_for(max(b - a, 1)).plan
        step = self.step_for(onestep)
        target_feats = step.target_features(targets[a:b]) if plan.cache_targets and b > a else None
        store = self._compiled_store(onestep)
        shape = (plan.micro(max(b - a, 1)), plan.checkpoint)
        if store is not None:
            store.before(*shape)
        weights = torch.ones(n, device=device)

        best_loss, best_it, best = math.inf, -1, None
        window_best = math.inf  # best loss when the current patience window started
        countdown = patience
        for it in range(iters):
            with torch.no_grad():  # the factors' extremes in one host transfer, not four
                uv = torch.stack([U.min(), U.max(), V.min(), V.max()]).tolist()
            rU.include(uv[0], uv[1])
            rV.include(uv[2], uv[3])
            pU, pV = rU.params(), rV.params()
            Uq, Vq = fake_quantize(U, *pU), fake_quantize(V, *pV)
            if prev is None:
                ctx = embedding(Uq, Vq).unsqueeze(0)
            else:
                u, v = interpolate_factors(U0, V0, Uq, Vq, c.interval)
                ctx = embedding(u[:n], v[:n])
            snapshot = (U.detach().clone(), V.detach().clone())  # the iterate this loss belongs to
            opt.zero_grad(set_to_none=True)
            per_frame, mse, image = step(plan, z_in, timestep, ctx, targets, target_feats, weights, scaler.scale,
                                         share)
            scaler.step(opt)
            scaler.update()
            if it == 0 and store is not None:
                store.after(*shape)
            stats = torch.cat([per_frame, mse]).tolist()  # one host sync per iteration
            frame_losses, frame_mse = stats[:n], stats[n:]
            mean_loss = sum(frame_losses) / n
            if mean_loss < best_loss:
                best_loss, best_it = mean_loss, it
                best = (snapshot[0], pU, snapshot[1], pV)
            stop = stopper.observe(mean_loss)  # the loss history alone decides: every process agrees
            if n > 1:  # the worst frame gets extra weight in the next iteration
                weights.fill_(1.0)
                weights[int(np.argmax(frame_losses))] = t.worst_weight
            countdown -= 1
            if countdown == 0:  # plateau: halve the rate and restart Adam, as the published loop does
                if best_loss >= window_best:
                    lr = max(lr * 0.5, t.lr_floor)
                    opt = torch.optim.Adam([U, V], lr=lr)
                window_best = best_loss
                countdown = patience
            psnr = psnr_from_mse(max(sum(frame_mse) / n, 1e-12), peak=2.0)  # frames in [-1, 1]
            if bar is not None:
                bar.update(1)
                if stop is not None:
                    bar.total = it + 1
                    bar.set_postfix(loss=f"{mean_loss:.4f}", psnr=f"{psnr:.2f}", stop=stop, refresh=False)
                elif it % 10 == 0:
                    bar.set_postfix(loss=f"{mean_loss:.4f}", psnr=f"{psnr:.2f}", lr=f"{lr:g}", refresh=False)
            if self.callback is not None:
                self.callback({"keyframe": k, "iteration": it, "loss": mean_loss, "psnr": psnr, "lr": lr,
                               "frames": image})
            if self.should_stop is not None and self.should_stop():
                raise EncodeAborted(f"encoding stopped on request during keyframe {k}; the {k} finished keyframes "
                                    "are kept in the checkpoint: resume to continue", keyframes_done=k)
            if stop is not None:
                break

        bU, bpU, bV, bpV = best
        kf = Keyframe(
            index=k * c.interval,
            U_q=QuantizedTensor(quantize(bU.cpu(), *bpU).numpy(), *bpU),
            V_q=QuantizedTensor(quantize(bV.cpu(), *bpV).numpy(), *bpV),
        )
        return kf, {"iterations": it + 1, "best_iteration": best_it, "best_loss": best_loss, "final_lr": lr,
                    "stop": stop}

    # ------------------------------------------------------------- encode

    def encode(self, source, out_path: str | os.PathLike, *, max_frames: int | None = None,
               resume: bool = False) -> EncodeResult:
        """Encode ``source`` (path, or uint8 N×H×W×3 frames) into ``out_path``.

        A checkpoint (``OUT.ckpt.promptus`` + ``OUT.ckpt.json``) is written
        atomically after each keyframe and removed at the end; ``resume=True``
        continues from it. A per-keyframe JSON log goes to ``OUT.log.jsonl``.

        The output is locked (``OUT.lock``) for the whole run: a second encode to the
        same path is refused with the first one's pid. Writability is probed before
        any training, without touching existing files.
        """
        out = Path(out_path)
        check_writable(out)  # fail before hours of training, not after
        with OutputLock(out):
            return self._encode(source, out, max_frames, resume)

    def _encode(self, source, out: Path, max_frames: int | None, resume: bool) -> EncodeResult:
        frames = self.load_frames(source, max_frames)
        N = frames.shape[0]
        c = self.codec
        K = c.keyframe_count(N)
        header = Header(c, N, self.identity)
        ckpt = ResumeCheckpoint(out, {"version": CHECKPOINT_VERSION, "codec": c.to_dict(),
                                      "train": self.train.result_dict(), "frame_count": N,
                                      "frames": frames_digest(frames), "model": self.identity.hexdigest,
                                      "precision": str(self.dtype), "device": self.device.type}, header)

        keyframes: list[Keyframe] = []
        results: list[KeyframeResult] = []
        init: InitLatent | None = None
        if resume and ckpt.exists():
            init, keyframes, results = ckpt.load(self.train.init_precision)
            log.info("resuming %s after keyframe %d of %d", out, len(keyframes) - 1, K - 1)
        elif resume:
            log.info("no checkpoint for %s: starting from the beginning", out)
        elif ckpt.exists():
            log.warning("an earlier run of %s left a checkpoint; starting over (use --resume to continue it)", out)
        if not keyframes:
            ckpt.clear_log()
        if init is None:
            init = self.init_latent(frames[0])

        lengths = sorted({1} | {min(k * c.interval, N - 1) - (k - 1) * c.interval for k in range(1, K)})
        with self._device_pool() as pool:
            # Memory plans now, before any training: a budget that nothing fits fails here, and the log says
            # which plan each step length gets before the progress bars start.
            share = pool.share if pool is not None else None
            for n in lengths:
                a, b = share.bounds(n) if share is not None and runs_distributed(n, share.world) else (0, n)
                self.plan_for(max(b - a, 1))
            if pool is not None:
                pool.prepare([n for n in lengths if runs_distributed(n, pool.world)])
            recon = self._train_segments(frames, header, init, keyframes, results, ckpt, pool)

        nbytes = write(out, Bitstream(header, init, keyframes))
        ckpt.remove()
        result = EncodeResult(out, nbytes, N, results, recon, c.fps)
        # debug: the commands print their own summary of the file
        log.debug("wrote %s: %d bytes, %.1f kbit/s, mean PSNR %.2f dB", out, nbytes, result.kbps, result.mean_psnr)
        if self.devices is not None and len(self.devices) > 1 and results and results[0].keyframe == 0:
            total = sum(r.seconds for r in results)
            log.info("keyframe 0 (one frame, on %s alone: the serial part) took %.1f s of %.1f s of training "
                     "(%.0f %%)", self.device, results[0].seconds, total, 100 * results[0].seconds / max(total, 1e-9))
        return result

    def _device_pool(self):
        """The worker processes of a multi-device encode (a context manager), or a null context."""
        if self.devices is None or len(self.devices) < 2:
            return contextlib.nullcontext(None)
        setup = {"codec": self.codec, "train": self.train, "plan": self.forced_plan, "engine_dir": self.engine_dir,
                 "vgg": _portable(self._vgg) if self.loss_fn.uses_perceptual else None,
                 "models": self.worker_models if self.worker_models is not None else self.models}
        return DevicePool(self.devices, functools.partial(_worker_trainer, setup), self.identity,
                          gather_frames=self.callback is not None)

    def _train_segments(self, frames: torch.Tensor, header: Header, init: InitLatent, keyframes: list[Keyframe],
                        results: list[KeyframeResult], ckpt: ResumeCheckpoint, pool: DevicePool | None
                        ) -> torch.Tensor:
        """Train every keyframe after those in ``keyframes`` (appending to it and to ``results``), checkpointing
        after each; returns the closed loop's reconstruction of the whole clip."""
        c, N = self.codec, frames.shape[0]
        K = c.keyframe_count(N)
        # The decoder's batches (one formula, MAX_BATCH_PIXELS): the closed loop sees the decoder's frames.
        state = ClipState(self.backend, header, init, max_batch=header.config.segment_batch(header.frame_count))
        recon = torch.empty_like(frames)  # filled segment by segment: never a list plus a concatenation
        for kf in keyframes:  # replay the closed loop up to where the checkpoint stopped
            seg = state.push(kf)
            recon[seg.start:seg.stop] = seg.frames.cpu()

        kbar = tqdm(total=K, initial=len(keyframes), desc="keyframes", unit="kf", disable=not self.progress,
                    position=0)
        try:
            for k in range(len(keyframes), K):
                t0 = time.perf_counter()
                start = 0 if k == 0 else (k - 1) * c.interval + 1
                stop = min(k * c.interval, N - 1)
                targets = to_model_range(frames[start:stop + 1]).to(self.device)
                z = state.z()
                prev = keyframes[-1] if keyframes else None
                share = None
                if pool is not None and runs_distributed(stop + 1 - start, pool.world):
                    pool.train(k, z, frames[start:stop + 1], prev, state.onestep)
                    share = pool.share
                iters = self.train.iters_first if k == 0 else self.train.iters
                with tqdm(total=iters, desc=f"keyframe {k} (frame {k * c.interval})", unit="it", leave=False,
                          disable=not self.progress, position=1) as ibar:
                    kf, stats = self.train_keyframe(k, z, targets, prev, state.onestep, ibar, share=share)
                seg = state.push(kf)  # closed loop: regenerate from what is transmitted
                assert (seg.start, seg.stop - 1) == (start, stop)
                recon[start:stop + 1] = seg.frames.cpu()
                psnr = clip_psnr(frames[start:stop + 1], recon[start:stop + 1])
                keyframes.append(kf)
                res = KeyframeResult(keyframe=k, index=kf.index, frames=(start, stop), psnr=psnr,
                                     seconds=time.perf_counter() - t0, **stats)
                results.append(res)
                ckpt.log(res)
                kbar.update(1)
                kbar.set_postfix(psnr=f"{psnr:.2f}", refresh=False)
                log.info("keyframe %d/%d: best loss %.5f at iteration %d of %d (%s), closed-loop PSNR %.2f dB "
                         "(%.1f s)", k, K - 1, res.best_loss, res.best_iteration, res.iterations, res.stop, psnr,
                         res.seconds)
                if k < K - 1:
                    ckpt.save(init, keyframes, results)
        finally:
            kbar.close()
        return recon


def _portable(vgg):
    """What a worker process can receive of ``vgg``: a path as is, a module as a copy on the CPU (never CUDA
    memory shared across processes and devices)."""
    if isinstance(vgg, torch.nn.Module):
        import copy

        return copy.deepcopy(vgg).cpu()
    return vgg


def _worker_trainer(setup: dict, device: torch.device) -> Encoder:
    """The trainer of a worker process of a multi-device encode (:class:`promptus.distributed.DevicePool`)."""
    models = setup["models"]
    models = models.load(device) if isinstance(models, ModelSource) else models
    return Encoder(setup["codec"], setup["train"], models, device=device, vgg=setup["vgg"], progress=False,
                   plan=setup["plan"], engine_dir=setup["engine_dir"])
