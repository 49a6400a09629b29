"""Where a CUDA decode call spends its time, from a trace build of csrc/decode/split_kv.cu
(-DSAGE_DECODE_TRACE: thread 0 of every program writes the global timer at each step into unused
rows of its partial outputs). Needs Nq * (query heads per KV head) <= 8; the shape is the decode
benchmark's (B=4, Hq/Hkv 32/8, Nq=1, D=128, fp16) unless --batch/--heads say otherwise (B=16 32/32
is the MHA case). Only a program's first 62 tiles are traced.

    python -m experiments.decode_trace [--nk 16384] [--batch 4 --heads 32 8] [--copies] [--static] [--stragglers]

``--copies`` traces the copies-only build (-DSAGE_DECODE_LOAD_ONLY: no arithmetic, output garbage).
Prints, per generation, medians over programs (us from the first program's start): when Q is
ready, when the first tile's data is in, the time per tile waiting for data and computing (steady
tiles), when the last tile's data is in, when the sweep, the split count and the merge end.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nk", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, nargs=2, default=[32, 8], metavar=("HQ", "HKV"))
    ap.add_argument("--copies", action="store_true")
    ap.add_argument("--pad-keys", type=int, default=0, help="K and V as slices of a cache this many keys longer")
    ap.add_argument("--stragglers", action="store_true", help="the slowest programs against the fastest half")
    ap.add_argument("--static", action="store_true", help="the static split (common.decode.DYNAMIC_TILES = False)")
    ap.add_argument("--gens", nargs="+", default=["sage1", "sage2_8b"], choices=["sage1", "sage2_8b", "sage2_4b"])
    args = ap.parse_args(argv)
    os.environ["SAGE_NVCC_FLAGS"] = "-DSAGE_DECODE_TRACE" + (" -DSAGE_DECODE_LOAD_ONLY" if args.copies else "")

    import torch

    import sage1
    import sage2
    from common import build, cuda_decode, decode

    build.load()
    decode.DYNAMIC_TILES = not args.static
    torch.manual_seed(0)
    (hq, hkv), batch = args.heads, args.batch
    if hq % hkv or hq // hkv > 8:
        ap.error("--heads HQ HKV: HQ a multiple of HKV, at most 8 query heads per KV head (the trace's rows)")
    q = torch.randn(batch, hq, 1, 128, dtype=torch.float16, device="cuda")
    k, v = (torch.randn(batch, hkv, args.nk + args.pad_keys, 128, dtype=torch.float16, device="cuda")[:, :, :args.nk]
            for _ in range(2))
    flush = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    fns = {"sage1": lambda: sage1.sageattn(q, k, v), "sage2_8b": lambda: sage2.sageattn(q, k, v),
           "sage2_4b": lambda: sage2.sageattn(q, k, v, qk_dtype="int4")}
    gens = [f"{g}#{i}" for i, g in enumerate(args.gens)]
    print(f"{'us from start':22s}" + "".join(f"{g:>20s}" for g in gens), flush=True)
    rows = {}
    for name in gens:
        fn = fns[name.split("#")[0]]
        for _ in range(3):
            fn()
        (scratch, _), = [w for key, w in cuda_decode._WORKSPACES.items() if key[0] == q.device.index]
        scratch.zero_()
        flush.zero_()
        fn()
        torch.cuda.synchronize()
        tps = decode.split_tiles(batch * hkv, 1, args.nk, q.device)
        n_tiles = -(-args.nk // decode.DECODE_TILE)
        slots, helpers = decode.cuda_plan(batch * hkv, n_tiles, tps, decode.DYNAMIC_TILES, q.device)
        n_progs = batch * hkv + helpers if helpers else slots * batch * hkv
        t = scratch[: n_progs * 16 * 128].view(n_progs, 16, 128)[:, 8:].contiguous().view(n_progs, -1)
        t = t.view(torch.int64)[:, :130].double().cpu()
        used = t[:, 2] > 0  # (helpers that found nothing to join took no tile)
        t = t[used]
        t0 = t[:, 0].min()
        # dynamic tiles: programs take different numbers of tiles (the first 62 are traced); NaN past a
        # program's last
        taken = t[:, 2:126:2] > 0
        count = taken.sum(1)
        tiles = int(count.max())
        nan = torch.tensor(float("nan"), dtype=t.dtype)
        data_in = torch.where(taken, t[:, 2:126:2] - t0, nan)[:, :tiles]
        done = data_in if args.copies else torch.where(taken, t[:, 3:126:2] - t0, nan)[:, :tiles]
        steady = torch.arange(tiles)[None, :].expand(len(t), tiles)
        steady = (steady >= 2) & (steady < count[:, None] - 2)
        wait = torch.where(steady[:, 1:], data_in[:, 1:] - done[:, :-1], nan)
        work = torch.where(steady, done - data_in, nan)
        last_in = data_in.gather(1, (count - 1).clamp(min=0)[:, None])[:, 0]
        merged = t[:, 128] > 0

        def med(x):
            return float(x.nanmedian()) / 1e3

        rows[name] = {
            "programs": (f"{int(used.sum())}", ""),
            "start spread": (f"{float((t[:, 0] - t0).max()) / 1e3:.2f}", ""),
            "Q ready": (f"{med(t[:, 1] - t0):.2f}", ""),
            "first tile in": (f"{med(data_in[:, 0]):.2f}", ""),
            "tiles per program": (f"{int(count.min())}-{tiles}", ""),
            "wait per tile": (f"{med(wait):.3f} (mean {float(wait.nanmean()) / 1e3:.3f})", ""),
            "compute per tile": (f"{med(work):.3f} (mean {float(work.nanmean()) / 1e3:.3f})", ""),
            "last tile in": (f"{med(last_in):.1f} (max {float(last_in.max()) / 1e3:.1f})", ""),
            "sweep done": (f"{med(t[:, 126] - t0):.1f} (max {float((t[:, 126] - t0).max()) / 1e3:.1f})", ""),
            "split counted": (f"{med(t[:, 127] - t0):.1f} (max {float((t[:, 127] - t0).max()) / 1e3:.1f})", ""),
            "merge done (max)": (f"{float((t[merged, 128] - t0).max()) / 1e3:.1f}" if merged.any() else "-", ""),
        }
        if args.stragglers:  # the slowest programs against the rest: slower to compute, or waiting longer?
            sm = t[:, 129].long()
            per_sm = torch.bincount(sm, minlength=int(sm.max()) + 1)[sm]
            order = torch.argsort(last_in)
            n = len(order)
            for label, idx in (("fastest half", order[: n // 2]), ("slowest 10%", order[-max(1, n // 10):])):
                print(f"  {name} {label}: last tile in {float(last_in[idx].mean()) / 1e3:.1f} us, first tile in "
                      f"{float(data_in[idx, 0].mean()) / 1e3:.2f}, compute/tile {float(work[idx].nanmean()) / 1e3:.3f}, "
                      f"wait/tile {float(wait[idx].nanmean()) / 1e3:.3f}, tiles {float(count[idx].float().mean()):.1f}, "
                      f"programs on its SM {float(per_sm[idx].float().mean()):.2f}", flush=True)
            print(f"  {name} slowest: SMs {sm[order[-12:]].tolist()}", flush=True)
    for key in next(iter(rows.values())):
        print(f"{key:22s}" + "".join(f"{rows[g][key][0]:>20s}" for g in rows), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
