"""``promptus decode``: regenerate the frames of a .promptus file."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from ..backends import backend_names
from ..config import DEFAULT_ENGINE_DIR, PARITIES, PARITY_OURS, PARITY_RELEASE, PNG_LEVEL, VIDEO_ENCODERS
from ..errors import BitstreamError, PromptusError
from ..video import VIDEO_OUTPUTS
from .common import add_model_args, add_threads_arg, model_for_header, use_threads

log = logging.getLogger("promptus")


def register(subparsers) -> None:
    d = subparsers.add_parser("decode", help="regenerate the frames of a .promptus file",
                              description="Regenerate every frame of a .promptus bitstream with SD-Turbo + TAESD.")
    d.add_argument("file", nargs="+",
                   help="the .promptus file; several are decoded one after another in this process, the models "
                        "and the compiled step loaded once (each to -o FOLDER/<name> as --each says)")
    d.add_argument("-o", "--output", required=True,
                   help=f"output: a video file ({', '.join(VIDEO_OUTPUTS)}) or a folder for PNG frames (a path "
                        "ending in /, or an existing folder); with several files, the folder that receives them")
    d.add_argument("--each", default="/", metavar="SUFFIX",
                   help=f"with several files, what each becomes in the -o folder: / for a folder of PNG frames "
                        f"(default), or a video suffix ({', '.join(VIDEO_OUTPUTS)})")
    add_model_args(d, default_model="auto", auto_help="the model the file's header names when it is built in "
                                                       "(tiny), else checkpoints/sd_turbo.safetensors or "
                                                       "checkpoints/sd-turbo")
    add_threads_arg(d)
    d.add_argument("--backend", default="auto", choices=backend_names(auto=True),
                   help=f"network backend, one of {', '.join(backend_names(auto=True))}: auto takes tensorrt where "
                        "it can run, else compile on CUDA, else torch (default: auto)")
    d.add_argument("--engine-dir", default=DEFAULT_ENGINE_DIR,
                   help=f"TensorRT engine cache (default: {DEFAULT_ENGINE_DIR}/)")
    d.add_argument("--parity", default=PARITY_OURS, choices=PARITIES,
                   help="numerics: 'ours' (fp16, a segment per UNet call, uint8 by rounding) or 'release' (the "
                        "public release's generation.py: fp32 weights under CUDA autocast, one frame per call, "
                        f"uint8 by truncation; about 10x slower) (default: {PARITY_OURS})")
    d.add_argument("--allow-partial", action="store_true",
                   help="on a truncated or corrupted file, keep the frames decoded before the damage")
    d.add_argument("--png-level", type=int, default=PNG_LEVEL, choices=range(10), metavar="0-9",
                   help=f"zlib level of PNG frames: 1 writes ~5x faster than 6, files ~20%% larger, same pixels "
                        f"(default: {PNG_LEVEL}; 6 for smaller files)")
    d.add_argument("--video-encoder", default="auto", choices=VIDEO_ENCODERS,
                   help="video encoder: auto takes NVENC where the GPU and the PyAV build offer it, else the CPU "
                        "encoder (libx264, or libvpx-vp9 for .webm), saying so (default: auto)")
    d.add_argument("--profile-start", action="store_true",
                   help="print where the start-up time went: model file read, weights to GPU, compiled-step load, "
                        "first segment")
    d.add_argument("--profile-json", default=None, help=argparse.SUPPRESS)  # the bench's command path reads it
    d.add_argument("--force", action="store_true",
                   help="write into an output folder that already holds files: only the frame files written "
                        "(00000.png, ...) replace their namesakes; nothing else in it is touched or deleted")
    d.set_defaults(func=run)


def output_kind_of_argument(output: str) -> str:
    """``"video"`` or ``"folder"`` for ``-o``, checked to be writable; a folder only when asked for one.

    Unlike the library's :func:`promptus.video.output_kind`, a new name without a suffix is
    refused: ``-o clip`` is more likely a forgotten ``.mp4`` than a wish for a PNG folder.
    """
    from ..video import check_frames_output

    text = str(output)
    if not (Path(text).suffix or text.endswith(("/", os.sep)) or Path(text).is_dir()):
        raise PromptusError(f"-o {text}: add a video suffix ({', '.join(VIDEO_OUTPUTS)}) for a video file, or end "
                            "it with / for a folder of PNG frames")
    return check_frames_output(text)


def _outputs(args: argparse.Namespace) -> list[tuple[Path, str]]:
    """(input, output) per file: ``-o`` itself for one file; ``-o FOLDER/<stem><--each>`` for several."""
    files = [Path(f) for f in args.file]
    if len(files) == 1:
        return [(files[0], args.output)]
    each = str(args.each)
    if each != "/" and each.lower() not in VIDEO_OUTPUTS:
        raise PromptusError(f"--each {each}: use / (a folder of PNG frames per file) or a video suffix "
                            f"({', '.join(VIDEO_OUTPUTS)})")
    folder = Path(args.output)
    if folder.exists() and not folder.is_dir():
        raise PromptusError(f"-o {args.output}: with {len(files)} files, -o names the folder that receives them, "
                            "and this is a file")
    if args.profile_json:
        raise PromptusError("--profile-json takes one file")
    names: dict[str, Path] = {}
    for f in files:
        if f.stem in ("", ".", ".."):
            raise PromptusError(f"{f}: its name gives no output name in {folder}; rename it (e.g. clip.promptus)")
        if f.stem in names:
            raise PromptusError(f"{names[f.stem]} and {f} would both be written to {folder / f.stem}{each}: "
                                "decode them in two commands, to two folders")
        names[f.stem] = f
    folder.mkdir(parents=True, exist_ok=True)
    return [(f, str(folder / f.stem) + each) for f in files]


def run(args: argparse.Namespace) -> int:
    from ..startup import StartupProfile

    profile = StartupProfile()  # the clock of --profile-start: from the process's start
    jobs = _outputs(args)
    if len(jobs) == 1:
        return _decode_one(args, jobs[0][0], jobs[0][1], profile)
    failed = []
    for i, (src, output) in enumerate(jobs):
        try:
            _decode_one(args, src, output, profile if i == 0 else StartupProfile(from_now=True))
        except (PromptusError, OSError) as e:  # the next file still runs; the exit status says one failed
            where = f"{e.filename}: " if isinstance(e, OSError) and e.filename else ""
            message = f"{where}{getattr(e, 'strerror', None) or e}"
            named = message if message.startswith(str(src)) else f"{src}: {message}"  # the file named once
            print(f"promptus: error: {named}", file=sys.stderr)
            failed.append(str(src))
    print(f"decoded {len(jobs) - len(failed)} of {len(jobs)} files into {args.output}"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def _decode_one(args: argparse.Namespace, src: Path, output: str, profile) -> int:
    import torch
    from tqdm import tqdm

    from ..backends import clip_batch, default_dtype, resolve_device
    from ..bitstream import Header, iter_records
    from ..decoder import Decoder
    from ..files import write_json_atomic
    from ..pipeline import PipelinedDecoder
    from ..startup import load_decoder, warm_device
    from ..video import FrameWriter, main_reimport_safe

    profile.mark("command started")

    if not src.is_file():  # also refuses FIFOs and devices, which would block or never end
        raise PromptusError(f"{src} does not exist or is not a file")
    kind = output_kind_of_argument(output)  # before any work: a wrong -o fails in a second, not after
    device = resolve_device(args.device)
    # The release keeps fp32 weights (under autocast); our default loads them in fp16 on CUDA.
    dtype = torch.float32 if args.parity == PARITY_RELEASE else default_dtype(device)
    with open(src, "rb") as f:
        records = iter_records(f)
        header = next(records)  # the header first: it gives the fps, frame count and batch
        assert isinstance(header, Header)
        profile.mark("header read")
        # The output is checked before models load: a refusal costs nothing.
        args.model = model_for_header(args, header, "decode")
        writer = FrameWriter(output, header.fps, force=args.force, size=(header.width, header.height), kind=kind,
                             png_level=args.png_level, video_encoder=args.video_encoder,
                             png_processes=main_reimport_safe())  # worker processes, unless that is unsafe
        profile.mark("output checked, writer started")
        # The CUDA context and cuBLAS/cuDNN's first calls, beside the load (started once header and output are
        # known good, so a refused command never touches the GPU).
        warming = warm_device(device, dtype, profile)
        try:
            batch = clip_batch(header)
            t_load = time.perf_counter()
            loaded = load_decoder(args.model, header, device=device, dtype=dtype, backend=args.backend,
                                  taesd=args.taesd, checkpoints_dir=args.checkpoints, engine_dir=args.engine_dir,
                                  parity=args.parity, offload_models=True, profile=profile)  # checks the geometry
            log.info("loaded model %r and the %s backend on %s in %.1f s", loaded.models.name, args.backend, device,
                     time.perf_counter() - t_load)
            profile.mark("models and backend loaded")
            backend, identity = loaded.backend, loaded.identity
            use_threads(args, loaded.models.name, device)
        except BaseException:
            writer.abort()
            if warming is not None:  # not left running into the interpreter's exit
                warming.join()
            raise
        decoder = PipelinedDecoder(Decoder(backend, identity, parity=args.parity, max_batch=batch), to_host=True)
        log.info("decoding %s with %s, parity %s", src, backend.describe(), args.parity)

        def items():
            yield header
            yield from records

        t0 = time.perf_counter()
        bar = tqdm(total=header.frame_count, unit="frame", desc="decode", disable=args.quiet)

        def sink(start, frames):
            profile.mark("first segment on the host")
            writer.write_batch(frames)
            profile.mark("first segment handed to the writer")
            bar.update(frames.shape[0])

        try:
            try:
                decoder.run(items(), sink)
            except BitstreamError as e:
                if not args.allow_partial and e.partial is not None and e.partial.keyframes:
                    raise BitstreamError(f"{e} Run again with --allow-partial to keep the frames decoded before "
                                         "the damage.", record=e.record, partial=e.partial) from None
                if not args.allow_partial or writer.count == 0:
                    raise
                log.warning("%s\nkeeping the %d frames decoded before the damage (--allow-partial)", e, writer.count)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            bar.close()
    dt = time.perf_counter() - t0
    profile.mark("output complete")
    print(f"wrote {writer.count} frames to {output} in {dt:.1f} s ({writer.count / dt:.1f} frame/s, "
          f"{backend.describe()}, parity {args.parity})")
    if args.profile_start:
        print(profile.format())
    if args.profile_json:
        write_json_atomic(args.profile_json, {**profile.as_dict(), "frames": writer.count, "decode_s": dt,
                                              "backend": backend.describe()})
    return 0
