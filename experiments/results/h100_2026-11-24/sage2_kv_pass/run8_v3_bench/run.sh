export SAGE_CACHE_DIR=/tmp/sc PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
python -c "from common import build; build.load()" > $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }
timeout 200 python -m experiments.bench_sage2_cuda --dims 128 64 --causal both --seqlens 2048 8192 16384 --out $OUT/bench > $OUT/bench.log 2>&1; tail -14 $OUT/bench.log
S="128:1:16384 128:0:16384 128:0:8192"
for r in 1 2; do
SAGE2_SM90_KV=triton timeout 60 python -m experiments.ab_sage2_cuda base --shapes $S 2>&1 | grep ratio | tee -a $OUT/ab.log
timeout 60 python -m experiments.ab_sage2_cuda new --shapes $S 2>&1 | grep ratio | tee -a $OUT/ab.log
done
timeout 150 python -m pytest -q -x tests/test_nonfinite.py 2>&1 | tail -3 | tee $OUT/tests_nonfinite.log
