"""Compile kernels for Hopper (sm_90) without a GPU (used by tests/test_decode.py, tests/test_sage1.py,
tests/test_sage3_train.py).

    python tests/compile_for_hopper.py '[DP, PV, K_PER_TOKEN, SMOOTH_Q, IS_CAUSAL, HAS_LENS, EVEN_D, QMAX, NQP]'
    python tests/compile_for_hopper.py prefill    # sage1, sage2 and the quantization passes
    python tests/compile_for_hopper.py sagebwd    # SageBwd's forward and backward kernels
    python tests/compile_for_hopper.py kvcache    # decode over the quantized KV cache, and its device append
    python tests/compile_for_hopper.py sagebwd --regs   # and each kernel's registers and spills (ptxas -v)
    python tests/compile_for_hopper.py sagebwd --regs --sass   # and its SASS instruction counts (cuobjdump)

With --regs every i32 argument is also marked divisible by 16, as Triton specializes it at a
benchmark shape (N = 16k: lengths, padded lengths and block counts are all multiples of 16); without
that hint the loads of the transposed codes are not vectorized and the count is not the kernel
that runs (SageBwd's dK/dV kernel: 1600 bytes of spills unhinted, 508 hinted).

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


REPORT_REGISTERS = "--regs" in sys.argv
REPORT_SASS = "--sass" in sys.argv


def sass_counts(cubin: bytes, top: int = 24) -> str:
    """The most frequent SASS opcodes of a cubin (cuobjdump: on the PATH or Triton's own)."""
    import collections
    import os
    import re
    import shutil
    import subprocess
    import tempfile

    tool = shutil.which("cuobjdump") or os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                                     "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    ops = collections.Counter(m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)",
                                                             text))
    return f"{sum(ops.values())} instructions: " + " ".join(f"{op}={n}" for op, n in ops.most_common(top))


def ptxas_summary(ptx: str) -> str:
    """Registers, stack and spills of a kernel's PTX, as ``ptxas -v`` gives them for its target."""
    import re
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        arch = re.search(r"\.target (sm_\w+)", ptx).group(1)
        r = subprocess.run(["ptxas", f"-arch={arch}", "-v", f.name, "-o", "/dev/null"], capture_output=True, text=True)
    return "; ".join(line.split(":", 1)[-1].strip() for line in r.stderr.splitlines() if "Used" in line or "spill" in line)


def compile_sm90(kernel, types: dict, const: dict, none=(), warps=4, stages=2, **options):
    """``kernel`` compiled for sm_90: ``types`` of the non-constexpr arguments (default i32; pointers
    get 16-byte divisibility), ``const`` the constexprs, ``none`` arguments passed as None."""
    names = list(inspect.signature(kernel.fn).parameters)
    sig = {n: types.get(n) or ("constexpr" if n in const or n in none else "i32") for n in names}
    constexprs = {(names.index(n),): v for n, v in const.items()}
    constexprs.update({(names.index(n),): None for n in none})
    aligned = [n for n in names if types.get(n, "").startswith("*") or (REPORT_REGISTERS and sig[n] == "i32")]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(kernel, sig, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=warps, num_stages=stages, **options))
    if REPORT_REGISTERS:
        flags = ", ".join(f"{k}={v}" for k, v in const.items() if isinstance(v, bool) and v)
        print(f"{kernel.fn.__name__} ({warps} warps, {stages} stages{', ' + flags if flags else ''}): "
              f"{ptxas_summary(compiled.asm['ptx'])}", flush=True)
        if REPORT_SASS:
            print(f"    {sass_counts(compiled.asm['cubin'])}", flush=True)
    return compiled


def prefill():
    """The prefill attention kernels (with the NaN/Inf rule's epilogue and masked-tile zeroing) and
    the quantization passes (with its zeroing and recording), in the variants the calls launch."""
    from common.triton_quant import quantize_int_kernel, quantize_v_fp8_kernel, scan_v_kernel
    from sage1.kernel import sage1_attn_fwd
    from sage2.kernel import sage2_attn_fwd

    f32, i32, u8 = "*fp32", "*i32", "*u8"
    for causal in (False, True):
        for rule in (False, True):
            k = compile_sm90(sage1_attn_fwd, dict(Q="*i8", K="*i8", V="*fp16", QS=f32, KS=f32, O="*fp16", LSE=f32,
                                                  MASKP=u8, QLEN=i32, KLEN=i32, VMAX=f32, QBAD=u8, FIRST_BAD=i32),
                             dict(BLOCK_M=128, BLOCK_N=64, DP=128, Q_SCALAR=True, K_SCALAR=True, IS_CAUSAL=causal,
                                  PV_FP16_ACC=True, RETURN_LSE=True, USE_DESC=False, MASK_KIND=0, HAS_LENS=rule,
                                  PER_SEQ_CAUSAL=False, V_RESCALED=rule, ZERO_V=rule, NAN_ROWS=rule),
                             none=("Q_desc", "K_desc", "V_desc"))
            assert "mma" in k.asm["ptx"]
            desc = "tensordesc<{}[1,128,128]>"
            k = compile_sm90(sage2_attn_fwd, dict(Q_desc=desc.format("i8"), K_desc=desc.format("i8"),
                                                  V_desc=desc.format("fp8e4nv"), QS=f32, KS=f32, DS=f32, VS=f32, VM=f32,
                                                  O="*bf16", LSE=f32, MASKP=u8, QLEN=i32, KLEN=i32, QBAD=u8,
                                                  FIRST_BAD=i32, log2_pscale="fp32"),
                             dict(BLOCK_M=128, BLOCK_N=128, DP=128, DS_BLOCK=64, IS_CAUSAL=causal, PV_FP8=True,
                                  FP8_E5M2=False, PV_MODE=1, SMOOTH_Q=False, SMOOTH_V=rule, K_SCALE_MODE=1,
                                  RETURN_LSE=True, INTERPRET=False, MASK_KIND=0, HAS_LENS=rule, PER_SEQ_CAUSAL=rule,
                                  HAS_VS=True, NAN_ROWS=rule), warps=8, stages=3)
            assert "mma" in k.asm["ptx"]
    quant_types = dict(X="*fp16", MEAN=f32, OUT="*i8", SCALE=f32, BLOCK_MEAN=f32, BAD_ROWS=u8, FIRST_BAD=i32,
                       mult="fp32")
    for block, gran, mean, smooth, flags in ((128, 0, False, False, 1), (64, 0, True, False, 2), (64, 3, False, True, 1),
                                             (128, 4, True, False, 2), (64, 1, False, False, 0)):
        compile_sm90(quantize_int_kernel, quant_types,
                     dict(BLOCK=block, DP=128, QMAX=127, GRAN=gran, WARP=16, HAS_MEAN=mean, SMOOTH_BLOCK=smooth,
                          ZERO=flags != 0, FLAGS=flags), warps=4 if block * 128 <= 8192 else 8)
    for per_channel in (False, True):
        compile_sm90(scan_v_kernel, dict(V="*fp16", MEAN=f32, AMAX=i32, FIRST_BAD=i32),
                     dict(BLOCK=64, DP=128, HAS_MEAN=per_channel, PER_CHANNEL=per_channel, FLAG=True, TILES=8), warps=2)
    compile_sm90(quantize_v_fp8_kernel, dict(V="*fp16", MEAN=f32, ABSMAX=f32, SCALE=f32, OUT="*fp8e4nv"),
                 dict(BLOCK=32, DP=128, HAS_MEAN=True, FP8_E5M2=False, FMAX=448.0, INTERPRET=False, ZERO=True,
                      WGMMA_KEY_ORDER=True))
    print("ok")


def sagebwd():
    """SageBwd's kernels (sage3.train_kernel), in the variants training launches: the forward, the dK/dV
    kernel (dQ by atomics or not, dP in 16 bits or INT8) and the deterministic dQ kernel, causal or
    not, and the backward's helpers."""
    from sage3 import train_kernel as tk

    f32, i8 = "*fp32", "*i8"
    bwd_types = dict(Q=i8, QS=f32, QT=i8, K=i8, KS=f32, KT=i8, V16="*fp16", VC=i8, VS=f32, DO16="*fp16", DOC=i8,
                     DOT=i8, DOS=f32, L=f32, DI=f32, DK=f32, DV=f32, DQACC=f32, DQ="*bf16", dq_mult="fp32")
    for causal in (False, True):
        block_m, warps, stages = tk.FWD_CONFIGS[128]
        k = compile_sm90(tk.sagebwd_fwd_kernel, dict(Q=i8, QS=f32, K=i8, KS=f32, VT=i8, VS=f32, O="*fp16", L=f32),
                         dict(BLOCK_M=block_m, BLOCK_N=tk.FWD_KV_TILE, DP=128, IS_CAUSAL=causal, QB=tk.FWD_Q_BLOCK),
                         warps=warps, stages=stages, maxnreg=tk.FWD_MAXNREG[128])
        assert "mma" in k.asm["ptx"]
        const = dict(BLOCK=tk.BWD_TILE, QB=tk.FWD_Q_BLOCK, DP=128, IS_CAUSAL=causal, INTERPRET=False)
        for dov, atomic in ((False, False), (True, True)):
            warps, stages = tk.BWD_CONFIGS[128]
            k = compile_sm90(tk.sagebwd_dkdv_kernel, bwd_types, dict(const, DOV=dov, ATOMIC_DQ=atomic),
                             warps=warps, stages=stages)
            assert "mma" in k.asm["ptx"]
            names = inspect.signature(tk.sagebwd_dq_kernel.fn).parameters
            warps, stages = tk.DQ_CONFIGS[128]
            k = compile_sm90(tk.sagebwd_dq_kernel, {n: t for n, t in bwd_types.items() if n in names},
                             dict(const, DOV=dov), warps=warps, stages=stages)
            assert "mma" in k.asm["ptx"]
    compile_sm90(tk.transpose_codes_kernel, dict(X=i8, Y=i8), dict(BLOCK_N=64, DP=128))
    compile_sm90(tk.row_dot_kernel, dict(A="*fp16", B="*fp16", OUT=f32), dict(BLOCK=64, DP=128))
    print("ok")


def kvcache():
    """The decode kernel over a quantized KV cache (common.kv_cache), causal or not, E4M3 or E5M2,
    GQA packing of 16 and 64 rows, in its launch settings."""
    from common import kv_cache
    from common.triton_decode import decode_cached_kernel

    f32 = "*fp32"
    types = dict(Q="*fp16", KC="*i8", KS=f32, KM=f32, VC="*fp8e4nv", VS=f32, KT="*fp16", VT="*fp16", FIRST_BAD="*i32",
                 SEQLENS="*i32", PO=f32, PL=f32, COUNT="*i32", O="*fp16", LSE=f32, qk_mult="fp32", log2_pscale="fp32")
    for causal, pv, block_m, nqp in ((False, 2, 16, 1), (True, 2, 16, 4), (False, 3, 64, 1)):
        t = dict(types, VC="*fp8e5" if pv == 3 else "*fp8e4nv")
        k = compile_sm90(decode_cached_kernel, t,
                         dict(BLOCK_M=block_m, NQP=nqp, T=decode.DECODE_TILE, DP=128, PV=pv, IS_CAUSAL=causal,
                              INTERPRET=False, EVEN_D=True, RETURN_LSE=causal),
                         warps=kv_cache.CACHE_WARPS, stages=kv_cache.CACHE_STAGES, enable_fp_fusion=False,
                         **({"maxnreg": kv_cache.CACHE_MAXNREG} if kv_cache.CACHE_MAXNREG and block_m <= 16 else {}))
        assert "mma" in k.asm["ptx"] and "atom" in k.asm["ptx"]
    from common.triton_kv_append import append_step_kernel

    for pv, dtype in ((2, "*fp16"), (3, "*bf16")):  # the device append a CUDA graph records
        t = dict(K=dtype, V=dtype, TK=dtype, TV=dtype, LTK=dtype, LTV=dtype, KC="*i8", KS=f32, KM=f32,
                 VC="*fp8e5" if pv == 3 else "*fp8e4nv", VS=f32, FIRST_BAD="*i32", SEQLENS="*i32", ARRIVED="*i32")
        k = compile_sm90(append_step_kernel, t, dict(T=decode.DECODE_TILE, DP=128, PV=pv, INTERPRET=False), warps=4,
                         stages=1)
        assert "atom" in k.asm["ptx"]
    print("ok")


def main(case):
    dp, pv, kpt, sq, causal, lens, even, qmax, nqp, mask_kind = (*case, 0)[:10]
    const = dict(BLOCK_M=64 if nqp >= 8 else 16, NQP=nqp, T=decode.DECODE_TILE, DP=dp, QMAX=qmax, K_PER_TOKEN=kpt,
                 SMOOTH_K=True, SMOOTH_Q=sq, PV=pv, IS_CAUSAL=causal, HAS_LENS=lens, PER_SEQ_CAUSAL=lens,
                 INTERPRET=False, DELTA_PRECISION=decode.DELTA_PRECISION, EVEN_D=even, RETURN_LSE=True,
                 MASK_KIND=mask_kind)
    pointers = dict(POINTERS, MASKP="*u8" if mask_kind == 1 else "*fp32")
    for kernel in (decode_split_kernel, decode_combine_kernel):
        names = list(inspect.signature(kernel.fn).parameters)
        sig = {n: pointers.get(n) or ("constexpr" if n in const else "fp32" if n in ("qk_mult", "log2_pscale")
                                      else "i32") for n in names}
        src = ASTSource(kernel, sig, constexprs={(names.index(n),): v for n, v in const.items() if n in names},
                        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in names if n in pointers})
        options = dict(num_warps=4 if dp <= 128 else 8, num_stages=decode.DECODE_STAGES, enable_fp_fusion=False)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        assert "mma" in compiled.asm["ptx"], kernel.__name__
    print("ok")


if __name__ == "__main__":
    {"prefill": prefill, "sagebwd": sagebwd, "kvcache": kvcache}.get(sys.argv[1], lambda: main(json.loads(sys.argv[1])))()
