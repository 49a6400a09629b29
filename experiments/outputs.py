"""What every run writes into its Hydra output folder: results (CSV and JSONL), a Markdown table,
plots, and the environment it ran in (metadata.json)."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def environment() -> dict:
    """GPU, driver, CUDA, torch, triton, Python and the git commit this run used."""
    import triton

    env = {"time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": platform.python_version(),
           "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
           "cpu": platform.processor() or platform.machine(), "cpu_count": torch.get_num_threads()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001 - no nvidia-smi: leave it out
            pass
    else:
        env["gpu"] = None
    if os.environ.get("SAGE_GIT_COMMIT"):  # said by the caller: a copy whose .git (if any) is not what runs
        env["git_commit"] = os.environ["SAGE_GIT_COMMIT"]
        return env
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
        env["git_dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                               capture_output=True, text=True, timeout=10).stdout.strip())
    except Exception:  # noqa: BLE001 - not a git checkout (e.g. an installed wheel)
        env["git_commit"] = None
    return env


def _fmt(x):
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return f"{x:.6g}" if abs(x) < 1e5 else f"{x:.0f}"
    return str(x)


def markdown_table(rows: list[dict], keys: list[str] | None = None) -> str:
    keys = keys or list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def write_results(rows: list[dict], out_dir=".", name="results", title: str = "", keys=None) -> None:
    """results.csv, results.jsonl and results.md (the table, printed too)."""
    out = Path(out_dir)
    keys = keys or list(dict.fromkeys(k for r in rows for k in r))
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(out / f"{name}.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r, default=str) + "\n")
    table = (f"{title}\n\n" if title else "") + markdown_table(rows, keys)
    (out / f"{name}.md").write_text(table + "\n")
    print("\n" + table, flush=True)


def write_metadata(cfg, out_dir=".", extra: dict | None = None) -> dict:
    from omegaconf import OmegaConf

    meta = {"env": environment(), "config": OmegaConf.to_container(cfg, resolve=True), **(extra or {})}
    Path(out_dir, "metadata.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
    return meta


def pyplot():
    """matplotlib.pyplot with a file backend, or None (and a message) when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        print("(matplotlib is not installed: no plot; pip install matplotlib)", flush=True)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_groups(path, groups: dict, ylabel: str, title: str, xlabel: str = "") -> None:
    """Grouped bars: groups = {x tick label: {series: value}} (the papers' speed-figure style)."""
    plt = pyplot()
    if plt is None or not groups:
        return
    series = list(dict.fromkeys(s for g in groups.values() for s in g))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(groups) * max(1, len(series)) ** 0.5 + 2), 4))
    w = 0.8 / max(1, len(series))
    for i, s in enumerate(series):
        xs = [j + i * w for j in range(len(groups))]
        ys = [g.get(s, float("nan")) for g in groups.values()]
        bars = ax.bar(xs, ys, w, label=s)
        if len(groups) * len(series) <= 24:
            ax.bar_label(bars, fmt="%.0f" if max((y for y in ys if y == y), default=0) > 20 else "%.3g", fontsize=6)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(groups))], list(groups), fontsize=8,
                  rotation=20 if max(len(k) for k in groups) > 8 else 0)
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_by_case(rows: list[dict], out_dir, name: str, title: str, columns: list[str], ylabel: str,
                   plot_title: str, plotted=lambda row: True) -> None:
    """Print ``rows`` as a markdown table of ``columns`` and, with ``out_dir``, write them
    (``name``.csv/.md/.jsonl) and plot their ``x_best_sdpa`` grouped by ``case`` (the rows
    ``plotted`` keeps) in ``name``.png."""
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in columns) + " |")
    if not out_dir:
        return
    os.makedirs(out_dir, exist_ok=True)
    write_results(rows, out_dir, name=name, title=title)
    groups = {}
    for r in rows:
        if plotted(r):
            groups.setdefault(r["case"], {})[r["impl"]] = r["x_best_sdpa"]
    bar_groups(os.path.join(out_dir, f"{name}.png"), groups, ylabel, plot_title)


def speed_plot(rows, path, title: str) -> None:
    """TOPS bars by sequence length (and head dim, causal) per attention, like the papers' speed
    figures; the generations first, then the baselines. Rows without a number are left out."""
    groups = {}
    for r in rows:
        if not isinstance(r.get("tops"), (int, float)) or math.isnan(r["tops"]):
            continue
        n = r.get("seq_len", "")
        key = f"{n // 1024}K" if isinstance(n, int) and n >= 1024 and n % 1024 == 0 else str(n)  # (1536: "1536")
        if "head_dim" in r:
            key += f" D{r['head_dim']}"
        if str(r.get("causal")) == "True":
            key += " causal"
        groups.setdefault(key, {})[r["attention"]] = r["tops"]
    names = sorted({a for g in groups.values() for a in g}, key=lambda a: (str(a).startswith(("sdpa", "exact")), a))
    groups = {k: {a: g[a] for a in names if a in g} for k, g in groups.items()}
    bar_groups(path, groups, "TOPS", title, "sequence length")


def line_plot(path, curves: dict, xlabel: str, ylabel: str, title: str, gaps: dict | None = None) -> None:
    """curves = {label: (xs, ys)} on one plot (loss curves), its y-range cut to the later 80% of the
    steps so that the start does not flatten the differences; with ``gaps`` ({label: (xs, ys)}, e.g.
    a run's loss minus the reference's) a second panel shows those."""
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2 if gaps else 1, figsize=(11 if gaps else 6, 4), squeeze=False)
    ax = axes[0][0]
    late = []
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=label, lw=1.2, marker="o" if len(xs) < 8 else None, ms=3)
        if xs:
            cut = xs[0] + 0.2 * (xs[-1] - xs[0])
            late += [y for x, y in zip(xs, ys) if x >= cut]
    if late:
        lo, hi = min(late), max(late)
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.15 * (hi - lo + 1e-9))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if gaps:
        gx = axes[0][1]
        for label, (xs, ys) in gaps.items():
            gx.plot(xs, ys, label=label, lw=1.2, marker="o" if len(xs) < 8 else None, ms=3)
        gx.axhline(0.0, color="k", lw=0.8)
        gx.set_xlabel(xlabel)
        gx.set_ylabel(f"difference in {ylabel}")
        gx.set_title("each run minus the reference (same steps, same data order)", fontsize=9)
        gx.legend(fontsize=8)
        gx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class Progress:
    """[i/n] label (elapsed) lines for long runs."""

    def __init__(self, total: int, what: str = ""):
        self.total, self.what, self.i, self.t0 = total, what, 0, time.time()

    def step(self, label: str) -> None:
        self.i += 1
        print(f"[{self.i}/{self.total}] {self.what}{': ' if self.what else ''}{label} ({time.time() - self.t0:.0f}s)",
              flush=True)
