"""Settings: the one place where the codec's and the trainer's defaults live.

A :class:`CodecConfig` is everything the decoder needs besides the prompts and the
model weights. It round-trips through the bitstream header and through JSON.
:class:`TrainConfig` holds the inversion trainer's settings, and
:class:`ModelIdentity` names the model weights the prompts were optimised for.
Commands, the sweep and the backends read their defaults from here; the option
choices (init-latent sources, precisions) are the tuples the configs validate with.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from .errors import PromptusError

#: Name of the only noise generator the codec knows (docs/design.md, "The method").
NOISE_NUMPY_RANDN = "numpy.random.RandomState.randn"

# Hard limits. A .promptus file is input from anywhere: these bound what a header may
# ask a decoder to allocate, and the encoder cannot write what a decoder would refuse.
# Each is far above what the codec uses (512×512, rank 8, interval 10, 77×1024).
#: Frame width and height in pixels.
MAX_FRAME_SIDE = 4096
#: Prompt rank r.
MAX_RANK = 512
#: Keyframe interval T (the frames of one segment).
MAX_INTERVAL = 256
#: Tokens per prompt (the text encoder's context: 77 for SD-Turbo).
MAX_TOKENS = 1024
#: Width of one token embedding (1024 for SD-Turbo).
MAX_EMBED_DIM = 4096
#: Latent channels (4 for SD-Turbo).
MAX_LATENT_CHANNELS = 64
#: Frames of one clip (about 6.5 days at 30 fps).
MAX_FRAME_COUNT = 1 << 24
#: Frames per second, both ways: a video container must be able to state the rate.
MIN_FPS, MAX_FPS = 1e-3, 1e4
#: Pixels a decoder processes in one batch (64 frames at 512×512): longer segments are
#: split into batches of at most this many pixels, so memory stays bounded whatever the interval.
MAX_BATCH_PIXELS = 64 * 512 * 512


@dataclass(frozen=True)
class CodecConfig:
    """Settings shared by encoder and decoder.

    Attributes:
        width, height: output frame size in pixels (multiples of 8).
        fps: frames per second of the clip.
        rank: rank r of the keyframe prompt factors U (tokens×r) and V (r×dim).
        interval: keyframe interval T; keyframes sit at frames 0, T, 2T, ...
        seed: seed of the shared latent noise.
        noise_generator: name of the generator that draws the noise.
        mix: temporal mix m in ``z = m·z_prev + (1 − m)·ε``.
        quant_bits: bits per quantized factor value.
        tokens, embed_dim: shape of the text embedding (77×1024 for SD-Turbo).
        timestep: the single denoising timestep.
        latent_channels, latent_factor: latent is channels × H/factor × W/factor.
    """

    width: int = 512
    height: int = 512
    fps: float = 30.0
    rank: int = 8
    interval: int = 10
    seed: int = 88
    noise_generator: str = NOISE_NUMPY_RANDN
    mix: float = 0.05
    quant_bits: int = 8
    tokens: int = 77
    embed_dim: int = 1024
    timestep: int = 999
    latent_channels: int = 4
    latent_factor: int = 8

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`PromptusError` if any setting is out of range."""
        f = self.latent_factor
        if not isinstance(f, int) or not 1 <= f <= 64:
            raise PromptusError(f"latent_factor={f!r} must be an integer in 1..64 (8 for SD-Turbo)")
        for name in ("width", "height"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0 or v % f:
                raise PromptusError(
                    f"{name}={v!r}: frame {name} must be a positive multiple of {f} "
                    f"(the latent is {f}× smaller); try {max(f, (int(v) // f) * f) if isinstance(v, (int, float)) and v > 0 else 512}"
                )
            if v > MAX_FRAME_SIDE:
                raise PromptusError(f"{name}={v}: frames may be at most {MAX_FRAME_SIDE} pixels wide and high")
        try:
            fps = float(self.fps)
        except (TypeError, ValueError):
            fps = math.nan
        if not MIN_FPS <= fps <= MAX_FPS:
            raise PromptusError(f"fps={self.fps!r}: frames per second must lie in [{MIN_FPS:g}, {MAX_FPS:g}]")
        if not isinstance(self.rank, int) or not 1 <= self.rank <= MAX_RANK:
            raise PromptusError(f"rank={self.rank!r}: the prompt rank must be an integer in 1..{MAX_RANK} "
                                "(8 is the published default)")
        if not isinstance(self.interval, int) or not 1 <= self.interval <= MAX_INTERVAL:
            raise PromptusError(f"interval={self.interval!r}: the keyframe interval must be an integer in "
                                f"1..{MAX_INTERVAL} (10 is the published default)")
        if not 0.0 <= self.mix <= 1.0:
            raise PromptusError(f"mix={self.mix!r}: the temporal mix must lie in [0, 1] (0.05 is the published value)")
        if self.quant_bits != 8:
            raise PromptusError(f"quant_bits={self.quant_bits!r}: only 8-bit quantization is supported")
        if self.noise_generator != NOISE_NUMPY_RANDN:
            raise PromptusError(
                f"noise generator {self.noise_generator!r} is unknown; this version knows {NOISE_NUMPY_RANDN!r}"
            )
        if not 0 <= self.seed < 2**32:
            raise PromptusError(f"seed={self.seed!r}: the noise seed must lie in [0, 2**32)")
        if not 0 <= self.timestep < 1000:
            raise PromptusError(f"timestep={self.timestep!r} must lie in [0, 1000)")
        for name, most in (("tokens", MAX_TOKENS), ("embed_dim", MAX_EMBED_DIM),
                           ("latent_channels", MAX_LATENT_CHANNELS)):
            v = getattr(self, name)
            if not isinstance(v, int) or not 1 <= v <= most:
                raise PromptusError(f"{name}={v!r} must be an integer in 1..{most}")

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """Shape of one latent, ``(1, C, H/8, W/8)``."""
        f = self.latent_factor
        return (1, self.latent_channels, self.height // f, self.width // f)

    def keyframe_count(self, frame_count: int) -> int:
        """Keyframes needed to cover ``frame_count`` frames: 0, T, ..., up to the last frame."""
        if frame_count < 1:
            raise PromptusError(f"a clip needs at least one frame, got {frame_count}")
        return -(-(frame_count - 1) // self.interval) + 1

    def segment_batch(self, frame_count: int | None = None) -> int:
        """Frames a decoder generates in one batch for a clip of ``frame_count`` frames.

        The interval T, but no more than the clip's longest segment (a 3-frame clip
        never needs a batch of T; ``None``: length unknown yet) and no more than
        :data:`MAX_BATCH_PIXELS` allow at this frame size (longer segments are generated
        in several batches). The one formula for the batch a backend is prepared for
        (:func:`promptus.backends.backend_for_clip`) and the decoder's batches.
        """
        by_memory = max(1, MAX_BATCH_PIXELS // (self.width * self.height))
        longest = self.interval if frame_count is None else frame_count - 1
        return max(1, min(self.interval, longest, by_memory))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CodecConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise PromptusError(f"unknown codec settings: {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "CodecConfig":
        return dataclasses.replace(self, **changes)


#: Bytes in a GB (as disks and GPU makers count) and in a GiB (as CUDA and nvidia-smi count).
GB, GIB = 10**9, 2**30
_UNITS = {"": None, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?)?(b)?\s*$", re.IGNORECASE)

MEMORY_HELP = ("a size such as 12GB, 11.5GiB or 8000MB (GB = 10^9 bytes, GiB = 2^30 bytes), "
               "'auto' (the GPU's free memory; no limit on the CPU) or 'none' (no limit)")


def parse_memory(text: str | int | float) -> int | str:
    """A memory budget: bytes (int) from ``"12GB"``, ``"11.5GiB"``, ``"8000MB"``; or ``"auto"`` / ``"none"``.

    K, M, G, T (with or without B) are powers of 1000, Ki, Mi, Gi, Ti powers of 1024;
    a bare number needs a unit. Raises :class:`PromptusError` with the accepted forms.
    """
    if isinstance(text, bool):
        raise PromptusError(f"max memory {text!r}: expected {MEMORY_HELP}")
    if isinstance(text, (int, float)):
        if not math.isfinite(text) or text <= 0:
            raise PromptusError(f"max memory {text!r} must be a positive number of bytes")
        return int(text)
    if not isinstance(text, str):
        raise PromptusError(f"max memory {text!r}: expected {MEMORY_HELP}")
    word = text.strip().lower()
    if word in ("auto", "none"):
        return word
    m = _SIZE.match(text)
    if not m:
        raise PromptusError(f"max memory {text!r} is not a size; write {MEMORY_HELP}")
    number, prefix, b = m.groups()
    unit = (prefix or "").lower()
    if not unit and not b:
        raise PromptusError(f"max memory {text!r} has no unit; write e.g. {text.strip()}GB ({MEMORY_HELP})")
    value = float(number) * (_UNITS[unit] if unit else 1)
    if value < 1:
        raise PromptusError(f"max memory {text!r} must be positive")
    return int(value)


INIT_LATENT_SOURCES = ("vae", "taesd")
INIT_PRECISIONS = ("fp32", "fp16", "int8")
#: torch.compile modes of the training step ("off": eager; "reduce-overhead" adds CUDA graphs on a GPU).
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")

#: Several devices for one encode (promptus.distributed): seconds a collective (or the rendezvous) may
#: wait for the other processes before the encode fails with an error instead of hanging. Long enough
#: for a first compiled iteration on every device; a process that dies is noticed sooner on the CPU.
DISTRIBUTED_TIMEOUT_S = 600
#: The rendezvous host of the processes of one encode (they run on this machine).
DISTRIBUTED_HOST = "127.0.0.1"
#: zlib level of PNG frames (0–9). 1, as OpenCV's PNG writer: on one H100 host's core a 512² frame took
#: 17.7 ms at level 1 against 98.3 ms at 6 (PIL's default, what the writer wrote before), for files about 20 % larger
#: with the same pixels; at 6 sixteen cores write ~110 frames/s, at 1 ~450 (docs/decoding.md).
PNG_LEVEL = 1
#: Frames waiting for the PNG writer's threads, per thread: bounded, so a fast decoder cannot fill the memory.
PNG_QUEUE_PER_THREAD = 2
#: Video encoders of the frame writer: "auto" (NVENC where the GPU and the PyAV build offer it, else the CPU
#: encoder, saying so), "cpu" (libx264 / libvpx-vp9), "nvenc" (NVENC or an error).
VIDEO_ENCODERS = ("auto", "cpu", "nvenc")

#: Decoder numerics. "ours": fp16 networks at the segment batch, uint8 by rounding (the
#: default: faster, and the closer approximation of the float image). "release": the public
#: release's generation script (fp32 weights under CUDA autocast, one frame per UNet call,
#: uint8 by truncation in fp16), to reproduce its published frames.
PARITY_OURS = "ours"
PARITY_RELEASE = "release"
PARITIES = (PARITY_OURS, PARITY_RELEASE)

#: Encoding schedules (promptus/encoding_schedules.py). "published": random start, fixed counts, as
#: released. "fast": keyframe k starts from keyframe k−1's transmitted factors and stops on a plateau.
SCHEDULE_PUBLISHED = "published"
SCHEDULE_FAST = "fast"
SCHEDULES = (SCHEDULE_PUBLISHED, SCHEDULE_FAST)
#: TrainConfig fields that only the fast schedule reads.
FAST_SCHEDULE_FIELDS = ("min_iters_first", "min_iters", "plateau_window_first", "plateau_window",
                        "plateau_tolerance", "warm_lr")

#: Folder of the artifact cache: TensorRT engines, compiled decoder and trainer steps
#: (promptus.backends.artifact_cache; ``promptus engines``).
DEFAULT_ENGINE_DIR = "engines"


@dataclass(frozen=True)
class TrainConfig:
    """Settings of the inversion trainer (docs/design.md, "The method"); the published defaults.

    Attributes:
        iters_first, iters: Adam iterations for keyframe 0 and for each later keyframe.
        lr, lr_floor: initial learning rate, halved on plateau down to ``lr_floor``.
        patience_first, patience: iterations without a new best loss before halving.
        mse_weight, perceptual_weight, reg_weight: loss = 0.8·MSE + 0.2·VGG + 0.1·mean|c|.
        worst_weight: weight of the segment's worst frame in the next iteration (the
            published loop trains it three times per iteration).
        perceptual: use the VGG-19 perceptual term (off: lower quality, no VGG weights needed).
        init_latent: "vae" (SD VAE encoder, published) or "taesd" (cheaper substitute).
        init_precision: how the init latent is stored: fp32, fp16 or int8.
        seed: seed of the factors' uniform initialisation (keyframe k uses seed + k).
        max_memory: memory budget of a training step: bytes (or a size such as
            "12GB", "11.5GiB"), "auto" (the GPU's free memory; no limit on the CPU) or
            "none"; the encoder picks the fastest memory plan that fits
            (:mod:`promptus.memory`). Execution only: results are the same up to
            floating-point rounding.
        compile: torch.compile mode of the training step, or "off" (eager). Execution
            only, like ``max_memory``; off by default because compiled kernels round
            differently from eager ones.
        schedule: "published" (random start, ``iters_first``/``iters`` iterations) or
            "fast" (warm start from the previous keyframe's transmitted factors, stop on a
            plateau; ``iters_first``/``iters`` are then the maxima); docs/encoding-schedules.md.
        min_iters_first, min_iters: fast: iterations before a plateau may stop keyframe 0 / later ones.
        plateau_window_first, plateau_window: fast: a keyframe stops when its last window of
            iterations improved the best loss by at most ``plateau_tolerance`` of it.
        warm_lr: fast: starting learning rate of a warm-started keyframe (docs/encoding-schedules.md).
    """

    iters_first: int = 10_000
    iters: int = 1_500
    lr: float = 0.1
    lr_floor: float = 0.001
    patience_first: int = 300
    patience: int = 20
    mse_weight: float = 0.8
    perceptual_weight: float = 0.2
    reg_weight: float = 0.1
    worst_weight: float = 3.0
    perceptual: bool = True
    init_latent: str = "vae"
    init_precision: str = "fp16"
    seed: int = 0
    max_memory: int | str = "auto"
    compile: str = "off"
    schedule: str = SCHEDULE_PUBLISHED
    min_iters_first: int = 1_000
    min_iters: int = 100
    plateau_window_first: int = 300
    plateau_window: int = 50
    plateau_tolerance: float = 1e-3
    warm_lr: float = 0.1

    #: Settings that change how training runs, not what it computes (a resumed run may change them).
    EXECUTION = ("max_memory", "compile")

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_memory", parse_memory(self.max_memory))
        if self.compile not in COMPILE_MODES:
            raise PromptusError(f"compile={self.compile!r}: choose one of {', '.join(COMPILE_MODES)}")
        if self.schedule not in SCHEDULES:
            raise PromptusError(f"schedule={self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        for name in ("iters_first", "iters", "patience_first", "patience", "min_iters_first", "min_iters",
                     "plateau_window_first", "plateau_window"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise PromptusError(f"{name}={v!r} must be an integer ≥ 1")
        if not (0 < self.lr_floor <= self.lr):
            raise PromptusError(f"learning rates must satisfy 0 < lr_floor ≤ lr, got lr={self.lr}, lr_floor={self.lr_floor}")
        if self.init_latent not in INIT_LATENT_SOURCES:
            raise PromptusError(f"init_latent={self.init_latent!r}: choose {' or '.join(INIT_LATENT_SOURCES)}")
        if self.init_precision not in INIT_PRECISIONS:
            raise PromptusError(f"init_precision={self.init_precision!r}: choose one of {', '.join(INIT_PRECISIONS)}")
        if not (0 <= self.plateau_tolerance < 1):
            raise PromptusError(f"plateau_tolerance={self.plateau_tolerance!r} must lie in [0, 1)")
        if not (self.lr_floor <= self.warm_lr):
            raise PromptusError(f"warm_lr={self.warm_lr!r} must be at least lr_floor={self.lr_floor!r}")
        if self.worst_weight < 1:
            raise PromptusError(f"worst_weight={self.worst_weight!r} must be ≥ 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def result_dict(self) -> dict[str, Any]:
        """The settings that determine the result (all but :attr:`EXECUTION`).

        The published schedule reads none of the schedule fields: they are left out, so
        its checkpoints and sweep points match those made before schedules existed.
        """
        skip = set(self.EXECUTION)
        if self.schedule == SCHEDULE_PUBLISHED:
            skip |= {"schedule", *FAST_SCHEDULE_FIELDS}
        return {k: v for k, v in self.to_dict().items() if k not in skip}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return cls(**d)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


#: Environment variable that sets the torch threads of CPU work, as ``--threads`` does.
THREADS_ENV = "PROMPTUS_THREADS"
#: Torch threads of CPU work per model name when neither ``--threads``, $PROMPTUS_THREADS nor
#: $OMP_NUM_THREADS says; models not listed keep torch's default (one per core). The tiny
#: model's layers are too small for a second thread to pay: on a loaded 2-core machine one thread
#: encoded 17× and decoded 10× faster than two (benchmarks/cpu_threads.py, cpu_threads_2core.json).
#: The full-size model keeps one per core: its layers use every core of an idle machine (one thread
#: won there too, 2.8×, but at a load average of 10; PROMPTUS_THREADS=1 on a busy machine).
CPU_THREADS = {"tiny": 1}

#: Encoder settings on a CPU where the command line gives none of --size/--iters-first/--iters:
#: the published 512 px and 10 000/1 500 iterations take hours there (the demo's quick run).
CPU_ITERS_FIRST, CPU_ITERS = 150, 40
#: Frame size of the tiny model on a CPU (it cannot reconstruct real images; small is enough).
TINY_SIZE = 128
#: A CPU encode projected to take longer than this many seconds is announced with a warning.
SLOW_ENCODE_WARNING_S = 600


#: Names of the built-in models with random weights: their pictures say nothing about real quality.
RANDOM_WEIGHT_MODELS = ("tiny", "sd-turbo-random")


#: Bytes of a model digest (:class:`ModelIdentity`; the bitstream header stores it as is).
MODEL_DIGEST_SIZE = 16
#: Longest model name, in UTF-8 bytes (the header stores its length as a u16).
MODEL_NAME_MAX_BYTES = 0xFFFF


@dataclass(frozen=True)
class ModelIdentity:
    """Which model weights the prompts were optimised for: a name and a 16-byte digest."""

    name: str
    digest: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise PromptusError(f"model name must be a string, got {type(self.name).__name__}")
        try:
            n = len(self.name.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise PromptusError(f"model name {self.name!r} is not valid text: {e}") from None
        if n > MODEL_NAME_MAX_BYTES:
            raise PromptusError(f"model name is {n} bytes long; the format stores at most {MODEL_NAME_MAX_BYTES}")
        if not isinstance(self.digest, bytes) or len(self.digest) != MODEL_DIGEST_SIZE:
            raise PromptusError(f"model digest must be {MODEL_DIGEST_SIZE} bytes, got {self.digest!r:.60}")

    @classmethod
    def unknown(cls) -> "ModelIdentity":
        """Name "unknown" and an all-zero digest: decoders will not check the model."""
        return cls("unknown", bytes(MODEL_DIGEST_SIZE))

    @property
    def hexdigest(self) -> str:
        return self.digest.hex()


@dataclass(frozen=True)
class ServerConfig:
    """Bounds of ``promptus serve`` (the streaming server) and the defaults of its options.

    A server in front of strangers must stay healthy whatever a client sends or fails
    to read: every per-client resource is bounded here (docs/security.md).

    Attributes:
        max_clients: open WebSockets and WebRTC sessions together (``--max-clients``).
        headroom: share of the measured decoding capacity admission control promises (``--headroom``).
        recalibrate_idle_s: with no stream open, the device is measured again after this many
            seconds without a measurement (capacity measured under load recovers).
        send_timeout_s: a send blocked this long (a client that does not read) drops the client.
        max_queued_bytes: bytes waiting in one client's send buffer before sends wait for it to read.
        max_control_bytes: largest client → server WebSocket message.
        max_messages_per_s, message_burst: a client's control messages per second (token
            bucket of ``message_burst``); a client over it is closed with 1008.
        max_json_depth: nesting of any JSON a client sends (control messages, WebRTC offers).
        max_offer_bytes: largest WebRTC offer request body.
        max_file_bytes: largest .promptus file the server parses.
        jpeg_quality: quality of the frames of /ws/view.
        webrtc_connect_timeout_s: a WebRTC session not connected by then is closed.
        close_timeout_s: a closing handshake the client does not answer within this is cut.
        shutdown_timeout_s: on Ctrl-C or SIGTERM, connections still open after this are cut (an open
            page keeps one open forever) and the server shuts down, removing the Studio's files.
        ice_servers: STUN/TURN URLs for WebRTC across NATs (none: host candidates only).
        webrtc_loopback: WebRTC media on 127.0.0.1 only (``--webrtc-loopback``; tests keep it on).
    """

    max_clients: int = 64
    headroom: float = 0.9
    recalibrate_idle_s: float = 30.0
    send_timeout_s: float = 5.0
    max_queued_bytes: int = 1 << 20
    max_control_bytes: int = 4096
    max_messages_per_s: float = 20.0
    message_burst: int = 40
    max_json_depth: int = 8
    max_offer_bytes: int = 256 << 10
    max_file_bytes: int = 256 << 20
    jpeg_quality: int = 85
    webrtc_connect_timeout_s: float = 20.0
    close_timeout_s: float = 2.0
    shutdown_timeout_s: float = 5.0
    ice_servers: tuple[str, ...] = ()
    webrtc_loopback: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_clients, int) or self.max_clients < 1:
            raise PromptusError(f"max_clients={self.max_clients!r} must be an integer ≥ 1")
        if not 0 < self.headroom <= 1:
            raise PromptusError(f"headroom={self.headroom!r} must lie in (0, 1]")
        for name in ("recalibrate_idle_s", "send_timeout_s", "max_messages_per_s", "webrtc_connect_timeout_s",
                     "close_timeout_s", "shutdown_timeout_s"):
            if not getattr(self, name) > 0:
                raise PromptusError(f"{name}={getattr(self, name)!r} must be positive")
        for name in ("max_queued_bytes", "max_control_bytes", "message_burst", "max_json_depth", "max_offer_bytes",
                     "max_file_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise PromptusError(f"{name}={v!r} must be an integer ≥ 1")

    def replace(self, **changes: Any) -> "ServerConfig":
        return dataclasses.replace(self, **changes)
