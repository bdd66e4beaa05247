"""Compiled steps on disk: what a new process needs to skip ``torch.compile``.

The ``compile`` backend compiles one :class:`~promptus.backends.segment_step.SegmentStep`
(mix → UNet → x0 → TAESD → uint8) for a fixed batch and frame size. Compiling the
full-size UNet takes about a minute; this module builds, stores and loads the result so
that a later process on the same GPU loads it in seconds. The storage is the artifact
cache (:mod:`promptus.backends.artifact_cache`), with two kinds registered here: the
decoder's step in ``<engine_dir>/compiled/`` (:data:`COMPILED_DECODER`) and the
encoder's training step in ``<engine_dir>/trainer/`` (:data:`COMPILED_TRAINER`)::

    <stem>.bin     the artifact (see "Mechanisms")
    <stem>.json    its sidecar: the key, the artifact's size and SHA-256, build facts

``<stem>`` is readable (batch, size, dtype, torch version, compute capability) and ends
with a digest of the whole :class:`CompileKey`, which holds everything the artifact
depends on: the model architecture's digest (the artifact holds no weights), batch, size,
dtype, the torch and Triton versions, the GPU's name and compute capability, the
mechanism and the compile options. A truncated or damaged file, or one of another key,
is never trusted: it is removed with a message and rebuilt. Artifacts of another torch
or Triton version can never load again; ``promptus engines clean`` removes them.

**Mechanisms**, best first (:func:`available_mechanisms`):

* ``aot_compile`` — ``torch.compile(SegmentStep.forward, fullgraph=True).aot_compile(...)``
  (torch ≥ 2.10; seen working with 2.11 and 2.13): Dynamo, AOTAutograd, inductor and Triton all run at build time; the
  artifact (a few MB, no weights: the module is passed at call time) loads without
  tracing anything.
* ``cache_artifacts`` — ``torch.compiler.save_cache_artifacts()`` (torch ≥ 2.7):
  inductor's and Triton's caches of this build in one blob, loaded back with
  ``load_cache_artifacts``; Dynamo still traces the model in each new process.
* none (torch < 2.7): every process compiles again.

The artifacts are pickles written by torch, i.e. code: treat an engine folder like a
program folder and do not use one from an untrusted source.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import statistics
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..config import DEFAULT_ENGINE_DIR
from ..errors import PromptusError
from ..files import TMP_PREFIX
from .artifact_cache import (
    ArtifactCache, ArtifactCacheError, ArtifactKind, CacheEntry, CacheKey, clean_artifacts, list_artifacts,
    register_kind,
)

log = logging.getLogger(__name__)

#: Layout version of the sidecar; entries of another format are unusable.
COMPILE_FORMAT = 1
SUBDIR = "compiled"
TRAINER_SUBDIR = "trainer"
ARTIFACT_SUFFIX = ".bin"
MECHANISMS = ("aot_compile", "cache_artifacts")
#: Seconds a first build usually takes, by GPU family, when this folder has no earlier build to go by
#: (full-size SD-Turbo UNet + TAESD, batch 10, 512², measured; see README "Decoding").
TYPICAL_BUILD_SECONDS = 60.0
TYPICAL_AUTOTUNE_BUILD_SECONDS = 300.0


class CompileCacheError(PromptusError):
    """The compiled-decoder folder cannot be used (e.g. it is a file)."""


@dataclass(frozen=True)
class CompileOptions:
    """How the segment step is compiled (the levers measured in README "Decoding").

    Attributes:
        shared_prefix: compute the batch-invariant start of the UNet once per segment.
        unet_channels_last, taesd_channels_last: channels-last weights and activations per network.
        autotune: inductor's max-autotune (Triton templates and algorithm choice benchmarked
            at build time; the choices are stored with the artifact and reused).
        inductor: extra inductor options as sorted ``(name, value)`` pairs, e.g. ``("conv_1x1_as_mm", True)``.
        backend: the ``torch.compile`` backend (``"inductor"``; tests use ``"aot_eager"``).
        fullgraph: one graph for the whole step (needed by ``aot_compile``).
        attention: which fused attention kernel the graph bakes in (:data:`ATTENTION_CHOICES`):
            ``"default"`` torch's own order (flash attention first on Hopper), ``"cudnn"`` cuDNN's fused
            attention first where this torch and GPU offer it (:func:`attention_backends`).
    """

    shared_prefix: bool = True
    unet_channels_last: bool = True
    taesd_channels_last: bool = True
    autotune: bool = False
    inductor: tuple[tuple[str, Any], ...] = ()
    backend: str = "inductor"
    fullgraph: bool = True
    attention: str = "default"

    def __post_init__(self):
        object.__setattr__(self, "inductor", tuple(sorted((str(k), v) for k, v in dict(self.inductor).items())))
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention {self.attention!r}: choose one of {', '.join(ATTENTION_CHOICES)}")

    def inductor_options(self) -> dict[str, Any]:
        """Options for ``torch.compile(options=...)`` (inductor only)."""
        if self.backend != "inductor":
            return {}
        opts = {"max_autotune": True, "coordinate_descent_tuning": True} if self.autotune else {}
        opts.update(dict(self.inductor))
        return opts

    def describe(self) -> str:
        """Canonical one-line form (part of the cache key)."""
        parts = [self.backend]
        parts += [name for name, on in (("shared-prefix", self.shared_prefix), ("unet-cl", self.unet_channels_last),
                                        ("taesd-cl", self.taesd_channels_last), ("autotune", self.autotune),
                                        ("partial-graph", not self.fullgraph)) if on]
        parts += [f"{k}={v}" for k, v in self.inductor]
        if self.attention != "default":
            parts.append(f"attention={self.attention}")
        return ",".join(parts)


#: The fused-attention choices of :class:`CompileOptions`.
ATTENTION_CHOICES = ("default", "cudnn")


def attention_problem(choice: str, device: torch.device | str) -> str | None:
    """Why ``choice`` cannot be used on ``device`` with this torch (None if it can)."""
    if choice == "default":
        return None
    device = torch.device(device)
    if device.type != "cuda":
        return "cuDNN attention runs on CUDA GPUs only"
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention"
    import inspect

    if not hasattr(SDPBackend, "CUDNN_ATTENTION") or "set_priority" not in inspect.signature(sdpa_kernel).parameters:
        return f"torch {torch.__version__} cannot put cuDNN attention first (needs torch >= 2.6)"
    if not torch.backends.cudnn.is_available():
        return "cuDNN is not available"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "cuDNN fused attention needs a GPU of compute capability 8.0 or newer"
    return None


def resolve_options(options: CompileOptions, prefix_problem: str | None, device: torch.device | str, *,
                    announce: bool = True) -> CompileOptions:
    """``options`` with the levers that cannot run turned off (with a message where ``announce``): the shared
    prefix where ``prefix_problem`` (:func:`~promptus.backends.segment_step.shared_prefix_problem` of the UNet)
    says why not, an attention choice this GPU or torch lacks. The options a compiled step is built with and
    keyed by: the backend and the start-up's preload both resolve them here."""
    say = log.info if announce else log.debug
    if options.shared_prefix and prefix_problem:
        say("compile: the shared prefix is off for this UNet (%s)", prefix_problem)
        options = dataclasses.replace(options, shared_prefix=False)
    why = attention_problem(options.attention, device)
    if why:
        say("compile: %s attention is off (%s)", options.attention, why)
        options = dataclasses.replace(options, attention="default")
    return options


@contextlib.contextmanager
def attention_backends(choice: str):
    """Within the block, ``scaled_dot_product_attention`` prefers the kernel ``choice`` names: what a graph
    traced inside bakes in. ``"cudnn"``: cuDNN's fused attention first, then flash, memory-efficient and math
    attention for the shapes cuDNN refuses (measured on an H100 at the UNet's 4096-token self-attention,
    batch 10: 0.47 ms against flash attention's 0.77 ms)."""
    if choice == "default":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        yield


@dataclass(frozen=True)
class CompileKey(CacheKey):
    """Everything a compiled segment step depends on. Equal keys → interchangeable artifacts.

    Attributes:
        model_digest: :func:`architecture_digest` of the UNet and TAESD decoder. The artifact holds
            no weights (they are passed at every call), so it depends on the architecture — configs,
            parameter names, shapes and dtypes — not on the weight values: fine-tuned weights of the
            same architecture reuse it, and no 1.7 GB hash delays the start.
        batch, size: frames per segment and frame size in pixels.
        dtype: ``"fp16"`` or ``"fp32"``.
        timestep: the one denoising step's timestep (a constant inside the graph).
        torch_version, triton_version: the compiler that made it (``"none"`` without Triton).
        gpu, compute_capability: ``torch.cuda.get_device_name`` and ``"sm90"`` (``"cpu"`` on the CPU).
        mechanism: one of :data:`MECHANISMS`.
        options: :meth:`CompileOptions.describe`.
        format: :data:`COMPILE_FORMAT`.
    """

    model_digest: str
    batch: int
    size: int
    dtype: str
    timestep: int
    torch_version: str
    triton_version: str
    gpu: str
    compute_capability: str
    mechanism: str
    options: str
    format: int = COMPILE_FORMAT

    @property
    def stem(self) -> str:
        torch_v = self.torch_version.replace("+", "_")
        return f"segment_b{self.batch}_{self.size}px_{self.dtype}_torch-{torch_v}_{self.compute_capability}_{self.digest}"

    def describe(self) -> str:
        return (f"compiled segment step (batch {self.batch}, {self.size} px, {self.dtype}, {self.gpu}, "
                f"torch {self.torch_version}, {self.mechanism}, model {self.model_digest[:12]})")

    @property
    def target(self) -> str:
        """Compute capability and GPU model (just "cpu" on the CPU)."""
        return self.compute_capability + (f" {self.gpu}" if self.gpu != self.compute_capability else "")

    def summary(self) -> str:
        return f"segment, batch {self.batch}, {self.size} px, {self.dtype}, {self.target}"

    def toolkit(self) -> str:
        triton = f", Triton {self.triton_version}" if self.triton_version != "none" else ""
        return f"torch {self.torch_version}{triton} ({self.mechanism})"


@dataclass(frozen=True)
class TrainerKey(CompileKey):
    """Everything a compiled *training* step depends on (kind :data:`COMPILED_TRAINER`).

    The fields of :class:`CompileKey`, read for the trainer: ``model_digest`` the
    :func:`architecture_digest` of the networks the step differentiates through (UNet,
    TAESD decoder, VGG when the perceptual loss is on); ``batch`` the frames of one step
    (the segment length, 1 for keyframe 0); ``options`` everything else the graph bakes in,
    as one canonical string (compile mode, memory plan, loss weights), e.g.
    ``"reduce-overhead,plan=checkpoint-unet,perceptual"``.
    """

    @property
    def stem(self) -> str:
        torch_v = self.torch_version.replace("+", "_")
        return f"trainer_b{self.batch}_{self.size}px_{self.dtype}_torch-{torch_v}_{self.compute_capability}_{self.digest}"

    def describe(self) -> str:
        return (f"compiled trainer step (batch {self.batch}, {self.size} px, {self.dtype}, {self.gpu}, "
                f"torch {self.torch_version}, {self.mechanism}, {self.options}, model {self.model_digest[:12]})")

    def summary(self) -> str:
        return f"trainer, batch {self.batch}, {self.size} px, {self.dtype}, {self.target}, {self.options}"


def triton_version() -> str:
    """The installed Triton's version, or ``"none"``."""
    try:
        import triton
    except ImportError:
        return "none"
    return str(getattr(triton, "__version__", "unknown"))


def device_identity(device: torch.device) -> tuple[str, str]:
    """(GPU name, ``"smXY"``) for a CUDA device; ``("cpu", "cpu")`` otherwise."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu", "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"sm{major}{minor}"


def available_mechanisms() -> tuple[str, ...]:
    """The artifact mechanisms this torch offers, best first (module docstring)."""
    import importlib.util

    out = []
    # torch._dynamo.aot_compile: present from torch 2.10 (2.9 had it without inductor support)
    if hasattr(torch.compiler, "load_compiled_function") and importlib.util.find_spec("torch._dynamo.aot_compile"):
        out.append("aot_compile")
    if hasattr(torch.compiler, "save_cache_artifacts") and hasattr(torch.compiler, "load_cache_artifacts"):
        out.append("cache_artifacts")
    return tuple(out)


def architecture_digest(*modules: torch.nn.Module, dtype: torch.dtype | None = None) -> str:
    """16 hex digits of SHA-256 over each module's class, diffusers config and (name, shape, dtype) of
    every parameter and buffer — what a compiled step depends on besides the weight values (milliseconds).
    ``dtype``: the digest the modules will have once ``.to(dtype)`` casts their floating-point tensors
    (so that a key can be made while the weights are still on their way)."""
    h = hashlib.sha256(b"promptus-architecture-v1\n")
    for module in modules:
        h.update(f"{type(module).__module__}.{type(module).__qualname__}\n".encode())
        config = getattr(module, "config", None)
        if config is not None:
            public = {k: v for k, v in dict(config).items() if not k.startswith("_")}  # private keys hold sets
            h.update(json.dumps(public, sort_keys=True, default=str).encode())
        for name, t in module.state_dict(keep_vars=True).items():
            kind = dtype if dtype is not None and t.is_floating_point() else t.dtype
            h.update(f"{name}:{tuple(t.shape)}:{kind}\n".encode())
    return h.hexdigest()[:16]


def make_key(model_digest: str, *, batch: int, size: int, dtype: torch.dtype, timestep: int, device: torch.device,
             mechanism: str, options: CompileOptions | str, kind: ArtifactKind | str = "compiled_decoder") -> CompileKey:
    """The key (:class:`CompileKey`, or :class:`TrainerKey` for ``kind="compiled_trainer"``) for these
    settings on ``device`` with the installed torch and Triton; ``options``: a :class:`CompileOptions`
    or the canonical string that describes the compiled step's settings."""
    gpu, cc = device_identity(device)
    key_type = kind.key_type if isinstance(kind, ArtifactKind) else _KEY_TYPES[kind]
    return key_type(model_digest=model_digest, batch=int(batch), size=int(size),
                    dtype=str(dtype).removeprefix("torch.").replace("float", "fp"), timestep=int(timestep),
                    torch_version=str(torch.__version__), triton_version=triton_version(), gpu=gpu,
                    compute_capability=cc, mechanism=mechanism,
                    options=options if isinstance(options, str) else options.describe())


# --------------------------------------------------------------------------- storage


def stale_reason(key: CompileKey, installed: Mapping[str, str] | None = None) -> str | None:
    """Why an artifact of ``key`` can never load with the installed torch/Triton (``None`` if it can)."""
    if key.torch_version != torch.__version__:
        return f"made by torch {key.torch_version}, installed {torch.__version__}"
    if key.triton_version != triton_version():
        return f"made with Triton {key.triton_version}, installed {triton_version()}"
    return None


#: The compile backend's segment step, in ``<engine_dir>/compiled/``.
COMPILED_DECODER = register_kind(ArtifactKind(
    "compiled_decoder", "compiled decoder", CompileKey, subdir=SUBDIR, suffix=ARTIFACT_SUFFIX, format=COMPILE_FORMAT,
    stale=stale_reason))
#: The encoder's compiled training step, in ``<engine_dir>/trainer/``: key :class:`TrainerKey` (made with
#: :func:`make_key` ``(..., kind=COMPILED_TRAINER)``), artifacts built and loaded by :func:`prepare` with
#: ``kind=COMPILED_TRAINER``, or stored directly with ``ArtifactCache(COMPILED_TRAINER, engine_dir)``.
COMPILED_TRAINER = register_kind(ArtifactKind(
    "compiled_trainer", "compiled trainer", TrainerKey, subdir=TRAINER_SUBDIR, suffix=ARTIFACT_SUFFIX,
    format=COMPILE_FORMAT, stale=stale_reason))
_KEY_TYPES = {COMPILED_DECODER.name: CompileKey, COMPILED_TRAINER.name: TrainerKey}

#: What :func:`list_compiled` finds (the artifact cache's entry type).
CompiledEntry = CacheEntry
#: The compiled-step folders' errors are the artifact cache's.
CompileCacheError = ArtifactCacheError


class CompileCache(ArtifactCache):
    """Compiled steps of one kind (default: the decoder's, ``<engine_dir>/compiled/``): an :class:`ArtifactCache`."""

    def __init__(self, engine_dir: str | os.PathLike = DEFAULT_ENGINE_DIR, kind: ArtifactKind | str = COMPILED_DECODER):
        super().__init__(kind, engine_dir)

    def artifact_path(self, key: CompileKey) -> Path:
        return self.path(key)

    def typical_build_seconds(self, key: CompileKey, autotune: bool = False) -> tuple[float, str]:
        """How long a build of ``key`` usually takes: the median of earlier builds here on the same GPU
        with the same options, else a measured default. Returns (seconds, where the figure comes from)."""
        past = []
        for e in self.entries(verify=False):
            k = e.key
            if k is not None and k.gpu == key.gpu and k.options == key.options and k.size == key.size \
                    and isinstance(e.sidecar.get("build_seconds"), (int, float)):
                past.append(float(e.sidecar["build_seconds"]))
        if past:
            return statistics.median(past), f"{len(past)} earlier build(s) here"
        return (TYPICAL_AUTOTUNE_BUILD_SECONDS if autotune else TYPICAL_BUILD_SECONDS), "typical on an H100/H200"


def list_compiled(engine_dir: str | os.PathLike = DEFAULT_ENGINE_DIR, *, verify: bool = True,
                  kinds=(COMPILED_DECODER, COMPILED_TRAINER)) -> list[CacheEntry]:
    """Every compiled step (decoder and trainer) and stray file under ``engine_dir``
    (:func:`~promptus.backends.artifact_cache.list_artifacts`)."""
    return list_artifacts(engine_dir, kinds, verify=verify)


def clean_compiled(engine_dir: str | os.PathLike = DEFAULT_ENGINE_DIR, *, everything: bool = False,
                   match: Callable[[CompileKey], bool] | None = None, dry_run: bool = False,
                   kinds=(COMPILED_DECODER, COMPILED_TRAINER)) -> list[Path]:
    """Remove compiled steps (:func:`~promptus.backends.artifact_cache.clean_artifacts`): unusable ones
    (corrupt, orphan, stale), with ``everything`` every one, with ``match`` those whose key it accepts."""
    return clean_artifacts(engine_dir, kinds, everything=everything, match=match, dry_run=dry_run)


# --------------------------------------------------------------------------- building and loading


class BuildProgress:
    """Says what a first build is doing and how long it usually takes, with a progress bar.

    The compiler reports no progress of its own, so the bar runs on time against the
    expected duration (never past 99 % until the build is done); ``phase()`` names the step.
    """

    def __init__(self, what: str, expected_s: float, source: str, *, enabled: bool = True):
        self.what, self.expected, self.source, self.enabled = what, expected_s, source, enabled
        self._stop = threading.Event()
        self._desc = "compiling"
        self._bar = None
        self._thread: threading.Thread | None = None
        self.t0 = time.perf_counter()

    def __enter__(self) -> "BuildProgress":
        log.info("%s: compiling for this machine; this usually takes about %.0f s (%s). It is done once: later runs "
                 "load it in seconds.", self.what, self.expected, self.source)
        if self.enabled:
            from tqdm import tqdm

            tty = sys.stderr.isatty()
            self._bar = tqdm(total=round(self.expected), unit="s", desc=self._desc, leave=False,
                             mininterval=0.5 if tty else 15.0,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} of ~{total}s")
            self._thread = threading.Thread(target=self._tick, name="compile-progress", daemon=True)
            self._thread.start()
        return self

    def phase(self, desc: str) -> None:
        self._desc = desc
        log.debug("compile: %s", desc)

    def _tick(self) -> None:
        bar = self._bar
        while bar is not None and not self._stop.wait(0.5):
            if bar.desc != self._desc:
                bar.set_description_str(self._desc, refresh=False)
            # the bar is time against the expected duration: it stops at 99 % until the build is done
            target = min(round(time.perf_counter() - self.t0), max(bar.total - 1, 0))
            if target > bar.n:
                bar.update(target - bar.n)  # honours mininterval (few lines when stderr is a log file)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._bar is not None:
            self._bar.close()
        self.elapsed = time.perf_counter() - self.t0


def _serializable_guards(entries) -> list[bool]:
    """The guards an ``aot_compile`` artifact keeps: torch's default choice (no guards on globals,
    none of the types it cannot serialize) without identity guards (``ID_MATCH``) — diffusers'
    attention inspects its processor's code object while tracing, which cannot be serialized."""
    from torch._dynamo.guards import CheckFunctionManager

    unsupported = set(getattr(CheckFunctionManager, "UNSUPPORTED_SERIALIZATION_GUARD_TYPES", ())) | {"ID_MATCH"}
    return [not g.is_global and g.guard_type not in unsupported
            and not unsupported.intersection(getattr(g, "derived_guard_types", None) or ()) for g in entries]


def _no_guards(entries) -> list[bool]:
    return [False for _ in entries]


def _compile(target, options: CompileOptions, *, guard_filter=None):
    kwargs: dict[str, Any] = {"backend": options.backend, "fullgraph": options.fullgraph, "dynamic": False}
    opts = options.inductor_options()
    if guard_filter is not None:
        opts["guard_filter_fn"] = guard_filter
    if opts:
        kwargs["options"] = opts
    return torch.compile(target, **kwargs)


@contextlib.contextmanager
def _aot_enabled():
    """``torch.compile(...).aot_compile`` exists only with this flag on (off by default before torch 2.12)."""
    cfg = torch._dynamo.config
    if not hasattr(cfg, "enable_aot_compile"):
        yield
        return
    saved = cfg.enable_aot_compile
    cfg.enable_aot_compile = True
    try:
        yield
    finally:
        cfg.enable_aot_compile = saved


def build_artifact(step: torch.nn.Module, args: tuple, mechanism: str | None,
                   options: CompileOptions) -> tuple[Callable, bytes | None]:
    """Compile ``step`` for ``args`` and run it once; returns (callable, artifact bytes or ``None``)."""
    with attention_backends(options.attention):
        return _build_artifact(step, args, mechanism, options)


def _build_artifact(step, args, mechanism, options):
    if mechanism == "aot_compile":
        # The module's forward as a plain function with the module as first argument: its
        # weights are read at call time and stay out of the artifact.
        errors = []
        for guard_filter in (_serializable_guards, _no_guards):  # the second where a torch cannot keep any
            try:
                with _aot_enabled():
                    fn = _compile(type(step).forward, options, guard_filter=guard_filter).aot_compile(
                        ((step, *args), {}))
                break
            except Exception as e:  # noqa: BLE001
                errors.append(e)
                log.debug("aot_compile with %s failed", guard_filter.__name__, exc_info=True)
                torch._dynamo.reset()
        else:
            raise errors[0]
        fn(step, *args)
        tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"{TMP_PREFIX}promptus-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            fn.save_compiled_function(str(tmp))
            data = tmp.read_bytes()
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return (lambda *a: fn(step, *a)), data
    compiled = _compile(step, options)
    compiled(*args)
    if mechanism == "cache_artifacts":
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            raise RuntimeError("torch.compiler.save_cache_artifacts() returned nothing")
        return compiled, bytes(saved[0])
    return compiled, None


#: aot_compile functions loaded ahead of their first call (:func:`preload`), by key; taken by :func:`prepare`.
_PRELOADED: dict[CompileKey, Callable] = {}
_PRELOAD_LOCK = threading.Lock()


def preload(key: CompileKey, engine_dir: str | os.PathLike = DEFAULT_ENGINE_DIR) -> bool:
    """Read and deserialise the stored ``aot_compile`` artifact of ``key`` now — on a thread, while the
    weights load: it needs no weights — so that :func:`prepare` only runs it. False when there is none
    (or it is not an aot_compile entry); a damaged one is left for :func:`prepare` to report and rebuild."""
    if key.mechanism != "aot_compile":
        return False
    data, _ = CompileCache(engine_dir).check(key)  # a damaged entry stays for prepare() to report and remove
    if data is None:
        return False
    try:
        with _aot_enabled():
            fn = torch.compiler.load_compiled_function(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - prepare() loads it again and reports
        log.debug("preloading %s failed", key.stem, exc_info=True)
        return False
    with _PRELOAD_LOCK:
        _PRELOADED[key] = fn
    return True


def load_artifact(step: torch.nn.Module, args: tuple, mechanism: str, data: bytes,
                  options: CompileOptions, key: CompileKey | None = None) -> Callable:
    """The callable stored in ``data``, run once on ``args`` (so that a bad artifact fails here)."""
    with attention_backends(options.attention):
        return _load_artifact(step, args, mechanism, data, options, key)


def _load_artifact(step, args, mechanism, data, options, key):
    if mechanism == "aot_compile":
        with _PRELOAD_LOCK:
            fn = _PRELOADED.pop(key, None) if key is not None else None
        if fn is None:
            with _aot_enabled():
                fn = torch.compiler.load_compiled_function(io.BytesIO(data))
        fn(step, *args)
        return lambda *a: fn(step, *a)
    if mechanism == "cache_artifacts":
        torch.compiler.load_cache_artifacts(data)
        compiled = _compile(step, options)
        compiled(*args)
        return compiled
    raise ValueError(f"unknown mechanism {mechanism!r}")


@dataclass
class Prepared:
    """What :func:`prepare` did: the callable, how (``"loaded"``, ``"built"``, ``"compiled"``), seconds, key."""

    fn: Callable
    how: str
    seconds: float
    key: CompileKey | None
    path: Path | None = None


def prepare(step: torch.nn.Module, args: tuple, *, model_digest: str, batch: int, size: int, dtype: torch.dtype,
            timestep: int, device: torch.device, options: CompileOptions,
            engine_dir: str | os.PathLike = DEFAULT_ENGINE_DIR, mechanism: str | None = "auto", force: bool = False,
            progress: bool = True, what: str = "compile backend", kind: ArtifactKind | str = "compiled_decoder",
            key_options: str | None = None) -> Prepared:
    """A compiled ``step`` for ``args``: loaded from ``engine_dir`` when an intact entry exists, else
    built (with a message and a progress bar) and stored there.

    ``mechanism="auto"`` takes the best of :func:`available_mechanisms`, falling back to the
    next when a build fails; ``None`` compiles without storing anything. A stored artifact
    that fails to load or run is removed with a warning and rebuilt. ``kind``: the artifact kind it
    is stored as (``"compiled_trainer"`` for a training step, whose ``key_options`` string then names
    what else the graph bakes in: see :class:`TrainerKey`).
    """
    t0 = time.perf_counter()
    mechanisms = list(available_mechanisms()) if mechanism == "auto" else [mechanism] if mechanism else []
    if not options.fullgraph:  # aot_compile needs one graph
        mechanisms = [m for m in mechanisms if m != "aot_compile"]
    if not mechanisms:
        if mechanism == "auto":
            log.info("%s: torch %s cannot store compiled code (needs torch >= 2.7); every process compiles again",
                     what, torch.__version__)
        with BuildProgress(what, TYPICAL_BUILD_SECONDS, "typical on an H100/H200", enabled=progress):
            fn, _ = build_artifact(step, args, None, options)
        return Prepared(fn, "compiled", time.perf_counter() - t0, None)
    cache = CompileCache(engine_dir, kind)
    described = options.describe() + (f";{key_options}" if key_options else "")
    keys = [make_key(model_digest, batch=batch, size=size, dtype=dtype, timestep=timestep, device=device,
                     mechanism=m, options=described, kind=kind) for m in mechanisms]
    for key in keys:  # a stored artifact of any mechanism beats building one
        if force:
            cache.evict(key)
        data = cache.read(key)
        if data is None:
            continue
        try:
            fn = load_artifact(step, args, key.mechanism, data, options, key)
            secs = time.perf_counter() - t0
            log.info("%s: loaded %s in %.1f s", what, cache.artifact_path(key), secs)
            return Prepared(fn, "loaded", secs, key, cache.artifact_path(key))
        except Exception as e:  # noqa: BLE001 - any failure of a stored artifact means: rebuild it
            log.warning("%s: %s could not be loaded (%s: %s); rebuilding it", what, cache.artifact_path(key).name,
                        type(e).__name__, str(e)[:200])
            log.debug("load failure", exc_info=True)
            cache.evict(key)
            torch._dynamo.reset()
    last_error: Exception | None = None
    for key in keys:
        expected, source = cache.typical_build_seconds(key, options.autotune)
        try:
            with BuildProgress(what, expected, source, enabled=progress) as bar:
                fn, data = build_artifact(step, args, key.mechanism, options)
            assert data is not None
            path = cache.store(key, data, build_seconds=round(bar.elapsed, 2))
            log.info("%s: built in %.0f s and stored %s (%.1f MB)", what, bar.elapsed, path, len(data) / 1e6)
            return Prepared(fn, "built", time.perf_counter() - t0, key, path)
        except Exception as e:  # noqa: BLE001 - an experimental mechanism that fails: try the next one
            last_error = e
            log.warning("%s: building with %s failed (%s: %s)%s", what, key.mechanism, type(e).__name__,
                        str(e)[:300], "; trying the next mechanism" if key is not keys[-1] else "")
            log.debug("build failure", exc_info=True)
            torch._dynamo.reset()
    raise PromptusError(f"{what}: compiling the segment step failed ({type(last_error).__name__}: {last_error}); "
                        "use --backend torch") from last_error


__all__ = [
    "ATTENTION_CHOICES", "BuildProgress", "COMPILED_DECODER", "COMPILED_TRAINER", "COMPILE_FORMAT", "CompileCache",
    "CompileCacheError", "CompileKey", "CompileOptions", "CompiledEntry", "MECHANISMS", "Prepared", "TrainerKey",
    "architecture_digest", "attention_backends", "attention_problem", "available_mechanisms", "build_artifact",
    "clean_compiled", "device_identity", "list_compiled", "load_artifact", "make_key", "preload", "prepare",
    "resolve_options", "stale_reason", "triton_version",
]
