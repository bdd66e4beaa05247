"""Encoding schedules: where each keyframe's factors start and when its training stops.

A schedule is two pure policies the encoder's loop consults (docs/encoding-schedules.md):

- **init**: the factors U (tokens×r), V (r×dim) keyframe k starts from. ``published``:
  uniform in [0, 1) from a generator seeded with ``seed·1 000 003 + k``, as the release
  does. ``fast``: keyframe 0 likewise; keyframe k > 0 from keyframe k−1's *transmitted*
  (dequantized) factors, a warm start (neighbouring keyframes show similar content).
- **stop**: after each iteration the keyframe's stopper sees that iteration's mean loss
  and returns a stop reason or None. ``published``: a fixed count (``iters_first`` for
  keyframe 0, ``iters`` after). ``fast``: a plateau criterion between a minimum and a
  maximum count (:class:`PlateauStop`).

The stop decision is a function of the loss history alone, so every process of a
many-device encode takes it identically when fed the same (all-reduced) mean loss.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from .config import SCHEDULE_FAST, SCHEDULE_PUBLISHED, SCHEDULES, CodecConfig, TrainConfig
from .errors import PromptusError


@dataclass(frozen=True)
class FixedCount:
    """Stop after exactly ``iters`` iterations (the published schedule)."""

    iters: int

    @property
    def max_iters(self) -> int:
        return self.iters

    def stopper(self) -> "_Stopper":
        return _Stopper(self)

    def reason(self, iteration: int, recent_best: float, before_best: float) -> str | None:
        return f"published count ({self.iters})" if iteration >= self.iters else None


@dataclass(frozen=True)
class PlateauStop:
    """Stop when the last ``window`` iterations improved the best loss by at most ``tolerance`` of it.

    After iteration n (1-based) with losses ℓ₁..ℓₙ: stop at n = ``max_iters``; else, once
    n ≥ ``min_iters`` and n > ``window``, stop when
    ``min(ℓ₁..ℓₙ₋w) − min(ℓₙ₋w₊₁..ℓₙ) ≤ tolerance · |min(ℓ₁..ℓₙ₋w)|`` (w = ``window``):
    the best loss of the window is no real improvement on the best before it.
    """

    min_iters: int
    max_iters: int
    window: int
    tolerance: float

    def __post_init__(self) -> None:
        if not 1 <= self.min_iters <= self.max_iters:
            raise PromptusError(f"plateau stop: need 1 ≤ minimum ({self.min_iters}) ≤ maximum ({self.max_iters}) "
                                "iterations")
        if self.window < 1 or not self.tolerance >= 0:
            raise PromptusError(f"plateau stop: window {self.window} must be ≥ 1 and tolerance {self.tolerance} ≥ 0")

    def stopper(self) -> "_Stopper":
        return _Stopper(self, self.window)

    def reason(self, iteration: int, recent_best: float, before_best: float) -> str | None:
        if iteration >= self.max_iters:
            return f"maximum ({self.max_iters})"
        if iteration < self.min_iters or iteration <= self.window:
            return None
        if before_best - recent_best <= self.tolerance * abs(before_best):
            return f"plateau ({self.window} it < {self.tolerance:g})"
        return None


class _Stopper:
    """One keyframe's loss history, kept as the two minima a rule reads (O(1) amortised per loss)."""

    def __init__(self, rule, window: int = 1):
        self.rule, self.window = rule, window
        self.losses: deque[float] = deque()  # the last ``window`` losses
        self.recent: deque[tuple[int, float]] = deque()  # increasing minima of the window (monotonic queue)
        self.before_best = float("inf")  # best loss before the window
        self.iteration = 0

    def observe(self, loss: float) -> str | None:
        """Record the loss of the next iteration; the stop reason, or None to go on."""
        self.iteration += 1
        i = self.iteration
        self.losses.append(loss)
        while self.recent and self.recent[-1][1] >= loss:
            self.recent.pop()
        self.recent.append((i, loss))
        if len(self.losses) > self.window:
            self.before_best = min(self.before_best, self.losses.popleft())
            if self.recent[0][0] <= i - self.window:
                self.recent.popleft()
        return self.rule.reason(i, self.recent[0][1], self.before_best)


@dataclass(frozen=True)
class Schedule:
    """A named encoding schedule for one :class:`TrainConfig`: init policy, stop rules, starting learning rates."""

    name: str
    train: TrainConfig

    @classmethod
    def of(cls, train: TrainConfig) -> "Schedule":
        if train.schedule not in SCHEDULES:
            raise PromptusError(f"schedule {train.schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
        return cls(train.schedule, train)

    @property
    def warm_start(self) -> bool:
        return self.name == SCHEDULE_FAST

    def stop_rule(self, first: bool) -> FixedCount | PlateauStop:
        """The stop rule of keyframe 0 (``first``) or of a later keyframe."""
        t = self.train
        if self.name == SCHEDULE_PUBLISHED:
            return FixedCount(t.iters_first if first else t.iters)
        if first:
            return PlateauStop(min(t.min_iters_first, t.iters_first), t.iters_first, t.plateau_window_first,
                               t.plateau_tolerance)
        return PlateauStop(min(t.min_iters, t.iters), t.iters, t.plateau_window, t.plateau_tolerance)

    def lr(self, warm: bool) -> float:
        """Starting learning rate: ``warm_lr`` for a warm-started keyframe, else ``lr``."""
        return self.train.warm_lr if warm else self.train.lr

    def initial_factors(self, codec: CodecConfig, k: int, prev_U: torch.Tensor | None = None,
                        prev_V: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(U, V, warm) keyframe ``k`` starts from, float32 on the CPU.

        ``prev_U``/``prev_V``: keyframe k−1's transmitted (dequantized) factors; used
        when the schedule warm-starts and k > 0 (``warm`` says whether they were).
        """
        if self.warm_start and k > 0 and prev_U is not None and prev_V is not None:
            return prev_U.detach().float().cpu().clone(), prev_V.detach().float().cpu().clone(), True
        return (*random_factors(codec, self.train.seed, k), False)


def random_factors(codec: CodecConfig, seed: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's start: U, V uniform in [0, 1) from a generator seeded with ``seed·1 000 003 + k``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + k)
    U = torch.rand(codec.tokens, codec.rank, generator=g)
    V = torch.rand(codec.rank, codec.embed_dim, generator=g)
    return U, V
