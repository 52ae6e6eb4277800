"""The tiny DAG through the real snakemake-executor-plugin-slurm, with stand-in SLURM commands
(tests/slurm_standin.py), and the SLURM profile's resources."""
import collections
import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

import slurm_standin
from conftest import REPO
from workflow_support import BIN, check_provenance, copy_workflow, head_commit, snakemake


GPU_RULES = {"probe_outliers", "probe_sensitivity", "probe_gradnorm", "zo_train", "evaluate", "evaluate_zero_shot",
             "evaluate_calibrated"}
# localrules: on the head node (the figures of the probe stages are drawn there from their JSON)
LIGHT_RULES = {"download_model", "prepare_data", "select_hyper", "plot_probe", "plot_sensitivity", "plot_predictors",
               "tables", "all"}


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
        assert flags["--mem"] == str(res["mem_mb"]) and flags["-t"] == str(res["runtime"]), (rule, flags)  # attempt 1
        assert flags["--signal"] == "TERM@600", (rule, flags)  # SIGTERM early enough to save, from the profile
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
    assert check_provenance(res / "data/tiny-llama/sst2/meta.json", commit, False)["slurm_job_id"] is None
    assert check_provenance(res / "tables/provenance.json", commit, False)["slurm_job_id"] is None
    again = snakemake(root, "-n", "--configfile", "slurm.yaml")
    assert "Nothing to be done" in again.stdout + again.stderr
