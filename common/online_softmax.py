"""The tile-by-tile online softmax the PyTorch emulations share (the kernels' arithmetic, in fp32).

    for j0, j1 in kv_tiles(Nk, tile):
        s = ...                              # scores of the tile, log2 domain
        p, alpha = sm.update(sm.mask(s, j0, j1))
        acc = alpha[..., None] * acc + P(p) @ V_j
    out = sm.normalize(acc)

``log2_shift`` lowers the running max so that p lands in (0, 2**log2_shift] (FP8's and FP4's
ranges); the row sum is taken from the unquantized p, so the shift cancels in acc / l.
"""

from __future__ import annotations

import torch


def kv_tiles(n_k: int, tile: int):
    """(j0, j1) of each KV tile. With bottom-right causal alignment the last query row sees every
    key, so all tiles are visited; what a row may not see is masked by ``OnlineSoftmax.mask``."""
    for j0 in range(0, n_k, tile):
        yield j0, min(n_k, j0 + tile)


class OnlineSoftmax:
    def __init__(self, rows_shape, n_k: int, device, *, is_causal: bool, log2_shift: float = 0.0,
                 bias2: torch.Tensor | None = None):
        """``bias2``: an optional log2-domain additive mask broadcastable to [..., Nq, Nk]
        (common.masking.dense_mask: attn_mask, per-sequence lengths and causal in one); when given
        it replaces the causal mask here."""
        self.m = torch.full(rows_shape, float("-inf"), device=device)
        self.l = torch.zeros(rows_shape, device=device)
        self.n_q, self.n_k, self.is_causal, self.shift = rows_shape[-1], n_k, is_causal, log2_shift
        self.rows = torch.arange(self.n_q, device=device)[:, None]
        self.bias2 = bias2

    def mask(self, s: torch.Tensor, j0: int, j1: int) -> torch.Tensor:
        """-inf where query i may not see key j (j > i + Nk - Nq) when causal; or the bias2 mask."""
        if self.bias2 is not None:
            return s + self.bias2[..., j0:j1]
        if not self.is_causal:
            return s
        cols = torch.arange(j0, j1, device=s.device)[None, :]
        return s.masked_fill(cols > self.rows + (self.n_k - self.n_q), float("-inf"))

    def update(self, s: torch.Tensor):
        """New running max and row sum for scores ``s``; returns (p, alpha) with
        p = exp2(s - m' + shift) and alpha = exp2(m - m') (0 for rows that saw nothing yet)."""
        m_new = torch.maximum(self.m, s.amax(dim=-1))
        m_use = torch.where(m_new == float("-inf"), 0.0, m_new)  # rows with no visible key: p = 0
        p = torch.exp2(s - (m_use - self.shift)[..., None])
        alpha = torch.exp2(self.m - m_use)
        self.l = self.l * alpha + p.sum(dim=-1)
        self.m = m_new
        return p, alpha

    def update_own_max(self, s: torch.Tensor):
        """As :meth:`update`, but p is taken after the tile's *own* row max m_t (the decode kernels,
        common.decode): p = exp2(s - m_t + shift), and the tile enters the running state scaled by
        beta = exp2(m_t - m'): l' = alpha l + beta rowsum(p), acc' = alpha acc + beta P(p) V. A
        tile's quantized P then does not depend on which tiles came before it, so programs may take
        tiles in any order (the CUDA kernel's dynamic tiles) and agree up to fp32 rounding. Returns
        (p, alpha, beta)."""
        m_t = s.amax(dim=-1)
        m_new = torch.maximum(self.m, m_t)
        t_use = torch.where(m_t == float("-inf"), 0.0, m_t)
        m_use = torch.where(m_new == float("-inf"), 0.0, m_new)
        p = torch.exp2(s - (t_use - self.shift)[..., None])
        alpha = torch.exp2(self.m - m_use)
        beta = torch.where(m_t == float("-inf"), 0.0, torch.exp2(t_use - m_use))
        self.l = self.l * alpha + p.sum(dim=-1) * beta
        self.m = m_new
        return p, alpha, beta

    def normalize(self, acc: torch.Tensor) -> torch.Tensor:
        """acc / l, with 0 for rows that saw no key."""
        return acc / torch.where(self.l == 0, 1.0, self.l)[..., None]

    def lse2(self) -> torch.Tensor:
        """log2 of the row sums of exp2(s) (-inf for rows without keys)."""
        return self.m + torch.log2(self.l) - self.shift
