export PYTHONUNBUFFERED=1 SAGE_CACHE_DIR=/tmp/sc PYTHONPATH=$PWD
python -m experiments.bench_sage2_cuda --dims 128 64 --causal both --seqlens 2048 8192 16384 --out $OUT/bench > $OUT/bench.log 2>&1
timeout 230 python -m pytest -q tests/test_sage2_cuda.py > $OUT/tests_sage2_cuda.log 2>&1
timeout 90 python -m pytest -q tests/test_sage1.py -k "gpu or cuda" > $OUT/tests_sage1_gpu.log 2>&1
tail -3 $OUT/tests_sage2_cuda.log $OUT/tests_sage1_gpu.log
grep -i "cuda\|D=\|cudnn" $OUT/bench.log | tail -30
