import sys, torch
sys.path.insert(0, "tests")
from test_sage2_kv_pass import _passes
from common.inputs import make_qkv
from common.timing import bench_ms
from sage2 import kv_pass
for (B, H, N, D, layout, gran, smooth) in [(1, 1, 1, 72, "NHD", "per_token", False), (1, 1, 1, 72, "HND", "per_thread", True),
                                                                                      (2, 1, 1, 64, "HND", "per_thread", True), (1, 1, 130, 64, "HND", "per_thread", True)]:
    _, k, v = make_qkv(B, H, N, D, kind="k_bias", layout=layout, seed=4, device="cuda")
    if layout == "NHD":
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    f, s, m, c = _passes(k, v, granularity=gran, smooth_k=smooth)
    bad = [n for n in f if isinstance(f[n], torch.Tensor) and not torch.equal(f[n], s[n])]
    print(B, H, N, D, layout, gran, smooth, "differ:", bad, "counters", c.tolist())
    for n in bad:
        a, b = f[n], s[n]
        idx = (a != b).nonzero()
        print("   ", n, tuple(a.shape), "n diff", idx.shape[0], "first", idx[:4].tolist(), a[tuple(idx[0])].item(), b[tuple(idx[0])].item())
        if n == "v_scale":
            print("    fused", a.flatten()[:8].tolist(), "sep", b.flatten()[:8].tolist(), "vmax", v.abs().amax(-2).flatten()[:8].tolist())
_, k, v = make_qkv(4, 32, 16384, 128, kind="k_bias", device="cuda", seed=0)
B, H, N, D = k.shape
from common.nonfinite import NonfiniteFlags
for warps, phases, ticket, sem in [(4, 3, True, "acq_rel"), (4, 3, False, "acq_rel"), (4, 1, False, "acq_rel"), (4, 2, False, "acq_rel"),
                                   (4, 3, True, "relaxed"), (8, 3, False, "acq_rel"), (8, 1, False, "acq_rel"), (8, 2, False, "acq_rel")]:
        kv_pass.NUM_WARPS, kv_pass.PHASES, kv_pass.TICKET, kv_pass.SEM = warps, phases, ticket, sem
        def fused():
            buf = torch.zeros(B * H + B * H * D + kv_pass.counter_entries(B, H), dtype=torch.int32, device="cuda")
            flags = NonfiniteFlags(None, buf[:B * H])
            kv_pass.quantize_kv(k, v, buf[B * H + B * H * D:], granularity="per_thread", bits=8, smooth_k=True,
                                pv_dtype="fp8_e4m3", k_block=128, dp=128, npad_multiple=128, zero_nonfinite=True,
                                flags=flags, amax_bits=buf[B * H:B * H + B * H * D], wgmma_key_order=True)
        ms = bench_ms(fused, rep_ms=300)
        print(f"16k warps={warps} phases={phases} ticket={ticket} sem={sem}: {ms * 1e3:.0f} us", flush=True)
kv_pass.PHASES = 3
