"""Saves (or compares) sage2 CUDA outputs and LSEs over cases that run masked tiles (ragged lengths,
causal with Nq != Nk, rows before the first key, GQA, D=64/128, both Q paths), so that two builds
can be checked for bit-identical results.

    python same_outputs.py save FILE      (from one checkout)
    python same_outputs.py compare FILE   (from the other)
"""
import os
import sys

import torch

import sage2
from common.inputs import make_qkv

CASES = [  # (B, Hq, Hkv, Nq, Nk, D, causal, layout)
    (2, 4, 2, 1000, 1000, 128, True, "HND"), (2, 4, 2, 700, 900, 128, True, "NHD"),
    (2, 3, 1, 1000, 333, 64, True, "HND"), (1, 4, 4, 300, 77, 128, True, "HND"),
    (2, 4, 2, 77, 300, 64, False, "NHD"), (2, 2, 2, 1000, 1000, 128, False, "HND"),
    (1, 8, 2, 4100, 4100, 128, True, "HND"), (1, 4, 4, 2049, 2049, 64, True, "HND"),
]
results = {}
for i, (b, hq, hkv, nq, nk, d, causal, layout) in enumerate(CASES):
    q, k, v = make_qkv(b, hq, nq, d, seqlen_k=nk, heads_kv=hkv, kind="k_bias", layout=layout, device="cuda", seed=i)
    for mode in ("pass", "kernel"):
        os.environ["SAGE2_SM90_Q"] = mode
        out, lse = sage2.sageattn(q, k, v, tensor_layout=layout, is_causal=causal, return_lse=True, backend="cuda")
        results[(i, mode)] = (out.cpu(), lse.cpu())
if sys.argv[1] == "save":
    torch.save(results, sys.argv[2])
    print(f"saved {len(results)} results")
else:
    other = torch.load(sys.argv[2])
    bad = [key for key, (o, lse) in results.items()
           if not (torch.equal(o, other[key][0]) and torch.equal(lse.nan_to_num(), other[key][1].nan_to_num()))]
    print(f"{len(results) - len(bad)} of {len(results)} bit-identical; differ: {bad}")
