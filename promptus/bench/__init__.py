"""Benchmarks: results as data (and JSON), ratios measured in one process; ``promptus bench`` prints the tables.

* :mod:`~promptus.bench.encode`: ``promptus bench --encode``, the batched trainer against the
  published loop (emulated in :mod:`~promptus.bench.published`), under memory budgets.
* :mod:`~promptus.bench.decode`: ``promptus bench``, the decoder backends.
* :mod:`~promptus.bench.starts`: a backend's cold and warm start, each in a fresh process.
* :mod:`~promptus.bench.clips` and :mod:`~promptus.bench.common`: random clips, timing helpers.

The streaming benchmark stays with the server (:mod:`promptus.streaming.bench`).
"""

from __future__ import annotations

from .clips import random_bitstream
from .decode import DecodeRow, bench_decode, matmul_ceiling, model_flops
from .encode import BENCH_BUDGETS, CLIP_FRAMES, EncodeTiming, PlanTiming, bench_encode, clip_seconds, profile_first_step
from .starts import measure_start, start_child

__all__ = ["BENCH_BUDGETS", "CLIP_FRAMES", "DecodeRow", "EncodeTiming", "PlanTiming", "bench_decode", "bench_encode",
           "clip_seconds", "matmul_ceiling", "measure_start", "model_flops", "profile_first_step", "random_bitstream",
           "start_child"]
