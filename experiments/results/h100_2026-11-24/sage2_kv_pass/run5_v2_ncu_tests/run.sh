export SAGE_CACHE_DIR=/tmp/sc PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
python -c "from common import build; build.load()" > $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }
echo "== ncu"; timeout 150 ncu --kernel-name regex:kv_pass --launch-skip 1 --launch-count 1 --set full --import-source yes -o $OUT/kv_v2 python experiments/results/h100_2026-11-24/sage2_kv_pass/run2_group_max_by_warp/ncu_kv.py > $OUT/ncu_run.log 2>&1; tail -3 $OUT/ncu_run.log
ncu -i $OUT/kv_v2.ncu-rep --page details --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats --section InstructionStats --section MemoryWorkloadAnalysis > $OUT/ncu_details.log 2>&1
grep -E "Duration|Throughput|Occupancy|Issued|Eligible|No Eligible|Warp Cycles|Executed Ipc|stall" $OUT/ncu_details.log | head -40
ncu -i $OUT/kv_v2.ncu-rep --page source --csv --print-source sass > $OUT/ncu_source.csv 2>/dev/null; ls -la $OUT/ncu_source.csv
echo "== tests"; timeout 300 python -m pytest -q tests/test_sage2_cuda.py tests/test_golden.py 2>&1 | tail -4 | tee $OUT/tests.log
