"""SageAttention (ICLR 2025): INT8 Q K^T with K smoothing, FP16 P V with an FP16-accumulated PV.

What is quantized, how, and why (sage1.md):

* K has channel-wise outliers (a large bias shared by all tokens). Subtracting K's token mean
  before quantizing removes them exactly: every score of a row moves by the same q.mean_k,
  which the softmax cancels.
* Q and K are quantized to INT8, symmetric, one scale per block of 128 query / 64 key tokens
  (the kernel tiles: one scalar scale per tile pair). ``sm_scale*log2(e)`` is folded into Q's
  scale so the softmax runs on exp2.
* P and V stay FP16 (INT8 P,V fail on some layers); each KV tile's P V product accumulates in
  FP16 and is added to an FP32 buffer.

On Hopper (H100) the INT8 QK^T runs on INT8 tensor cores (wgmma s8); the FP16-accumulated PV
has no speed advantage there over FP32 accumulation (it does on RTX 4090, the paper's GPU).
"""

from .interface import sageattn, sageattn_varlen

__all__ = ["sageattn", "sageattn_varlen"]
