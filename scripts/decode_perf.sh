#!/usr/bin/env bash
# Issue 24 on one GPU, within one 10-minute slot: the command path and GPU table of `promptus bench`, then the
# decoder levers with the time that is left. JSON under benchmarks/ (and $OUT when set); tables on stdout.
#   bash scripts/decode_perf.sh [TAG]             # TAG names the files (default: h100); about 8-9 minutes
#   bash scripts/decode_perf.sh [TAG] autotune    # the max-autotune lever alone (its build takes minutes)
#   bash scripts/decode_perf.sh [TAG] aoti        # the aoti backend: its build, then the command path and GPU table
# CPU check of the same steps at a tiny size:  PROMPTUS_PERF_CPU=1 bash scripts/decode_perf.sh cpu
set -euo pipefail
tag=${1:-h100}
mode=${2:-main}
engines=${PROMPTUS_PERF_ENGINES:-/tmp/promptus-perf-engines}  # shared: the levers load what the bench built
mkdir -p benchmarks "$engines"
total=${PROMPTUS_PERF_SECONDS:-520}
start=$SECONDS
cpu=()
[[ -n "${PROMPTUS_PERF_CPU:-}" ]] && cpu=(--dry-run-cpu --size 64 --batch 3)
if [[ "$mode" == aoti ]]; then
  # The aoti backend as a user runs it: its package built once (timed), then the command path from a weights file
  # (the second decode on starts without diffusers) and the GPU table beside eager. The probe script alone:
  #   python scripts/aoti_probe.py --model random --device cuda --size 512 --batch 10
  if [[ -n "${PROMPTUS_PERF_CPU:-}" ]]; then
    python -m promptus engines build --backend aoti --model tiny --device cpu --size 64 --batch 3 \
        --engine-dir "$engines" || true
    python -m promptus bench --command-path --device cpu --model tiny --backends eager aoti --command-backend aoti \
        --command-clips 31 301 --command-outputs png mp4 --engine-dir "$engines" \
        --json "benchmarks/decode_command_aoti_$tag.json" || true
  else
    python -m promptus engines build --backend aoti --model random --device cuda --engine-dir "$engines" || true
    timeout $(( total - (SECONDS - start) )) python -m promptus bench --command-path --backends eager compile aoti \
        --starts none --command-backend aoti --command-clips 141 3001 --command-outputs png mp4 --engine-dir "$engines" \
        --json "benchmarks/decode_command_aoti_$tag.json" || true
  fi
  files=("benchmarks/decode_command_aoti_$tag.json")
elif [[ "$mode" == autotune ]]; then
  python scripts/compile_levers.py ${cpu[@]+"${cpu[@]}"} --variants default autotune --engine-dir "$engines" --budget "$total" \
      --autotune-cap "$(( total - 150 ))" --json "benchmarks/decode_autotune_$tag.json" || true
  files=("benchmarks/decode_autotune_$tag.json")
else
  if [[ -n "${PROMPTUS_PERF_CPU:-}" ]]; then
    python -m promptus bench --command-path --device cpu --backends eager --engine-dir "$engines" \
        --json "benchmarks/decode_command_$tag.json"
  else
    python -m promptus bench --command-path --backends compile --starts none --engine-dir "$engines" \
        --json "benchmarks/decode_command_$tag.json"
  fi
  left=$(( total - (SECONDS - start) ))
  echo "levers: ${left} s left of ${total}"
  python scripts/compile_levers.py ${cpu[@]+"${cpu[@]}"} --variants default graph_host no_taesd_cl cudnn_attn --engine-dir "$engines" \
      --budget "$left" --json "benchmarks/decode_levers_$tag.json" || true
  files=("benchmarks/decode_command_$tag.json" "benchmarks/decode_levers_$tag.json")
fi
if [[ -n "${OUT:-}" ]]; then cp "${files[@]}" "$OUT/" 2>/dev/null || true; fi
echo "total $(( SECONDS - start )) s"
