#!/usr/bin/env bash
# Regenerate the README's reproduction table: every paper figure / table the experiments app covers.
#   bash experiments/reproduce.sh [kernels|lm|embedding|train|all] [OUTDIR]
# Each command is the one in the README's table (the exit status counts the runs that failed); results land in OUTDIR/<name>/ (results.md, .csv, .png,
# metadata.json). On a CPU-only machine the same commands run at reduced size through the emulation.
set -u
what=${1:-all}
out=${2:-outputs/reproduce}
case $what in kernels|lm|embedding|train|all) ;; *) echo "usage: $0 [kernels|lm|embedding|train|all] [OUTDIR]; got '$what'" >&2; exit 2;; esac
mkdir -p "$out"
failed=0
run() {  # run NAME ARGS...: one Hydra run into $out/NAME, its log beside it; a failure is reported, not fatal
  local name=$1; shift
  echo "=== $name: python -m experiments $*"
  local t0=$SECONDS
  python -m experiments "$@" hydra.run.dir="$out/$name" > "$out/$name.log" 2>&1 \
    && echo "    ok ($((SECONDS - t0)) s): $(tail -n 1 "$out/$name.log")" \
    || { echo "    FAILED ($((SECONDS - t0)) s), last lines:"; tail -n 15 "$out/$name.log"; failed=$((failed + 1)); }
}
multirun() {  # multirun NAME ARGS...: a Hydra sweep into $out/NAME, then its report
  local name=$1; shift
  echo "=== $name: python -m experiments -m $*"
  local t0=$SECONDS
  python -m experiments -m "$@" hydra.sweep.dir="$out/$name" > "$out/$name.log" 2>&1 \
    && python -m experiments.report "$out/$name" > "$out/$name.report.log" 2>&1 \
    && echo "    ok ($((SECONDS - t0)) s)" \
    || { echo "    FAILED ($((SECONDS - t0)) s), last lines:"; tail -n 15 "$out/$name.log"; failed=$((failed + 1)); }
}
if [[ $what == kernels || $what == all ]]; then
  run compare
  multirun kernel_speed experiment=kernel_speed attention=sage1,sage2_8b,sage2_4b,sage3_fp4 \
    shape.seq_len=2048,8192,16384 experiment.baselines=[sdpa_cudnn,sdpa_flash,sdpa_efficient]
  for e in smoothing granularity pv_dtype two_level_accum fp4_format fp4_two_level_p; do run "$e" experiment=$e; done
fi
if [[ $what == lm || $what == all ]]; then
  run lm_perplexity experiment=lm_perplexity          # trains the GPT first (cached in cache_dir)
  run capture_gpt experiment=capture inputs=captured_gpt
  for e in smoothing fp4_two_level_p granularity; do run "${e}_captured_gpt" experiment=$e inputs=captured_gpt; done
  run finetune experiment=finetune
  run pretrain experiment=pretrain
fi
if [[ $what == embedding || $what == all ]]; then
  run embedding_similarity experiment=embedding_similarity
  run capture_minilm experiment=capture inputs=captured_minilm
  for e in smoothing fp4_two_level_p; do run "${e}_captured_minilm" experiment=$e inputs=captured_minilm; done
fi
if [[ $what == train || $what == all ]]; then
  run sagebwd_grads experiment=sagebwd_grads
  run train_speed experiment=train_speed
fi
[[ $failed == 0 ]] || echo "$failed run(s) failed" >&2
exit $(( failed > 0 ))
