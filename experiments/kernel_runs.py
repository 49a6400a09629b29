"""The attention-level experiments: speed against SDPA, the accuracy ablations of the papers'
tables, SageBwd's gradient table and its training speed. Each takes the composed Hydra config and
writes its results into the current (Hydra output) folder."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from common.inputs import make_qkv
from common.metrics import accuracy
from common.reference import attention_reference
from common.timing import attention_flops, bench_ms, tops
from experiments.attention import build_attention, load_attention, options
from experiments.outputs import Progress, bar_groups, speed_plot, write_results
from experiments.tables import average_and_worst

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Layer:
    """One set of attention inputs (a synthetic distribution or a captured model layer), HND."""
    name: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    causal: bool


def effective_shape(cfg, device: str) -> dict:
    """cfg.shape as a dict, cut to the CPU limits of the config on a CPU (saying so)."""
    s = OmegaConf.to_container(cfg.shape)
    if device == "cpu" and cfg.cpu_max_seq_len:
        cut = dict(batch=min(s["batch"], cfg.cpu_max_batch), heads=min(s["heads"], cfg.cpu_max_heads),
                   seq_len=min(s["seq_len"], cfg.cpu_max_seq_len))
        if s["seq_len_k"]:  # long key rows (two_level_accum) keep more keys than queries
            cut["seq_len_k"] = min(s["seq_len_k"], cfg.cpu_max_seq_len * 4)
        if s["heads_kv"]:
            cut["heads_kv"] = max(1, cut["heads"] // max(1, s["heads"] // s["heads_kv"]))
        if any(cut[k] != s[k] for k in cut if s[k] is not None):
            print(f"(CPU: shape reduced from {s} to {cut}; set cpu_max_seq_len=0 for the full size)", flush=True)
        s.update(cut)
    return s


def draw(shape: dict, device: str, kind="k_bias", seq_len=None, head_dim=None, seed=0):
    n = seq_len or shape["seq_len"]
    nk = shape["seq_len_k"] if (shape["seq_len_k"] and seq_len is None) else n
    return make_qkv(shape["batch"], shape["heads"], n, head_dim or shape["head_dim"], kind=kind,
                    heads_kv=shape["heads_kv"], seqlen_k=nk, dtype=DTYPES[shape["dtype"]], device=device, seed=seed)


def layers(cfg, device: str) -> list[Layer]:
    """The inputs the accuracy experiments average over: synthetic distributions or captured layers."""
    if cfg.inputs.source == "synthetic":
        shape = effective_shape(cfg, device)
        return [Layer(kind, *draw(shape, device, kind=kind, seed=100 + i), shape["causal"])
                for i, kind in enumerate(cfg.inputs.kinds)]
    if cfg.inputs.source == "captured":
        from experiments.capture import load_captured

        return load_captured(cfg, device)
    raise ValueError(f"inputs.source must be 'synthetic' or 'captured', got {cfg.inputs.source!r}")


def first_queries_accuracy(fn, q, k, v, causal, n_check):
    """Accuracy of fn against exact attention on the first n_check queries (all keys they see)."""
    n = min(n_check, q.shape[2])
    nk = k.shape[2]
    if causal and q.shape[2] == nk:
        qs, ks, vs = q[:, :, :n], k[:, :, :n], v[:, :, :n]
    else:
        qs, ks, vs = q[:, :, :n], k, v
    return accuracy(attention_reference(qs, ks, vs, is_causal=causal), fn(q, k, v, causal)[:, :, :n])


def _speed_row(att, q, k, v, causal, flops, rep_ms, n_check, device):
    try:
        ms = bench_ms(lambda: att.fn(q, k, v, causal), rep_ms=rep_ms)
        acc = first_queries_accuracy(att.fn, q, k, v, causal, n_check)
        return dict(ms=ms, tops=tops(flops, ms), cos_sim=acc.cos_sim, rel_l1=acc.rel_l1, rmse=acc.rmse)
    except Exception as e:  # noqa: BLE001 - one failing attention (OOM, unsupported) must not end the run
        print(f"  {att.label}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
        return dict(ms=math.nan, tops=math.nan, cos_sim=math.nan, rel_l1=math.nan, rmse=math.nan,
                    error=f"{type(e).__name__}: {str(e)[:120]}")
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()


def available(names, device):
    """Build each named attention; the ones that cannot run here are reported and left out."""
    out = []
    for name in names:
        try:
            out.append(build_attention(load_attention(name), device))
        except ValueError as e:
            print(f"(skipping {name}: {e})", flush=True)
    return out


def _with_ratios(rows, keys):
    """Add x_<baseline> columns: each row's TOPS over the baseline's in the same shape."""
    for base in ("sdpa_cudnn", "sdpa_flash", "exact"):
        ref = {tuple(r[k] for k in keys): r["tops"] for r in rows if r["attention"] == base}
        if ref:
            for r in rows:
                r[f"x_{base}"] = r["tops"] / ref.get(tuple(r[k] for k in keys), math.nan)
    return rows


def run_compare(cfg, device):
    """Every available generation against SDPA: speed and accuracy at a few shapes."""
    e = cfg.experiment
    gpu = device == "cuda"
    atts = available(list(e.attentions) + ([] if gpu or "exact" in e.attentions else ["exact"]), device)
    seq_lens, dims = (e.gpu_seq_lens, e.gpu_head_dims) if gpu else (e.cpu_seq_lens, e.cpu_head_dims)
    shape = effective_shape(cfg, device) if not gpu else OmegaConf.to_container(cfg.shape)
    if not gpu:
        print("CPU run: every sage generation runs as its PyTorch emulation; times are of the emulation on "
              f"{torch.get_num_threads()} CPU threads, not kernel speed.", flush=True)
    rows, prog = [], Progress(len(seq_lens) * len(dims) * len(e.causal) * len(atts), "compare")
    for d in dims:
        for causal in e.causal:
            for n in seq_lens:
                q, k, v = draw(shape, device, seq_len=n, head_dim=d)
                flops = attention_flops(q.shape[0], q.shape[1], n, n, d, causal)
                for att in atts:
                    r = _speed_row(att, q, k, v, causal, flops, e.rep_ms, e.check_queries, device)
                    emulated = not gpu and att.label != "exact"
                    rows.append(dict(attention=att.label, note=att.note or ("emulation (CPU)" if emulated else ""),
                                     head_dim=d, causal=causal, seq_len=n, **r))
                    prog.step(f"D={d} causal={causal} N={n} {att.label}: {r['tops']:.3g} TOPS, cos {r['cos_sim']:.5f}")
    _with_ratios(rows, ("head_dim", "causal", "seq_len"))
    where = torch.cuda.get_device_name() if gpu else "CPU (emulation backends)"
    write_results(rows, title=f"compare on {where}, B={shape['batch']} H={shape['heads']} {shape['dtype']}, "
                  "whole call incl. quantization; accuracy vs exact fp32 on the first queries")
    speed_plot(rows, "tops.png", f"TOPS on {where}" + ("" if gpu else " (emulation: not kernel speed)"))
    bar_groups("accuracy.png", {r["attention"]: {"relL1": r["rel_l1"]} for r in rows if r["seq_len"] == seq_lens[-1]},
               "relative L1 vs exact (lower is better)", f"accuracy at N={seq_lens[-1]}")
    return rows


def run_kernel_speed(cfg, device):
    """One attention (cfg.attention) and its baselines at cfg.shape (or experiment.seq_lens), same run."""
    e = cfg.experiment
    shape = effective_shape(cfg, device) if device == "cpu" else OmegaConf.to_container(cfg.shape)
    atts = [build_attention(cfg.attention, device)] + available([b for b in e.baselines if b != cfg.attention.label],
                                                                device)
    if device == "cpu" and not any(a.label == "exact" for a in atts):
        atts += available(["exact"], device)
    seq_lens = list(e.seq_lens) or [shape["seq_len"]]
    if device == "cpu":
        seq_lens = [min(n, cfg.cpu_max_seq_len or n) for n in seq_lens]
    rows, prog = [], Progress(len(seq_lens) * len(atts), "kernel_speed")
    for n in seq_lens:
        q, k, v = draw(shape, device, seq_len=n)
        if shape["layout"] == "NHD":
            q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))  # NHD memory, HND view
        flops = attention_flops(q.shape[0], q.shape[1], n, n, shape["head_dim"], shape["causal"])
        for att in atts:
            r = _speed_row(att, q, k, v, shape["causal"], flops, e.rep_ms, e.check_queries, device)
            rows.append(dict(attention=att.label, note=att.note, batch=q.shape[0], heads=q.shape[1],
                             heads_kv=k.shape[1], head_dim=shape["head_dim"], causal=shape["causal"], seq_len=n,
                             dtype=shape["dtype"], layout=shape["layout"], **r))
            prog.step(f"N={n} {att.label}: {r['tops']:.3g} TOPS")
    _with_ratios(rows, ("seq_len",))
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU (emulation)"
    write_results(rows, title=f"kernel_speed on {where}: {cfg.attention.label} vs {', '.join(e.baselines)}")
    speed_plot(rows, "tops.png", f"{cfg.attention.label}, TOPS on {where}")
    return rows


def ablation_settings(cfg):
    """(label, attention config) per table row: the configured attention, then each row's overrides
    on top of it. A row that sets an option this attention does not have is left out, saying so."""
    have = set(options(cfg.attention)) | {k for k in cfg.attention if cfg.attention[k] is None}
    out = [("as configured", cfg.attention)]
    for label, over in cfg.experiment.rows.items():
        missing = sorted(set(over) - have)
        if missing:
            print(f"(row {label!r} sets {missing}, which attention {cfg.attention.label!r} does not have: left out)")
            continue
        out.append((label, OmegaConf.merge(cfg.attention, over)))
    return out


def run_ablation(cfg, device):
    """A paper's accuracy table: each row's cosine similarity, relative L1 and RMSE against exact
    attention, averaged over the input layers, and the worst layer."""
    settings = ablation_settings(cfg)
    built = [(label, build_attention(c, device), options(c)) for label, c in settings]
    ins = layers(cfg, device)
    refs = [attention_reference(x.q, x.k, x.v, is_causal=x.causal) for x in ins]
    rows, prog = [], Progress(len(built), cfg.experiment.name)
    for label, att, opts in built:
        accs = [(x.name, accuracy(ref, att.fn(x.q, x.k, x.v, x.causal))) for x, ref in zip(ins, refs)]
        avg, (wname, worst) = average_and_worst(accs)
        rows.append(dict(setting=label, options=" ".join(f"{k}={v}" for k, v in opts.items()),
                         cos_avg=avg[0], rel_l1_avg=avg[1], rmse_avg=avg[2],
                         cos_worst=worst.cos_sim, rel_l1_worst=worst.rel_l1, rmse_worst=worst.rmse,
                         worst_layer=wname, paper=cfg.experiment.paper_numbers.get(label, "")))
        prog.step(f"{label}: cos {avg[0]:.5f} relL1 {avg[1]:.4f} (worst {wname} {worst.cos_sim:.4f})")
    src = (f"{cfg.inputs.source} inputs ({', '.join(x.name for x in ins[:8])}{', ...' if len(ins) > 8 else ''}), "
           f"{tuple(ins[0].q.shape)}" + (" causal" if ins[0].causal else ""))
    write_results(rows, title=f"{cfg.experiment.name} ({cfg.experiment.paper}): {cfg.attention.label} on {device}, {src}; "
                  "average over the layers / worst layer; the paper's numbers are on its models' tensors")
    bar_groups("accuracy.png", {r["setting"]: {"relL1 avg": r["rel_l1_avg"], "relL1 worst": r["rel_l1_worst"]} for r in rows},
               "relative L1 vs exact (lower is better)", f"{cfg.experiment.name}: {cfg.attention.label}, {cfg.inputs.source}")
    return rows


def _grads(fn, q, k, v, do, causal):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    o = fn(q, k, v, causal)
    o.backward(do)
    return o.detach(), q.grad, k.grad, v.grad


def run_grads(cfg, device):
    """SageBwd's gradient table: O, dQ, dK, dV against an fp32 reference's autograd gradients."""
    settings = ablation_settings(cfg)
    built = [(label, build_attention(c, device)) for label, c in settings]
    for label, att in built:
        if not att.differentiable:
            raise ValueError(f"experiment=sagebwd_grads needs a differentiable attention (sage3_train, sdpa_*, exact); "
                             f"got {att.label!r}")
    ins = layers(cfg, device)
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    refs = []
    for x in ins:
        do = torch.randn(x.q.shape, generator=g).to(device=device, dtype=x.q.dtype)
        ref_fn = lambda a, b, c, causal: attention_reference(a, b, c, is_causal=causal)  # noqa: E731
        dt = torch.float64 if device == "cpu" else torch.float32
        refs.append((do, _grads(ref_fn, x.q.to(dt), x.k.to(dt), x.v.to(dt), do.to(dt), x.causal)))
    rows, prog = [], Progress(len(built), cfg.experiment.name)
    for label, att in built:
        got = [_grads(att.fn, x.q, x.k, x.v, do, x.causal) for x, (do, _) in zip(ins, refs)]
        row = dict(setting=label)
        for i, t in enumerate(("O", "dQ", "dK", "dV")):
            accs = [(x.name, accuracy(ref[i], gt[i])) for x, (_, ref), gt in zip(ins, refs, got)]
            avg, (_, worst) = average_and_worst(accs)
            row.update({f"{t}_cos_avg": avg[0], f"{t}_rel_l1_avg": avg[1],
                        f"{t}_cos_worst": worst.cos_sim})
        row["paper"] = cfg.experiment.paper_numbers.get(label, "")
        rows.append(row)
        prog.step(f"{label}: dQ cos {row['dQ_cos_avg']:.5f} dK {row['dK_cos_avg']:.5f} dV {row['dV_cos_avg']:.5f}")
    write_results(rows, title=f"gradient accuracy, {cfg.attention.label} on {device}, {cfg.inputs.source} inputs "
                  f"{tuple(ins[0].q.shape)}, vs float32/64 reference autograd (average over layers, worst cosine)")
    bar_groups("grads.png", {r["setting"]: {t: r[f"{t}_rel_l1_avg"] for t in ("O", "dQ", "dK", "dV")} for r in rows},
               "relative L1 vs exact (lower is better)", f"gradients: {cfg.attention.label}")
    return rows


def run_train_speed(cfg, device):
    """Forward + backward time of cfg.attention against SDPA (FA2, cuDNN) in the same run."""
    e = cfg.experiment
    shape = effective_shape(cfg, device) if device == "cpu" else OmegaConf.to_container(cfg.shape)
    att = build_attention(cfg.attention, device)
    if not att.differentiable:
        raise ValueError(f"experiment=train_speed needs a differentiable attention; got {att.label!r}")
    others = available(["sdpa_flash", "sdpa_cudnn"] if device == "cuda" else ["exact"], device)
    seq_lens = [min(n, cfg.cpu_max_seq_len) if device == "cpu" and cfg.cpu_max_seq_len else n for n in e.seq_lens]
    seq_lens = list(dict.fromkeys(seq_lens))
    rows, prog = [], Progress(len(seq_lens) * len(e.causal) * (1 + len(others)), "train_speed")
    for causal in e.causal:
        for n in seq_lens:
            q, k, v = (t.requires_grad_(True) for t in draw(shape, device, seq_len=n))
            do = torch.randn_like(q)
            flops = 3.5 * attention_flops(q.shape[0], q.shape[1], n, n, shape["head_dim"], causal)
            for a in [att] + others:
                def step(a=a):
                    q.grad = k.grad = v.grad = None
                    a.fn(q, k, v, causal).backward(do)
                try:
                    ms = bench_ms(step, rep_ms=200)
                except Exception as ex:  # noqa: BLE001
                    print(f"  {a.label}: FAILED {type(ex).__name__}: {str(ex)[:200]}", flush=True)
                    ms = math.nan
                rows.append(dict(attention=a.label, note=a.note, head_dim=shape["head_dim"], causal=causal, seq_len=n,
                                 ms=ms, tops=tops(flops, ms)))
                prog.step(f"causal={causal} N={n} {a.label}: {tops(flops, ms):.3g} TOPS fwd+bwd")
            if device == "cuda":
                torch.cuda.empty_cache()
    _with_ratios(rows, ("causal", "seq_len"))
    write_results(rows, title=f"forward+backward speed on {device}, B={shape['batch']} H={shape['heads']} "
                  "(TOPS counts 3.5x the forward's FLOPs, FlashAttention's convention)")
    speed_plot(rows, "tops.png", f"forward+backward TOPS, {cfg.attention.label}")
    return rows
