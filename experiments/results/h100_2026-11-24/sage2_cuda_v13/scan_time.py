import sys, torch
from common.inputs import make_qkv
from common.range_guard import finite_absmax
from common.nonfinite import NonfiniteFlags
from common.timing import bench_ms
for n in (16384, 4096):
    v = make_qkv(4, 32, n, 128, kind="v_bias", device="cuda", seed=0)[2]
    amax = torch.zeros(4 * 32 * 128, dtype=torch.int32, device="cuda")
    flags = NonfiniteFlags(None, torch.zeros(4 * 32, dtype=torch.int32, device="cuda"))
    ms = bench_ms(lambda: finite_absmax(v, amax.zero_(), per_channel=True, flags=flags), rep_ms=200)
    print(f"{sys.argv[1]} scan N={n}: {ms * 1e3:.0f} us ({v.numel() * 2 / ms / 1e9:.2f} TB/s, with a 64 KB fill)", flush=True)
