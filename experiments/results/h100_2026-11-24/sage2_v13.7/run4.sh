#!/bin/bash
export PYTHONPATH=$PWD SAGE_CACHE_DIR=$PWD/build/cache_s28
python -c "from common import build; build.load()" > $OUT/build.log 2>&1
tail -1 $OUT/build.log
timeout 240 python -m pytest -q -x tests/test_sage2_cuda.py -k "not (agrees or real_size or graphs or nan or kv_pass_gives)" > $OUT/t_sage2_cuda_rest.log 2>&1; tail -1 $OUT/t_sage2_cuda_rest.log
timeout 30 python .old/s28/stride0.py > $OUT/stride0.log 2>&1; cat $OUT/stride0.log | tail -3
timeout 220 python -m pytest -q tests/test_large_offsets.py tests/test_large_magnitudes.py > $OUT/t_large.log 2>&1; tail -1 $OUT/t_large.log
