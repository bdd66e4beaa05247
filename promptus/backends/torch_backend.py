"""PyTorch backends: eager (the reference), CUDA-graph replay, and torch.compile.

* ``TorchBackend`` runs the diffusers UNet and the TAESD decoder eagerly (fp32 on
  CPU, fp16 on CUDA). With ``cuda_graph=True`` it captures the whole segment step —
  mix → UNet → x0 → decoder → uint8 — once per batch size and replays it, which
  removes the per-kernel launch cost that dominates small batches.
* ``CompileBackend`` compiles the whole segment step as one graph and keeps the
  result under the engine folder (:mod:`promptus.backends.compile_cache`).
* ``ReleaseParityBackend`` reproduces the public release's generation script numerics
  (``parity="release"``): fp32 weights under CUDA autocast, one frame per UNet call, the
  release sampler's arithmetic and its truncating uint8 conversion.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import TYPE_CHECKING

import torch

from ..config import DEFAULT_ENGINE_DIR, PARITY_RELEASE
from ..errors import PromptusError
from ..schedule import mix_latent, release_sigmas, to_uint8, to_uint8_release
from .base import Backend

if TYPE_CHECKING:
    from .compile_cache import CompileOptions

log = logging.getLogger(__name__)


class TorchBackend(Backend):
    """Runs the diffusers UNet and the TAESD decoder with PyTorch."""

    name = "torch"

    def __init__(self, unet: torch.nn.Module, taesd_decoder: torch.nn.Module,
                 device: torch.device | str, dtype: torch.dtype, *, channels_last: bool = False,
                 cuda_graph: bool = False, batch: int | None = None):
        super().__init__(torch.device(device), dtype)
        # With a fixed batch, a short segment (the clip's last) is padded to it so that
        # captured graphs and compiled kernels see only the shapes 1 and ``batch``.
        self.batch = batch
        self.pad_single = False  # frame 0 too (compile: one shape, one compilation)
        # nn.Module.to, not diffusers' override: that one warns about fp32-only modules
        # even when a model lists none. Note this moves the caller's modules in place.
        self.unet = torch.nn.Module.to(unet, self.device, dtype).eval().requires_grad_(False)
        self.taesd_decoder = torch.nn.Module.to(taesd_decoder, self.device, dtype).eval().requires_grad_(False)
        # Set the weight layout both ways: the modules may be shared with another backend.
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.unet.to(memory_format=fmt)
        self.taesd_decoder.to(memory_format=fmt)
        self.channels_last = channels_last
        if cuda_graph and self.device.type != "cuda":
            log.info("CUDA graphs need a CUDA device; running %s without them", self.name)
            cuda_graph = False
        self.cuda_graph = cuda_graph
        #: Lever (README "Decoding", levers): the captured segment graph also copies its frames to pinned host
        #: memory, so one replay does mix → UNet → TAESD → uint8 → device-to-host. Used only while a
        #: PipelinedDecoder copying to the host runs (it sets ``host_ring``, waits on ``host_ready``).
        self.graph_host_copy = False
        self.host_ring = 0  # pinned buffers (and graphs) in rotation; 0: frames stay on the device
        self.host_ready: torch.cuda.Event | None = None  # recorded after the last replay's copy
        self._graphs: dict[tuple, _SegmentGraph] = {}
        self._pool = None

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _unet(self, z, t, context):
        return self.unet(z, t, encoder_hidden_states=context, return_dict=False)[0]

    def _decoder(self, x):
        return self.taesd_decoder(x)

    @torch.inference_mode()
    def denoise(self, z, timestep, context):
        t = torch.full((z.shape[0],), timestep, device=self.device, dtype=torch.long)
        eps = self._unet(self._layout(z.to(self.device, self.dtype)), t, context.to(self.device, self.dtype))
        return eps.float()

    @torch.inference_mode()
    def decode(self, latent):
        return self._decoder(self._layout(latent.to(self.device, self.dtype))).float()

    def _segment_eager(self, z_prev, noise, mix, context, onestep):
        """The segment step as plain tensor code (what the CUDA graph captures)."""
        n = context.shape[0]
        z = mix_latent(z_prev, noise, self._mix_tensor(mix, z_prev)).expand(n, -1, -1, -1)
        t = torch.full((n,), onestep.timestep, device=self.device, dtype=torch.long)
        eps = self._unet(self._layout(z.to(self.dtype)), t, context.to(self.dtype))
        x0 = onestep.x0(z, eps.float())
        frames = to_uint8(self._decoder(self._layout(x0.to(self.dtype))))
        return x0, frames

    @torch.inference_mode()
    def segment(self, z_prev, noise, mix, context, onestep):
        return self._segment(z_prev, noise, mix, context, onestep)

    def _segment(self, z_prev, noise, mix, context, onestep):
        n = context.shape[0]
        if self.batch and n < self.batch and (n > 1 or self.pad_single):
            context = torch.cat([context, context[-1:].expand(self.batch - n, -1, -1)])
        x0, frames = self._run_segment(z_prev, noise, mix, context, onestep)
        return x0[n - 1:n].float(), frames[:n]

    def _run_segment(self, z_prev, noise, mix, context, onestep):
        if not self.cuda_graph:
            return self._segment_eager(z_prev, noise, mix, context, onestep)
        ring = self.host_ring if self.graph_host_copy else 0
        key = (context.shape[0], float(mix), onestep.timestep, ring)
        graph = self._graphs.get(key)
        if graph is None:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            t0 = time.perf_counter()
            graph = _SegmentGraph(self, z_prev, noise, mix, context, onestep, self._pool, host_ring=ring)
            self._graphs[key] = graph
            log.info("%s: captured the segment step for batch %d in %.2f s%s", self.name, context.shape[0],
                     time.perf_counter() - t0, f" ({ring} graphs copying to the host)" if ring else "")
        x0, frames = graph.replay(z_prev, noise, context)
        self.host_ready = graph.ready
        return x0, frames


class _SegmentGraph:
    """One captured segment step with static input and output buffers.

    With ``host_ring`` > 0 the step is captured that many times (one memory pool, replayed in
    turn), each capture ending with a copy of its frames into its own pinned host buffer:
    ``replay`` then returns that host buffer, valid once ``ready`` (an event) has passed and
    until ``host_ring`` further replays."""

    def __init__(self, backend: TorchBackend, z_prev, noise, mix, context, onestep, pool, *, host_ring: int = 0):
        self.z_prev = z_prev.detach().clone()
        self.noise = noise.detach().clone()
        self.context = context.detach().clone()
        stream = torch.cuda.Stream(backend.device)
        stream.wait_stream(torch.cuda.current_stream(backend.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: cuDNN/cuBLAS choose algorithms outside the capture
                _, frames = backend._segment_eager(self.z_prev, self.noise, mix, self.context, onestep)
        torch.cuda.current_stream(backend.device).wait_stream(stream)
        # Pinned buffers are allocated before the capture (a host allocation cannot be captured).
        self.hosts = [torch.empty(frames.shape, dtype=frames.dtype, pin_memory=True) for _ in range(host_ring)]
        self.graphs, self.outputs = [], []
        for host in self.hosts or [None]:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                x0, frames = backend._segment_eager(self.z_prev, self.noise, mix, self.context, onestep)
                if host is not None:
                    host.copy_(frames, non_blocking=True)
            self.graphs.append(graph)
            self.outputs.append((x0, frames))
        self.turn = 0
        self.ready: torch.cuda.Event | None = None

    def replay(self, z_prev, noise, context):
        self.z_prev.copy_(z_prev)
        self.noise.copy_(noise)
        self.context.copy_(context)
        i, self.turn = self.turn, (self.turn + 1) % len(self.graphs)
        self.graphs[i].replay()
        x0, frames = self.outputs[i]
        if self.hosts:
            self.ready = torch.cuda.Event()
            self.ready.record()
            return x0.clone(), self.hosts[i]
        # The static outputs are overwritten by the next replay: hand out copies.
        return x0.clone(), frames.clone()


class CompileBackend(TorchBackend):
    """The whole segment step compiled as one graph (inductor), CUDA-graph replayed on CUDA.

    What is compiled is a :class:`~promptus.backends.segment_step.SegmentStep` for the
    segment batch (frame 0 is padded to it, so only one shape is ever compiled), with
    the levers of ``options`` (:class:`~promptus.backends.compile_cache.CompileOptions`).
    With an ``engine_dir`` the compiled step is stored under ``engine_dir/compiled/``
    and a later process on the same GPU loads it instead of compiling
    (:func:`~promptus.backends.compile_cache.prepare`); without one, nothing is stored.

    ``denoise`` and ``decode`` (single stages, used by the benchmark's per-stage
    columns) run uncompiled: the compiled unit is the segment step.
    """

    name = "compile"
    stages_compiled = False  # denoise/decode run uncompiled (the benchmark leaves their columns empty)

    def __init__(self, unet, taesd_decoder, device, dtype, *, cuda_graph: bool = False, batch: int | None = None,
                 options: "CompileOptions | None" = None, compile_backend: str | None = None,
                 engine_dir: str | None = None, mechanism: str | None = "auto",
                 progress: bool = True, fallback: bool = False):
        from .compile_cache import CompileOptions

        options = options or CompileOptions()
        if compile_backend is not None:
            options = dataclasses.replace(options, backend=compile_backend)
        super().__init__(unet, taesd_decoder, device, dtype, channels_last=False, cuda_graph=cuda_graph,
                         batch=batch)
        from .compile_cache import resolve_options
        from .segment_step import shared_prefix_problem

        problem = shared_prefix_problem(self.unet) if options.shared_prefix else None
        self.options = options = resolve_options(options, problem, self.device)
        self._apply_layouts()
        self.compile_backend = options.backend
        self.engine_dir = engine_dir
        self.mechanism = mechanism if engine_dir else None
        self.progress = progress
        self.fallback = fallback  # a failed compilation runs the step uncompiled (backend auto) instead of raising
        self.pad_single = True  # one shape, one compilation
        self._steps: dict[tuple, object] = {}
        self._force = False
        self.prepared = None  # the last compile_cache.Prepared (how, seconds, key)

    def _apply_layouts(self) -> None:
        # Per network, both ways: the modules may be shared with another backend that set its own
        # layout since, and the compiled step's guards reject weights of another layout.
        for module, cl in ((self.unet, self.options.unet_channels_last),
                           (self.taesd_decoder, self.options.taesd_channels_last)):
            module.to(memory_format=torch.channels_last if cl else torch.contiguous_format)

    def _step_fn(self, z_prev, noise, mix_t, context, onestep):
        from ..config import CodecConfig
        from .compile_cache import architecture_digest, prepare
        from .segment_step import SegmentStep

        size = z_prev.shape[-1] * CodecConfig.latent_factor

        self._apply_layouts()
        key = (context.shape[0], tuple(z_prev.shape), onestep.timestep)
        fn = self._steps.get(key)
        if fn is None:
            step = SegmentStep(self.unet, self.taesd_decoder, onestep, self.dtype,
                               shared_prefix=self.options.shared_prefix,
                               unet_channels_last=self.options.unet_channels_last,
                               taesd_channels_last=self.options.taesd_channels_last)
            args = (z_prev.clone(), noise.clone(), mix_t.clone(), context.clone())
            try:
                self.prepared = prepare(
                    step, args, model_digest=architecture_digest(self.unet, self.taesd_decoder),
                    batch=context.shape[0], size=size, dtype=self.dtype, timestep=onestep.timestep,
                    device=self.device, options=self.options, engine_dir=self.engine_dir or DEFAULT_ENGINE_DIR,
                    mechanism=self.mechanism, progress=self.progress, force=self._force,
                    what=f"compile backend (batch {context.shape[0]}, {size} px)")
            except PromptusError as e:
                if not self.fallback:
                    raise
                from .compile_cache import Prepared

                log.warning("%s; running the segment step uncompiled", e)
                self.prepared = Prepared(step, "uncompiled", 0.0, None)
            fn = self._steps[key] = self.prepared.fn
        return fn

    def prepare(self, size: int, onestep=None, *, force: bool = False):
        """Compile (or load) the step for ``size``-pixel frames now, instead of at the first segment;
        with ``force``, a stored one is removed and rebuilt. Returns the ``compile_cache.Prepared``."""
        from ..config import CodecConfig
        from ..schedule import OneStep

        c = CodecConfig(width=size, height=size)
        onestep = onestep or OneStep.at(c.timestep)
        if not self.batch:
            raise PromptusError("the compile backend needs the segment batch to prepare ahead of time")
        h = size // c.latent_factor
        g = torch.Generator().manual_seed(0)
        z = torch.randn(1, c.latent_channels, h, h, generator=g).to(self.device)
        ctx = torch.randn(self.batch, c.tokens, c.embed_dim, generator=g).to(self.device)
        self._force = force
        try:
            with torch.no_grad():
                self._step_fn(z, z.clone(), self._mix_tensor(c.mix, z), ctx, onestep)
        finally:
            self._force = False
        return self.prepared

    def _segment_eager(self, z_prev, noise, mix, context, onestep):
        mix_t = self._mix_tensor(mix, z_prev)
        fn = self._step_fn(z_prev, noise, mix_t, context, onestep)
        return fn(z_prev, noise, mix_t, context)

    # torch.no_grad, not inference_mode: a loaded artifact's guards expect tensors made outside
    # inference mode (inference_mode would reject them).
    @torch.no_grad()
    def segment(self, z_prev, noise, mix, context, onestep):
        z_prev, noise, context = (t.clone() if t.is_inference() else t for t in (z_prev, noise, context))
        if noise is z_prev:  # the compiled step was traced with distinct inputs (its guards check that)
            noise = noise.clone()
        return self._segment(z_prev, noise, mix, context, onestep)


class ReleaseParityBackend(TorchBackend):
    """The public release's generation.py numerics, frame by frame.

    On CUDA: float32 weights run under ``torch.autocast("cuda")`` (float16 matmuls and
    convolutions; GroupNorm, the UNet's output norm and SiLU, and TAESD's input clamp in
    float32), the ResNet blocks' GroupNorm output cast back to float16 as the release's
    UNet does, one frame per UNet call, the release sampler's float32 arithmetic
    (``x = z·√(1+σ²)``, ε̂ from ``x·c_in``, ``d = (x − (x − σ·ε̂))/σ``, ``x0 = x − σ·d``), and the
    truncating uint8 conversion in float16. On the CPU autocast("cuda") does nothing, so
    the networks run in float32 as the release would there; the uint8 conversion still
    rounds the image to float16 and truncates, as the release's CUDA run does.
    """

    name = "release"
    parity = PARITY_RELEASE
    #: The release truncates; scripts/parity_check.py swaps in rounding to measure that part alone.
    to_uint8 = staticmethod(to_uint8_release)

    def __init__(self, unet: torch.nn.Module, taesd_decoder: torch.nn.Module, device: torch.device | str):
        super().__init__(unet, taesd_decoder, device, torch.float32)
        self._sigmas = release_sigmas().to(self.device)

    def precision(self):
        """The region the release runs everything in: CUDA autocast (float16), nothing on the CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _groupnorm_like_release(self):
        # The release's UNet (sgm's openaimodel) wraps its ResNet blocks' GroupNorm as
        # ``norm(x.float()).type(x.dtype)``: under autocast the SiLU after it runs in fp16,
        # where diffusers' block would run it on autocast's fp32 GroupNorm output.
        from diffusers.models.resnet import ResnetBlock2D

        handles = []
        if self.device.type == "cuda":
            for block in self.unet.modules():
                if isinstance(block, ResnetBlock2D):
                    for norm in (block.norm1, block.norm2):
                        handles.append(norm.register_forward_hook(lambda m, args, out: out.to(args[0].dtype)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _frame(self, z: torch.Tensor, c: torch.Tensor, timestep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One frame the way the release's sampler and denoiser compute it: (x0 1×4×h×w float32, uint8)."""
        sigma = self._sigmas[timestep:timestep + 1]  # shape [1]: it takes part in type promotion
        s = sigma.view(1, 1, 1, 1)
        x = z * torch.sqrt(1.0 + sigma[0] ** 2.0)  # the sampler scales the input up by 1/c_in
        c_in = 1 / (s**2 + 1.0) ** 0.5
        t = torch.full((1,), timestep, device=self.device, dtype=torch.long)
        eps = self._unet(x * c_in, t, c)
        denoised = eps * -s + x  # c_out = −σ, c_skip = 1; fp16 ε̂ · fp32 σ promotes to fp32
        x0 = x + -s * ((x - denoised) / s)  # the Euler step to σ = 0: not exactly ``denoised``
        return x0, self.to_uint8(self._decoder(x0))

    @torch.inference_mode()
    def segment(self, z_prev, noise, mix, context, onestep):
        frames = []
        with self.precision(), self._groupnorm_like_release():
            m = torch.tensor([mix], dtype=torch.float32, device=self.device)
            z = mix_latent(z_prev.float(), noise.float(), m)
            for c in context.split(1):
                x0, f = self._frame(z, c, onestep.timestep)
                frames.append(f)
        return x0, torch.cat(frames)

    def describe(self) -> str:
        how = "fp32 weights under fp16 autocast" if self.device.type == "cuda" else "fp32"
        return f"{self.name} ({self.device.type}, {how}, one frame per call, uint8 truncated in fp16)"
