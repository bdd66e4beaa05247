"""The bench and demo commands on whatever machine they run: workload and words."""

from __future__ import annotations

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
