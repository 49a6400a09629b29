"""Regenerate the golden outputs: ``python tests/golden/make_golden.py`` (CPU, the emulations).

Run it only when a change is meant to move results, and say so in the commit: the golden test
(tests/test_golden.py) exists to make every other change that moves them visible.
"""

from pathlib import Path

import torch

import sage1
import sage2
import sage3
from common.inputs import make_qkv

HERE = Path(__file__).parent

INPUTS = {  # name: make_qkv arguments (stored with the outputs: the test does not depend on the RNG)
    "gqa_fp16": dict(batch=1, heads=4, heads_kv=2, seqlen=77, seqlen_k=130, head_dim=64, kind="k_bias", seed=11),
    "nhd_bf16": dict(batch=2, heads=2, seqlen=96, head_dim=128, kind="outliers", dtype=torch.bfloat16, layout="NHD",
                     seed=12),
    # decode shapes (Nq <= 16: common.decode's split-KV path), GQA 8/2, odd key count
    "decode_gqa": dict(batch=2, heads=8, heads_kv=2, seqlen=3, seqlen_k=300, head_dim=64, kind="k_bias", seed=13),
}

CASES = {  # name: (inputs, generation, layout, options)
    "sage1": ("gqa_fp16", "sage1", "HND", dict(is_causal=True)),
    "sage1_per_token_fp32acc": ("nhd_bf16", "sage1", "NHD", dict(qk_granularity="per_token", pv_accum="fp32")),
    "sage1_bool_mask": ("gqa_fp16", "sage1", "HND", dict(attn_mask="tril")),
    "sage2_8b": ("gqa_fp16", "sage2", "HND", dict()),
    "sage2_8b_causal_nhd": ("nhd_bf16", "sage2", "NHD", dict(is_causal=True)),
    "sage2_4b_smooth_v": ("gqa_fp16", "sage2", "HND", dict(qk_dtype="int4", smooth_v=True)),
    "sage2_e5m2_single": ("nhd_bf16", "sage2", "NHD", dict(pv_dtype="fp8_e5m2", pv_accum="single")),
    "sage2_additive_mask": ("gqa_fp16", "sage2", "HND", dict(attn_mask="bias")),
    "sage3_nvfp4": ("gqa_fp16", "sage3", "HND", dict(is_causal=True)),
    "sage3_mxfp4_direct_p": ("nhd_bf16", "sage3", "NHD", dict(scale_format="mxfp4", two_level_p=False)),
    "sage1_decode_causal": ("decode_gqa", "sage1", "HND", dict(is_causal=True)),
    "sage2_8b_decode": ("decode_gqa", "sage2", "HND", dict()),
    "sage2_4b_decode_causal": ("decode_gqa", "sage2", "HND", dict(qk_dtype="int4", is_causal=True)),
    "sage2_fp16pv_decode": ("decode_gqa", "sage2", "HND", dict(pv_dtype="fp16")),
}
MODULES = {"sage1": sage1, "sage2": sage2, "sage3": sage3}


def make_mask(kind, q, k, layout):
    nq, nk = (q.shape[2], k.shape[2]) if layout == "HND" else (q.shape[1], k.shape[1])
    if kind == "tril":
        return torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)
    g = torch.Generator().manual_seed(5)
    return torch.randn(1, 1, nq, nk, generator=g) * 2


def run_case(case, inputs, backend, device="cpu"):
    inp, gen, layout, opts = CASES[case]
    q, k, v = (t.to(device) for t in inputs[inp])
    opts = dict(opts)
    if "attn_mask" in opts:
        opts["attn_mask"] = make_mask(opts["attn_mask"], q, k, layout).to(device)
    return MODULES[gen].sageattn(q, k, v, tensor_layout=layout, return_lse=True, backend=backend, **opts)


def main():
    inputs = {name: make_qkv(**kw) for name, kw in INPUTS.items()}
    outputs = {}
    for case in CASES:
        out, lse = run_case(case, inputs, "torch")
        outputs[case] = {"out": out, "lse": lse}
        print(case, tuple(out.shape), out.dtype)
    torch.save({"inputs": inputs, "outputs": outputs, "torch": str(torch.__version__)}, HERE / "golden.pt")


if __name__ == "__main__":
    main()
