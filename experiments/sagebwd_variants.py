"""Time variants of SageBwd's Triton kernels against each other in one run: each variant is this tree
with a patch applied (``git apply``) in a copy of its own, timed in its own process, with FA2 and
cuDNN timed in the same process (ratios within one process, so within one run).

    python -m experiments.sagebwd_variants base experiments/results/h100_2026-11-23/sagebwd_v3/backward_halves.patch

``base`` is the tree as it is. Per variant: the fwd+bwd step at B=4, H=32, D=128, fp16 (``--seqlen``,
non-causal, ``--causal`` too) in ms and x FA2 / x cuDNN, and each SageBwd kernel's device time of one
step (torch.profiler). Offline, before any GPU time: ``python tests/compile_for_hopper.py sagebwd
--regs`` in a variant's tree gives its registers and spills.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(".git", ".old", "outputs", "results", "__pycache__", "*.egg-info")


def variant_tree(variant: str, dest: Path) -> Path:
    """A copy of this tree at ``dest`` with the patch ``variant`` applied (``base``: none)."""
    shutil.copytree(ROOT, dest, ignore=SKIP)
    if variant != "base":
        patch = Path(variant).resolve()
        r = subprocess.run(["git", "apply", str(patch)], cwd=dest, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{variant} does not apply to this tree: {r.stderr.strip()}")
    return dest


def time_one(n: int, causal: bool) -> None:
    """(child) RESULT lines: the step times and SageBwd's kernels of one step."""
    import torch

    from common.inputs import make_qkv
    from common.timing import bench_ms
    from experiments.bench_train import fwd_bwd, impls

    q, k, v = (t.requires_grad_(True) for t in make_qkv(4, 32, n, 128, device="cuda", seed=0))
    do = torch.randn_like(q)
    steps = {name: fwd_bwd(fn, q, k, v, do) for name, fn in impls(causal).items() if not name.endswith("atomic dQ")}
    ms = {name: bench_ms(step) for name, step in steps.items()}
    fa2, cudnn, sage = ms["sdpa_flash (FA2)"], ms["sdpa_cudnn"], ms["sageattn_train"]
    print(f"RESULT causal={causal} N={n}: sage {sage:.2f} ms, {fa2 / sage:.3f}x FA2, {cudnn / sage:.3f}x cuDNN "
          f"(FA2 {fa2:.2f}, cuDNN {cudnn:.2f} ms)", flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        steps["sageattn_train"]()
        torch.cuda.synchronize()
    for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total):
        if "sagebwd" in e.key:
            print(f"RESULT   {e.key[:40]:40s} {e.device_time_total / 1e3:9.3f} ms", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="*", default=["base"], help="'base' or a patch file")
    ap.add_argument("--seqlen", type=int, default=16384)
    ap.add_argument("--causal", action="store_true", help="time causal too")
    ap.add_argument("--time", action="store_true", help=argparse.SUPPRESS)  # child
    args = ap.parse_args(argv)
    if args.time:
        for causal in (False, True) if args.causal else (False,):
            time_one(args.seqlen, causal)
        return
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, variant in enumerate(args.variants):  # every patch applies before any is timed
            variant_tree(variant, Path(tmp) / f"v{i}")
        for i, variant in enumerate(args.variants):
            print(f"[{i + 1}/{len(args.variants)}] {variant}", flush=True)
            tree = Path(tmp) / f"v{i}"
            child = [sys.executable, "-m", "experiments.sagebwd_variants", "--time", "--seqlen", str(args.seqlen)]
            # a Triton cache per variant: a variant may change only what a compile reads from the
            # environment (not the kernel source), which the cache key may not hold
            env = dict(os.environ, PYTHONPATH=str(tree), TRITON_CACHE_DIR=str(tree / ".triton"))
            out = subprocess.run(child + (["--causal"] if args.causal else []), cwd=tree, capture_output=True,
                                 text=True, env=env)
            found = [ln[7:] for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode or not found:
                print(out.stdout[-2000:], out.stderr[-3000:])
            print("\n".join(found), flush=True)  # as it comes, for a run cut short
            lines += [f"{Path(variant).name}: {ln}" if not ln.startswith("  ") else ln for ln in found]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
