"""Measure the compile backend's levers and its start-up on one GPU; print a table, write JSON.

Each lever is a :class:`promptus.backends.compile_cache.CompileOptions` variant of the
segment step, compiled in this process one after the other (full-size architecture,
random weights, fp16, batch 10, 512²) and timed by CUDA-graph replay of the segment;
PSNR is against the fp32 eager pipeline on a 21-frame clip, and every variant decodes that
clip twice to check that it is deterministic (what a bit-identical closed loop on one
backend needs). End to end, each variant also decodes a 301-frame clip through the
pipelined decoder to host memory (``fps_host``). Variants stored with a mechanism are
then started again in fresh processes whose inductor and Triton caches are empty, so
only the engine folder can help ("warm start").

Decoder levers of issue 24 (``--variants default no_taesd_cl graph_host cudnn_attn autotune``):
``default`` is the backend as shipped (shared prefix, channels-last UNet and TAESD);
``no_taesd_cl`` leaves TAESD contiguous (the channels-last TAESD lever, measured by its
absence); ``graph_host`` captures the whole segment — uint8 conversion and the
device-to-host copy included — in the CUDA graph (``TorchBackend.graph_host_copy``);
``cudnn_attn`` bakes cuDNN's fused attention into the graph instead of flash attention;
``autotune`` is inductor's max-autotune at build time, stored with the step, run in a child
process capped at ``--autotune-cap`` seconds (a build that does not finish is reported);
``autotune_gemm`` the same search for the matmuls alone (cuBLAS against Triton templates, no
coordinate descent), a build short enough to finish where the whole search did not.

    python scripts/compile_levers.py --json benchmarks/compile_levers_h100.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from promptus.backends import TorchBackend
from promptus.backends.compile_cache import CompileOptions, available_mechanisms
from promptus.backends.torch_backend import CompileBackend
from promptus.bench import random_bitstream
from promptus.config import CodecConfig
from promptus.decoder import Decoder
from promptus.metrics import clip_psnr
from promptus.files import write_json_atomic
from promptus.models import full_size_random_models
from promptus.schedule import OneStep

CL = CompileOptions(shared_prefix=False, unet_channels_last=True, taesd_channels_last=True)
TAESD_CL = CompileOptions(shared_prefix=False, unet_channels_last=False, taesd_channels_last=True)
PREFIX = CompileOptions(shared_prefix=True, unet_channels_last=False, taesd_channels_last=True)
PREFIX_UCL = CompileOptions(shared_prefix=True, unet_channels_last=True, taesd_channels_last=True)
VARIANTS = {
    # name: (options, mechanism, expected build seconds on an H100/H200, what it tests)
    "old": (None, None, 60, "today's backend: UNet and TAESD compiled separately, both channels-last"),
    "step": (CL, "aot_compile", 60, "the whole segment step as one graph, both channels-last"),
    "taesd_cl": (TAESD_CL, "cache_artifacts", 60, "one graph, channels-last for TAESD only"),
    "prefix": (PREFIX, "aot_compile", 60, "taesd_cl + shared prefix at batch 1"),
    "prefix_ucl": (PREFIX_UCL, None, 60, "prefix + channels-last UNet"),
    "conv1x1": (dataclasses.replace(PREFIX, inductor=(("conv_1x1_as_mm", True),)), None, 60,
                "prefix + 1×1 convolutions as matmuls"),
    "cudnn_bench": (PREFIX, None, 60, "prefix + cudnn.benchmark (algorithm search per process)"),
    "fused_qkv": (PREFIX, None, 60, "prefix + fused QKV projections (diffusers fuse_qkv_projections)"),
    "autotune": (dataclasses.replace(CompileOptions(), autotune=True), "aot_compile", 240,
                 "default + max-autotune at build time, stored with the step"),
    "autotune_gemm": (dataclasses.replace(CompileOptions(), inductor=(("max_autotune_gemm", True),
                                                                      ("max_autotune_gemm_backends", "ATEN,TRITON"))),
                      "aot_compile", 180, "default + max-autotune of the matmuls alone (Triton templates against "
                                          "cuBLAS; convolutions stay cuDNN, no coordinate descent)"),
    "default": (CompileOptions(), "aot_compile", 60, "the backend as shipped: shared prefix, channels-last UNet "
                                                     "and TAESD"),
    "no_taesd_cl": (dataclasses.replace(CompileOptions(), taesd_channels_last=False), None, 60,
                    "default with TAESD contiguous (the channels-last TAESD lever, by its absence)"),
    "cudnn_attn": (dataclasses.replace(CompileOptions(), attention="cudnn"), "aot_compile", 60,
                   "default + cuDNN fused attention first (CompileOptions.attention)"),
    "graph_host": (CompileOptions(), "aot_compile", 20, "default + uint8 and device-to-host copy inside the "
                                                        "CUDA graph (graph_host_copy)"),
}
WARM = ("step", "taesd_cl", "prefix", "autotune")
#: Variants built in a child process with a time cap (a build that overruns is killed and reported).
CAPPED = ("autotune", "autotune_gemm")


class OldCompileBackend(TorchBackend):
    """The compile backend as it was: each network torch.compiled on its own, channels-last, CUDA graph."""

    name = "compile-old"

    def __init__(self, unet, dec, device, dtype, batch):
        super().__init__(unet, dec, device, dtype, channels_last=True, cuda_graph=True, batch=batch)
        self._u = torch.compile(self.unet, fullgraph=False, dynamic=False, backend=COMPILE_BACKEND)
        self._d = torch.compile(self.taesd_decoder, fullgraph=False, dynamic=False, backend=COMPILE_BACKEND)
        self.pad_single = True

    def _unet(self, z, t, context):
        return self._u(z, t, encoder_hidden_states=context, return_dict=False)[0]

    def _decoder(self, x):
        return self._d(x)


DEVICE = "cuda"
COMPILE_BACKEND = "inductor"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def load_models(dtype):
    if DEVICE == "cuda":
        return full_size_random_models(DEVICE, dtype)
    from promptus.models import tiny_models  # a dry run of this script on the CPU

    return tiny_models().to(DEVICE, dtype)


def time_segment(backend, batch, size, reps=30) -> float:
    h = size // 8
    g = torch.Generator().manual_seed(3)
    zp = torch.randn(1, 4, h, h, generator=g).to(DEVICE)
    ctx = torch.randn(batch, 77, 1024, generator=g).to(DEVICE)
    onestep = OneStep.at(999)
    for _ in range(3):
        backend.segment(zp, zp, 0.05, ctx, onestep)
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        backend.segment(zp, zp, 0.05, ctx, onestep)
        sync()
        times.append(1000 * (time.perf_counter() - t0))
    times.sort()
    return times[len(times) // 2]


def make(name, models, digest, engine_dir, batch):
    opts, mech, _, _ = VARIANTS[name]
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    if opts is None:
        return OldCompileBackend(models.unet, models.taesd.decoder, DEVICE, dtype, batch)
    opts = dataclasses.replace(opts, backend=COMPILE_BACKEND)
    backend = CompileBackend(models.unet, models.taesd.decoder, DEVICE, dtype, cuda_graph=DEVICE == "cuda",
                             batch=batch, options=opts, engine_dir=engine_dir if mech else None,
                             mechanism=mech, progress=False)
    backend.graph_host_copy = name == "graph_host"
    return backend


def time_host(backend, batch, size, keyframes=31) -> float:
    """Frames per second of a (keyframes−1)·batch+1-frame clip through the pipelined decoder to host memory."""
    from promptus.pipeline import PipelinedDecoder

    clip = random_bitstream(CodecConfig(width=size, height=size, interval=batch), keyframes, seed=2)
    items = [clip.header, clip.init, *clip.keyframes]
    dec = Decoder(backend)
    got = []
    PipelinedDecoder(dec, to_host=True).run(items[:4], lambda s, f: got.append(f.sum().item()))  # warm: capture
    sync()
    t0 = time.perf_counter()
    n = PipelinedDecoder(dec, to_host=True).run(items, lambda s, f: got.append(int(f[-1, 0, 0, 0])))
    sync()
    return n / (time.perf_counter() - t0)


def child_start(name: str, engine_dir: str, batch: int, size: int) -> dict:
    """A fresh process: models, digest, backend + first decode of a 21-frame clip."""
    t = {"variant": name}
    t0 = time.perf_counter()
    models = load_models(torch.float16 if DEVICE == "cuda" else torch.float32)
    sync()
    t["models_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    digest = models.identity().hexdigest
    t["digest_s"] = time.perf_counter() - t1
    clip = random_bitstream(CodecConfig(width=size, height=size, interval=batch), 3, seed=1)
    t2 = time.perf_counter()
    backend = make(name, models, digest, engine_dir, batch)
    Decoder(backend).decode_all(clip)
    sync()
    t["ready_s"] = time.perf_counter() - t2  # backend made + first clip decoded
    t["how"] = getattr(getattr(backend, "prepared", None), "how", "compiled")
    t["prepare_s"] = getattr(getattr(backend, "prepared", None), "seconds", float("nan"))
    t["mechanism"] = getattr(getattr(getattr(backend, "prepared", None), "key", None), "mechanism", None)
    return t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--budget", type=float, default=540.0, help="seconds; variants that would not fit are skipped")
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--engine-dir", default=None)
    p.add_argument("--dry-run-cpu", action="store_true", help="tiny model on the CPU, aot_eager (checks the script)")
    p.add_argument("--autotune-cap", type=float, default=300.0,
                   help="seconds the max-autotune variant may take in its child process (build + measurement)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-variant", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    global DEVICE, COMPILE_BACKEND
    if args.dry_run_cpu:
        DEVICE, COMPILE_BACKEND = "cpu", "aot_eager"
    if args.child:
        print("RESULT " + json.dumps(child_start(args.child, args.engine_dir, args.batch, args.size)), flush=True)
        return 0
    if args.child_variant:  # one variant measured in this process (the parent caps its time)
        args.variants, args.json, args.budget = [args.child_variant], None, 1e9

    t_start = time.perf_counter()
    engine_dir = args.engine_dir or tempfile.mkdtemp(prefix="levers-engines-")
    result = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
              "mechanisms": list(available_mechanisms()), "batch": args.batch, "size": args.size, "rows": [],
              "warm": []}
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    print(f"{result['device']}, torch {result['torch']}, triton {result['triton']}, "
          f"mechanisms {result['mechanisms']}", flush=True)

    def save():
        if args.json:
            write_json_atomic(args.json, result)

    cfg = CodecConfig(width=args.size, height=args.size, interval=args.batch)
    clip = random_bitstream(cfg, 3, seed=1)
    models = load_models(torch.float32)
    reference = Decoder(TorchBackend(models.unet, models.taesd.decoder, DEVICE, torch.float32)).decode_all(clip)
    models.to(DEVICE, torch.float16 if DEVICE == "cuda" else torch.float32)
    t0 = time.perf_counter()
    digest = models.identity().hexdigest
    result["digest_s"] = time.perf_counter() - t0
    left = lambda: args.budget - (time.perf_counter() - t_start)  # noqa: E731

    def run_capped(name):
        """``name`` in a child process with this script's engine folder, killed after ``--autotune-cap`` s."""
        opts, mech, expect, what = VARIANTS[name]
        cap = min(args.autotune_cap, left() - 20)
        row = {"variant": name, "what": what, "mechanism": mech, "options": opts.describe(), "cap_s": cap}
        if cap < 60:
            row["status"] = f"skipped: {left():.0f} s left"
        else:
            cmd = [sys.executable, __file__, "--child-variant", name, "--engine-dir", engine_dir,
                   "--batch", str(args.batch), "--size", str(args.size)] + (["--dry-run-cpu"] if args.dry_run_cpu
                                                                              else [])
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=cap)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")), None)
                row = json.loads(line[4:]) if line else {**row, "status": f"failed: {proc.stderr[-300:]}"}
            except subprocess.TimeoutExpired:
                row["status"] = f"not finished within the {cap:.0f} s cap (build with max-autotune)"
            row["child_wall_s"] = time.perf_counter() - t0
        result["rows"].append(row)
        print(f"{name:10} {row.get('status')[:70]}", flush=True)
        save()

    def run_variant(name):
        opts, mech, expect, what = VARIANTS[name]
        if name in CAPPED and not args.child_variant:
            return run_capped(name)
        if left() < expect * 1.3:
            print(f"{name}: skipped ({left():.0f} s left, expect {expect} s)", flush=True)
            result["rows"].append({"variant": name, "status": f"skipped: {left():.0f} s left"})
            return
        row = {"variant": name, "what": what, "mechanism": mech, "options": opts.describe() if opts else "old"}
        try:
            if name == "fused_qkv":
                models.unet.fuse_qkv_projections()
            torch.backends.cudnn.benchmark = name == "cudnn_bench"
            torch._dynamo.reset()
            t0 = time.perf_counter()
            backend = make(name, models, digest, engine_dir, args.batch)
            frames = Decoder(backend).decode_all(clip)
            sync()
            row["build_s"] = time.perf_counter() - t0
            row["stored"] = getattr(getattr(backend, "prepared", None), "how", None)
            row["stored_mechanism"] = getattr(getattr(getattr(backend, "prepared", None), "key", None),
                                              "mechanism", None)
            row["psnr_vs_fp32"] = clip_psnr(reference, frames)
            row["deterministic"] = bool(torch.equal(frames, Decoder(backend).decode_all(clip)))
            row["segment_ms"] = time_segment(backend, args.batch, args.size)
            row["fps_segment"] = 1000 * args.batch / row["segment_ms"]
            if opts is not None:
                row["fps_host"] = time_host(backend, args.batch, args.size, keyframes=31 if DEVICE == "cuda" else 3)
            if name == "graph_host":  # the frames copied inside the graph are the frames of the plain replay
                from promptus.pipeline import PipelinedDecoder

                parts = []
                PipelinedDecoder(Decoder(backend), to_host=True).run(
                    [clip.header, clip.init, *clip.keyframes], lambda st, f: parts.append(f.clone()))
                row["host_frames_identical"] = bool(torch.equal(torch.cat(parts), frames))
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None
            row["status"] = "ok"
            del backend
        except Exception as e:  # noqa: BLE001 - report and go on
            row["status"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if args.child_variant:
            print("ROW " + json.dumps(row), flush=True)
        result["rows"].append(row)
        print(f"{name:10} {row.get('status')[:60]:12} build {row.get('build_s', float('nan')):6.1f} s  "
              f"segment {row.get('segment_ms', float('nan')):6.2f} ms  PSNR {row.get('psnr_vs_fp32', float('nan')):6.2f}"
              f"  stored {row.get('stored')} {row.get('stored_mechanism')}", flush=True)
        save()

    def warm(name):
        row = next((r for r in result["rows"] if r["variant"] == name), None)
        if row is None or row.get("status") != "ok" or row.get("stored") not in ("built", "loaded"):
            return
        if left() < 40:
            return
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=f"{cache}/inductor", TRITON_CACHE_DIR=f"{cache}/triton")
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--child", name, "--engine-dir", engine_dir,
                                   "--batch", str(args.batch), "--size", str(args.size)]
                                  + (["--dry-run-cpu"] if args.dry_run_cpu else []),
                                  env=env, capture_output=True, text=True, timeout=max(30, left()))
            wall = time.perf_counter() - t0
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        w = json.loads(line[7:]) if line else {"variant": name, "error": proc.stderr[-800:]}
        w["process_wall_s"] = wall
        result["warm"].append(w)
        print(f"warm {name:10} ready {w.get('ready_s', float('nan')):6.2f} s (prepare {w.get('prepare_s', float('nan')):.2f}"
              f" s, {w.get('how')}, {w.get('mechanism')}); models {w.get('models_s', float('nan')):.1f} s, digest "
              f"{w.get('digest_s', float('nan')):.1f} s, process {wall:.1f} s {w.get('error', '')[-300:]}", flush=True)
        save()

    for name in args.variants:  # in the order given; a stored variant is started again right after
        run_variant(name)
        if name in WARM and not args.child_variant:
            warm(name)
    result["wall_s"] = time.perf_counter() - t_start
    save()
    print(f"\n{'variant':11} {'segment ms':>10} {'FPS':>7} {'FPS host':>9} {'PSNR':>7} {'determ.':>7} {'build s':>8}  "
          "what")
    for r in result["rows"]:
        if r.get("status") == "ok":
            print(f"{r['variant']:11} {r['segment_ms']:>10.2f} {r['fps_segment']:>7.1f} "
                  f"{r.get('fps_host', float('nan')):>9.1f} {r['psnr_vs_fp32']:>7.2f} "
                  f"{str(r.get('deterministic')):>7} {r['build_s']:>8.1f}  {r['what']}")
        else:
            print(f"{r['variant']:10} {r.get('status')}")
    for w in result["warm"]:
        print(f"warm start {w['variant']:10} {w.get('ready_s', float('nan')):.2f} s ({w.get('mechanism')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
