"""The bench and demo commands on whatever machine they run: workload and words."""

from __future__ import annotations

import pytest

from promptus.commands import bench as bench_cmd
from promptus.commands.main import build_parser

from synthetic import tiny_file


def test_bench_on_the_cpu_picks_a_small_workload_and_says_so():
    args = build_parser().parse_args(["bench", "--device", "cpu", "--keyframes", "2"])
    chosen = bench_cmd.resolve_defaults(args, "cpu")
    assert (args.model, args.size, args.keyframes, args.backends) == ("tiny", 64, 2, ["eager", "torch"])
    assert chosen == ["--model tiny", "--size 64", "--backends eager torch"]  # --keyframes was given
    args = build_parser().parse_args(["bench"])
    bench_cmd.resolve_defaults(args, "cuda")
    assert (args.model, args.size, args.keyframes) == ("random", 512, 31) and "compile" in args.backends


def test_demo_prints_the_rate_once_and_bench_on_a_cpu_has_no_gpu_words(tmp_path, tiny):
    from promptus.commands.bench import format_decode_table
    from promptus.commands.encode import encode_summary

    class Res:
        path, frame_count, keyframes, bytes, mean_psnr = tiny_file(tmp_path, tiny), 9, [0, 1, 2], 1, 10.0

    assert "bitrate" in encode_summary(Res()) and "bitrate" not in encode_summary(Res(), rate=False)
    nan = float("nan")
    table = format_decode_table(dict(device="cpu", torch="2", model="tiny", size=64, batch=4, frames_timed=8,
                                     dtype="float32", unet_tflop_per_batch=0.01, decoder_tflop_per_batch=0.01,
                                     matmul_ceiling_tflops=nan, arithmetic_limit_fps=nan, rows=[]))
    assert "nan" not in table and "GPU" not in table and "fp16" not in table.split("PSNR")[0]


@pytest.mark.slow  # one AOTInductor build of the tiny step (~30-40 s on 2 cores)
def test_bench_times_the_aoti_backend_as_a_whole_segment(tmp_path):
    """The aoti package is one segment step: the bench times its segments and end to end and leaves the
    per-stage columns empty, as for compile (it once called the stages and the row failed)."""
    import math

    import torch

    from promptus.backends.aoti_backend import aoti_problem
    from promptus.bench.decode import bench_decode

    why = aoti_problem(torch.device("cpu"))
    if why:
        pytest.skip(f"the aoti backend cannot run here: {why}")
    result = bench_decode(model="tiny", device="cpu", size=64, batch=3, backends=["eager", "aoti"], keyframes=2,
                          reps=2, starts=False, engine_dir=str(tmp_path))
    row = next(r for r in result["rows"] if r["backend"] == "aoti")
    assert row["status"] == "ok", row["status"]
    assert row["segment_ms"] > 0 and math.isnan(row["unet_ms"]) and row["psnr_vs_fp32"] > 40
