"""What several commands share: model, verbosity and encoder options, model loading, running a command."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..config import COMPILE_MODES, INIT_LATENT_SOURCES, INIT_PRECISIONS, SCHEDULES, CodecConfig, TrainConfig
from ..errors import PromptusError

log = logging.getLogger("promptus")

AUTO_MODEL_HELP = "checkpoints/sd_turbo.safetensors or checkpoints/sd-turbo if present"
MODEL_HELP = (
    "model weights: 'auto' ({auto}), "
    "'tiny' (built-in random-weight test model), a single .safetensors/.ckpt file, a diffusers folder, "
    "or a hub id such as stabilityai/sd-turbo (needs internet)"
)
#: Models built into promptus, by the name a bitstream header records: the --model value that loads each.
#: (The random full-size model's weights differ between CPU and CUDA: the decoder's digest check says so.)
BUILT_IN_MODELS = {"tiny": "tiny", "sd-turbo-random": "random"}


def add_model_args(p: argparse.ArgumentParser, default_model: str = "auto", *, auto_help: str = AUTO_MODEL_HELP
                   ) -> None:
    """--model, --taesd, --device and --checkpoints; ``auto_help`` says what 'auto' means for this command."""
    p.add_argument("--model", default=default_model,
                   help=MODEL_HELP.format(auto=auto_help) + f" (default: {default_model})")
    p.add_argument("--taesd", default=None,
                   help="TAESD weights: a diffusers folder or hub id (default: checkpoints/taesd, or madebyollin/taesd when online)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    p.add_argument("--checkpoints", default="checkpoints", help="folder searched by --model auto (default: checkpoints)")


def add_verbosity_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="print debug messages")
    p.add_argument("-q", "--quiet", action="store_true", help="print only results and errors")


def add_encode_args(p: argparse.ArgumentParser, *, rate: bool = True,
                    defaults: Mapping[str, tuple[Any, str]] | None = None) -> None:
    """The encoder's options (shared by ``encode``, ``demo``, ``sweep`` and the scripts).

    Defaults come from :class:`CodecConfig` and :class:`TrainConfig`. ``defaults`` maps an
    option's dest to ``(value, note)``: a command whose defaults differ (the demo, a sweep
    preset) passes the value it stores and the note its help shows instead of
    ``default: …``, so that ``--help`` states the values the command really uses.
    """
    codec, train = CodecConfig(), TrainConfig()
    defaults = dict(defaults or {})

    def opt(dest: str, value: Any, note: str | None = None) -> dict[str, Any]:
        value, note = defaults.pop(dest, (value, note or f"default: {value}"))
        return {"default": value, "note": note}

    def add(flag: str, help: str, **kw) -> None:
        d = opt(flag.lstrip("-").replace("-", "_"), kw.pop("default"), kw.pop("note", None))
        p.add_argument(flag, default=d["default"], help=f"{help} ({d['note']})", **kw)

    if rate:
        add("--rank", "prompt rank r: sets the bitrate", type=int, default=codec.rank)
        add("--interval", "keyframe interval T", type=int, default=codec.interval)
    add("--size", f"frame size in pixels, a multiple of {codec.latent_factor}", type=int, default=codec.width)
    add("--fps", "frame rate", type=float, default=None, note=f"default: the video's, else {codec.fps:g}")
    add("--iters-first", "iterations for keyframe 0", type=int, default=train.iters_first,
        note=f"default: {train.iters_first}, as published")
    add("--iters", "iterations for each later keyframe", type=int, default=train.iters,
        note=f"default: {train.iters}, as published")
    add("--schedule", "encoding schedule: 'published' starts every keyframe from random factors and runs the "
        "iteration counts above; 'fast' starts keyframe k from keyframe k-1's transmitted factors and stops each "
        "keyframe when its loss stops improving (the counts above become maxima); see docs/encoding-schedules.md",
        choices=SCHEDULES, default=train.schedule)
    add("--max-frames", "encode only the first N frames", type=int, default=None, note="default: all")
    add("--init-latent", "init latent from the SD VAE encoder (published) or TAESD's (cheaper)",
        choices=INIT_LATENT_SOURCES, default=train.init_latent)
    add("--init-precision", "storage of the init latent", choices=INIT_PRECISIONS, default=train.init_precision)
    add("--perceptual", "VGG-19 perceptual loss; off needs no VGG weights but gives lower quality; auto: on when "
        "the weights are found, else off with a note", choices=["auto", "on", "off"],
        default="on" if train.perceptual else "off")
    p.add_argument("--vgg", default=None, help="local VGG-19 weights (torchvision's vgg19-dcbb9e9d.pth)")
    add("--seed", "latent noise seed", type=int, default=codec.seed, note=f"default: {codec.seed}, as published")
    add("--max-memory", "memory budget of a training step: a size such as 12GB or 11.5GiB (GB = 10^9 bytes, "
        "GiB = 2^30), 'auto' (90%% of the GPU's free memory; no limit on the CPU) or 'none'; the fastest memory "
        "plan that fits is chosen and logged", default=train.max_memory, metavar="SIZE")
    add("--compile-step", "torch.compile the training step; reduce-overhead adds CUDA graphs. Faster after a "
        "compilation of a minute or two; rounds slightly differently from eager", choices=COMPILE_MODES,
        default=train.compile)
    assert not defaults, f"unknown encoder options {sorted(defaults)}"


def codec_from_args(args, fps: float = CodecConfig.fps, **changes) -> CodecConfig:
    """The codec settings of the encoder options (``--rank``/``--interval`` where the parser has them)."""
    values = dict(width=args.size, height=args.size, fps=fps, seed=args.seed)
    for name in ("rank", "interval"):
        if hasattr(args, name):
            values[name] = getattr(args, name)
    values.update(changes)
    return CodecConfig(**values)


def train_from_args(args) -> TrainConfig:
    """The trainer settings of the encoder options."""
    return TrainConfig(iters_first=args.iters_first, iters=args.iters, perceptual=args.perceptual != "off",
                       init_latent=args.init_latent, init_precision=args.init_precision,
                       max_memory=args.max_memory, compile=args.compile_step, schedule=args.schedule)


def load_models(args, device, *, need_vae: bool = False, dtype=None):
    """The models named by ``--model``/``--taesd``/``--checkpoints`` on ``device``, in ``dtype``
    (default: the decoder's precision)."""
    from ..backends import default_dtype
    from ..models import load_models as load

    t0 = time.perf_counter()
    models = load(args.model, device=device, dtype=dtype or default_dtype(device), taesd=args.taesd, vae=need_vae,
                  checkpoints_dir=args.checkpoints)
    log.info("loaded model %r on %s in %.1f s", models.name, device, time.perf_counter() - t0)
    return models


def model_for_header(args, header, command: str) -> str:
    """The ``--model`` for a file: with ``--model auto``, the built-in model its header names, saying so."""
    name = header.model.name
    if args.model != "auto" or name not in BUILT_IN_MODELS:
        return args.model
    log.info("%s: the file was made with the built-in %s model; using it (--model chooses other weights)",
             command, name)
    return BUILT_IN_MODELS[name]


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads for CPU work (default: $PROMPTUS_THREADS, else $OMP_NUM_THREADS, else the "
                        "fastest measured: 1 for the tiny model, one per core otherwise). CPU results are the same "
                        "bytes only for the same thread count: decode with the count you encoded with")


def use_threads(args, model_name: str, device) -> None:
    """Set torch's thread count for this command (``--threads``, the environment or the model's measured
    best: :func:`promptus.threads.cpu_thread_count`), until the command ends."""
    import torch

    from ..threads import cpu_thread_count

    requested = getattr(args, "threads", None)
    if requested is None and torch.device(device).type != "cpu":
        return  # a GPU does the work; torch's default is fine for the host side
    n, why = cpu_thread_count(model_name, requested)
    if n is None or n == torch.get_num_threads():
        log.debug("%d torch thread(s): %s", torch.get_num_threads(), why)
        return
    log.debug("%d torch thread(s): %s", n, why)
    if not _restore_threads:
        _restore_threads.append(torch.get_num_threads())
    torch.set_num_threads(n)


# The thread count before use_threads changed it, put back when the command ends (commands also run inside
# other programs).
_restore_threads: list[int] = []


def resolve_perceptual(args, command: str) -> None:
    """``--perceptual auto`` (the default): on when VGG-19 weights can be had, else off, saying so — before any
    model loads. An explicit ``on`` keeps the error that says where to get the weights."""
    if args.perceptual != "auto":
        return
    from ..losses import vgg19_weights_available

    if args.vgg is not None or vgg19_weights_available():
        args.perceptual = "on"
    else:
        print(f"{command}: no VGG-19 weights here — perceptual loss off (lower quality; pass --vgg PATH or "
              "--perceptual on to use it)", flush=True)
        args.perceptual = "off"


def resolve_encoder_defaults(args, device, model_name: str, command: str) -> None:
    """Fill in --size/--iters-first/--iters left unset: the published values, or on a CPU the quick ones
    (:data:`promptus.config.CPU_ITERS_FIRST`, …), saying so."""
    import torch

    from ..config import CPU_ITERS, CPU_ITERS_FIRST, TINY_SIZE

    cpu = torch.device(device).type == "cpu"
    published = {"size": CodecConfig.width, "iters_first": TrainConfig.iters_first, "iters": TrainConfig.iters}
    quick = {"size": TINY_SIZE if model_name == "tiny" else CodecConfig.width, "iters_first": CPU_ITERS_FIRST,
             "iters": CPU_ITERS}
    chosen = []
    for name, value in (quick if cpu else published).items():
        if getattr(args, name, 0) is None:
            setattr(args, name, value)
            if value != published[name]:
                chosen.append(f"--{name.replace('_', '-')} {value}")
    if chosen:
        print(f"{command}: on the CPU, a quick run: {' '.join(chosen)} (the published {CodecConfig.width} px and "
              f"{TrainConfig.iters_first}/{TrainConfig.iters} iterations take hours here; pass them to change)",
              flush=True)


class EncodeForecast:
    """An encoder callback that times the first iterations and warns when the whole encode is projected to take
    longer than :data:`promptus.config.SLOW_ENCODE_WARNING_S`.

    Keyframe 0 trains one frame per iteration, every later keyframe a segment of up to T frames. After a few
    timed iterations of keyframe 0 (``t₀`` each) the encode takes at least ``t₀ · (iters_first + iters · (K − 1))``
    (a segment's iteration costs no less than one frame's): when even that is too long, it warns at once. Else it
    times keyframe 1's iterations (``t₁``) and projects ``elapsed + t₁ · (iterations left)``.
    """

    WARMUP, TIMED = 3, 5  # the first iterations allocate and warm caches; the next five are timed

    def __init__(self, codec: CodecConfig, train: TrainConfig, frame_count: int, command: str,
                 limit_s: float | None = None):
        from ..config import SLOW_ENCODE_WARNING_S

        self.codec, self.train, self.frames, self.command = codec, train, frame_count, command
        self.later = codec.keyframe_count(frame_count) - 1 if frame_count > 0 else 0  # keyframes after 0
        self.limit_s = SLOW_ENCODE_WARNING_S if limit_s is None else limit_s
        self._start: float | None = None
        self._t0: float | None = None
        self.projected_s: float | None = None  # the last projection
        self.warned = False

    def __call__(self, m: dict) -> None:
        k, it = m["keyframe"], m["iteration"]
        if self.warned or k > 1 or (k == 1 and self.later == 0):
            return
        now = time.perf_counter()
        if self._start is None:
            self._start = now
        if it == self.WARMUP - 1:
            self._t0 = now
        elif it == self.WARMUP + self.TIMED - 1 and self._t0 is not None:
            per = (now - self._t0) / self.TIMED
            if k == 0:  # a lower bound: later iterations train whole segments
                self.projected_s = per * (self.train.iters_first + self.train.iters * self.later)
                what = f"{per:.2f} s per iteration of keyframe 0"
            else:
                left = self.train.iters * self.later - (it + 1)
                self.projected_s = (now - self._start) + per * left
                what = f"{per:.2f} s per iteration of a {self.codec.interval}-frame segment"
            if self.projected_s > self.limit_s:
                self.warned = True
                log.warning(
                    "%s: this encode is projected to take %s%s (%s; %d iterations for keyframe 0, %d for each of "
                    "%d later keyframes). For a quick run use fewer --iters-first/--iters or a smaller --size; "
                    "Ctrl-C keeps the finished keyframes and --resume continues", self.command,
                    "at least " if k == 0 else "about ", describe_duration(self.projected_s), what,
                    self.train.iters_first, self.train.iters, self.later)


def describe_duration(seconds: float) -> str:
    """``"3 h 12 min"``, ``"14 min"``, ``"45 s"``."""
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h} h {m} min"
    return f"{m} min" if m >= 10 or (m and not s) else f"{m} min {s} s" if m else f"{s} s"


def honour_ctrl_c() -> None:
    """Make Ctrl-C (SIGINT) stop a server however it was started: a shell script's ``cmd &`` starts it with
    SIGINT ignored, which Python keeps, and a server would then only stop on SIGTERM or SIGKILL."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        log.debug("SIGINT was ignored (started in the background): Ctrl-C stops the server again")
        signal.signal(signal.SIGINT, signal.default_int_handler)


class _Prefix(logging.Formatter):
    """``promptus: message`` for our loggers; other libraries' messages keep their own name."""

    def format(self, record: logging.LogRecord) -> str:
        name = "promptus" if record.name.split(".")[0] == "promptus" else record.name
        return f"{name}: {super().format(record)}"


def setup_logging(args) -> None:
    """Our messages at the chosen level; other libraries' (matplotlib, aiortc, …) only from warnings on, unless
    --verbose."""
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:
            handler.setFormatter(_Prefix("%(message)s"))
    logging.getLogger("promptus").setLevel(level)


def run_command(prog: str, func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run ``func(args)`` as a command: user errors and Ctrl-C become messages and exit codes.

    What input or the machine can cause — a :class:`PromptusError`, or an ``OSError``
    (a full disk, a permission, a vanished file) — becomes ``PROG: error: …`` and exit
    status 1. Anything else is a bug in promptus and keeps its traceback.
    """
    ours = logging.getLogger("promptus")
    level_before = ours.level
    setup_logging(args)
    try:
        return func(args)
    except PromptusError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"{prog}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (long jobs resume: run the same command again, with --resume for encode)",
              file=sys.stderr)
        return 130
    finally:
        ours.setLevel(level_before)  # commands also run inside other programs (and tests)
        if _restore_threads:
            import torch

            torch.set_num_threads(_restore_threads[0])
            _restore_threads.clear()
