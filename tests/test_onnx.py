"""ONNX export of the UNet and the TAESD decoder: static, checked graphs that match PyTorch.

Tiny random-weight models, 64-pixel frames, batch 2; onnxruntime on the CPU.
"""

from __future__ import annotations

import copy
import sys
import time

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the ONNX tests need onnx (pip install onnx)")
pytest.importorskip("onnx_graphsurgeon", reason="the ONNX tests need onnx-graphsurgeon")
ort = pytest.importorskip("onnxruntime", reason="the ONNX tests need onnxruntime")

from promptus.backends import onnx_export as ox  # noqa: E402
from promptus.backends.onnx_export import (  # noqa: E402
    COMPONENTS, OnnxExportError, check_onnx, clean_graph, component_spec, export_component, static_shape_problems,
)
from promptus.errors import PromptusError  # noqa: E402

BATCH, SIZE = 2, 64


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """{(component, precision): path} for both components in float32 and float16, with export seconds."""
    d = tmp_path_factory.mktemp("onnx")
    out, seconds = {}, {}
    for component in COMPONENTS:
        for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            t0 = time.perf_counter()
            out[component, precision] = export_component(tiny, component, d / f"{component}_{precision}.onnx",
                                                         batch=BATCH, size=SIZE, dtype=dtype)
            seconds[component, precision] = time.perf_counter() - t0
    print("export seconds:", {f"{c}/{p}": round(s, 2) for (c, p), s in seconds.items()})
    return out


def test_specs_describe_the_real_shapes():
    unet, dec = component_spec("unet"), component_spec("taesd_decoder")
    assert unet.shapes(10, 512) == {"z": (10, 4, 64, 64), "timestep": (10,), "context": (10, 77, 1024),
                                    "eps": (10, 4, 64, 64)}
    assert dec.shapes(10, 512) == {"latent": (10, 4, 64, 64), "image": (10, 3, 512, 512)}
    assert unet.dtypes(torch.float16) == {"z": torch.float16, "timestep": torch.int64, "context": torch.float16,
                                          "eps": torch.float16}
    sample = unet.sample_inputs(2, 64, torch.float16)
    assert sample["timestep"].tolist() == [999, 999] and sample["z"].dtype == torch.float16
    with pytest.raises(PromptusError, match="unknown component"):
        component_spec("vae")


@pytest.mark.parametrize("component", list(COMPONENTS))
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_onnxruntime_matches_torch(tiny, exported, component, precision):
    err = check_onnx(tiny, component, exported[component, precision], batch=BATCH, size=SIZE)
    print(f"{component} {precision}: max |onnxruntime - torch| = {err:.3g}")
    # fp32: export exactness; fp16: float16 arithmetic against the float32 reference
    assert err < (1e-4 if precision == "fp32" else 2e-2)


@pytest.mark.parametrize("component", list(COMPONENTS))
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cleaned_graph_is_static_and_valid(exported, component, precision):
    model = onnx.load(str(exported[component, precision]))
    onnx.checker.check_model(model, full_check=True)
    assert static_shape_problems(model) == []
    assert not [n for n in model.graph.node if n.op_type in ("Shape", "ConstantOfShape", "Identity")]
    spec = component_spec(component)
    shapes, dtypes = spec.shapes(BATCH, SIZE), spec.dtypes(ox.PRECISIONS[precision])
    io = {v.name: v.type.tensor_type for v in (*model.graph.input, *model.graph.output)}
    assert list(io) == [*spec.input_names, *spec.output_names]
    for name, t in io.items():
        assert tuple(d.dim_value for d in t.shape.dim) == shapes[name]
        assert onnx.helper.tensor_dtype_to_np_dtype(t.elem_type) == torch.empty(0, dtype=dtypes[name]).numpy().dtype


def test_export_leaves_the_models_alone(tiny, exported):
    # the fp16 export works on a private copy: the caller's float32 weights and digest stay
    assert next(tiny.unet.parameters()).dtype == torch.float32
    assert next(tiny.taesd.parameters()).dtype == torch.float32
    from promptus.models import model_digest

    assert tiny.identity().digest == model_digest(tiny)


def test_export_writes_atomically(exported):
    folder = exported["unet", "fp32"].parent
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(f"{c}_{p}.onnx" for c in COMPONENTS for p in ("fp32", "fp16"))  # no temp left over


def _raw_export(tiny, tmp_path):
    spec = component_spec("unet")
    module = spec.wrap(tiny)
    args = tuple(spec.sample_inputs(BATCH, SIZE).values())
    path = tmp_path / "raw.onnx"
    ox._run_exporter(["torchscript"], module, args, path, spec, ox.OPSET)
    return onnx.load(str(path)), {k: v.numpy() for k, v in spec.sample_inputs(BATCH, SIZE).items()}


def test_cleanup_without_polygraphy_equals_polygraphy(tiny, tmp_path):
    pytest.importorskip("polygraphy", reason="comparing with polygraphy needs it installed")
    raw, feeds = _raw_export(tiny, tmp_path)
    assert static_shape_problems(raw)  # the raw trace has shape arithmetic left
    by_gs = clean_graph(copy.deepcopy(raw), use_polygraphy=False)
    by_poly = clean_graph(copy.deepcopy(raw), use_polygraphy=True)
    assert static_shape_problems(by_gs) == [] == static_shape_problems(by_poly)
    assert len(by_gs.graph.node) == len(by_poly.graph.node) < len(raw.graph.node)
    outs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
            for m in (raw, by_gs, by_poly)]
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)
    np.testing.assert_allclose(outs[2], outs[0], atol=1e-5)


def test_cleanup_when_polygraphy_is_absent(tiny, tmp_path, monkeypatch):
    raw, _ = _raw_export(tiny, tmp_path)
    monkeypatch.setitem(sys.modules, "polygraphy", None)  # import polygraphy.* now raises ImportError
    monkeypatch.setitem(sys.modules, "polygraphy.backend.onnx", None)
    cleaned = clean_graph(raw)
    assert static_shape_problems(cleaned) == []
    onnx.checker.check_model(cleaned)


@pytest.mark.slow  # 4 s on 2 cores: full tier
def test_large_graphs_keep_weights_in_one_external_file(tiny, tmp_path, monkeypatch):
    # pretend the protobuf limit is tiny: the path taken by the full-size float32 UNet (3.4 GB)
    monkeypatch.setattr(ox, "PROTOBUF_LIMIT", 2**26 + 1)
    path = export_component(tiny, "unet", tmp_path / "unet.onnx", batch=BATCH, size=SIZE, dtype=torch.float32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.onnx", "unet.onnx.data"]
    assert path.stat().st_size < 1_000_000 < (tmp_path / "unet.onnx.data").stat().st_size
    assert check_onnx(tiny, "unet", path, batch=BATCH, size=SIZE) < 1e-4
    # a later small export of the same name removes the stale weights file
    monkeypatch.setattr(ox, "PROTOBUF_LIMIT", 2**31 - 1)
    export_component(tiny, "unet", path, batch=BATCH, size=SIZE, dtype=torch.float32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.onnx"]


def test_exporter_order():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert ox.exporter_order("auto", cuda, torch.float16) == ["torchscript", "dynamo"]
    assert ox.exporter_order("auto", cpu, torch.float32) == ["torchscript", "dynamo"]
    if ox.importlib.util.find_spec("onnxscript"):  # fp16 on the CPU: tracing by running is too slow
        assert ox.exporter_order("auto", cpu, torch.float16) == ["dynamo", "torchscript"]
    assert ox.exporter_order("torchscript", cpu, torch.float16) == ["torchscript"]


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.slow  # 10 s on 2 cores: full tier
def test_both_exporters_give_the_same_function(tiny, tmp_path, exporter, precision):
    if exporter == "dynamo":
        pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
    path = export_component(tiny, "unet", tmp_path / "unet.onnx", batch=BATCH, size=SIZE,
                            dtype=ox.PRECISIONS[precision], exporter=exporter)
    assert static_shape_problems(onnx.load(str(path))) == []
    err = check_onnx(tiny, "unet", path, batch=BATCH, size=SIZE)
    print(f"unet {precision} via {exporter}: max error {err:.3g}")
    assert err < (1e-4 if precision == "fp32" else 2e-2)


def test_check_onnx_catches_a_wrong_graph(exported):
    from promptus.models import tiny_models

    other = tiny_models(seed=1)  # other weights: the file does not compute this model
    with pytest.raises(OnnxExportError, match="differ by up to"):
        check_onnx(other, "unet", exported["unet", "fp32"], batch=BATCH, size=SIZE)
    with pytest.raises(OnnxExportError, match="pass the batch and size"):
        check_onnx(other, "unet", exported["unet", "fp32"], batch=3, size=SIZE)


def test_user_mistakes_are_promptus_errors(tiny, tmp_path):
    with pytest.raises(PromptusError, match="multiple of 8"):
        export_component(tiny, "unet", tmp_path / "x.onnx", batch=2, size=60)
    with pytest.raises(PromptusError, match="multiple of 16"):  # the tiny UNet halves the latent once
        export_component(tiny, "unet", tmp_path / "x.onnx", batch=2, size=72)
    with pytest.raises(PromptusError, match="positive integer"):
        export_component(tiny, "unet", tmp_path / "x.onnx", batch=0, size=64)
    with pytest.raises(PromptusError, match="precision"):
        export_component(tiny, "unet", tmp_path / "x.onnx", batch=2, size=64, dtype=torch.bfloat16)
    with pytest.raises(PromptusError, match="exporter"):
        export_component(tiny, "unet", tmp_path / "x.onnx", batch=2, size=64, exporter="tflite")
    with pytest.raises(OnnxExportError, match="no such ONNX file"):
        check_onnx(tiny, "unet", tmp_path / "missing.onnx", batch=2, size=64)
    assert not list(tmp_path.iterdir())
