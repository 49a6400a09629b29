"""Compile the decode kernels for Hopper (sm_90) without a GPU (used by tests/test_decode.py).

    python tests/compile_for_hopper.py '[DP, PV, K_PER_TOKEN, SMOOTH_Q, IS_CAUSAL, HAS_LENS, EVEN_D, QMAX, NQP]'

Triton's front end and its ptxas catch what the CPU interpreter does not: dot shape limits (an
INT8 dot needs a reduction of >= 32), layout and type errors, resource limits."""

import inspect
import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from common import decode
from common.triton_decode import decode_combine_kernel, decode_split_kernel

POINTERS = dict(Q="*fp16", K="*fp16", V="*fp16", PO="*fp32", PL="*fp32", FLAG="*i32", QLEN="*i32", KLEN="*i32",
                O="*bf16", LSE="*fp32")


def main(case):
    dp, pv, kpt, sq, causal, lens, even, qmax, nqp = case
    const = dict(BLOCK_M=64 if nqp >= 8 else 16, NQP=nqp, T=decode.DECODE_TILE, DP=dp, QMAX=qmax, K_PER_TOKEN=kpt,
                 SMOOTH_K=True, SMOOTH_Q=sq, PV=pv, IS_CAUSAL=causal, HAS_LENS=lens, PER_SEQ_CAUSAL=lens,
                 INTERPRET=False, DELTA_PRECISION=decode.DELTA_PRECISION, EVEN_D=even, RETURN_LSE=True)
    for kernel in (decode_split_kernel, decode_combine_kernel):
        names = list(inspect.signature(kernel.fn).parameters)
        sig = {n: POINTERS.get(n) or ("constexpr" if n in const else "fp32" if n in ("qk_mult", "log2_pscale")
                                      else "i32") for n in names}
        src = ASTSource(kernel, sig, constexprs={(names.index(n),): v for n, v in const.items() if n in names},
                        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in names if n in POINTERS})
        options = dict(num_warps=4 if dp <= 128 else 8, num_stages=decode.DECODE_STAGES, enable_fp_fusion=False)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        assert "mma" in compiled.asm["ptx"], kernel.__name__
    print("ok")


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
