#!/bin/bash
# GPU tests of this session's changes (PDL launch, epilogue order, 64-bit offsets, key lengths, guards)
export PYTHONPATH=$PWD SAGE_CACHE_DIR=$PWD/build/cache_s28
python -c "from common import build; build.load()" > $OUT/build.log 2>&1
tail -1 $OUT/build.log
timeout 200 python -m pytest -q -x tests/test_sage2_cuda.py -k "agrees or real_size or graphs or nan or kv_pass_gives" > $OUT/t_sage2_cuda.log 2>&1; tail -1 $OUT/t_sage2_cuda.log
timeout 60 python -m pytest -q tests/test_large_offsets.py tests/test_large_magnitudes.py > $OUT/t_large.log 2>&1; tail -1 $OUT/t_large.log
timeout 120 python -m pytest -q tests/test_masks_varlen.py > $OUT/t_masks.log 2>&1; tail -1 $OUT/t_masks.log
timeout 150 python -m pytest -q -x tests/test_decode.py > $OUT/t_decode.log 2>&1; tail -1 $OUT/t_decode.log
