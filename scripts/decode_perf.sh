#!/usr/bin/env bash
# Issue 24 on one GPU in about 8 minutes: the command path and GPU table of `promptus bench`, then the decoder
# levers with the time that is left. JSON under benchmarks/ (and $OUT when set); tables on stdout.
#   bash scripts/decode_perf.sh [TAG]          # TAG names the files (default: h100)
# CPU check of the same steps at a tiny size:  PROMPTUS_PERF_CPU=1 bash scripts/decode_perf.sh cpu
set -euo pipefail
tag=${1:-h100}
engines=${PROMPTUS_PERF_ENGINES:-/tmp/promptus-perf-engines}  # shared: the levers load what the bench built
mkdir -p benchmarks "$engines"
total=${PROMPTUS_PERF_SECONDS:-520}
start=$SECONDS
if [[ -n "${PROMPTUS_PERF_CPU:-}" ]]; then
  python -m promptus bench --command-path --device cpu --backends eager --command-outputs png mp4 webm \
      --engine-dir "$engines" --json "benchmarks/decode_command_$tag.json"
  levers=(--dry-run-cpu --size 64 --batch 3 --variants default graph_host no_taesd_cl autotune)
else
  python -m promptus bench --command-path --backends compile --starts none --engine-dir "$engines" \
      --json "benchmarks/decode_command_$tag.json"
  levers=(--variants default graph_host no_taesd_cl autotune)
fi
left=$(( total - (SECONDS - start) ))
echo "levers: ${left} s left of ${total}"
python scripts/compile_levers.py "${levers[@]}" --engine-dir "$engines" --budget "$left" \
    --autotune-cap "$(( left > 260 ? 180 : left - 80 ))" --json "benchmarks/decode_levers_$tag.json" || true
if [[ -n "${OUT:-}" ]]; then cp "benchmarks/decode_command_$tag.json" "benchmarks/decode_levers_$tag.json" "$OUT/" || true; fi
echo "total $(( SECONDS - start )) s"
