#!/bin/bash
# session 27 device run 1: build new + base, kv-pass tests, pass timings, whole-call A/B
cd "$(dirname "$0")/../.."
ROOT=$PWD
export SAGE_CACHE_DIR=$ROOT/build/cache_new
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
( cd .old/base && SAGE_CACHE_DIR=$ROOT/build/cache_base python -c "from common import build; build.load(); print('base built')" > $OUT/build_base.log 2>&1 ) &
python -c "from common import build; build.load(); print('new built')" > $OUT/build_new.log 2>&1
wait
tail -2 $OUT/build_new.log $OUT/build_base.log
timeout 200 python -m pytest -q -x tests/test_sage2_cuda.py -k "kv_pass" -p no:cacheprovider > $OUT/tests_kv.log 2>&1; echo "tests rc $?"; tail -3 $OUT/tests_kv.log
timeout 150 python -m experiments.bench_kv_pass --rounds 2 > $OUT/pass_new.log 2>&1; echo "pass new rc $?"
( cd .old/base && SAGE_CACHE_DIR=$ROOT/build/cache_base timeout 60 python -m experiments.bench_kv_pass --rounds 2 > $OUT/pass_base.log 2>&1; echo "pass base rc $?" )
echo "=== pass new"; sed -n '/^D N/,$p' $OUT/pass_new.log
echo "=== pass base"; sed -n '/^D N/,$p' $OUT/pass_base.log
