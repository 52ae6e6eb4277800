"""What each job asks a cluster for (dlzo.cluster): sized from the job, overridden by the config, grown on a
retry; the published architectures it sizes from; the budget's reading of a dry run."""
import pytest

from dlzo import DLZOError, cluster as C
from dlzo.architectures import ARCHITECTURES, layer_params, lora_params, total_params

LLAMA = C.Shape.of({"architecture": "llama2-7b", "num_layers": 32, "dtype": "fp16"}, 8, "fp16")
PAPER = dict(C.DEFAULTS, big_gpu={"gpu_model": "h200"})


def train(method, task="sst2", steps=10000, **kw):
    return C.Job("zo_train", LLAMA, task=task, method=method, steps=steps, eval_every=2000,
                 sizes=(1000, 500, 872), **kw)


def test_published_architectures_have_their_published_sizes():
    # the parameter counts of the checkpoints' model cards / safetensors indexes
    assert total_params(ARCHITECTURES["llama2-7b"]) == 6_738_415_616
    assert total_params(ARCHITECTURES["qwen3-8b"]) == 8_190_735_360
    assert total_params(ARCHITECTURES["smollm2-135m"]) == 134_515_008
    assert layer_params(ARCHITECTURES["llama2-7b"]) == 202_383_360
    assert lora_params(ARCHITECTURES["llama2-7b"], 8) == 32 * 8 * (4096 + 4096) * 2  # q and v, every layer


def test_training_is_sized_from_method_task_layer_and_steps():
    full, layer1, layer30 = (C.expected_minutes(train(m), C.DEFAULTS) for m in ("mezo-full", "layer-1", "layer-30"))
    assert layer30 < layer1 < full  # the prefix cache: a later layer runs fewer layers a step
    assert C.expected_minutes(train("mezo-full", "multirc"), C.DEFAULTS) > 5 * full  # 500 tokens vs 43
    assert C.expected_minutes(train("mezo-full", steps=20000), C.DEFAULTS) > 1.9 * full
    # a first-order run of 5 epochs (310 steps) is far shorter than 10k ZO steps
    fo = C.expected_minutes(train("fo-adamw", steps=310), C.DEFAULTS)
    assert fo < full / 5


def test_evaluation_asks_for_minutes_and_training_for_hours():
    ev = C.job_resources(C.Job("evaluate", LLAMA, task="sst2", method="layer-1", steps=10000,
                               sizes=(1000, 500, 872)), PAPER, {})
    tr = C.job_resources(train("mezo-full", "boolq"), PAPER, {})
    assert ev["runtime"] <= 30 and tr["runtime"] >= 120
    assert ev["gpu"] == tr["gpu"] == 1 and tr["cpus_per_task"] == 8
    assert tr["expected_min"] * 1.5 <= tr["runtime"]  # the margin
    # a 7B mezo-full run keeps no tensors: its evaluation replays its trajectory, and asks for that time
    replay = C.job_resources(C.Job("evaluate", LLAMA, task="sst2", method="mezo-full", steps=10000,
                                   sizes=(1000, 500, 872)), PAPER, {})
    assert replay["runtime"] > ev["runtime"]


def test_retry_grows_runtime_and_config_overrides_win():
    job = train("layer-1")
    first, second = C.job_resources(job, PAPER, {}), C.job_resources(job, PAPER, {}, attempt=2)
    assert second["runtime"] == 2 * first["runtime"] and second["mem_mb"] == first["mem_mb"]
    own = C.job_resources(job, PAPER, {"runtime": 100, "slurm_partition": "long"}, attempt=3)
    assert own["runtime"] == 300 and own["slurm_partition"] == "long"


def test_first_order_full_model_asks_for_the_big_gpu():
    fo = C.job_resources(train("fo-adamw", steps=310), PAPER, {})
    assert fo["gpu_model"] == "h200" and C.gpu_memory_gb(train("fo-adamw")) > 100
    assert "gpu_model" not in C.job_resources(train("fo-layer-1", steps=310), PAPER, {})  # 27 GB + one layer's
    with pytest.raises(DLZOError, match=r"cluster.big_gpu.*fo-adamw"):
        C.job_resources(train("fo-adamw", steps=310), C.DEFAULTS, {})


def test_disk_counts_what_each_run_keeps():
    assert C.disk_mb(train("mezo-full")) == 100  # replayed from its trajectory: no 13 GB tensors per run
    assert C.disk_mb(train("layer-3")) == pytest.approx(202_383_360 * 2 / 1e6 + 100, abs=1)
    assert C.disk_mb(train("fo-adamw")) == pytest.approx(6_738_415_616 * 4 / 1e6, abs=1)  # fp32


def test_an_unsized_model_keeps_its_configured_resources():
    job = C.Job("zo_train", None, task="sst2", method="layer-1")
    assert C.job_resources(job, None, {"gpu": 0, "mem_mb": 2000, "runtime": 10}, attempt=2) == dict(
        gpu=0, cpus_per_task=8, mem_mb=2000, runtime=20, expected_min=0, disk_mb=0)


DRY_RUN = """Building DAG of jobs...
[Mon Dec  7 14:09:22 2026]
localrule download_model:
    output: results/models/m
    wildcards: model=m
    resources: tmpdir=/tmp, mem_mb=8000, disk_mb=13477, disk=13 GB
[Mon Dec  7 14:09:22 2026]
rule zo_train:
    output: results/train/m/sst2/fo-adamw@lr1e-05/seed0/log.json
    wildcards: model=m, task=sst2, method=fo-adamw@lr1e-05, seed=0
    resources: tmpdir=/tmp, cpus_per_task=8, expected_min=30, gpu=1, gpu_model=h200, runtime=60, disk_mb=26954, mem_mb=59000
[Mon Dec  7 14:09:22 2026]
rule zo_train:
    output: results/train/m/sst2/layer-3/seed0/log.json
    wildcards: model=m, task=sst2, method=layer-3, seed=0
    resources: tmpdir=/tmp, cpus_per_task=8, expected_min=40, gpu=1, runtime=70, disk_mb=505, mem_mb=25000
"""


def test_budget_reads_a_dry_run():
    jobs = C.parse_dry_run(DRY_RUN)
    assert [(j["rule"], j["local"]) for j in jobs] == [("download_model", True), ("zo_train", False), ("zo_train", False)]
    text = C.budget(jobs, ["train"])
    assert "zo_train                  2                2               1  60-70" in text
    assert "-t 60 --mem 59000 --gpus=h200:1 --cpus-per-task=8" in text
    assert C.slurm_flags(jobs[2]["resources"]) == "-t 70 --mem 25000 --gpus=1 --cpus-per-task=8"
    with pytest.raises(DLZOError, match="no jobs"):
        C.parse_dry_run("something else")
