"""Dry runs of the workflow: the study configs' plans, what config keys reach, the paper's whole plan, lint,
and configs that must stop before any job with the key named."""
import collections
import re

import pytest
import yaml

from conftest import REPO
from dlzo import cluster
from workflow_support import copy_workflow, planned_jobs, snakemake


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A copy of the workflow, so runs never touch the checkout's results/ (dry runs only: nothing runs here)."""
    return copy_workflow(tmp_path_factory.mktemp("wf"))


@pytest.fixture(scope="module")
def dry_run(workdir):
    """`snakemake -n --forceall -p --configfile <config>` in `workdir`, run once a module per config: the whole
    plan (job stats and shell commands), whatever ran before."""
    cache = {}

    def run(config):
        if config not in cache:
            cache[config] = snakemake(workdir, "-n", "--forceall", "-p", "--configfile", str(config))
        return cache[config]
    return run



def test_study_config_plans_the_study(workdir, dry_run):
    """The SmolLM2-135M study (results/reference/smollm2-135m/README.md) plans the runs its README counts."""
    proc = dry_run("workflow/configs/smollm2-study.yaml")
    cfg = yaml.safe_load((workdir / "workflow/configs/smollm2-study.yaml").read_text())
    assert list(cfg["tasks"]) == ["copa", "sst2"] and cfg["sweep_tasks"] == ["copa"]
    sweep = len(cfg["sweep_layers"])
    headline = 4 * 2 + 4 * 2 + 2  # 4 ZO methods x (2 lr points with seed 0 + seeds 1-2); fo-adamw's 2 points
    assert 2 * headline + sweep == 55  # the number the config's header and the study's README give
    assert planned_jobs(proc) == {"download_model": 1, "prepare_data": 2, "probe_outliers": 1,
                                  "probe_sensitivity": 1, "probe_gradnorm": 1, "zo_train": 2 * headline + sweep,
                                  "select_hyper": 2 * 5, "evaluate": 2 * (4 * 3 + 1) + sweep,
                                  "evaluate_zero_shot": 2, "evaluate_calibrated": 2, "tables": 1, "all": 1,
                                  "plot_probe": 1, "plot_sensitivity": 1, "plot_predictors": 1}


def test_study_config_rte_line_plans_the_third_task_with_shared_prompt_scoring(workdir, dry_run):
    """The study config's commented RTE line is valid: uncommented, it adds RTE's headline (18 training runs,
    five grids, 13 evaluations and the two baselines), every RTE training command with shared-prompt
    scoring and no COPA or SST-2 command changed."""
    text = (workdir / "workflow/configs/smollm2-study.yaml").read_text()
    line = next(x for x in text.splitlines() if x.lstrip().startswith("# rte:"))
    path = workdir / "study-rte.yaml"
    path.write_text(text.replace(line, line.replace("# rte:", "rte:", 1).split("}")[0] + "}"))
    base, rte = dry_run("workflow/configs/smollm2-study.yaml"), dry_run(path)
    before, after = planned_jobs(base), planned_jobs(rte)
    assert {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)} == {
        "prepare_data": 1, "zo_train": 18, "select_hyper": 5, "evaluate": 13, "evaluate_zero_shot": 1,
        "evaluate_calibrated": 1}
    runs = lambda proc: [x for x in proc.stdout.splitlines() if "python -m dlzo.train" in x]  # noqa: E731
    assert sum("--task rte " in x for x in runs(rte)) == 18
    assert all(("--scoring shared-prompt" in x) == ("--task rte " in x) for x in runs(rte))
    assert sorted(x for x in runs(rte) if "--task rte " not in x) == sorted(runs(base))


def test_study_sst2_sweep_config_plans_the_sweep_the_main_study_would_run(workdir, dry_run):
    """The study's SST-2 sweep (smollm2-study-sst2-sweep.yaml) plans 13 single-layer runs and the predictors on
    SST-2, and its layer-11 run is the main study's SST-2 dominant lr-1e-4 seed-0 run: the same command but for
    the results folder, the method's name, shared-prompt scoring, the grid's non-finite guard and the probe that
    names dominant's layer."""
    sweep_cfg = "workflow/configs/smollm2-study-sst2-sweep.yaml"
    cfg = yaml.safe_load((workdir / sweep_cfg).read_text())
    proc = dry_run(sweep_cfg)
    assert planned_jobs(proc) == {"download_model": 1, "prepare_data": 1, "probe_outliers": 1,
                                  "probe_sensitivity": 1, "probe_gradnorm": 1, "zo_train": 13, "evaluate": 13,
                                  "evaluate_zero_shot": 1, "evaluate_calibrated": 1, "tables": 1, "all": 1,
                                  "plot_probe": 1, "plot_sensitivity": 1, "plot_predictors": 1}
    lines = proc.stdout.splitlines()
    runs = [x for x in lines if "python -m dlzo.train" in x]
    assert sorted(int(re.search(r"--method layer-(\d+) ", x).group(1)) for x in runs) == cfg["sweep_layers"]
    assert all("--scoring shared-prompt" in x and "--lr 0.0001 --eps 0.001" in x for x in runs)
    probes = [x for x in lines if "python -m dlzo.profiles sensitivity" in x or "python -m dlzo.profiles gradnorm" in x]
    assert len(probes) == 2 and all("--task sst2 " in x and "--scoring shared-prompt" in x for x in probes)

    main = dry_run("workflow/configs/smollm2-study.yaml")
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


def test_sweep_tasks_limits_the_sweep_to_its_tasks(workdir, dry_run):
    """`sweep_tasks: [sst2]`: squad loses its two sweep layers (each a two-point lr grid: 2 training runs and a
    selection) and their evaluations, nothing else."""
    # --forceall: the whole plan, whatever the tests before this one ran or marked current in this workdir
    whole = planned_jobs(dry_run("workflow/configs/tiny.yaml"))
    path = _edit(workdir, "sweep-tasks", lambda c: c.update(sweep_tasks=["sst2"]))
    part = planned_jobs(snakemake(workdir, "-n", "--forceall", "--quiet", "rules", "--configfile", str(path)))
    gone = {k: whole[k] - part.get(k, 0) for k in whole if whole[k] != part.get(k, 0)}
    assert gone == {"zo_train": 4, "select_hyper": 2, "evaluate": 2}


def test_candidate_scoring_reaches_only_its_tasks_training(workdir, dry_run):
    """train.candidate_scoring, overridden per task: `--scoring` is in a training (or probe) command only where
    it is not the default, so configs without the key plan the commands (and params) they always did."""
    def commands(path=None):
        out = dry_run(path or "workflow/configs/tiny.yaml").stdout
        runs = [line for line in out.splitlines() if "python -m dlzo.train" in line or "python -m dlzo.profiles " in line]
        assert runs
        return {task: [r for r in runs if f"--task {task} " in r] for task in ("sst2", "squad")}

    plain = commands()
    assert not any("--scoring" in r for rs in plain.values() for r in rs)
    one = commands(_edit(workdir, "scoring-sst2", lambda c: c["tasks"]["sst2"].update(candidate_scoring="shared-prompt")))
    assert all("--scoring shared-prompt" in r for r in one["sst2"]) and not any("--scoring" in r for r in one["squad"])
    assert len(one["sst2"]) == len(plain["sst2"])
    # the probes that read sst2's training batches (the sensitivity profile and the gradient norms) too
    assert sum(" dlzo.profiles sensitivity " in r or " dlzo.profiles gradnorm " in r for r in one["sst2"]) == 2

    def both(c):
        c["train"]["candidate_scoring"] = "shared-prompt"
        c["tasks"]["squad"]["candidate_scoring"] = "per-sequence"
    two = commands(_edit(workdir, "scoring-global", both))
    assert all("--scoring shared-prompt" in r for r in two["sst2"]) and not any("--scoring" in r for r in two["squad"])


def test_paper_config_plans_the_whole_dag_offline(workdir):
    """The paper's plan: its jobs, as the README states them, and what each asks a cluster for (dlzo.cluster)."""
    proc = snakemake(workdir, "-n")
    jobs = planned_jobs(proc)
    listed = cluster.parse_dry_run(proc.stdout + proc.stderr)
    assert collections.Counter(j["rule"] for j in listed) == jobs  # `make budget` reads every job
    res = collections.defaultdict(list)
    for job in listed:
        res[job["rule"], cluster._family(job)].append(job["resources"])
    evaluations = [r for (rule, _), rs in res.items() if rule.startswith("evaluate") for r in rs]
    assert all(r["gpu"] == 1 and 15 <= r["runtime"] <= 60 for r in evaluations)  # minutes, not half a day
    for (rule, family), rs in res.items():
        if rule == "zo_train":
            assert all(r["cpus_per_task"] == 8 and r["expected_min"] < r["runtime"] for r in rs), family
            # only the first-order full model (~125 GB at 7-8B) asks for the big GPU (config.yaml's cluster.big_gpu)
            assert all(r.get("gpu_model") == ("h200" if family == "fo-adamw" else None) for r in rs), family
    mezo = max(r["runtime"] for r in res["zo_train", "mezo-full"])
    assert 120 < mezo < 12 * 60 and max(r["runtime"] for r in res["zo_train", "fo-layer-1"]) < mezo
    text = cluster.budget(listed, ["train"])
    assert "GPU-h requested" in text and "--gpus=h200:1" in text and "first-order runs' tuned tensors" in text
    # per model and task, the lr grid points of mezo-full 4, dominant 4, lora-zo 2, dominant-lora 2, sparse-mezo 4,
    # fo-adamw 3, fo-layer-1 3 (config.yaml's train.hyper), then one sweep run per layer at one lr
    grid = 4 + 4 + 2 + 2 + 4 + 3 + 3
    trainings = 2 * 9 * grid + 9 * (32 + 36)
    results = 2 * 9 * 7 + 9 * (32 + 36)  # each method's chosen point, and each swept layer
    assert jobs == {"download_model": 2, "prepare_data": 2 * 9, "probe_outliers": 2, "probe_sensitivity": 2,
                    "probe_gradnorm": 2, "zo_train": trainings, "select_hyper": 2 * 9 * 7, "evaluate": results,
                    "evaluate_zero_shot": 18, "evaluate_calibrated": 2 * 7, "tables": 1, "all": 1, "plot_probe": 2,
                    "plot_sensitivity": 2, "plot_predictors": 2}
    # the README's paper section states the plan: it must be this one (a stale count fails here)
    readme = (REPO / "README.md").read_text()
    stated = re.search(r"plan: ([\d,]+) jobs \(([\d,]+) trainings, ([\d,]+) grid choices, ([\d,]+) evaluations\)", readme)
    assert stated, "README.md's paper section no longer states the plan as 'plan: N jobs (...)'"
    evaluations = jobs["evaluate"] + jobs["evaluate_zero_shot"] + jobs["evaluate_calibrated"]
    assert [int(x.replace(",", "")) for x in stated.groups()] == [sum(jobs.values()), trainings,
                                                                 jobs["select_hyper"], evaluations]


def test_config_override_goes_on_top_of_config_yaml(workdir, tmp_path):
    """`--config results=<dir>` alone (a cluster's scratch): config.yaml is read and the key replaced, instead
    of a config of that one key failing validation."""
    proc = snakemake(workdir, "-n", "--quiet", "rules", "--config", f"results={tmp_path}/scratch")
    assert planned_jobs(proc)["zo_train"] == 2 * 9 * (4 + 4 + 2 + 2 + 4 + 3 + 3) + 9 * (32 + 36)
    plan = snakemake(workdir, "-n", "--forceall", "-p", "--config", f"results={tmp_path}/scratch",
                     "--", f"{tmp_path}/scratch/data/llama2-7b/rte/meta.json").stdout
    assert f"{tmp_path}/scratch/models/llama2-7b" in plan and "--source 'hub'" in plan


def test_lint_is_clean(workdir):
    proc = snakemake(workdir, "--lint")
    assert "good condition" in proc.stdout + proc.stderr


def _edit(workdir, name, edit):
    cfg = yaml.safe_load((workdir / "workflow/configs/tiny.yaml").read_text())
    edit(cfg)
    path = workdir / f"bad-{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# case: (edit of tiny.yaml, what only that error prints). Checks that common.smk makes print "config error at
# `<dotted key>`"; schema checks print Snakemake's "On instance[<path>]" (jsonschema's path of the failing
# value; for an unknown or missing key, the path of its parent and the key's name in the message).
def _at(key):
    return f"config error at `{key}`"


def _on(*path):
    return "On instance" + "".join(f"[{p!r}]" for p in path)


BAD_CONFIGS = {
    "unknown-key": (lambda c: c.update(stepz=3), ("'stepz' was unexpected", "On instance:")),
    "wrong-type": (lambda c: c["train"].update(steps="many"), _on("train", "steps")),
    "layer-past-depth": (lambda c: c.update(sweep_layers=[0, 7]), _at("sweep_layers")),
    "sweep-task-not-configured": (lambda c: c.update(sweep_tasks=["rte"]), _at("sweep_tasks")),
    "pin-past-depth": (lambda c: c.update(dominant_layer={"tiny-llama": 4}), _at("dominant_layer.tiny-llama")),
    "unknown-task": (lambda c: c["tasks"].update(mnli={"source": "hub"}), _at("tasks.mnli")),
    "unknown-method": (lambda c: c.update(methods=["zero-shot", "adam"]), (_at("methods"), "'adam'")),
    "lr-zero": (lambda c: c["train"]["hyper"]["layer"].update(lr=0), _on("train", "hyper", "layer", "lr")),
    "missing-source": (lambda c: c["models"]["tiny-llama"].pop("source"),
                       ("'source' is a required property", _on("models", "tiny-llama") + ":")),
    "bad-source": (lambda c: c["models"]["tiny-llama"].update(source="s3://bucket/model"),
                   (_on("models", "tiny-llama", "source"), "'s3://bucket/model'")),
    "pin-unknown-model": (lambda c: c.update(dominant_layer={"gpt5": 1}), _at("dominant_layer.gpt5")),
    "sensitivity-unknown-task": (lambda c: c["probe"]["sensitivity"].update(task="mnli"),
                                 _at("probe.sensitivity.task")),
    "sensitivity-k-zero": (lambda c: c["probe"]["sensitivity"].update(k=0), _on("probe", "sensitivity", "k")),
    "fo-layer-past-depth": (lambda c: c["methods"].append("fo-layer-4"), (_at("methods"), "fo-layer-4")),
    "fo-without-hyper": (lambda c: c["train"]["hyper"].pop("fo"), _at("train.hyper.fo")),
    "sparsity-one": (lambda c: c["train"]["hyper"]["sparse"].update(sparsity=1.0),
                     _on("train", "hyper", "sparse", "sparsity")),
    "fo-epochs-and-steps": (lambda c: c["train"]["hyper"]["fo"].update(steps=3),
                            (_on("train", "hyper", "fo") + ":", "{'required': ['epochs', 'steps']}")),
    "grid-lr-negative": (lambda c: c["train"]["hyper"]["full"].update(lr=[1e-3, -1e-3]),
                         _on("train", "hyper", "full", "lr")),
    "grid-empty": (lambda c: c["train"]["hyper"]["lora"].update(eps=[]), _on("train", "hyper", "lora", "eps")),
    "method-seeds-unknown-method": (lambda c: c.update(method_seeds={"adamw": [0]}), _at("method_seeds.adamw")),
    "gradnorm-unknown-task": (lambda c: c["probe"]["gradnorm"].update(task="mnli"), _at("probe.gradnorm.task")),
    "calibration-l2-negative": (lambda c: c["evaluate"].update(calibration_l2=[-1]),
                                _on("evaluate", "calibration_l2", 0)),
    "scoring-unknown": (lambda c: c["tasks"]["sst2"].update(candidate_scoring="shared"),
                        _on("tasks", "sst2", "candidate_scoring")),
}


def _keys(case) -> tuple[str, ...]:
    key = BAD_CONFIGS[case][1]
    return (key,) if isinstance(key, str) else key


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_stops_before_any_job_naming_the_key(workdir, case):
    edit, _ = BAD_CONFIGS[case]
    path = _edit(workdir, case, edit)
    proc = snakemake(workdir, "-n", "--configfile", str(path), check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    for key in _keys(case):
        assert key in out, (key, out[-2000:])
    assert "Job stats" not in out


def test_bad_config_keys_are_absent_from_a_valid_configs_plan(dry_run):
    """Each bad config's key strings are its error's own: a valid config's whole plan prints none of them (for
    every case, at least one of its strings is missing, so its check above can fail)."""
    out = dry_run("workflow/configs/tiny.yaml")
    out = out.stdout + out.stderr
    assert "Job stats" in out
    for case in BAD_CONFIGS:
        assert not all(key in out for key in _keys(case)), case
        assert not any(key in out for key in _keys(case) if key.startswith(("config error", "On instance"))), case
