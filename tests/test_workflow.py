"""The Snakemake DAG for real: the whole tiny pipeline (locally and through the SLURM executor plugin with
stand-in SLURM commands), provenance in every result, a rerun with nothing to do, minimal reruns, the
paper's plan, lint, and configs that must stop before any job with the key named."""
import collections
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

import slurm_standin
from conftest import REPO

BIN = Path(sys.executable).parent
COPY = ["Snakefile", "config.yaml", "workflow", "src", "envs", "profiles", "tests/fixtures"]
GIT = ["git", "-c", "user.name=dlzo-test", "-c", "user.email=test@dlzo.invalid"]


def snakemake(cwd, *args, check=True, profile="none", env=None):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           **(env or {})}
    proc = subprocess.run([str(BIN / "snakemake"), "--workflow-profile", profile, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1200)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def copy_workflow(root: Path) -> Path:
    """A copy of the workflow, committed to a fresh git repository so results record a commit."""
    for item in COPY:
        src, dst = REPO / item, root / item
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    if shutil.which("git"):
        for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "test copy"]):
            subprocess.run([*GIT, *cmd], cwd=root, check=True, capture_output=True)
    return root


def head_commit(root: Path) -> str | None:
    if not shutil.which("git"):
        return None
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A copy of the workflow, so runs never touch the checkout's results/."""
    return copy_workflow(tmp_path_factory.mktemp("wf"))


def check_provenance(path: Path, commit: str | None, torch_stage: bool, **config) -> dict:
    """``path``'s provenance names the config that made it (``config`` items must match), packages, the
    git commit, device, dtype and wall time."""
    doc = json.loads(path.read_text())
    prov = doc["provenance"]
    assert isinstance(prov["config"], dict) and prov["config"], path
    for key, value in config.items():
        assert prov["config"][key] == value, (path, key, prov["config"][key], value)
    assert prov["packages"]["torch"] and prov["packages"]["pandas"], path
    if commit is not None:
        assert prov["git_commit"] == commit, (path, prov["git_commit"], commit)
    assert prov["device"] == "cpu", path
    assert prov["dtype"] == ("float32" if torch_stage else None), path
    assert isinstance(prov["wall_s"], float) and prov["wall_s"] >= 0, path
    assert "slurm_job_id" in prov and prov["time"] and prov["host"], path
    return prov


def planned_jobs(proc) -> dict[str, int]:
    """Job counts from the `Job stats` table of a dry run."""
    stats = proc.stdout.split("Job stats:")[-1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M) if m.group(1) != "total"}


@pytest.mark.slow
def test_tiny_dag_runs_and_second_run_has_nothing_to_do(workdir):
    snakemake(workdir, "--cores", "2", "--configfile", "workflow/configs/tiny.yaml")
    res = workdir / "results" / "tiny"
    for name in ("accuracy.md", "accuracy.csv", "accuracy.tex", "accuracy.html", "speedup.md", "speedup.csv",
                 "speedup.tex", "speedup.html", "paper_comparison.md", "paper_comparison.csv", "layer_sweep.png",
                 "loss_curves.png", "memory_accuracy.png", "provenance.json", "hyper_selection.md",
                 "hyper_selection.csv", "layer_ranking.md", "layer_ranking.csv", "layer_correlations.csv",
                 "layer_predictors_tiny-llama.png"):
        assert (res / "tables" / name).stat().st_size > 0, name
    assert "Benchmark cross-check: every run agrees" in (res / "tables" / "speedup.md").read_text()
    acc = pd.read_csv(res / "tables" / "accuracy.csv")
    methods = {"zero-shot", "calibrated-zero-shot", "mezo-full", "lora-zo", "dominant", "dominant-lora", "sparse-mezo",
               "fo-adamw", "fo-layer-2", "layer-0", "layer-2", "best layer (dev)"}
    assert set(acc["method"]) == methods
    assert set(acc.loc[acc["method"] == "calibrated-zero-shot", "task"]) == {"sst2"}  # multiple choice only
    # the layer family's lr grid: every point trained with seed 0, the dev pick trained seed 1 of dominant too
    grid = pd.read_csv(res / "tables" / "hyper_selection.csv")
    assert len(grid) == 2 * 3 * 2 and grid.groupby(["task", "method"])["chosen"].sum().eq(1).all()
    for task in ("sst2", "squad"):
        sel = json.loads((res / f"train/tiny-llama/{task}/dominant/hyper_selection.json").read_text())
        assert sel["chosen"]["best_dev_loss"] == min(p["best_dev_loss"] for p in sel["grid"])
        seed1 = json.loads((res / f"train/tiny-llama/{task}/dominant/seed1/log.json").read_text())
        assert seed1["hyper"]["lr"] == sel["chosen"]["lr"] and seed1["seed"] == 1
        assert json.loads((res / f"eval/tiny-llama/{task}/dominant/seed0.json").read_text())["run"].endswith(
            f"dominant{sel['chosen']['tag']}/seed0")  # seed 0 is the grid's chosen run itself
        assert json.loads((res / f"eval/tiny-llama/{task}/dominant/seed1.json").read_text())["run"].endswith(
            "dominant/seed1")
    assert cell_n(acc, "dominant", "sst2") == 2 and cell_n(acc, "mezo-full", "sst2") == 1
    cal = json.loads((res / "eval/tiny-llama/sst2/calibrated-zero-shot.json").read_text())
    assert cal["metrics"]["acc_uncalibrated"] == json.loads((res / "eval/tiny-llama/sst2/zero-shot.json").read_text())["value"]
    grads = json.loads((res / "probe" / "tiny-llama" / "gradnorm.json").read_text())
    assert grads["probe_layer"] == 1 and len(grads["layers"]) == 4 and grads["batches"] == 2
    assert (res / "probe" / "tiny-llama" / "layer_predictors.png").stat().st_size > 0
    assert set(acc["task"]) == {"sst2", "squad", "avg"}
    assert acc["mean"].between(0, 100).all()
    sp = pd.read_csv(res / "tables" / "speedup.csv")
    assert (sp.loc[sp["method"] == "mezo-full", "speedup_step_vs_mezo"] == 1).all()
    assert (sp.loc[sp["method"] == "dominant", "layer"] == 1).all()  # the planted outlier layer
    assert (res / "probe" / "tiny-llama" / "activation_profile.png").exists()
    sens = json.loads((res / "probe" / "tiny-llama" / "sensitivity.json").read_text())
    assert sens["probe_layer"] == 1 and sens["k"] == 2 and len(sens["layers"]) == 4
    assert (res / "probe" / "tiny-llama" / "sensitivity_profile.png").stat().st_size > 0
    for method in ("mezo-full", "fo-adamw", "fo-layer-2", "sparse-mezo"):  # every run logs both memory peaks
        log = json.loads((res / "train/tiny-llama/sst2" / method / "seed0/log.json").read_text())
        assert 0 < log["inference_peak_mb"] <= log["peak_memory_mb"], method
    again = snakemake(workdir, "-n", "--configfile", "workflow/configs/tiny.yaml")
    assert "Nothing to be done" in again.stdout + again.stderr
    # the report: one page with every table and figure, each with its caption
    snakemake(workdir, "--configfile", "workflow/configs/tiny.yaml", "--report", "results/report.html")
    page = (workdir / "results" / "report.html").read_text()
    for name in ("accuracy.html", "paper_comparison.html", "speedup.html", "layer_sweep.png", "loss_curves.png",
                 "activation_profile.png", "layer_predictors.png", "layer_predictors_tiny-llama.png"):
        assert f'"name": "{name}"' in page, name
    assert "Protocol: sst2: local files tests/fixtures" in page and "Config: 3 ZO steps of batch 2" in page

    # provenance: every result file names the config that made it, packages, commit, device, dtype, wall time
    commit, cfg = head_commit(workdir), yaml.safe_load((workdir / "workflow/configs/tiny.yaml").read_text())
    check_provenance(res / "models/tiny-llama/dlzo_model.json", commit, False, source="tiny:llama:4:1", num_layers=4)
    for task in ("sst2", "squad"):
        check_provenance(res / f"data/{task}/meta.json", commit, False, task=task, seed=0,
                         train=cfg["tasks"][task]["train"])
        check_provenance(res / f"eval/tiny-llama/{task}/zero-shot.json", commit, True, task=task, method="zero-shot")
        check_provenance(res / f"eval/tiny-llama/{task}/calibrated-zero-shot.json", commit, True, task=task,
                         method="calibrated-zero-shot", calibrate=True) if task == "sst2" else None
        for method, family in (("mezo-full", "full"), ("lora-zo", "lora"), ("dominant", "layer"),
                               ("dominant-lora", "layer-lora"), ("layer-0", "layer"), ("layer-2", "layer")):
            hyper, folder = cfg["train"]["hyper"][family], method
            if isinstance(hyper["lr"], list):  # a grid: the run that stands for the method is the dev pick
                sel = json.loads((res / f"train/tiny-llama/{task}/{method}/hyper_selection.json").read_text())
                hyper, folder = {"lr": sel["chosen"]["lr"], "eps": hyper["eps"]}, method + sel["chosen"]["tag"]
            check_provenance(res / f"train/tiny-llama/{task}/{folder}/seed0/log.json", commit, True, task=task,
                             method=method, seed=0, lr=hyper["lr"], eps=hyper["eps"], steps=cfg["train"]["steps"])
            check_provenance(res / f"eval/tiny-llama/{task}/{method}/seed0.json", commit, True, task=task,
                             method=method, seed=0, batch_size=cfg["evaluate"]["batch_size"])
    check_provenance(res / "probe/tiny-llama/probe.json", commit, True, n_seqs=cfg["probe"]["n_seqs"],
                     abs_threshold=cfg["probe"]["abs_threshold"])
    tables = check_provenance(res / "tables/provenance.json", commit, False)
    inputs = json.loads((res / "tables/provenance.json").read_text())["inputs_sha256"]
    hashed = [*tables["config"]["evals"], *tables["config"]["train_logs"], *tables["config"]["probes"],
              *tables["config"]["benchmarks"], *tables["config"]["selections"], *tables["config"]["sensitivity"],
              *tables["config"]["gradnorm"], *tables["config"]["data_meta"], tables["config"]["paper"]]
    assert set(inputs) == set(hashed) and all(len(h) == 64 for h in inputs.values())
    # 2 tasks x (zero-shot + 9 trained methods + dominant's seed 1) + SST-2's calibrated-zero-shot
    assert len(tables["config"]["evals"]) == 2 * 11 + 1
    assert len(tables["config"]["selections"]) == 2 * 3  # dominant, layer-0, layer-2 on both tasks


def cell_n(acc, method, task) -> int:
    return int(acc[(acc["method"] == method) & (acc["task"] == task)]["n_seeds"].iloc[0])


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

    def plan(edit=None, touch=None, what=None):
        cfg = yaml.safe_load(yaml.safe_dump(base))
        if edit:
            edit(cfg)
        path = tmp_path / "edited.yaml"
        path.write_text(yaml.safe_dump(cfg))
        if touch:  # a real edit: Snakemake compares content, a bare `touch` is not a change
            with open(workdir / touch, "a") as fh:
                fh.write("\n# edited by test_minimal_reruns\n")
        jobs = planned(snakemake(workdir, "-n", "--configfile", str(path)))
        print(f"\nrerun after editing {touch or what}: {len(jobs)} jobs")  # pytest -s shows the lists
        for rule, wildcards in sorted(jobs):
            print(f"  {rule} {wildcards}")
        return jobs

    def runs(rule, methods, tasks=("sst2", "squad"), seed=0):
        return {(rule, f"model=tiny-llama, task={t}, method={m}, seed={seed}") for t in tasks for m in methods}

    tail = {("tables", ""), ("all", "")}
    layer_family = ["dominant", "layer-0", "layer-2"]  # the layer family has an lr grid in tiny.yaml
    lrs = base["train"]["hyper"]["layer"]["lr"]

    def grid(tasks=("sst2", "squad")):
        """Everything of the layer family's grid: every point's run (seed 0), the selections, dominant's seed 1
        (at the chosen point) and the evaluations."""
        out = {("zo_train", f"model=tiny-llama, task={t}, method={m}@lr{lr:g}_eps0.001, seed=0")
               for t in tasks for m in layer_family for lr in lrs}
        out |= {("select_hyper", f"model=tiny-llama, task={t}, method={m}") for t in tasks for m in layer_family}
        out |= runs("zo_train", ["dominant"], tasks, seed=1) | runs("evaluate", ["dominant"], tasks, seed=1)
        return out | runs("evaluate", layer_family, tasks)

    # one method's hyperparameter: that method's training and evaluation jobs, then the tables
    lora = plan(lambda c: c["train"]["hyper"]["lora"].update(lr=2e-3), what="train.hyper.lora.lr")
    assert lora == runs("zo_train", ["lora-zo"]) | runs("evaluate", ["lora-zo"]) | tail
    # a new task: its data, its runs, its zero-shot evaluation, the tables; nothing else
    cb = plan(lambda c: c["tasks"].update(cb={"source": "local:tests/fixtures", "train": 4, "dev": 2, "test": 4}),
              what="tasks (adding cb)")
    plain = ["mezo-full", "lora-zo", "dominant-lora", "sparse-mezo", "fo-adamw", "fo-layer-2"]
    assert cb == ({("prepare_data", "task=cb"), ("evaluate_zero_shot", "model=tiny-llama, task=cb"),
                   ("evaluate_calibrated", "model=tiny-llama, task=cb")}
                  | runs("zo_train", plain, ["cb"]) | runs("evaluate", plain, ["cb"]) | grid(["cb"]) | tail)
    # a grid point added: each grid method's new point, its selection, and what the selection feeds (the
    # choice may move: dominant's seed 1 and every grid method's evaluation); nothing else
    wider = plan(lambda c: c["train"]["hyper"]["layer"].update(lr=[*lrs, 1e-1]), what="train.hyper.layer.lr")
    assert wider == ({("zo_train", f"model=tiny-llama, task={t}, method={m}@lr0.1_eps0.001, seed=0")
                      for t in ("sst2", "squad") for m in layer_family}
                     | {j for j in grid() if not (j[0] == "zo_train" and "@" in j[1])} | tail)
    # the sweep's own block (`train.hyper.sweep`, one point): the sweep's layers leave the layer grid and train
    # once, in layer-<i>/seed0, at that lr; dominant keeps the grid, so nothing of it reruns
    sweep = plan(lambda c: c["train"]["hyper"].update(sweep={"lr": 0.05, "eps": 1e-3}), what="train.hyper.sweep")
    assert sweep == runs("zo_train", ["layer-0", "layer-2"]) | runs("evaluate", ["layer-0", "layer-2"]) | tail
    # a sensitivity setting: only that profile and the gradient norms' figure, which draws it (before the
    # code edits below, which stay in place)
    assert plan(lambda c: c["probe"]["sensitivity"].update(k=3)) == {
        ("probe_sensitivity", "model=tiny-llama"), ("probe_gradnorm", "model=tiny-llama")} | tail
    assert plan(lambda c: c["probe"]["gradnorm"].update(batches=3)) == {("probe_gradnorm", "model=tiny-llama")} | tail
    # the table code: only the tables
    assert plan(touch="src/dlzo/tables.py") == tail
    assert plan(touch="src/dlzo/figures.py") == tail
    # the ZO code: every training job and what follows it, and the sensitivity profile (it draws ZO's z);
    # not the data, model or probe
    zo = plan(touch="src/dlzo/zo.py")
    assert zo == runs("zo_train", plain) | runs("evaluate", plain) | tail | grid() | {
        ("probe_sensitivity", "model=tiny-llama"), ("probe_gradnorm", "model=tiny-llama")}
    # an edit known to change no result (the comments above): `--touch` marks what it planned current without
    # running it (the README's advice); the files keep their bytes, and nothing is left to do
    before = (workdir / "results/tiny/tables/accuracy.csv").read_bytes()
    snakemake(workdir, "--touch", "--cores", "1", "--configfile", str(cfg_path))
    assert "Nothing to be done" in snakemake(workdir, "-n", "--configfile", str(cfg_path)).stdout
    assert (workdir / "results/tiny/tables/accuracy.csv").read_bytes() == before


GPU_RULES = {"probe_outliers", "probe_sensitivity", "probe_gradnorm", "zo_train", "evaluate", "evaluate_zero_shot",
             "evaluate_calibrated"}
LIGHT_RULES = {"download_model", "prepare_data", "select_hyper", "tables", "all"}  # localrules: on the head node


def test_slurm_profile_and_resources_scale_with_the_model():
    prof = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    assert prof["executor"] == "slurm" and prof["software-deployment-method"] == "conda"
    assert prof["rerun-incomplete"] is True and prof["retries"] >= 1 and prof["latency-wait"] >= 30
    assert prof["default-resources"]["mem_mb"] > 0 and prof["default-resources"]["runtime"] > 0
    local = re.search(r"^localrules:\n((?:\s+\w+,?\n)+)", (REPO / "Snakefile").read_text(), re.M)
    assert set(re.findall(r"\w+", local.group(1))) == LIGHT_RULES
    # the paper's 7B/8B models ask for a GPU and more memory and time than the CPU demo and tiny configs
    paper = yaml.safe_load((REPO / "config.yaml").read_text())["models"]
    small = [m["resources"] for c in ("demo", "tiny")
             for m in yaml.safe_load((REPO / f"workflow/configs/{c}.yaml").read_text())["models"].values()]
    for name, model in paper.items():
        res = model["resources"]
        assert res["gpu"] >= 1, name
        assert all(res["mem_mb"] > s["mem_mb"] and res["runtime"] > s["runtime"] for s in small), name


def slurm_config(workdir: Path) -> dict:
    """tiny.yaml with two models of different sizes asking for different GPU resources; one task, the
    zero-shot and dominant methods: every rule of the DAG, the checkpoint included, in 12 jobs."""
    cfg = yaml.safe_load((workdir / "workflow/configs/tiny.yaml").read_text())
    cfg["models"] = {
        "tiny-llama": dict(cfg["models"]["tiny-llama"], resources={"gpu": 1, "mem_mb": 2000, "runtime": 10}),
        "tiny-llama-big": {"source": "tiny:llama:6:2", "num_layers": 6,
                           "resources": {"gpu": 2, "mem_mb": 16000, "runtime": 120}},
    }
    cfg["tasks"] = {"sst2": cfg["tasks"]["sst2"]}
    cfg.update(methods=["zero-shot", "dominant"], sweep_layers=[], method_seeds={})
    cfg["train"]["hyper"]["layer"]["lr"] = 1.0e-3  # no grid: one training job per model
    return cfg


@pytest.mark.slow
def test_tiny_dag_through_the_slurm_executor_plugin(tmp_path_factory):
    """The real snakemake-executor-plugin-slurm submits the GPU jobs to stand-in sbatch/srun/sacct/sacctmgr
    (tests/slurm_standin.py), which run them here and record their flags; the light rules stay local."""
    root = copy_workflow(tmp_path_factory.mktemp("slurm"))
    # the repository's profile as it is, but without conda (its channels are unreachable here)
    prof = yaml.safe_load((root / "profiles/slurm/config.yaml").read_text())
    assert prof.pop("software-deployment-method") == "conda"
    (root / "profiles/standin").mkdir()
    (root / "profiles/standin/config.yaml").write_text(yaml.safe_dump(prof))
    cfg = slurm_config(root)
    (root / "slurm.yaml").write_text(yaml.safe_dump(cfg))
    state = root / "slurm-state"
    env = slurm_standin.install(root / "slurm-bin", state)
    env["PATH"] = f"{root / 'slurm-bin'}:{BIN}:{os.environ['PATH']}"  # the stand-ins first, then this venv
    proc = snakemake(root, "--configfile", "slurm.yaml", "--jobs", "2", "--slurm-init-seconds-before-status-checks",
                     "1", profile="profiles/standin", env=env)
    log = proc.stdout + proc.stderr
    assert "SLURM run ID" in log  # the slurm executor, not the local one, ran the workflow

    sbatch = [json.loads(line) for line in (state / "sbatch.jsonl").read_text().splitlines()]
    srun = {r["jobid"]: r for r in map(json.loads, (state / "srun.jsonl").read_text().splitlines())}
    jobs = {}  # (rule, wildcards) -> sbatch record
    for rec in sbatch:
        rule, wc = re.search(r"--target-jobs '(\w+):([^']*)'", rec["script"]).groups()
        wildcards = dict(kv.split("=", 1) for kv in wc.split(","))
        jobs[rule, wildcards.get("model"), wildcards.get("method", "zero-shot" if "zero" in rule else "")] = rec
        flags, res = rec["flags"], cfg["models"][wildcards["model"]]["resources"]
        print(f"sbatch {rule} {wc}: " + " ".join(f"{k}={v}" for k, v in flags.items()
                                                     if k not in ("--wrap", "--output", "--job-name")))
        assert flags["--comment"].startswith(f"rule_{rule}_wildcards_")
        assert flags["--gpus"] == str(res["gpu"]), (rule, flags)  # a GPU, as many as the model asks
        assert flags["--mem"] == str(res["mem_mb"]) and flags["-t"] == str(res["runtime"]), (rule, flags)
        assert flags["-A"] == slurm_standin.ACCOUNT and flags["-p"] == "gpu"  # guessed, validated, default partition
        assert flags["--parsable"] is True and flags["-D"] == str(root)
        step = srun[str(rec["jobid"])]  # inside the job, the jobstep plugin ran the rule through srun
        assert step["flags"]["--gpus"] == str(res["gpu"]) and "snakemake" in " ".join(step["command"])
    assert collections.Counter(rule for rule, _, _ in jobs) == {
        "probe_outliers": 2, "probe_sensitivity": 2, "probe_gradnorm": 2, "zo_train": 2, "evaluate": 2,
        "evaluate_zero_shot": 2, "evaluate_calibrated": 2}
    assert {rule for rule, _, _ in jobs} == GPU_RULES and len(sbatch) == len(jobs) == 14
    big, small = jobs["zo_train", "tiny-llama-big", "dominant"]["flags"], jobs["zo_train", "tiny-llama", "dominant"]["flags"]
    assert int(big["--mem"]) > int(small["--mem"]) and int(big["-t"]) > int(small["-t"])  # scales with the model
    for rule in LIGHT_RULES - {"select_hyper"}:  # the light rules ran on the head node (no grid here)
        assert re.search(rf"^localrule {rule}:", log, re.M), rule
    tools = collections.Counter(json.loads(line)["tool"] for line in (state / "calls.jsonl").read_text().splitlines())
    assert tools["sacct"] >= 2 and tools["sacctmgr"] >= 1 and tools["sinfo"] >= 1  # account guess, check, status

    # complete outputs, each made by the SLURM job recorded for it (or on the head node: no job id)
    res = root / "results/tiny"
    acc = pd.read_csv(res / "tables/accuracy.csv")
    assert set(acc["model"]) == {"tiny-llama", "tiny-llama-big"}
    assert set(acc["method"]) == {"zero-shot", "calibrated-zero-shot", "dominant"} and acc["mean"].between(0, 100).all()
    commit = head_commit(root)
    for model in cfg["models"]:
        def made_by(rule, method=""):
            return str(jobs[rule, model, method]["jobid"])

        prov = check_provenance(res / f"probe/{model}/probe.json", commit, True)
        assert prov["slurm_job_id"] == made_by("probe_outliers")
        prov = check_provenance(res / f"train/{model}/sst2/dominant/seed0/log.json", commit, True, method="dominant")
        assert prov["slurm_job_id"] == made_by("zo_train", "dominant")
        prov = check_provenance(res / f"eval/{model}/sst2/dominant/seed0.json", commit, True, method="dominant")
        assert prov["slurm_job_id"] == made_by("evaluate", "dominant")
        prov = check_provenance(res / f"eval/{model}/sst2/zero-shot.json", commit, True, method="zero-shot")
        assert prov["slurm_job_id"] == made_by("evaluate_zero_shot", "zero-shot")
        assert check_provenance(res / f"models/{model}/dlzo_model.json", commit, False)["slurm_job_id"] is None
    assert check_provenance(res / "data/sst2/meta.json", commit, False)["slurm_job_id"] is None
    assert check_provenance(res / "tables/provenance.json", commit, False)["slurm_job_id"] is None
    again = snakemake(root, "-n", "--configfile", "slurm.yaml")
    assert "Nothing to be done" in again.stdout + again.stderr


def test_study_config_plans_the_study(workdir):
    """The SmolLM2-135M study (results/reference/smollm2-135m/README.md) plans the runs its README counts."""
    proc = snakemake(workdir, "-n", "--quiet", "rules", "--configfile", "workflow/configs/smollm2-study.yaml")
    cfg = yaml.safe_load((workdir / "workflow/configs/smollm2-study.yaml").read_text())
    assert list(cfg["tasks"]) == ["copa", "sst2"] and cfg["sweep_tasks"] == ["copa"]
    sweep = len(cfg["sweep_layers"])
    headline = 4 * 2 + 4 * 2 + 2  # 4 ZO methods x (2 lr points with seed 0 + seeds 1-2); fo-adamw's 2 points
    assert 2 * headline + sweep == 55  # the number the config's header and the study's README give
    assert planned_jobs(proc) == {"download_model": 1, "prepare_data": 2, "probe_outliers": 1,
                                  "probe_sensitivity": 1, "probe_gradnorm": 1, "zo_train": 2 * headline + sweep,
                                  "select_hyper": 2 * 5, "evaluate": 2 * (4 * 3 + 1) + sweep,
                                  "evaluate_zero_shot": 2, "evaluate_calibrated": 2, "tables": 1, "all": 1}


def test_study_config_rte_line_plans_the_third_task_with_shared_prompt_scoring(workdir):
    """The study config's commented RTE line is valid: uncommented, it adds RTE's headline (18 training runs,
    five grids, 13 evaluations and the two baselines), every RTE training command with shared-prompt
    scoring and no COPA or SST-2 command changed."""
    text = (workdir / "workflow/configs/smollm2-study.yaml").read_text()
    line = next(x for x in text.splitlines() if x.lstrip().startswith("# rte:"))
    path = workdir / "study-rte.yaml"
    path.write_text(text.replace(line, line.replace("# rte:", "rte:", 1).split("}")[0] + "}"))
    base = snakemake(workdir, "-n", "--forceall", "-p", "--configfile", "workflow/configs/smollm2-study.yaml")
    rte = snakemake(workdir, "-n", "--forceall", "-p", "--configfile", str(path))
    before, after = planned_jobs(base), planned_jobs(rte)
    assert {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)} == {
        "prepare_data": 1, "zo_train": 18, "select_hyper": 5, "evaluate": 13, "evaluate_zero_shot": 1,
        "evaluate_calibrated": 1}
    runs = lambda proc: [x for x in proc.stdout.splitlines() if "python -m dlzo.train" in x]  # noqa: E731
    assert sum("--task rte " in x for x in runs(rte)) == 18
    assert all(("--scoring shared-prompt" in x) == ("--task rte " in x) for x in runs(rte))
    assert sorted(x for x in runs(rte) if "--task rte " not in x) == sorted(runs(base))


def test_study_sst2_sweep_config_plans_the_sweep_the_main_study_would_run(workdir):
    """The study's SST-2 sweep (smollm2-study-sst2-sweep.yaml) plans 13 single-layer runs and the predictors on
    SST-2, and its layer-11 run is the main study's SST-2 dominant lr-1e-4 seed-0 run: the same command but for
    the results folder, the method's name, shared-prompt scoring, the grid's non-finite guard and the probe that
    names dominant's layer."""
    sweep_cfg = "workflow/configs/smollm2-study-sst2-sweep.yaml"
    cfg = yaml.safe_load((workdir / sweep_cfg).read_text())
    proc = snakemake(workdir, "-n", "--forceall", "-p", "--configfile", sweep_cfg)
    assert planned_jobs(proc) == {"download_model": 1, "prepare_data": 1, "probe_outliers": 1,
                                  "probe_sensitivity": 1, "probe_gradnorm": 1, "zo_train": 13, "evaluate": 13,
                                  "evaluate_zero_shot": 1, "evaluate_calibrated": 1, "tables": 1, "all": 1}
    lines = proc.stdout.splitlines()
    runs = [x for x in lines if "python -m dlzo.train" in x]
    assert sorted(int(re.search(r"--method layer-(\d+) ", x).group(1)) for x in runs) == cfg["sweep_layers"]
    assert all("--scoring shared-prompt" in x and "--lr 0.0001 --eps 0.001" in x for x in runs)
    probes = [x for x in lines if "python -m dlzo.probe sensitivity" in x or "python -m dlzo.probe gradnorm" in x]
    assert len(probes) == 2 and all("--task sst2 " in x and "--scoring shared-prompt" in x for x in probes)

    main = snakemake(workdir, "-n", "--forceall", "-p", "--configfile", "workflow/configs/smollm2-study.yaml")
    dominant = next(x for x in main.stdout.splitlines() if "python -m dlzo.train" in x and "--task sst2 " in x
                    and "--method dominant " in x and "dominant@lr0.0001_eps0.001/seed0/" in x)
    layer11 = next(x for x in runs if "--method layer-11 " in x)
    def same(cmd):
        cmd = re.sub(r"results/study(-sst2-sweep)?/", "RES/", cmd)
        cmd = re.sub(r"(dominant@lr0.0001_eps0.001|layer-11)\b", "METHOD", cmd).replace("--method dominant ", "--method METHOD ")
        for extra in (" --scoring shared-prompt", " --on-nonfinite stop", " --probe RES/probe/smollm2-135m/probe.json",
                      " --prefix-cache auto"):  # dominant reads its layer from the probe; auto is the default
            cmd = cmd.replace(extra, "")
        return re.sub(r"\s+", " ", cmd)
    assert same(layer11) == same(dominant)


def test_sweep_tasks_limits_the_sweep_to_its_tasks(workdir):
    """`sweep_tasks: [sst2]`: squad loses its two sweep layers (each a two-point lr grid: 2 training runs and a
    selection) and their evaluations, nothing else."""
    # --forceall: the whole plan, whatever the tests before this one ran or marked current in this workdir
    whole = planned_jobs(snakemake(workdir, "-n", "--forceall", "--quiet", "rules", "--configfile",
                                   "workflow/configs/tiny.yaml"))
    path = _edit(workdir, "sweep-tasks", lambda c: c.update(sweep_tasks=["sst2"]))
    part = planned_jobs(snakemake(workdir, "-n", "--forceall", "--quiet", "rules", "--configfile", str(path)))
    gone = {k: whole[k] - part.get(k, 0) for k in whole if whole[k] != part.get(k, 0)}
    assert gone == {"zo_train": 4, "select_hyper": 2, "evaluate": 2}


def test_candidate_scoring_reaches_only_its_tasks_training(workdir):
    """train.candidate_scoring, overridden per task: `--scoring` is in a training (or probe) command only where
    it is not the default, so configs without the key plan the commands (and params) they always did."""
    def commands(path=None):
        extra = ("--configfile", str(path)) if path else ("--configfile", "workflow/configs/tiny.yaml")
        out = snakemake(workdir, "-n", "--forceall", "-p", *extra).stdout
        runs = [line for line in out.splitlines() if "python -m dlzo.train" in line or "python -m dlzo.probe " in line]
        assert runs
        return {task: [r for r in runs if f"--task {task} " in r] for task in ("sst2", "squad")}

    plain = commands()
    assert not any("--scoring" in r for rs in plain.values() for r in rs)
    one = commands(_edit(workdir, "scoring-sst2", lambda c: c["tasks"]["sst2"].update(candidate_scoring="shared-prompt")))
    assert all("--scoring shared-prompt" in r for r in one["sst2"]) and not any("--scoring" in r for r in one["squad"])
    assert len(one["sst2"]) == len(plain["sst2"])
    # the probes that read sst2's training batches (the sensitivity profile and the gradient norms) too
    assert sum(" dlzo.probe sensitivity " in r or " dlzo.probe gradnorm " in r for r in one["sst2"]) == 2

    def both(c):
        c["train"]["candidate_scoring"] = "shared-prompt"
        c["tasks"]["squad"]["candidate_scoring"] = "per-sequence"
    two = commands(_edit(workdir, "scoring-global", both))
    assert all("--scoring shared-prompt" in r for r in two["sst2"]) and not any("--scoring" in r for r in two["squad"])


def test_paper_config_plans_the_whole_dag_offline(workdir):
    proc = snakemake(workdir, "-n", "--quiet", "rules")
    jobs = planned_jobs(proc)
    runs = 2 * 9 * 7 + 9 * (32 + 36)  # (models x tasks x baselines, FO and Sparse-MeZO too) + every layer
    assert jobs == {"download_model": 2, "prepare_data": 9, "probe_outliers": 2, "probe_sensitivity": 2,
                    "probe_gradnorm": 2, "zo_train": runs, "evaluate": runs, "evaluate_zero_shot": 18,
                    "evaluate_calibrated": 2 * 7, "tables": 1, "all": 1}


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
    "sweep-task-not-configured": (lambda c: c.update(sweep_tasks=["rte"]), "sweep_tasks"),
    "pin-past-depth": (lambda c: c.update(dominant_layer={"tiny-llama": 4}), "dominant_layer.tiny-llama"),
    "unknown-task": (lambda c: c["tasks"].update(mnli={"source": "hub"}), "mnli"),
    "unknown-method": (lambda c: c.update(methods=["zero-shot", "adam"]), "adam"),
    "lr-zero": (lambda c: c["train"]["hyper"]["layer"].update(lr=0), "lr"),
    "missing-source": (lambda c: c["models"]["tiny-llama"].pop("source"), "source"),
    "bad-source": (lambda c: c["models"]["tiny-llama"].update(source="s3://bucket/model"), "source"),
    "pin-unknown-model": (lambda c: c.update(dominant_layer={"gpt5": 1}), "gpt5"),
    "sensitivity-unknown-task": (lambda c: c["probe"]["sensitivity"].update(task="mnli"), "probe.sensitivity.task"),
    "sensitivity-k-zero": (lambda c: c["probe"]["sensitivity"].update(k=0), "k"),
    "fo-layer-past-depth": (lambda c: c["methods"].append("fo-layer-4"), "fo-layer-4"),
    "fo-without-hyper": (lambda c: c["train"]["hyper"].pop("fo"), "train.hyper.fo"),
    "sparsity-one": (lambda c: c["train"]["hyper"]["sparse"].update(sparsity=1.0), "sparsity"),
    "fo-epochs-and-steps": (lambda c: c["train"]["hyper"]["fo"].update(steps=3), "fo"),
    "grid-lr-negative": (lambda c: c["train"]["hyper"]["full"].update(lr=[1e-3, -1e-3]), "lr"),
    "grid-empty": (lambda c: c["train"]["hyper"]["lora"].update(eps=[]), "eps"),
    "method-seeds-unknown-method": (lambda c: c.update(method_seeds={"adamw": [0]}), "method_seeds.adamw"),
    "gradnorm-unknown-task": (lambda c: c["probe"]["gradnorm"].update(task="mnli"), "probe.gradnorm.task"),
    "calibration-l2-negative": (lambda c: c["evaluate"].update(calibration_l2=[-1]), "calibration_l2"),
    "scoring-unknown": (lambda c: c["tasks"]["sst2"].update(candidate_scoring="shared"), "candidate_scoring"),
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
