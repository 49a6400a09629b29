"""Integer and FP8 quantizers in plain PyTorch (CPU and GPU).

Every quantizer here is the *definition* the kernels are tested against: the Triton and CUDA
quantization passes must produce the same codes and scales bit for bit.

Conventions
-----------
* Tensors are ``[..., N, D]``: tokens on dim -2, channels on dim -1 (the HND layout of the
  attention inputs, ``[B, H, N, D]``).
* Integer quantization is symmetric: ``scale = absmax(group) / qmax`` (fp32), codes
  ``= trunc(x / scale + 0.5 * sign(x))`` (round half away from zero), clamped to
  ``[-qmax, qmax]``: INT8 ``qmax = 127``, INT4 ``qmax = 7`` (INT4 codes are stored one per int8).
  A group that is all zeros gets ``scale = 0`` and codes 0, so it dequantizes to exact zeros
  instead of the 0/0 the official code produces.
* Token groupings (which tokens share one scale) are expressed as a ``group_of_token`` index
  vector of length N. A quantizer returns ``(codes, scale)`` with ``scale`` of shape
  ``[..., G]``; ``token_scales(scale, group_of_token)`` expands it to one scale per token
  ``[..., N]``, which is the form the attention kernels consume (except per-block, where each
  tile pair has one scalar scale).
"""

from __future__ import annotations

import torch

INT_QMAX = {8: 127, 4: 7}

# FP8 formats: (torch dtype, largest finite value).
FP8_FORMATS = {
    "e4m3": (torch.float8_e4m3fn, 448.0),
    "e5m2": (torch.float8_e5m2, 57344.0),
}


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer, ties away from zero (``trunc(x + 0.5*sign(x))``, as the kernels do)."""
    return torch.trunc(x + 0.5 * torch.sign(x))


def _qmax(bits: int) -> int:
    if bits not in INT_QMAX:
        raise ValueError(f"bits must be one of {sorted(INT_QMAX)}, got {bits!r}")
    return INT_QMAX[bits]


def div_rn(x: torch.Tensor, c: float) -> torch.Tensor:
    """``x / c`` correctly rounded, as the kernels' ``div_rn``. A tensor divisor: PyTorch on CUDA
    turns division by a Python scalar into a multiplication by its reciprocal."""
    return x / torch.full_like(x, float(c))


def safe_div(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale``, dividing by 1 where the scale is 0 (all-zero groups: x is 0, the code is 0)."""
    return x / torch.where(scale == 0, torch.ones_like(scale), scale)


def _encode_int(x: torch.Tensor, scale_per_elem: torch.Tensor, qmax: int) -> torch.Tensor:
    codes = round_half_away(safe_div(x, scale_per_elem))
    return codes.clamp_(-qmax, qmax).to(torch.int8)


# ----------------------------------------------------------------------------------------------
# Token groupings
# ----------------------------------------------------------------------------------------------

def groups_per_block(n_tokens: int, block: int, device=None) -> torch.Tensor:
    """Group index of each token when ``block`` consecutive tokens share a scale."""
    return torch.arange(n_tokens, device=device) // block


def groups_per_thread_q(n_tokens: int, block: int, warp_rows: int, device=None) -> torch.Tensor:
    """Q per-thread grouping (SageAttention2, sm80/89/90 MMA accumulator fragments).

    A block of ``block`` query tokens is split among warps of ``warp_rows`` rows each; in an MMA
    C/D fragment lane ``l`` (``g = l >> 2``) owns rows ``g`` and ``g + 8`` of every 16-row slice,
    so within a warp's rows, tokens ``{g + 8 r}`` share one scale: 8 scales per warp, group index
    ``block_idx * (block // warp_rows) * 8 + warp * 8 + (token % 8)``.
    """
    if block % warp_rows or warp_rows % 8:
        raise ValueError(f"need block % warp_rows == 0 and warp_rows % 8 == 0, got {block}, {warp_rows}")
    n = torch.arange(n_tokens, device=device)
    warps_per_block = block // warp_rows
    return (n // block) * warps_per_block * 8 + ((n % block) // warp_rows) * 8 + n % 8


def groups_per_thread_k(n_tokens: int, block: int, device=None) -> torch.Tensor:
    """K per-thread grouping (SageAttention2).

    In the S = Q K^T accumulator fragment, lane ``l`` (``t = l & 3``) owns columns ``2t, 2t+1`` of
    every 8-column slice, so within a ``block``-token K tile the tokens ``{8 m + 2 t, 8 m + 2 t + 1}``
    share one scale: 4 scales per tile, group index ``block_idx * 4 + ((token % 8) // 2)``.
    """
    if block % 8:
        raise ValueError(f"block must be a multiple of 8, got {block}")
    n = torch.arange(n_tokens, device=device)
    return (n // block) * 4 + (n % 8) // 2


def token_scales(scale: torch.Tensor, group_of_token: torch.Tensor) -> torch.Tensor:
    """Expand grouped scales ``[..., G]`` to one scale per token ``[..., N]``."""
    return scale.index_select(-1, group_of_token.to(scale.device))


# ----------------------------------------------------------------------------------------------
# Integer quantizers
# ----------------------------------------------------------------------------------------------

def quantize_int_grouped(x: torch.Tensor, bits: int, group_of_token: torch.Tensor):
    """Symmetric INT quantization where tokens with equal ``group_of_token`` share a scale.

    Grouping: each group is a set of tokens (dim -2) times all channels (dim -1).
    Rounding: half away from zero; ``scale = absmax / qmax`` in fp32.
    Returns ``codes`` (int8, same shape as x) and ``scale`` (fp32, ``[..., G]``).
    """
    qmax = _qmax(bits)
    xf = x.float()
    n_groups = int(group_of_token.max().item()) + 1 if group_of_token.numel() else 0
    tok_absmax = xf.abs().amax(dim=-1)  # [..., N]
    idx = group_of_token.to(x.device).expand_as(tok_absmax)
    absmax = torch.zeros(*tok_absmax.shape[:-1], n_groups, device=x.device, dtype=torch.float32)
    absmax = absmax.scatter_reduce(-1, idx, tok_absmax, reduce="amax", include_self=True)
    scale = div_rn(absmax, qmax)
    codes = _encode_int(xf, token_scales(scale, group_of_token)[..., None], qmax)
    return codes, scale


def int_per_token(x: torch.Tensor, bits: int = 8):
    """One scale per token (row): groups of 1 token x all channels. Scale ``[..., N]``."""
    return quantize_int_grouped(x, bits, groups_per_block(x.shape[-2], 1, x.device))


def int_per_block(x: torch.Tensor, bits: int = 8, block: int = 128):
    """One scale per ``block`` consecutive tokens x all channels (a FlashAttention tile).

    The last block may be shorter. Scale ``[..., ceil(N / block)]``.
    """
    return quantize_int_grouped(x, bits, groups_per_block(x.shape[-2], block, x.device))


def int_per_warp(x: torch.Tensor, bits: int = 8, warp_rows: int = 16):
    """One scale per ``warp_rows`` consecutive tokens (each warp's slice of a Q tile).

    Scale ``[..., ceil(N / warp_rows)]``. (For K, SageAttention2's per-warp mode is per-block.)
    """
    return quantize_int_grouped(x, bits, groups_per_block(x.shape[-2], warp_rows, x.device))


def int_per_thread_q(x: torch.Tensor, bits: int = 8, block: int = 64, warp_rows: int = 16):
    """Per-thread quantization of Q: see :func:`groups_per_thread_q` for the grouping.

    Scale ``[..., ceil(N / block) * (block // warp_rows) * 8]`` (groups of a short last block
    that hold no token have scale 0).
    """
    g = groups_per_thread_q(x.shape[-2], block, warp_rows, x.device)
    return _quantize_int_fixed_groups(x, bits, g, -(-x.shape[-2] // block) * (block // warp_rows) * 8)


def int_per_thread_k(x: torch.Tensor, bits: int = 8, block: int = 128):
    """Per-thread quantization of K: see :func:`groups_per_thread_k` for the grouping.

    Scale ``[..., ceil(N / block) * 4]``.
    """
    g = groups_per_thread_k(x.shape[-2], block, x.device)
    return _quantize_int_fixed_groups(x, bits, g, -(-x.shape[-2] // block) * 4)


def _quantize_int_fixed_groups(x, bits, g, n_groups):
    codes, scale = quantize_int_grouped(x, bits, g)
    if scale.shape[-1] < n_groups:  # trailing groups with no token
        pad = torch.zeros(*scale.shape[:-1], n_groups - scale.shape[-1], device=scale.device)
        scale = torch.cat([scale, pad], dim=-1)
    return codes, scale


def int_per_tensor(x: torch.Tensor, bits: int = 8):
    """One scale for the whole tensor (all batches, heads, tokens and channels).

    Scale has shape ``[..., 1]`` (the single value, broadcast to every leading index).
    """
    qmax = _qmax(bits)
    xf = x.float()
    scale = div_rn(xf.abs().amax(), qmax).reshape(*([1] * (x.dim() - 1)))
    scale = scale.expand(*x.shape[:-2], 1).contiguous()
    codes = _encode_int(xf, scale[..., None], qmax)
    return codes, scale


def dequantize_int(codes: torch.Tensor, scale_per_token: torch.Tensor) -> torch.Tensor:
    """``codes * scale`` in fp32, with ``scale_per_token`` of shape ``[..., N]``."""
    return codes.float() * scale_per_token[..., None]


# ----------------------------------------------------------------------------------------------
# FP8 quantizers
# ----------------------------------------------------------------------------------------------

def _fp8_format(fmt: str):
    if fmt not in FP8_FORMATS:
        raise ValueError(f"fp8 format must be one of {sorted(FP8_FORMATS)}, got {fmt!r}")
    return FP8_FORMATS[fmt]


def fp8_static(x: torch.Tensor, fmt: str, scale: float | torch.Tensor) -> torch.Tensor:
    """FP8 codes of ``x / scale`` (round to nearest even, saturating at the format's max)."""
    dtype, fmax = _fp8_format(fmt)
    y = safe_div(x.float(), torch.as_tensor(scale, dtype=torch.float32, device=x.device))
    return y.clamp(-fmax, fmax).to(dtype)


def fp8_per_tensor(x: torch.Tensor, fmt: str = "e4m3"):
    """One scale for the whole tensor: ``scale = absmax / fmax``. Returns (codes, scale[()])."""
    _, fmax = _fp8_format(fmt)
    scale = x.float().abs().amax() / fmax
    return fp8_static(x, fmt, scale), scale


def fp8_per_channel(x: torch.Tensor, fmt: str = "e4m3"):
    """One scale per channel over all tokens (``scale = absmax over dim -2 / fmax``), as for V.

    Returns (codes, scale ``[..., D]``).
    """
    _, fmax = _fp8_format(fmt)
    scale = x.float().abs().amax(dim=-2) / fmax
    return fp8_static(x, fmt, scale[..., None, :]), scale


def dequantize_fp8(codes: torch.Tensor, scale) -> torch.Tensor:
    return codes.float() * scale
