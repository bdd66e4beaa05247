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
    add("--perceptual", "VGG-19 perceptual loss; off needs no VGG weights but gives lower quality",
        choices=["on", "off"], default="on" if train.perceptual else "off")
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
    return TrainConfig(iters_first=args.iters_first, iters=args.iters, perceptual=args.perceptual == "on",
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


def cpu_threads(models, device) -> None:
    """One torch thread for the tiny model on the CPU, until the command ends: its layers are so small that a
    second thread's synchronisation costs more than it saves (measured: 20× the CPU time on a loaded 2-core
    machine). Only the demo, which encodes and decodes in one process, uses it: CPU results depend on the
    thread count, and decode/encode must give the bytes the library gives in the same process."""
    import torch

    if models.name == "tiny" and torch.device(device).type == "cpu" and torch.get_num_threads() != 1:
        log.debug("tiny model on the CPU: 1 torch thread")
        _restore_threads.append(torch.get_num_threads())
        torch.set_num_threads(1)


# Thread counts that cpu_threads changed, put back when the command ends (commands also run inside other programs).
_restore_threads: list[int] = []


def setup_logging(args) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="promptus: %(message)s")


def run_command(prog: str, func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run ``func(args)`` as a command: user errors and Ctrl-C become messages and exit codes.

    What input or the machine can cause — a :class:`PromptusError`, or an ``OSError``
    (a full disk, a permission, a vanished file) — becomes ``PROG: error: …`` and exit
    status 1. Anything else is a bug in promptus and keeps its traceback.
    """
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
        if _restore_threads:
            import torch

            torch.set_num_threads(_restore_threads[0])
            _restore_threads.clear()
