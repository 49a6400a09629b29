#!/bin/bash
# the custom ops' new size/device checks on the public CUDA paths (sage2, sage3, decode)
export PYTHONPATH=$PWD SAGE_CACHE_DIR=$PWD/build/cache_s28
python -c "from common import build; build.load()" > $OUT/build.log 2>&1
tail -1 $OUT/build.log
timeout 130 python -m pytest -q -x tests/test_sage2_cuda.py -k "agrees or graphs or nan_rows or real_size" > $OUT/t_sage2_cuda.log 2>&1; tail -1 $OUT/t_sage2_cuda.log
timeout 100 python -m pytest -q -x tests/test_sage3_cuda.py > $OUT/t_sage3_cuda.log 2>&1; tail -1 $OUT/t_sage3_cuda.log
timeout 150 python -m pytest -q -x tests/test_decode_cuda.py -k "layouts or real_decode or nonfinite or graph or op_and" > $OUT/t_decode_cuda.log 2>&1; tail -1 $OUT/t_decode_cuda.log
