"""Cold and warm start of a backend, each in a fresh Python process (``promptus bench``'s start columns).

:func:`measure_start` runs :func:`start_child` as ``python -c`` with inductor's and Triton's
own caches new and empty, so that only the engine folder it is given can help.
"""

from __future__ import annotations

import time

import torch

from ..config import CodecConfig
from ..files import write_json_atomic
from .common import models_for_bench as _models_for_bench, sync as _sync
from .clips import random_bitstream


def start_child(params: dict) -> None:
    """One start measurement in this (fresh) process; writes its result as JSON to ``params["out"]``.

    Run by :func:`measure_start` as ``python -c``; the clock starts before the models load.
    """
    t_process = time.perf_counter()
    from ..backends import backend_for_clip, resolve_device
    from ..decoder import Decoder

    dev = resolve_device(params["device"])
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    batch, size = params["batch"], params["size"]
    t0 = time.perf_counter()
    models = _models_for_bench(params["model"], dev).to(dev, dtype)  # as bench_decode: same weights, same digest
    _sync(dev)
    models_s = time.perf_counter() - t0
    clip = random_bitstream(CodecConfig(width=size, height=size, interval=batch), 3, seed=1)
    t0 = time.perf_counter()
    backend = backend_for_clip(clip, models, name=params["backend"], device=dev, dtype=dtype,
                               engine_dir=params["engine_dir"])
    Decoder(backend).decode_all(clip)
    _sync(dev)
    ready = time.perf_counter() - t0
    prepared = getattr(backend, "prepared", None)
    write_json_atomic(params["out"], {
        "ready_s": ready, "models_s": models_s, "process_s": time.perf_counter() - t_process,
        "how": getattr(prepared, "how", None), "mechanism": getattr(getattr(prepared, "key", None), "mechanism", None),
    })


def measure_start(backend: str, *, model: str, device: str, batch: int, size: int, engine_dir: str,
                  timeout: float = 900.0) -> dict:
    """Start ``backend`` in a fresh Python process: its models loaded, the backend made (``engine_dir`` as its
    engine folder) and a 21-frame clip decoded. inductor's and Triton's own caches are new and empty, so that
    only ``engine_dir`` can help. Returns ``ready_s`` (backend + first clip, the start-up that the engine
    folder shortens), ``models_s``, ``process_s`` and how the backend got ready; or ``error``."""
    import json
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="promptus-start-") as tmp:
        out = str(Path(tmp) / "start.json")
        params = {"backend": backend, "model": model, "device": device, "batch": batch, "size": size,
                  "engine_dir": engine_dir, "out": out}
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(Path(tmp) / "inductor"),
                   TRITON_CACHE_DIR=str(Path(tmp) / "triton"))
        code = "import json, sys; from promptus.bench.starts import start_child; start_child(json.loads(sys.argv[1]))"
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-c", code, json.dumps(params)], env=env, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"no result within {timeout:.0f} s"}
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not Path(out).exists():
            tail = (proc.stderr or "").strip().splitlines()[-3:]
            return {"error": f"exit code {proc.returncode}: " + " | ".join(tail)[-400:]}
        result = json.loads(Path(out).read_text())
        result["wall_s"] = wall
        return result
