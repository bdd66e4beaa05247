"""``promptus engines build|list|clean``: the cached TensorRT engines and compiled decoders.

``build`` exports and builds the engines ahead of time (the tensorrt backend otherwise
builds them on first use; ``--backend compile`` prepares the compile backend's segment
step instead), ``list`` shows the cache and ``clean`` removes engines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import torch

from ..backends.onnx_export import COMPONENTS, PRECISIONS
from ..config import DEFAULT_ENGINE_DIR, CodecConfig

ACTIONS = ("build", "list", "clean")


def register(subparsers) -> None:
    """Add ``engines`` and its actions to ``subparsers`` (from ``add_subparsers``)."""
    codec = CodecConfig()
    p = subparsers.add_parser(
        "engines", help="build, list and clean the cached TensorRT engines and compiled decoders",
        description="TensorRT engines of the UNet and the TAESD decoder, and the compile backend's compiled segment "
                    "step (in ENGINE_DIR/compiled/), for one batch, frame size and GPU, cached in the engine folder "
                    "and built automatically on first use. 'build' builds them ahead of time; 'list' shows the "
                    "cache; 'clean' removes engines.",
    )
    p.set_defaults(func=run, engines_command=None, engines_help=p.format_help)
    sub = p.add_subparsers(dest="engines_command", metavar="ACTION")

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--engine-dir", default=DEFAULT_ENGINE_DIR,
                       help=f"folder of the engine cache (default: {DEFAULT_ENGINE_DIR})")

    def model_args(q: argparse.ArgumentParser, default: str | None) -> None:
        q.add_argument("--model", default=default,
                       help="model weights: 'auto' (checkpoints/), 'tiny' (built-in test model), 'random' (full-size "
                            "architecture, random weights), a .safetensors file, a diffusers folder or a hub id"
                            + (f" (default: {default})" if default else ""))
        q.add_argument("--taesd", default=None, help="TAESD weights (default: checkpoints/taesd)")
        q.add_argument("--checkpoints", default="checkpoints", help="folder searched by --model auto")

    b = sub.add_parser("build", help="export and build the engines now (skips those already cached)",
                       description="Export the UNet and the TAESD decoder to ONNX and build TensorRT engines for a "
                                   "fixed batch and frame size. With tensorrt_rtx this works without a GPU "
                                   "(portable engines for compute capability 8.0/8.6/8.9/12.x).")
    model_args(b, "auto")
    b.add_argument("--size", type=int, default=codec.width,
                   help=f"frame size in pixels: the clip's (default: {codec.width})")
    b.add_argument("--batch", type=int, default=codec.interval,
                   help=f"frames per engine call: the clip's keyframe interval (default: {codec.interval})")
    b.add_argument("--component", choices=["all", *COMPONENTS], default="all", help="which engine (default: all)")
    b.add_argument("--precision", choices=list(PRECISIONS), default="fp16", help="engine precision (default: fp16)")
    b.add_argument("--device", default="auto",
                   help="where the models are loaded and exported, and whose GPU the engine targets: "
                        "cpu, cuda, cuda:N or auto (default)")
    b.add_argument("--flavour", choices=["auto", "tensorrt", "tensorrt_rtx"], default="auto",
                   help="TensorRT library: auto prefers tensorrt, then tensorrt_rtx")
    b.add_argument("--compute-capability", default="auto",
                   help="target GPU, e.g. 8.9; 'portable' (tensorrt_rtx default targets); auto: this machine's GPU, "
                        "or portable without one (default: auto)")
    b.add_argument("--backend", choices=["tensorrt", "compile", "aoti"], default="tensorrt",
                   help="tensorrt: TensorRT engines (default); compile: the compile backend's segment step "
                        "(torch.compile, about a minute on an H100/H200), which later processes load in seconds; "
                        "aoti: the aoti backend's AOTInductor package (also on the CPU)")
    b.add_argument("--autotune", action="store_true",
                   help="compile: inductor's max-autotune at build time (much longer build; see README)")
    b.add_argument("--force", action="store_true", help="rebuild even when a cached engine exists")
    b.add_argument("--keep-onnx", action="store_true", help="keep the ONNX files in ENGINE_DIR/onnx/")
    common(b)

    ls = sub.add_parser("list", help="show the cached engines and whether each is usable",
                        description="List the engine cache: key fields, size, and status (ok, corrupt, orphan, "
                                    "temp, or stale when built by another version of the installed TensorRT).")
    common(ls)
    model_args(ls, None)
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")

    c = sub.add_parser("clean", help="remove unusable engines (or more)",
                       description="Without options: remove unusable entries (corrupt, orphan, temporary files), "
                                   "engines of another version of the installed TensorRT and compiled steps of another "
                                   "torch or Triton. With --model/--size/--batch:"
                                   " also the engines that match all of them. With --all: everything, timing caches "
                                   "included. An engine's runtime cache (.rtcache) goes with it.")
    common(c)
    model_args(c, None)
    c.add_argument("--size", type=int, default=None, help="also remove engines of this frame size")
    c.add_argument("--batch", type=int, default=None, help="also remove engines of this batch")
    c.add_argument("--all", action="store_true", help="remove every engine")
    c.add_argument("--dry-run", action="store_true", help="only print what would be removed")


def run(args) -> int:
    if args.engines_command is None:
        print(args.engines_help())
        return 2
    return {"build": _build, "list": _list, "clean": _clean}[args.engines_command](args)


def _models(args, device: torch.device):
    from ..backends import default_dtype
    from ..models import full_size_random_models, load_models

    dtype = default_dtype(device)
    if args.model == "random":
        return full_size_random_models(device, dtype)
    return load_models(args.model, device=device, dtype=dtype, taesd=args.taesd, vae=False,
                       checkpoints_dir=args.checkpoints)


def _build_compiled(args) -> int:
    import dataclasses

    from ..backends import CompileBackend, default_dtype, resolve_device
    from ..backends.compile_cache import CompileOptions
    from ..errors import PromptusError

    device = resolve_device(args.device)
    if device.type != "cuda":
        raise PromptusError("engines build --backend compile prepares the decoder for a GPU: run it on a machine "
                            "with a CUDA GPU (--device cuda)")
    models = _models(args, device)
    options = dataclasses.replace(CompileOptions(), autotune=args.autotune)
    backend = CompileBackend(models.unet, models.taesd.decoder, device, default_dtype(device), cuda_graph=True,
                             batch=args.batch, options=options, engine_dir=args.engine_dir)
    prepared = backend.prepare(args.size, force=args.force)
    what = "loaded (already built)" if prepared.how == "loaded" else prepared.how
    size = f", {prepared.path.stat().st_size / 1e6:.1f} MB" if prepared.path else ""
    print(f"segment step (compile): {prepared.path or 'not stored'} ({what}{size}, {prepared.seconds:.1f} s)")
    return 0


def _build_aoti(args) -> int:
    from ..backends import default_dtype, resolve_device
    from ..backends.aoti_backend import AOTI_DECODER, AotiBackend, aoti_problem
    from ..backends.artifact_cache import ArtifactCache
    from ..config import CodecConfig
    from ..errors import PromptusError
    from ..schedule import OneStep

    device = resolve_device(args.device)
    why = aoti_problem(device)
    if why:
        raise PromptusError(f"engines build --backend aoti: {why}")
    models = _models(args, device)
    backend = AotiBackend(models.unet, models.taesd.decoder, device, default_dtype(device), batch=args.batch,
                          engine_dir=args.engine_dir)
    onestep = OneStep.at(CodecConfig(width=args.size, height=args.size).timestep)
    if args.force:
        ArtifactCache(AOTI_DECODER, args.engine_dir).evict(backend._key(args.size, onestep))
    how, secs = backend.prepare(args.size, onestep)
    what = "loaded (already built)" if how == "loaded" else how
    print(f"segment step (aoti): {backend._key(args.size, onestep).stem}.pt2 in {args.engine_dir}/aoti/ "
          f"({what}, {secs:.1f} s)")
    return 0


def _build(args) -> int:
    from ..backends import resolve_device
    from ..backends.trt_build import find_tensorrt, get_or_build

    if args.backend == "compile":
        return _build_compiled(args)
    if args.backend == "aoti":
        return _build_aoti(args)
    device = resolve_device(args.device)
    found = find_tensorrt(args.flavour)
    models = _models(args, device)
    components = list(COMPONENTS) if args.component == "all" else [args.component]
    for component in components:
        t0 = time.perf_counter()
        path = get_or_build(models, component, batch=args.batch, size=args.size, dtype=PRECISIONS[args.precision],
                            engine_dir=args.engine_dir, flavour=found, compute_capability=args.compute_capability,
                            device=device, force=args.force, keep_onnx=args.keep_onnx)
        print(f"{component}: {path} ({path.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s)")
    return 0


def _installed_versions() -> dict[str, str]:
    from ..backends.trt_build import FLAVOURS, TensorRTError, find_tensorrt

    out = {}
    for name in FLAVOURS:
        with contextlib.suppress(TensorRTError):
            found = find_tensorrt(name)
            out[found.name] = found.version
    return out


def _model_digests(args) -> set[str] | None:
    """The digests entries of ``--model`` are keyed by: its weights (engines) and its architecture
    (compiled steps, which hold no weights); ``None`` without --model."""
    if not getattr(args, "model", None):
        return None
    from ..backends.compile_cache import architecture_digest

    models = _models(args, torch.device("cpu"))
    return {models.identity().hexdigest, architecture_digest(models.unet, models.taesd.decoder)}


def _rows(args) -> list[dict]:
    from ..backends.artifact_cache import list_artifacts

    wanted = _model_digests(args)
    rows = []
    for e in list_artifacts(args.engine_dir, installed=_installed_versions()):
        k = e.key
        if wanted and (k is None or k.model_digest not in wanted):
            continue
        model_name = e.sidecar.get("model_name") or ("architecture" if e.kind.name != "tensorrt_engine" else "")
        rows.append({"kind": e.kind.name, "file": os.path.relpath(e.path, args.engine_dir), "status": e.status,
                     "reason": e.reason, "mb": round(e.nbytes / 1e6, 1), "created": e.created,
                     "what": k.summary() if k else "", "toolkit": k.toolkit() if k else "",
                     "model": f"{model_name} {k.model_digest[:12]}".strip() if k else "",
                     "key": k.as_dict() if k else None, "build_seconds": e.sidecar.get("build_seconds"),
                     "_title": e.kind.title})
    return rows


def _list(args) -> int:
    rows = _rows(args)
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows], indent=2))
        return 0
    if not rows:
        print(f"the engine cache {Path(args.engine_dir)}/ holds no engines or compiled steps (decode --backend "
              "tensorrt or compile, or 'promptus engines build', makes them)")
        return 0
    header = ("kind", "key", "built with", "model", "MB", "created", "status")
    table = [header] + [
        (r["_title"], r["what"] or r["file"], r["toolkit"], r["model"], f"{r['mb']:.1f}", r["created"][:16],
         r["status"] + (f": {r['reason']}" if r["reason"] else ""))
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    print(f"{len(rows)} entr{'y' if len(rows) == 1 else 'ies'} in {args.engine_dir}")
    return 0


def _clean(args) -> int:
    from ..backends.artifact_cache import clean_artifacts

    wanted = _model_digests(args)
    filters = [f for f in (
        (lambda k: k.model_digest in wanted) if wanted else None,
        (lambda k: k.size == args.size) if args.size is not None else None,
        (lambda k: k.batch == args.batch) if args.batch is not None else None,
    ) if f is not None]
    match = (lambda k: all(f(k) for f in filters)) if filters else None
    removed = clean_artifacts(args.engine_dir, everything=args.all, match=match, installed=_installed_versions(),
                              dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for p in removed:
        print(f"{verb} {p}")
    print(f"{verb} {len(removed)} file{'s' if len(removed) != 1 else ''} from {args.engine_dir}")
    return 0
