"""The bench and demo commands on whatever machine they run: workload and words."""

from __future__ import annotations

from promptus.commands import bench as bench_cmd
from promptus.commands.main import build_parser


def test_bench_on_the_cpu_picks_a_small_workload_and_says_so():
    args = build_parser().parse_args(["bench", "--device", "cpu", "--keyframes", "2"])
    chosen = bench_cmd.resolve_defaults(args, "cpu")
    assert (args.model, args.size, args.keyframes, args.backends) == ("tiny", 64, 2, ["eager", "torch"])
    assert chosen == ["--model tiny", "--size 64", "--backends eager torch"]  # --keyframes was given
    args = build_parser().parse_args(["bench"])
    bench_cmd.resolve_defaults(args, "cuda")
    assert (args.model, args.size, args.keyframes) == ("random", 512, 31) and "compile" in args.backends
