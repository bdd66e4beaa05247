"""The encoder's compiled training step on disk, next to the compiled decoder (``<engine_dir>/trainer/``).

``torch.compile`` of the training step (UNet → TAESD → loss, and autograd's backward)
takes minutes for the full-size model, per step shape. After the first compiled
iteration of a shape, :class:`CompiledTrainerStore` saves what inductor and AOTAutograd
built (``torch.compiler.save_cache_artifacts``, torch ≥ 2.7) as an entry of the
artifact cache's ``compiled_trainer`` kind (:mod:`promptus.backends.compile_cache`),
keyed by everything the graph bakes in: the networks' architecture digest, frames per
pass, frame size, precision, timestep, GPU, torch and Triton versions, compile mode,
checkpointed parts and loss weights. A new process on a known GPU loads the entry
before its first iteration (``load_cache_artifacts``): Dynamo still traces, but
nothing is compiled again. Execution only: a loaded step computes what a fresh
compilation computes. The artifacts are code written by torch: treat the engine
folder like a program folder.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

#: Keys this process already loaded or stored (the in-memory compiled step serves them from then on).
_DONE: set = set()


def mechanism_available() -> bool:
    return hasattr(torch.compiler, "save_cache_artifacts") and hasattr(torch.compiler, "load_cache_artifacts")


class CompiledTrainerStore:
    """Loads and stores the compiled training step of one encoder (see the module docstring).

    ``modules``: the networks the step differentiates through; ``options``: the settings the
    graph bakes in besides shapes (compile mode, loss weights, perceptual term on/off).
    """

    def __init__(self, engine_dir: str | Path, modules, *, size: int, dtype: torch.dtype, timestep: int,
                 device: torch.device, options: str):
        from .backends.compile_cache import COMPILED_TRAINER, CompileCache, architecture_digest

        self.cache = CompileCache(engine_dir, COMPILED_TRAINER)
        self.digest = architecture_digest(*modules)
        self.size, self.dtype, self.timestep, self.device, self.options = size, dtype, timestep, device, options
        self._pending: dict = {}

    def key(self, frames: int, checkpoint: tuple[str, ...]):
        from .backends.compile_cache import COMPILED_TRAINER, make_key

        opts = f"{self.options},checkpoint={'+'.join(checkpoint) or 'none'}"
        return make_key(self.digest, batch=frames, size=self.size, dtype=self.dtype, timestep=self.timestep,
                        device=self.device, mechanism="cache_artifacts", options=opts, kind=COMPILED_TRAINER)

    def before(self, frames: int, checkpoint: tuple[str, ...]) -> None:
        """Before the first iteration of a step shape: load its stored entry, or remember to store one."""
        key = self.key(frames, checkpoint)
        if key in _DONE:
            return
        _DONE.add(key)
        data = self.cache.read(key)
        if data is None:
            self._pending[key] = time.perf_counter()
            return
        try:
            torch.compiler.load_cache_artifacts(data)
        except Exception as e:  # noqa: BLE001 - a bad entry costs a compilation, never the encode
            log.warning("compiled trainer %s could not be loaded (%s); compiling again", key.stem, e)
            self.cache.evict(key)
            self._pending[key] = time.perf_counter()
            return
        log.info("loaded the compiled trainer step for %d-frame passes from %s", frames, self.cache.path(key))

    def after(self, frames: int, checkpoint: tuple[str, ...]) -> None:
        """After the first iteration of a step shape: store what was compiled, when it was not on disk."""
        key = self.key(frames, checkpoint)
        t0 = self._pending.pop(key, None)
        if t0 is None:
            return
        try:
            saved = torch.compiler.save_cache_artifacts()
            if saved is None:
                raise RuntimeError("torch.compiler.save_cache_artifacts() returned nothing")
            path = self.cache.store(key, bytes(saved[0]), build_s=round(time.perf_counter() - t0, 1))
        except Exception as e:  # noqa: BLE001 - the encode goes on without the disk copy
            log.warning("could not store the compiled trainer step (%s)", e)
            return
        log.info("stored the compiled trainer step for %d-frame passes in %s", frames, path)
