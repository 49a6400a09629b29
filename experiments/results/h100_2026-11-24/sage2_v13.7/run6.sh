#!/bin/bash
# after the diff review's fixes: PDL only with V's scales by copy (head dims not a multiple of 4 launch plainly), masks/varlen on the GPU
export PYTHONPATH=$PWD SAGE_CACHE_DIR=$PWD/build/cache_s28
python -c "from common import build; build.load()" > $OUT/build.log 2>&1
tail -1 $OUT/build.log
timeout 200 python -m pytest -q -x tests/test_sage2_cuda.py -k "agrees or persistent or graphs or nan_rows" > $OUT/t_sage2_cuda.log 2>&1; tail -1 $OUT/t_sage2_cuda.log
timeout 280 python -m pytest -q -x tests/test_masks_varlen.py > $OUT/t_masks.log 2>&1; tail -1 $OUT/t_masks.log
