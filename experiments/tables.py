"""Shared pieces of the accuracy-table scripts: the command line, synthetic "layers", the ablation
loop with its average/worst rows, and the table output."""

from __future__ import annotations

import argparse
import time

import torch

from common.inputs import KINDS, make_qkv
from common.metrics import accuracy
from common.reference import attention_reference


def synthetic_layers(heads, seqlen, dim, device, seed0=100):
    """One (kind, q, k, v, exact output) per synthetic input distribution, standing in for the
    layers of a real model."""
    out = []
    for i, kind in enumerate(KINDS):
        q, k, v = make_qkv(1, heads, seqlen, dim, kind=kind, device=device, seed=seed0 + i)
        out.append((kind, q, k, v, attention_reference(q, k, v)))
    return out


def average_and_worst(accs):
    """accs: [(kind, Accuracy)] -> ((cos, relL1, rmse) averages, (kind, Accuracy) with the lowest cosine)."""
    avg = tuple(sum(getattr(a, f) for _, a in accs) / len(accs) for f in ("cos_sim", "rel_l1", "rmse"))
    return avg, min(accs, key=lambda x: x[1].cos_sim)


def accuracy_args(argv, description: str):
    """The command line every accuracy-table script takes."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def ablation_rows(settings, layers, attend):
    """For each setting (a tuple whose first item is its label): the accuracy of
    ``attend(q, k, v, *setting[1:])`` against the exact output on every layer, as
    (setting, (cos, relL1, rmse) averages, worst kind, worst Accuracy), printing progress."""
    t0 = time.time()
    for n, setting in enumerate(settings):
        accs = [(kind, accuracy(ref, attend(q, k, v, *setting[1:]))) for kind, q, k, v, ref in layers]
        avg, (worst_kind, worst) = average_and_worst(accs)
        print(f"[{n + 1}/{len(settings)}] {setting[0]} ({time.time() - t0:.0f}s)", flush=True)
        yield setting, avg, worst_kind, worst


def emit_table(lines, out):
    """Print the table and, with ``out``, write it there."""
    text = "\n".join(lines)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
