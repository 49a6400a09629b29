"""The Hydra experiments app on the CPU: configs compose and catch mistakes early, and every
experiment overlay runs at a tiny size and writes its results, plot and metadata."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from experiments.app import resolve_device, runners
from experiments.attention import CONF_DIR, attention_choices, build_attention, load_attention

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
TINY = ["cpu_max_seq_len=64", "cpu_max_heads=2", "shape.head_dim=64"]


def cfg_of(*overrides, tmp_path=None):
    with initialize_config_module(config_module="experiments.conf", version_base=None):
        extra = [f"cache_dir={tmp_path / 'cache'}"] if tmp_path is not None else []
        return compose(config_name="config", overrides=[*overrides, *extra])


def run(tmp_path, monkeypatch, *overrides):
    """Compose and run one experiment in tmp_path (what `python -m experiments ...` does), return its rows.
    device=cpu: the same tiny runs on a GPU machine too (the GPU sizes are the benchmarks' job)."""
    cfg = cfg_of("device=cpu", *overrides, tmp_path=tmp_path)
    out = tmp_path / cfg.experiment.name
    out.mkdir(exist_ok=True)
    monkeypatch.chdir(out)
    rows = runners()[cfg.experiment.runner](cfg, resolve_device(cfg.device))
    assert (out / "results.csv").exists() and (out / "results.md").exists() and (out / "results.jsonl").exists()
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows) > 0
    return rows, out


def by(rows, key, value):
    return next(r for r in rows if r[key] == value)


# ---- configs
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_overlay_composes_with_its_runner(experiment):
    cfg = cfg_of(f"experiment={experiment}")
    assert cfg.experiment.name == experiment and cfg.experiment.runner in runners()


@pytest.mark.parametrize("name", attention_choices())
def test_every_attention_config_loads_like_hydra_composes_it(name):
    assert load_attention(name) == cfg_of(f"attention={name}").attention


def test_a_misspelt_option_fails_before_anything_runs():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as e:
        cfg_of("attention=sage2_4b", "attention.smoth_q=false")
    assert "smoth_q" in str(e.value) + str(e.value.__cause__)
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        cfg_of("experiment=smoothing", "experiment.rowz={}")
    with pytest.raises((ConfigCompositionException, ValidationError)):  # typed: a bool option takes a bool
        cfg_of("attention=sage1", "attention.smooth_k=maybe")


def test_a_bad_option_value_fails_with_the_generations_message():
    cfg = cfg_of("attention=sage2_4b", "attention.qk_dtype=int5")
    with pytest.raises(ValueError, match="qk_dtype"):
        build_attention(cfg.attention, "cpu")
    with pytest.raises(ValueError, match="backend"):
        build_attention(cfg_of("attention=sage1", "attention.backend=tpu").attention, "cpu")
    with pytest.raises(ValueError, match=r"backend='cuda' needs an sm_90 \(Hopper\) GPU"):
        build_attention(load_attention("sage2_cuda"), "cpu")
    with pytest.raises(ValueError, match="backend='cuda' exists for sage2 only"):
        build_attention(cfg_of("attention=sage1", "attention.backend=cuda").attention, "cpu")
    with pytest.raises(ValueError, match="unknown attention"):
        load_attention("sage9")


# ---- runs (tiny sizes, CPU emulation)
def test_compare_default(tmp_path, monkeypatch):
    rows, out = run(tmp_path, monkeypatch, "experiment.cpu_seq_lens=[64]", "experiment.rep_ms=1")
    names = {r["attention"] for r in rows}
    assert {"sage1", "sage2_8b", "sage2_4b", "sage3_fp4", "exact"} <= names and "sage2_cuda" not in names
    assert all(r["note"].startswith("emulation") for r in rows if r["attention"].startswith("sage"))
    assert by(rows, "attention", "sage1")["cos_sim"] > 0.999
    assert by(rows, "attention", "sage2_8b")["cos_sim"] > 0.998
    assert (out / "tops.png").exists() and (out / "accuracy.png").exists()


def test_kernel_speed_and_report(tmp_path, monkeypatch):
    from experiments import report

    for n in (32, 64):
        cfg_rows, out = run(tmp_path, monkeypatch, "experiment=kernel_speed", "attention=sage1", *TINY,
                            f"shape.seq_len={n}", "experiment.rep_ms=1")
        os.rename(out, tmp_path / f"job_{n}")
    monkeypatch.chdir(tmp_path)
    report.main([str(tmp_path), "--out", str(tmp_path / "rep")])
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "| sage1 |" in text and "| exact |" in text and (tmp_path / "rep" / "report.png").exists()
    assert text.count("| sage1 |") == 2


@pytest.mark.parametrize("experiment", ["smoothing", "granularity", "pv_dtype", "fp4_format", "fp4_two_level_p"])
def test_accuracy_ablations(tmp_path, monkeypatch, experiment):
    rows, out = run(tmp_path, monkeypatch, f"experiment={experiment}", *TINY, "inputs.kinds=[k_bias,qk_bias]")
    assert rows[0]["setting"] == "as configured" and len(rows) >= 4
    assert all(0 < r["cos_avg"] <= 1 and r["rel_l1_worst"] >= r["rel_l1_avg"] - 1e-12 for r in rows)
    if experiment == "smoothing":  # the paper's ordering: smoothing Q and K beats none
        assert by(rows, "setting", "Q+K")["rel_l1_avg"] < by(rows, "setting", "none")["rel_l1_avg"]
    if experiment == "fp4_format":
        assert by(rows, "setting", "NVFP4")["rel_l1_avg"] < by(rows, "setting", "MXFP4")["rel_l1_avg"]
    assert (out / "accuracy.png").exists()


def test_two_level_accum_long_rows(tmp_path, monkeypatch):
    rows, _ = run(tmp_path, monkeypatch, "experiment=two_level_accum", "cpu_max_seq_len=64", "shape.head_dim=64",
                  "inputs.kinds=[v_bias]")
    assert by(rows, "setting", "two_level")["rel_l1_avg"] < by(rows, "setting", "single")["rel_l1_avg"]


def test_sagebwd_grads(tmp_path, monkeypatch):
    rows, out = run(tmp_path, monkeypatch, "experiment=sagebwd_grads", *TINY, "inputs.kinds=[v_bias]")
    fp16, int8 = by(rows, "setting", "dO V^T in FP16"), by(rows, "setting", "dO V^T in INT8")
    assert fp16["dV_cos_avg"] > 0.99 and fp16["dQ_cos_avg"] > 0.98
    assert int8["dQ_rel_l1_avg"] > fp16["dQ_rel_l1_avg"]  # the paper's ablation
    assert (out / "grads.png").exists()


def test_train_speed(tmp_path, monkeypatch):
    rows, _ = run(tmp_path, monkeypatch, "experiment=train_speed", *TINY, "experiment.seq_lens=[64]",
                  "experiment.causal=[true]")
    assert {r["attention"] for r in rows} == {"sage3_train", "exact"} and all(r["ms"] > 0 for r in rows)


GPT_TINY = ["model=gpt_tiny", "model.context=64", "model.batch_size=4", "model.steps=30", "model.eval_batches=2",
            "model.corpus_mb=0.5", "model.warmup=5"]


@pytest.mark.slow
def test_language_model_experiments(tmp_path, monkeypatch):
    rows, out = run(tmp_path, monkeypatch, "experiment=lm_perplexity", *GPT_TINY,
                    "experiment.attentions=[exact,sage1,sage2_8b,sage3_fp4]")
    exact = by(rows, "attention", "exact")["nll"]
    assert exact < math.log(256) - 1  # it learned something (uniform over bytes is log 256)
    assert all(abs(r["nll"] - exact) < 0.05 * exact for r in rows)
    assert (out / "perplexity.png").exists()
    assert list((tmp_path / "cache").glob("gpt_gpt_tiny_*.pt"))  # trained once, cached
    for exp, steps in (("finetune", 4), ("pretrain", 4)):
        rows, out = run(tmp_path, monkeypatch, f"experiment={exp}", *GPT_TINY, f"experiment.cpu_steps={steps}",
                        "experiment.log_every=1")
        assert {r["attention"] for r in rows} == {"exact", "sage3_train"}
        assert all(math.isfinite(r["final_val_loss"]) for r in rows) and (out / "loss.png").exists()
        assert rows[0]["val_curve"].startswith("0:")
    rows, _ = run(tmp_path, monkeypatch, "experiment=capture", *GPT_TINY)
    assert len(rows) == 2 and rows[0]["causal"] is True
    rows, _ = run(tmp_path, monkeypatch, "experiment=fp4_two_level_p", "inputs=captured_gpt", *GPT_TINY)
    assert "gpt layer" in rows[0]["worst_layer"]


@pytest.mark.slow
def test_minilm_experiments(tmp_path, monkeypatch):
    rows, out = run(tmp_path, monkeypatch, "experiment=embedding_similarity", "experiment.sentences=24",
                    "experiment.attentions=[sage1,sage3_fp4]")
    s1 = by(rows, "attention", "sage1")
    assert s1["emb_cos_mean"] > 0.999 and s1["top1_agreement"] > 0.9 and "served" in s1["served_calls"]
    assert by(rows, "attention", "sage3_fp4")["emb_cos_mean"] > 0.98
    assert (out / "embedding.png").exists()
    rows, _ = run(tmp_path, monkeypatch, "experiment=capture", "inputs=captured_minilm")
    assert len(rows) == 6 and "(8, 12, 256, 32)" == rows[0]["shape"]
    rows, _ = run(tmp_path, monkeypatch, "experiment=smoothing", "inputs=captured_minilm", "inputs.max_layers=1")
    assert rows[0]["worst_layer"] == "minilm layer 0"


def test_python_m_experiments_entry_point(tmp_path):
    """The embedded default through the real command line: Hydra output folder, results, plot, metadata."""
    env = {**os.environ, "SAGE_CACHE_DIR": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-m", "experiments", "device=cpu", "experiment.cpu_seq_lens=[64]", "experiment.rep_ms=1",
                        "experiment.attentions=[sage1,sage3_fp4]", f"hydra.run.dir={tmp_path / 'run'}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "CPU run: every sage generation runs as its PyTorch emulation" in p.stdout
    meta = json.loads((tmp_path / "run" / "metadata.json").read_text())
    assert meta["status"] == "done" and meta["device"] == "cpu" and meta["env"]["torch"]
    for f in ("results.csv", "results.md", "tops.png"):
        assert (tmp_path / "run" / f).exists()
    bad = subprocess.run([sys.executable, "-m", "experiments", "attention.smoth_q=1"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "smoth_q" in bad.stderr
    unread = subprocess.run([sys.executable, "-m", "experiments", "device=cpu", "attention.qk_dtype=int4"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    assert unread.returncode != 0 and "does not read 'attention.qk_dtype': it takes experiment.attentions" in unread.stderr


def test_overrides_an_experiment_does_not_read_are_refused():
    """compare takes its attentions and lengths from experiment.*, the model experiments take no
    attention or shape: an override there would change nothing, so it is refused, naming what to
    override; the groups a runner reads pass."""
    from experiments.app import refuse_unread_overrides

    for runner, item, instead in (("compare", "attention=sage1", "experiment.attentions"),
                                  ("compare", "shape.seq_len=128", "experiment.cpu_seq_lens"),
                                  ("perplexity", "shape.heads=4", "model config"),
                                  ("embedding", "+attention.foo=1", "experiment.attentions")):
        with pytest.raises(ValueError, match=instead):
            refuse_unread_overrides(runner, [item])
    refuse_unread_overrides("compare", ["shape.batch=2", "experiment.attentions=[sage1]", "device=cpu"])
    refuse_unread_overrides("ablation", ["attention.smooth_q=false", "shape.seq_len=128"])


def test_speed_plot_labels_lengths_that_are_not_multiples_of_1024_exactly(tmp_path, monkeypatch):
    from experiments import outputs

    seen = {}
    monkeypatch.setattr(outputs, "bar_groups", lambda path, groups, *a, **k: seen.update(groups))
    monkeypatch.chdir(tmp_path)
    outputs.speed_plot([dict(attention="sage1", seq_len=n, head_dim=128, tops=float(n)) for n in (1024, 1536)],
                       "tops.png", "t")
    assert set(seen) == {"1K D128", "1536 D128"}


def test_reproduce_sh_refuses_an_unknown_section():
    p = subprocess.run(["bash", str(REPO / "experiments" / "reproduce.sh"), "kernel"], capture_output=True, text=True)
    assert p.returncode == 2 and "usage" in p.stderr


def test_sagebwd_variants_builds_each_tree_with_its_patch(tmp_path):
    """experiments.sagebwd_variants: a variant's tree is a copy of this one with its patch applied
    (the register-halving patch of 2026-11-23 here), base is the tree unchanged, and a patch that
    does not apply is named in the error."""
    from pathlib import Path

    from experiments.sagebwd_variants import ROOT, variant_tree

    patch = ROOT / "experiments/results/h100_2026-11-23/sagebwd_v3/backward_halves.patch"
    kernel = Path("sage3/train_kernel.py")
    base = variant_tree("base", tmp_path / "base")
    assert (base / kernel).read_text() == (ROOT / kernel).read_text()
    patched = variant_tree(str(patch), tmp_path / "halves")
    assert "dk_lo" in (patched / kernel).read_text() and "dk_lo" not in (ROOT / kernel).read_text()
    bad = tmp_path / "stale.patch"  # (its context is not in the tree)
    bad.write_text("--- a/sage3/train_kernel.py\n+++ b/sage3/train_kernel.py\n@@ -1,1 +1,1 @@\n-no such line\n+x\n")
    with pytest.raises(RuntimeError, match="stale.patch does not apply"):
        variant_tree(str(bad), tmp_path / "stale")


def test_sage2_cuda_variants_checks_its_variants_and_passes_flags_to_the_build(monkeypatch, capsys):
    """experiments.sage2_cuda_variants: a variant must be 'name:flags'; each variant's build
    (common.build.build_flag_variants, shared with experiments.decode_variants) and timing process
    gets its flags in $SAGE_NVCC_FLAGS (common.build keys its cache on them)."""
    import subprocess

    from experiments import sage2_cuda_variants as sv

    with pytest.raises(SystemExit):
        sv.main(["noflags"])
    assert "a variant is 'name:nvcc flags'" in capsys.readouterr().err
    seen = []

    class FakeBuild:
        returncode = 0

        def __init__(self, cmd, env, **kw):
            seen.append(("build", env["SAGE_NVCC_FLAGS"]))
            self.returncode = 1 if "BAD" in env["SAGE_NVCC_FLAGS"] else 0

        def communicate(self):
            return "", "nvcc error: BAD"

    def fake_run(cmd, env, **kw):
        seen.append(("time", env["SAGE_NVCC_FLAGS"]))
        return subprocess.CompletedProcess(cmd, 0, stdout="RESULT D=128 full N=16k | whole 700 (1.1x)\n", stderr="")

    from common import build

    monkeypatch.setattr(build.subprocess, "Popen", FakeBuild)
    monkeypatch.setattr(sv.subprocess, "run", fake_run)
    sv.main(["a:", "b:-DX=1 -DY=2", "c:-DBAD", "--rounds", "2"])
    assert seen == [("build", ""), ("build", "-DX=1 -DY=2"), ("build", "-DBAD"), ("time", ""), ("time", "-DX=1 -DY=2"),
                    ("time", ""), ("time", "-DX=1 -DY=2")]  # c's build failed: not timed
    out = capsys.readouterr().out.splitlines()
    assert any(ln.startswith("[build c] FAILED") for ln in out) and "nvcc error: BAD" in out
    assert [ln.split()[:2] for ln in out[-4:]] == [["a", "r1"], ["b", "r1"], ["a", "r2"], ["b", "r2"]]


def test_tile_cost_fit_recovers_the_per_tile_and_per_work_tile_costs():
    from experiments.sage2_tile_cost import fit_tile_cost

    points = [(kv, 5.4 + 1.24 * kv) for kv in (16, 32, 64, 128)]
    x, c = fit_tile_cost(points)
    assert math.isclose(x, 5.4, rel_tol=1e-9) and math.isclose(c, 1.24, rel_tol=1e-9)
    with pytest.raises(ValueError, match="two or more KV lengths"):
        fit_tile_cost([(64, 80.0), (64, 81.0)])


def test_tile_cost_trace_summary_takes_medians_without_the_first_work_tile():
    from experiments.sage2_tile_cost import PHASES, summarize_trace

    def line(consumer, tile, base):
        vals = " | ".join(f"{p} {base + i}" for i, p in enumerate(PHASES))
        return f"SAGE2_TRACE consumer {consumer} work_tile {tile} kv_tiles 64 | {vals}"

    text = "\n".join([line(0, 0, 10**6), line(1, 0, 10**6), "unrelated output",
                      line(0, 1, 100), line(1, 1, 200), line(0, 2, 300), line(1, 2, 400), line(0, 3, 500)])
    got = summarize_trace(text)
    assert set(got) == {0, 1}
    assert got[0]["gap"] == 300 and got[0]["epilogue"] == 306  # the median of 100, 300, 500 (+ the phase's index)
    assert got[1]["q"] == 301  # the median of 201 and 401
