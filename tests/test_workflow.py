"""The Snakemake DAG for real: the whole tiny pipeline, a rerun with nothing to do, the paper's plan, lint,
and configs that must stop before any job with the key named."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO

BIN = Path(sys.executable).parent
COPY = ["Snakefile", "config.yaml", "workflow", "src", "envs", "tests/fixtures"]


def snakemake(cwd, *args, check=True):
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([str(BIN / "snakemake"), "--workflow-profile", "none", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1200)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A copy of the workflow, so runs never touch the checkout's results/."""
    root = tmp_path_factory.mktemp("wf")
    for item in COPY:
        src, dst = REPO / item, root / item
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return root


def planned_jobs(proc) -> dict[str, int]:
    """Job counts from the `Job stats` table of a dry run."""
    stats = proc.stdout.split("Job stats:")[-1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M) if m.group(1) != "total"}


@pytest.mark.slow
def test_tiny_dag_runs_and_second_run_has_nothing_to_do(workdir):
    snakemake(workdir, "--cores", "2", "--configfile", "workflow/configs/tiny.yaml")
    res = workdir / "results" / "tiny"
    for name in ("accuracy.md", "accuracy.csv", "speedup.md", "speedup.csv", "layer_sweep.png"):
        assert (res / "tables" / name).stat().st_size > 0, name
    acc = pd.read_csv(res / "tables" / "accuracy.csv")
    methods = {"zero-shot", "mezo-full", "lora-zo", "dominant", "dominant-lora", "sparse-mezo", "fo-adamw",
               "fo-layer-2", "layer-0", "layer-2", "best layer (dev)"}
    assert set(acc["method"]) == methods
    assert set(acc["task"]) == {"sst2", "squad", "avg"}
    assert acc["mean"].between(0, 100).all()
    sp = pd.read_csv(res / "tables" / "speedup.csv")
    assert (sp.loc[sp["method"] == "mezo-full", "speedup_step_vs_mezo"] == 1).all()
    assert (sp.loc[sp["method"] == "dominant", "layer"] == 1).all()  # the planted outlier layer
    assert (res / "probe" / "tiny-llama" / "activation_profile.png").exists()
    for method in ("mezo-full", "fo-adamw", "fo-layer-2", "sparse-mezo"):  # every run logs both memory peaks
        log = json.loads((res / "train/tiny-llama/sst2" / method / "seed0/log.json").read_text())
        assert 0 < log["inference_peak_mb"] <= log["peak_memory_mb"], method
    again = snakemake(workdir, "-n", "--configfile", "workflow/configs/tiny.yaml")
    assert "Nothing to be done" in again.stdout + again.stderr


def planned(proc) -> set[tuple[str, str]]:
    """(rule, wildcards) of every job a dry run plans."""
    jobs, rule = set(), None
    for line in proc.stdout.splitlines():
        m = re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):", line.strip())
        if m:
            rule = m.group(1)
            jobs.add((rule, ""))
        m = re.match(r"^wildcards: (.*)$", line.strip())
        if m and rule:
            jobs.discard((rule, ""))
            jobs.add((rule, m.group(1)))
    return jobs


@pytest.mark.slow
def test_minimal_reruns(workdir, tmp_path):
    """After the tiny DAG ran: each edit plans exactly the jobs that depend on it."""
    cfg_path = workdir / "workflow/configs/tiny.yaml"
    base = yaml.safe_load(cfg_path.read_text())
    if "Nothing to be done" not in snakemake(workdir, "-n", "--configfile", str(cfg_path)).stdout:
        pytest.skip("needs the finished tiny DAG of test_tiny_dag_runs_and_second_run_has_nothing_to_do")

    def plan(edit=None, touch=None):
        cfg = yaml.safe_load(yaml.safe_dump(base))
        if edit:
            edit(cfg)
        path = tmp_path / "edited.yaml"
        path.write_text(yaml.safe_dump(cfg))
        if touch:  # a real edit: Snakemake compares content, a bare `touch` is not a change
            with open(workdir / touch, "a") as fh:
                fh.write("\n# edited by test_minimal_reruns\n")
        return planned(snakemake(workdir, "-n", "--configfile", str(path)))

    def runs(rule, methods, tasks=("sst2", "squad")):
        return {(rule, f"model=tiny-llama, task={t}, method={m}, seed=0") for t in tasks for m in methods}

    tail = {("tables", ""), ("all", "")}
    # one method's hyperparameter: that method's training and evaluation jobs, then the tables
    lora = plan(lambda c: c["train"]["hyper"]["lora"].update(lr=2e-3))
    assert lora == runs("zo_train", ["lora-zo"]) | runs("evaluate", ["lora-zo"]) | tail
    # a new task: its data, its runs, its zero-shot evaluation, the tables; nothing else
    cb = plan(lambda c: c["tasks"].update(cb={"source": "local:tests/fixtures", "train": 4, "dev": 2, "test": 4}))
    methods = ["mezo-full", "lora-zo", "dominant", "dominant-lora", "sparse-mezo", "fo-adamw", "fo-layer-2",
               "layer-0", "layer-2"]
    assert cb == ({("prepare_data", "task=cb"), ("evaluate_zero_shot", "model=tiny-llama, task=cb")}
                  | runs("zo_train", methods, ["cb"]) | runs("evaluate", methods, ["cb"]) | tail)
    # the table code: only the tables
    assert plan(touch="src/dlzo/tables.py") == tail
    # the ZO code: every training job and what follows it, not the data, model or probe
    zo = plan(touch="src/dlzo/zo.py")
    assert zo == runs("zo_train", methods) | runs("evaluate", methods) | tail


def test_paper_config_plans_the_whole_dag_offline(workdir):
    proc = snakemake(workdir, "-n", "--quiet", "rules")
    jobs = planned_jobs(proc)
    runs = 2 * 9 * 7 + 9 * (32 + 36)  # (models x tasks x baselines, FO and Sparse-MeZO too) + every layer
    assert jobs == {"download_model": 2, "prepare_data": 9, "probe_outliers": 2, "zo_train": runs,
                    "evaluate": runs, "evaluate_zero_shot": 18, "tables": 1, "all": 1}


def test_lint_is_clean(workdir):
    proc = snakemake(workdir, "--lint")
    assert "good condition" in proc.stdout + proc.stderr


def _edit(workdir, name, edit):
    cfg = yaml.safe_load((workdir / "workflow/configs/tiny.yaml").read_text())
    edit(cfg)
    path = workdir / f"bad-{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


BAD_CONFIGS = {
    "unknown-key": (lambda c: c.update(stepz=3), "stepz"),
    "wrong-type": (lambda c: c["train"].update(steps="many"), "steps"),
    "layer-past-depth": (lambda c: c.update(sweep_layers=[0, 7]), "sweep_layers"),
    "pin-past-depth": (lambda c: c.update(dominant_layer={"tiny-llama": 4}), "dominant_layer.tiny-llama"),
    "unknown-task": (lambda c: c["tasks"].update(mnli={"source": "hub"}), "mnli"),
    "unknown-method": (lambda c: c.update(methods=["zero-shot", "adam"]), "adam"),
    "lr-zero": (lambda c: c["train"]["hyper"]["layer"].update(lr=0), "lr"),
    "missing-source": (lambda c: c["models"]["tiny-llama"].pop("source"), "source"),
    "bad-source": (lambda c: c["models"]["tiny-llama"].update(source="s3://bucket/model"), "source"),
    "pin-unknown-model": (lambda c: c.update(dominant_layer={"gpt5": 1}), "gpt5"),
    "fo-layer-past-depth": (lambda c: c["methods"].append("fo-layer-4"), "fo-layer-4"),
    "fo-without-hyper": (lambda c: c["train"]["hyper"].pop("fo"), "train.hyper.fo"),
    "sparsity-one": (lambda c: c["train"]["hyper"]["sparse"].update(sparsity=1.0), "sparsity"),
    "fo-epochs-and-steps": (lambda c: c["train"]["hyper"]["fo"].update(steps=3), "fo"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_stops_before_any_job_naming_the_key(workdir, case):
    edit, key = BAD_CONFIGS[case]
    path = _edit(workdir, case, edit)
    proc = snakemake(workdir, "-n", "--configfile", str(path), check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert key in out, out[-2000:]
    assert "Job stats" not in out
