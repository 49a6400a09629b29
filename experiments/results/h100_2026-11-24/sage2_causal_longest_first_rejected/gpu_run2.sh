# .old/ab_kernel2.py: ../sage2_cuda_v13/ab_kernel.py with the shapes of README.md
export PYTHONUNBUFFERED=1
NEW=$PWD
(cd .old/base && SAGE_CACHE_DIR=/tmp/sb PYTHONPATH=$PWD python -c "from common import build; build.load()") > $OUT/build_base.log 2>&1 &
SAGE_CACHE_DIR=/tmp/sc PYTHONPATH=$NEW python -c "from common import build; build.load()" > $OUT/build_new.log 2>&1
wait
tail -1 $OUT/build_base.log $OUT/build_new.log
(cd .old/base && SAGE_CACHE_DIR=/tmp/sb PYTHONPATH=$PWD python $NEW/.old/same_outputs.py save /tmp/base_out.pt) 2>&1 | grep -v Warn | tail -2
SAGE_CACHE_DIR=/tmp/sc PYTHONPATH=$NEW python .old/same_outputs.py compare /tmp/base_out.pt 2>&1 | grep -v Warn | tail -3
for r in 1 2; do
(cd .old/base && SAGE_CACHE_DIR=/tmp/sb PYTHONPATH=$PWD python $NEW/.old/ab_kernel2.py base) 2>&1 | grep kernel
SAGE_CACHE_DIR=/tmp/sc PYTHONPATH=$NEW python .old/ab_kernel2.py new 2>&1 | grep kernel
done
SAGE_CACHE_DIR=/tmp/sc PYTHONPATH=$NEW timeout 150 python -m pytest -q tests/test_sage2_cuda.py -k "persistent or tile_counter or agrees or nan or graphs" 2>&1 | tail -2
