export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
R=$PWD/.old
declare -A FL=([d]="" [L2]="-Xptxas --register-usage-level=2" [L4]="-Xptxas --register-usage-level=4")
for n in d L2 L4; do
  (SAGE_NVCC_FLAGS="${FL[$n]}" SAGE_CACHE_DIR=/tmp/sc_$n timeout 300 python -c "from common import build; build.load()" > $OUT/build_$n.log 2>&1; echo "built $n rc=$?") &
done
wait
for round in 1 2; do
  order="d L2 L4"; [ $round = 2 ] && order="L4 L2 d"
  for n in $order; do
    SAGE_NVCC_FLAGS="${FL[$n]}" SAGE_CACHE_DIR=/tmp/sc_$n timeout 80 python $R/v3/measure.py "r$round $n" 2>&1 | grep -v Warn | tee -a $OUT/measure.log
  done
done
echo; sort -k3,3 -k4,4 -k5,5 -k2,2 $OUT/measure.log
