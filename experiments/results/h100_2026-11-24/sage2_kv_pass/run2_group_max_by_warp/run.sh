export SAGE_CACHE_DIR=/tmp/sc PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
python -c "from common import build; build.load()" > $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }
echo "== kv tests"; timeout 120 python -m pytest -q -x tests/test_sage2_cuda.py -k "kv_pass" 2>&1 | tail -15 | tee $OUT/tests_kv.log
echo "== passes"; timeout 100 python experiments/results/h100_2026-11-24/sage2_kv_pass/time_passes.py 2>&1 | tee $OUT/time_passes.log
S="128:0:2048 128:1:2048 128:0:4096 128:1:4096 128:1:8192 64:0:2048 64:1:4096 128:1:16384"
for r in 1 2; do
SAGE2_SM90_KV=triton timeout 100 python -m experiments.ab_sage2_cuda base --shapes $S 2>&1 | grep ratio | tee -a $OUT/ab.log
timeout 100 python -m experiments.ab_sage2_cuda new --shapes $S 2>&1 | grep ratio | tee -a $OUT/ab.log
done
echo "== ncu"; timeout 120 ncu --kernel-name regex:kv_pass --launch-skip 1 --launch-count 1 --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis python experiments/results/h100_2026-11-24/sage2_kv_pass/run2_group_max_by_warp/ncu_kv.py > $OUT/ncu.log 2>&1; grep -E "Duration|Throughput|Achieved Occupancy|Stall|stall|Warp Cycles|Theoretical Occ|Block Limit|DRAM" $OUT/ncu.log | head -40
