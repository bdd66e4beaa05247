"""Measure what lossless entropy coding saves on quantized keyframe codes.

For each kind of factors — gaussian (torch.randn) and uniform (torch.rand, the
encoder's initialisation) — quantize U (tokens×r) and V (r×dim) per tensor as the
codec does, then compress each keyframe's codes with every codec of the .promptus
format. Prints a table and writes JSON (--json, default entropy_gain.json).

    python scripts/entropy_gain.py --rank 8 --keyframes 32
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from promptus.bitstream import CODECS, compress_codes, entropy_code
from promptus.files import atomic_write
from promptus.prompts import quantize_tensor


def order0_entropy_bytes(codes: np.ndarray) -> float:
    """Shannon bound for coding each byte independently (no context), in bytes."""
    counts = np.bincount(codes, minlength=256)
    p = counts[counts > 0] / codes.size
    return float(-(p * np.log2(p)).sum() * codes.size / 8)


def measure(kind: str, rank: int, tokens: int, dim: int, keyframes: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    draw = {"gaussian": torch.randn, "uniform": torch.rand}[kind]
    sizes = {c: [] for c in CODECS}
    best, winners, bound = [], Counter(), []
    for _ in range(keyframes):
        U = quantize_tensor(draw(tokens, rank, generator=gen))
        V = quantize_tensor(draw(rank, dim, generator=gen))
        codes = U.q.tobytes() + V.q.tobytes()
        for c in CODECS:
            sizes[c].append(len(compress_codes(codes, c)))
        codec, block = entropy_code(codes, "auto")  # what to_bytes stores
        best.append(len(block))
        winners[codec] += 1
        # Two tensors with their own code distributions: bound each separately.
        bound.append(order0_entropy_bytes(U.q.ravel()) + order0_entropy_bytes(V.q.ravel()))
    raw = sizes["raw"][0]
    return {
        "factors": kind,
        "rank": rank,
        "tokens": tokens,
        "embed_dim": dim,
        "keyframes": keyframes,
        "raw_bytes": raw,
        "mean_bytes": {c: float(np.mean(v)) for c, v in sizes.items()},
        "best_mean_bytes": float(np.mean(best)),
        "best_min_bytes": int(min(best)),
        "best_max_bytes": int(max(best)),
        "winners": dict(winners),
        "saving_percent": 100 * (raw - float(np.mean(best))) / raw,
        "order0_bound_bytes": float(np.mean(bound)),
    }


def write_json_atomic(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=77)
    ap.add_argument("--embed-dim", type=int, default=1024)
    ap.add_argument("--keyframes", type=int, default=32, help="keyframes measured per kind of factors")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=Path("entropy_gain.json"))
    args = ap.parse_args(argv)

    rows = [measure(kind, args.rank, args.tokens, args.embed_dim, args.keyframes, args.seed)
            for kind in ("gaussian", "uniform")]
    cols = [c for c in CODECS if c != "raw"]
    print(f"bytes per keyframe, rank {args.rank}, U {args.tokens}×{args.rank} + V {args.rank}×{args.embed_dim}, "
          f"mean of {args.keyframes} keyframes")
    print(f"{'factors':<10}{'raw':>8}" + "".join(f"{c:>9}" for c in cols)
          + f"{'stored':>9}{'saved':>8}{'order-0':>9}  winners")
    for r in rows:
        won = ", ".join(f"{c} ×{n}" for c, n in sorted(r["winners"].items()))
        print(f"{r['factors']:<10}{r['raw_bytes']:>8}" + "".join(f"{r['mean_bytes'][c]:>9.0f}" for c in cols)
              + f"{r['best_mean_bytes']:>9.0f}{r['saving_percent']:>7.2f}%{r['order0_bound_bytes']:>9.0f}  {won}")
    print("stored = what a .promptus file keeps (smallest codec, raw if none is smaller); "
          "order-0 = Shannon bound for bytes coded independently")
    write_json_atomic(args.json, {"rows": rows, "args": {k: str(v) for k, v in vars(args).items()}})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
