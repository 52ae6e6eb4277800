"""The Snakemake DAG for real: the whole tiny pipeline, run once a session (the `tiny_dag` fixture), its
results and their provenance, a rerun with nothing to do, the report, and minimal reruns (on a copy of the
finished run). The SLURM run is in test_workflow_slurm.py, dry runs and config checks in test_workflow_plans.py
(separate modules: pytest-xdist's --dist loadscope runs each module in one worker)."""
import json
import re
import subprocess

import pandas as pd
import pytest
import yaml

from workflow_support import check_provenance, copy_workflow, head_commit, snakemake


@pytest.fixture(scope="session")
def tiny_dag(tmp_path_factory):
    """The whole tiny pipeline, really run (2 cores) in a copy of the workflow; read-only for the tests."""
    root = copy_workflow(tmp_path_factory.mktemp("tiny-dag"))
    snakemake(root, "--cores", "2", "--configfile", "workflow/configs/tiny.yaml")
    return root


@pytest.fixture
def finished_copy(tiny_dag, tmp_path):
    """A copy of the finished tiny DAG (results, .snakemake metadata, git repository; times kept), to edit."""
    root = tmp_path / "wf"
    subprocess.run(["cp", "-a", str(tiny_dag), str(root)], check=True)
    return root


@pytest.mark.slow
def test_tiny_dag_runs_and_second_run_has_nothing_to_do(tiny_dag):
    workdir = tiny_dag  # the run itself: the session's fixture
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
    assert cal["metric"] == "acc_per_token"
    assert cal["metrics"]["acc_per_token_uncalibrated"] == json.loads(
        (res / "eval/tiny-llama/sst2/zero-shot.json").read_text())["value"]
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


@pytest.mark.slow
def test_tiny_dag_report_has_every_table_and_figure(tiny_dag):
    """The report: one page with every table and figure, each with its caption."""
    workdir = tiny_dag
    snakemake(workdir, "--configfile", "workflow/configs/tiny.yaml", "--report", "results/report.html")
    page = (workdir / "results" / "report.html").read_text()
    for name in ("accuracy.html", "paper_comparison.html", "speedup.html", "layer_sweep.png", "loss_curves.png",
                 "activation_profile.png", "layer_predictors.png", "layer_predictors_tiny-llama.png"):
        assert f'"name": "{name}"' in page, name
    assert "Protocol: sst2: local files tests/fixtures" in page and "Config: 3 ZO steps of batch 2" in page


@pytest.mark.slow
def test_tiny_dag_results_carry_their_provenance(tiny_dag):
    """Every result file names the config that made it, packages, commit, device, dtype, wall time."""
    workdir, res = tiny_dag, tiny_dag / "results" / "tiny"
    commit, cfg = head_commit(workdir), yaml.safe_load((workdir / "workflow/configs/tiny.yaml").read_text())
    check_provenance(res / "models/tiny-llama/dlzo_model.json", commit, False, source="tiny:llama:4:1", num_layers=4)
    for task in ("sst2", "squad"):
        check_provenance(res / f"data/tiny-llama/{task}/meta.json", commit, False, task=task, seed=0,
                         train=cfg["tasks"][task]["train"], max_len=cfg["train"]["max_len"])
        meta = json.loads((res / f"data/tiny-llama/{task}/meta.json").read_text())
        assert meta["tokens"]["max_len"] == cfg["train"]["max_len"] and meta["tokens"]["tokenizer"].endswith(
            "models/tiny-llama")  # the examples this model's tokenizer sees cut, per split
        assert {k: meta["tokens"][k]["of"] for k in ("train", "dev", "test")} == meta["actual"]
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
def test_minimal_reruns(finished_copy, tmp_path):
    """After the tiny DAG ran (a copy of it): each edit plans exactly the jobs that depend on it."""
    workdir = finished_copy
    cfg_path = workdir / "workflow/configs/tiny.yaml"
    base = yaml.safe_load(cfg_path.read_text())
    # the copy is as current as the run itself: nothing to do before any edit
    assert "Nothing to be done" in snakemake(workdir, "-n", "--configfile", str(cfg_path)).stdout

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
    assert cb == ({("prepare_data", "model=tiny-llama, task=cb"), ("evaluate_zero_shot", "model=tiny-llama, task=cb"),
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
    # a sensitivity setting: only that profile and the figures that draw it (before the code edits below, which
    # stay in place)
    figure = lambda *names: {(f"plot_{n}", "model=tiny-llama") for n in names}  # noqa: E731
    assert plan(lambda c: c["probe"]["sensitivity"].update(k=3)) == {
        ("probe_sensitivity", "model=tiny-llama")} | figure("sensitivity", "predictors") | tail
    assert plan(lambda c: c["probe"]["gradnorm"].update(batches=3)) == {
        ("probe_gradnorm", "model=tiny-llama")} | figure("predictors") | tail
    # the table code: only the tables; the figure code: the figures, drawn from their JSON (no probe reruns)
    assert plan(touch="src/dlzo/tables.py") == tail
    assert plan(touch="src/dlzo/figures.py") == tail | figure("probe", "sensitivity", "predictors")
    # the ZO code: every training job and what follows it, and the sensitivity profile (it draws ZO's z);
    # not the data, model or probe. The frozen-model evaluations too: their stage (dlzo.evaluate) imports the
    # tuned-model loader, which replays ZO trajectories, and code inputs follow imports (dlzo.layout.module_sources)
    zo = plan(touch="src/dlzo/zo.py")
    frozen = {("evaluate_zero_shot", f"model=tiny-llama, task={t}") for t in ("sst2", "squad")} | {
        ("evaluate_calibrated", "model=tiny-llama, task=sst2")}
    profiles = {("probe_sensitivity", "model=tiny-llama"), ("probe_gradnorm", "model=tiny-llama")}
    # (every figure job too: the figures.py edit above is still in place, and a dry run leaves it planned)
    assert zo == (runs("zo_train", plain) | runs("evaluate", plain) | tail | grid() | frozen | profiles
                  | figure("probe", "sensitivity", "predictors"))
    # an edit known to change no result (the comments above): `--touch` marks what it planned current without
    # running it (the README's advice); the files keep their bytes, and nothing is left to do
    before = (workdir / "results/tiny/tables/accuracy.csv").read_bytes()
    snakemake(workdir, "--touch", "--cores", "1", "--configfile", str(cfg_path))
    assert "Nothing to be done" in snakemake(workdir, "-n", "--configfile", str(cfg_path)).stdout
    assert (workdir / "results/tiny/tables/accuracy.csv").read_bytes() == before
