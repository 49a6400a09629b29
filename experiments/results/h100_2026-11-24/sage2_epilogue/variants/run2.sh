export PYTHONUNBUFFERED=1
R=$PWD/.old/v2
for n in base B D F G H T; do
  fl=""; [ $n = T ] && fl="-DSAGE2_TRACE"
  (cd $R/$n && SAGE_NVCC_FLAGS="$fl" SAGE_CACHE_DIR=/tmp/sc_$n timeout 360 python -c "from common import build; build.load()" > $OUT/build_$n.log 2>&1; echo "built $n rc=$?") &
done
wait
(cd $R/T && SAGE_NVCC_FLAGS="-DSAGE2_TRACE" SAGE_CACHE_DIR=/tmp/sc_T timeout 60 python $R/trace.py > $OUT/trace.log 2>&1; echo "trace rc=$?")
for n in base B D F G H; do
  (cd $R/$n && SAGE_CACHE_DIR=/tmp/sc_$n timeout 60 python $R/measure.py "$n" 2>&1 | grep -v Warning | tee -a $OUT/measure.log)
done
echo; grep kernel $OUT/measure.log | sort -k3,3 -k1,1
