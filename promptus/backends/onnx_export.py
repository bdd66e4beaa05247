"""ONNX export of the two networks the decoder runs: the SD-Turbo UNet and the TAESD decoder.

Each component is described once by a :class:`ComponentSpec` — its input and output
names, their shapes for a batch and frame size, sample inputs and the wrapper module
that is exported — in the manner of TensorRT's demo/Diffusion, but with one fixed
shape per export (the engines are built for one batch and size; no min/opt/max).

:func:`export_component` writes a clean, static-shape graph: the exporter's output is
folded (constants and shapes) and shape-inferred until nothing changes, checked with
``onnx.checker`` and written atomically. :func:`check_onnx` runs the file with
onnxruntime on the CPU and compares it with PyTorch on the same inputs.

Graph I/O (``B`` = batch, ``h = w = size/8``):

========================  =====================================  =========================
component                 inputs                                 output
========================  =====================================  =========================
``unet``                  ``z`` B×4×h×w, ``timestep`` (B,)        ``eps`` B×4×h×w
                          int64, ``context`` B×77×1024
``taesd_decoder``         ``latent`` B×4×h×w                      ``image`` B×3×size×size
========================  =====================================  =========================

``timestep`` is a per-frame int64 vector, exactly what diffusers' UNet takes (the
decoder always feeds 999, but the graph does not bake that in: the engine stays valid
for any timestep, and the time embedding is a few hundred FLOPs). Floating-point I/O
is in the export precision (float16 by default); callers cast at the boundary.

Exporter: ``"auto"`` uses PyTorch's TorchScript exporter (``dynamo=False``, opset 17),
which is present in every torch ≥ 2.4, needs no onnxscript, exports the tiny UNet in
~0.5 s and matches PyTorch to ~3e-6 in float32; when it is missing or fails, the
``torch.export``-based exporter (``dynamo=True``, needs ``onnxscript``) is tried. The
exception is float16 on the CPU, where the dynamo exporter goes first (see
:func:`exporter_order`: TorchScript would run float16 convolutions on the CPU). Both
give static graphs after clean-up that match PyTorch equally well.

onnxruntime on the CPU runs float16 graphs: ops without a float16 CPU kernel are run in
float32 behind inserted casts (onnxruntime 1.31 here), so :func:`check_onnx` checks the
float16 file itself; its error then includes float16 rounding (see its docstring).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import inspect
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from ..errors import PromptusError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import onnx

    from ..models import Models

log = logging.getLogger(__name__)

#: Opset of the TorchScript exporter: 17 has LayerNormalization, which TensorRT ≥ 8.6
#: and TensorRT-RTX parse natively.
OPSET = 17
#: The dynamo exporter starts at opset 18 (its default, 20, keeps GELU as a ``Gelu`` op
#: that older TensorRT parsers lack; at 18 it is spelled with ``Erf``).
DYNAMO_OPSET = 18
#: Version of the exported graph's layout (names, dtypes, clean-up). Part of every engine
#: cache key: bump it when the export or the clean-up changes what an engine computes.
GRAPH_VERSION = 1
#: Protobuf cannot serialise a message of 2 GiB or more; bigger models keep their
#: weights in one external ``<name>.data`` file beside the graph.
PROTOBUF_LIMIT = 2**31 - 1
#: Tokens × width of SD 2.x / SD-Turbo prompts.
CONTEXT_TOKENS = 77
CONTEXT_DIM = 1024
LATENT_CHANNELS = 4
EXPORTERS = ("auto", "torchscript", "dynamo")
PRECISIONS = {"fp16": torch.float16, "fp32": torch.float32}

_INSTALL_ONNX = "pip install onnx onnxruntime onnx-graphsurgeon (polygraphy optional)"


class OnnxExportError(PromptusError):
    """An ONNX export, its clean-up or its check against PyTorch failed."""


# ---------------------------------------------------------------------------------
# Component descriptions
# ---------------------------------------------------------------------------------


class UNetForExport(torch.nn.Module):
    """``(z, timestep, context) → eps``: the UNet with plain tensor inputs and output."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, z: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(z, timestep, encoder_hidden_states=context, return_dict=False)[0]


class TaesdDecoderForExport(torch.nn.Module):
    """``latent → image`` in [-1, 1]: diffusers' ``AutoencoderTiny.decoder`` (not ``.decode``)."""

    def __init__(self, decoder: torch.nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent)


@dataclass(frozen=True)
class ComponentSpec:
    """One exported network: names, shapes for a (batch, size), sample inputs, wrapper.

    ``inputs``/``outputs`` map each I/O name to a function ``(batch, size) → shape``;
    ``int_inputs`` names the inputs that are int64 whatever the export precision.
    """

    name: str
    description: str
    inputs: dict[str, Callable[[int, int], tuple[int, ...]]]
    outputs: dict[str, Callable[[int, int], tuple[int, ...]]]
    wrap: Callable[["Models"], torch.nn.Module]
    int_inputs: tuple[str, ...] = ()

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(self.outputs)

    def shapes(self, batch: int, size: int) -> dict[str, tuple[int, ...]]:
        """Shape of every input and output for ``batch`` frames of ``size``×``size`` pixels."""
        return {name: fn(batch, size) for name, fn in {**self.inputs, **self.outputs}.items()}

    def dtypes(self, dtype: torch.dtype) -> dict[str, torch.dtype]:
        """dtype of every input and output for an export in ``dtype``."""
        return {n: torch.int64 if n in self.int_inputs else dtype for n in (*self.inputs, *self.outputs)}

    def sample_inputs(self, batch: int, size: int, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu", seed: int = 0) -> dict[str, torch.Tensor]:
        """Deterministic inputs (N(0, 1) floats; timestep 999), generated in float32 on the CPU."""
        g = torch.Generator().manual_seed(seed)
        out = {}
        for name, fn in self.inputs.items():
            shape = fn(batch, size)
            if name == "timestep":
                x = torch.full(shape, 999, dtype=torch.int64)
            else:
                x = torch.randn(shape, generator=g).to(dtype)
            out[name] = x.to(device)
        return out


def _latent(size: int) -> int:
    return size // 8


COMPONENTS: dict[str, ComponentSpec] = {
    "unet": ComponentSpec(
        name="unet",
        description="SD-Turbo UNet: noise prediction eps for UNet input z, timestep and prompt context",
        inputs={
            "z": lambda b, s: (b, LATENT_CHANNELS, _latent(s), _latent(s)),
            "timestep": lambda b, s: (b,),
            "context": lambda b, s: (b, CONTEXT_TOKENS, CONTEXT_DIM),
        },
        outputs={"eps": lambda b, s: (b, LATENT_CHANNELS, _latent(s), _latent(s))},
        wrap=lambda models: UNetForExport(models.unet),
        int_inputs=("timestep",),
    ),
    "taesd_decoder": ComponentSpec(
        name="taesd_decoder",
        description="TAESD decoder: clean latent to image in [-1, 1]",
        inputs={"latent": lambda b, s: (b, LATENT_CHANNELS, _latent(s), _latent(s))},
        outputs={"image": lambda b, s: (b, 3, s, s)},
        wrap=lambda models: TaesdDecoderForExport(models.taesd.decoder),
    ),
}


def component_spec(component: str) -> ComponentSpec:
    """The :class:`ComponentSpec` named ``component`` (``"unet"`` or ``"taesd_decoder"``)."""
    try:
        return COMPONENTS[component]
    except KeyError:
        raise PromptusError(f"unknown component {component!r}; choose one of {', '.join(COMPONENTS)}") from None


def precision_name(dtype: torch.dtype) -> str:
    """``torch.float16`` → ``"fp16"``, ``torch.float32`` → ``"fp32"``."""
    for name, d in PRECISIONS.items():
        if d == dtype:
            return name
    raise PromptusError(f"unsupported engine precision {dtype}; use torch.float16 or torch.float32")


def validate_shape(models: "Models", batch: int, size: int) -> None:
    """Raise a PromptusError when ``batch``/``size`` cannot be exported for these models."""
    if not isinstance(batch, int) or batch < 1:
        raise PromptusError(f"batch must be a positive integer, got {batch!r}")
    if not isinstance(size, int) or size < 8 or size % 8:
        raise PromptusError(f"size must be a positive multiple of 8 (the latent is 8× smaller), got {size!r}")
    # the UNet halves the latent once per down block but the last: it must divide evenly
    factor = 2 ** (len(models.unet.config.down_block_types) - 1)
    if _latent(size) % factor:
        raise PromptusError(
            f"size {size}: this UNet needs the latent side (size/8 = {_latent(size)}) to be a multiple of "
            f"{factor}, i.e. a size that is a multiple of {8 * factor}"
        )


# ---------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------


def _module_for_export(models: "Models", spec: ComponentSpec, dtype: torch.dtype) -> torch.nn.Module:
    """The wrapper over a component in ``dtype``, without touching the caller's models."""
    module = spec.wrap(models)
    p = next(module.parameters())
    if p.dtype != dtype:
        # a private copy: casting the caller's module would change it (and round fp32 weights)
        module = copy.deepcopy(module)
        torch.nn.Module.to(module, dtype=dtype)
    return module.eval().requires_grad_(False)


def _export_torchscript(module, args, path: Path, spec: ComponentSpec, opset: int) -> None:
    # torch < 2.5 has no ``dynamo`` argument (its export is the TorchScript one)
    extra = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and tracer warnings: the graph is static on purpose
        torch.onnx.export(
            module, args, str(path), input_names=list(spec.input_names), output_names=list(spec.output_names),
            opset_version=opset, do_constant_folding=True, **extra,
        )


@contextlib.contextmanager
def _quiet_loggers(*names: str, level: int = logging.ERROR):
    """The dynamo exporter's passes log every step at INFO, and torch.onnx warns about torchvision."""
    loggers = [logging.getLogger(n) for n in names]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, old):
            lg.setLevel(lvl)


def _export_dynamo(module, args, path: Path, spec: ComponentSpec, opset: int) -> None:
    with warnings.catch_warnings(), _quiet_loggers("onnxscript", "onnx_ir", "torch.onnx"):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(path), input_names=list(spec.input_names), output_names=list(spec.output_names),
            opset_version=max(opset, DYNAMO_OPSET), dynamo=True, external_data=True, optimize=True, verbose=False,
        )


def exporter_order(exporter: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    """The exporters to try, in order, for ``exporter`` ("auto", "torchscript" or "dynamo").

    "auto" takes TorchScript first, except for float16 on the CPU: TorchScript traces by
    running the model, and PyTorch's float16 convolutions on the CPU are unusably slow
    (the full-size TAESD decoder did not finish one 512-pixel frame in 10 minutes),
    whereas the dynamo exporter traces with fake tensors (full-size UNet, batch 10:
    29 s). Without onnxscript the dynamo exporter is not tried first.
    """
    if exporter not in EXPORTERS:
        raise PromptusError(f"unknown ONNX exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if exporter != "auto":
        return [exporter]
    if torch.device(device).type == "cpu" and dtype == torch.float16 and importlib.util.find_spec("onnxscript"):
        return ["dynamo", "torchscript"]
    return ["torchscript", "dynamo"]


def _run_exporter(order: list[str], module, args, path: Path, spec: ComponentSpec, opset: int) -> str:
    """Export with the first exporter of ``order`` that works; returns its name."""
    errors = []
    for name in order:
        try:
            with torch.inference_mode(False), torch.no_grad():
                (_export_torchscript if name == "torchscript" else _export_dynamo)(module, args, path, spec, opset)
            return name
        except Exception as e:  # any exporter failure: try the next one, report all
            errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            log.info("ONNX export of %s with the %s exporter failed: %s", spec.name, name, errors[-1])
    hint = " (the dynamo exporter needs: pip install onnxscript)" if "dynamo" in order else ""
    raise OnnxExportError(f"ONNX export of {spec.name} failed with every exporter tried{hint}: " + "; ".join(errors))


def export_component(
    models: "Models",
    component: str,
    path: str | os.PathLike,
    *,
    batch: int,
    size: int,
    dtype: torch.dtype = torch.float16,
    exporter: str = "auto",
    opset: int = OPSET,
) -> Path:
    """Export ``component`` ("unet" or "taesd_decoder") of ``models`` to a static ONNX file.

    The graph takes ``batch`` frames of ``size``×``size`` pixels in ``dtype`` (float16 or
    float32; the UNet's ``timestep`` is int64), is cleaned (:func:`clean_graph`), has no
    dynamic dimension, passes ``onnx.checker`` and is written atomically to ``path``. A
    graph over 2 GiB (the full-size UNet in float32) keeps its weights in ``path`` +
    ``.data``, written first, so the ``.onnx`` file appears last. The caller's models
    are not modified (a casted private copy is exported). Returns ``path``.
    """
    require_onnx()
    spec = component_spec(component)
    precision_name(dtype)
    validate_shape(models, batch, size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    module = _module_for_export(models, spec, dtype)
    device = next(module.parameters()).device
    args = tuple(spec.sample_inputs(batch, size, dtype, device).values())
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.tmp") as tmp:
        raw = Path(tmp) / "raw.onnx"
        used = _run_exporter(exporter_order(exporter, device, dtype), module, args, raw, spec, opset)
        t_export = time.perf_counter() - t0
        del module
        import onnx

        model = onnx.load(str(raw))  # external data (big models) is loaded from beside it
        model = clean_graph(model)
        problems = static_shape_problems(model)
        if problems:
            raise OnnxExportError(f"{spec.name}: the cleaned graph still has dynamic shapes: {'; '.join(problems[:5])}")
        _check_io(model, spec, batch, size, dtype)
        _save_atomic(model, path, Path(tmp))
    log.info("exported %s (batch %d, %d px, %s) with the %s exporter to %s in %.1f s (export %.1f s)",
             spec.name, batch, size, precision_name(dtype), used, path, time.perf_counter() - t0, t_export)
    return path


def require_onnx() -> None:
    """Raise :class:`OnnxExportError` (with the pip command) when a package the export needs is missing."""
    try:
        import onnx  # noqa: F401
        import onnx_graphsurgeon  # noqa: F401
        import onnxruntime  # noqa: F401  (graphsurgeon folds constants by running them in onnxruntime)
    except ImportError as e:
        raise OnnxExportError(f"ONNX export needs the onnx packages ({e.name} is missing): {_INSTALL_ONNX}") from e


def _initializer_bytes(model: "onnx.ModelProto") -> int:
    total = 0
    for t in model.graph.initializer:
        total += len(t.raw_data) if t.HasField("raw_data") else t.ByteSize()
    return total


def _is_large(model: "onnx.ModelProto") -> bool:
    # leave 64 MiB of room for the graph itself
    return _initializer_bytes(model) > PROTOBUF_LIMIT - 2**26


def _save_atomic(model: "onnx.ModelProto", path: Path, tmp: Path) -> None:
    """Write ``model`` to ``path`` (and ``path.data`` when large) via ``tmp``, ``.onnx`` renamed last."""
    import onnx

    staged = tmp / path.name
    data_name = path.name + ".data"
    if _is_large(model):
        onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        onnx.checker.check_model(str(staged))  # by path: the in-memory model is too big for the checker
        os.replace(staged.with_name(data_name), path.with_name(data_name))
    else:
        onnx.checker.check_model(model)
        onnx.save_model(model, str(staged))
        with contextlib.suppress(FileNotFoundError):
            os.remove(path.with_name(data_name))  # a stale weights file of an earlier large export
    os.replace(staged, path)


def _check_io(model: "onnx.ModelProto", spec: ComponentSpec, batch: int, size: int, dtype: torch.dtype) -> None:
    """Assert the cleaned graph's I/O names, shapes and dtypes are the spec's (our invariant)."""
    from onnx import helper

    shapes, dtypes = spec.shapes(batch, size), spec.dtypes(dtype)
    got = {v.name: v for v in (*model.graph.input, *model.graph.output)}
    for name in (*spec.input_names, *spec.output_names):
        if name not in got:
            # the exporter dropped an input the graph does not use (e.g. a folded timestep)
            raise OnnxExportError(f"{spec.name}: exported graph lacks {name!r} (it has {', '.join(got)})")
        t = got[name].type.tensor_type
        shape = tuple(d.dim_value for d in t.shape.dim)
        np_dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        want = torch.empty(0, dtype=dtypes[name]).numpy().dtype
        assert shape == shapes[name] and np_dtype == want, (name, shape, shapes[name], np_dtype, want)


# ---------------------------------------------------------------------------------
# Clean-up
# ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_onnxruntime():
    """Constant folding runs onnxruntime, which warns about every float16 op it cannot fold."""
    try:
        import onnxruntime as ort
    except ImportError:
        yield
        return
    ort.set_default_logger_severity(3)
    try:
        yield
    finally:
        ort.set_default_logger_severity(2)


def clean_graph(model: "onnx.ModelProto", *, use_polygraphy: bool | None = None,
                max_passes: int = 10) -> "onnx.ModelProto":
    """Fold constants and shapes, infer shapes, drop dead nodes, sort: until nothing changes.

    ``model`` may be modified in place.

    With polygraphy importable (``use_polygraphy=None``) its ``fold_constants`` (several
    passes of graphsurgeon folding and shape inference) does the work; otherwise the same
    loop runs here with onnx-graphsurgeon and ``onnx.shape_inference``. Either way the
    result is shape-inferred and topologically sorted.
    """
    if use_polygraphy is None:
        try:
            import polygraphy.backend.onnx  # noqa: F401

            use_polygraphy = True
        except ImportError:
            use_polygraphy = False
    with _quiet_onnxruntime():
        if use_polygraphy:
            return _clean_with_polygraphy(model)
        return _clean_with_graphsurgeon(model, max_passes)


def _clean_with_polygraphy(model: "onnx.ModelProto") -> "onnx.ModelProto":
    from polygraphy.backend.onnx import fold_constants
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        # num_passes=None: repeat until the node count stops changing
        return fold_constants(model, num_passes=None, do_shape_inference=True, partitioning=None,
                              fold_shapes=True, copy=False, allow_onnxruntime_shape_inference=False)


def _infer_shapes(model: "onnx.ModelProto") -> "onnx.ModelProto":
    import onnx

    if not _is_large(model):
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    # over 2 GiB: shape inference only works through a file with external data
    with tempfile.TemporaryDirectory(prefix="promptus-onnx-") as tmp:
        p = Path(tmp) / "model.onnx"
        onnx.save_model(model, str(p), save_as_external_data=True, all_tensors_to_one_file=True, location="w.data")
        onnx.shape_inference.infer_shapes_path(str(p), str(p), data_prop=True)
        return onnx.load(str(p))


def _clean_with_graphsurgeon(model: "onnx.ModelProto", max_passes: int) -> "onnx.ModelProto":
    import onnx_graphsurgeon as gs

    count = None
    for _ in range(max_passes):
        graph = gs.import_onnx(_infer_shapes(model))
        graph.cleanup().toposort()
        graph.fold_constants(fold_shapes=True).cleanup().toposort()
        model = gs.export_onnx(graph)
        del graph
        if len(model.graph.node) == count:
            break
        count = len(model.graph.node)
    return _infer_shapes(model)


def static_shape_problems(model: "onnx.ModelProto") -> list[str]:
    """Every graph input, output or intermediate value whose shape is unknown or symbolic."""
    problems = []
    values = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    for v in values:
        t = v.type.tensor_type
        if not t.HasField("shape"):
            problems.append(f"{v.name}: unknown shape")
            continue
        bad = [d.dim_param or "?" for d in t.shape.dim if not d.HasField("dim_value")]
        if bad:
            problems.append(f"{v.name}: dims {bad}")
    for n in model.graph.node:
        if n.op_type == "Shape":
            problems.append(f"node {n.name}: a Shape op survived constant folding")
    return problems


# ---------------------------------------------------------------------------------
# Check against PyTorch
# ---------------------------------------------------------------------------------

#: Default tolerances of :func:`check_onnx` per graph precision: |onnx − torch| ≤ atol + rtol·max|torch|.
CHECK_TOLERANCES = {"fp32": (1e-3, 1e-3), "fp16": (2e-2, 2e-2)}


def check_onnx(
    models: "Models",
    component: str,
    path: str | os.PathLike,
    *,
    batch: int,
    size: int,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
) -> float:
    """Run the ONNX file with onnxruntime (CPU) and PyTorch on the same inputs; return max |difference|.

    The reference is the PyTorch component in float32 on the CPU (a private copy when
    the models are held otherwise), fed the inputs the graph takes (rounded to float16 for
    a float16 graph, so both see identical values). For a float16 graph the error therefore
    includes float16 arithmetic, not only export mistakes. Raises :class:`OnnxExportError`
    when the error exceeds ``atol + rtol · max|reference|`` (defaults: :data:`CHECK_TOLERANCES`).
    """
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise OnnxExportError(f"check_onnx needs onnxruntime: {_INSTALL_ONNX}") from e
    spec = component_spec(component)
    path = Path(path)
    if not path.is_file():
        raise OnnxExportError(f"{path}: no such ONNX file; export it first with export_component")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    graph_inputs = {i.name: i for i in session.get_inputs()}
    float16 = any(i.type == "tensor(float16)" for i in graph_inputs.values())
    precision = "fp16" if float16 else "fp32"
    d_atol, d_rtol = CHECK_TOLERANCES[precision]
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol

    inputs = spec.sample_inputs(batch, size, torch.float16 if float16 else torch.float32, seed=seed)
    missing = set(spec.input_names) - set(graph_inputs)
    if missing:
        raise OnnxExportError(f"{path}: not a {spec.name} graph (missing inputs {sorted(missing)})")
    expected = {n: spec.shapes(batch, size)[n] for n in spec.input_names}
    for name, i in graph_inputs.items():
        if tuple(i.shape) != expected.get(name):
            raise OnnxExportError(
                f"{path}: input {name} has shape {tuple(i.shape)}, expected {expected.get(name)} "
                f"for batch {batch} and size {size}; pass the batch and size it was exported with"
            )
    out = session.run([spec.output_names[0]], {n: t.numpy() for n, t in inputs.items()})[0]

    module = spec.wrap(models)
    p = next(module.parameters())
    if p.dtype != torch.float32 or p.device.type != "cpu":
        module = copy.deepcopy(module)
        torch.nn.Module.to(module, "cpu", torch.float32)
    with torch.inference_mode():
        ref = module(*(t.float() if t.is_floating_point() else t for t in inputs.values())).float()
    err = float((torch.from_numpy(out).float() - ref).abs().max())
    bound = atol + rtol * float(ref.abs().max())
    log.info("check_onnx %s (%s): max |onnxruntime − torch| = %.3g (bound %.3g)", spec.name, precision, err, bound)
    if not err <= bound:  # also catches NaN
        raise OnnxExportError(
            f"{path}: onnxruntime and PyTorch differ by up to {err:.3g} for {spec.name} (allowed {bound:.3g}); "
            "the export is wrong, or the tolerance too tight for this precision"
        )
    return err


__all__ = [
    "COMPONENTS", "ComponentSpec", "GRAPH_VERSION", "OPSET", "OnnxExportError", "check_onnx", "clean_graph",
    "component_spec", "export_component", "exporter_order", "precision_name", "require_onnx", "static_shape_problems",
]
