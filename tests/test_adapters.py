"""LoRA runs as standard peft adapters: training writes ``<run>/adapter/`` (the best checkpoint's tensors, in peft's
own format), plain transformers + peft load it to dlzo's own logits bit for bit, ``python -m dlzo.tuning export
--adapter`` writes one for any LoRA run (from its tensors or by replay), and ``export`` still writes a model folder
with LoRA merged."""
import json

import pytest
import torch
from safetensors.torch import load_file

from dlzo import DLZOError
from dlzo.evaluate import recheck_command
from dlzo.train import main as train
from dlzo.tuning import load_tuned_model
from dlzo.tuning import main as tuning

CPU = torch.device("cpu")
# (method, --save-tuned): lora-zo's best dev step is 4 of 6 (finalize rebuilds it by replay), layer-1-lora's the last
RUNS = {"lora-zo": ("lora-zo", "tensors"), "layer-1-lora": ("layer-1-lora", "tensors"),
        "replayed": ("lora-zo", "replay")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, sst2_data):
    root = tmp_path_factory.mktemp("lora_runs")
    for name, (method, save) in RUNS.items():
        assert train(["--model", str(tiny_model), "--data", str(sst2_data), "--task", "sst2", "--method", method,
                      "--seed", "0", "--out", str(root / name), "--steps", "6", "--batch-size", "2",
                      "--eval-every", "2", "--lr", "1e-1", "--save-tuned", save, "--threads", "1"]) == 0
    return {name: root / name for name in RUNS}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(3, 259, (3, 21), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["lora-zo", "layer-1-lora"])
def test_lora_run_is_a_peft_adapter_that_plain_peft_loads(runs, tiny_model, name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = runs[name]
    log = json.loads((run / "log.json").read_text())
    assert log["best_step"] == {"lora-zo": 4, "layer-1-lora": 6}[name]  # both of finalize's branches
    assert {p.name for p in run.iterdir()} == {"log.json", "tuned.safetensors", "trajectory.jsonl", "adapter"}
    adapter = run / "adapter"
    assert {p.name for p in adapter.iterdir()} == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model.resolve()) and cfg["peft_type"] == "LORA"
    assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"]) == (8, 16, ["q_proj", "v_proj"])
    assert cfg["layers_to_transform"] == ([1] if name == "layer-1-lora" else None)
    # the best checkpoint's tensors, as tuned.safetensors holds them (peft drops the adapter's name from the keys)
    tuned, saved = load_file(str(run / "tuned.safetensors")), load_file(str(adapter / "adapter_model.safetensors"))
    assert {k.replace(".default.", "."): v for k, v in tuned.items()}.keys() == saved.keys()
    assert all(torch.equal(v, saved[k.replace(".default.", ".")]) for k, v in tuned.items())

    # plain transformers + peft, no dlzo code: dlzo's tuned model (as evaluation scores it) to the last bit
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, str(adapter)).eval()
    ours = load_tuned_model(tiny_model, run, CPU, torch.float32, merge=False)
    assert torch.equal(logits(plain, IDS), logits(ours, IDS))
    # LoRA merged into the weights computes (W + s B A) x instead of W x + s B (A x): equal up to fp32 rounding
    merged = logits(load_tuned_model(tiny_model, run, CPU, torch.float32), IDS)
    torch.testing.assert_close(merged, logits(ours, IDS), rtol=0, atol=1e-4)
    with plain.disable_adapter():
        assert not torch.allclose(logits(plain, IDS), merged, atol=1e-6)  # the adapters moved the model


def test_export_adapter_for_runs_without_one(runs, tiny_model, tmp_path):
    """A LoRA run made before adapters were saved, or saved as a trajectory only (``--save-tuned replay``), gets
    one from ``export --adapter``: the bytes training writes, from tuned.safetensors or by replay alike."""
    ref = runs["lora-zo"] / "adapter"
    assert not (runs["replayed"] / "adapter").exists()  # no tensors saved: no adapter
    common = ["--model", str(tiny_model), "--device", "cpu", "--dtype", "fp32", "--threads", "1"]
    for run, extra in ((runs["lora-zo"], []), (runs["replayed"], []), (runs["lora-zo"], ["--replay"])):
        out = tmp_path / f"{run.name}{''.join(extra)}"
        assert tuning(["export", "--adapter", "--run", str(run), "--out", str(out), *common, *extra]) == 0
        for f in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
            assert (out / f).read_bytes() == (ref / f).read_bytes(), (run.name, extra, f)
    assert not list(tmp_path.glob(".*.part"))  # written beside, then renamed
    # a run without LoRA has no adapters to write
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "log.json").write_text(json.dumps({"kind": "layer", "method": "layer-1"}))
    with pytest.raises(DLZOError, match="tunes no LoRA"):
        tuning(["export", "--adapter", "--run", str(tmp_path / "full"), "--out", str(tmp_path / "x"), *common])


def test_export_writes_a_lora_run_as_a_merged_model_folder(runs, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "exported"
    assert tuning(["export", "--model", str(tiny_model), "--run", str(runs["lora-zo"]), "--out", str(out),
                   "--device", "cpu", "--dtype", "fp32", "--threads", "1"]) == 0
    plain = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    merged = load_tuned_model(tiny_model, runs["lora-zo"], CPU, torch.float32)
    assert not any("lora_" in n for n, _ in plain.named_parameters())
    assert torch.equal(logits(plain, IDS), logits(merged, IDS))
    assert len(AutoTokenizer.from_pretrained(str(out))) == plain.config.vocab_size
    assert json.loads((out / "dlzo_export.json").read_text())["method"] == "lora-zo"


def test_recheck_command_routes(runs, tiny_model, tmp_path):
    """A LoRA run: lm-eval's peft= on the base model, with its adapter folder, or one written first by export
    --adapter (no adapter in the run, or replay); another tuned run: exported as a model folder."""
    def cmd(run, replay=False, lora=True):
        return recheck_command(tiny_model, run, replay, tmp_path / "tasks", "dlzo_sst2", 2, "float32", "cpu",
                               lora=lora)

    base = f"python -m dlzo.harness --model dlzo-hf --model_args pretrained={tiny_model.resolve()},peft="
    assert cmd(runs["lora-zo"]).startswith(base + f"{(runs['lora-zo'] / 'adapter').resolve()},dtype=float32,")
    assert " && " not in cmd(runs["lora-zo"])
    written = tmp_path.resolve() / "tasks" / "tuned_adapter"
    for run, replay in ((runs["replayed"], False), (runs["lora-zo"], True)):
        first, second = cmd(run, replay).split(" && ")
        assert first.startswith("python -m dlzo.tuning export ") and " --adapter" in first
        assert first.endswith(" --replay") == replay and f"--out {written} " in first
        assert second.startswith(base + f"{written},")
    first, second = cmd(runs["lora-zo"], lora=False).split(" && ")
    assert " --adapter" not in first and "peft=" not in second
    assert f"pretrained={tmp_path.resolve() / 'tasks' / 'tuned_model'}," in second
