"""The 7B rehearsal (workflow/configs/rehearsal-7b.yaml) and its CPU twin: the `random:` model source, and the
rehearsal's own config run for real through the tables with the model source replaced by the scaled twin
(random:llama2-7b:64: LLaMA2-7B's 32 layers, 32000-token vocabulary and layout at hidden 64).

The twin differs from the GPU rehearsal in exactly these ways, each because of the CPU:
* the model source, random:llama2-7b:64 (5.7M parameters) instead of random:llama2-7b (6.7B);
* models.<name>.dtype bf16 instead of fp16: fp16 matmuls on CPU are 6x slower than fp32 (bf16 is the fastest
  there); it keeps what the check is for, half-precision ZO weights beside fp32 first-order checkpoints;
* methods.SAVE_TENSORS_UP_TO (5e8 tuned parameters, above which a ZO run saves a replay marker instead of its
  tensors) scaled in the copy's source by the twin's size over LLaMA2-7B's, so that the twin takes the 7B run's
  branch for every method (mezo-full and sparse-mezo: replay; the layer and LoRA methods: tensors); the test
  checks that the decisions agree with the full-size parameter counts of dlzo.architectures.
"""
import json
import math
import re

import pandas as pd
import pytest
import yaml
from safetensors import safe_open

from dlzo import DLZOError
from dlzo import methods as M
from dlzo.architectures import get_architecture, layer_params, lora_params, total_params
from dlzo.download import download, parse_source
from workflow_support import copy_workflow, snakemake

CONFIG = "workflow/configs/rehearsal-7b.yaml"
TWIN_SOURCE, DIVISOR = "random:llama2-7b:64", 64


def rehearsal_config(root) -> tuple[str, dict]:
    cfg = yaml.safe_load((root / CONFIG).read_text())
    (name,) = cfg["models"]
    return name, cfg


def tuned_at(arch: dict, method: str, r: int) -> int:
    """The parameters a ZO method tunes in a model of ``arch`` (its run's n_params: sparse-mezo counts every one)."""
    m = M.parse_method(method)
    if m.is_lora:
        return lora_params(arch, r, layers=1 if m.is_single_layer else None)
    return layer_params(arch) if m.is_single_layer else total_params(arch)


# --- the random: source ---------------------------------------------------------------------------------------

def test_random_sources_parse_and_bad_ones_are_named():
    assert parse_source("random:llama2-7b") == ("random", ["llama2-7b", "1"])
    assert parse_source("random:qwen3-8b:32") == ("random", ["qwen3-8b", "32"])
    for bad in ("random:", "random:llama3-70b", "random:llama2-7b:x", "random:llama2-7b:3", "random:llama2-7b:2:1"):
        with pytest.raises(DLZOError, match="model source"):
            parse_source(bad)


def test_random_twin_is_the_published_shape_scaled_deterministic_and_checked(tmp_path):
    """random:llama2-7b:64: 32 layers, vocabulary 32000, fp16 as LLaMA2-7B's checkpoint, the byte tokenizer, seed 0
    (the same bytes twice); a wrong num_layers fails before anything is built."""
    meta = download(TWIN_SOURCE, tmp_path / "a", num_layers=32)
    download(TWIN_SOURCE, tmp_path / "b")
    assert meta["num_layers"] == 32 and meta["hidden_size"] == 64 and meta["architecture"] == "LlamaForCausalLM"
    arch = get_architecture("llama2-7b", DIVISOR)
    assert meta["random"] == {"architecture": "llama2-7b", "width_divisor": 64, "seed": 0, "dtype": "float16",
                              "params": total_params(arch), "published_params": 6_738_415_616,
                              "tokenizer": "byte (259 tokens)"}
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["vocab_size"] == 32000 and config["dtype"] == "float16" and config["num_hidden_layers"] == 32
    with safe_open(str(tmp_path / "a" / "model.safetensors"), "pt") as fh:
        assert {str(fh.get_slice(k).get_dtype()) for k in fh.keys()} == {"F16"}
    for name in ("model.safetensors", "tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    from dlzo.models import load_tokenizer

    assert len(load_tokenizer(tmp_path / "a")) == 259 <= config["vocab_size"]
    with pytest.raises(DLZOError, match="num_layers: 30"):
        download("random:llama2-7b", tmp_path / "x", num_layers=30)  # before a 13.5 GB build
    assert not (tmp_path / "x").exists()


def test_rehearsal_config_is_the_paper_route_at_7b_shape():
    """The GPU rehearsal: LLaMA2-7B's architecture (sized as such), fp16, every method, a 3-layer sweep, the
    dominant layer pinned (a random model has no outlier layer), CUDA when present; it plans."""
    from conftest import REPO

    name, cfg = rehearsal_config(REPO)
    model = cfg["models"][name]
    assert model["source"] == "random:llama2-7b" and model["architecture"] == "llama2-7b"
    assert model["num_layers"] == get_architecture("llama2-7b")["num_hidden_layers"] and model["dtype"] == "fp16"
    assert set(cfg["methods"]) == {"zero-shot", "mezo-full", "lora-zo", "dominant", "dominant-lora", "sparse-mezo",
                                   "fo-adamw", "fo-layer-1"}
    assert cfg["dominant_layer"] == {name: 1} and len(cfg["sweep_layers"]) == 3
    assert set(cfg["tasks"]) == {"sst2", "copa"}
    assert cfg["runtime"]["device"] == "auto"
    plan = snakemake(REPO, "-n", "--configfile", CONFIG)
    assert "download_model" in plan.stdout and "tables" in plan.stdout


# --- the CPU twin, run through the tables -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    """The rehearsal's config run by Snakemake (2 cores) in a copy of the workflow, with the CPU twin's differences
    (this module's docstring)."""
    root = copy_workflow(tmp_path_factory.mktemp("rehearsal-twin"))
    name, cfg = rehearsal_config(root)
    cfg["models"][name]["source"] = TWIN_SOURCE
    cfg["models"][name]["dtype"] = "bf16"
    twin_cfg = root / "workflow/configs/rehearsal-7b-twin.yaml"
    twin_cfg.write_text(yaml.safe_dump(cfg, sort_keys=False))
    scale = total_params(get_architecture("llama2-7b", DIVISOR)) / total_params(get_architecture("llama2-7b"))
    methods = root / "src/dlzo/methods.py"
    src, n = re.subn(r"^SAVE_TENSORS_UP_TO = [\d_]+", f"SAVE_TENSORS_UP_TO = {int(M.SAVE_TENSORS_UP_TO * scale)}",
                     methods.read_text(), flags=re.M)
    assert n == 1, "methods.SAVE_TENSORS_UP_TO moved: update this test"
    methods.write_text(src)
    snakemake(root, "--cores", "2", "--configfile", str(twin_cfg))
    return root / cfg["results"], name, cfg, int(M.SAVE_TENSORS_UP_TO * scale)


@pytest.mark.slow
def test_rehearsal_twin_runs_every_method_through_the_tables(twin):
    res, name, cfg, threshold = twin
    full, small = get_architecture("llama2-7b"), get_architecture("llama2-7b", DIVISOR)
    r = cfg["train"]["lora"]["r"]
    trained = [m for m in cfg["methods"] if m not in M.EVAL_ONLY]
    sweep = [f"layer-{i}" for i in cfg["sweep_layers"]]
    # every method's evaluation on every task (the sweep on its tasks), a finite number
    for task in cfg["tasks"]:
        runs = trained + (sweep if task in cfg.get("sweep_tasks", cfg["tasks"]) else [])
        for path in [res / f"eval/{name}/{task}/zero-shot.json", res / f"eval/{name}/{task}/calibrated-zero-shot.json",
                     *(res / f"eval/{name}/{task}/{m}/seed0.json" for m in runs)]:
            value = json.loads(path.read_text())["value"]
            assert math.isfinite(value) and 0 <= value <= 1, path
    model = json.loads((res / f"models/{name}/dlzo_model.json").read_text())
    assert model["num_layers"] == 32 and model["random"]["published_params"] == total_params(full)
    # random weights: the probe finds no outlier layer; the dominant methods train the pinned layer 1
    assert json.loads((res / f"probe/{name}/probe.json").read_text())["first_outlier_layer"] is None
    for task in cfg["tasks"]:
        for method in trained:
            log = json.loads((res / f"train/{name}/{task}/{method}/seed0/log.json").read_text())
            with safe_open(str(res / f"train/{name}/{task}/{method}/seed0/tuned.safetensors"), "pt") as fh:
                info, dtypes = json.loads(fh.metadata()["dlzo"]), {str(fh.get_slice(k).get_dtype()) for k in fh.keys()}
            if M.parse_method(method).is_dominant:
                assert (log["layer"], log["layer_from"]) == (1, "pinned"), method
            if M.parse_method(method).is_fo:  # fp32 master weights, checkpointed as such beside a bf16/fp16 model
                assert log["hyper"]["weights_dtype"] == "float32" and dtypes == {"F32"} and not info["replay"], method
                continue
            assert log["provenance"]["dtype"] == "bfloat16", method
            # the 7B run's choice (its full-size count against SAVE_TENSORS_UP_TO) is the twin's (scaled)
            replay_at_7b = tuned_at(full, method, r) > M.SAVE_TENSORS_UP_TO
            assert (tuned_at(small, method, r) > threshold) == replay_at_7b, method
            assert log["tuned_params" if method != "sparse-mezo" else "tensor_params"] == tuned_at(small, method, r)
            # a replay marker holds no tensors: its evaluation (above) could only have replayed the trajectory
            assert info["replay"] == replay_at_7b and (dtypes == set()) == replay_at_7b, method
            assert replay_at_7b == (method in ("mezo-full", "sparse-mezo")), method
    acc = pd.read_csv(res / "tables/accuracy.csv")
    assert set(acc["method"]) == {*cfg["methods"], *sweep, "calibrated-zero-shot", "best layer (dev)"}
    assert set(acc["task"]) == {*cfg["tasks"], "avg"} and acc["mean"].between(0, 100).all()
    for table in ("accuracy.md", "speedup.md", "paper_comparison.md", "layer_ranking.md", "provenance.json",
                  "layer_sweep.png", "loss_curves.png", "memory_accuracy.png"):
        assert (res / "tables" / table).stat().st_size > 0, table
