"""A quantized KV cache for decode: K and V kept in the decode path's own tile format.

Why. Decode (a few queries against a long cache) is bound by reading K and V once. The decode path
(:mod:`common.decode`) reads them in fp16 and quantizes each 64-key tile in registers, so it reads
as many bytes as SDPA and cannot be faster than SDPA's fused kernels (H100: 0.94-0.98x cuDNN at 16k
keys, DECODE_NOTES.md). A serving loop appends a token per step to a cache that it reads at every
step: quantizing each tile once, when it fills, and keeping only the codes cuts the bytes that every
later step reads, and the cache's memory, to 0.54x.

What is stored, per KV head and 64-key tile: exactly what the decode kernel computes in registers
for that tile (:func:`common.decode.quantize_k_tile`, :func:`common.decode.quantize_v_tile_fp8`),
so decoding from the cache is the decode path's algorithm, tile for tile:

* K: INT8 codes of ``k - m_j`` (``m_j`` the tile's token mean, kept in fp32 and added back to the
  scores as ``q . m_j``, so the scores and the LSE are the true ones), one scale per token;
* V: FP8 codes (E4M3, or E5M2) with one scale per channel per tile.

At head dim 128 that is 128 + 4 + 128 bytes per key and KV head plus 2 x 512 per tile (8 per key):
276 bytes against fp16's 512. The keys past the last full tile (fewer than 64) are kept in the
input dtype and quantized by the kernel at each step, as the decode path does. A key with a NaN or
Inf in k or v is quantized as zeros and remembered (the first per KV head) when its tile is
quantized; in the last, partial tile the kernel checks the keys as it reads them. The rows that see
such a key are NaN: the rule of :mod:`common.nonfinite`.

CUDA graphs: while a graph is being captured, ``append`` records the device append
(:mod:`common.triton_kv_append`: positions read from ``seqlens``) and the decode call plans for
``max_seqlen``, so a captured decode step replays at the right positions; the host's lengths are
then read back from ``seqlens`` when it needs them.

What it covers: sage2's decode spec for INT8 Q/K (per-token K scales, K smoothing, no Q
smoothing) with FP8 P/V; sequences of different lengths (``append(..., lengths=)``; the kernel
reads each one's length from ``seqlens`` on the device, the host keeps ``lengths`` for the split
plan and the tile fills); ``Nq <= DECODE_MAX_QUERIES`` queries per call, causal bottom-right per
sequence or not.
"""

from __future__ import annotations

import copy
import itertools
import numbers
import weakref

import torch

from . import build
from .api import GRID_Y_MAX
from .checks import SUPPORTED_DTYPES, capturing, interpreter_enabled
from .decode import (DECODE_MAX_QUERIES, DECODE_TILE, LOG2_P_SCALE, PV_KINDS, DecodeSpec, _row_layout,
                     decode_emulated, planned_sms, quantize_k_tile, quantize_v_tile_fp8, split_tiles)
from .int_qk import LOG2E, padded_head_dim
from .masking import NO_MASK, MaskSpec

CACHE_PV_DTYPES = ("fp8_e4m3", "fp8_e5m2")
# launch settings of the cache's decode kernel (experiments/bench_kvcache.py --sweep; H100, B=4 32/8,
# 16k keys, graph replay: 4 warps 2 stages 0.094 ms, 3 stages 0.082, 3 stages with 168 registers and
# three programs per SM 0.078; best SDPA 0.108)
CACHE_WARPS = 4
CACHE_STAGES = 3
CACHE_MAXNREG = 168
CACHE_PROGRAMS_PER_SM = 3
# at most this many splits per KV head, or a sixth of its tiles if more: with few tiles per head the
# plan's splits of one or two tiles pay more in per-program costs (Q's quantization, the partial
# tile, the merge's reads of every split) than the extra programs gain (H100, B=4 32/8, graph
# replay, `bench_kvcache --sweep-splits`: 1k keys 26.6 -> 22.4 us at 6 splits, 2k 32.9 -> 26.1 us,
# 4k unchanged at 10-11; DECODE_NOTES.md, k5)
CACHE_SHORT_SPLITS = 6
NO_BAD_KEY = 2**31 - 1
QUANTIZE_CHUNK = 64 * DECODE_TILE  # keys quantized per step of a long append


_CACHES: "weakref.WeakValueDictionary[int, QuantizedKVCache]" = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


def _first_nonfinite_key(k: torch.Tensor, v: torch.Tensor, t0: int) -> torch.Tensor:
    """Per head (k, v [.., n, D] holding keys t0, t0 + 1, ...), the first key with a NaN/Inf in k or
    v, else NO_BAD_KEY (int32 [..])."""
    key_bad = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))
    pos = torch.arange(t0, t0 + k.shape[-2], dtype=torch.int32, device=k.device)
    return torch.where(key_bad, pos, NO_BAD_KEY).amin(-1).to(torch.int32)


def _finite_fp32(x: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(x.float(), nan=0.0, posinf=0.0, neginf=0.0)


class QuantizedKVCache:
    """K and V of ``batch`` sequences of up to ``max_seqlen`` keys, ``kv_heads`` heads of
    ``head_dim`` channels, quantized per 64-key tile as the decode path quantizes them.

    ``append(k, v)`` adds keys (a prefill's, then one or a few per decode step); the decode call is
    ``sage2.sageattn_kvcache(q, cache)``. The cache never modifies the tensors it is given."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, max_seqlen: int, *, dtype=torch.float16,
                 device="cuda", pv_dtype: str = "fp8_e4m3"):
        for name, n in (("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim), ("max_seqlen", max_seqlen)):
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ValueError(f"{name} must be a positive int, got {n!r}")
        if head_dim > 256:
            raise ValueError(f"head_dim must be at most 256, got {head_dim}")
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
        if pv_dtype not in CACHE_PV_DTYPES:
            raise ValueError(f"pv_dtype must be one of {CACHE_PV_DTYPES}, got {pv_dtype!r}")
        T = DECODE_TILE
        tiles = -(-max_seqlen // T)
        dp = padded_head_dim(head_dim)
        if batch * kv_heads * tiles * T * dp >= 2**31:  # the kernel's offsets are 32-bit
            raise ValueError(f"a cache of batch={batch}, kv_heads={kv_heads}, max_seqlen={max_seqlen} and head_dim="
                             f"{head_dim} holds {batch * kv_heads * tiles * T * dp} codes per tensor, more than the "
                             "kernel's 32-bit offsets reach (2^31): use a smaller max_seqlen or a cache per part of "
                             "the batch")
        if batch * kv_heads > GRID_Y_MAX:  # the decode kernel's grid axis of (sequence, KV head) pairs
            raise ValueError(f"batch * kv_heads must be at most {GRID_Y_MAX} (a CUDA grid axis), got {batch} x {kv_heads}: "
                             "use a cache per part of the batch")
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:  # "cuda" means the current device: compare as "cuda:N"
            dev = torch.device("cuda", torch.cuda.current_device())
        fp8 = torch.float8_e4m3fn if pv_dtype == "fp8_e4m3" else torch.float8_e5m2
        self.batch, self.kv_heads, self.head_dim, self.max_seqlen = batch, kv_heads, head_dim, max_seqlen
        self.dtype, self.device, self.pv_dtype = dtype, dev, pv_dtype
        self.spec = DecodeSpec(127, k_per_token=True, smooth_k=True, smooth_q=False, pv=pv_dtype)
        # codes and scales of the full tiles (channels padded to dp with zeros: the kernel's tile width)
        self.k_codes = torch.zeros(batch, kv_heads, tiles * T, dp, dtype=torch.int8, device=dev)
        self.k_scale = torch.zeros(batch, kv_heads, tiles * T, dtype=torch.float32, device=dev)
        self.k_mean = torch.zeros(batch, kv_heads, tiles, dp, dtype=torch.float32, device=dev)
        self.v_codes = torch.zeros(batch, kv_heads, tiles * T, dp, dtype=fp8, device=dev)
        self.v_scale = torch.zeros(batch, kv_heads, tiles, dp, dtype=torch.float32, device=dev)
        # the keys of the tile being filled, as given
        self.tail_k = torch.zeros(batch, kv_heads, T, head_dim, dtype=dtype, device=dev)
        self.tail_v = torch.zeros(batch, kv_heads, T, head_dim, dtype=dtype, device=dev)
        # the keys of the last tile quantized, as given: a rollback into that tile (a rejected draft
        # in speculative decoding that crossed a tile boundary) puts them back into the tail
        self.last_tile_k = torch.zeros(batch, kv_heads, T, head_dim, dtype=dtype, device=dev)
        self.last_tile_v = torch.zeros(batch, kv_heads, T, head_dim, dtype=dtype, device=dev)
        self._last_tile = [-1] * batch  # which tile they are per sequence, or -1: none (changed in place:
        # a view of the cache for a compiled op shares the list)
        self.first_bad = torch.full((batch, kv_heads), NO_BAD_KEY, dtype=torch.int32, device=dev)
        self._set_lengths((0,) * batch)  # keys held per sequence (host), and on the device for the kernel
        self._step_shape = torch.Size((batch, kv_heads, 1, head_dim))  # one decode step's k and v (HND)
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=dev)
        # appends recorded in a CUDA graph move seqlens at each replay, unseen by the host: once one
        # is recorded, the host reads the lengths from seqlens whenever it needs them (a sync)
        self._device_appends = False
        self._arrived = torch.zeros(batch, dtype=torch.int32, device=dev)  # the device append's tickets
        self._buffers = {}  # the decode kernel's partials and counters per launch shape (launch_buffers)
        self._plans = {}  # launch plans per (row tiles, tiles, device, settings) (launch_plan)
        self.handle = next(_HANDLES)  # how the compiled ops find the cache (common.kv_cache._CACHES)
        _CACHES[self.handle] = self

    @property
    def lengths(self) -> tuple[int, ...]:
        """Keys held per sequence (read-only: appends change it, together with ``seqlens``)."""
        return self._lengths

    @property
    def _lengths(self) -> tuple[int, ...]:
        if self._device_appends and not capturing(self.device):  # replays may have moved seqlens
            lengths = tuple(self.seqlens.tolist())
            if lengths != self._host_lengths:  # they did (the device only appends)
                for b, (was, now) in enumerate(zip(self._host_lengths, lengths)):
                    if now // DECODE_TILE > was // DECODE_TILE:  # a tile filled there: the device append
                        self._last_tile[b] = now // DECODE_TILE - 1  # kept its keys in last_tile_k/v
                self._set_lengths(lengths)
        return self._host_lengths

    def _set_lengths(self, lengths) -> None:
        self._host_lengths = tuple(lengths)
        self._one_length = len(set(self._host_lengths)) == 1

    @property
    def length(self) -> int:
        """The longest sequence's keys (all of them when the sequences are of one length)."""
        return max(self._lengths)

    @length.setter
    def length(self, n: int) -> None:
        """Back to ``n`` keys in every sequence (0: empty; else a rollback, where every sequence holds
        the same ``n`` or more keys: its keys past n are dropped, exactly). A rollback reaches back
        into the tile being filled, to a tile boundary, or into the last tile quantized (whose keys
        the cache keeps as given): any rollback of up to 64 keys."""
        if n and (len(set(self._lengths)) != 1 or not 0 <= n <= self._lengths[0]):
            raise ValueError(f"length can be set to 0, or back to n <= the one length of all sequences; the cache "
                             f"holds {self._lengths}, got {n}")
        T, held = DECODE_TILE, max(self._lengths)
        j = n // T
        cleared = n  # NaN/Inf marks of keys from here on go (the kernel checks the tail's keys itself)
        if n and n % T and j < held // T:  # the tile of key n was quantized since: its keys back into the tail
            if any(t != j for t in self._last_tile):
                raise ValueError(f"cannot roll back from {held} to {n} keys: the keys of tile {j} (keys {j * T} to "
                                 f"{j * T + T - 1}) are held only as codes; a rollback reaches back into the last "
                                 f"tile quantized or to a multiple of {T}")
            self.tail_k[:, :, :n % T] = self.last_tile_k[:, :, :n % T]
            self.tail_v[:, :, :n % T] = self.last_tile_v[:, :, :n % T]
            self._last_tile[:] = [-1] * self.batch
            cleared = j * T
        if n == 0:
            self._last_tile[:] = [-1] * self.batch
        self._set_lengths((n,) * self.batch)
        self.seqlens.fill_(n)
        if cleared < held:  # a NaN/Inf key past n is gone with it
            self.first_bad.masked_fill_(self.first_bad >= cleared, NO_BAD_KEY)

    @property
    def quantized(self) -> list[int]:
        """Keys held as codes per sequence: its full tiles."""
        return [n // DECODE_TILE * DECODE_TILE for n in self.lengths]

    @property
    def quantized_keys(self) -> int:
        """Keys held as codes in every sequence."""
        return min(self.quantized)

    def nbytes(self) -> int:
        """Bytes of the cache's storage (the last quantized tile's keys, kept for a rollback, included)."""
        return sum(t.numel() * t.element_size() for t in (self.k_codes, self.k_scale, self.k_mean, self.v_codes,
                                                          self.v_scale, self.tail_k, self.tail_v, self.last_tile_k,
                                                          self.last_tile_v, self.first_bad, self.seqlens))

    def launch_buffers(self, splits: int, rows: int, row_tiles: int):
        """The kernel's split partials and merge counters for one launch shape, kept for the cache's
        life (the counters are zero again when a launch ends; a CUDA graph captured with them stays
        valid whatever other shapes run meanwhile). One decode stream per cache: concurrent calls on
        different streams would share them."""
        key = (splits, rows, row_tiles)
        if key not in self._buffers:
            n = self.batch * self.kv_heads
            dp = self.k_codes.shape[-1]
            self._buffers[key] = (torch.empty(splits, n, rows, dp, dtype=torch.float32, device=self.device),
                                  torch.empty(splits, n, rows, dtype=torch.float32, device=self.device),
                                  torch.zeros(n * row_tiles, dtype=torch.int32, device=self.device))
        return self._buffers[key]

    def reset(self) -> None:
        """Empty the cache (the storage is kept)."""
        self.length = 0
        self.first_bad.fill_(NO_BAD_KEY)
        self._last_tile[:] = [-1] * self.batch

    def append(self, k: torch.Tensor, v: torch.Tensor, *, tensor_layout: str = "HND", lengths=None) -> None:
        """Add keys: k and v ``[B, Hkv, n, D]`` (``"HND"``) or ``[B, n, Hkv, D]`` (``"NHD"``), in the
        cache's dtype and on its device; sequence b takes the first ``lengths[b]`` of its n keys (a
        right-padded batch; default all n). Each tile that fills is quantized once, here."""
        if torch.compiler.is_compiling():  # one opaque op: the lengths stay out of the graph's guards
            if lengths is not None and not isinstance(lengths, torch.Tensor):
                raise TypeError("under torch.compile, append's lengths must be a tensor (a list's values would "
                                "be guarded on: a recompile per pattern of counts)")
            torch.ops.sageattn_repro.kvcache_append(*self.state_tensors(), k, v, self.handle, tensor_layout, lengths)
            return
        if capturing(self.device):  # a CUDA graph: the positions come from seqlens at each replay
            self._append_on_device(k, v, tensor_layout, lengths)
            return
        if lengths is None and self._append_one_key(k, v, tensor_layout):
            return
        self._append(k, v, tensor_layout, lengths)

    def _append_on_device(self, k, v, tensor_layout, lengths=None) -> None:
        """One key per sequence at the position in ``seqlens`` (common.triton_kv_append): what a CUDA
        graph records, so that each replay appends where the last one left off. A sequence that
        holds max_seqlen keys drops the key (no error can be raised during a replay)."""
        kh, vh = self._check_keys(k, v, tensor_layout)
        if kh.shape[2] != 1 or lengths is not None:
            raise ValueError(f"an append recorded in a CUDA graph takes one key per sequence and no lengths "
                             f"(its positions are read on the device); got {kh.shape[2]} keys"
                             + (" and lengths" if lengths is not None else ""))
        kh = kh if kh.stride(-1) == 1 else kh.contiguous()
        vh = vh if vh.stride(-1) == 1 else vh.contiguous()
        tk, kc, ks, km = self.tail_k, self.k_codes, self.k_scale, self.k_mean
        with build.on_device(self.device):  # (Triton launches on the current device)
            self._launch_append(kh, vh, tk, kc, ks, km)
        self._device_appends = True

    def _launch_append(self, kh, vh, tk, kc, ks, km) -> None:
        from .triton_kv_append import append_step_kernel

        append_step_kernel[(self.batch * self.kv_heads,)](
            kh, vh, tk, self.tail_v, self.last_tile_k, self.last_tile_v, kc, ks, km, self.v_codes, self.v_scale,
            self.first_bad, self.seqlens, self._arrived, kh.stride(0), kh.stride(1), vh.stride(0), vh.stride(1),
            tk.stride(0), tk.stride(1), tk.stride(2), kc.stride(0), kc.stride(1), kc.stride(2), ks.stride(0),
            ks.stride(1), km.stride(0), km.stride(1), km.stride(2), self.kv_heads, self.head_dim, self.max_seqlen,
            T=DECODE_TILE, DP=kc.shape[-1], PV=PV_KINDS.index(self.spec.pv), INTERPRET=interpreter_enabled(),
            # (no FMA contraction: x * (1/scale) rounds before the code's rounding, as in the host path)
            **({} if interpreter_enabled() else {"enable_fp_fusion": False}))

    def _append_one_key(self, k, v, tensor_layout) -> bool:
        """The usual decode step, with three small ops and no more Python than it needs (its host
        time is the step's at short contexts): one key per sequence, all of one length, no tile
        fills. False where that is not the case, or anything is unusual about k and v: the general
        path then runs, with its checks and messages."""
        l0 = self._lengths[0]
        at = l0 % DECODE_TILE
        if not (self._one_length and at + 1 < DECODE_TILE and l0 < self.max_seqlen):
            return False
        if tensor_layout == "NHD":
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        elif tensor_layout != "HND":
            return False
        step = self._step_shape
        if not (type(k) is torch.Tensor and type(v) is torch.Tensor and k.shape == step and v.shape == step
                and k.dtype == self.dtype and v.dtype == self.dtype and k.device == self.device
                and v.device == self.device and not k.requires_grad and not v.requires_grad):
            return False  # (a key that requires grad: the general path copies it under no_grad)
        self.tail_k.select(2, at).copy_(k.select(2, 0))  # the kernel checks these keys for NaN/Inf as it reads them
        self.tail_v.select(2, at).copy_(v.select(2, 0))
        self.seqlens.add_(1)
        self._set_lengths((l0 + 1,) * self.batch)
        return True

    _STATE_NAMES = ("k_codes", "k_scale", "k_mean", "v_codes", "v_scale", "tail_k", "tail_v", "first_bad", "seqlens")

    def state_tensors(self):
        """The tensors a decode call reads and an append writes (the compiled ops take them, so that
        the compiler orders appends and calls)."""
        return tuple(getattr(self, n) for n in self._STATE_NAMES)

    def _over(self, tensors) -> "QuantizedKVCache":
        """This cache's view over other state tensors (what a compiled op is given: functionalization
        may hand it copies, written back after the graph), sharing everything else."""
        view = copy.copy(self)
        for name, t in zip(self._STATE_NAMES, tensors):
            setattr(view, name, t)
        return view

    @torch.no_grad()
    def _append(self, k: torch.Tensor, v: torch.Tensor, tensor_layout: str, lengths=None) -> None:
        kh, vh = self._check_keys(k, v, tensor_layout)
        n, T = kh.shape[2], DECODE_TILE
        held = self.lengths  # (read once: after a device append, reading it again re-reads seqlens)
        counts = [n] * self.batch if lengths is None else self._check_counts(lengths, n)
        if max(counts) == 0:
            return
        if any(l0 + c > self.max_seqlen for l0, c in zip(held, counts)):
            raise ValueError(f"the cache holds at most max_seqlen={self.max_seqlen} keys per sequence: "
                             f"{held} held, {counts} more given")
        if len(set(held)) == 1 and len(set(counts)) == 1:  # one length: the whole batch at once
            self._append_rows(slice(None), kh[:, :, :counts[0]], vh[:, :, :counts[0]], held[0])
            self.seqlens.add_(counts[0])
        elif all(c == 1 and l0 % T + 1 < T for l0, c in zip(held, counts)):
            # a decode step over sequences of several lengths that fills no tile: one indexed copy each
            rows = torch.arange(self.batch, device=self.device)
            at = torch.tensor([l0 % T for l0 in held], device=self.device)
            self.tail_k[rows, :, at] = kh[:, :, 0]
            self.tail_v[rows, :, at] = vh[:, :, 0]
            self.seqlens.add_(1)
        else:
            for b, (l0, c) in enumerate(zip(held, counts)):
                if c:
                    self._append_rows(slice(b, b + 1), kh[b:b + 1, :, :c], vh[b:b + 1, :, :c], l0)
            self.seqlens.copy_(torch.tensor([l0 + c for l0, c in zip(held, counts)], dtype=torch.int32))
        self._set_lengths(l0 + c for l0, c in zip(held, counts))

    def _check_counts(self, lengths, n: int) -> list[int]:
        counts = lengths.tolist() if isinstance(lengths, torch.Tensor) else list(lengths)
        if len(counts) != self.batch or not all(isinstance(c, numbers.Integral) and not isinstance(c, bool)
                                                and 0 <= c <= n for c in counts):
            raise ValueError(f"lengths must hold {self.batch} ints in [0, {n}] (the keys each sequence takes of "
                             f"the {n} given), got {lengths!r}")
        return [int(c) for c in counts]

    def _append_rows(self, bs: slice, kh: torch.Tensor, vh: torch.Tensor, l0: int) -> None:
        """Keys [l0, l0 + n) of the sequences ``bs`` (all of them at ``l0`` keys)."""
        T, n = DECODE_TILE, kh.shape[2]
        l1 = l0 + n
        t0 = l0 // T * T  # the first key of the tile being filled
        if l1 - t0 < T:  # no tile fills (most decode steps): two copies. The kernel checks these keys
            self.tail_k[bs, :, l0 - t0:l1 - t0] = kh  # for NaN/Inf as it reads them
            self.tail_v[bs, :, l0 - t0:l1 - t0] = vh
            return
        keys_k = torch.cat([self.tail_k[bs, :, :l0 - t0], kh], dim=2)                 # keys [t0, l1)
        keys_v = torch.cat([self.tail_v[bs, :, :l0 - t0], vh], dim=2)
        full = l1 // T * T - t0
        for c0 in range(0, full, QUANTIZE_CHUNK):  # (a prefill's fp32 copies a chunk at a time)
            c1 = min(full, c0 + QUANTIZE_CHUNK)
            self._quantize_tiles(bs, keys_k[:, :, c0:c1], keys_v[:, :, c0:c1], t0 + c0)
        self.last_tile_k[bs] = keys_k[:, :, full - T:full]
        self.last_tile_v[bs] = keys_v[:, :, full - T:full]
        for b in range(self.batch)[bs]:
            self._last_tile[b] = (t0 + full) // T - 1
        rest = l1 - t0 - full
        self.tail_k[bs, :, :rest] = keys_k[:, :, full:]
        self.tail_v[bs, :, :rest] = keys_v[:, :, full:]

    def _quantize_tiles(self, bs: slice, k: torch.Tensor, v: torch.Tensor, t0: int) -> None:
        B, H, n, D = k.shape
        T, nt = DECODE_TILE, n // DECODE_TILE
        # the codes hold a NaN/Inf as 0: remember the first key with one (the rows that see it are NaN)
        self._fold_first_bad(bs, k, v, t0)
        kf = _finite_fp32(k).view(B, H, nt, T, D)
        vf = _finite_fp32(v).view(B, H, nt, T, D)
        every = torch.ones(1, 1, 1, T, 1, dtype=torch.bool, device=k.device)
        k8, sk, mk, _ = quantize_k_tile(kf, every, torch.tensor(float(T), device=k.device), self.spec)
        v8, sv = quantize_v_tile_fp8(vf, self.spec.pv)
        j0, c0 = t0 // T, t0
        self.k_codes[bs, :, c0:c0 + n, :D] = k8.view(B, H, n, D).to(torch.int8)
        self.k_scale[bs, :, c0:c0 + n] = sk.view(B, H, n)
        self.k_mean[bs, :, j0:j0 + nt, :D] = mk.view(B, H, nt, D)
        self.v_codes[bs, :, c0:c0 + n, :D] = v8.view(B, H, n, D)
        self.v_scale[bs, :, j0:j0 + nt, :D] = sv.view(B, H, nt, D)

    def _fold_first_bad(self, bs: slice, k: torch.Tensor, v: torch.Tensor, t0: int) -> None:
        self.first_bad[bs] = torch.minimum(self.first_bad[bs], _first_nonfinite_key(k, v, t0))

    def _check_keys(self, k, v, tensor_layout):
        from .checks import LAYOUTS, check_choice, to_hnd

        check_choice("tensor_layout", tensor_layout, LAYOUTS)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(f"{name} must have rank 4 ([B, Hkv, n, D] for tensor_layout='HND', [B, n, Hkv, D] "
                                 f"for 'NHD'), got shape {tuple(t.shape)}")
            if t.dtype != self.dtype:
                raise ValueError(f"{name}.dtype must be the cache's dtype {self.dtype}, got {t.dtype}")
            if t.device != self.device:
                raise ValueError(f"{name} must be on the cache's device {self.device}, got {t.device}")
        kh, vh = to_hnd(k, tensor_layout), to_hnd(v, tensor_layout)
        want = (self.batch, self.kv_heads, self.head_dim)
        for name, t in (("k", kh), ("v", vh)):
            if (t.shape[0], t.shape[1], t.shape[3]) != want:
                raise ValueError(f"{name} must have batch {self.batch}, {self.kv_heads} KV heads and head_dim "
                                 f"{self.head_dim} (the cache's), got shape {tuple(t.shape)} ({tensor_layout})")
        if kh.shape != vh.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        return kh, vh

    # -- what the emulation (backend="torch") reads -------------------------------------------------

    def tile(self, j0: int, j1: int):
        """A quantized tile's (K codes (float) [B, Hkv, T, D], K scales [B, Hkv, T], K mean
        [B, Hkv, 1, D], V codes (FP8) [B, Hkv, T, D], V scales [B, Hkv, 1, D])."""
        D, j = self.head_dim, j0 // DECODE_TILE
        return (self.k_codes[:, :, j0:j1, :D].float(), self.k_scale[:, :, j0:j1], self.k_mean[:, :, j:j + 1, :D],
                self.v_codes[:, :, j0:j1, :D], self.v_scale[:, :, j:j + 1, :D])

    def emulation_views(self):
        """(k, v) [B, Hkv, length, D] in the cache's dtype: each sequence's keys past its quantized
        tiles in place, zeros where its tiles are and past its length (:func:`common.decode.decode_emulated`
        reads the tiles from :meth:`tile`)."""
        shape = (self.batch, self.kv_heads, self.length, self.head_dim)
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for b, (n0, n) in enumerate(zip(self.quantized, self.lengths)):
            k[b, :, n0:n] = self.tail_k[b, :, :n - n0]
            v[b, :, n0:n] = self.tail_v[b, :, :n - n0]
        return k, v

    def nan_rows(self, qh: torch.Tensor, *, is_causal: bool) -> torch.Tensor:
        """bool [B, Hq, Nq]: rows with a non-finite query value or that see a key with one."""
        B, Hq, Nq, _ = qh.shape
        first = self.first_bad.clone()
        for b, (n0, n) in enumerate(zip(self.quantized, self.lengths)):  # the keys of the partial tile
            if n > n0:
                first[b] = torch.minimum(first[b], _first_nonfinite_key(self.tail_k[b, :, :n - n0],
                                                                        self.tail_v[b, :, :n - n0], n0))
        first = first.repeat_interleave(Hq // self.kv_heads, dim=1)[..., None]           # [B, Hq, 1]
        lens = torch.tensor(self.lengths, device=qh.device)[:, None, None]
        i = torch.arange(Nq, device=qh.device)[None, None, :]
        reach = first <= i + (lens - Nq) if is_causal else (first < lens).expand(B, Hq, Nq)
        return ~torch.isfinite(qh).all(-1) | reach


def launch_residency(programs_per_split: int, n_k: int, device) -> tuple[int, bool]:
    """(programs per SM the split plan aims at, whether the kernel is capped at CACHE_MAXNREG
    registers). The cap fits three programs per SM (faster where the split plan fills the GPU); but
    with one program per KV head (so many KV heads that a split each is all that fits), the waves
    decide: 512 KV heads ran 1.09x SDPA at three per SM (1.3 waves) against 1.36x at two (1.94
    waves) in two H100 runs (DECODE_NOTES.md, k3), so there the occupancy with the fuller last wave
    is taken."""
    if not CACHE_MAXNREG:
        return CACHE_PROGRAMS_PER_SM, False
    sms = planned_sms(device)
    if split_tiles(programs_per_split, 1, n_k, device, CACHE_PROGRAMS_PER_SM) < -(-n_k // DECODE_TILE):
        return CACHE_PROGRAMS_PER_SM, True  # several splits per KV head: the plan fills the GPU

    def last_wave_fill(per_sm):
        resident = per_sm * sms
        return programs_per_split / (-(-programs_per_split // resident) * resident)

    if last_wave_fill(2) > last_wave_fill(CACHE_PROGRAMS_PER_SM):
        return 2, False  # (uncapped: ~250 registers, two programs per SM)
    return CACHE_PROGRAMS_PER_SM, True


def launch_plan(cache: QuantizedKVCache, row_tiles: int, n_tiles: int, device) -> tuple[int, bool, int, int]:
    """(programs per SM, capped at CACHE_MAXNREG, tiles per split, splits) of a launch over n_tiles
    tiles, kept by the cache (a decode loop asks for the same plan for 64 steps, and each call's
    host time counts at short contexts)."""
    key = (row_tiles, n_tiles, device, CACHE_PROGRAMS_PER_SM, CACHE_MAXNREG, CACHE_SHORT_SPLITS)
    plan = cache._plans.get(key)
    if plan is None:
        n_k, bkv = n_tiles * DECODE_TILE, cache.batch * cache.kv_heads
        per_sm, capped = launch_residency(bkv * row_tiles, n_k, device)
        tps = split_tiles(bkv, row_tiles, n_k, device, per_sm)
        most = max(CACHE_SHORT_SPLITS, n_tiles // max(1, CACHE_SHORT_SPLITS))
        if CACHE_SHORT_SPLITS and -(-n_tiles // tps) > most:
            tps = -(-n_tiles // most)
        plan = cache._plans[key] = (per_sm, capped, tps, -(-n_tiles // tps))
    return plan


def decode_from_cache(qh: torch.Tensor, cache: QuantizedKVCache, out_hnd: torch.Tensor, *, sm_scale: float,
                      is_causal: bool, return_lse: bool, backend: str):
    """Decode attention of qh [B, Hq, Nq, D] over the cache into ``out_hnd``; returns the natural
    LSE [B, Hq, Nq] (or None). backend: ``"triton"`` or ``"torch"`` (the emulation)."""
    B, Hq, Nq, D = qh.shape
    Hkv, spec = cache.kv_heads, cache.spec
    in_graph = capturing(qh.device)
    # in a CUDA graph the lengths are the device's at each replay: the plan covers the capacity (the
    # kernel reads each sequence's length; the splits past it have nothing to do)
    Nk = cache.max_seqlen if in_graph else cache.length
    nqp, block_m, row_tiles = _row_layout(Hq // Hkv, Nq)
    _, capped, tps, splits = launch_plan(cache, row_tiles, -(-Nk // DECODE_TILE), qh.device)
    if backend == "torch" and in_graph:
        raise ValueError("a decode call over a QuantizedKVCache recorded in a CUDA graph needs backend='triton'")
    if backend == "torch":
        kh, vh = cache.emulation_views()
        mask = NO_MASK if len(set(cache.lengths)) == 1 else MaskSpec(  # per sequence: its keys, its causal offset
            q_lens=torch.full((B,), Nq, dtype=torch.int32, device=qh.device), k_lens=cache.seqlens)
        out, lse = decode_emulated(qh, kh, vh, spec, sm_scale=sm_scale, is_causal=is_causal, mask=mask,
                                   tiles_per_split=tps, cache=cache)
        out_hnd.copy_(out)
        return lse if return_lse else None

    qh = qh if qh.stride(-1) == 1 else qh.contiguous()
    dp = cache.k_codes.shape[-1]
    part_o, part_l, count = cache.launch_buffers(splits, row_tiles * block_m, row_tiles)
    lse = torch.empty(B, Hq, Nq, dtype=torch.float32, device=qh.device) if return_lse else part_l
    interp = interpreter_enabled()
    opts = {} if interp else {"enable_fp_fusion": False}  # x * (1/scale) rounds first, as in the emulation
    if capped and not interp and block_m <= 16 and dp <= 128:  # (64 rows spill 2.5 KB at 168)
        opts["maxnreg"] = CACHE_MAXNREG
    target = out_hnd
    if interp and out_hnd.dtype == torch.bfloat16:  # round on the host (checks.kernel_store_dtype)
        target = torch.empty(out_hnd.shape, dtype=torch.float32, device=out_hnd.device)
    kc, ks, km, tk = cache.k_codes, cache.k_scale, cache.k_mean, cache.tail_k
    sq, sc, ss, sm, st, so = qh.stride(), kc.stride(), ks.stride(), km.stride(), tk.stride(), target.stride()
    _launch_cached(
        (splits, B * Hkv, row_tiles),
        qh, kc, ks, km, cache.v_codes, cache.v_scale, tk, cache.tail_v, cache.first_bad, cache.seqlens, part_o,
        part_l, count, target, lse, sq[0], sq[1], sq[2], sc[0], sc[1], sc[2], ss[0], ss[1], sm[0], sm[1],
        st[0], st[1], st[2], so[0], so[1], so[2],
        Hkv, Nq, D, Hq // Hkv, sm_scale * LOG2E, tps, LOG2_P_SCALE[spec.pv],
        BLOCK_M=block_m, NQP=nqp, T=DECODE_TILE, DP=dp, PV=PV_KINDS.index(spec.pv), IS_CAUSAL=is_causal,
        INTERPRET=interp, EVEN_D=D == dp, RETURN_LSE=return_lse, num_warps=CACHE_WARPS, num_stages=CACHE_STAGES,
        **opts)
    if target is not out_hnd:
        out_hnd.copy_(target)
    return lse if return_lse else None


_launcher = None


def _launch_cached(grid, *args, **kwargs):
    """decode_cached_kernel[grid](*args, **kwargs), through the compiled kernel's launcher once a
    specialization has run (common.triton_launch: ~50 us less host time per call on the H100's host)."""
    global _launcher
    if _launcher is None:
        from .triton_decode import decode_cached_kernel
        from .triton_launch import FastLauncher

        _launcher = FastLauncher(decode_cached_kernel)
    _launcher(grid, *args, **kwargs)


def check_query(q: torch.Tensor, cache: QuantizedKVCache, tensor_layout: str):
    """q's HND view, after the checks a decode call over ``cache`` needs."""
    from .checks import LAYOUTS, check_choice, to_hnd

    if not isinstance(cache, QuantizedKVCache):
        raise TypeError(f"cache must be a QuantizedKVCache, got {type(cache).__name__}")
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    check_choice("tensor_layout", tensor_layout, LAYOUTS)
    if q.dim() != 4:
        raise ValueError(f"q must have rank 4 ([B, H, N, D] for HND, [B, N, H, D] for NHD), got shape {tuple(q.shape)}")
    if q.dtype != cache.dtype:
        raise ValueError(f"q.dtype must be the cache's dtype {cache.dtype}, got {q.dtype}")
    if q.device != cache.device:
        raise ValueError(f"q must be on the cache's device {cache.device}, got {q.device}")
    qh = to_hnd(q, tensor_layout)
    B, Hq, Nq, D = qh.shape
    if B != cache.batch:
        raise ValueError(f"q must have the cache's batch size {cache.batch}, got {B}")
    if D != cache.head_dim:
        raise ValueError(f"q must have the cache's head_dim {cache.head_dim}, got {D}")
    if Hq == 0 or Hq % cache.kv_heads:
        raise ValueError(f"q's heads must be a positive multiple of the cache's {cache.kv_heads} KV heads, got {Hq}")
    if Nq > DECODE_MAX_QUERIES:
        raise ValueError(f"a decode call over a cache takes at most {DECODE_MAX_QUERIES} queries, got {Nq}; "
                         "run the prefill with sageattn on the keys themselves")
    return qh


# ---- torch.compile: the cache's append and decode call as opaque custom ops ---------------------
# Under tracing the cache's length (a host int that every append changes) would become a guard, and
# a compiled decode step would recompile at every token. The ops take the cache's tensors (so the
# compiler orders appends before the calls that read them) and its handle; the length is read when
# they run. Tagged cudagraph-unsafe where torch has the tag: these ops run the host's append and plan
# (torch.compile's CUDA graphs would replay one length); a graph captured by torch.cuda.graph around
# the eager calls takes the device append instead (QuantizedKVCache.append).

_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()
_STATE = "Tensor(a!) k_codes, Tensor(b!) k_scale, Tensor(c!) k_mean, Tensor(d!) v_codes, Tensor(e!) v_scale, " \
         "Tensor(f!) tail_k, Tensor(g!) tail_v, Tensor(h!) first_bad, Tensor(i!) seqlens"
_STATE_READ = "Tensor k_codes, Tensor k_scale, Tensor k_mean, Tensor v_codes, Tensor v_scale, Tensor tail_k, " \
              "Tensor tail_v, Tensor first_bad, Tensor seqlens"


def _cache_of(handle: int) -> QuantizedKVCache:
    cache = _CACHES.get(handle)
    if cache is None:
        raise RuntimeError(f"the QuantizedKVCache with handle {handle} no longer exists")
    return cache


@torch.library.custom_op("sageattn_repro::kvcache_append", mutates_args=QuantizedKVCache._STATE_NAMES,
                         schema=f"({_STATE}, Tensor k, Tensor v, int handle, str tensor_layout, Tensor? lengths) -> ()",
                         tags=_TAGS)
def _append_op(k_codes, k_scale, k_mean, v_codes, v_scale, tail_k, tail_v, first_bad, seqlens, k, v, handle,
               tensor_layout, lengths):
    cache = _cache_of(handle)
    view = cache._over((k_codes, k_scale, k_mean, v_codes, v_scale, tail_k, tail_v, first_bad, seqlens))
    if capturing(cache.device):  # (a compiled step captured in a CUDA graph by hand: as append() does)
        view._append_on_device(k, v, tensor_layout, lengths)
        cache._device_appends = True
        return
    view._append(k, v, tensor_layout, lengths)
    cache._set_lengths(view.lengths)


@_append_op.register_fake
def _(k_codes, k_scale, k_mean, v_codes, v_scale, tail_k, tail_v, first_bad, seqlens, k, v, handle, tensor_layout,
      lengths):
    return None


@torch.library.custom_op("sageattn_repro::kvcache_attention", mutates_args=(), schema=(
        f"(Tensor q, {_STATE_READ}, int handle, str tensor_layout, bool is_causal, float? sm_scale, "
        "bool return_lse, str backend) -> (Tensor, Tensor)"), tags=_TAGS)
def _attention_op(q, k_codes, k_scale, k_mean, v_codes, v_scale, tail_k, tail_v, first_bad, seqlens, handle,
                  tensor_layout, is_causal, sm_scale, return_lse, backend):
    from sage2.kvcache import sageattn_kvcache

    view = _cache_of(handle)._over((k_codes, k_scale, k_mean, v_codes, v_scale, tail_k, tail_v, first_bad, seqlens))
    res = sageattn_kvcache(q, view, tensor_layout=tensor_layout, is_causal=is_causal,
                           sm_scale=sm_scale, return_lse=return_lse, backend=backend)
    return res if return_lse else (res, q.new_empty(0, dtype=torch.float32))


@_attention_op.register_fake
def _(q, k_codes, k_scale, k_mean, v_codes, v_scale, tail_k, tail_v, first_bad, seqlens, handle, tensor_layout,
      is_causal, sm_scale, return_lse, backend):
    b, n, h = (0, 2, 1) if tensor_layout == "HND" else (0, 1, 2)
    lse = (q.shape[b], q.shape[h], q.shape[n]) if return_lse else (0,)
    return q.new_empty(q.shape), q.new_empty(lse, dtype=torch.float32)


def bytes_per_key(head_dim: int) -> float:
    """Bytes the decode kernel reads per key and KV head from the cache's full tiles (codes, K's
    scale, and the tile's K mean and V scales spread over its keys)."""
    dp = padded_head_dim(head_dim)
    return 2 * dp + 4 + 2 * dp * 4 / DECODE_TILE


__all__ = ["QuantizedKVCache", "decode_from_cache", "check_query", "bytes_per_key", "CACHE_PV_DTYPES",
           "NO_BAD_KEY"]
