"""Import of the public Promptus release's prompt folders (docs/design.md, "The method").

The release stores each keyframe as a torch-pickled dict ``frame_XXXXX.prompt``
(``U``, ``V`` uint8; ``U_scale``, ``U_zero_point``, ``V_scale``, ``V_zero_point``
float tensors) plus ``init.pth`` (the float32 init latent 1×4×64×64), all saved
from CUDA tensors. They are read with ``torch.load(weights_only=True,
map_location="cpu")`` only, validated, and turned into a :class:`Bitstream`
whose dequantized factors are bit-exact to the originals.

The files are untrusted input: only regular files are opened (a FIFO never blocks),
each is at most :data:`MAX_LEGACY_FILE_BYTES`, a zip archive must store its entries
uncompressed (as ``torch.save`` does: no zip bomb), every failure of the unpickler is
a :class:`PromptusError`, and each tensor's shape is checked against the format's
limits and its storage before anything is copied (a tensor saved from ``expand()`` is
a few bytes on disk and gigabytes once materialised).
"""

from __future__ import annotations

import io
import logging
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from .bitstream import Bitstream, Header, InitLatent, Keyframe, ModelIdentity
from .config import MAX_EMBED_DIM, MAX_FRAME_SIDE, MAX_RANK, MAX_TOKENS, CodecConfig
from .errors import PromptusError
from .files import atomic_write, read_regular
from .prompts import QuantizedTensor, check_quant_params

log = logging.getLogger(__name__)

PROMPT_RE = re.compile(r"^frame_(\d+)\.prompt$")

#: What a legacy folder was made with: the public release used SD-Turbo + TAESD.
LEGACY_MODEL = ModelIdentity(name="sd-turbo+taesd (legacy import)", digest=bytes(16))

#: Largest legacy file read (a rank-512 keyframe holds 563 KiB of codes, a 4096² init latent 4 MiB).
MAX_LEGACY_FILE_BYTES = 64 << 20
#: The release's init latent: SD-Turbo's 4 channels, 8× smaller than the frame.
LEGACY_LATENT_CHANNELS = 4


def _check_archive(data: bytes, path: Path) -> None:
    """Refuse a zip archive whose entries are compressed or claim more than the size limit:
    torch.save stores entries uncompressed, so the file's size bounds what loading allocates."""
    if not data.startswith(b"PK"):
        return  # torch's older non-zip format: storages are read from the file itself
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as e:
        raise PromptusError(f"cannot read {path}: a damaged zip archive ({e})") from None
    except NotImplementedError as e:  # zipfile's word for a zip feature (version, method) it cannot read
        raise PromptusError(f"cannot read {path}: its zip archive needs a feature torch.save never uses ({e}); "
                            "it is not a Promptus prompt file") from None
    if any(i.compress_type != zipfile.ZIP_STORED for i in infos):
        raise PromptusError(f"cannot read {path}: its archive holds compressed entries, which torch.save never "
                            "writes; it is not a Promptus prompt file")
    if sum(i.file_size for i in infos) > len(data):
        raise PromptusError(f"cannot read {path}: its archive entries claim more bytes than the file holds")


def _load(path: Path) -> object:
    data = read_regular(path, what="legacy prompt file", limit=MAX_LEGACY_FILE_BYTES)
    _check_archive(data, path)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - the unpickler parses untrusted bytes: any failure means a bad file
        raise PromptusError(
            f"cannot read {path}: {type(e).__name__}: {str(e)[:300]}. Legacy files are loaded with weights_only=True "
            "(no arbitrary code runs); a file that needs more is not a Promptus prompt."
        ) from None


def _check_tensor(t: torch.Tensor, path: Path, name: str, limits: tuple[int, ...]) -> None:
    """Refuse a tensor whose shape exceeds ``limits`` or whose elements are not all backed by
    its own storage (``expand()``: stride 0), before anything copies it."""
    shape = tuple(t.shape)
    if len(shape) != len(limits) or any(not 1 <= n <= most for n, most in zip(shape, limits)):
        raise PromptusError(f"{path}: {name} has shape {shape}; a Promptus file holds at most "
                            f"{'×'.join(map(str, limits))}")
    held = t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
    if t.numel() * t.element_size() > held:
        raise PromptusError(f"{path}: {name} ({'×'.join(map(str, shape))}) repeats the {held} bytes it stores "
                            "(a tensor saved from expand()); save it with .contiguous() first")


def _scalar(d: dict, key: str, path: Path) -> float:
    v = d[key]
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or (not v.is_floating_point() and v.dtype not in (torch.int64, torch.int32, torch.uint8)):
            raise PromptusError(f"{path}: {key} must be a single number, got a {v.dtype} tensor of shape {tuple(v.shape)}")
        v = v.reshape(()).item()
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise PromptusError(f"{path}: {key} must be a number, got {type(v).__name__}")
    return float(v)


def _quantized(d: dict, name: str, shape_check, path: Path, limits: tuple[int, int]) -> QuantizedTensor:
    q = d[name]
    if not isinstance(q, torch.Tensor) or q.dtype != torch.uint8 or q.dim() != 2:
        desc = f"{q.dtype} tensor of shape {tuple(q.shape)}" if isinstance(q, torch.Tensor) else type(q).__name__
        raise PromptusError(f"{path}: {name} must be a 2-D uint8 tensor of codes, got a {desc}")
    _check_tensor(q, path, name, limits)
    shape_check(tuple(q.shape))
    scale = _scalar(d, f"{name}_scale", path)
    zp = _scalar(d, f"{name}_zero_point", path)
    try:  # the same rule as the bitstream reader: what imports here also reads back
        check_quant_params(scale, zp)
    except PromptusError as e:
        raise PromptusError(f"{path}: {name}_scale={scale!r}, {name}_zero_point={zp!r}: {e}") from None
    if np.float32(scale) != scale and not isinstance(d[f"{name}_scale"], torch.Tensor):
        log.debug("%s: %s_scale is not a float32 value; it is rounded to float32 as the release's arithmetic does", path, name)
    return QuantizedTensor(q.contiguous().numpy().copy(), float(np.float32(scale)), int(zp))


def load_legacy(folder: str | os.PathLike, *, fps: float = 30.0, init_precision: str = "fp32",
                interval: int | None = None, model: ModelIdentity = LEGACY_MODEL) -> Bitstream:
    """Read a release folder (frame_XXXXX.prompt + init.pth) into a :class:`Bitstream`.

    Rank and interval are inferred (the interval from the keyframe spacing; pass
    ``interval`` for a folder with a single keyframe). The frame size follows from
    the init latent (8× its spatial size); the frame count is the last keyframe
    index + 1.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PromptusError(f"{folder} is not a folder; give the folder holding frame_XXXXX.prompt and init.pth")
    try:
        prompts = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := PROMPT_RE.match(p.name)))
    except OSError as e:
        raise PromptusError(f"cannot list {folder}: {e.strerror or e}") from None
    if not prompts:
        raise PromptusError(f"{folder} holds no frame_XXXXX.prompt files; is this a Promptus results folder "
                            "(e.g. data/sky/results/rank8_interval10)?")
    init_path = folder / "init.pth"
    if not init_path.is_file():
        raise PromptusError(f"{folder} has prompts but no init.pth (the init latent of frame 0); "
                            "copy it from the folder the inversion wrote")

    indices = [i for i, _ in prompts]
    if indices[0] != 0:
        raise PromptusError(f"the first keyframe is frame_{indices[0]:05d}.prompt; a clip must start at frame_00000.prompt")
    if len(indices) > 1:
        gaps = {b - a for a, b in zip(indices, indices[1:])}
        if len(gaps) != 1:
            raise PromptusError(f"keyframe indices are not evenly spaced: {indices[:8]}{'...' if len(indices) > 8 else ''}; "
                                "a file may be missing")
        spacing = gaps.pop()
        if interval is not None and interval != spacing:
            raise PromptusError(f"--interval {interval} disagrees with the keyframe spacing {spacing} in {folder}")
        interval = spacing
    elif interval is None:
        interval = CodecConfig.interval
        log.warning("only one keyframe: the interval cannot be inferred, assuming %d", interval)

    init = _load(init_path)
    if isinstance(init, dict):  # some scripts save {"z": tensor}
        tensors = [v for v in init.values() if isinstance(v, torch.Tensor)]
        init = tensors[0] if len(tensors) == 1 else init
    if (not isinstance(init, torch.Tensor) or not init.is_floating_point() or init.dim() != 4 or init.shape[0] != 1
            or init.shape[1] != LEGACY_LATENT_CHANNELS):
        desc = f"{init.dtype} tensor {tuple(init.shape)}" if isinstance(init, torch.Tensor) else type(init).__name__
        raise PromptusError(f"{init_path}: expected a float init latent of shape 1×{LEGACY_LATENT_CHANNELS}×h×w "
                            f"(SD-Turbo's latent), got {desc}")
    side = MAX_FRAME_SIDE // 8
    _check_tensor(init, init_path, "the init latent", (1, LEGACY_LATENT_CHANNELS, side, side))
    if not torch.isfinite(init).all():
        raise PromptusError(f"{init_path}: the init latent holds NaN or inf")
    _, channels, h, w = init.shape

    keyframes: list[Keyframe] = []
    rank = tokens = dim = None
    for index, path in prompts:
        d = _load(path)
        if not isinstance(d, dict):
            raise PromptusError(f"{path}: expected a dict of prompt tensors, got {type(d).__name__}")
        missing = [k for k in ("U", "V", "U_scale", "U_zero_point", "V_scale", "V_zero_point") if k not in d]
        if missing:
            raise PromptusError(f"{path}: missing {', '.join(missing)}; not a Promptus keyframe prompt")

        def check_u(shape, path=path):
            nonlocal rank, tokens
            if rank is None:
                tokens, rank = shape
            elif shape != (tokens, rank):
                raise PromptusError(f"{path}: U has shape {shape} but earlier keyframes have {(tokens, rank)}")

        def check_v(shape, path=path):
            nonlocal dim
            if shape[0] != rank:
                raise PromptusError(f"{path}: V has {shape[0]} rows but U has rank {rank}")
            if dim is None:
                dim = shape[1]
            elif shape[1] != dim:
                raise PromptusError(f"{path}: V has {shape[1]} columns but earlier keyframes have {dim}")

        U_q = _quantized(d, "U", check_u, path, (MAX_TOKENS, MAX_RANK))
        V_q = _quantized(d, "V", check_v, path, (MAX_RANK, MAX_EMBED_DIM))
        keyframes.append(Keyframe(index=index, U_q=U_q, V_q=V_q))

    config = CodecConfig(width=8 * w, height=8 * h, fps=float(fps), rank=rank, interval=interval,
                         tokens=tokens, embed_dim=dim, latent_channels=channels)
    header = Header(config=config, frame_count=indices[-1] + 1, model=model)
    init_latent = InitLatent.from_array(init.detach().float().numpy(), init_precision)
    bs = Bitstream(header=header, init=init_latent, keyframes=keyframes)
    log.info("imported %d keyframes (rank %d, interval %d, %d×%d) from %s", len(keyframes), rank, interval, 8 * w, 8 * h, folder)
    return bs


def write_legacy(bitstream: Bitstream, folder: str | os.PathLike) -> list[Path]:
    """Write ``bitstream`` in the public release's layout (for its generation script).

    Produces ``frame_XXXXX.prompt`` per keyframe and ``init.pth``; every file is
    written to a temporary name and renamed into place. Returns the paths written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def save(obj, path: Path) -> None:
        buf = io.BytesIO()
        torch.save(obj, buf)
        atomic_write(path, buf.getbuffer())
        written.append(path)

    for kf in bitstream.keyframes:
        d = {}
        for name, qt in (("U", kf.U_q), ("V", kf.V_q)):
            d[name] = torch.from_numpy(qt.q.copy())
            d[f"{name}_scale"] = torch.tensor(qt.scale, dtype=torch.float32)
            d[f"{name}_zero_point"] = torch.tensor(float(qt.zero_point), dtype=torch.float32)
        save(d, folder / f"frame_{kf.index:05d}.prompt")
    save(bitstream.init.to_torch(), folder / "init.pth")
    return written
