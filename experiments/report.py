"""Aggregate a run or a multirun folder into one Markdown table and one figure.

    python -m experiments.report multirun/kernel_speed/2026-11-22_09-00-00     # -> report.md, report.png there
    python -m experiments.report outputs/ --out /tmp/report

Every results.csv under the folder is read; each row gets the run's folder name and its
experiment (from metadata.json). Speed results (a ``tops`` column) are plotted as TOPS bars by
sequence length per attention, like the papers' speed figures; accuracy results as relative L1
bars per setting.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

from experiments.outputs import bar_groups, markdown_table, speed_plot


def _num(x):
    try:
        f = float(x)
    except (TypeError, ValueError):
        return x
    return int(f) if f.is_integer() and "." not in str(x) and "e" not in str(x).lower() else f


def collect(root: Path) -> list[dict]:
    rows = []
    def natural(p):  # multirun job folders 0_, 1_, ..., 10_ in job order
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p.relative_to(root)))]

    for csv_path in sorted(root.rglob("results.csv"), key=natural):
        run = csv_path.parent
        meta = {}
        if (run / "metadata.json").exists():
            meta = json.loads((run / "metadata.json").read_text())
        exp = meta.get("config", {}).get("experiment", {}).get("name", "")
        gpu = (meta.get("env") or {}).get("gpu") or "cpu"
        with open(csv_path) as f:
            for r in csv.DictReader(f):
                rows.append({"run": str(run.relative_to(root)) or ".", "experiment": exp, "gpu": gpu,
                             **{k: _num(v) for k, v in r.items()}})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="a run's output folder or a multirun folder")
    ap.add_argument("--out", default=None, help="where to write report.md/.png (default: the folder)")
    args = ap.parse_args(argv)
    root = Path(args.folder)
    rows = collect(root)
    if not rows:
        raise SystemExit(f"no results.csv under {root}")
    out = Path(args.out or root)
    out.mkdir(parents=True, exist_ok=True)
    # a speed multirun: one row per (attention, shape) across jobs, with ratios to cuDNN / FA2 of the same shape
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ("error",)]
    if "tops" in keys:
        shape_keys = [k for k in ("batch", "heads", "heads_kv", "head_dim", "causal", "seq_len", "dtype", "layout")
                      if k in keys]
        for base in ("sdpa_cudnn", "sdpa_flash", "exact"):
            ref = {}
            for r in rows:
                if r.get("attention") == base:
                    ref.setdefault(tuple(r.get(k) for k in shape_keys), r["tops"])
            for r in rows:
                r[f"x_{base}"] = r["tops"] / ref[tuple(r.get(k) for k in shape_keys)] \
                    if tuple(r.get(k) for k in shape_keys) in ref and isinstance(r.get("tops"), float) else ""
        # de-duplicate the baselines that every job of a multirun timed again: keep their first row
        seen, kept = set(), []
        for r in rows:
            key = (r.get("attention"),) + tuple(r.get(k) for k in shape_keys)
            if key in seen and str(r.get("attention", "")).startswith(("sdpa", "exact")):
                continue
            seen.add(key)
            kept.append(r)
        rows = kept
        keys = ["attention", "note", *shape_keys, "tops", "x_sdpa_cudnn", "x_sdpa_flash", "x_exact", "cos_sim", "rel_l1",
                "gpu", "run"]
        keys = [k for k in keys if any(r.get(k, "") != "" for r in rows)]
        speed_plot(rows, out / "report.png", f"TOPS, {rows[0]['gpu']}")
    elif "rel_l1_avg" in keys:
        bar_groups(out / "report.png", {f"{r['setting']} [{r['run']}]"[:40]: {"relL1 avg": r["rel_l1_avg"],
                                                                             "relL1 worst": r["rel_l1_worst"]} for r in rows},
                   "relative L1 vs exact (lower is better)", str(root))
    text = f"# Report: {root}\n\n{len(rows)} rows from {len({r['run'] for r in rows})} runs\n\n" + markdown_table(rows, keys)
    (out / "report.md").write_text(text + "\n")
    print(text)
    print(f"\nwrote {out / 'report.md'}" + (f" and {out / 'report.png'}" if (out / "report.png").exists() else ""))


if __name__ == "__main__":
    main()
