"""Could a decode start without diffusers and Dynamo? An AOTInductor probe of the segment step.

The start-up of ``promptus decode`` is now mostly imports: diffusers (and what it pulls in)
and ``torch._dynamo``, which loading an ``aot_compile`` step needs (docs/decoding.md,
"Measured so far"). This probe measures the way around both. It builds the segment step
(:class:`promptus.backends.segment_step.SegmentStep`: mix → UNet → x0 → TAESD → uint8)
ahead of time with AOTInductor into a package that leaves the weights out, saves the
weights by name to a .safetensors file (fp32, as SD-Turbo ships), then starts a fresh
process that imports only torch and safetensors, loads the package with torch's C++
loader (``torch._C._aoti.AOTIModelPackageLoader``: no ``torch._inductor``, no
``torch._dynamo``, no diffusers), binds the weights (cast and laid out as the package
expects) and runs the step. Prints a table and writes JSON: the build's seconds; in the
fresh process import torch, weights read and moved, package load, weights bound, first
run, steady run (median of 10); the frames' PSNR and the largest |Δx0| against the eager
step on the same inputs; which of those heavy modules the fresh process imported.

It is a probe, not a backend: the package is keyed by nothing and kept in a temporary
folder, and the weights file is the exported program's own names (a real SD-Turbo file
would need its names mapped once, at build time).

    python scripts/aoti_probe.py --json benchmarks/aoti_probe_cpu.json          # tiny model, CPU, ~1 min
    python scripts/aoti_probe.py --model random --device cuda --size 512 --batch 10 \\
        --json benchmarks/aoti_probe_h100.json                                  # the full-size step on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, statistics, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
from safetensors.torch import load_file, save_file
work, device = sys.argv[1], torch.device(sys.argv[2])
spec = json.load(open(f"{work}/spec.json"))
dtype = getattr(torch, spec["dtype"])
weights = load_file(f"{work}/weights.safetensors")
consts = {}
for name, cl in spec["constants"].items():
    t = weights[name].to(device)
    t = t.to(dtype) if t.is_floating_point() else t
    consts[name] = t.contiguous(memory_format=torch.channels_last) if cl else t
if device.type == "cuda":
    torch.cuda.synchronize()
t2 = time.perf_counter()
loader = torch._C._aoti.AOTIModelPackageLoader(f"{work}/step.pt2", "model", False, 1,
                                               device.index if device.index is not None else -1)
t3 = time.perf_counter()
names = loader.get_constant_fqns()
loader.load_constants({n: consts[n] for n in names}, False, True, True)
t4 = time.perf_counter()
inputs = load_file(f"{work}/inputs.safetensors")
args = [inputs[k].to(device) for k in ("z_prev", "noise", "mix", "context")]
def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()
x0, frames = loader.run(args)
sync()
t5 = time.perf_counter()
steady = []
for _ in range(10):
    t = time.perf_counter()
    loader.run(args)
    sync()
    steady.append(time.perf_counter() - t)
save_file({"x0": x0.float().cpu().contiguous(), "frames": frames.cpu().contiguous()}, f"{work}/out.safetensors")
heavy = [m for m in ("torch._dynamo.convert_frame", "torch._inductor.codecache", "diffusers", "transformers")
         if m in sys.modules]
print("RESULT " + json.dumps({"import_torch_s": t1 - t0, "weights_read_and_moved_s": t2 - t1,
      "package_load_s": t3 - t2, "weights_bound_s": t4 - t3, "first_run_s": t5 - t4,
      "steady_run_ms": 1000 * statistics.median(steady), "to_first_output_s": t5 - t0,
      "constants": len(names), "heavy_modules_imported": heavy}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", choices=["tiny", "random"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import torch
    from safetensors.torch import save_file

    from promptus.backends.compile_cache import CompileOptions
    from promptus.backends.segment_step import SegmentStep, shared_prefix_problem
    from promptus.files import write_json_atomic
    from promptus.metrics import psnr
    from promptus.models import full_size_random_models, tiny_models
    from promptus.schedule import OneStep

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    models = (full_size_random_models(device, torch.float32) if args.model == "random" else tiny_models()).to(
        device, dtype)
    opts = CompileOptions()  # the compile backend's layout: shared prefix, channels-last UNet and TAESD
    shared = opts.shared_prefix and not shared_prefix_problem(models.unet)
    for module, cl in ((models.unet, opts.unet_channels_last), (models.taesd.decoder, opts.taesd_channels_last)):
        module.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
    step = SegmentStep(models.unet, models.taesd.decoder, OneStep.at(999), dtype, shared_prefix=shared,
                       unet_channels_last=opts.unet_channels_last,
                       taesd_channels_last=opts.taesd_channels_last).eval()
    h = args.size // 8
    g = torch.Generator().manual_seed(1)
    inputs = {"z_prev": torch.randn(1, 4, h, h, generator=g), "noise": torch.randn(1, 4, h, h, generator=g),
              "mix": torch.tensor(0.05), "context": torch.randn(args.batch, 77, models.geometry().embed_dim,
                                                                 generator=g)}
    dev_args = tuple(inputs[k].to(device) for k in ("z_prev", "noise", "mix", "context"))
    with torch.no_grad():
        ref_x0, ref_frames = step(*dev_args)
    result = {"benchmark": "aoti probe", "model": args.model, "device": str(device),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "size": args.size, "batch": args.batch, "dtype": str(dtype)}
    with tempfile.TemporaryDirectory(prefix="aoti-probe-") as work, torch.no_grad():
        t0 = time.perf_counter()
        ep = torch.export.export(step, dev_args, strict=False)
        result["export_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        from promptus.backends.aoti_backend import WRAPPER_OPT_LEVEL, aoti_compiler

        cxx, why = aoti_compiler()  # the compiler whose libraries run in this Python (the backend's choice)
        if why:
            raise SystemExit(f"aoti probe: {why}")
        configs = {"aot_inductor.package_constants_in_so": False, "cpp.cxx": (None, cxx)}
        if hasattr(torch._inductor.config.aot_inductor, "compile_wrapper_opt_level"):
            configs["aot_inductor.compile_wrapper_opt_level"] = WRAPPER_OPT_LEVEL
        result["cxx"] = cxx
        torch._inductor.aoti_compile_and_package(ep, package_path=f"{work}/step.pt2", inductor_configs=configs)
        result["aoti_build_s"] = time.perf_counter() - t1
        result["package_mb"] = os.path.getsize(f"{work}/step.pt2") / 1e6
        state = ep.state_dict
        cl = {k: bool(v.dim() == 4 and not v.is_contiguous() and v.is_contiguous(memory_format=torch.channels_last))
              for k, v in state.items()}
        save_file({k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.cpu().contiguous()
                   for k, v in state.items()}, f"{work}/weights.safetensors")
        save_file({k: v.contiguous() for k, v in inputs.items()}, f"{work}/inputs.safetensors")
        Path(work, "spec.json").write_text(json.dumps({"dtype": str(dtype).removeprefix("torch."), "constants": cl}))
        proc = subprocess.run([sys.executable, "-c", CHILD, work, str(device)], capture_output=True, text=True,
                              timeout=600)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            result["status"] = f"fresh process failed: {proc.stderr.strip()[-600:]}"
        else:
            result.update(json.loads(line[len("RESULT "):]), status="ok")
            from safetensors.torch import load_file

            out = load_file(f"{work}/out.safetensors")
            result["max_abs_dx0"] = (out["x0"] - ref_x0.float().cpu()).abs().max().item()
            result["frames_psnr_db"] = float(psnr(ref_frames.cpu(), out["frames"]).min())
            result["frames_identical"] = bool(torch.equal(out["frames"], ref_frames.cpu()))
    print(f"{result['gpu']}, torch {result['torch']}, model {args.model}, {args.size} px, batch {args.batch}: "
          f"export {result['export_s']:.1f} s, AOTInductor build {result['aoti_build_s']:.1f} s, "
          f"package {result['package_mb']:.1f} MB")
    if result["status"] != "ok":
        print(result["status"])
    else:
        print("fresh process (torch + safetensors only): " + ", ".join(
            f"{k.removesuffix('_s')} {result[k]:.2f} s" for k in
            ("import_torch_s", "weights_read_and_moved_s", "package_load_s", "weights_bound_s", "first_run_s")))
        print(f"first output {result['to_first_output_s']:.2f} s after the interpreter started running the script; "
              f"steady {result['steady_run_ms']:.2f} ms per step; frames {result['frames_psnr_db']:.1f} dB against "
              f"the eager step (identical: {result['frames_identical']}), max |dx0| {result['max_abs_dx0']:.2e}; "
              f"heavy modules imported: {result['heavy_modules_imported'] or 'none'}")
    if args.json:
        write_json_atomic(args.json, result)
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    raise SystemExit(main())
