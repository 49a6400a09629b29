"""A/B: the whole sage2 CUDA call against cuDNN, same inputs; one line per shape (what produced this
folder's ab_*.log; the measurement is experiments.ab_sage2_cuda's).

    python ab.py TAG [--causal-only]   (run from the checkout whose sage2 is timed)
"""
import sys

from experiments.ab_sage2_cuda import DEFAULT_SHAPES, run

run(sys.argv[1], [s for s in DEFAULT_SHAPES if s[1] or "--causal-only" not in sys.argv])
