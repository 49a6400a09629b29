set -x
export PYTHONUNBUFFERED=1 SAGE_CACHE_DIR=/tmp/sc
NEW=$PWD
SH="128:1:16384 128:0:16384 128:1:8192 128:0:8192 128:0:2048 64:0:16384"
(cd .old/base && PYTHONPATH=$PWD python $NEW/.old/same_passes.py save /tmp/base.pt) 2>&1 | grep -v Warn | tail -3
PYTHONPATH=$NEW python .old/same_passes.py compare /tmp/base.pt 2>&1 | grep -v Warn | tail -3
for r in 1 2; do
(cd .old/base && PYTHONPATH=$PWD python -m experiments.ab_sage2_cuda base --shapes $SH) 2>&1 | grep ratio
PYTHONPATH=$NEW python -m experiments.ab_sage2_cuda new --shapes $SH 2>&1 | grep ratio
done
PYTHONPATH=$NEW timeout 120 python -m pytest -q tests/test_sage2.py -k "absmax or nan or nonfinite or inf" 2>&1 | tail -2
