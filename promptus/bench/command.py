"""The command path: ``promptus decode`` timed as a user runs it (``promptus bench --command-path``).

Each measurement is a fresh ``python -m promptus decode`` process decoding a clip of
random prompts to a PNG folder (zlib level 1, the default, and ``png6``: ``--png-level 6``),
an .mp4 or a .webm, with weights read from a file:

* ``--model random``: the full-size SD-Turbo UNet and TAESD with random weights, saved
  once as single .safetensors files (fp32, diffusers keys; SD-Turbo ships one fp32 file)
  in a cache folder outside the repository (:func:`bench_weights_dir`), so that the
  start-up reads, moves and fingerprints as many bytes as real weights need;
* ``tiny`` (the CPU check) is made in code; any other value is passed to ``--model``.

First an untimed "cold" decode fills the engine folder (the compiled step is built and
stored there), as a user's first run would; every timed run then finds it, as a user's
second run does. The OS page cache holds the weights file after it was written or first
read: the figures are those of a second decode on the same machine.

Per run: the wall time from before the process starts to its exit, the time to the first
frame (from the process's start to the first segment in host memory, the decode's own
``--profile-json``), frames per second over the wall time, and frames per second of the
decode after start-up (first segment to output complete).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import CodecConfig
from ..files import temp_sibling, write_json_atomic

log = logging.getLogger(__name__)

#: Clips (frames) and outputs the command path decodes by default on a GPU.
COMMAND_CLIPS = (141, 3001)
COMMAND_OUTPUTS = ("png", "png6", "mp4", "webm")
#: What each output of the command path asks ``promptus decode`` for: (suffix, extra arguments); png: the default
#: PNG level (1), png6 and png1: PNGs at zlib level 6 and 1.
OUTPUT_KINDS = {"png": ("", []), "png1": ("", ["--png-level", "1"]), "png6": ("", ["--png-level", "6"]),
                "mp4": (".mp4", []), "webm": (".webm", []), "mkv": (".mkv", [])}
#: File names of the random full-size weights in the cache folder.
RANDOM_UNET_FILE = "sd-turbo-random-unet.safetensors"
RANDOM_TAESD_FILE = "taesd-random.safetensors"


@dataclass
class CommandRun:
    """One ``promptus decode`` process."""

    frames: int
    output: str  # a key of OUTPUT_KINDS
    status: str = "ok"
    wall_s: float = float("nan")  # process start to exit, measured outside it
    first_frame_s: float = float("nan")  # process start to the first segment in host memory
    fps_end_to_end: float = float("nan")  # frames / wall_s
    fps_after_start: float = float("nan")  # frames / (output complete − first segment)
    phases_s: dict | None = None  # the decode's --profile-start phases
    marks_s: dict | None = None  # its moments since the process started (main: interpreter + imports done)
    output_mb: float = float("nan")


def bench_weights_dir() -> Path:
    """Where the random full-size weights file is kept: $PROMPTUS_BENCH_WEIGHTS, else ~/.cache/promptus/bench."""
    env = os.environ.get("PROMPTUS_BENCH_WEIGHTS")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "promptus" / "bench"


def _save_safetensors(state: dict, path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    tmp = temp_sibling(path)
    try:
        save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def random_weight_files(folder: str | os.PathLike | None = None, device: str = "cpu") -> tuple[Path, Path]:
    """(UNet file, TAESD file) of the full-size random model, made once (``device`` makes them faster)."""
    import torch

    from ..models import full_size_random_models

    folder = Path(folder) if folder else bench_weights_dir()
    unet, taesd = folder / RANDOM_UNET_FILE, folder / RANDOM_TAESD_FILE
    if unet.is_file() and taesd.is_file():
        return unet, taesd
    folder.mkdir(parents=True, exist_ok=True)
    log.info("command path: saving the full-size random model once to %s (about 3.5 GB)", folder)
    models = full_size_random_models(device, torch.float32)
    _save_safetensors(models.taesd.state_dict(), taesd)
    _save_safetensors(models.unet.state_dict(), unet)
    del models
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return unet, taesd


def model_args(model: str, *, weights_dir=None, device: str = "cpu") -> list[str]:
    """The ``--model``/``--taesd`` arguments of the timed decodes."""
    if model == "random":
        unet, taesd = random_weight_files(weights_dir, device)
        return ["--model", str(unet), "--taesd", str(taesd)]
    return ["--model", model]


def clip_file(folder: Path, frames: int, size: int, batch: int) -> Path:
    """A .promptus file of ``frames`` frames (random prompts) in ``folder``."""
    from ..bitstream import write
    from .clips import random_bitstream

    from ..errors import PromptusError

    if frames < 1 or (frames - 1) % batch:
        raise PromptusError(f"a command-path clip of {frames} frames does not end on a keyframe of interval {batch}: "
                            f"use k·{batch}+1 frames (141 and 3001 at interval 10)")
    bs = random_bitstream(CodecConfig(width=size, height=size, interval=batch), (frames - 1) // batch + 1)
    path = folder / f"clip{frames}.promptus"
    write(path, bs)
    return path


def bytecode_note() -> str:
    """Whether the timed processes can keep Python's bytecode: without it (PYTHONDONTWRITEBYTECODE, as some
    container images set, or a read-only install) every process compiles diffusers, transformers & co. from
    source and the start-up figures are seconds longer than on a normal install."""
    if sys.flags.dont_write_bytecode or os.environ.get("PYTHONDONTWRITEBYTECODE"):
        return "not written (PYTHONDONTWRITEBYTECODE is set): start-up includes compiling Python sources"
    return "written and reused (a normal install)"


def _decode(clip: Path, output: Path, args: list[str], profile: Path, timeout: float) -> tuple[float, dict | str]:
    target = str(output) + ("/" if not output.suffix else "")  # a folder of PNGs is asked for with a slash
    cmd = [sys.executable, "-m", "promptus", "-q", "decode", str(clip), "-o", target, *args,
           "--profile-json", str(profile)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - t0, f"no result within {timeout:.0f} s"
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not profile.exists():
        tail = " | ".join((proc.stderr or "").strip().splitlines()[-3:])
        return wall, f"exit code {proc.returncode}: {tail[-400:]}"
    return wall, json.loads(profile.read_text())


def _size_mb(path: Path) -> float:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir()) / 1e6
    return path.stat().st_size / 1e6 if path.exists() else float("nan")


def bench_command_path(*, model: str = "random", device: str = "cuda", size: int = CodecConfig.width,
                       batch: int = CodecConfig.interval, clips=COMMAND_CLIPS, outputs=COMMAND_OUTPUTS,
                       backend: str = "auto", engine_dir: str | None = None, weights_dir=None,
                       extra_args: list[str] | None = None, timeout: float = 300.0, json_path: str | None = None,
                       result: dict | None = None) -> dict:
    """Time ``promptus decode`` of each clip to each output in fresh processes (module docstring);
    returns ``result`` (a new dict unless given) with ``command_path`` rows, rewritten as JSON after every run."""
    result = result if result is not None else {}
    rows: list[CommandRun] = []
    work = Path(tempfile.mkdtemp(prefix="promptus-command-path-"))
    engines = engine_dir or str(work / "engines")
    try:
        t0 = time.perf_counter()
        margs = model_args(model, weights_dir=weights_dir, device=device)
        common = [*margs, "--device", device, "--backend", backend, "--engine-dir", engines, *(extra_args or [])]
        info = {"model": model, "device": device, "size": size, "batch": batch, "backend": backend,
                "weights_file_s": time.perf_counter() - t0, "args": common, "rows": [],
                "bytecode": bytecode_note()}
        result["command_path"] = info

        def save():
            info["rows"] = [asdict(r) for r in rows]
            if json_path:
                write_json_atomic(json_path, result)

        files = {n: clip_file(work, n, size, batch) for n in clips}
        log.info("command path: cold decode (fills the engine folder %s)", engines)
        wall, prof = _decode(files[min(clips)], work / "cold", common, work / "cold.json", timeout * 3)
        info["cold"] = {"wall_s": wall, **({"error": prof} if isinstance(prof, str) else prof)}
        shutil.rmtree(work / "cold", ignore_errors=True)
        save()
        for n in clips:
            for kind in outputs:
                row = CommandRun(n, kind)
                rows.append(row)
                suffix, extra = OUTPUT_KINDS[kind]
                out = work / f"out-{n}-{kind}{suffix}"
                log.info("command path: %d frames to %s", n, kind)
                wall, prof = _decode(files[n], out, common + extra, work / f"p-{n}-{kind}.json", timeout)
                row.wall_s = wall
                if isinstance(prof, str):
                    row.status = f"failed: {prof}"
                else:
                    marks = prof["since_process_start_s"]
                    row.first_frame_s = marks.get("first segment on the host", float("nan"))
                    row.fps_end_to_end = prof["frames"] / wall
                    span = marks.get("output complete", float("nan")) - row.first_frame_s
                    row.fps_after_start = (prof["frames"] - batch) / span if span > 0 else float("nan")
                    row.phases_s = prof["phases_s"]
                    row.marks_s = marks
                    row.output_mb = _size_mb(out)
                    if prof["frames"] != n:
                        row.status = f"failed: wrote {prof['frames']} of {n} frames"
                shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
                save()
        save()
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def format_command_table(info: dict) -> str:
    """The command-path rows as text."""
    cold = info.get("cold", {})
    lines = [f"command path — promptus decode in a fresh process, model {info['model']} (weights from a file where "
             f"named), {info['size']}×{info['size']}, batch {info['batch']}, backend {info['backend']}; cold run "
             f"(builds the compiled step): {cold.get('wall_s', float('nan')):.1f} s"
             + (f" — {cold['error']}" if "error" in cold else ""),
             f"Python bytecode: {info.get('bytecode', 'not recorded')}",
             f"{'frames':>6} {'output':6} {'wall s':>7} {'1st frame s':>11} {'FPS e2e':>8} {'FPS after start':>15} "
             f"{'MB':>8}  start-up phases (s)"]
    for r in info.get("rows", []):
        if r["status"] != "ok":
            lines.append(f"{r['frames']:>6} {r['output']:6} {r['status']}")
            continue
        imports = (r.get("marks_s") or {}).get("main")
        phases = ", ".join(([f"imports {imports:.2f}"] if imports is not None else [])
                           + [f"{k} {v:.2f}" for k, v in (r.get("phases_s") or {}).items()])
        lines.append(f"{r['frames']:>6} {r['output']:6} {r['wall_s']:>7.2f} {r['first_frame_s']:>11.2f} "
                     f"{r['fps_end_to_end']:>8.1f} {r['fps_after_start']:>15.1f} {r['output_mb']:>8.1f}  {phases}")
    lines.append("wall s: process start to exit; 1st frame: process start to the first segment in host memory; "
                 "FPS e2e: frames / wall s; FPS after start: the frames after the first segment over the time from it "
                 "to the output complete on disk.")
    return "\n".join(lines)


__all__ = ["COMMAND_CLIPS", "COMMAND_OUTPUTS", "CommandRun", "bytecode_note", "bench_command_path", "bench_weights_dir",
           "format_command_table", "model_args", "random_weight_files"]
