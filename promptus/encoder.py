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

import hashlib
import json
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
from .bitstream import Bitstream, Header, InitLatent, Keyframe, from_bytes, to_bytes, write
from .config import CodecConfig, TrainConfig
from .decoder import ClipState
from .errors import EncodeAborted, PromptusError, VideoError
from .files import OutputLock, atomic_write, check_writable, open_append, read_regular
from .memory import MemoryPlan, PlanChoice, choose_plan, estimate, resolve_budget
from .metrics.frames import clip_psnr, psnr_from_mse
from .prompts import QuantizedTensor, RunningRange, embedding, fake_quantize, interpolate_factors, kbps, quantize
from .schedule import OneStep, to_model_range

log = logging.getLogger(__name__)

#: Version 2 records the SHA-256 of the checkpoint bitstream in the checkpoint JSON.
CHECKPOINT_VERSION = 2
#: A checkpoint JSON holds a few hundred bytes per keyframe; anything far larger is not ours.
MAX_CHECKPOINT_JSON_BYTES = 64 << 20


@dataclass
class KeyframeResult:
    """What training one keyframe produced (also the per-keyframe JSON log entry)."""

    keyframe: int
    index: int
    frames: tuple[int, int]  # first and last frame index of the segment it closes
    iterations: int
    best_iteration: int
    best_loss: float
    final_lr: float
    psnr: float  # closed-loop PSNR of the segment (of its mean MSE), from the transmitted prompts
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__, frames=list(self.frames))


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


def _mean_psnr(results: list[KeyframeResult]) -> float:
    w = [r.frames[1] - r.frames[0] + 1 for r in results]
    finite = [(p, n) for p, n in zip((r.psnr for r in results), w) if math.isfinite(p)]
    if not finite:
        return float("inf")
    return sum(p * n for p, n in finite) / sum(n for _, n in finite)


def frames_digest(frames: torch.Tensor) -> str:
    """SHA-256 (32 hex digits) of the frames' bytes, hashed in place (no copy of the clip)."""
    arr = frames.contiguous().numpy()
    h = hashlib.sha256()
    flat = arr.reshape(-1)
    for i in range(0, flat.size, 1 << 24):  # 16 MiB at a time: views, never a copy
        h.update(flat[i:i + (1 << 24)])
    return h.hexdigest()[:32]


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

    def __call__(self, plan: MemoryPlan, z, timestep, ctx, targets, target_feats, weights, scale):
        n = z.shape[0]
        mb = plan.micro(n)
        if self.compile == "reduce-overhead" and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
            torch.compiler.cudagraph_mark_step_begin()  # the previous iteration's graph outputs are dead
        if mb >= n:  # one pass: the gradient flows straight from the loss into the factors
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
        for i in range(0, n, mb):
            sl = slice(i, i + mb)
            feats = ([f[sl] for f in target_feats] if target_feats is not None
                     else self.target_features(targets[sl]))
            image, per_frame = self.forward(z[sl], timestep[sl], leaf[sl], targets[sl], feats, plan.checkpoint)
            scale((per_frame * weights[sl]).sum() / total).backward()
            with torch.no_grad():
                mses.append((image.clamp(-1, 1) - targets[sl]).pow(2).mean(dim=(1, 2, 3)))
            losses.append(per_frame.detach().clone())  # a CUDA graph's output is overwritten by its next replay
            images.append(image.detach().clone())
            del image, per_frame, feats
        ctx.backward(leaf.grad)
        return torch.cat(losses), torch.cat(mses), torch.cat(images)

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        # outputs of a CUDA-graph replay are overwritten by the next one: copy what outlives the step
        return t.clone() if self.compile == "reduce-overhead" else t


def _maybe_checkpoint(enabled: bool, fn, *args):
    if not enabled:
        return fn(*args)
    # Non-reentrant: the frozen networks' inputs need not require grad; nothing random to replay.
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)


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
    """

    def __init__(self, codec: CodecConfig, train: TrainConfig, models, *, device: str | torch.device | None = None,
                 vgg: str | torch.nn.Module | None = None, callback: Callable[[dict], None] | None = None, progress: bool = True,
                 backend: Backend | None = None, should_stop: Callable[[], bool] | None = None,
                 plan: MemoryPlan | None = None):
        from .backends import default_dtype, make_backend, resolve_device

        self.codec, self.train, self.models = codec, train, models
        if device is None and backend is not None:
            device = backend.device
        self.device = resolve_device(device)
        self.dtype = default_dtype(self.device)
        self.callback = callback
        self.should_stop = should_stop
        self.progress = progress
        if backend is None:
            backend = make_backend("eager", models, self.device, self.dtype, batch=codec.interval, size=codec.width)
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
        """The training step (built once, so that a compiled step is compiled once per shape)."""
        if self._step is None or self._step.onestep != onestep:
            self._step = TrainingStep(self.models.unet, self.models.taesd.decoder, self.loss_fn, onestep, self.dtype,
                                      self._loss_autocast, compile=self.train.compile)
        return self._step

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

    def _init_factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.codec
        g = torch.Generator().manual_seed(self.train.seed * 1_000_003 + k)
        U = torch.rand(c.tokens, c.rank, generator=g)
        V = torch.rand(c.rank, c.embed_dim, generator=g)
        return U.to(self.device).requires_grad_(), V.to(self.device).requires_grad_()

    def train_keyframe(self, k: int, z: torch.Tensor, targets: torch.Tensor, prev: Keyframe | None,
                       onestep: OneStep, bar: tqdm | None = None) -> tuple[Keyframe, dict]:
        """Fit keyframe ``k``: its factors such that the frames generated from ``z``
        (1×4×h×w, float32) match ``targets`` (n×3×H×W in [-1, 1]).

        With ``prev`` (keyframe k−1, transmitted) the n frames use factors
        interpolated at s/T, s = 1..n; without it, one frame uses the factors as is.
        Returns the quantized best iterate and training statistics.
        """
        t, c = self.train, self.codec
        first = prev is None
        iters = t.iters_first if first else t.iters
        patience = t.patience_first if first else t.patience
        n = targets.shape[0]
        device, dtype = self.device, self.dtype

        U, V = self._init_factors(k)
        rU, rV = RunningRange(), RunningRange()
        lr = t.lr
        opt = torch.optim.Adam([U, V], lr=lr)
        scaler = torch.amp.GradScaler("cuda", enabled=self.use_scaler)
        z_in = z.to(device, dtype).expand(n, -1, -1, -1)
        timestep = torch.full((n,), c.timestep, device=device, dtype=torch.long)
        if prev is not None:
            U0, V0 = prev.U.to(device), prev.V.to(device)
        plan = self.plan_for(n).plan
        step = self.step_for(onestep)
        target_feats = step.target_features(targets) if plan.cache_targets else None
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
            per_frame, mse, image = step(plan, z_in, timestep, ctx, targets, target_feats, weights, scaler.scale)
            scaler.step(opt)
            scaler.update()
            stats = torch.cat([per_frame, mse]).tolist()  # one host sync per iteration
            frame_losses, frame_mse = stats[:n], stats[n:]
            mean_loss = sum(frame_losses) / n
            if mean_loss < best_loss:
                best_loss, best_it = mean_loss, it
                best = (snapshot[0], pU, snapshot[1], pV)
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
                if it % 10 == 0 or it == iters - 1:
                    bar.set_postfix(loss=f"{mean_loss:.4f}", psnr=f"{psnr:.2f}", lr=f"{lr:g}", refresh=False)
            if self.callback is not None:
                self.callback({"keyframe": k, "iteration": it, "loss": mean_loss, "psnr": psnr, "lr": lr,
                               "frames": image})
            if self.should_stop is not None and self.should_stop():
                raise EncodeAborted(f"encoding stopped on request during keyframe {k}; the {k} finished keyframes "
                                    "are kept in the checkpoint: resume to continue", keyframes_done=k)

        bU, bpU, bV, bpV = best
        kf = Keyframe(
            index=k * c.interval,
            U_q=QuantizedTensor(quantize(bU.cpu(), *bpU).numpy(), *bpU),
            V_q=QuantizedTensor(quantize(bV.cpu(), *bpV).numpy(), *bpV),
        )
        return kf, {"iterations": iters, "best_iteration": best_it, "best_loss": best_loss, "final_lr": lr}

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
        ckpt_bs, ckpt_json = checkpoint_paths(out)
        log_path = out.with_name(out.name + ".log.jsonl")
        digest = frames_digest(frames)
        state_meta = {"version": CHECKPOINT_VERSION, "codec": c.to_dict(), "train": self.train.result_dict(),
                      "frame_count": N, "frames": digest, "model": self.identity.hexdigest,
                      "precision": str(self.dtype), "device": self.device.type}

        keyframes: list[Keyframe] = []
        results: list[KeyframeResult] = []
        init: InitLatent | None = None
        if resume and ckpt_json.exists():
            init, keyframes, results = self._load_checkpoint(ckpt_bs, ckpt_json, state_meta, header)
            log.info("resuming %s after keyframe %d of %d", out, len(keyframes) - 1, K - 1)
        elif resume:
            log.info("no checkpoint for %s: starting from the beginning", out)
        elif ckpt_json.exists():
            log.warning("an earlier run of %s left a checkpoint; starting over (use --resume to continue it)", out)
        if not keyframes:
            log_path.unlink(missing_ok=True)
        if init is None:
            init = self.init_latent(frames[0])

        # Memory plans now, before any training: a budget that nothing fits fails here, and the log says
        # which plan each step length gets before the progress bars start.
        for n in sorted({1} | {min(k * c.interval, N - 1) - (k - 1) * c.interval for k in range(1, K)}):
            self.plan_for(n)
        targets_all = frames  # uint8 on the CPU; moved per segment
        state = ClipState(self.backend, header, init)
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
                targets = to_model_range(targets_all[start:stop + 1]).to(self.device)
                z = state.z()
                iters = self.train.iters_first if k == 0 else self.train.iters
                with tqdm(total=iters, desc=f"keyframe {k} (frame {k * c.interval})", unit="it", leave=False,
                          disable=not self.progress, position=1) as ibar:
                    kf, stats = self.train_keyframe(k, z, targets, keyframes[-1] if keyframes else None,
                                                    state.onestep, ibar)
                seg = state.push(kf)  # closed loop: regenerate from what is transmitted
                assert (seg.start, seg.stop - 1) == (start, stop)
                recon[start:stop + 1] = seg.frames.cpu()
                psnr = clip_psnr(targets_all[start:stop + 1], recon[start:stop + 1])
                keyframes.append(kf)
                res = KeyframeResult(keyframe=k, index=kf.index, frames=(start, stop), psnr=psnr,
                                     seconds=time.perf_counter() - t0, **stats)
                results.append(res)
                with open_append(log_path) as f:
                    f.write(json.dumps(res.to_dict()) + "\n")
                kbar.update(1)
                kbar.set_postfix(psnr=f"{psnr:.2f}", refresh=False)
                log.info("keyframe %d/%d: best loss %.5f at iteration %d, closed-loop PSNR %.2f dB (%.1f s)",
                         k, K - 1, res.best_loss, res.best_iteration, psnr, res.seconds)
                if k < K - 1:
                    self._save_checkpoint(ckpt_bs, ckpt_json, state_meta, header, init, keyframes, results)
        finally:
            kbar.close()

        nbytes = write(out, Bitstream(header, init, keyframes))
        for p in (ckpt_bs, ckpt_json):
            p.unlink(missing_ok=True)
        result = EncodeResult(out, nbytes, N, results, recon, c.fps)
        # debug: the commands print their own summary of the file
        log.debug("wrote %s: %d bytes, %.1f kbit/s, mean PSNR %.2f dB", out, nbytes, result.kbps, result.mean_psnr)
        return result

    # -------------------------------------------------------- checkpoints

    def _save_checkpoint(self, ckpt_bs: Path, ckpt_json: Path, meta: dict, header: Header, init: InitLatent,
                         keyframes: list[Keyframe], results: list[KeyframeResult]) -> None:
        # The finished keyframes form a complete bitstream of a shorter clip: our own format, no pickle.
        partial = Header(header.config, (len(keyframes) - 1) * header.interval + 1, header.model)
        data = to_bytes(Bitstream(partial, init, list(keyframes)), entropy="none")
        atomic_write(ckpt_bs, data)
        state = dict(meta, keyframes_done=len(keyframes), bitstream_sha256=hashlib.sha256(data).hexdigest(),
                     results=[r.to_dict() for r in results])
        atomic_write(ckpt_json, json.dumps(state, indent=1))

    def _load_checkpoint(self, ckpt_bs: Path, ckpt_json: Path, meta: dict, header: Header):
        return read_checkpoint(ckpt_bs, ckpt_json, meta, header, self.train.init_precision)


def read_checkpoint(ckpt_bs: Path, ckpt_json: Path, meta: dict, header: Header, init_precision: str
                    ) -> tuple[InitLatent, list[Keyframe], list[KeyframeResult]]:
    """(init latent, keyframes, results) of a checkpoint that belongs to this very run.

    ``meta``: this run's options, which the JSON must repeat; ``header``: this run's header.

    Everything is checked before it is used: the JSON's shape and types, its options
    against this run's, the bitstream's SHA-256 against the one the JSON recorded,
    and the bitstream's header against this run's header.
    """
    def refuse(problem: str) -> PromptusError:
        return PromptusError(f"cannot resume from checkpoint {ckpt_json}: {problem}; delete {ckpt_json.name} "
                             f"and {ckpt_bs.name} to start over")

    try:
        state = json.loads(read_regular(ckpt_json, what="checkpoint", limit=MAX_CHECKPOINT_JSON_BYTES))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, absurd nesting
        raise refuse(f"it is not valid JSON ({e})") from None
    if not isinstance(state, dict):
        raise refuse(f"it holds a JSON {type(state).__name__}, not an object")
    for key in ("version", "codec", "train", "frame_count", "frames", "model", "precision"):
        if state.get(key) != meta[key]:
            raise PromptusError(
                f"checkpoint {ckpt_json} was made with different {key} ({state.get(key)!r:.200} vs {meta[key]!r}); "
                "resume with the same input and options, or delete the checkpoint to start over"
            )
    done, digest, entries = state.get("keyframes_done"), state.get("bitstream_sha256"), state.get("results")
    if type(done) is not int or not 1 <= done < header.keyframe_count:
        raise refuse(f"keyframes_done={done!r:.100} is not a count in 1..{header.keyframe_count - 1}")
    if not isinstance(digest, str) or not isinstance(entries, list) or len(entries) != done:
        raise refuse("its bitstream digest or its per-keyframe results are missing or malformed")
    data = read_regular(ckpt_bs, what="checkpoint bitstream")
    if hashlib.sha256(data).hexdigest() != digest:
        raise refuse(f"{ckpt_bs.name} is not the bitstream this checkpoint recorded (another run's, or changed)")
    bs = from_bytes(data)
    want = Header(header.config, (done - 1) * header.interval + 1, header.model)
    if bs.header != want or len(bs.keyframes) != done or bs.init.precision != init_precision:
        raise refuse(f"{ckpt_bs.name} holds {len(bs.keyframes)} keyframes of another clip or other settings")
    results = []
    fields = set(KeyframeResult.__dataclass_fields__)
    for k, r in enumerate(entries):
        try:
            if not isinstance(r, dict) or set(r) != fields:
                raise TypeError("wrong fields")
            res = KeyframeResult(**dict(r, frames=tuple(int(i) for i in r["frames"])))
            if res.keyframe != k or len(res.frames) != 2:
                raise ValueError("out of order")
            for name in ("psnr", "best_loss", "final_lr", "seconds"):
                float(getattr(res, name))
        except (TypeError, ValueError, OverflowError) as e:
            raise refuse(f"its result for keyframe {k} is malformed ({e})") from None
        results.append(res)
    return bs.init, list(bs.keyframes), results


def checkpoint_paths(out: Path) -> tuple[Path, Path]:
    return out.with_name(out.name + ".ckpt.promptus"), out.with_name(out.name + ".ckpt.json")
