"""``backend="torch"``: SageBwd's forward and backward in plain PyTorch, the kernels' algorithm.

Every quantization below is INT8, symmetric, ``scale = absmax / 127`` and
``code = round_half_even(x * (127 / absmax))`` over the named block, the product exact (the kernels
round it by one FMA with 1.5 * 2**23; :func:`quantize_tile`); a block with absmax < 2**-100, e.g. a
row of P far below its running max, becomes 0.

Forward, per KV tile of ``FWD_KV_TILE`` keys (the online softmax's tiles):

    S   = int(Q_hat K_hat_j^T) * s_Q * s_K       # Q: per 128 queries (with sm_scale*log2 e folded in);
                                                  # K - mean_k: per 64 keys
    p   = exp2(S - m'), l = a*l + rowsum(p)
    P   = p quantized per row of the tile (s_P = rowmax(p)/127: the online softmax's own max)
    acc = a*acc + int(P_hat V_hat_j) * s_P * s_V # V: per 64 keys
    O = acc / l;  L = m + log2 l                  # L is saved, never the N x N matrix

Backward, per BWD_TILE x BWD_TILE tile (FlashAttention-2's recompute; Di = rowsum(dO * O)):

    P  = exp2(int(Q_hat K_hat^T) s_Q s_K - L)     # from the saved INT8 Q, K
    dV += int(P_hat^T dO_hat) s_P s_dO            # P per tile, dO per 64 queries
    dP = dO V^T                                   # fp16 operands, fp32 accumulation (quantize_dov:
                                                  # int(dO_hat V_hat^T) s_dO s_V, the paper's ablation)
    dS = P * (dP - Di)
    dQ += int(dS_hat K_hat) s_dS s_K              # dS per tile; K_hat is K - mean_k
    dK += int(dS_hat^T Q_hat) s_dS s_Q
    dQ *= sm_scale;  dK *= ln 2 (Q_hat carries sm_scale*log2 e);  GQA: dK, dV summed over the group

dQ from the smoothed K is exact, not an approximation: dQ = dS K = dS (K - mean_k) + rowsum(dS) mean_k,
and every row of dS = P * (dP - Di) sums to 0. The paper adds the rowsum(dS) mean_k term back; with
a computed dS that term is rounding noise times the (large) K mean, and it hurt: on inputs with a
V bias (make_qkv kind="v_bias", N=512) dQ's cosine was 0.945 with it and 0.9988 without, and no
input got better with it (k_bias 0.9981 vs 0.9990, outliers 0.968 vs 0.983). So it is left out.

The tile sizes are part of the algorithm (P's and dS's scales are per tile), so the kernels use
the same ones. Sums here are fp32 matmuls of exactly-represented values (codes x scales), so the
kernels and this file differ only in fp32 summation order (and, under the CPU interpreter, whose
fma rounds the product first, in a code flipped by 1 where the product lies within 2**-18 of a
half: a few in a million).
"""

from __future__ import annotations

import math

import torch

from common.online_softmax import OnlineSoftmax, kv_tiles
from common.reference import causal_mask, exact_fp32_matmul

FWD_Q_BLOCK = 128   # Q's quantization block (the forward kernel's query tile divides it)
FWD_KV_TILE = 64    # K's and V's quantization block and the forward's KV tile (P's per-row scales)
BWD_TILE = 64       # the backward's query and key tile (P's, dS's and dO's blocks)
QMAX = 127.0
TINY = 2.0 ** -100  # blocks whose absmax is below this quantize to 0 (127/absmax would overflow fp32)


def quantize_tile(x: torch.Tensor, dims) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 codes (as fp32) and scales of x with one scale per slice over ``dims`` (kept)."""
    amax = x.abs().amax(dim=dims, keepdim=True)
    amax = torch.where(amax >= TINY, amax, 0.0)
    inv = torch.where(amax > 0, torch.full_like(amax, QMAX) / torch.where(amax > 0, amax, 1.0), 0.0)
    # x * inv exact in fp64, rounded once, ties to even: what the kernels' FMA with 1.5 * 2**23 gives
    # (the fp64 copy is a transient of the emulation's tile, P or dS, not kept)
    return torch.round(x.double() * inv.double()).to(x.dtype), amax / torch.full_like(amax, QMAX)


def _quantize_tiles(x: torch.Tensor, tile: int) -> torch.Tensor:
    """x [..., Nq, Nk] quantized per tile x tile block (partial tiles at the ends as the kernels
    see them, padded with zeros); returns the dequantized values (codes * scale), same shape."""
    *lead, nq, nk = x.shape
    padded = torch.nn.functional.pad(x, (0, (-nk) % tile, 0, (-nq) % tile))
    pq, pk = padded.shape[-2:]
    codes, scale = quantize_tile(padded.reshape(*lead, pq // tile, tile, pk // tile, tile), (-3, -1))
    return (codes * scale).reshape(padded.shape)[..., :nq, :nk]


def _scores(qk, g: int, j0: int = 0, j1: int | None = None) -> torch.Tensor:
    """S = int(Q_hat K_hat^T) * s_Q * s_K (log2 domain) for keys j0:j1, K expanded to the query heads."""
    kc = qk.k_codes[:, :, j0:j1].float().repeat_interleave(g, dim=1)
    sk = qk.k_scale_per_token()[:, :, j0:j1].repeat_interleave(g, dim=1)
    return (qk.q_codes.float() @ kc.transpose(-1, -2)) * (qk.q_scale_per_token()[..., None] * sk[:, :, None, :])


def forward_emulated(st, *, is_causal: bool):
    """st: :class:`sage3.train.SageBwdState` (quantized Q, K, V). Returns (O fp32 [B, Hq, Nq, DP],
    L log2-domain fp32 [B, Hq, Nq])."""
    qk = st.qk
    B, Hq, Nq, _ = qk.q_codes.shape
    Hkv, Nk = qk.k_codes.shape[1], qk.k_codes.shape[2]
    g = Hq // Hkv
    dev = qk.q_codes.device
    vc = st.v_codes.float().repeat_interleave(g, dim=1)          # [B, Hq, Nk, DP]
    sv = st.v_scale_per_token().repeat_interleave(g, dim=1)
    sm = OnlineSoftmax((B, Hq, Nq), Nk, dev, is_causal=is_causal)
    acc = torch.zeros(B, Hq, Nq, vc.shape[-1], device=dev)
    with exact_fp32_matmul():
        for j0, j1 in kv_tiles(Nk, FWD_KV_TILE):
            p, alpha = sm.update(sm.mask(_scores(qk, g, j0, j1), j0, j1))
            pc, ps = quantize_tile(p, (-1,))                     # per row of the tile
            pv = pc @ vc[:, :, j0:j1]                            # exact integers
            acc = acc * alpha[..., None] + pv * (ps * sv[:, :, None, j0:j0 + 1])
    return sm.normalize(acc), sm.lse2()


def backward_emulated(st, do: torch.Tensor, o: torch.Tensor, lse2: torch.Tensor, *, is_causal: bool,
                      quantize_dov: bool):
    """Gradients (dQ, dK, dV) fp32 [.., DP] for upstream grad ``do`` (HND, input dtype, padded
    to DP), output ``o`` and the forward's log2 LSE."""
    qk = st.qk
    B, Hq, Nq, DP = qk.q_codes.shape
    Hkv, Nk = qk.k_codes.shape[1], qk.k_codes.shape[2]
    g = Hq // Hkv
    dev = qk.q_codes.device
    T = BWD_TILE
    with exact_fp32_matmul():
        qd = qk.q_codes.float() * qk.q_scale_per_token()[..., None]                 # Q * sm_scale*log2e
        kd = (qk.k_codes.float() * qk.k_scale_per_token()[..., None]).repeat_interleave(g, dim=1)
        p = torch.exp2(_scores(qk, g) - lse2[..., None])
        if is_causal:  # rows without a visible key (lse2 = -inf) are all masked here too
            p = torch.where(causal_mask(Nq, Nk, dev), p, 0.0)
        dof = do.float()
        di = (dof * o.float()).sum(-1)
        dod = st.do_codes.float() * st.do_scale_per_token()[..., None]              # dO per 64 queries
        dv = _quantize_tiles(p, T).transpose(-1, -2) @ dod
        if quantize_dov:
            vd = (st.v_codes.float() * st.v_scale_per_token()[..., None]).repeat_interleave(g, dim=1)
            dp = dod @ vd.transpose(-1, -2)
        else:
            dp = dof @ st.v16.float().repeat_interleave(g, dim=1).transpose(-1, -2)
        ds = p * (dp - di[..., None])
        dsq = _quantize_tiles(ds, T)
        dq = dsq @ kd  # K - mean_k: exact, since every row of dS sums to 0 (see the module docstring)
        dk = (dsq.transpose(-1, -2) @ qd) * math.log(2.0)
    dq = dq * st.sm_scale
    dk = dk.reshape(B, Hkv, g, Nk, DP).sum(2)
    dv = dv.reshape(B, Hkv, g, Nk, DP).sum(2)
    return dq, dk, dv
