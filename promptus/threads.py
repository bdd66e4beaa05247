"""How many torch threads CPU work uses: the fastest measured count unless the user says otherwise.

CPU results depend on the thread count (a reduction splits differently), so encoder and
decoder agree bit for bit only on the same count: every command chooses it the same way,
here (docs/determinism.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from .config import CPU_THREADS, THREADS_ENV
from .errors import PromptusError


def parse_threads(text: str | int, source: str) -> int:
    """A thread count ≥ 1 from ``text``; ``source`` names where it came from in the error."""
    try:
        n = int(text)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise PromptusError(f"{source}={text!r}: the number of CPU threads must be a whole number ≥ 1")
    return n


def cpu_thread_count(model_name: str, requested: int | None = None,
                     environ: Mapping[str, str] | None = None) -> tuple[int | None, str]:
    """The torch thread count for CPU work with ``model_name`` and why: ``(None, why)`` keeps torch's.

    In order: ``requested`` (``--threads``), $PROMPTUS_THREADS, $OMP_NUM_THREADS (torch
    already follows it), else :data:`promptus.config.CPU_THREADS` for the model.
    """
    env = os.environ if environ is None else environ
    if requested is not None:
        return parse_threads(requested, "--threads"), "--threads"
    if env.get(THREADS_ENV, "").strip():
        return parse_threads(env[THREADS_ENV].strip(), THREADS_ENV), f"${THREADS_ENV}"
    if env.get("OMP_NUM_THREADS", "").strip():
        return None, "$OMP_NUM_THREADS"
    if model_name in CPU_THREADS:
        return CPU_THREADS[model_name], f"fastest for the {model_name} model (--threads changes it)"
    return None, "torch's default, one per core (--threads changes it)"
