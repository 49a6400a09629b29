"""Q, K, V captured from real models' attention layers, for the accuracy tables (``inputs=captured_gpt``
or ``inputs=captured_minilm``): the GPT the experiments train (causal, head_dim 64) and
all-MiniLM-L6-v2 on stdlib text (bidirectional, head_dim 32). ``experiment=capture`` writes the file
and a per-layer summary; the accuracy experiments make it on the spot when it is missing."""

from __future__ import annotations

from pathlib import Path

import torch

from experiments.outputs import write_results


def captured_path(cfg, device) -> Path:
    if cfg.inputs.path:  # (relative to where the command ran, not the run's own Hydra folder)
        from hydra.utils import to_absolute_path

        return Path(to_absolute_path(cfg.inputs.path))
    if cfg.inputs.model == "gpt":
        from experiments.lm import model_config, model_key

        mc = model_config(cfg, device)
        return Path(cfg.cache_dir) / f"captured_gpt_{mc.name}_{model_key(mc)}_{device}.pt"
    if cfg.inputs.model == "minilm":
        return Path(cfg.cache_dir) / "captured_minilm.pt"
    raise ValueError(f"inputs.model must be 'gpt' or 'minilm', got {cfg.inputs.model!r}")


def capture_gpt(cfg, device) -> list[dict]:
    """One validation batch through the trained GPT (exact attention), recording every layer."""
    from experiments.lm import autocast, batches, load_corpus, model_config, pretrained

    mc = model_config(cfg, device)
    model = pretrained(cfg, device).eval()
    val = load_corpus("stdlib", "val", max(1.0, mc.corpus_mb / 10))
    x, _ = next(batches(val, 2, mc.context, torch.Generator().manual_seed(7), device))
    layers = []
    model.recorder = lambda i, q, k, v: layers.append(dict(name=f"gpt layer {i}", q=q.detach().cpu(),
                                                           k=k.detach().cpu(), v=v.detach().cpu(), causal=True))
    with torch.no_grad(), autocast(mc, device):
        model(x)
    model.recorder = None
    for d in layers:  # the kernels take fp16/bf16; a CPU fp32 model attends in bf16 (as lm.GPT does)
        for t in ("q", "k", "v"):
            if d[t].dtype == torch.float32:
                d[t] = d[t].to(torch.bfloat16)
    return layers


def capture_minilm(cfg, device) -> list[dict]:
    """Eight 256-token passages of stdlib docstrings through all-MiniLM-L6-v2, recording every layer."""
    from common.sdpa_patch import patch_sdpa
    from experiments.sentence_embedding import (
        encode,
        load_model,
        long_passages,
        model_dir,
    )

    model = load_model(model_dir(cfg.minilm_dir), device)
    layers = []

    def record(q, k, v, is_causal, sm_scale):
        layers.append(dict(name=f"minilm layer {len(layers)}", q=q.detach().cpu(), k=k.detach().cpu(),
                           v=v.detach().cpu(), causal=bool(is_causal)))
        return torch.nn.functional.softmax((q.float() @ k.float().transpose(-1, -2)) *
                                           (sm_scale or q.shape[-1] ** -0.5), -1).to(v.dtype) @ v

    with patch_sdpa(record, name="capture"):
        encode(model, long_passages(8), 8)
    return layers


def capture(cfg, device) -> Path:
    path = captured_path(cfg, device)
    layers = capture_gpt(cfg, device) if cfg.inputs.model == "gpt" else capture_minilm(cfg, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(layers, path)
    print(f"captured {len(layers)} layers of {cfg.inputs.model} into {path}", flush=True)
    return path


def load_captured(cfg, device):
    from experiments.kernel_runs import Layer

    path = captured_path(cfg, device)
    if not path.exists():
        print(f"(no captured tensors at {path}: capturing them now)", flush=True)
        capture(cfg, device)
    layers = torch.load(path)
    if cfg.inputs.max_layers:
        layers = layers[:cfg.inputs.max_layers]
    return [Layer(d["name"], d["q"].to(device), d["k"].to(device), d["v"].to(device), d["causal"]) for d in layers]


def run_capture(cfg, device):
    path = capture(cfg, device)
    rows = []
    for d in torch.load(path):
        k = d["k"].float()
        rows.append(dict(layer=d["name"], shape=str(tuple(d["q"].shape)), dtype=str(d["q"].dtype).replace("torch.", ""),
                         causal=d["causal"], q_absmax=float(d["q"].float().abs().max()), k_absmax=float(k.abs().max()),
                         v_absmax=float(d["v"].float().abs().max()),
                         # how much of K is a per-channel bias shared by all tokens (what K smoothing removes)
                         k_channel_bias_share=float(k.mean(2).pow(2).sum() / k.pow(2).mean(2).sum())))
    write_results(rows, title=f"captured Q, K, V of {cfg.inputs.model} ({path})")
    return rows
