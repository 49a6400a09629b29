#!/bin/bash
# A/B: output stores evict-first (ptxas --def-store-cache=cs: only the stores' cache hint changes)
cd "$(dirname "$0")/../.."
export SAGE_CACHE_DIR=$PWD/build/cache_s27
python -c "from common import build; build.load()" > $OUT/build_base.log 2>&1 &
SAGE_NVCC_FLAGS="-Xptxas --def-store-cache=cs" python -c "from common import build; build.load()" > $OUT/build_cs.log 2>&1 &
wait
SH="128:0:16384 128:0:8192 128:0:2048 128:1:16384"
for r in 1 2; do
  timeout 70 python -m experiments.ab_sage2_cuda base --shapes $SH >> $OUT/ab.log 2>&1
  SAGE_NVCC_FLAGS="-Xptxas --def-store-cache=cs" timeout 70 python -m experiments.ab_sage2_cuda cs --shapes $SH >> $OUT/ab.log 2>&1
done
grep -E "^(base|cs)" $OUT/ab.log | sort -t= -k2,2 -k3,3 -s
