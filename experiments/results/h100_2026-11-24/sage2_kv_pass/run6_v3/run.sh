export SAGE_CACHE_DIR=/tmp/sc PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
python -c "from common import build; build.load()" > $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }
echo "== kv tests"; timeout 150 python -m pytest -q -x tests/test_sage2_cuda.py -k "kv_pass" 2>&1 | tail -15 | tee $OUT/tests_kv.log
grep -q "passed" $OUT/tests_kv.log && ! grep -q "failed" $OUT/tests_kv.log || exit 1
echo "== passes"; timeout 100 python experiments/results/h100_2026-11-24/sage2_kv_pass/time_passes.py 2>&1 | tee $OUT/time_passes.log
SAGE2_SM90_KV=triton timeout 110 python -m experiments.ab_sage2_cuda base 2>&1 | grep ratio | tee -a $OUT/ab.log
timeout 110 python -m experiments.ab_sage2_cuda new 2>&1 | grep ratio | tee -a $OUT/ab.log
