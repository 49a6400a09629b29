export SAGE_CACHE_DIR=/tmp/sc PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
python -c "from common import build; build.load()" > $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }
timeout 420 python -m pytest -q tests/test_sage2_cuda.py tests/test_golden.py tests/test_sage2.py tests/test_nonfinite.py 2>&1 | tail -5 | tee $OUT/tests.log
