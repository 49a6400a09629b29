"""SageBwd: 8-bit attention for training, forward and backward (SageAttention3 paper, section 3).

Six of the seven matmuls of attention training run in INT8: the forward's Q K^T and P V, and the
backward's recomputed Q K^T, P^T dO, dS K and dS^T Q. Only dP = dO V^T stays in 16 bits: its
error would flow through dS into dQ and dK and build up along the sequence (the paper's dQ
cosine falls from 99.77% to 97.47% when it is quantized; ``quantize_dov=True`` reproduces that
ablation). Granularities (tiles of the kernels; see :mod:`sage3.train_emulation` for the algebra):

* Q per 128 queries (sm_scale*log2 e folded in), K - mean_k per 64 keys, V per 64 keys;
* P per query row of each 64-key tile in the forward (its scale is the online softmax's own row
  max, so it costs nothing); P, dO and dS per 64 x 64 tile in the backward;
* K smoothing, exact in the forward and in dQ (each row of dS sums to 0; see
  :mod:`sage3.train_emulation` for why the paper's rowsum(dS) mean_k term is left out). No Q smoothing.

On the H100 this is real speed, not an emulation: INT8 tensor cores run at twice the 16-bit rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.api import check_kernel_sizes, runs_on_input_device
from common.checks import (
    check_attention_inputs,
    check_flag,
    from_hnd,
    resolve_backend,
    resolve_sm_scale,
    to_hnd,
)
from common.int_qk import (
    QuantizedQK,
    quantize_qk,
    quantize_token_blocks,
    scale_per_token,
)
from common.masking import NO_MASK
from common.nonfinite import flagged, nan_rows, nonfinite_flag, zeroed

from .train_emulation import BWD_TILE, FWD_KV_TILE, FWD_Q_BLOCK

MIN_DP = 32  # INT8 tensor-core dots reduce over at least 32 elements


@dataclass
class SageBwdState:
    """What the forward keeps for the backward: INT8 Q, K (and V), the 16-bit V for dP, never P."""
    qk: QuantizedQK
    v_codes: torch.Tensor        # int8 [B, Hkv, Nk, DP], per FWD_KV_TILE keys
    v_scale: torch.Tensor        # fp32 [B, Hkv, ceil(Nk/64)]
    v16: torch.Tensor            # V, HND contiguous, padded to DP (dP = dO V^T in 16 bits)
    sm_scale: float
    do_codes: torch.Tensor | None = None   # set in the backward: int8 dO per BWD_TILE queries
    do_scale: torch.Tensor | None = None
    nan_rows: torch.Tensor | None = None   # bool [B, Hq, Nq] when an input held NaN/Inf (see _sanitized)
    p_nan_rows: torch.Tensor | None = None  # of those, the rows whose P is NaN (not through V alone)

    def v_scale_per_token(self) -> torch.Tensor:
        return scale_per_token(self.v_scale, FWD_KV_TILE, self.v_codes.shape[-2])

    def do_scale_per_token(self) -> torch.Tensor:
        return scale_per_token(self.do_scale, BWD_TILE, self.do_codes.shape[-2])


def _pad_dim(x: torch.Tensor, dp: int) -> torch.Tensor:
    return x if x.shape[-1] == dp else torch.nn.functional.pad(x, (0, dp - x.shape[-1]))


def quantize_for_training(qh, kh, vh, *, sm_scale: float, backend: str) -> SageBwdState:
    qk = quantize_qk(qh, kh, sm_scale=sm_scale, smooth_k=True, granularity="per_block", bits=8,
                     q_block=FWD_Q_BLOCK, k_block=FWD_KV_TILE, backend=backend)
    v_codes, v_scale = quantize_token_blocks(vh, block=FWD_KV_TILE, backend=backend)
    dp = max(MIN_DP, qk.q_codes.shape[-1])
    qk.q_codes, qk.k_codes, v_codes = (_pad_dim(t, dp) for t in (qk.q_codes, qk.k_codes, v_codes))
    return SageBwdState(qk, v_codes, v_scale, _pad_dim(vh.contiguous(), dp), sm_scale)


def _zeroed_with_rows(qh, kh, vh, is_causal: bool):
    """The NaN/Inf rule of common.nonfinite, for training inputs that hold a non-finite value: (q, k,
    v with those values zeroed, bool [B, Hq, Nq] rows that SDPA makes NaN, and those of them whose P
    is NaN: a bad q, or a bad key seen). The forward and backward then run on finite values (a
    quantization block never spreads a NaN) and only what SDPA's own arithmetic makes NaN is set to
    NaN (:func:`_nan_gradients`): the output rows; dQ on those rows and dK on every key they see
    (dS = P (dP - rowsum(dO O)) is NaN on the whole row); dV = P^T dO on every key that a row with
    a NaN P sees (a bad value alone leaves P, and so dV, finite)."""
    rows = nan_rows(qh, kh, vh, is_causal=is_causal, mask=NO_MASK)
    p_rows = nan_rows(qh, kh, kh, is_causal=is_causal, mask=NO_MASK)  # (V left out: K stands in)
    return zeroed(qh), zeroed(kh), zeroed(vh), rows, p_rows


def _sanitized(qh, kh, vh, is_causal: bool):
    """:func:`_zeroed_with_rows` when an input holds NaN/Inf (the check read at once), else (q, k, v,
    None, None)."""
    if not flagged(nonfinite_flag(qh, kh, vh)):
        return qh, kh, vh, None, None
    return _zeroed_with_rows(qh, kh, vh, is_causal)


def _keys_seen_by(rows: torch.Tensor, n_k: int, heads_kv: int, is_causal: bool) -> torch.Tensor:
    """bool [B, Hkv, Nk]: keys that some flagged row sees (over the query heads sharing a KV head)."""
    B, Hq, Nq = rows.shape
    i = torch.arange(Nq, device=rows.device)
    if is_causal:  # row i sees keys j <= i + Nk - Nq
        last = torch.where(rows, i, -1).amax(-1)
        reach = torch.where(last >= 0, last + (n_k - Nq), -1)
    else:
        reach = torch.where(rows.any(-1), n_k - 1, -1)
    reach = reach.view(B, heads_kv, Hq // heads_kv).amax(-1)
    return torch.arange(n_k, device=rows.device)[None, None, :] <= reach[..., None]


def _nan_gradients(dq, dk, dv, rows, p_rows, is_causal):
    """SDPA's NaN pattern on HND gradients: a row with a NaN dS row (``rows``) has NaN dQ on that row
    and NaN dK on every key it sees; a row with a NaN P (``p_rows``), or a NaN dO, NaN dV on every
    key it sees."""
    dq.masked_fill_(rows[..., None], float("nan"))
    dk.masked_fill_(_keys_seen_by(rows, dk.shape[2], dk.shape[1], is_causal)[..., None], float("nan"))
    dv.masked_fill_(_keys_seen_by(p_rows, dv.shape[2], dv.shape[1], is_causal)[..., None], float("nan"))


def _forward(q, k, v, tensor_layout, is_causal, sm_scale, backend):
    """Quantize and run the forward: (SageBwdState, padded HND output, log2-domain LSE), all finite
    (``st.nan_rows`` says which output rows the caller gets as NaN).

    The check for NaN/Inf is queued first and read only once the forward's kernels are queued
    behind it, so that the host, which waits for the check (and so for whatever the GPU was still
    doing, e.g. the last step's backward), never leaves the GPU idle while it launches them. The rare
    inputs that hold a non-finite value run the forward again, on their zeroed copies
    (:func:`_zeroed_with_rows`; the compiled path's backward, which quantizes again, reads the check
    at once: :func:`_sanitized`)."""
    qh, kh, vh = (to_hnd(t, tensor_layout) for t in (q, k, v))
    flag = nonfinite_flag(qh, kh, vh)
    st, o_pad, lse2 = _quantized_forward(qh, kh, vh, is_causal, sm_scale, backend, q.dtype)
    if flagged(flag):
        del st, o_pad, lse2  # (not held beside the rerun's)
        zq, zk, zv, rows, p_rows = _zeroed_with_rows(qh, kh, vh, is_causal)
        st, o_pad, lse2 = _quantized_forward(zq, zk, zv, is_causal, sm_scale, backend, q.dtype)
        st.nan_rows, st.p_nan_rows = rows, p_rows
    return st, o_pad, lse2


def _quantized_forward(qh, kh, vh, is_causal, sm_scale, backend, out_dtype):
    st = quantize_for_training(qh, kh, vh, sm_scale=sm_scale, backend=backend)
    if backend == "triton":
        from .train_kernel import forward_triton

        o_pad, lse2 = forward_triton(st, is_causal=is_causal, out_dtype=out_dtype)
    else:
        from .train_emulation import forward_emulated

        o32, lse2 = forward_emulated(st, is_causal=is_causal)
        o_pad = o32.to(out_dtype)
    return st, o_pad, lse2


def _backward(st, grad_out, o_pad, lse2, tensor_layout, is_causal, backend, quantize_dov, deterministic, D, dtype):
    """dQ, dK, dV in the inputs' layout and dtype, from the forward's state and the output gradient.
    A NaN/Inf in grad_out (checked as the forward checks its inputs: queued first, read once the
    kernels are queued) reruns them on its zeroed copy and sets SDPA's pattern: NaN dQ on its rows,
    NaN dK, dV on every key those rows see."""
    do_hnd = to_hnd(grad_out, tensor_layout)
    flag = nonfinite_flag(do_hnd)

    def gradients(do_hnd):
        do = _pad_dim(do_hnd.to(o_pad.dtype).contiguous(), o_pad.shape[-1])
        st.do_codes, st.do_scale = quantize_token_blocks(do, block=BWD_TILE, backend=backend)
        if backend == "triton":
            from .train_kernel import backward_triton

            return backward_triton(st, do, o_pad, lse2, is_causal=is_causal, quantize_dov=quantize_dov,
                                   deterministic=deterministic, out_dtype=dtype)
        from .train_emulation import backward_emulated

        return backward_emulated(st, do, o_pad, lse2, is_causal=is_causal, quantize_dov=quantize_dov)

    dq, dk, dv = gradients(do_hnd)
    if flagged(flag):
        del dq, dk, dv
        dq, dk, dv = gradients(zeroed(do_hnd))
        bad = ~torch.isfinite(do_hnd).all(-1)
        _nan_gradients(dq, dk, dv, bad, bad, is_causal)
    if st.nan_rows is not None:
        _nan_gradients(dq, dk, dv, st.nan_rows, st.p_nan_rows, is_causal)
    return tuple(from_hnd(g[..., :D].to(dtype), tensor_layout).contiguous() for g in (dq, dk, dv))


def _output(o_pad, rows, tensor_layout: str, D: int) -> torch.Tensor:
    """The caller's output: a fresh tensor in its layout, NaN on the flagged rows (o_pad, which the
    backward reads, stays finite)."""
    out = from_hnd(o_pad[..., :D], tensor_layout).clone(memory_format=torch.contiguous_format)
    if rows is not None:
        to_hnd(out, tensor_layout).masked_fill_(rows[..., None], float("nan"))
    return out


class SageBwdFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, tensor_layout, is_causal, sm_scale, backend, quantize_dov, deterministic):
        st, o_pad, lse2 = _forward(q, k, v, tensor_layout, is_causal, sm_scale, backend)
        D = q.shape[-1]
        ctx.st, ctx.lse2, ctx.o_pad = st, lse2, o_pad
        ctx.opts = (tensor_layout, is_causal, backend, quantize_dov, deterministic, D)
        ctx.dtype = q.dtype
        return _output(o_pad, st.nan_rows, tensor_layout, D)

    @staticmethod
    @torch.autograd.function.once_differentiable  # (a double backward gets an error, not wrong numbers)
    def backward(ctx, grad_out):
        tensor_layout, is_causal, backend, quantize_dov, deterministic, D = ctx.opts
        grads = _backward(ctx.st, grad_out, ctx.o_pad, ctx.lse2, tensor_layout, is_causal, backend, quantize_dov,
                          deterministic, D, ctx.dtype)
        return (*grads, None, None, None, None, None, None)


class _NoKeys(torch.autograd.Function):
    """No queries or no keys: zeros, and zero gradients for q, k and v (no arithmetic on them: a
    sum of fp16 inputs may overflow, and 0 * inf is NaN)."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.meta = [(t.shape, t.dtype, t.device) for t in (q, k, v)]
        return torch.zeros_like(q)

    @staticmethod
    def backward(ctx, grad_out):
        return tuple(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.meta)


@runs_on_input_device
def sageattn_train(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, tensor_layout: str = "HND",
                   is_causal: bool = False, sm_scale: float | None = None, backend: str = "auto",
                   quantize_dov: bool = False, deterministic: bool = True) -> torch.Tensor:
    """SageBwd: differentiable 8-bit attention, a drop-in for ``F.scaled_dot_product_attention``
    in training (fp16/bf16 q, k, v; ``is_causal`` aligned bottom-right; GQA when Hq % Hkv == 0).

    Args:
        quantize_dov: also quantize dP = dO V^T to INT8 (the paper's ablation; worse dQ).
        deterministic: compute dQ in its own pass (one program per query tile, no atomics), so
            repeated backward passes give bit-identical gradients. This is the default because it
            is also the faster one on the H100 (274 vs 477 ms fwd+bwd at B=4, H=32, N=16k, D=128):
            ``False`` accumulates dQ with fp32 atomic adds from the dK/dV programs, which saves
            recomputing S and dP but whose atomic traffic costs more; kept for other GPUs.
        backend: ``"auto"`` (Triton on CUDA, the emulation on CPU), ``"triton"``, or ``"torch"``
            (the same algorithm in PyTorch, for CPUs and checking).
    """
    shape = check_attention_inputs(q, k, v, tensor_layout)
    for name, flag in (("is_causal", is_causal), ("quantize_dov", quantize_dov), ("deterministic", deterministic)):
        check_flag(name, flag)
    scale = resolve_sm_scale(sm_scale, shape.head_dim)
    be = resolve_backend(backend, q.device)
    check_kernel_sizes(shape, be)
    if q.numel() == 0 or shape.seqlen_k == 0:  # nothing to attend to: zeros, and zero gradients
        return _NoKeys.apply(q, k, v)
    if torch.compiler.is_compiling():  # opaque custom ops with a registered backward (below)
        return torch.ops.sageattn_repro.sagebwd_fwd(q, k, v, tensor_layout, is_causal, scale, be, quantize_dov,
                                                    deterministic)[0]
    return SageBwdFunction.apply(q, k, v, tensor_layout, is_causal, scale, be, quantize_dov, deterministic)


# ---- torch.compile: the forward and backward as torch.library custom ops, so that a compiled training
# step (also fullgraph=True) sees two opaque ops and no graph break. The forward saves q, k, v (not the
# quantized state, which custom ops cannot return): the backward quantizes them again, which is
# deterministic, so compiled and eager gradients are the same numbers; it costs one more pass of the
# (memory-bound) quantization per backward. Eager calls keep SageBwdFunction.

_OPTS = "str tensor_layout, bool is_causal, float sm_scale, str backend, bool quantize_dov, bool deterministic"


def _padded(d: int) -> int:
    from common.int_qk import padded_head_dim

    return max(MIN_DP, padded_head_dim(d))


@torch.library.custom_op("sageattn_repro::sagebwd_fwd", mutates_args=(),
                         schema=f"(Tensor q, Tensor k, Tensor v, {_OPTS}) -> (Tensor, Tensor, Tensor)")
def _sagebwd_fwd(q, k, v, tensor_layout, is_causal, sm_scale, backend, quantize_dov, deterministic):
    with torch.no_grad():
        st, o_pad, lse2 = _forward(q, k, v, tensor_layout, is_causal, sm_scale, backend)
        return _output(o_pad, st.nan_rows, tensor_layout, q.shape[-1]), o_pad.contiguous(), lse2.contiguous()


@_sagebwd_fwd.register_fake
def _(q, k, v, tensor_layout, is_causal, sm_scale, backend, quantize_dov, deterministic):
    shape = check_attention_inputs(q, k, v, tensor_layout)
    B, H, N, D = shape.batch, shape.heads_q, shape.seqlen_q, shape.head_dim
    return (q.new_empty(q.shape), q.new_empty((B, H, N, _padded(D))),
            q.new_empty((B, H, N), dtype=torch.float32))


@torch.library.custom_op("sageattn_repro::sagebwd_bwd", mutates_args=(),
                         schema="(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor o_pad, Tensor lse2, "
                                f"{_OPTS}) -> (Tensor, Tensor, Tensor)")
def _sagebwd_bwd(grad_out, q, k, v, o_pad, lse2, tensor_layout, is_causal, sm_scale, backend, quantize_dov,
                 deterministic):
    with torch.no_grad():
        qh, kh, vh, rows, p_rows = _sanitized(*(to_hnd(t, tensor_layout) for t in (q, k, v)), is_causal)
        st = quantize_for_training(qh, kh, vh, sm_scale=sm_scale, backend=backend)
        st.nan_rows, st.p_nan_rows = rows, p_rows
        return _backward(st, grad_out, o_pad, lse2, tensor_layout, is_causal, backend, quantize_dov, deterministic,
                         q.shape[-1], q.dtype)


@_sagebwd_bwd.register_fake
def _(grad_out, q, k, v, o_pad, lse2, tensor_layout, is_causal, sm_scale, backend, quantize_dov, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, *opts = inputs
    _, o_pad, lse2 = output
    ctx.save_for_backward(q, k, v, o_pad, lse2)
    ctx.opts = opts


def _autograd_backward(ctx, grad_out, _grad_o_pad, _grad_lse):
    q, k, v, o_pad, lse2 = ctx.saved_tensors
    dq, dk, dv = torch.ops.sageattn_repro.sagebwd_bwd(grad_out.contiguous(), q, k, v, o_pad, lse2, *ctx.opts)
    return dq, dk, dv, None, None, None, None, None, None


_sagebwd_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)

