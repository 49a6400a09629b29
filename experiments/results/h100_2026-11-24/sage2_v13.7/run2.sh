#!/bin/bash
# epilogue order A/B (O / l * dv against O * dv / l), both with PDL; the 2k call without the scale gather
export PYTHONPATH=$PWD SAGE_CACHE_DIR=$PWD/build/cache_s28
python -c "from common import build; build.load()" > $OUT/build_new.log 2>&1 &
SAGE_NVCC_FLAGS="-DSAGE2_AB_OLD_ORDER" python -c "from common import build; build.load()" > $OUT/build_old.log 2>&1 &
wait
SH="128:0:16384 128:0:8192 128:0:2048 128:1:16384"
for r in 1 2; do
  SAGE_NVCC_FLAGS="-DSAGE2_AB_OLD_ORDER" timeout 80 python -m experiments.ab_sage2_cuda old --shapes $SH >> $OUT/ab.log 2>&1
  timeout 80 python -m experiments.ab_sage2_cuda new --shapes $SH >> $OUT/ab.log 2>&1
done
timeout 60 python .old/s28/timeline.py new 2048 > $OUT/timeline_new.log 2>&1
grep -E "^(old|new) " $OUT/ab.log | sort -t= -k2,2 -k3,3 -k4,4 -s
grep -E "call span" $OUT/timeline_new.log
