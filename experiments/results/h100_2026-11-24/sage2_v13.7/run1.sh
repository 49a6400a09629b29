#!/bin/bash
# PDL between the K/V pass and the attention kernel: build both, timelines, A/B round 1
export PYTHONPATH=$PWD SAGE_CACHE_DIR=$PWD/build/cache_s28
python -c "from common import build; build.load()" > $OUT/build_pdl.log 2>&1 &
SAGE_NVCC_FLAGS="-DSAGE2_NO_PDL" python -c "from common import build; build.load()" > $OUT/build_base.log 2>&1 &
wait
tail -2 $OUT/build_*.log
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv > $OUT/gpu.txt
SAGE_NVCC_FLAGS="-DSAGE2_NO_PDL" timeout 60 python .old/s28/timeline.py base 2048 8192 > $OUT/timeline_base.log 2>&1
timeout 60 python .old/s28/timeline.py pdl 2048 8192 > $OUT/timeline_pdl.log 2>&1
SH="128:0:16384 128:0:8192 128:0:2048 128:1:16384 128:1:2048"
for r in 1 2; do
  SAGE_NVCC_FLAGS="-DSAGE2_NO_PDL" timeout 80 python -m experiments.ab_sage2_cuda base --shapes $SH >> $OUT/ab.log 2>&1
  timeout 80 python -m experiments.ab_sage2_cuda pdl --shapes $SH >> $OUT/ab.log 2>&1
done
grep -E "^(base|pdl) " $OUT/ab.log | sort -t= -k2,2 -k3,3 -k4,4 -s
grep -E "call span" $OUT/timeline_*.log
