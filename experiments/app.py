"""``python -m experiments``: the Hydra application that regenerates the papers' figures and tables.

    python -m experiments                                   # every generation vs SDPA (GPU), or the CPU emulation
    python -m experiments experiment=smoothing attention=sage2_4b attention.smooth_q=false
    python -m experiments -m experiment=kernel_speed attention=sage1,sage2_8b,sdpa_cudnn shape.seq_len=1024,16384  # (GPU)
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


# What a runner does not read, and what it reads instead: an override of these would change nothing,
# so it is refused (a silently ignored ablation is worse than an error).
_NOT_READ = {
    "compare": {"attention": "experiment.attentions", "shape.seq_len": "experiment.cpu_seq_lens / gpu_seq_lens",
                "shape.head_dim": "experiment.cpu_head_dims / gpu_head_dims", "shape.causal": "experiment.causal"},
    "perplexity": {"attention": "experiment.attentions", "shape": "the model config (model=...)"},
    "train_curve": {"attention": "experiment.attentions", "shape": "the model config (model=...)"},
    "embedding": {"attention": "experiment.attentions", "shape": "the model's own shapes"},
}


def refuse_unread_overrides(runner: str, overrides) -> None:
    """Raise ``ValueError`` for a command-line override of a config group (or key) that ``runner``
    does not read, naming what it reads instead."""
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        for unread, instead in _NOT_READ.get(runner, {}).items():
            if key == unread or key.startswith(unread + "."):
                raise ValueError(f"this experiment (runner {runner!r}) does not read {key!r}: it takes {instead}; "
                                 "override that instead")


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
    from hydra.core.hydra_config import HydraConfig

    refuse_unread_overrides(kind, HydraConfig.get().overrides.task)
    out = os.getcwd()
    att = "" if "attention" in _NOT_READ.get(kind, {}) else f" attention={cfg.attention.label}"
    print(f"experiment={cfg.experiment.name}{att} device={device} -> {out}", flush=True)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    write_metadata(cfg, extra={"device": device, "status": "running"})
    table[kind](cfg, device)
    write_metadata(cfg, extra={"device": device, "status": "done", "seconds": round(time.time() - t0, 1)})
    print(f"done in {time.time() - t0:.0f}s; results in {out}", flush=True)
