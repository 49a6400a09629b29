#!/usr/bin/env bash
# compute-sanitizer (memcheck and racecheck) over every Triton kernel of sage1, sage2, sage3 and
# SageBwd and the CUDA kernels (csrc/sage2_sm90, csrc/sage3_sm90, csrc/decode), on small cases (GQA, causal, masks, varlen, odd lengths), on a GPU machine:
#   bash experiments/sanitize.sh [OUTDIR] [--decode-only | --sage3-only | --sage2-cuda-only | --kv-cache-only]
# Exits non-zero if any tool reports an error. Triton's autotuning and compilation run outside the
# sanitizer first (a warm-up run), so the sanitized run only launches cached kernels.
set -u
out=${1:-outputs/sanitize}
only=${2:-}
mkdir -p "$out"
python -m experiments.sanitize_cases $only > "$out/warmup.log" 2>&1 || { echo "warm-up failed"; tail -20 "$out/warmup.log"; exit 1; }
status=0
for tool in memcheck racecheck; do
  echo "=== compute-sanitizer --tool $tool"
  compute-sanitizer --tool "$tool" --error-exitcode 9 --print-limit 20 \
    python -m experiments.sanitize_cases $only > "$out/$tool.log" 2>&1
  rc=$?
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|cases ok" "$out/$tool.log" | tail -3
  if [[ $rc -ne 0 ]]; then echo "    $tool: FAILED (exit $rc), see $out/$tool.log"; status=1; else echo "    $tool: clean"; fi
done
exit $status
