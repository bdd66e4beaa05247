"""The studio's work: the model it runs, one encode in a background thread, its results, the benchmark.

An :class:`EncodeJob` runs :class:`promptus.Encoder` on a thread and publishes a
:class:`Progress` snapshot after every training iteration; :meth:`EncodeJob.abort`
sets an event that the encoder polls (``should_stop``), so a run stops within one
iteration, keeping its finished keyframes in the encoder's checkpoint for a resume.
After the encode the job decodes the file with the library's decoder and measures
it (:func:`measure_outcome`). One lock per machine lets one encode or benchmark run
at a time; the others wait and say so.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..bitstream import describe, layout, read
from ..encoder import EncodeResult, Encoder
from ..errors import EncodeAborted, ModelNotFoundError, PromptusError
from .settings import RateSummary, StudioSettings, expected_rate, frames_to_encode
from .uploads import ClipInfo

log = logging.getLogger(__name__)


# ------------------------------------------------------------------- model


@dataclass
class StudioModel:
    """The weights the studio encodes and decodes with, loaded once per server."""

    models: object  # promptus.models.Models
    spec: str  # "tiny" or where the weights came from
    device: torch.device
    vgg: torch.nn.Module | None  # VGG-19 for the perceptual loss, when its weights are here

    @functools.cached_property
    def identity(self):
        """The weights' identity (a digest over every weight: computed once)."""
        return self.models.identity()

    @property
    def tiny(self) -> bool:
        return self.spec == "tiny"

    @property
    def has_vae(self) -> bool:
        return self.models.vae is not None

    def defaults(self) -> StudioSettings:
        """Settings that work with these weights: the tiny model gets small frames and no VGG."""
        base = StudioSettings()
        return base.replace(size=128 if self.tiny else base.size,
                            init_latent="vae" if self.has_vae and not self.tiny else "taesd",
                            perceptual=self.vgg is not None)


def load_studio_model(model: str = "auto", *, checkpoints: str = "checkpoints", device: str = "auto",
                      taesd: str | None = None, vgg: str | None = None) -> StudioModel:
    """SD-Turbo from ``checkpoints/`` when its weights are there (``model="auto"``), else the tiny model."""
    from ..backends import default_dtype, resolve_device
    from ..losses import load_vgg19
    from ..models import find_default_weights, load_models

    dev = resolve_device(device)
    spec = (find_default_weights(checkpoints) or "tiny") if model == "auto" else model
    t0 = time.perf_counter()
    try:
        models = load_models(spec, device=dev, dtype=default_dtype(dev), taesd=taesd, vae=True,
                             checkpoints_dir=checkpoints)
    except ModelNotFoundError:  # weights without the SD VAE encoder: init latents from TAESD only
        models = load_models(spec, device=dev, dtype=default_dtype(dev), taesd=taesd, vae=False,
                             checkpoints_dir=checkpoints)
    log.info("studio: model %s on %s loaded in %.1f s", spec, dev, time.perf_counter() - t0)
    net = None
    if spec != "tiny":  # the tiny model cannot make use of a real perceptual loss
        try:
            net = load_vgg19(vgg, online=False)
        except ModelNotFoundError as e:
            log.warning("studio: perceptual loss unavailable: %s", str(e).splitlines()[0])
    return StudioModel(models, str(spec), dev, net)


# ---------------------------------------------------------------- progress


@dataclass(frozen=True)
class Progress:
    """What the page shows of a job: its state, where training is, its last loss and PSNR."""

    state: str  # waiting, loading, encoding, decoding, done, aborted, failed
    message: str = ""
    keyframe: int = 0
    keyframes: int = 0
    iteration: int = 0
    iterations: int = 0
    done: int = 0  # training iterations finished, over the whole encode
    total: int = 0
    loss: float = math.nan
    psnr: float = math.nan
    elapsed: float = 0.0

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0

    @property
    def finished(self) -> bool:
        return self.state in ("done", "aborted", "failed")


@dataclass
class EncodeOutcome:
    """A finished encode, decoded and measured."""

    result: EncodeResult
    path: Path  # the .promptus file
    file_bytes: int
    duration_s: float
    expected: RateSummary
    report: str  # promptus info's layout of the file
    factor_bytes: int
    original: torch.Tensor  # uint8 N×H×W×3 at the codec's size
    decoded: torch.Tensor
    psnr: np.ndarray  # per frame, dB
    ssim: np.ndarray | None  # per frame; None when unavailable (see ssim_note)
    ssim_note: str
    matches_closed_loop: bool  # the decoder reproduced the encoder's reconstruction exactly
    decode_seconds: float
    decode_backend: str
    videos: dict[str, Path] = field(default_factory=dict)  # original, decoded, side_by_side (mp4)

    @property
    def kbps(self) -> float:
        return 8 * self.file_bytes / self.duration_s / 1000

    @property
    def factor_kbps(self) -> float:
        return 8 * self.factor_bytes / self.duration_s / 1000


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """n×3×H×W in [-1, 1] → n×H×W×3 uint8, rounded as the decoder does."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


class EncodeJob:
    """One encode of ``clip`` with ``settings`` into ``out`` on a background thread."""

    def __init__(self, model: StudioModel, settings: StudioSettings, clip: ClipInfo, out: Path, *,
                 resume: bool = False, machine: threading.Lock | None = None):
        self.model, self.settings, self.clip, self.out, self.resume = model, settings, clip, Path(out), resume
        self.machine = machine or threading.Lock()
        self.frame_count = frames_to_encode(settings, clip.frame_count)  # a too-short clip fails here, at once
        self.total = settings.total_iterations(self.frame_count)
        self.keyframes = settings.codec(clip.fps).keyframe_count(self.frame_count)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"promptus-encode-{out.name}", daemon=True)
        self._progress = Progress("waiting", "waiting to start", keyframes=self.keyframes, total=self.total)
        self._last: tuple[int, torch.Tensor] | None = None  # (keyframe, its latest generated frames)
        self._frames: torch.Tensor | None = None
        self._t0 = time.perf_counter()
        self.outcome: EncodeOutcome | None = None
        self.keyframes_done = 0  # after an abort: finished keyframes kept for a resume

    # ------------------------------------------------------------ control

    def start(self) -> "EncodeJob":
        self._thread.start()
        return self

    def abort(self) -> None:
        """Ask the encode to stop; it does within one training iteration."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def aborting(self) -> bool:
        return self._stop.is_set()

    def snapshot(self) -> Progress:
        p = self._progress
        return p if p.finished else Progress(**{**p.__dict__, "elapsed": time.perf_counter() - self._t0})

    def preview(self) -> np.ndarray | None:
        """The keyframe's original frame beside its current reconstruction (H×2W×3 uint8), once training runs."""
        last, frames = self._last, self._frames
        if last is None or frames is None:
            return None
        k, generated = last
        original = frames[min(k * self.settings.interval, frames.shape[0] - 1)].numpy()
        return np.concatenate([original, _to_uint8(generated[-1:])[0]], axis=1)

    # ------------------------------------------------------------- thread

    def _set(self, state: str, message: str = "", **changes) -> None:
        p = self._progress
        self._progress = Progress(**{**p.__dict__, "state": state, "message": message,
                                     "elapsed": time.perf_counter() - self._t0, **changes})

    def _callback(self, m: dict) -> None:
        k, it = m["keyframe"], m["iteration"]
        s = self.settings
        done = it + 1 if k == 0 else s.iters_first + (k - 1) * s.iters + it + 1
        self._last = (k, m["frames"])
        p = self._progress
        self._progress = Progress(p.state, p.message, keyframe=k, keyframes=self.keyframes, iteration=it + 1,
                                  iterations=s.iters_first if k == 0 else s.iters, done=done, total=self.total,
                                  loss=m["loss"], psnr=m["psnr"], elapsed=time.perf_counter() - self._t0)

    def _run(self) -> None:
        try:
            while not self.machine.acquire(timeout=0.25):
                if self._stop.is_set():
                    self._set("aborted", "before it started (another session's encode was running)")
                    return
                self._set("waiting", "waiting for the encode or benchmark of another session to finish")
            try:
                self._work()
            finally:
                self.machine.release()
        except EncodeAborted as e:
            self.keyframes_done = e.keyframes_done
            kept = (f"{e.keyframes_done} finished keyframe{'s are' if e.keyframes_done != 1 else ' is'} kept: "
                    "Resume continues from there") if e.keyframes_done else "no keyframe had finished: Resume starts over"
            self._set("aborted", f"during keyframe {e.keyframes_done}; {kept}")
        except PromptusError as e:
            self._set("failed", str(e))
        except Exception as e:  # noqa: BLE001 - the page gets a message, the log the traceback
            log.exception("studio: the encode failed")
            self._set("failed", f"the encode failed unexpectedly ({type(e).__name__}: {e}); the server log has "
                                "the details")

    def _work(self) -> None:
        s, m = self.settings, self.model
        self._set("loading", "reading the clip")
        from ..backends import backend_for_clip

        codec, train = s.codec(self.clip.fps), s.train()
        # The closed loop runs on the backend the results are decoded with: same frames, bit for bit.
        backend = backend_for_clip(codec, m.models, name=s.backend, device=m.device)
        encoder = Encoder(codec, train, m.models, device=m.device, vgg=m.vgg, callback=self._callback,
                          progress=False, backend=backend, should_stop=self._stop.is_set)
        frames = encoder.load_frames(self.clip.path, max_frames=self.frame_count)
        self._frames = frames
        self._set("encoding", "resuming from the finished keyframes" if self.resume else "training keyframe 0")
        if self._stop.is_set():
            raise EncodeAborted("stopped before training", keyframes_done=0)
        res = encoder.encode(frames, self.out, resume=self.resume)
        self._set("decoding", "decoding the file and measuring it", done=self.total)
        self.outcome = measure_outcome(m, s, res, frames, self.out.parent)
        o = self.outcome
        self._set("done", f"{o.file_bytes:,} bytes, {o.kbps:.1f} kbit/s, mean per-frame PSNR "
                          f"{float(np.mean(o.psnr)):.2f} dB")


# ----------------------------------------------------------------- results


def measure_outcome(model: StudioModel, settings: StudioSettings, res: EncodeResult, original: torch.Tensor,
                    folder: Path) -> EncodeOutcome:
    """Decode ``res``'s file with the library's decoder, measure it against ``original``, write the videos."""
    from ..backends import backend_for_clip
    from ..decoder import Decoder
    from ..metrics import psnr, ssim
    from ..video import FrameWriter

    path = Path(res.path)
    data = path.read_bytes()
    bs = read(path)
    h = bs.header
    backend = backend_for_clip(h, model.models, name=settings.backend, device=model.device)
    t0 = time.perf_counter()
    decoded = Decoder(backend, model.identity).decode_all(bs)
    decode_seconds = time.perf_counter() - t0
    per_frame_psnr = psnr(original, decoded).numpy()
    try:
        per_frame_ssim, note = ssim(original, decoded).numpy(), ""
    except PromptusError as e:  # torchmetrics missing: say so instead of a plot
        per_frame_ssim, note = None, str(e)
    keyf = [r for r in layout(data) if r.raw_codes is not None]
    videos = {}
    for name, frames in (("original", original), ("decoded", decoded),
                         ("side_by_side", torch.cat([original, decoded], dim=2))):
        videos[name] = folder / f"{path.stem}.{name}.mp4"
        with FrameWriter(videos[name], h.fps) as w:
            w.write_batch(frames)
    closed = res.reconstruction
    return EncodeOutcome(
        result=res, path=path, file_bytes=len(data), duration_s=h.duration_s,
        expected=expected_rate(h.config, h.frame_count, bs.init.precision, h.model), report=describe(data),
        factor_bytes=sum(r.payload for r in keyf), original=original, decoded=decoded, psnr=per_frame_psnr,
        ssim=per_frame_ssim, ssim_note=note,
        matches_closed_loop=closed is not None and torch.equal(closed, decoded),
        decode_seconds=decode_seconds, decode_backend=backend.describe(), videos=videos)


def decoded_psnr(outcome: EncodeOutcome) -> float:
    """PSNR of the clip's mean MSE, decoded against original (dB)."""
    from ..metrics import clip_psnr

    return clip_psnr(outcome.original, outcome.decoded)


# --------------------------------------------------------------- benchmark


def run_decode_benchmark(model: StudioModel, backends: list[str], *, size: int, batch: int, keyframes: int = 7,
                         reps: int = 3, machine: threading.Lock | None = None) -> dict:
    """The library's decode benchmark on this machine (eager first: it is the baseline)."""
    from ..backends import BASELINE
    from ..bench import bench_decode

    names = [BASELINE] + [b for b in backends if b != BASELINE]
    lock = machine or threading.Lock()
    with lock:
        return bench_decode(model="tiny" if model.tiny else model.spec, device=str(model.device), size=size,
                            batch=batch, backends=names, keyframes=keyframes, reps=reps)
