"""SageAttention3 (FP4) accuracy table on synthetic inputs, next to the paper's Table 1 numbers.

    python -m experiments.accuracy_sage3 [--seqlen 1024] [--out experiments/results/sage3_accuracy_synthetic.md]

The emulation (``backend="torch"``) is what is measured; the Triton kernel reproduces it to fp32
summation order (tests). "Layers" are the synthetic distributions of common.inputs; each cell is
their average and the worst one. The paper's numbers are on CogVideoX-2B tensors.
"""

from __future__ import annotations

import sage3
from common.inputs import KINDS
from experiments.tables import (
    ablation_rows,
    accuracy_args,
    emit_table,
    synthetic_layers,
)

PAPER = {  # cos / relL1 / RMSE on CogVideoX (Table 1 and the smoothing ablation of sage3.md)
    "direct FP4 (no smoothing, direct P)": "",
    "smoothing none": "91.56% .3359 .3035",
    "smooth Q only": "98.28% .1157 .1259",
    "smooth K only": "99.12% .0948 .0977",
    "+ smoothing Q,K (direct P)": "93.32% .193 1.103 (direct P)",
    "+ two-level P (SageAttention3, NVFP4)": "99.52% .077 .201",
    "MXFP4, smoothing, two-level P": "98.37% .294 .994",
}

ROWS = [
    ("direct FP4 (no smoothing, direct P)", dict(smooth_q=False, smooth_k=False, two_level_p=False)),
    ("smoothing none", dict(smooth_q=False, smooth_k=False)),
    ("smooth Q only", dict(smooth_k=False)),
    ("smooth K only", dict(smooth_q=False)),
    ("+ smoothing Q,K (direct P)", dict(two_level_p=False)),
    ("+ two-level P (SageAttention3, NVFP4)", {}),
    ("MXFP4, smoothing, two-level P", dict(scale_format="mxfp4")),
    ("MXFP4, smoothing, direct P", dict(scale_format="mxfp4", two_level_p=False)),
]


def main(argv=None):
    args = accuracy_args(argv, "SageAttention3 (FP4) accuracy table on synthetic inputs")
    layers = synthetic_layers(args.heads, args.seqlen, args.dim, args.device, seed0=200)
    lines = [f"SageAttention3 (FP4) accuracy, emulation on {args.device}, N={args.seqlen}, H={args.heads}, D={args.dim}, "
             f"synthetic inputs {', '.join(KINDS)} (average / worst by cosine).", "",
             "| setting | cos % avg | relL1 avg | RMSE avg | cos % worst | relL1 worst | RMSE worst | worst input | paper (CogVideoX) |",
             "|---|---|---|---|---|---|---|---|---|"]

    def attend(q, k, v, opts):
        return sage3.sageattn(q, k, v, backend="torch", **opts)

    for (label, _), avg, wk, worst in ablation_rows(ROWS, layers, attend):
        lines.append(f"| {label} | {avg[0] * 100:.2f} | {avg[1]:.4f} | {avg[2]:.4f} | {worst.cos_sim * 100:.2f} | "
                     f"{worst.rel_l1:.4f} | {worst.rmse:.4f} | {wk} | {PAPER.get(label, '')} |")
    emit_table(lines, args.out)

if __name__ == "__main__":
    main()
