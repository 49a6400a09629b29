"""SageAttention2 (ICML 2025): per-thread INT4/INT8 Q,K with smoothing, FP8 P,V with two-level
accumulation.

What is quantized, how, and why (sage2.md):

* Q and K: INT8 (SageAttn2-8b, the Hopper default) or INT4 (SageAttn2-4b), symmetric, with one
  scale per *thread*: the groups of tokens that one GPU thread's MMA accumulator values come
  from, 32x finer than per-block for Q at the same cost (each thread still multiplies by one
  scale). K smoothing as in v1; for INT4, Q smoothing too: each block's query mean is removed
  before quantizing and its exact contribution mean_q . K^T is added back to S in fp32.
* P and V: FP8 E4M3. P = exp(S - m) in [0, 1] uses the static scale 448 (the running max is
  lowered by log2(448), so exp2 lands in E4M3's range directly); V one scale per channel.
* Two-level accumulation: Ada/Hopper FP8 MMAs accumulate in ~13 mantissa bits, so each KV
  tile's P V product starts in a fresh accumulator and is added to a true fp32 buffer.

On the H100: INT8 QK^T on INT8 tensor cores (wgmma s8), FP8 PV on FP8 tensor cores (wgmma
e4m3). INT4 has no fast tensor-core path on Hopper (52 TOPS measured), so INT4-quantized values
are multiplied on the INT8 tensor cores: numerically an INT4 matmul, at INT8 speed.
"""

from common.kv_cache import QuantizedKVCache

from .interface import sageattn, sageattn_varlen
from .kvcache import sageattn_kvcache

__all__ = ["sageattn", "sageattn_varlen", "sageattn_kvcache", "QuantizedKVCache"]
