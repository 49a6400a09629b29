"""Save/compare V's scan and codes (both key orders, NaN/Inf, smooth_v, odd lengths) and Triton-backend outputs."""
import sys, torch
import sage2, sage1
from common.inputs import make_qkv
from common.nonfinite import NonfiniteFlags
from sage2.quant_v import quantize_v
res = {}
for i, (b, h, n, d, wg, smooth_v, bad) in enumerate([(2, 4, 1000, 128, True, False, True), (2, 3, 77, 64, False, False, False),
                                                     (1, 4, 4100, 128, False, True, True), (1, 2, 33, 96, True, False, True)]):
    v = make_qkv(b, h, n, d, kind="v_bias", device="cuda", seed=i)[2]
    if bad:
        v[0, 1, n // 3, 5] = float("nan"); v[-1, -1, n - 1, 0] = float("inf")
    f = NonfiniteFlags(None, torch.zeros(b * h, dtype=torch.int32, device="cuda"))
    for fmt in ("fp8_e4m3", "fp8_e5m2"):
        qv = quantize_v(v, fmt, smooth_v=smooth_v, backend="triton", dp=128 if d > 64 else 64, zero_nonfinite=True, flags=f,
                        wgmma_key_order=wg, npad_multiple=128 if wg else 16)
        res[(i, fmt)] = (qv.codes.view(torch.uint8).cpu(), qv.scale.cpu(), f.first_bad.cpu().clone())
for i, (b, h, n, d, causal) in enumerate([(2, 4, 1000, 128, True), (1, 8, 4100, 64, False), (2, 2, 300, 128, False)]):
    q, k, v = make_qkv(b, h, n, d, kind="k_bias", device="cuda", seed=10 + i)
    res[("sage2", i)] = sage2.sageattn(q, k, v, is_causal=causal, backend="triton").cpu()
    res[("sage2cuda", i)] = sage2.sageattn(q, k, v, is_causal=causal, backend="cuda").cpu()
    res[("sage1", i)] = sage1.sageattn(q, k, v, is_causal=causal, backend="triton").cpu()
if sys.argv[1] == "save":
    torch.save(res, sys.argv[2])
else:
    old = torch.load(sys.argv[2])
    diff = [key for key in res if not all(torch.equal(a, b) if a.dtype != torch.float16 else torch.equal(a.view(torch.int16), b.view(torch.int16))
                                       for a, b in zip(res[key] if isinstance(res[key], tuple) else (res[key],), old[key] if isinstance(old[key], tuple) else (old[key],)))]
    print(f"same passes: {len(res) - len(diff)} of {len(res)} identical; differ: {diff}")
