export SAGE_CACHE_DIR=/tmp/sc PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
python -c "from common import build; build.load()" > $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }
for tool in memcheck racecheck synccheck; do echo "== $tool"; timeout 120 compute-sanitizer --tool $tool --print-limit 5 python experiments/results/h100_2026-11-24/sage2_kv_pass/run9_v3_sanitize/san_kv.py 2>&1 | tail -4; done 2>&1 | tee $OUT/sanitize.log
