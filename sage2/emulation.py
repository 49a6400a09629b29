"""``backend="torch"``: the SageAttention2 algorithm in plain PyTorch, tile by tile.

Same quantized inputs as the kernel, same KV tiling (``kv_block`` keys per tile, the two-level
flush interval), same fp32 online-softmax arithmetic:

    s   = (int(Q_hat K_hat_j^T) * dk_j) * dq_i  [+ delta_s]      # log2 domain
    m'  = max(m, rowmax s);  p = exp2(s - m' + log2(P_SCALE))    # p in (0, P_SCALE]: FP8 range
    l   = exp2(m - m') l + rowsum p                              # fp32, unquantized p
    acc = exp2(m - m') acc + FP8MMA(fp8(p), V_hat_j)
    out = acc * dV / l  [+ mean_V]                               # P_SCALE cancels in acc / l

The Hopper FP8 MMA keeps its accumulator in about 13 mantissa bits ("FP22"): each k32 MMA
instruction aligns the incoming accumulator and its 32 products to the largest exponent among
them and truncates every term to 13 bits below it (see ``FP8_ACCUMULATOR_MODEL``; with zero
products this is the probe's "low 10 mantissa bits come back zeroed").
``hopper_fp8_accumulator=True`` models that:

* ``pv_accum="two_level"``: each tile's product starts from a fresh accumulator (truncated only
  within the tile's 128/32 = 4 instructions) and is added to the fp32 ``acc`` in real fp32;
* ``pv_accum="single"``: one running accumulator across all tiles, truncated at every
  instruction, so error grows with the sequence.

With ``hopper_fp8_accumulator=False`` the products accumulate in fp32 (what Triton's CPU
interpreter does), for comparing the kernel under the interpreter.

``ARITHMETIC`` says whose fp32 softmax arithmetic is emulated:

* "paper" (default): the paper's and the Triton kernel's, above;
* "cuda_sm90": the Hopper CUDA kernel's (csrc/sage2_sm90). Its exponent argument is one FMA on the
  bits of MAGIC + S_int (MAGIC = 1.5 * 2^23): fp32((MAGIC + S) * sc + bias) with
  sc = fp32(dq * dk) and bias = -fp32(MAGIC * sc + m' - log2(P_SCALE)), whose rounding moves p by
  up to ~1e-4 relative (far below S's quantization error, but enough to send some p across an FP8
  rounding boundary against the paper's arithmetic); and its l sums fp8(p) in the PV MMA (a column
  of ones beside V_hat_j, under the same accumulator model, flushed per tile), so that out is a
  weighted mean of V's rows with the weights fp8(p). Not modelled: the kernel's exp2 is
  ex2.approx (torch's exp2 differs by an ulp here and there, CPU and GPU alike), and it fuses
  ``alpha * l + r`` and ``alpha * acc + P V`` into one FMA each (here a multiply, then an add).
"""

from __future__ import annotations

import math

import torch

from common.int_qk import QuantizedQK
from common.online_softmax import OnlineSoftmax, kv_tiles
from common.reference import exact_fp32_matmul
from common.smoothing import expand_block_rows

from .quant_v import P_SCALE, QuantizedV

FP8_MMA_K = 32  # keys reduced per FP8 wgmma instruction
FP22_DROP_MASK = ~((1 << 10) - 1)


def truncate_to_fp22(x: torch.Tensor) -> torch.Tensor:
    """Zero the low 10 mantissa bits of fp32 values (keep 13), as the Hopper FP8 MMA does to its
    accumulator input."""
    return (x.contiguous().view(torch.int32) & FP22_DROP_MASK).view(torch.float32)


def aligned_truncation_sum(terms: torch.Tensor, mant_bits: int = 13) -> torch.Tensor:
    """Sum over dim -2 the way a fixed-point MMA adder does: every term is aligned to the
    largest exponent among them and truncated (toward zero) to ``mant_bits`` bits below it.
    Exact in fp32: the quantum is a power of two and the sum needs < 24 bits."""
    amax = terms.abs().amax(dim=-2, keepdim=True)
    e = torch.floor(torch.log2(torch.where(amax > 0, amax, torch.ones_like(amax))))
    quantum = torch.exp2(e - mant_bits)
    return (torch.trunc(terms / quantum) * quantum).sum(dim=-2)


# How the Hopper FP8 MMA accumulates. "aligned" (default): the accumulator and the instruction's
# 32 products are aligned to the largest exponent among them and truncated to 13 bits below it,
# then summed. Measured on the H100 (tests/test_sage2.py::test_gpu_kernel_matches_the_fp22_accumulator_model,
# 2026-11-22): the kernel's single-accumulator output differs from this model by relL1 4e-6,
# against 0.14 for "addend" (only the incoming accumulator loses its low 10 mantissa bits, as the
# zero-product probe of sage2.md shows; true, but not the whole story) and 0.15 for fp32.
FP8_ACCUMULATOR_MODEL = "aligned"

# Whose softmax arithmetic (module docstring): "paper" or "cuda_sm90". The GPU tests of the CUDA
# kernel set it.
ARITHMETIC = "paper"
ARITHMETICS = ("paper", "cuda_sm90")
MAGIC = 12582912.0  # 1.5 * 2^23: the bits of MAGIC + S, S an int32 with |S| < 2^22, are the float MAGIC + S


class Sm90Softmax(OnlineSoftmax):
    """The CUDA kernel's online softmax on the integer scores of a tile (module docstring); l is
    left to the caller (the MMA's row sum)."""

    @staticmethod
    def exponent_argument(s_int: torch.Tensor, sc: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """The kernel's fp32 fmaf(MAGIC + S, sc, -fmaf(MAGIC, sc, shift)): each fmaf rounds the exact
        value once (computed in fp64, where the products are exact: up to a double rounding, ~2^-29)."""
        sc64 = sc.double()
        bias = -(MAGIC * sc64 + shift.double()).float().double()
        return ((MAGIC + s_int.double()) * sc64 + bias).float()

    def update_int(self, s_int: torch.Tensor, sc: torch.Tensor, j0: int, j1: int):
        """``s_int``: exact integer scores, ``sc``: fp32 dq * dk of each score. Returns (p, alpha)."""
        s = self.mask(s_int.float() * sc, j0, j1)  # the kernel's max: fp32(S * sc) (S is exact in fp32)
        m_new = torch.maximum(self.m, s.amax(dim=-1))
        m_use = torch.where(m_new == float("-inf"), 0.0, m_new)
        shift = m_use - torch.tensor(self.shift, dtype=torch.float32)  # fp32, as the kernel
        x = self.exponent_argument(s_int, sc, shift[..., None])
        p = torch.where(s == float("-inf"), 0.0, torch.exp2(x))
        alpha = torch.exp2(self.m - m_use)
        self.m = m_new
        return p, alpha


def fp8_mma(p8: torch.Tensor, v8: torch.Tensor, acc: torch.Tensor | None, model_fp22: bool) -> torch.Tensor:
    """``acc + p8 @ v8`` as a sequence of k32 FP8 MMA instructions (fp32 result)."""
    pf, vf = p8.float(), v8.float()
    if not model_fp22:
        prod = pf @ vf
        return prod if acc is None else acc + prod
    for k0 in range(0, pf.shape[-1], FP8_MMA_K):
        if FP8_ACCUMULATOR_MODEL == "aligned":
            terms = pf[..., :, k0:k0 + FP8_MMA_K, None] * vf[..., None, k0:k0 + FP8_MMA_K, :]  # exact products
            if acc is not None:
                terms = torch.cat([acc[..., :, None, :], terms], dim=-2)
            acc = aligned_truncation_sum(terms)
        else:
            part = pf[..., k0:k0 + FP8_MMA_K] @ vf[..., k0:k0 + FP8_MMA_K, :]
            acc = part if acc is None else truncate_to_fp22(acc) + part
    return acc


def attention_emulated(qk: QuantizedQK, qv: QuantizedV, *, delta_s: torch.Tensor | None, is_causal: bool,
                       pv_dtype: str, pv_accum: str, kv_block: int = 128, return_lse: bool = False,
                       hopper_fp8_accumulator: bool = True, bias2: torch.Tensor | None = None,
                       arithmetic: str | None = None):
    """Returns (out fp32 [B, Hq, Nq, D], log2-domain LSE [B, Hq, Nq] or None). ``bias2``: the
    log2-domain mask of common.masking.dense_mask (attn_mask, lengths and causal), if any.
    ``arithmetic``: "paper" or "cuda_sm90" (None: ``ARITHMETIC``)."""
    arithmetic = ARITHMETIC if arithmetic is None else arithmetic
    if arithmetic not in ARITHMETICS:
        raise ValueError(f"arithmetic must be one of {ARITHMETICS}, got {arithmetic!r}")
    cuda = arithmetic == "cuda_sm90"
    if cuda and (pv_dtype == "fp16" or pv_accum != "two_level" or delta_s is not None or bias2 is not None):
        raise ValueError("arithmetic='cuda_sm90' models the CUDA kernel: FP8 P V with two-level accumulation, "
                         "no Q smoothing, no attn_mask")
    B, Hq, Nq, _ = qk.q_codes.shape
    Hkv, Nk = qk.k_codes.shape[1], qk.k_codes.shape[2]
    group = Hq // Hkv
    dev = qk.q_codes.device
    int_dt = torch.float64 if dev.type == "cpu" else torch.float32
    qc = qk.q_codes.to(int_dt)
    kc = qk.k_codes.to(int_dt).repeat_interleave(group, dim=1)
    qs = qk.q_scale_per_token()
    ks = qk.k_scale_per_token().repeat_interleave(group, dim=1)
    vc = qv.codes.repeat_interleave(group, dim=1)
    D = vc.shape[-1]
    if delta_s is not None:
        delta_s = expand_block_rows(delta_s, qk.q_block, Nq)  # [B, Hq, Nq, Nk]
    log2_pscale = math.log2(P_SCALE[pv_dtype])

    sm = (Sm90Softmax if cuda else OnlineSoftmax)((B, Hq, Nq), Nk, dev, is_causal=is_causal, log2_shift=log2_pscale,
                                                  bias2=bias2)
    acc = torch.zeros(B, Hq, Nq, D, device=dev)
    with exact_fp32_matmul():
        for j0, j1 in kv_tiles(Nk, kv_block):
            s = (qc @ kc[:, :, j0:j1].transpose(-1, -2)).float()
            if cuda:
                p, alpha = sm.update_int(s, qs[..., :, None] * ks[..., None, j0:j1], j0, j1)
            else:
                s = (s * ks[..., None, j0:j1]) * qs[..., :, None]
                if delta_s is not None:
                    s = s + delta_s[..., j0:j1]
                p, alpha = sm.update(sm.mask(s, j0, j1))
            if pv_dtype == "fp16":
                acc = acc * alpha[..., None] + p.half().float() @ vc[:, :, j0:j1].float()
            else:
                p8 = p.to(vc.dtype)  # round to nearest even; p <= P_SCALE, the format's max
                v8 = vc[:, :, j0:j1]
                if cuda:  # l from the MMA's column of ones: rowsum fp8(p), flushed per tile
                    ones = torch.ones(*v8.shape[:-1], 1, device=dev).to(v8.dtype)
                    sm.l = sm.l * alpha + fp8_mma(p8, ones, None, hopper_fp8_accumulator)[..., 0]
                if pv_accum == "two_level":
                    acc = acc * alpha[..., None] + fp8_mma(p8, v8, None, hopper_fp8_accumulator)
                else:
                    acc = fp8_mma(p8, v8, acc * alpha[..., None], hopper_fp8_accumulator)
    out = sm.normalize(acc)
    if qv.scale is not None:  # (after normalizing, as the kernels: acc * scale overflows for |V| ~ 1e33)
        out = out * qv.scale.repeat_interleave(group, dim=1)[..., None, :]
    if qv.mean is not None:
        out = torch.where(sm.l[..., None] == 0, 0.0, out + qv.mean.repeat_interleave(group, dim=1))
    return out, (sm.lse2() if return_lse else None)
