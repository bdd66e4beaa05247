"""The backend registry: one entry per backend, from which every list, choice and default derives.

A :class:`BackendEntry` names a backend, how to build it (``factory``), whether it can
run on a device (``available``, with the reason when not), where ``auto`` ranks it, and
the knobs other parts of the program read instead of naming backends: whether it keeps
artifacts under the engine folder, whether ``promptus bench`` times it by default (on a
GPU, on the CPU) and whether its first start is slow (the studio leaves those unticked).

Adding a backend is one module with its class and one :func:`register_backend` call
(docs/design.md, "Adding a backend"); ``promptus decode --backend``, the bench, the
studio and ``auto`` pick it up from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import PromptusError

if TYPE_CHECKING:
    from .base import Backend

#: The pseudo-backend that takes the first registered backend that works here.
AUTO = "auto"
#: The backend every speed is measured against (plain PyTorch, no graphs, no compilation).
BASELINE = "eager"

#: ``factory(models, device, dtype, *, batch, size, engine_dir, offload_models, auto) → Backend | None``;
#: with ``auto=True`` a factory may return None (logging why) so that ``auto`` tries the next one.
Factory = Callable[..., "Backend | None"]
#: ``available(device) → (ok, why)``: whether the backend can run on ``device`` here, and why not.
Availability = Callable[[torch.device], "tuple[bool, str]"]


def always_available(device: torch.device) -> tuple[bool, str]:
    """For backends that run wherever PyTorch does."""
    return True, "runs wherever PyTorch does"


@dataclass(frozen=True)
class BackendEntry:
    """One backend: its name, how to make it and what the rest of the program may ask of it.

    Attributes:
        name: the name on the command line (``--backend NAME``) and in the bench's table.
        factory: builds the backend for one clip (see :data:`Factory`).
        available: whether it can run on a device when asked for by name (the bench shows
            "unavailable: why" and ``make_backend`` raises with the reason otherwise).
        auto_priority: ``auto`` tries the entries with a priority, lowest first; None: never.
        auto_available: an extra condition for ``auto`` (e.g. compile: only on CUDA, where
            compiling pays off); None: ``available`` alone.
        keeps_artifacts: stores what it builds under the engine folder (``promptus engines``).
        bench_gpu, bench_cpu: timed by ``promptus bench`` by default on a GPU / on the CPU.
        slow_first_start: its first start on a machine takes minutes (engine builds);
            interactive pages leave it unticked by default.
        summary: one line for help texts.
    """

    name: str
    factory: Factory
    available: Availability = always_available
    auto_priority: int | None = None
    auto_available: Availability | None = None
    keeps_artifacts: bool = False
    bench_gpu: bool = True
    bench_cpu: bool = False
    slow_first_start: bool = False
    summary: str = ""

    def __post_init__(self) -> None:
        if not self.name or not self.name.isidentifier() or self.name == AUTO:
            raise PromptusError(f"a backend's name must be a plain word other than {AUTO!r}, got {self.name!r}")


_REGISTRY: dict[str, BackendEntry] = {}


def register_backend(entry: BackendEntry, *, replace: bool = False) -> BackendEntry:
    """Add ``entry`` to the registry (``replace=True`` to override an entry of the same name)."""
    if entry.name in _REGISTRY and not replace:
        raise PromptusError(f"a backend named {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry
    return entry


def backend_entry(name: str) -> BackendEntry:
    """The entry named ``name``; a :class:`PromptusError` listing the choices otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise PromptusError(f"unknown backend {name!r}; choose one of {', '.join(backend_names(auto=True))}") from None


def backend_entries() -> list[BackendEntry]:
    """Every registered entry, in registration order."""
    return list(_REGISTRY.values())


def auto_order() -> list[BackendEntry]:
    """The entries ``auto`` tries, in order."""
    ranked = [e for e in _REGISTRY.values() if e.auto_priority is not None]
    return sorted(ranked, key=lambda e: e.auto_priority)


def auto_status(entry: BackendEntry, device) -> tuple[bool, str]:
    """Whether ``auto`` may use ``entry`` on ``device``: available, and its extra auto condition (if any) met."""
    ok, why = entry.available(device)
    if ok and entry.auto_available is not None:
        ok, why = entry.auto_available(device)
    return ok, why


def backend_names(*, auto: bool = False, simplest_first: bool = False) -> tuple[str, ...]:
    """Registered names: in ``auto``'s order of preference (fastest first), then the rest;
    ``simplest_first`` reverses that (eager first: the order a comparison reads best in);
    ``auto=True`` puts "auto" in front."""
    ranked = auto_order()
    names = [e.name for e in ranked] + [e.name for e in _REGISTRY.values() if e not in ranked]
    if simplest_first:
        names.reverse()
    return ((AUTO,) if auto else ()) + tuple(names)


def bench_defaults(device_type: str) -> list[str]:
    """Backends ``promptus bench`` times by default on ``device_type`` ("cpu" or a GPU's), simplest first."""
    key = "bench_cpu" if device_type == "cpu" else "bench_gpu"
    return [n for n in backend_names(simplest_first=True) if getattr(_REGISTRY[n], key)]


def quick_backends(device_type: str) -> list[str]:
    """Backends an interactive page pre-selects on ``device_type``: the bench's defaults, less
    the baseline and those whose first start takes minutes."""
    return [n for n in bench_defaults(device_type) if n != BASELINE and not _REGISTRY[n].slow_first_start]
