"""Resume checkpoints of an encode: ``OUT.ckpt.promptus`` + ``OUT.ckpt.json``, and the per-keyframe log.

After every keyframe the finished keyframes are written atomically as a complete
bitstream of a shorter clip (our own format, no pickle) plus a JSON that records
the run's options, the clip's digest, the bitstream's SHA-256 and the
per-keyframe results. A resumed run reads both back and checks everything before
it uses anything (:func:`read_checkpoint`). The trainer (:mod:`promptus.encoder`)
only calls :class:`ResumeCheckpoint`; how the files look lives here.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .bitstream import Bitstream, Header, InitLatent, Keyframe, from_bytes, to_bytes
from .errors import PromptusError
from .files import atomic_write, open_append, read_regular

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
    stop: str = ""  # why training stopped (the schedule's reason; absent from checkpoints before schedules)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__, frames=list(self.frames))


def frames_digest(frames: torch.Tensor) -> str:
    """SHA-256 (32 hex digits) of the frames' bytes, hashed in place (no copy of the clip)."""
    arr = frames.contiguous().numpy()
    h = hashlib.sha256()
    flat = arr.reshape(-1)
    for i in range(0, flat.size, 1 << 24):  # 16 MiB at a time: views, never a copy
        h.update(flat[i:i + (1 << 24)])
    return h.hexdigest()[:32]


def checkpoint_paths(out: Path) -> tuple[Path, Path]:
    """The checkpoint's bitstream and JSON next to the output ``out``."""
    return out.with_name(out.name + ".ckpt.promptus"), out.with_name(out.name + ".ckpt.json")


def log_path(out: Path) -> Path:
    """The per-keyframe JSON log (one :class:`KeyframeResult` a line) next to the output ``out``."""
    return out.with_name(out.name + ".log.jsonl")


class ResumeCheckpoint:
    """The checkpoint and the per-keyframe log of one encode to ``out``.

    ``meta``: the run's options that a resumed run must repeat (see
    :func:`read_checkpoint`); ``header``: the run's bitstream header.
    """

    def __init__(self, out: Path, meta: dict[str, Any], header: Header):
        self.out, self.meta, self.header = Path(out), meta, header
        self.bitstream_path, self.json_path = checkpoint_paths(self.out)
        self.log_path = log_path(self.out)

    def exists(self) -> bool:
        return self.json_path.exists()

    def load(self, init_precision: str) -> tuple[InitLatent, list[Keyframe], list[KeyframeResult]]:
        return read_checkpoint(self.bitstream_path, self.json_path, self.meta, self.header, init_precision)

    def save(self, init: InitLatent, keyframes: list[Keyframe], results: list[KeyframeResult]) -> None:
        """Write the finished keyframes atomically (bitstream first, then the JSON that names its digest)."""
        header = self.header
        partial = Header(header.config, (len(keyframes) - 1) * header.interval + 1, header.model)
        data = to_bytes(Bitstream(partial, init, list(keyframes)), entropy="none")
        atomic_write(self.bitstream_path, data)
        state = dict(self.meta, keyframes_done=len(keyframes), bitstream_sha256=hashlib.sha256(data).hexdigest(),
                     results=[r.to_dict() for r in results])
        atomic_write(self.json_path, json.dumps(state, indent=1))

    def log(self, result: KeyframeResult) -> None:
        """Append one keyframe's result to the JSON log."""
        with open_append(self.log_path) as f:
            f.write(json.dumps(result.to_dict()) + "\n")

    def clear_log(self) -> None:
        self.log_path.unlink(missing_ok=True)

    def remove(self) -> None:
        """Delete the checkpoint (the encode finished); the log stays."""
        for p in (self.bitstream_path, self.json_path):
            p.unlink(missing_ok=True)


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
            if not isinstance(r, dict) or set(r) | {"stop"} != fields:
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


def mean_psnr(results: list[KeyframeResult]) -> float:
    """The segments' closed-loop PSNRs averaged with their frame counts as weights (finite ones only)."""
    w = [r.frames[1] - r.frames[0] + 1 for r in results]
    finite = [(p, n) for p, n in zip((r.psnr for r in results), w) if math.isfinite(p)]
    if not finite:
        return float("inf")
    return sum(p * n for p, n in finite) / sum(n for _, n in finite)
