"""SageAttention3 (NeurIPS 2025): FP4 microscaling attention for inference.

What is quantized, how, and why (sage3.md):

* Q, K, P and V in FP4 E2M1 (values +-{0, .5, 1, 1.5, 2, 3, 4, 6}) with a scale per block of
  16 elements (NVFP4, E4M3 scale) along each matmul's reduction dimension: Q and K per token
  over channels, P per query row over keys, V per channel over tokens (stored transposed).
* Smoothing of Q (per 128-query block, its mean's contribution added back in fp32) and of K
  (token mean, exact), as in SageAttention 1/2: FP4 has 15 values, outlier channels ruin it.
* Two-level quantization of P: each row of exp(S - m) is first spread over (0, 448*6], so that
  the per-block E4M3 scales use E4M3's whole range instead of its coarse low end.

The H100 has no FP4 tensor cores (``fp4_hardware()`` says so), so here every FP4 value is
dequantized exactly into a 16-bit operand and multiplied on 16-bit tensor cores: the paper's
numerics up to fp32 summation order, at the speed of that emulation, not FP4 speed.

``sageattn_train`` is SageBwd, the paper's 8-bit attention for training (INT8 forward and
backward, :mod:`sage3.train`); that one runs at real INT8 speed on Hopper.
"""

from .interface import fp4_hardware, sageattn
from .train import sageattn_train

__all__ = ["fp4_hardware", "sageattn", "sageattn_train"]
