"""The tiny DAG through the real snakemake-executor-plugin-slurm, with stand-in SLURM commands
(tests/slurm_standin.py), and the SLURM profile's resources."""
import collections
import json
import os
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

import slurm_standin
from conftest import REPO
from dlzo import cluster
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
    assert set(cluster.GPU_RULES) == GPU_RULES
    # the paper's 7B/8B models ask for a GPU and are sized from their published shape (tests/test_cluster.py)
    paper = yaml.safe_load((REPO / "config.yaml").read_text())["models"]
    for name, model in paper.items():
        assert model["resources"]["gpu"] >= 1 and model["architecture"] in name, name


def slurm_config(workdir: Path) -> dict:
    """tiny.yaml with two models of different sizes asking for different GPU resources; one task, the
    zero-shot and dominant methods: every GPU rule of the DAG, 14 jobs. 200 ZO steps, so that a training job
    can be stopped mid-run."""
    cfg = yaml.safe_load((workdir / "workflow/configs/tiny.yaml").read_text())
    cfg["models"] = {
        "tiny-llama": dict(cfg["models"]["tiny-llama"], resources={"gpu": 1, "mem_mb": 2000, "runtime": 10}),
        "tiny-llama-big": {"source": "tiny:llama:6:2", "num_layers": 6,
                           "resources": {"gpu": 2, "mem_mb": 16000, "runtime": 120}},
    }
    cfg["tasks"] = {"sst2": cfg["tasks"]["sst2"]}
    cfg.update(methods=["zero-shot", "dominant"], sweep_layers=[], method_seeds={})
    cfg["train"].update(steps=200, eval_every=50)
    cfg["train"]["hyper"]["layer"]["lr"] = 1.0e-3  # no grid: one training job per model
    return cfg


def sbatch_jobs(state: Path) -> dict:
    """(rule, model, method) -> every sbatch record of that job, in submission order (a retry is a second one)."""
    jobs = collections.defaultdict(list)
    for rec in map(json.loads, (state / "sbatch.jsonl").read_text().splitlines()):
        rule, wc = re.search(r"--target-jobs '(\w+):([^']*)'", rec["script"]).groups()
        wildcards = dict(kv.split("=", 1) for kv in wc.split(","))
        rec["wildcards"] = wildcards
        jobs[rule, wildcards.get("model"), wildcards.get("method", "zero-shot" if "zero" in rule else "")].append(rec)
    return jobs


@pytest.mark.slow
def test_tiny_dag_through_the_slurm_executor_plugin(tmp_path_factory):
    """The real snakemake-executor-plugin-slurm submits the GPU jobs to stand-in sbatch/srun/sacct/sacctmgr
    (tests/slurm_standin.py), which queue them (PENDING for a status query), run them here (RUNNING) and record
    their flags; the light rules stay local. Two faults: the first zero-shot evaluation fails before it starts
    (a node failure) and the big model's training gets SIGTERM mid-run (SLURM's --signal); both are retried with
    twice the runtime, and the training resumes and ends bit-identical to an uninterrupted run."""
    root = copy_workflow(tmp_path_factory.mktemp("slurm"))
    # the repository's profile as it is, but without conda (its channels are unreachable here)
    prof = yaml.safe_load((root / "profiles/slurm/config.yaml").read_text())
    assert prof.pop("software-deployment-method") == "conda"
    (root / "profiles/standin").mkdir()
    (root / "profiles/standin/config.yaml").write_text(yaml.safe_dump(prof))
    cfg = slurm_config(root)
    (root / "slurm.yaml").write_text(yaml.safe_dump(cfg))
    # what `make budget` reads: every job's resources from a dry run, rendered as the plugin's flags
    planned = {}
    for job in cluster.parse_dry_run(snakemake(root, "-n", "--configfile", "slurm.yaml").stdout):
        w = job["wildcards"]
        planned[job["rule"], w.get("model"), w.get("method", "zero-shot" if "zero" in job["rule"] else "")] = job
    state = root / "slurm-state"
    env = slurm_standin.install(root / "slurm-bin", state)
    (state / "faults.json").write_text(json.dumps({
        "pending_polls": 1, "fail_first": ["evaluate_zero_shot"],
        "term": {"rule": "zo_train", "model": "tiny-llama-big", "after_lines": 60}}))
    env["PATH"] = f"{root / 'slurm-bin'}:{BIN}:{os.environ['PATH']}"  # the stand-ins first, then this venv
    proc = snakemake(root, "--configfile", "slurm.yaml", "--jobs", "4", "--slurm-init-seconds-before-status-checks",
                     "1", profile="profiles/standin", env=env)
    log = proc.stdout + proc.stderr
    assert "SLURM run ID" in log  # the slurm executor, not the local one, ran the workflow

    jobs = sbatch_jobs(state)
    srun = {r["jobid"]: r for r in map(json.loads, (state / "srun.jsonl").read_text().splitlines())}
    for key, recs in jobs.items():
        rule, model, _ = key
        res = cfg["models"][model]["resources"]
        for attempt, rec in enumerate(recs, 1):
            flags = rec["flags"]
            print(f"sbatch {rule} {rec['wildcards']} attempt {attempt}: " + " ".join(
                f"{k}={v}" for k, v in flags.items() if k not in ("--wrap", "--output", "--job-name")))
            assert flags["--comment"].startswith(f"rule_{rule}_wildcards_")
            assert flags["--gpus"] == str(res["gpu"]), (rule, flags)  # a GPU, as many as the model asks
            assert flags["--mem"] == str(res["mem_mb"]), (rule, flags)
            assert flags["-t"] == str(res["runtime"] * attempt), (rule, flags)  # a retry asks for attempt x runtime
            assert flags["--cpus-per-task"] == "8", (rule, flags)  # cluster.cpus_per_task's default
            assert flags["--signal"] == "TERM@600", (rule, flags)  # SIGTERM early enough to save, from the profile
            assert flags["-A"] == slurm_standin.ACCOUNT and flags["-p"] == "gpu"  # guessed, validated, default partition
            assert flags["--parsable"] is True and flags["-D"] == str(root)
            if str(rec["jobid"]) in srun:  # inside the job, the jobstep plugin ran the rule through srun
                step = srun[str(rec["jobid"])]
                assert step["flags"]["--gpus"] == str(res["gpu"]) and "snakemake" in " ".join(step["command"])
            else:  # the node failure struck before the job started
                assert rule == "evaluate_zero_shot" and attempt == 1
        # `make budget`'s flags are the ones the plugin sent (first attempt)
        argv = " ".join(recs[0]["argv"])
        for flag in cluster.slurm_flags(planned[key]["resources"]).split():
            assert flag in argv.replace("'", ""), (key, flag, argv)
    assert collections.Counter(rule for rule, _, _ in jobs) == {
        "probe_outliers": 2, "probe_sensitivity": 2, "probe_gradnorm": 2, "zo_train": 2, "evaluate": 2,
        "evaluate_zero_shot": 2, "evaluate_calibrated": 2}
    assert {rule for rule, _, _ in jobs} == GPU_RULES
    retried = {key for key, recs in jobs.items() if len(recs) > 1}
    assert retried == {("zo_train", "tiny-llama-big", "dominant"), ("evaluate_zero_shot", "tiny-llama", "zero-shot")} \
        or retried == {("zo_train", "tiny-llama-big", "dominant"), ("evaluate_zero_shot", "tiny-llama-big", "zero-shot")}
    assert all(len(recs) == 2 for key, recs in jobs.items() if key in retried)
    big, small = jobs["zo_train", "tiny-llama-big", "dominant"][0]["flags"], jobs["zo_train", "tiny-llama", "dominant"][0]["flags"]
    assert int(big["--mem"]) > int(small["--mem"]) and int(big["-t"]) > int(small["-t"])  # scales with the model
    for rule in LIGHT_RULES - {"select_hyper"}:  # the light rules ran on the head node (no grid here)
        assert re.search(rf"^localrule {rule}:", log, re.M), rule
    tools = collections.Counter(json.loads(line)["tool"] for line in (state / "calls.jsonl").read_text().splitlines())
    assert tools["sacct"] >= 2 and tools["sacctmgr"] >= 1 and tools["sinfo"] >= 1  # account guess, check, status

    # every job was queued, seen PENDING by a status query, then ran; the two faults struck and were retried
    transitions = [json.loads(line) for line in (state / "transitions.jsonl").read_text().splitlines()]
    polls = [json.loads(line)["states"] for line in (state / "polls.jsonl").read_text().splitlines()]
    for recs in jobs.values():
        for rec in recs:
            seen = [p[str(rec["jobid"])] for p in polls if str(rec["jobid"]) in p]
            assert seen[0] == "PENDING" and seen[-1] in ("COMPLETED", "FAILED"), (rec["jobid"], seen)
            states = [t["state"] for t in transitions if t["jobid"] == rec["jobid"] and "state" in t]
            assert states[:2] == ["PENDING", "RUNNING"] or states == ["PENDING", "FAILED"], states
    assert any("RUNNING" in p.values() for p in polls)  # a job seen running across polls
    signalled = [t for t in transitions if t.get("signal") == "TERM"]
    assert len(signalled) == 1 and signalled[0]["jobid"] == jobs["zo_train", "tiny-llama-big", "dominant"][0]["jobid"]
    ends = {t["jobid"]: t for t in transitions if t.get("state") in ("COMPLETED", "FAILED")}
    assert ends[signalled[0]["jobid"]]["exit_code"] != 0  # the training saved and exited 128 + 15

    # complete outputs, each made by the SLURM job recorded for it (or on the head node: no job id)
    res = root / "results/tiny"
    acc = pd.read_csv(res / "tables/accuracy.csv")
    assert set(acc["model"]) == {"tiny-llama", "tiny-llama-big"}
    assert set(acc["method"]) == {"zero-shot", "calibrated-zero-shot", "dominant"} and acc["mean"].between(0, 100).all()
    commit = head_commit(root)
    for model in cfg["models"]:
        def made_by(rule, method=""):
            return str(jobs[rule, model, method][-1]["jobid"])

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

    # the training stopped by SIGTERM resumed from its trajectory and ends as the same run uninterrupted does
    run = res / "train/tiny-llama-big/sst2/dominant/seed0"
    resumed = json.loads((run / "log.json").read_text())
    assert 0 < resumed["resumed_from_step"] < 200, resumed["resumed_from_step"]
    argv = resumed["provenance"]["argv"][1:]
    out = argv.index("--out") + 1
    argv[out] = str(root / "uninterrupted")
    subprocess.run([str(BIN / "python"), "-m", "dlzo.train", *argv], cwd=root, check=True, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=str(root / "src")))
    straight = json.loads((root / "uninterrupted/log.json").read_text())
    assert straight["resumed_from_step"] == 0
    for name in ("trajectory.jsonl", "tuned.safetensors"):
        assert (run / name).read_bytes() == (root / "uninterrupted" / name).read_bytes(), name
    for key in ("dev_curve", "best_step", "best_dev_loss", "train_curve", "hyper"):
        assert resumed[key] == straight[key], key
    again = snakemake(root, "-n", "--configfile", "slurm.yaml")
    assert "Nothing to be done" in again.stdout + again.stderr
