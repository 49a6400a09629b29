#!/bin/bash
# final tree: the bars (same process as cuDNN, two rounds), sanitizer over the sage2 CUDA kernels (PDL launch), masks on the GPU
export PYTHONPATH=$PWD SAGE_CACHE_DIR=$PWD/build/cache_s28
python -c "from common import build; build.load()" > $OUT/build.log 2>&1
tail -1 $OUT/build.log
SH="128:0:16384 128:0:8192 128:0:2048 128:1:16384 64:0:16384"
for r in 1 2; do timeout 100 python -m experiments.ab_sage2_cuda final --shapes $SH >> $OUT/bars.log 2>&1; done
timeout 200 bash experiments/sanitize.sh $OUT/sanitize --sage2-cuda-only > $OUT/sanitize.log 2>&1; echo "sanitize rc $?"; cat $OUT/sanitize.log | tail -8
timeout 120 python -m pytest -q tests/test_masks_varlen.py -x > $OUT/t_masks.log 2>&1; tail -1 $OUT/t_masks.log
grep -E "^final " $OUT/bars.log | sort -t= -k2,2 -k3,3 -k4,4 -s
