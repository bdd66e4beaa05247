"""The ``aoti`` backend: the segment step compiled ahead of time by AOTInductor.

The ``compile`` backend's stored step (``torch.compile(...).aot_compile``) needs
``torch._dynamo`` to load, seconds of imports on every start. This backend exports the
same :class:`~promptus.backends.segment_step.SegmentStep` (mix → UNet → x0 → TAESD → uint8,
the same levers: shared prefix, channels-last layouts) with ``torch.export`` and compiles it
with AOTInductor into a package (a zip holding a shared library) that leaves the weights out.
The package is stored in the artifact cache (``<engine_dir>/aoti/``, kind
:data:`AOTI_DECODER`, keyed as a compiled step with mechanism ``"aoti"``) and loaded by
torch's C++ loader (``torch._C._aoti.AOTIModelPackageLoader``), which imports neither
``torch._inductor`` nor ``torch._dynamo``; the weights are bound by name from the networks,
or, from the second decode of a weights file on, read straight from the files
(:meth:`AotiBackend.from_files`: no networks built, no diffusers imported).
``scripts/aoti_probe.py`` measures that path in a fresh process.

The package's C++ is built by a compiler that passed :func:`compiler_probe` (on an H100 host
torch's own choice made packages that crashed the process on loading), with the generated
wrapper at -O0 (:data:`WRAPPER_OPT_LEVEL`); each new package is loaded once in a fresh Python
before it is stored.

Measured on an H100 (torch 2.11, full-size random weights read from a file, 512², batch 10;
``benchmarks/decode_command_aoti_h100.json``): build 104 s, checks included; a later
``promptus decode`` has its first segment 3.5-4.4 s after the process starts; 341 frames/s
GPU-resident against ``compile``'s 356 in the same run, 71.1 dB against the fp32 pipeline.
``auto`` uses it on CUDA before ``compile``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

from ..config import DEFAULT_ENGINE_DIR
from ..errors import PromptusError
from ..files import TMP_PREFIX
from ..schedule import OneStep
from .artifact_cache import ArtifactCache, ArtifactKind, register_kind
from .base import Backend
from .compile_cache import (
    BuildProgress, CompileKey, CompileOptions, architecture_digest, make_key, resolve_options, stale_reason,
)

log = logging.getLogger(__name__)

#: Seconds an AOTInductor build of the full-size step is expected to take where no earlier build says otherwise.
TYPICAL_BUILD_SECONDS = 105.0
MECHANISM = "aoti"

#: The optimisation level of the package's generated wrapper (the function that launches the kernels, not the
#: kernels themselves). At g++'s -O1, torch's default, the full-size step's wrapper compiled for minutes on an
#: H100 host (a build stopped after 8); at -O0 the whole package builds in 60-80 s.
WRAPPER_OPT_LEVEL = "O0"
#: A C++ compiler for the package, used as given (no libstdc++ check; see :func:`aoti_compiler`).
CXX_ENV = "PROMPTUS_AOTI_CXX"


#: What the compiler probe builds: a ``std::regex`` with a bracket expression, the code where packages built
#: against newer libstdc++ headers than the process runs with crashed (:func:`aoti_compiler`).
_PROBE_SOURCE = r"""
#include <regex>
#include <string>
extern "C" int promptus_probe(void) {
  std::regex device("^([a-z]+)(:([0-9]+))?$");
  std::smatch m;
  std::string s("cuda:0");
  return std::regex_match(s, m, device) && m[3] == "0" ? 7 : 1;
}
"""
#: The probe's library is called in a fresh Python that has torch (and so its libstdc++) loaded first.
_PROBE_RUN = "import ctypes, sys, torch; sys.stdout.write(str(ctypes.CDLL(sys.argv[1]).promptus_probe()))"


def _fresh_python(code: str, *args: str, expect: str, timeout: float, crashed: str, failed: str,
                  not_run: str) -> str | None:
    """Run ``code`` in a fresh Python (``sys.argv[1:]`` = ``args``): None when it prints ``expect``, else the
    message for how it ended — ``crashed``, ``failed`` or ``not_run`` with ``{}`` filled in (the signal, its
    last words, why it did not run). A crash in the child is a crash, not an exception, hence the child."""
    try:
        ran = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                             check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return not_run.format(f"{type(e).__name__}: {e}")
    if ran.returncode < 0:
        return crashed.format(f"signal {-ran.returncode}")
    if ran.returncode or ran.stdout.strip() != expect:
        lines = [ln for ln in (ran.stderr or ran.stdout).strip().splitlines() if ln.strip()]
        return failed.format((lines[-1] if lines else "no message")[-300:])
    return None


def compiler_probe(cxx: str) -> str | None:
    """None if a shared library that ``cxx`` builds runs ``std::regex`` right in a fresh Python with torch
    loaded, else why not."""
    with tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}cxx-") as tmp:
        src, lib = Path(tmp) / "probe.cpp", Path(tmp) / "probe.so"
        src.write_text(_PROBE_SOURCE)
        try:
            built = subprocess.run([cxx, "-std=c++17", "-O1", "-shared", "-fPIC", str(src), "-o", str(lib)],
                                   capture_output=True, text=True, timeout=180, check=False)
        except (OSError, subprocess.SubprocessError) as e:
            return f"could not run it ({type(e).__name__}: {e})"
        if built.returncode:
            return f"could not build the probe: {(built.stderr.strip() or 'no message')[-200:]}"
        return _fresh_python(_PROBE_RUN, str(lib), expect="7", timeout=180,
                             crashed="its library crashed a Python running torch ({})",
                             failed="its library failed in a Python running torch ({})",
                             not_run="could not run it ({})")


#: A fresh Python loads the package just built (argv: path, device index) before it is stored.
_LOAD_CHECK = ("import sys, torch; torch._C._aoti.AOTIModelPackageLoader(sys.argv[1], 'model', False, 1, "
               "int(sys.argv[2])); sys.stdout.write('loaded')")


def package_load_problem(data: bytes, device: torch.device) -> str | None:
    """None if a fresh Python loads the package ``data`` for ``device``, else why not. Run once per build, before
    the package is stored: a package that crashes its loader would otherwise crash every later decode (on an
    H100 host, every package from torch's compiler did: :func:`aoti_compiler`)."""
    index = device.index if device.index is not None else (
        torch.cuda.current_device() if device.type == "cuda" else -1)
    with tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}aoti-check-") as tmp:
        path = Path(tmp) / "step.pt2"
        path.write_bytes(data)
        return _fresh_python(_LOAD_CHECK, str(path), str(index), expect="loaded", timeout=600,
                             crashed="loading it crashed a fresh Python ({})",
                             failed="a fresh Python could not load it ({})",
                             not_run="the check could not run ({})")


@functools.lru_cache(maxsize=None)
def aoti_compiler() -> tuple[str | None, str | None]:
    """(the C++ compiler to build packages with, None) or (None, why none will do); probed once per process.

    A package is a shared library compiled against one libstdc++'s headers that then runs against the
    libstdc++ the Python process has loaded. Headers newer than that library crash the process when the
    package loads: on the H100 host of this project's measurements torch picked ``/opt/gcc/bin/g++`` while
    Python ran the system's ``libstdc++.so.6.0.33`` (``g++`` 13), and every package, a tiny one too, died
    with SIGSEGV in ``std::regex`` (``parse_device_str``) inside the loader; the same package built with
    ``/usr/bin/g++`` loaded and ran. So each candidate — torch's choice, then ``g++``, ``c++`` and
    ``clang++`` on PATH, ``/usr/bin/g++`` and ``/usr/bin/c++`` — must pass :func:`compiler_probe`.
    ``$PROMPTUS_AOTI_CXX`` names a compiler to use unprobed."""
    forced = os.environ.get(CXX_ENV)
    if forced:
        return forced, None
    candidates: list[str | None] = []
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        candidates.append(get_cpp_compiler())
    except Exception as e:  # noqa: BLE001 - torch without it: the PATH candidates remain
        log.debug("aoti: torch's compiler unknown (%s)", e)
    candidates += ["g++", "c++", "clang++", "/usr/bin/g++", "/usr/bin/c++"]
    failed: list[str] = []
    seen: set[str] = set()
    for cxx in candidates:
        path = shutil.which(cxx) if cxx else None
        if not path or os.path.realpath(path) in seen:
            continue
        seen.add(os.path.realpath(path))
        why = compiler_probe(path)
        if why is None:
            if failed:
                log.warning("aoti: building with %s (%s)", path, "; ".join(failed))
            return path, None
        failed.append(f"{path}: {why}")
    return None, ("no C++ compiler here builds a library that runs in this Python"
                  + (f" ({'; '.join(failed)})" if failed else " (none found)")
                  + f"; install a g++ that matches the libstdc++ torch runs with, or set {CXX_ENV}")


#: The ``aoti`` backend's packages, in ``<engine_dir>/aoti/``.
AOTI_DECODER = register_kind(ArtifactKind(
    "aoti_decoder", "AOTInductor decoder", CompileKey, subdir="aoti", suffix=".pt2", format=2, stale=stale_reason))


def aoti_problem(device: torch.device | str) -> str | None:
    """Why this torch cannot build or load AOTInductor packages for ``device`` (None if it can)."""
    device = torch.device(device)
    if not hasattr(torch._C, "_aoti") or not hasattr(torch._C._aoti, "AOTIModelPackageLoader"):
        return f"torch {torch.__version__} has no AOTInductor package loader (needs torch >= 2.6)"
    # find_spec, not hasattr: torch imports a submodule on attribute access, and torch._inductor brings Dynamo
    # (1.1 s here, ~1 s of auto's start on an H100 host, the import the aoti backend exists to avoid).
    if importlib.util.find_spec("torch._inductor") is None or importlib.util.find_spec("torch.export") is None:
        return "torch.export or AOTInductor is missing"
    if device.type not in ("cpu", "cuda"):
        return f"AOTInductor runs on the CPU and CUDA GPUs, not {device.type}"
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")) and not os.environ.get(CXX_ENV):
        return "AOTInductor compiles C++ and no C++ compiler (g++, c++ or clang++) is on PATH"
    return None


class AotiBackend(Backend):
    """The segment step as an AOTInductor package (module docstring). One package per batch, frame size,
    timestep and dtype; frame 0 (a segment of one) is padded to the batch, as the compile backend does."""

    name = "aoti"
    stages_compiled = False  # no single stages (denoise, decode): the package is the whole segment step

    def __init__(self, unet, taesd_decoder, device, dtype, *, batch: int, options: CompileOptions | None = None,
                 engine_dir: str | os.PathLike = DEFAULT_ENGINE_DIR, progress: bool = True, fallback: bool = False):
        super().__init__(device, dtype)
        self.fallback = fallback  # a package that cannot be built or loaded: the step runs uncompiled (auto)
        from .segment_step import shared_prefix_problem

        options = options or CompileOptions()
        problem = shared_prefix_problem(unet) if options.shared_prefix else None
        self.options = resolve_options(options, problem, self.device)
        self.unet = torch.nn.Module.to(unet, self.device, dtype).eval().requires_grad_(False)
        self.taesd_decoder = torch.nn.Module.to(taesd_decoder, self.device, dtype).eval().requires_grad_(False)
        for module, cl in ((self.unet, self.options.unet_channels_last),
                           (self.taesd_decoder, self.options.taesd_channels_last)):
            module.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        self.batch = int(batch)
        self.engine_dir = engine_dir
        self.progress = progress
        self._runners: dict[tuple, tuple] = {}
        self.prepared: tuple[str, float] | None = None  # (how: "loaded" | "built", seconds) of the last package

    # ------------------------------------------------------------------ building and loading

    def _step(self, onestep: OneStep):
        from .segment_step import SegmentStep

        return SegmentStep(self.unet, self.taesd_decoder, onestep, self.dtype,
                           shared_prefix=self.options.shared_prefix,
                           unet_channels_last=self.options.unet_channels_last,
                           taesd_channels_last=self.options.taesd_channels_last).eval()

    def _key(self, size: int, onestep: OneStep) -> CompileKey:
        digest = architecture_digest(self.unet, self.taesd_decoder)
        return make_key(digest, batch=self.batch, size=size, dtype=self.dtype, timestep=onestep.timestep,
                        device=self.device, mechanism=MECHANISM, options=self.options, kind=AOTI_DECODER)

    def _example(self, size: int):
        from ..config import CodecConfig

        c = CodecConfig(width=size, height=size)
        h = size // c.latent_factor
        g = torch.Generator().manual_seed(0)
        z = torch.randn(1, c.latent_channels, h, h, generator=g).to(self.device)
        embed = self.geometry.embed_dim if self.geometry is not None else self.unet.config.cross_attention_dim
        ctx = torch.randn(self.batch, c.tokens, embed, generator=g).to(self.device)
        return z, z.clone(), torch.tensor(0.0, device=self.device), ctx

    def _build(self, step, size: int, cxx: str) -> bytes:
        example = self._example(size)
        with tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}aoti-") as tmp, torch.no_grad():
            ep = torch.export.export(step, example, strict=False)
            configs: dict = {"aot_inductor.package_constants_in_so": False}
            if hasattr(torch._inductor.config.aot_inductor, "compile_wrapper_opt_level"):
                configs["aot_inductor.compile_wrapper_opt_level"] = WRAPPER_OPT_LEVEL
            configs["cpp.cxx"] = (None, cxx)
            path = torch._inductor.aoti_compile_and_package(ep, package_path=str(Path(tmp) / "step.pt2"),
                                                            inductor_configs=configs)
            return Path(path).read_bytes()

    def _open(self, data: bytes):
        """The C++ runner of a package's bytes (the loader reads a file: a private temporary one)."""
        folder = Path(tempfile.gettempdir())
        path = folder / f"{TMP_PREFIX}aoti-{os.getpid()}-{uuid.uuid4().hex[:8]}.pt2"
        try:
            path.write_bytes(data)
            index = self.device.index if self.device.index is not None else (
                torch.cuda.current_device() if self.device.type == "cuda" else -1)
            return torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, index)
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _load(self, data: bytes, step):
        """The C++ runner of a package's bytes, with the step's weights bound by name."""
        runner = self._open(data)
        state = step.state_dict()
        names = runner.get_constant_fqns()
        missing = [n for n in names if n not in state]
        if missing:
            raise PromptusError(f"the AOTInductor package wants weights the networks lack: {missing[:3]}")
        runner.load_constants({n: state[n] for n in names}, False, True, True)  # user-managed: no copies
        return runner

    def prepare(self, size: int, onestep: OneStep | None = None):
        """Load (or build and store) the package for ``size``-pixel frames now rather than at the first segment."""
        from ..config import CodecConfig

        onestep = onestep or OneStep.at(CodecConfig(width=size, height=size).timestep)
        self._runner(size, onestep)
        return self.prepared

    def _runner(self, size: int, onestep: OneStep):
        slot = (size, onestep.timestep)
        hit = self._runners.get(slot)
        if hit is not None:
            return hit[0]
        if self.unet is None:
            made = ", ".join(f"{sz} px at timestep {ts}" for sz, ts in self._runners)
            raise PromptusError(f"aoti backend: started without the networks for {made}; a clip of {size} px at "
                                f"timestep {onestep.timestep} needs them (decode it in another process)")
        t0 = time.perf_counter()
        step = self._step(onestep)
        key = self._key(size, onestep)
        cache = ArtifactCache(AOTI_DECODER, self.engine_dir)
        data = cache.read(key)
        runner, how = None, "loaded"
        if data is not None:
            try:
                runner = self._load(data, step)
            except Exception as e:  # noqa: BLE001 - a stored package that fails to load is rebuilt
                log.warning("aoti: %s could not be loaded (%s: %s); rebuilding it", cache.path(key).name,
                            type(e).__name__, str(e)[:200])
                cache.evict(key)
        if runner is None:
            try:
                runner, how = self._build_and_store(step, key, cache, size), "built"
            except Exception as e:  # noqa: BLE001 - auto's fallback; a backend named by the user raises
                if not self.fallback:
                    raise
                log.warning("%s; running the segment step uncompiled", e)
                runner, how = _Uncompiled(step), "uncompiled"
        self.prepared = (how, time.perf_counter() - t0)
        log.info("aoti backend: %s %s in %.1f s", how, cache.path(key).name, self.prepared[1])
        self._runners[slot] = (runner, step)  # the step holds the tensors the runner reads
        return runner

    def _build_and_store(self, step, key: CompileKey, cache: ArtifactCache, size: int):
        """A new package of ``step``, checked to load in a fresh Python, stored, and its runner."""
        cxx, why = aoti_compiler()
        if why:
            raise PromptusError(f"aoti backend: {why}; or use --backend compile or torch")
        with BuildProgress(f"aoti backend (batch {self.batch}, {size} px)", TYPICAL_BUILD_SECONDS,
                           "the full-size step took 104 s on an H100 host, checks included",
                           enabled=self.progress) as bar:
            try:
                data = self._build(step, size, cxx)
            except Exception as e:  # noqa: BLE001 - say what failed and what to use instead
                raise PromptusError(f"aoti backend: building the segment step failed ({type(e).__name__}: "
                                    f"{str(e)[:300]}); use --backend compile or torch") from e
        why = package_load_problem(data, self.device)
        if why:
            raise PromptusError(f"aoti backend: the package just built does not load: {why}. It was not "
                                f"stored; use --backend compile or torch")
        cache.store(key, data, build_seconds=round(bar.elapsed, 2), cxx=cxx)
        return self._load(data, step)

    @classmethod
    def from_files(cls, *, architecture: str, prefix_problem: str | None, unet_file: Path, taesd_file: Path,
                   device, dtype: torch.dtype, batch: int, size: int, timestep: int,
                   engine_dir: str | os.PathLike = DEFAULT_ENGINE_DIR,
                   unet_names: dict[str, str] | None = None, profile=None) -> "AotiBackend | None":
        """The backend straight from a stored package and diffusers-format weights files — no networks built,
        no diffusers imported: each constant ``unet.<name>`` is the UNet file's ``<name>``, each
        ``taesd_decoder.<name>`` the TAESD file's ``decoder.<name>``, cast to ``dtype`` and laid out as the
        options say. ``architecture`` and ``prefix_problem`` are what the weights memo remembers of the networks
        (:func:`promptus.startup.architecture_facts`). None (nothing to fall back from) when the package is
        not stored or a file lacks a constant under that name; then the caller loads the networks.
        ``unet_names``: for an original (LDM) single file, each UNet name's name in the file
        (:func:`promptus.models.loading.ldm_unet_names`, remembered by the weights memo).
        ``profile``: a :class:`promptus.startup.StartupProfile` that gets the package's load and the weights'
        read and move as two phases."""
        phase = profile.phase if profile is not None else (lambda name: contextlib.nullcontext())
        t0 = time.perf_counter()
        device = torch.device(device)
        options = resolve_options(CompileOptions(), prefix_problem, device, announce=False)
        key = make_key(architecture, batch=batch, size=size, dtype=dtype, timestep=timestep, device=device,
                       mechanism=MECHANISM, options=options, kind=AOTI_DECODER)
        data = ArtifactCache(AOTI_DECODER, engine_dir).check(key)[0]
        if data is None:
            return None
        self = cls.__new__(cls)
        Backend.__init__(self, device, dtype)
        self.options, self.batch, self.engine_dir, self.progress = options, int(batch), engine_dir, False
        self.unet = self.taesd_decoder = None
        try:
            with phase("aoti: package load"):
                runner = self._open(data)
        except Exception as e:  # noqa: BLE001 - the networks' path loads it again, and rebuilds a bad one
            log.warning("aoti: the stored package did not load (%s: %s); loading the networks", type(e).__name__,
                        str(e)[:200])
            return None
        sources = {"unet.": (unet_file, "", options.unet_channels_last),
                   "taesd_decoder.": (taesd_file, "decoder.", options.taesd_channels_last)}
        with phase("aoti: weights files to the device"):
            constants = self._constants_from_files(runner, sources, device, dtype, unet_names)
        if constants is None:
            return None
        try:
            runner.load_constants(constants, False, True, True)
        except Exception as e:  # noqa: BLE001 - shapes or dtypes the package does not take: load the networks
            log.warning("aoti: the weights files do not fit the stored package (%s); loading the networks",
                        str(e)[:200])
            return None
        self._runners = {(size, timestep): (runner, constants)}
        self.prepared = ("loaded without the networks", time.perf_counter() - t0)
        log.info("aoti backend: %s %s in %.1f s", self.prepared[0], key.stem, self.prepared[1])
        return self

    @staticmethod
    def _constants_from_files(runner, sources: dict, device, dtype, unet_names) -> dict | None:
        """Each constant the package wants, read from its weights file, on ``device`` in ``dtype`` and the
        layout the options say; None when a file is not safetensors or lacks a name."""
        from safetensors import safe_open

        constants = {}
        try:
            handles = {prefix: safe_open(str(path), framework="pt", device="cpu")
                       for prefix, (path, _, _) in sources.items()}
        except Exception as e:  # noqa: BLE001 - not a safetensors file: the networks are loaded instead
            log.debug("aoti: no direct start (%s)", e)
            return None
        for name in runner.get_constant_fqns():
            prefix = next((p for p in sources if name.startswith(p)), None)
            if prefix is None:
                return None
            _, inner, channels_last = sources[prefix]
            stored = inner + name[len(prefix):]
            if prefix == "unet." and unet_names is not None:
                stored = unet_names.get(name[len(prefix):], "")
            if stored not in handles[prefix].keys():
                log.debug("aoti: no direct start (%s lacks %s)", sources[prefix][0], stored)
                return None
            t = handles[prefix].get_tensor(stored).to(device)
            if t.is_floating_point():
                t = t.to(dtype)
            if channels_last and t.dim() == 4:
                t = t.contiguous(memory_format=torch.channels_last)
            constants[name] = t
        return constants

    # ------------------------------------------------------------------ running

    @torch.no_grad()
    def segment(self, z_prev, noise, mix, context, onestep):
        from ..config import CodecConfig

        n = context.shape[0]
        if n > self.batch:
            raise PromptusError(f"aoti backend: a segment of {n} frames, prepared for {self.batch}")
        size = z_prev.shape[-1] * CodecConfig.latent_factor
        runner = self._runner(size, onestep)
        if n < self.batch:  # frame 0: padded to the one shape the package has
            context = torch.cat([context, context[-1:].expand(self.batch - n, -1, -1)])
        z_prev = z_prev.float().contiguous()
        args = [z_prev, noise.float().contiguous(), self._mix_tensor(mix, z_prev), context.float().contiguous()]
        x0, frames = runner.run(args)
        return x0[n - 1:n].float(), frames[:n]

    def describe(self) -> str:
        return f"{self.name} ({self.device.type}, {str(self.dtype).removeprefix('torch.')}, AOTInductor)"


class _Uncompiled:
    """The segment step run as PyTorch code, in the place of a package's runner (``fallback``)."""

    def __init__(self, step):
        self.step = step

    def run(self, args):
        return list(self.step(*args))


__all__ = ["AOTI_DECODER", "AotiBackend", "aoti_problem"]
