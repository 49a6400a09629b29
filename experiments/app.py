"""``python -m experiments``: the Hydra application that regenerates the papers' figures and tables.

    python -m experiments                                   # every generation vs SDPA (GPU), or the CPU emulation
    python -m experiments experiment=smoothing attention=sage2_4b attention.smooth_q=false
    python -m experiments -m experiment=kernel_speed attention=sage1,sage2_8b,sdpa_cudnn shape.seq_len=1024,16384
    python -m experiments.report multirun/<date>/<time>     # one table and one figure for a multirun

Each run writes into its Hydra output folder: results.csv/.jsonl/.md, plots (.png) and metadata.json.
"""

from __future__ import annotations

import os
import time

import hydra
import torch
from omegaconf import DictConfig

from experiments.config import register_configs
from experiments.outputs import write_metadata

register_configs()


def runners():
    from experiments import capture, kernel_runs, lm, sentence_embedding

    return {
        "compare": kernel_runs.run_compare,
        "kernel_speed": kernel_runs.run_kernel_speed,
        "ablation": kernel_runs.run_ablation,
        "grads": kernel_runs.run_grads,
        "train_speed": kernel_runs.run_train_speed,
        "perplexity": lm.run_perplexity,
        "train_curve": lm.run_train_curve,
        "embedding": sentence_embedding.run_embedding_similarity,
        "capture": capture.run_capture,
    }


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu; got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda, but torch sees no CUDA GPU here; use device=auto or device=cpu")
    return device


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    device = resolve_device(cfg.device)
    kind = cfg.experiment.runner
    table = runners()
    if kind not in table:
        raise ValueError(f"experiment runner {kind!r} unknown; choices: {sorted(table)}")
    out = os.getcwd()
    print(f"experiment={cfg.experiment.name} attention={cfg.attention.label} device={device} -> {out}", flush=True)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    write_metadata(cfg, extra={"device": device, "status": "running"})
    table[kind](cfg, device)
    write_metadata(cfg, extra={"device": device, "status": "done", "seconds": round(time.time() - t0, 1)})
    print(f"done in {time.time() - t0:.0f}s; results in {out}", flush=True)
