"""What each job asks a cluster for, sized from the job, and the plan's budget before anyone submits.

Torch-free: ``workflow/rules/common.smk`` calls :func:`job_resources` for every GPU job, and
``python -m dlzo.cluster budget`` (``make budget``) reads a Snakemake dry-run of the plan.

**The sizing model.** A job's expected GPU minutes are its floating-point work at an achieved rate
(``cluster.tflops``, default 100 TFLOP/s: about a third of an A100's or H100's dense fp16/bf16 peak, what
batch-16 forward passes of a 7B model reach) plus its passes over the tuned weights at an achieved memory
bandwidth (``cluster.tbps``, default 1.5 TB/s):

* a forward pass costs 2 FLOPs per parameter it runs per token, a backward pass twice that;
* a ZO step runs two forward passes of its batch (16 examples at the task's padded length,
  ``TaskSpec.tokens``, times its candidates unless the candidates share their prompt), over the layers from
  the tuned one on (the frozen layers before it run once per sequence: the prefix cache), plus MeZO's four
  draws of z over the tuned weights (read and write: 8 passes over their bytes);
* a first-order step is a forward and a backward pass over the whole depth plus AdamW over the tuned weights
  (fp32: weights, gradient and two moments, read and written);
* every dev checkpoint scores the dev split (``steps / eval_every + 1`` of them); a tuned run that is
  rebuilt by replay at evaluation time (a 7B ``mezo-full``: no tensors saved) costs its perturbation passes;
* evaluation scores the test split (generation: 50 new tokens, one weight read per token and batch).

The request is ``expected x cluster.margin (1.5) + cluster.overhead_min (10: queue start, env, model
load)``, rounded up to 5 minutes, times Snakemake's ``attempt``: a retried job (the profile's ``retries``)
has room to finish. Memory on the host holds the weights as loaded (plus, for first-order runs, the fp32
copy its checkpoints are written from); a job whose GPU memory (weights, and 16 bytes a tuned parameter for
AdamW) exceeds ``cluster.gpu_memory_gb`` asks for ``cluster.big_gpu`` (e.g. ``{gpu_model: h200}``).
``resources.<rule>`` and ``models.<name>.resources`` (and its ``<rule>`` entries) in the config win over every
sized value. Recalibrate ``tflops`` from the first jobs' benchmark files (``benchmarks/``): the budget prints
expected next to requested.
"""
from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from dlzo import DLZOError
from dlzo import methods as M
from dlzo.architectures import get_architecture, layer_params, lora_params, total_params
from dlzo.tasks import TASKS

PIPELINE_ORDER = ("download_model", "prepare_data", "probe_outliers", "probe_sensitivity", "probe_gradnorm", "plot_probe",
                  "plot_sensitivity", "plot_predictors", "zo_train", "select_hyper", "evaluate", "evaluate_zero_shot",
                  "evaluate_calibrated", "tables")
GPU_RULES = ("probe_outliers", "probe_sensitivity", "probe_gradnorm", "zo_train", "evaluate",
             "evaluate_zero_shot", "evaluate_calibrated")
DEFAULTS = dict(tflops=100.0, tbps=1.5, margin=1.5, overhead_min=10, gpu_memory_gb=80, cpus_per_task=8)
DTYPE_BYTES = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2}
NEW_TOKENS = 50            # generation tasks' answer budget (dlzo.tokens.MAX_NEW_TOKENS)
GB = 1e9


@dataclass(frozen=True)
class Shape:
    """A model's size: every parameter, one decoder layer's, LoRA's (per layer), and its weights' bytes on the GPU."""
    params: int
    layer: int
    lora_per_layer: int
    layers: int
    bytes: int
    checkpoint_bytes: int

    @classmethod
    def of(cls, entry: dict, lora_r: int, dtype: str) -> Shape | None:
        """From ``models.<name>``: its ``architecture`` (dlzo.architectures), else its ``params``; None: unsized."""
        layers = int(entry["num_layers"])
        weight_bytes = DTYPE_BYTES.get(entry.get("dtype") or dtype, 2)
        if entry.get("architecture"):
            arch = get_architecture(entry["architecture"])
            return cls(total_params(arch), layer_params(arch), lora_params(arch, lora_r, layers=1), layers,
                       weight_bytes, DTYPE_BYTES[arch["torch_dtype"]])
        if entry.get("params"):  # a model of your own: its layers hold (nearly) all of it
            p = int(float(entry["params"]))
            return cls(p, p // layers, 0, layers, weight_bytes, 2)
        return None


@dataclass(frozen=True)
class Job:
    """What sizes a job, from the config: its rule, model shape, task, method (training and evaluation)."""
    rule: str
    shape: Shape | None
    task: str | None = None
    method: str | None = None
    steps: int = 0
    eval_every: int = 1
    batch_size: int = 16
    sizes: tuple[int, int, int] = (0, 0, 0)   # train, dev (scored at each checkpoint), test
    shared_prompt: bool = False
    layer_hint: int = 1                       # the dominant methods' layer is the probe's: assume an early one
    probe: tuple[int, int, int] = (0, 0, 0)   # per-layer profiles: draws k, batches, tokens per sequence


def _forward_s(params_run: float, tokens: float, c: dict, nbytes: int = 2) -> float:
    """A forward pass: its FLOPs at the achieved rate, or reading its weights once if that takes longer (small
    batches are bound by memory, not arithmetic)."""
    return max(2 * params_run * tokens / (c["tflops"] * 1e12), _pass_s(params_run * nbytes, c))


def _pass_s(nbytes: float, c: dict) -> float:
    return nbytes / (c["tbps"] * 1e12)


def _task_tokens(job: Job, examples: int, training: bool = False) -> float:
    """Tokens that ``examples`` examples run: training (and its dev loss) scores the gold continuation only for an
    "lm" objective and one sequence an example when candidates share their prompt; evaluation every candidate."""
    spec = TASKS[job.task]
    seqs = 1 if training and (spec.objective == "lm" or job.shared_prompt) else spec.choices
    return examples * spec.tokens * seqs


def tuned_params(job: Job) -> int:
    m, s = M.parse_method(job.method), job.shape
    if m.is_lora:
        return s.lora_per_layer * (1 if m.is_single_layer else s.layers)
    return s.layer if m.is_single_layer else s.params


def _layer(job: Job) -> int:
    m = M.parse_method(job.method)
    return m.layer if m.layer is not None else job.layer_hint


def expected_minutes(job: Job, c: dict) -> float:
    """The job's expected GPU minutes under the sizing model (module docstring)."""
    s, j = job.shape, job
    seconds = 0.0
    if j.rule == "zo_train":
        m = M.parse_method(j.method)
        tuned = tuned_params(j)
        batch = _task_tokens(j, j.batch_size, training=True)
        if m.is_fo:
            step = 3 * _forward_s(s.params, batch, c) + _pass_s(tuned * 16 * 2, c)
        else:
            depth = (s.layers - _layer(j)) / s.layers if m.is_single_layer and not m.is_lora else 1.0
            step = 2 * _forward_s(s.params * depth, batch, c) + _pass_s(tuned * s.bytes * 8, c)
        checkpoints = math.ceil(j.steps / max(j.eval_every, 1)) + 1
        dev = checkpoints * _forward_s(s.params, _task_tokens(j, j.sizes[1], training=True), c)
        prefix = _forward_s(s.params, _task_tokens(j, j.sizes[0], training=True), c) if m.is_single_layer else 0
        seconds = j.steps * step + dev + prefix
    elif j.rule in ("evaluate", "evaluate_zero_shot"):
        seconds = _forward_s(s.params, _task_tokens(j, j.sizes[2]), c)
        if TASKS[j.task].kind == "generate":
            seconds += math.ceil(j.sizes[2] / j.batch_size) * NEW_TOKENS * _pass_s(s.params * s.bytes, c)
        if j.rule == "evaluate" and tuned_params(j) > M.SAVE_TENSORS_UP_TO and not M.parse_method(j.method).is_fo:
            seconds += j.steps * _pass_s(tuned_params(j) * s.bytes * 8, c)  # rebuilt by replaying its trajectory
    elif j.rule == "evaluate_calibrated":
        seconds = _forward_s(s.params, _task_tokens(j, sum(j.sizes)), c)
    elif j.rule == "probe_outliers":
        seconds = _forward_s(s.params, j.probe[1] * j.probe[2], c)
    elif j.rule == "probe_sensitivity":  # every layer: k draws x batches x two passes of a batch
        k, batches, tokens = j.probe
        seconds = s.layers * k * batches * 2 * _forward_s(s.params, j.batch_size * tokens, c)
    elif j.rule == "probe_gradnorm":
        _, batches, tokens = j.probe
        seconds = batches * 3 * _forward_s(s.params, j.batch_size * tokens, c)
    return seconds / 60


def gpu_memory_gb(job: Job) -> float:
    """Weights on the GPU, and for first-order runs fp32 master weights plus gradient and AdamW moments."""
    s = job.shape
    if job.rule == "zo_train" and M.parse_method(job.method).is_fo:
        return (s.params * 4 + tuned_params(job) * 12) / GB
    return s.params * s.bytes / GB


def disk_mb(job: Job) -> int:
    """What the job writes that is big: a training run's tuned tensors (first-order: fp32, and on a signal its
    weights and AdamW moments besides), a downloaded model's weights."""
    s = job.shape
    if job.rule == "download_model":
        return math.ceil(s.params * s.checkpoint_bytes / 1e6)
    if job.rule != "zo_train":
        return 100
    tuned = tuned_params(job)
    if M.parse_method(job.method).is_fo:
        return math.ceil(tuned * 4 / 1e6)
    return math.ceil((tuned * s.bytes if tuned <= M.SAVE_TENSORS_UP_TO else 0) / 1e6) + 100


def job_resources(job: Job, cluster: dict, overrides: dict, attempt: int = 1) -> dict:
    """The job's resources: sized (module docstring), then the config's overrides (already merged for this rule
    and model); ``runtime`` times ``attempt``. ``expected_min`` is the sizing model's own estimate, for the budget."""
    c = {**DEFAULTS, **(cluster or {})}
    out = dict(gpu=1, cpus_per_task=int(c["cpus_per_task"]), mem_mb=8000, runtime=60, expected_min=0, disk_mb=0)
    if job.shape is not None:
        expected = expected_minutes(job, c)
        host = job.shape.params * job.shape.bytes
        if job.rule == "zo_train" and M.parse_method(job.method).is_fo:
            host += tuned_params(job) * 4  # the fp32 best checkpoint, copied to the host to be written
        out.update(mem_mb=math.ceil((host * 1.25 + 8 * GB) / 1e6 / 1000) * 1000,
                   runtime=max(15, 5 * math.ceil((expected * c["margin"] + c["overhead_min"]) / 5)),
                   expected_min=math.ceil(expected), disk_mb=disk_mb(job))
        if gpu_memory_gb(job) > c["gpu_memory_gb"]:
            if not c.get("big_gpu"):
                raise DLZOError(f"config error at `cluster.big_gpu`: a {job.rule} job of {job.method} needs about "
                                f"{gpu_memory_gb(job):.0f} GB of GPU memory, more than cluster.gpu_memory_gb "
                                f"({c['gpu_memory_gb']}); name your site's bigger GPU, e.g. {{gpu_model: h200}}")
            out.update(c["big_gpu"])
    out.update(overrides)
    out["runtime"] = int(out["runtime"]) * attempt
    return out


# ------------------------------------------------------------------------------------------ the budget

# rough sizes of what the envs install (torch with its CUDA libraries is most of it)
ENV_GB = {"train": 7.0, "evaluate": 7.5, "models": 7.0, "data": 1.0, "tables": 0.5}


def parse_dry_run(text: str) -> list[dict]:
    """Every job of a ``snakemake -n`` listing: its rule, wildcards and resources."""
    jobs = []
    for block in re.split(r"\n(?=\[[^\]]+\]\n(?:local)?rule \w+:)", text):
        head = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        if not head:
            continue
        wc = re.search(r"^\s+wildcards: (.*)$", block, re.M)
        res = re.search(r"^\s+resources: (.*)$", block, re.M)
        resources = {}
        for item in (res.group(1).split(", ") if res else []):
            key, _, value = item.partition("=")
            resources[key] = int(value) if value.isdigit() else value
        jobs.append(dict(rule=head.group(1), local=block.lstrip().split("\n", 1)[-1].startswith("localrule"),
                         wildcards=dict(kv.split("=", 1) for kv in wc.group(1).split(", ")) if wc else {},
                         resources=resources))
    if "Nothing to be done" not in text and not jobs:
        raise DLZOError("no jobs found in the dry-run output: is it `snakemake -n` output (Snakemake 9)?")
    return jobs


def output_kind(job: dict) -> str:
    method = job["wildcards"].get("method", "").split("@")[0]
    if job["rule"] == "download_model":
        return "model weights (as downloaded)"
    if job["rule"] != "zo_train":
        return "data, probes, evaluations, tables"
    if M.parse_method(method).is_fo:
        return "first-order runs' tuned tensors (fp32)"
    if M.is_sweep(method):
        return "sweep tensors (one layer a run)"
    return "other ZO runs' tuned tensors (a 7B full-model run keeps its trajectory only)"


def slurm_flags(res: dict) -> str:
    """The sbatch flags snakemake-executor-plugin-slurm makes of a job's resources (its submit_string.py)."""
    flags = [f"-t {res['runtime']}"] if res.get("runtime") else []
    if res.get("constraint"):
        flags.append(f"-C {res['constraint']}")
    if res.get("mem_mb"):
        flags.append(f"--mem {res['mem_mb']}")
    if res.get("gpu"):
        flags.append(f"--gpus={res['gpu_model']}:{res['gpu']}" if res.get("gpu_model") else f"--gpus={res['gpu']}")
    flags.append(f"--cpus-per-task={res.get('cpus_per_task') or 1}")
    return " ".join(flags)


def _family(job: dict) -> str:
    """A training or evaluation job's method without its grid tag, the sweep's layers as one (``layer-<i>``)."""
    method = job["wildcards"].get("method", "").split("@")[0]
    return "layer-<i>" if M.is_sweep(method) else method


def budget(jobs: list[dict], envs: list[str]) -> str:
    """The plan's jobs per rule, GPU-hours requested and expected, disk per output kind, and the sbatch flags of
    the longest job of each (rule, model, method) for the first model."""
    rows = defaultdict(lambda: dict(jobs=0, gpu_h=Fraction(0), expected_h=Fraction(0), runtime=[]))
    disk, examples = defaultdict(Fraction), {}
    for job in jobs:
        res = job["resources"]
        if job["rule"] == "all":
            continue
        row = rows[job["rule"]]
        row["jobs"] += 1
        disk[output_kind(job)] += Fraction(res.get("disk_mb", 0), 1000)
        if job["local"] or not res.get("gpu"):
            continue
        row["gpu_h"] += Fraction(res["gpu"] * res.get("runtime", 0), 60)  # exact: the same total in any job order
        row["expected_h"] += Fraction(res["gpu"] * res.get("expected_min", 0), 60)
        row["runtime"].append(res.get("runtime", 0))
        key = (job["wildcards"].get("model"), job["rule"], _family(job))
        rank = (res.get("runtime", 0), sorted(job["wildcards"].items()))  # the longest, ties by name: stable
        if key not in examples or rank > examples[key][0]:
            examples[key] = (rank, job)
    lines = ["jobs and GPU time (requested: what SLURM reserves at the first attempt; expected: the sizing model's",
             "estimate, dlzo.cluster)",
             f"  {'rule':<20} {'jobs':>6} {'GPU-h requested':>16} {'GPU-h expected':>15}  runtime per job (min)"]
    for rule, r in sorted(rows.items(), key=lambda kv: PIPELINE_ORDER.index(kv[0]) if kv[0] in PIPELINE_ORDER else 99):
        span = f"{min(r['runtime'])}-{max(r['runtime'])}" if r["runtime"] else "head node"
        lines.append(f"  {rule:<20} {r['jobs']:>6} {float(r['gpu_h']):>16,.0f} {float(r['expected_h']):>15,.0f}  {span}")
    total = {k: sum(r[k] for r in rows.values()) for k in ("jobs", "gpu_h", "expected_h")}
    lines.append(f"  {'total (+ the all target)':<20} {total['jobs']:>6} {float(total['gpu_h']):>16,.0f} "
                 f"{float(total['expected_h']):>15,.0f}")
    lines.append("disk, GB (what the jobs keep; an interrupted first-order run holds 3x its size more until it resumes:")
    lines.append("its fp32 weights and AdamW moments)")
    for kind, gb in sorted(disk.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {kind:<76} {float(gb):>9,.0f}")
    lines.append(f"  {'conda envs: ' + ', '.join(envs) + ' (estimated)':<76} {sum(ENV_GB.get(e, 1) for e in envs):>9,.0f}")
    first = min((m for m, _, _ in examples if m), default=None)
    lines.append(f"sbatch flags of the longest job of each rule and method, {first} (snakemake-executor-plugin-slurm's")
    lines.append("mapping; plus the profile's slurm_extra, account and partition)")
    for (model, rule, family), (_, job) in sorted(examples.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        if model == first:
            wc = ",".join(f"{k}={v}" for k, v in job["wildcards"].items() if k != "model")
            lines.append(f"  {rule:<20} {wc:<58} {slurm_flags(job['resources'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="The plan's budget: jobs per rule, GPU-hours, disk, SLURM flags.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("budget", help="run `snakemake -n` with the given arguments and sum its jobs")
    b.add_argument("snakemake_args", nargs=argparse.REMAINDER, help="after --: snakemake's arguments")
    args = ap.parse_args(argv)
    extra = [a for a in args.snakemake_args if a != "--"]
    cmd = [sys.executable, "-m", "snakemake", "-n", "--workflow-profile", "none", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DLZOError(f"`{' '.join(cmd)}` failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    jobs = parse_dry_run(proc.stdout + proc.stderr)
    rules = "".join(p.read_text() for p in Path("workflow/rules").glob("*.smk"))
    envs = sorted(set(re.findall(r"envs/(\w+)\.yaml", rules)))
    print(budget(jobs, envs))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DLZOError as err:
        sys.exit(f"dlzo.cluster: {err}")
