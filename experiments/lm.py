"""A GPT-style language model trained by the experiments themselves, for the papers' end-to-end
tables: perplexity with each generation swapped in (like their WikiText tables), and SageBwd
fine-tuning and pretraining curves against exact attention.

Corpus (no download, on every machine): the Python standard library's own sources, byte-level
(vocabulary 256), files split into train/validation by a hash of their path. The fine-tuning
corpus is a shifted distribution that is also always there: torch's own Python sources.
Perplexity is per byte (and bits per byte).
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
import time
import zlib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from experiments.attention import build_attention, load_attention
from experiments.outputs import Progress, bar_groups, line_plot, write_results

CORPORA = ("stdlib", "torch")


def corpus_files(name: str) -> list[Path]:
    if name == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)
    if name == "torch":
        return sorted(Path(torch.__file__).parent.rglob("*.py"))
    raise ValueError(f"corpus must be one of {CORPORA}, got {name!r}")


def load_corpus(name: str, split: str, megabytes: float) -> torch.Tensor:
    """Bytes of the corpus' files in ``split`` (train: 19 of 20 files by path hash; val: the rest),
    up to ``megabytes``, as a uint8 tensor."""
    root = Path(sysconfig.get_paths()["stdlib"]) if name == "stdlib" else Path(torch.__file__).parent
    want, chunks, total = int(megabytes * 2**20), [], 0
    for p in corpus_files(name):
        is_val = zlib.crc32(str(p.relative_to(root)).encode()) % 20 == 0
        if is_val != (split == "val"):
            continue
        try:
            b = p.read_bytes()
        except OSError:
            continue
        chunks.append(b)
        total += len(b)
        if total >= want:
            break
    data = b"".join(chunks)[:want]
    if len(data) < 2**16:
        raise RuntimeError(f"corpus {name!r} ({split}) has only {len(data)} bytes here")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class Block(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, attend):
        B, N, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, N, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        y = attend(q, k, v).transpose(1, 2).reshape(B, N, D)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Pre-LayerNorm GPT with learned positions and a byte vocabulary. ``attention`` is any
    ``fn(q, k, v, is_causal)`` on [B, H, N, D] (set it to swap generations in)."""

    def __init__(self, n_layer, d_model, n_head, context):
        super().__init__()
        self.context = context
        self.tok, self.pos = nn.Embedding(256, d_model), nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.attention = None
        self.recorder = None   # capture: called with (layer index, q, k, v)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx, targets=None):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for i, blk in enumerate(self.blocks):
            x = blk(x, lambda q, k, v, i=i: self._attend(i, q, k, v))
        logits = self.ln_f(x) @ self.tok.weight.t()
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, 256), targets.reshape(-1))

    def _attend(self, i, q, k, v):
        if self.recorder is not None:
            self.recorder(i, q, k, v)
        if self.attention is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        dt = q.dtype
        if dt == torch.float32:  # the quantized kernels take fp16/bf16: a CPU fp32 model attends in bf16
            q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
        # autocast off: it would turn the exact reference's (and the emulations') fp32 matmuls into bf16 ones
        with torch.autocast(device_type=q.device.type, enabled=False):
            return self.attention(q, k, v, True).to(dt)


def model_config(cfg, device):
    """cfg.model, or on a CPU (with cpu_max_seq_len set) the CPU-sized gpt_tiny when cfg.model is bigger."""
    mc = cfg.model
    if device == "cpu" and cfg.cpu_max_seq_len and mc.context > cfg.cpu_max_seq_len:
        from experiments.attention import CONF_DIR
        from experiments.config import ModelConfig

        raw = OmegaConf.load(CONF_DIR / "model" / "gpt_tiny.yaml")
        raw.pop("defaults")
        print(f"(CPU: model {mc.name} (context {mc.context}) replaced by gpt_tiny; set cpu_max_seq_len=0 to keep it)",
              flush=True)
        mc = OmegaConf.merge(OmegaConf.structured(ModelConfig), raw)
    return mc


def make_model(mc, device) -> GPT:
    return GPT(mc.n_layer, mc.d_model, mc.n_head, mc.context).to(device)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters()) - model.pos.weight.numel()


def batches(data: torch.Tensor, batch: int, context: int, gen: torch.Generator, device):
    while True:
        ix = torch.randint(len(data) - context - 1, (batch,), generator=gen)
        x = torch.stack([data[i:i + context + 1] for i in ix.tolist()]).long()
        yield x[:, :-1].to(device, non_blocking=True), x[:, 1:].to(device, non_blocking=True)


def autocast(mc, device):
    if mc.dtype == "float32" or device == "cpu":
        return torch.autocast(device_type="cpu", enabled=False)
    return torch.autocast(device_type="cuda", dtype=getattr(torch, mc.dtype))


def train(model, mc, data, device, *, steps, lr, warmup, seed=0, log_every=10, what="train", val=None,
          eval_every=0):
    """AdamW with linear warm-up and cosine decay. Returns (steps, losses, val points)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=device == "cuda")
    gen = torch.Generator().manual_seed(seed)
    it = batches(data, mc.batch_size, mc.context, gen, device)
    xs, ys, vals = [], [], []
    if val is not None and eval_every:  # step 0: what the attention changes before any training
        vals.append((0, evaluate(model, mc, val, device)))
    model.train()
    t0 = time.time()
    for step in range(1, steps + 1):
        f = step / warmup if step <= warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for g in opt.param_groups:
            g["lr"] = lr * max(f, 0.02)
        x, y = next(it)
        with autocast(mc, device):
            loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"{what}: loss is {loss.item()} at step {step}")
        if step % log_every == 0 or step == steps:
            xs.append(step)
            ys.append(loss.item())
            print(f"  {what} step {step}/{steps}: loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
        if val is not None and eval_every and (step % eval_every == 0 or step == steps):
            vals.append((step, evaluate(model, mc, val, device)))
            model.train()
    return xs, ys, vals


@torch.no_grad()
def evaluate(model, mc, data, device, batches_=None, seed=1234) -> float:
    """Mean cross-entropy (nats per byte) on fixed windows of ``data``."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    it = batches(data, mc.batch_size, mc.context, gen, device)
    losses = []
    for _ in range(batches_ or mc.eval_batches):
        x, y = next(it)
        with autocast(mc, device):
            losses.append(model(x, y).item())
    return sum(losses) / len(losses)


def model_key(mc) -> str:
    return hashlib.sha1(OmegaConf.to_yaml(mc).encode()).hexdigest()[:10]


def pretrained(cfg, device) -> GPT:
    """The GPT of cfg.model trained on the stdlib corpus with exact (SDPA) attention; cached in
    cfg.cache_dir by its config, trained on the spot when missing."""
    mc = model_config(cfg, device)
    path = Path(cfg.cache_dir) / f"gpt_{mc.name}_{model_key(mc)}_{device}.pt"
    model = make_model(mc, device)
    if path.exists():
        model.load_state_dict(torch.load(path, map_location=device))
        print(f"loaded the trained {mc.name} from {path}", flush=True)
        return model
    print(f"training {mc.name} ({n_params(model) / 1e6:.1f}M parameters, context {mc.context}) on the stdlib "
          f"sources for {mc.steps} steps (cached afterwards in {path})", flush=True)
    torch.manual_seed(cfg.seed)
    train(model, mc, load_corpus("stdlib", "train", mc.corpus_mb), device, steps=mc.steps, lr=mc.lr,
          warmup=mc.warmup, seed=cfg.seed, log_every=max(1, mc.steps // 20), what=f"pretrain {mc.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def run_perplexity(cfg, device):
    """Validation perplexity of the trained GPT with each attention swapped in."""
    mc = model_config(cfg, device)
    model = pretrained(cfg, device)
    val = load_corpus("stdlib", "val", max(1.0, mc.corpus_mb / 10))
    atts = []
    for name in cfg.experiment.attentions:
        try:
            atts.append(build_attention(load_attention(name), device))
        except ValueError as e:
            print(f"(skipping {name}: {e})", flush=True)
    rows, prog = [], Progress(len(atts), "perplexity")
    for att in atts:
        model.attention = att.fn
        try:
            nll = evaluate(model, mc, val, device)
            err = ""
        except Exception as e:  # noqa: BLE001 - report, go on with the others
            nll, err = math.nan, f"{type(e).__name__}: {str(e)[:120]}"
        rows.append(dict(attention=att.label, note=att.note, ppl_per_byte=math.exp(nll), bits_per_byte=nll / math.log(2),
                         nll=nll, error=err))
        prog.step(f"{att.label}: perplexity {math.exp(nll):.5f} per byte")
    model.attention = None
    base = next((r["nll"] for r in rows if r["attention"] == "exact"), None)
    for r in rows:
        r["delta_ppl_vs_exact"] = math.exp(r["nll"]) - math.exp(base) if base is not None else math.nan
    write_results(rows, title=f"perplexity per byte of {mc.name} ({n_params(model) / 1e6:.1f}M params, context "
                  f"{mc.context}, {mc.eval_batches}x{mc.batch_size} validation windows of the stdlib sources) on {device}")
    bar_groups("perplexity.png", {r["attention"]: {"perplexity per byte": r["ppl_per_byte"]} for r in rows},
               "perplexity per byte (lower is better)", f"{mc.name}: attention swapped in at evaluation")
    return rows


def run_train_curve(cfg, device):
    """Loss curves of training with each attention: fine-tuning the trained GPT on torch's sources
    (from_pretrained) or pretraining from scratch on the stdlib's, with identical data order."""
    e, mc = cfg.experiment, model_config(cfg, device)
    steps = e.steps if device == "cuda" else min(e.steps, e.cpu_steps)
    corpus = "torch" if e.from_pretrained else "stdlib"
    data = load_corpus(corpus, "train", mc.corpus_mb)
    val = load_corpus(corpus, "val", max(1.0, mc.corpus_mb / 10))
    init = pretrained(cfg, device).state_dict() if e.from_pretrained else None
    curves, rows = {}, []
    for name in e.attentions:
        att = build_attention(load_attention(name), device)
        if not att.differentiable:
            raise ValueError(f"experiment.attentions: {name!r} cannot be trained through (not differentiable)")
        torch.manual_seed(cfg.seed + 1)
        model = make_model(mc, device)
        if init is not None:
            model.load_state_dict(init)
        model.attention = att.fn if att.label != "exact" else None  # exact: torch SDPA (flash on GPU)
        print(f"{e.name}: {att.label}, {steps} steps on the {corpus} sources", flush=True)
        t0 = time.time()
        xs, ys, vals = train(model, mc, data, device, steps=steps, lr=e.lr, warmup=max(1, steps // 10), seed=cfg.seed,
                             log_every=e.log_every, what=f"{e.name} {att.label}", val=val,
                             eval_every=max(1, steps // 4))
        model.attention = None
        curves[f"{att.label} (train)"] = (xs, _smooth(ys))
        curves[f"{att.label} (val)"] = ([s for s, _ in vals], [v for _, v in vals])
        rows.append(dict(attention=att.label, steps=steps, final_train_loss=sum(ys[-5:]) / len(ys[-5:]),
                         final_val_loss=vals[-1][1], seconds=round(time.time() - t0, 1),
                         val_curve=" ".join(f"{s}:{v:.4f}" for s, v in vals)))
    write_results(rows, title=f"{e.name} ({'from the trained ' + mc.name if e.from_pretrained else 'from scratch'}, "
                  f"{corpus} sources) on {device}: loss in nats per byte")
    gaps = {}  # each run minus the first attention's (exact in the overlays), step by step
    ref_label = rows[0]["attention"]
    for kind in ("train", "val"):
        rx, ry = curves[f"{ref_label} ({kind})"]
        for r in rows[1:]:
            xs, ys = curves[f"{r['attention']} ({kind})"]
            gaps[f"{r['attention']} - {ref_label} ({kind})"] = (xs, [a - b for a, b in zip(ys, ry)])
    with open("curves.csv", "w") as f:  # the curves themselves, for re-plotting
        f.write("attention,kind,step,loss\n")
        for label, (xs, ys) in curves.items():
            name, kind = label.rsplit(" (", 1)
            f.writelines(f"{name},{kind.rstrip(')')},{x},{y:.6f}\n" for x, y in zip(xs, ys))
    line_plot("loss.png", curves, "step", "loss (nats per byte)", f"{e.name}: {mc.name}, "
              f"{'fine-tuning on torch sources' if e.from_pretrained else 'pretraining on stdlib sources'}",
              gaps=gaps if len(rows) > 1 else None)
    return rows


def _smooth(ys, w=5):
    return [sum(ys[max(0, i - w + 1):i + 1]) / len(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]
