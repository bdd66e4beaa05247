"""Memory plans: how one training iteration of the encoder fits a memory budget.

An iteration runs the frames of a segment through UNet → TAESD decoder → loss
(VGG-19) and back to the prompt. Its peak memory is what is resident (weights,
the targets) plus, for every frame in flight, the activations that autograd keeps
for the backward pass: about 1.8 GiB per frame at 512², so a segment of 10 frames
needs about 20 GiB. A :class:`MemoryPlan` trades speed for memory in three ways,
none of which changes the gradient beyond floating-point rounding:

* **micro-batches**: the frames go through in groups of ``micro_batch``; each
  group's share of the loss is backpropagated to the prompt embedding, the
  embedding's gradients are summed, and the sum goes back through the factors
  once. Frames do not interact inside the networks, so this is the gradient of the
  whole batch.
* **activation checkpointing** (``torch.utils.checkpoint``, non-reentrant, which
  works with frozen weights) of the UNet, the TAESD decoder and/or the loss: their
  activations are recomputed during the backward pass instead of kept.
* **target features** (VGG-19 features of the real frames) kept for the whole
  keyframe, or recomputed for each micro-batch in every iteration.

:func:`choose_plan` estimates every plan's peak memory and time with the model
below and picks the fastest that fits. The model: peak = resident bytes + target
features (when kept) + ``fixed + micro_batch × per_frame`` for the plan's
checkpoint set, the last two scaled with the pixel count, times a safety factor.
``fixed`` and ``per_frame`` were measured by running the real training step on
the full-size SD-Turbo UNet, TAESD and VGG-19 on PyTorch's "meta" device with a
tracker of live tensor bytes (``benchmarks/encode_memory_model.py`` re-derives
them), and checked against the peak that ``promptus bench --encode`` measured on
an H200 (20.75 GiB for 10 frames at 512², no plan). Time: every micro-batch costs
a fixed launch overhead plus work per frame, both grown by what the plan
recomputes (FLOP ratios of the three networks), calibrated on the same H200 run
(71.8 ms per iteration for 1 frame, 143.8 ms for 10). For other models the
estimates are those of the SD-Turbo architecture, so they are conservative for
smaller ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

from .config import GB, GIB, MEMORY_HELP, parse_memory  # noqa: F401 - part of this module's interface
from .errors import PromptusError

#: The parts of a training iteration that can be checkpointed, in forward order.
CHECKPOINTABLE = ("unet", "decoder", "loss")

def _format_si(n: float) -> str:
    for unit, f in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= f:
            return f"{n / f:.4g} {unit}"
    return f"{n:.0f} B"


def format_bytes(n: float) -> str:
    """``12.3 GiB`` / ``512 MiB``: binary units, as CUDA and nvidia-smi count."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


@dataclass(frozen=True)
class MemoryPlan:
    """How one training iteration runs: micro-batch size, what is checkpointed, whether target features are kept.

    ``micro_batch=None`` runs all frames of a segment in one pass. The default plan
    (all frames, nothing checkpointed, features kept) is the fastest and needs the
    most memory; every plan computes the same gradient.
    """

    micro_batch: int | None = None
    checkpoint: tuple[str, ...] = ()
    cache_targets: bool = True

    def __post_init__(self) -> None:
        if self.micro_batch is not None and (not isinstance(self.micro_batch, int) or self.micro_batch < 1):
            raise PromptusError(f"micro_batch={self.micro_batch!r} must be an integer ≥ 1 (or None: all frames)")
        unknown = set(self.checkpoint) - set(CHECKPOINTABLE)
        if unknown:
            raise PromptusError(f"cannot checkpoint {sorted(unknown)}; choose from {', '.join(CHECKPOINTABLE)}")
        # one spelling per plan: checkpoint set in forward order
        object.__setattr__(self, "checkpoint", tuple(c for c in CHECKPOINTABLE if c in self.checkpoint))

    def micro(self, frames: int) -> int:
        """Frames per pass for a segment of ``frames`` frames."""
        return frames if self.micro_batch is None else min(self.micro_batch, frames)

    def passes(self, frames: int) -> int:
        return -(-frames // self.micro(frames))

    def for_frames(self, frames: int) -> "MemoryPlan":
        """The same plan written for ``frames`` frames (a micro-batch of all frames becomes None)."""
        mb = self.micro(frames)
        return MemoryPlan(None if mb >= frames else mb, self.checkpoint, self.cache_targets)

    @property
    def is_default(self) -> bool:
        return self.micro_batch is None and not self.checkpoint and self.cache_targets

    def short(self, frames: int) -> str:
        """A table cell: ``2×5 frames, ckpt unet+decoder, features recomputed``."""
        mb = self.micro(frames)
        parts = [f"{self.passes(frames)}×{mb} frames" if mb < frames else "1 pass"]
        if self.checkpoint:
            parts.append("ckpt " + "+".join(self.checkpoint))
        if not self.cache_targets:
            parts.append("features recomputed")
        return ", ".join(parts)

    def describe(self, frames: int | None = None, *, perceptual: bool = True) -> str:
        parts = []
        if frames == 1:
            parts.append("one frame")
        elif frames is not None and self.micro(frames) < frames:
            parts.append(f"{self.passes(frames)} micro-batches of ≤{self.micro(frames)} frames")
        elif frames is None and self.micro_batch is not None:
            parts.append(f"micro-batches of {self.micro_batch} frames")
        else:
            parts.append("all frames in one pass")
        if self.checkpoint:
            parts.append("checkpointing " + " + ".join(self.checkpoint))
        if perceptual:
            parts.append("target features kept" if self.cache_targets else "target features recomputed")
        return ", ".join(parts)


# ------------------------------------------------------------------ the model

#: Pixels of the reference frame size the constants below were measured at (512²).
REF_PIXELS = 512 * 512

#: Activation bytes of one iteration at 512², per (perceptual term on, checkpoint set):
#: (fixed, per frame). Measured by benchmarks/encode_memory_model.py (the real training
#: step on the "meta" device with a tracker of live tensor bytes; fp16 UNet and TAESD,
#: bf16 VGG, as on CUDA); resident weights and kept target features are not included.
ACTIVATIONS: dict[tuple[bool, tuple[str, ...]], tuple[float, float]] = {
    (True, ()): (0.0, 1.641 * GIB),
    (True, ("unet",)): (0.003 * GIB, 0.978 * GIB),
    (True, ("decoder",)): (0.0, 1.369 * GIB),
    (True, ("loss",)): (0.0, 1.433 * GIB),
    (True, ("unet", "decoder")): (0.0, 0.713 * GIB),
    (True, ("unet", "loss")): (0.0, 0.783 * GIB),
    (True, ("decoder", "loss")): (0.005 * GIB, 1.154 * GIB),
    (True, ("unet", "decoder", "loss")): (0.005 * GIB, 0.682 * GIB),
    (False, ()): (0.0, 1.014 * GIB),
    (False, ("unet",)): (0.0, 0.687 * GIB),
    (False, ("decoder",)): (0.0, 0.984 * GIB),
    (False, ("unet", "decoder")): (0.0, 0.687 * GIB),
}

#: Bytes per frame of the kept VGG-19 target features at 512² (16 conv outputs in bf16, as on CUDA).
TARGET_FEATURE_BYTES = 155_189_248

#: Estimated over measured activations: the same model predicted 20.85 GiB where the H200 run
#: measured 20.75 GiB (then with float32 target features); the margin covers allocator rounding.
SAFETY = 1.05

#: Forward FLOPs per frame at 512² (torch.utils.flop_counter): the cost of recomputing a part.
FORWARD_TFLOP = {"unet": 0.804, "decoder": 0.141, "loss": 0.204}
#: A training iteration per frame costs about two forwards (no weight gradients: backward ≈ forward).
_BASE_TFLOP = 2 * sum(FORWARD_TFLOP.values())
#: Eager H200 calibration: 71.8 ms per iteration for 1 frame, 143.8 ms for 10, at 512².
LAUNCH_MS, FRAME_MS = 63.8, 8.0


@dataclass(frozen=True)
class PlanEstimate:
    plan: MemoryPlan
    frames: int
    peak_bytes: float
    ms_per_iteration: float
    perceptual: bool = True

    def describe(self) -> str:
        return (f"{self.plan.describe(self.frames, perceptual=self.perceptual)}; estimated peak "
                f"{format_bytes(self.peak_bytes)}")


def estimate(plan: MemoryPlan, frames: int, pixels: int, resident: float, *, perceptual: bool = True) -> PlanEstimate:
    """Estimated peak bytes and time of one iteration of ``frames`` frames of ``pixels`` pixels under ``plan``.

    ``resident``: bytes held before training (weights, buffers), counted as is;
    ``perceptual``: whether the loss runs VGG-19 (without it, "loss" checkpointing and
    target features change nothing).
    """
    s = pixels / REF_PIXELS
    mb = plan.micro(frames)
    checkpoint = plan.checkpoint if perceptual else tuple(c for c in plan.checkpoint if c != "loss")
    fixed, per_frame = ACTIVATIONS[perceptual, checkpoint]
    feats = 0 if not perceptual else TARGET_FEATURE_BYTES * s * (frames if plan.cache_targets else mb)
    targets = frames * 3 * pixels * 4  # the real frames in [-1, 1], float32
    peak = resident + targets + SAFETY * (feats + (fixed + mb * per_frame) * s)
    extra = sum(FORWARD_TFLOP[c] for c in checkpoint)
    if perceptual and not plan.cache_targets:
        extra += FORWARD_TFLOP["loss"]
    base = _BASE_TFLOP if perceptual else _BASE_TFLOP - 2 * FORWARD_TFLOP["loss"]
    grow = 1 + extra / base
    ms = (plan.passes(frames) * LAUNCH_MS + frames * FRAME_MS * s) * grow
    return PlanEstimate(plan, frames, peak, ms, perceptual)


def candidate_plans(frames: int, *, perceptual: bool = True) -> list[MemoryPlan]:
    """Every plan worth considering for ``frames`` frames: micro-batch sizes × checkpoint sets × target features."""
    sizes = sorted({-(-frames // k) for k in range(1, frames + 1)}, reverse=True)  # distinct ⌈n/k⌉
    parts = CHECKPOINTABLE if perceptual else tuple(c for c in CHECKPOINTABLE if c != "loss")
    sets = [c for r in range(len(parts) + 1) for c in combinations(parts, r)]
    caches = (True, False) if perceptual else (True,)
    return [MemoryPlan(None if mb >= frames else mb, ckpt, cache)
            for mb in sizes for ckpt in sets for cache in caches]


@dataclass(frozen=True)
class PlanChoice:
    """The chosen plan, its estimate, and why (for the log)."""

    estimate: PlanEstimate
    budget: float | None
    reason: str

    @property
    def plan(self) -> MemoryPlan:
        return self.estimate.plan


def choose_plan(frames: int, pixels: int, budget: float | None, resident: float, *, perceptual: bool = True,
                source: str = "") -> PlanChoice:
    """The fastest plan whose estimated peak fits ``budget`` bytes (None: no limit → the default plan).

    ``source`` says where the budget comes from (for the reason). Raises
    :class:`PromptusError` when not even the leanest plan fits.
    """
    default = estimate(MemoryPlan(), frames, pixels, resident, perceptual=perceptual)
    if budget is None:
        return PlanChoice(default, None, f"no memory limit: {source}" if source else "no memory limit")
    where = source or format_bytes(budget)
    if default.peak_bytes <= budget:
        return PlanChoice(default, budget, f"the default plan fits the budget, {where}")
    ests = [estimate(p, frames, pixels, resident, perceptual=perceptual)
            for p in candidate_plans(frames, perceptual=perceptual)]
    fits = [e for e in ests if e.peak_bytes <= budget]
    if not fits:
        lean = min(ests, key=lambda e: e.peak_bytes)
        raise PromptusError(
            f"a training step of {frames} frame{'s' if frames > 1 else ''} of {pixels} pixels needs about "
            f"{format_bytes(lean.peak_bytes)} even with {lean.describe().split(';')[0]}, more than the memory "
            f"budget, {where}; raise --max-memory, or encode at a smaller --size or --interval")
    best = min(fits, key=lambda e: (e.ms_per_iteration, e.peak_bytes))
    reason = (f"the default plan would need ~{format_bytes(default.peak_bytes)}, over the budget, {where}; "
              f"this is the fastest plan that fits, at ~{default.ms_per_iteration / best.ms_per_iteration:.0%} "
              "of the default's speed")
    return PlanChoice(best, budget, reason)


#: Share of the GPU's free memory that "auto" lets a training step use (the rest: other
#: processes' growth, the allocator's fragmentation).
AUTO_FRACTION = 0.9


def resolve_budget(max_memory: int | str, device) -> tuple[float | None, str]:
    """The bytes a training step may use on ``device`` for a ``max_memory`` setting, and where the figure comes from.

    An int is a budget as is; "none" is no limit; "auto" is no limit on the CPU and,
    on CUDA, :data:`AUTO_FRACTION` of the memory this process could hold: the GPU's
    free memory plus what PyTorch's allocator already reserved.
    """
    if max_memory == "none":
        return None, "max memory none"
    if isinstance(max_memory, int):
        return float(max_memory), f"max memory {_format_si(max_memory)} = {format_bytes(max_memory)}"
    if max_memory != "auto":
        raise PromptusError(f"max memory {max_memory!r}: expected {MEMORY_HELP}")
    if getattr(device, "type", str(device)) != "cuda":
        return None, "max memory auto: no limit on the CPU"
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    usable = free + torch.cuda.memory_reserved(device)
    budget = AUTO_FRACTION * usable
    return budget, (f"max memory auto = {format_bytes(budget)}, {AUTO_FRACTION:.0%} of the {format_bytes(usable)} "
                    "the GPU has free")
