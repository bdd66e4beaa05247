"""A decoder's start-up, phase by phase, and what a process keeps loaded.

:func:`load_decoder` makes the models and the backend for a clip the way
``promptus decode`` needs them, timing each phase into a :class:`StartupProfile`
(``decode --profile-start``): the model file read (on the CPU), the weights to the
GPU, the compiled step's load, and — recorded by the caller — the first segment and
the first frame on disk. Where the backend is ``compile`` (named, or what ``auto``
picks) and a stored ``aot_compile`` step exists, that step is deserialised on a thread
while the weights are read and moved: it needs no weights
(:func:`promptus.backends.compile_cache.preload`).

What is loaded stays loaded for the life of the process, keyed by what defines it:
models by their source (a file's path, size and modification time, or a built-in
name), device, dtype and TAESD; decoders (models + backend) additionally by backend,
batch, frame size, engine folder and parity. ``serve``, the studio and sweep actors
that decode several clips in one process reuse them instead of loading again. The
caches are small (LRU) and :func:`clear` empties them. A cached backend is not
re-entrant: run one decode at a time on it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sys
import threading
import time
from dataclasses import InitVar, dataclass, field
from pathlib import Path

import torch

from .config import DEFAULT_ENGINE_DIR, PARITY_OURS

log = logging.getLogger(__name__)

#: Models and decoders a process keeps (least recently used dropped first).
MODELS_KEPT = 2
DECODERS_KEPT = 4

_lock = threading.RLock()
_models: collections.OrderedDict = collections.OrderedDict()
_decoders: collections.OrderedDict = collections.OrderedDict()


def process_age() -> float | None:
    """Seconds since this process started (Linux: /proc), or None where that is not known."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, after the command name
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class StartupProfile:
    """Seconds per start-up phase, and moments since the process started (``marks``).

    ``phase(name)`` times a block (phases that run at once on two threads overlap, so
    their sum can exceed the wall time); ``mark(name)`` records the time since the
    process started (since the profile was made, with ``from_now``), once (``first
    segment``, ``first frame written``).
    """

    phases: dict[str, float] = field(default_factory=dict)
    marks: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: The clock starts now instead of at the process's start (a later file of a multi-file decode).
    from_now: InitVar[bool] = False

    def __post_init__(self, from_now: bool = False):
        self.since = "its own start" if from_now else "the process started"
        age = None if from_now else process_age()
        self.origin = time.perf_counter() - (age or 0.0)
        if not from_now:
            self.marks["main"] = age if age is not None else float("nan")  # interpreter + imports

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, time.perf_counter() - self.origin)

    def as_dict(self) -> dict:
        return {"phases_s": dict(self.phases), "since_process_start_s": dict(self.marks), "notes": list(self.notes)}

    def format(self) -> str:
        """The profile as a few lines of text (the command prints them)."""
        lines = ["start-up profile (seconds):"]
        lines += [f"  {name:28} {secs:7.2f}" for name, secs in self.phases.items()]
        lines += [f"  {'at ' + name:28} {secs:7.2f} after {self.since}" for name, secs in self.marks.items()]
        lines += [f"  ({note})" for note in self.notes]
        return "\n".join(lines)


def _source_key(spec: str, checkpoints_dir: str | os.PathLike) -> tuple:
    """What identifies the weights ``spec`` names: a file or folder's path, size and mtime, or the name."""
    from .models import find_default_weights

    if spec == "auto":
        spec = find_default_weights(checkpoints_dir) or "auto"
    path = Path(os.path.expanduser(str(spec)))
    if path.exists():
        st = path.stat()
        return ("path", str(path.resolve()), st.st_size, st.st_mtime_ns)
    return ("name", str(spec))


#: The interpreter's thread switch interval while the start-up runs threads (seconds; Python's default is 5 ms).
STARTUP_SWITCH_INTERVAL = 0.0005


@contextlib.contextmanager
def short_switch_interval(seconds: float = STARTUP_SWITCH_INTERVAL):
    """A shorter GIL switch interval within the block (the weights' move to the GPU). While the preload thread
    runs Python (deserialising the compiled step), the thread that moves ~700 weight tensors gives up the GIL at
    every copy and waits up to a whole interval to get it back: 700 x 5 ms is 3.5 s. Measured on an H100 host:
    "weights to GPU" 0.38-0.90 s with it, 1.3-2.6 s without."""
    saved = sys.getswitchinterval()
    sys.setswitchinterval(min(saved, seconds))
    try:
        yield
    finally:
        sys.setswitchinterval(saved)


def warm_device(device, dtype: torch.dtype, profile: StartupProfile | None = None) -> threading.Thread | None:
    """On a thread, the GPU's first-use costs that the first segment would otherwise pay after the weights are
    in place: the CUDA context, and the cuBLAS and cuDNN libraries' first calls (their handles and kernel
    libraries load on the first matmul and convolution). They run while the caller reads the header and
    loads the weights; the thread releases the GIL inside each op. None (nothing to do) off CUDA. Failures
    are ignored: the decode then meets them itself, with its own errors."""
    device = torch.device(device)
    if device.type != "cuda":
        return None

    def run():
        t0 = time.perf_counter()
        try:
            with torch.cuda.device(device):
                x = torch.ones(8, 8, 8, 8, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
                torch.nn.functional.conv2d(x, x)  # cuDNN
                torch.mm(x[0, 0], x[0, 0])  # cuBLAS
                torch.cuda.synchronize(device)
        except Exception:  # noqa: BLE001 - an optimisation only
            log.debug("warming %s failed", device, exc_info=True)
            return
        if profile is not None:
            profile.phases["device warm-up (thread)"] = time.perf_counter() - t0

    thread = threading.Thread(target=run, name="promptus-warm-device", daemon=True)
    thread.start()
    return thread


def _remember(cache: collections.OrderedDict, key, value, keep: int) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > keep:
        cache.popitem(last=False)


def clear() -> None:
    """Forget every model and decoder this process keeps."""
    with _lock:
        _models.clear()
        _decoders.clear()


def architecture_skeleton(spec: str, *, taesd: str | None = None,
                          checkpoints_dir: str | os.PathLike = "checkpoints"):
    """The networks ``spec`` will load, built on the meta device from their configs — no weights, no
    memory, milliseconds — so that what depends only on the architecture (the compiled step's key) can
    start before the weights are read. Only for what the configs are known for ahead: a single weights
    file (SD-Turbo's configs) with TAESD from a file or a diffusers folder; None otherwise."""
    from .models import TAESD_FOLDER, Models, find_default_weights, sd_turbo_unet_config, taesd_config

    if spec == "auto":
        spec = find_default_weights(checkpoints_dir) or ""
    path = Path(os.path.expanduser(str(spec)))
    if not path.is_file():
        return None
    source = Path(os.path.expanduser(str(taesd))) if taesd else Path(checkpoints_dir) / TAESD_FOLDER
    try:
        from .models.networks import diffusers_classes

        AutoencoderTiny, UNet2DConditionModel = diffusers_classes("AutoencoderTiny", "UNet2DConditionModel")
        if source.is_dir() and (source / "config.json").is_file():
            tconfig = dict(AutoencoderTiny.load_config(str(source)))
        elif source.is_file():
            tconfig = taesd_config()
        else:
            return None
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(sd_turbo_unet_config())
            tiny = AutoencoderTiny.from_config(tconfig)
    except Exception:  # noqa: BLE001 - an optimisation: the key is then made after the weights are read
        log.debug("no architecture skeleton for %s", spec, exc_info=True)
        return None
    return Models(unet=unet, taesd=tiny, vae=None, name="skeleton")


def cached_models(spec: str, *, device: torch.device, dtype: torch.dtype, taesd: str | None = None,
                  vae: bool = False, checkpoints_dir: str | os.PathLike = "checkpoints",
                  profile: StartupProfile | None = None, on_architecture=None, memo_key: str | None = None):
    """:func:`promptus.models.load_models` through the process cache.

    A file's weights are read on the CPU ("model file read") and then moved and cast
    ("weights to GPU"); ``on_architecture(models)`` is called in between, with the
    models still on the CPU, so that work needing only the architecture can start.
    ``memo_key``: the weights memo's key of these files where the caller has it already.
    """
    from .models import load_models, model_digest

    device = torch.device(device)
    profile = profile or StartupProfile()
    key = (_source_key(spec, checkpoints_dir), str(taesd), str(device), str(dtype), bool(vae),
           str(checkpoints_dir))
    with _lock:
        models = _models.get(key)
        if models is not None:
            _models.move_to_end(key)
            profile.notes.append("models kept from earlier in this process")
            if on_architecture is not None:
                on_architecture(models)
            return models
        built_on_device = spec in ("tiny", "random")  # made in code: nothing to read
        with profile.phase("import diffusers"):  # its own line: seconds on a fresh host
            from .models.networks import diffusers_classes

            diffusers_classes()
        with profile.phase("model file read" if not built_on_device else "model made in code"):
            where = device if built_on_device else torch.device("cpu")
            # A file's tensors keep their stored dtype on the CPU: the cast happens on the GPU.
            models = load_models(spec, device=where, dtype=dtype if built_on_device else None,
                                 taesd=taesd, vae=vae, checkpoints_dir=checkpoints_dir)
        if on_architecture is not None:
            on_architecture(models)
        from . import weights_memo

        if built_on_device:
            memo_key = None
        elif memo_key is None:
            memo_key = weights_memo.weights_key(spec, taesd, checkpoints_dir)
        remembered = _remembered_digest(memo_key)
        digest: dict[str, bytes] = {}
        hasher = None
        if remembered is None and not built_on_device and device.type == "cuda":
            # The weights' digest (the bitstream's model check) from the copy already in host memory, while the
            # weights travel; where a tensor was moved first, its GPU copy gives the same digest (fp16 canonical).
            hasher = threading.Thread(target=lambda: digest.update(d=model_digest(models)), name="promptus-digest",
                                      daemon=True)
            hasher.start()
        with profile.phase("weights to GPU" if device.type == "cuda" else "weights cast"), short_switch_interval():
            models.to(device, dtype)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        if remembered is not None:
            models._digest = remembered
            profile.notes.append("weights digest remembered from an earlier run (weights memo)")
        elif hasher is not None:
            with profile.phase("weights digest (after the move)"):
                hasher.join()
            if "d" in digest:
                models._digest = digest["d"]
                weights_memo.put(memo_key, model_digest=digest["d"].hex())
        _remember(_models, key, models, MODELS_KEPT)
        return models


def _remembered_digest(memo_key: str | None) -> bytes | None:
    from . import weights_memo

    text = weights_memo.get(memo_key).get("model_digest")
    if isinstance(text, str) and len(text) == 32:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    return None


def architecture_facts(models, dtype: torch.dtype) -> dict:
    """What the compiled step's key needs of the networks (milliseconds): the architecture digest the UNet
    and TAESD decoder will have in ``dtype``, and why the shared prefix cannot be used (None if it can)."""
    from .backends.compile_cache import architecture_digest
    from .backends.segment_step import shared_prefix_problem

    return {f"architecture {dtype}": architecture_digest(models.unet, models.taesd.decoder, dtype=dtype),
            "shared_prefix_problem": shared_prefix_problem(models.unet)}


def _compile_keys(facts: dict, *, device, dtype, batch: int, size: int, timestep: int):
    """The compiled-step keys the compile backend will look up for this clip (from :func:`architecture_facts`,
    computed or remembered), before the weights are in place; None when ``facts`` lack them."""
    from .backends.compile_cache import CompileOptions, available_mechanisms, make_key, resolve_options

    digest, problem = facts.get(f"architecture {dtype}"), facts.get("shared_prefix_problem")
    if not isinstance(digest, str) or not (problem is None or isinstance(problem, str)):
        return None
    options = resolve_options(CompileOptions(), problem, device, announce=False)  # as the backend will
    return [make_key(digest, batch=batch, size=size, dtype=dtype, timestep=timestep, device=device, mechanism=m,
                     options=options) for m in available_mechanisms()]


def _first_choice(backend: str, device: torch.device) -> str:
    """The backend ``backend`` names, or for ``auto`` the first of its order that is available here (what it
    will try first: the one whose start-up is worth preparing for)."""
    from .backends import AUTO, auto_order, auto_status

    if backend != AUTO:
        return backend
    return next((entry.name for entry in auto_order() if auto_status(entry, device)[0]), backend)


@dataclass
class LoadedDecoder:
    """What :func:`load_decoder` returns: the models, their identity (taken before any offload) and the backend."""

    models: object
    identity: object
    backend: object
    reused: bool = False


def load_decoder(spec: str, clip, *, device, dtype: torch.dtype, backend: str = "auto", taesd: str | None = None,
                 checkpoints_dir: str | os.PathLike = "checkpoints", engine_dir: str = DEFAULT_ENGINE_DIR,
                 parity: str = PARITY_OURS, offload_models: bool = False,
                 profile: StartupProfile | None = None) -> LoadedDecoder:
    """Models and a backend for ``clip`` (a bitstream Header or Bitstream, or a CodecConfig; see
    :func:`promptus.backends.backend_for_clip`, which checks the geometry before anything is sized),
    through the process cache (module docstring). A compiled step, where one will be used, is loaded
    on a thread while the weights move, and prepared before this returns."""
    from .backends import backend_for_clip, clip_batch, clip_config
    from .backends.aoti_backend import AotiBackend
    from .backends.torch_backend import CompileBackend

    device = torch.device(device)
    profile = profile or StartupProfile()
    config, _ = clip_config(clip)
    batch, size, timestep = clip_batch(clip), config.width, config.timestep
    key = (_source_key(spec, checkpoints_dir), str(taesd), str(device), str(dtype), backend, batch, size,
           str(Path(engine_dir).resolve()), parity, offload_models)
    with _lock:
        hit = _decoders.get(key)
        if hit is not None:
            _decoders.move_to_end(key)
            hit.models.geometry().check(config)
            profile.notes.append("models and backend kept from earlier in this process")
            return LoadedDecoder(hit.models, hit.identity, hit.backend, reused=True)
        from . import weights_memo

        memo_key = weights_memo.weights_key(spec, taesd, checkpoints_dir)
        remembered = weights_memo.get(memo_key)  # facts of an earlier run on these files
        choice = _first_choice(backend, device)
        if choice == "aoti" and parity == PARITY_OURS and remembered:
            with profile.phase("aoti: package and weights files, no networks"):
                direct = _direct_aoti(spec, taesd, checkpoints_dir, remembered, device=device, dtype=dtype,
                                      batch=batch, size=size, timestep=timestep, engine_dir=engine_dir,
                                      profile=profile)
            if direct is not None:
                direct.models.geometry().check(config)
                profile.notes.append("aoti: started from the stored package and the weights files (weights memo)")
                _remember(_decoders, key, direct, DECODERS_KEPT)
                return direct
        preloader: list[threading.Thread] = []
        wanted = device.type == "cuda" and parity == PARITY_OURS and choice == "compile"

        def start_preload(get_models, remembered: dict | None = None):
            """On a thread: the architecture (remembered, or ``get_models()``), the compiled step's key, its
            artifact read and deserialised."""
            from .backends.compile_cache import preload

            def run():
                try:
                    t0 = time.perf_counter()
                    if device.index is not None:
                        torch.cuda.set_device(device)
                    # Behind the weights loader's diffusers import (one lock): both are Python work under the GIL,
                    # so running them at once only adds switching (measured on an H100 host: the import took
                    # 11.7-13 s beside the preload against 6.1-6.9 s alone). The preload then overlaps the file
                    # read and the weights' copies to the GPU, which release the GIL.
                    from .models.networks import diffusers_classes

                    diffusers_classes()
                    keys = _compile_keys(remembered or {}, device=device, dtype=dtype, batch=batch, size=size,
                                         timestep=timestep)
                    if keys is None:
                        models = get_models()
                        if models is None:
                            return
                        models.geometry().check(config)  # the header's numbers size nothing before this
                        keys = _compile_keys(architecture_facts(models, dtype), device=device, dtype=dtype,
                                             batch=batch, size=size, timestep=timestep)
                    for k in keys:
                        if preload(k, engine_dir):
                            profile.phases["compiled-step key + read (thread)"] = time.perf_counter() - t0
                            return
                except Exception:  # noqa: BLE001 - an optimisation: the backend loads the step itself
                    log.debug("preloading the compiled step failed", exc_info=True)

            thread = threading.Thread(target=run, name="promptus-preload", daemon=True)
            thread.start()
            preloader.append(thread)

        # The architecture is known before the weights are read where an earlier run on these files left its
        # facts in the weights memo, or from a weights file's configs (a meta-device skeleton): then the preload
        # starts at once (and waits for diffusers' import); otherwise once the networks are built on the CPU.
        from .models import find_default_weights

        resolved = find_default_weights(checkpoints_dir) if spec == "auto" else spec
        early = wanted and (f"architecture {dtype}" in remembered
                            or (bool(resolved) and Path(os.path.expanduser(str(resolved))).is_file()))
        if early:
            start_preload(lambda: architecture_skeleton(spec, taesd=taesd, checkpoints_dir=checkpoints_dir),
                          remembered)
        late = (lambda m: start_preload(lambda: m)) if wanted and not early else None
        models = cached_models(spec, device=device, dtype=dtype, taesd=taesd, checkpoints_dir=checkpoints_dir,
                               profile=profile, on_architecture=late, memo_key=memo_key)
        models.geometry().check(config)  # before the identity is taken or anything is sized
        identity = models.identity()  # before the backend may move the networks off the GPU
        if memo_key is not None:
            _learn(memo_key, remembered, models, dtype, identity)
            if choice == "aoti" and "unet_names" not in remembered and resolved:
                from .models.loading import ldm_unet_names

                names = ldm_unet_names(os.path.expanduser(str(resolved)))  # an original single file's names
                if names is not None:
                    weights_memo.put(memo_key, unet_names=names)
        with profile.phase("compiled-step load"):
            for thread in preloader:
                thread.join()
            made = backend_for_clip(clip, models, name=backend, device=device, dtype=dtype,
                                    engine_dir=engine_dir, offload_models=offload_models, parity=parity)
            if isinstance(made, (CompileBackend, AotiBackend)) and made.batch:
                from .schedule import OneStep

                made.prepare(size, OneStep.at(timestep))  # the stored step loaded (or built) now
        loaded = LoadedDecoder(models, identity, made)
        _remember(_decoders, key, loaded, DECODERS_KEPT)
        return loaded


def _learn(memo_key: str, remembered: dict, models, dtype: torch.dtype, identity) -> None:
    """Remember for the next process what this one had to compute about these weights (the weights memo)."""
    import dataclasses

    from . import weights_memo

    learnt = {} if f"architecture {dtype}" in remembered else architecture_facts(models, dtype)
    if "model_digest" not in remembered and "model_digest" not in weights_memo.get(memo_key):
        learnt["model_digest"] = identity.digest.hex()
    if "geometry" not in remembered:
        learnt["geometry"] = dataclasses.asdict(models.geometry())
        learnt["model_name"] = identity.name
    if learnt:
        weights_memo.put(memo_key, **learnt)


@dataclass
class WeightsOnly:
    """What a decode that never built the networks knows of them, from the weights memo: the name, the
    geometry a header is checked against and the identity (the ``aoti`` backend's direct start)."""

    name: str
    _geometry: object
    _identity: object

    def geometry(self):
        return self._geometry

    def identity(self):
        return self._identity


def _weights_file(source, inner: str) -> Path | None:
    """``source`` itself when it is a file, else the diffusers weights file inside the folder ``source``
    (``inner``: ``unet/`` for a pipeline, "" for a model folder); None when there is none."""
    if source is None:
        return None
    path = Path(os.path.expanduser(str(source)))
    if path.is_file():
        return path
    name = "diffusion_pytorch_model.safetensors"
    for candidate in (path / inner / name, path / name):
        if candidate.is_file():
            return candidate
    return None


def _direct_aoti(spec: str, taesd, checkpoints_dir, facts: dict, *, device, dtype, batch: int, size: int,
                 timestep: int, engine_dir, profile: StartupProfile | None = None) -> "LoadedDecoder | None":
    """The ``aoti`` backend started from its stored package and the weights files alone: no networks built and
    no diffusers imported, where an earlier run left the facts it needs in the weights memo. None otherwise."""
    from .backends.aoti_backend import AotiBackend
    from .config import ModelIdentity
    from .models import TAESD_FOLDER, find_default_weights
    from .models.networks import ModelGeometry

    architecture, problem = facts.get(f"architecture {dtype}"), facts.get("shared_prefix_problem")
    digest, name, geometry = facts.get("model_digest"), facts.get("model_name"), facts.get("geometry")
    if not (isinstance(architecture, str) and (problem is None or isinstance(problem, str))
            and isinstance(digest, str) and isinstance(name, str) and isinstance(geometry, dict)
            and all(type(v) is int for v in geometry.values())):
        return None
    try:
        geometry = ModelGeometry(**geometry)
        identity = ModelIdentity(name=name, digest=bytes.fromhex(digest))
    except Exception:  # noqa: BLE001 - a memo of another shape: the networks are loaded instead
        return None
    unet_file = _weights_file(find_default_weights(checkpoints_dir) if spec == "auto" else spec, "unet")
    taesd_file = _weights_file(taesd if taesd is not None else Path(checkpoints_dir) / TAESD_FOLDER, "")
    if unet_file is None or taesd_file is None:
        return None
    names = facts.get("unet_names")
    if names is not None and not (isinstance(names, dict)
                                  and all(isinstance(k, str) and isinstance(v, str) for k, v in names.items())):
        return None
    backend = AotiBackend.from_files(architecture=architecture, prefix_problem=problem, unet_file=unet_file,
                                     taesd_file=taesd_file, device=device, dtype=dtype, batch=batch, size=size,
                                     timestep=timestep, engine_dir=engine_dir, unet_names=names, profile=profile)
    if backend is None:
        return None
    backend.geometry = geometry
    return LoadedDecoder(WeightsOnly(name, geometry, identity), identity, backend)


def cached_backend(clip, models, *, name: str = "auto", device=None, dtype: torch.dtype | None = None,
                   engine_dir: str = DEFAULT_ENGINE_DIR, offload_models: bool = False, parity: str = PARITY_OURS):
    """:func:`promptus.backends.backend_for_clip` through the process cache, for callers that hold their
    models already (a sweep actor decoding one point after another): the same models, backend, clip batch
    and size, device, dtype, engine folder and parity give the same backend object, so a compiled step or
    captured graph is prepared once per process. Not re-entrant: one decode at a time per backend."""
    from .backends import backend_for_clip, clip_batch, clip_config, resolve_device

    config, _ = clip_config(clip)
    models.geometry().check(config)
    dev = resolve_device(device)
    key = ("backend", id(models), name, str(dev), str(dtype), clip_batch(clip), config.width,
           str(Path(engine_dir).resolve()), parity, offload_models)
    with _lock:
        hit = _decoders.get(key)
        if hit is not None and hit.models is models:  # the id of a live object: the models themselves
            _decoders.move_to_end(key)
            return hit.backend
        backend = backend_for_clip(clip, models, name=name, device=dev, dtype=dtype, engine_dir=engine_dir,
                                   offload_models=offload_models, parity=parity)
        _remember(_decoders, key, LoadedDecoder(models, None, backend), DECODERS_KEPT)
        return backend


__all__ = ["StartupProfile", "LoadedDecoder", "load_decoder", "cached_backend", "cached_models", "clear",
           "process_age", "MODELS_KEPT", "DECODERS_KEPT"]
