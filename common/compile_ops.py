"""torch.library custom ops around the public attention functions, so that ``torch.compile``
(also ``fullgraph=True``) sees one opaque op with a fake (shape-only) implementation instead of
tracing into quantization passes and Triton launches, and makes no graph break.

Each generation's ``sageattn`` starts with::

    if torch.compiler.is_compiling():
        return OP(q, k, v, tensor_layout=..., ..., <its options>)

The op runs the same function eagerly (outside tracing), so compiled and eager calls give the
same numbers. Under tracing the fake implementation runs the input checks too, so a bad call fails
at compile time with the same message.
"""

from __future__ import annotations

import torch

from .checks import check_attention_inputs

_COMMON = "Tensor q, Tensor k, Tensor v, str tensor_layout, bool is_causal, float? sm_scale, bool return_lse, " \
          "str backend"


class AttentionOp:
    """One custom op ``qualname`` for ``fn(q, k, v, *, tensor_layout, is_causal, sm_scale, return_lse,
    backend, **options)``; ``options`` = [(name, schema type)] in order (e.g. ("smooth_k", "bool"))."""

    def __init__(self, qualname: str, fn, options: list[tuple[str, str]], *, has_mask: bool):
        self.names = [n for n, _ in options]
        self.has_mask = has_mask
        extra = (", Tensor? attn_mask" if has_mask else "") + "".join(f", {t} {n}" for n, t in options)
        schema = f"({_COMMON}{extra}) -> (Tensor, Tensor)"

        def impl(q, k, v, tensor_layout, is_causal, sm_scale, return_lse, backend, *rest):
            kw = self._options(rest)
            res = fn(q, k, v, tensor_layout=tensor_layout, is_causal=is_causal, sm_scale=sm_scale,
                     return_lse=return_lse, backend=backend, **kw)
            if return_lse:
                return res
            return res, torch.empty(0, dtype=torch.float32, device=q.device)

        def fake(q, k, v, tensor_layout, is_causal, sm_scale, return_lse, backend, *rest):
            shape = check_attention_inputs(q, k, v, tensor_layout)
            lse_shape = (shape.batch, shape.heads_q, shape.seqlen_q) if return_lse else (0,)
            # the real output is a fresh contiguous tensor in q's layout (common.api.new_output)
            return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)

        self.op = torch.library.custom_op(qualname, impl, mutates_args=(), schema=schema)
        self.op.register_fake(fake)

    def _options(self, rest):
        kw = {}
        if self.has_mask:
            kw["attn_mask"], rest = rest[0], rest[1:]
        kw.update(zip(self.names, rest))
        return kw

    def __call__(self, q, k, v, *, tensor_layout, is_causal, sm_scale, return_lse, backend, **options):
        if "attn_mask" in options and not isinstance(options["attn_mask"], (torch.Tensor, type(None))):
            raise ValueError("under torch.compile attn_mask must be a tensor or None")
        args = ([options.pop("attn_mask", None)] if self.has_mask else []) + [options[n] for n in self.names]
        out, lse = self.op(q, k, v, tensor_layout, is_causal, sm_scale, return_lse, backend, *args)
        return (out, lse) if return_lse else out


class VarlenOp:
    """The custom op of a generation's ``sageattn_varlen`` (common.varlen): the packed tensors, the
    offsets and the maximum lengths, then ``sageattn``'s options (``options`` as for AttentionOp).
    The offsets are read back only where the op runs, so the call traces without a data-dependent
    guard. Options left out take ``sageattn``'s defaults."""

    def __init__(self, qualname: str, sageattn, options: list[tuple[str, str]]):
        import inspect

        from .varlen import _check, attention_varlen

        self.names = [n for n, _ in options]
        self.defaults = {n: p.default for n, p in inspect.signature(sageattn).parameters.items()
                         if p.default is not inspect.Parameter.empty}
        schema = ("(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, "
                  "SymInt max_seqlen_k, bool is_causal, float? sm_scale, bool return_lse, str backend"
                  + "".join(f", {t} {n}" for n, t in options) + ") -> (Tensor, Tensor)")

        def impl(q, k, v, cu_q, cu_k, max_q, max_k, is_causal, sm_scale, return_lse, backend, *rest):
            res = attention_varlen(sageattn, q, k, v, cu_q, cu_k, max_q, max_k, is_causal=is_causal,
                                   sm_scale=sm_scale, return_lse=return_lse, backend=backend,
                                   **dict(zip(self.names, rest)))
            if return_lse:  # (contiguous, as the fake says: inductor checks strides)
                return res
            return res, torch.empty(0, dtype=torch.float32, device=q.device)

        def fake(q, k, v, cu_q, cu_k, max_q, max_k, is_causal, sm_scale, return_lse, backend, *rest):
            for name, t in (("q", q), ("k", k), ("v", v)):
                _check(name, t)
            lse_shape = (q.shape[1], q.shape[0]) if return_lse else (0,)
            return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)

        self.op = torch.library.custom_op(qualname, impl, mutates_args=(), schema=schema)
        self.op.register_fake(fake)

    def __call__(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **options):
        unknown = set(options) - set(self.names) - {"is_causal", "sm_scale", "return_lse", "backend"}
        if unknown:
            raise ValueError(f"sageattn_varlen got unexpected options {sorted(unknown)}")
        kw = {**self.defaults, **options}
        out, lse = self.op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, kw["is_causal"],
                           kw["sm_scale"], kw["return_lse"], kw["backend"], *[kw[n] for n in self.names])
        return (out, lse) if kw["return_lse"] else out


__all__ = ["AttentionOp", "VarlenOp"]
