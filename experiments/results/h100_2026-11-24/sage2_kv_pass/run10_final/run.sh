export SAGE_CACHE_DIR=/tmp/sc PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
python -c "from common import build; build.load()" > $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }
timeout 120 python -m pytest -q tests/test_sage2_cuda.py -k "kv_pass or nan_rows or agrees" 2>&1 | tail -2 | tee $OUT/tests.log
timeout 100 python experiments/results/h100_2026-11-24/sage2_kv_pass/time_passes.py 2>&1 | tee $OUT/time_passes.log
