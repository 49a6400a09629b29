export PYTHONUNBUFFERED=1 SAGE_CACHE_DIR=/tmp/sc
NEW=$PWD
SH="128:1:16384 128:0:16384 128:1:8192 128:0:8192 128:0:2048 64:0:16384"
PYTHONPATH=$NEW python -c "from common import build; build.load()" 2>&1 | tail -1
(cd .old/base && PYTHONPATH=$PWD python $NEW/.old/same_passes.py save /tmp/base.pt) 2>&1 | grep -v Warn | tail -1
PYTHONPATH=$NEW python .old/same_passes.py compare /tmp/base.pt 2>&1 | grep -v Warn | tail -1
for r in 1 2; do
(cd .old/base && PYTHONPATH=$PWD python -m experiments.ab_sage2_cuda base --shapes $SH) 2>&1 | grep ratio
PYTHONPATH=$NEW python -m experiments.ab_sage2_cuda new --shapes $SH 2>&1 | grep ratio
done
PYTHONPATH=$NEW timeout 200 python -m pytest -q tests/test_sage2_cuda.py -k "graphs or nan or agrees or real_size or inputs" 2>&1 | tail -1
PYTHONPATH=$NEW timeout 100 python -m pytest -q tests/test_sage2.py -k "gpu or nan or absmax or inputs_unchanged" 2>&1 | tail -1
