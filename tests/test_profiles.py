"""dlzo.profiles: the perturbation-sensitivity profile and the first-order gradient norms per layer, on tiny
models with a planted massive activation (``python -m dlzo.profiles sensitivity|gradnorm``)."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dlzo import DLZOError
from dlzo.figures import main as figures_main
from dlzo.models import build_tiny, decoder_layers, load_model, load_tokenizer, tuned_parameters
from dlzo.objectives import loss as objective_loss
from dlzo.probe import main as probe_main
from dlzo.profiles import gradient_norms, main, sensitivity, sensitivity_batches
from dlzo.zo import ZOSGD, param_groups

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# --- the perturbation-sensitivity profile ---------------------------------------------------------

def state(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def same_bits(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) and a[n].dtype == b[n].dtype for n in a)


def sens_batches(d, tok, sst2_data, n=2, bs=2):
    return sensitivity_batches(tok, sst2_data, "sst2", n, bs, 0, 128, CPU)[0]


def test_sensitivity_is_deterministic_and_restores_the_model(tiny_models, sst2_data):
    d, model, tok = tiny_models("llama", 1)
    before = state(model)
    a = sensitivity(model, sens_batches(d, tok, sst2_data), k=3, eps=1e-3, seed=0)
    assert same_bits(before, state(model)) and no_hooks(model)
    b = sensitivity(model, sens_batches(d, tok, sst2_data), k=3, eps=1e-3, seed=0)
    assert [L["samples"] for L in a["layers"]] == [L["samples"] for L in b["layers"]]  # bit for bit
    c = sensitivity(model, sens_batches(d, tok, sst2_data), k=3, eps=1e-3, seed=1)
    assert all(x["g"] != y["g"] for L, M in zip(a["layers"], c["layers"]) for x, y in zip(L["samples"], M["samples"]))
    assert a["z_seeds"] != c["z_seeds"] and a["prefix_cache"] == "batch"
    for L in a["layers"]:
        assert [(s["draw"], s["batch"]) for s in L["samples"]] == [(j, i) for j in range(3) for i in range(2)]
        g = [s["g"] for s in L["samples"]]
        assert L["g"]["n"] == 6 and L["g"]["mean"] == pytest.approx(sum(g) / 6)
        assert L["g"]["q05"] <= L["g"]["q25"] <= L["g"]["median"] <= L["g"]["q75"] <= L["g"]["q95"]
        assert L["abs_diff"]["max"] == pytest.approx(max(abs(s["loss_plus"] - s["loss_minus"]) for s in L["samples"]))
        assert L["n_params"] == sum(p.numel() for p in decoder_layers(model)[L["index"]].parameters())


def test_sensitivity_restores_the_model_after_an_error(tiny_models, sst2_data):
    d, model, tok = tiny_models("llama", 1)
    before, calls = state(model), []

    def fail_later(module, args, output):
        calls.append(1)
        if len(calls) == 6:  # mid-way through layer 0's perturbed passes
            raise RuntimeError("boom")
    h = decoder_layers(model)[3].register_forward_hook(fail_later)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            sensitivity(model, sens_batches(d, tok, sst2_data), k=2)
    finally:
        h.remove()
    assert same_bits(before, state(model)) and no_hooks(model)


def test_sensitivity_draws_what_zosgd_draws(tiny_models, sst2_data):
    """Draw j of layer i on batch b is exactly the step j that ZO-SGD with the same seed takes on b."""
    d, model, tok = tiny_models("llama", 1)
    batch = sens_batches(d, tok, sst2_data, n=1)[0]
    r = sensitivity(model, [batch], k=3, eps=1e-3, seed=5, layers=[2], prefix=False)
    assert [L["index"] for L in r["layers"]] == [2] and r["prefix_cache"] == "off"
    fresh = load_model(d, CPU, torch.float32)
    opt = ZOSGD(param_groups(tuned_parameters(fresh, "layer", 2), 0.0), lr=0.0, eps=1e-3, seed=5, restore="exact")
    for j in range(3):
        opt.step(lambda: objective_loss(fresh, batch))
    got = [(s["loss_plus"], s["loss_minus"], s["g"]) for s in r["layers"][0]["samples"]]
    assert got == [(t["loss_plus"], t["loss_minus"], t["g"]) for t in opt.trajectory]


def layer_grad_norms(model, batch):
    model.requires_grad_(True)
    with torch.enable_grad():
        objective_loss(model, batch).backward()
    return [float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in blk.parameters())))
            for blk in decoder_layers(model)]


def test_sensitivity_rms_estimates_the_layer_gradient_norm(tiny_models, sst2_data):
    """E[g^2] = |grad|^2 for z ~ N(0, I): the RMS of g follows autograd's per-layer gradient norm."""
    d, _, tok = tiny_models("llama", None)
    model = load_model(d, CPU, torch.float32)
    batch = sens_batches(d, tok, sst2_data, n=1, bs=3)[0]
    r = sensitivity(model, [batch], k=200, eps=1e-3, seed=0)
    norms = layer_grad_norms(model, batch)
    for L, true in zip(r["layers"], norms):
        assert L["g"]["rms"] == pytest.approx(true, rel=0.25)  # 200 draws: the estimate's relative sd is ~5%
    assert r["most_sensitive_layer"] == max(range(4), key=lambda i: r["layers"][i]["g"]["std"])


def test_sensitivity_separates_the_layers_a_massive_activation_drowns(tiny_models, sst2_data):
    """Planted outlier at layer 1: the layers after it barely move the loss (autograd agrees), the
    layers feeding it move it > 100x more."""
    d, _, tok = tiny_models("llama", 1)
    model = load_model(d, CPU, torch.float32)
    batch = sens_batches(d, tok, sst2_data, n=1, bs=3)[0]
    r = sensitivity(model, [batch], k=20, eps=1e-3, seed=0)
    rms, norms = [L["g"]["rms"] for L in r["layers"]], layer_grad_norms(model, batch)
    assert min(rms[:2]) > 100 * max(rms[2:]) and min(norms[:2]) > 100 * max(norms[2:])
    assert r["most_sensitive_layer"] in (0, 1)
    assert rms[3] == pytest.approx(norms[3], rel=0.5)  # small layers: still the linear regime


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral"])
def test_sensitivity_other_architectures(tiny_models, sst2_data, arch):
    d, model, tok = tiny_models(arch, 2)
    before = state(model)
    batches = sens_batches(d, tok, sst2_data, n=1)
    fast = sensitivity(model, batches, k=2, layers=[0, 3])
    slow = sensitivity(model, batches, k=2, layers=[0, 3], prefix=False)
    assert fast["prefix_cache"] == "batch" and slow["prefix_cache"] == "off"
    for F, S in zip(fast["layers"], slow["layers"]):  # the frozen-prefix shortcut computes the same losses
        for f, s in zip(F["samples"], S["samples"]):
            assert f["loss_plus"] == pytest.approx(s["loss_plus"], rel=1e-5)
    assert same_bits(before, state(model)) and no_hooks(model)


def test_sensitivity_cli(tiny_models, sst2_data, tmp_path, capsys):
    d, _, tok = tiny_models("llama", 1)
    probe_json = tmp_path / "probe.json"
    assert probe_main(["--model", str(d), "--out", str(probe_json), "--threads", "1"]) == 0
    out, png = tmp_path / "o" / "sensitivity.json", tmp_path / "o" / "sensitivity_profile.png"
    args = ["sensitivity", "--model", str(d), "--data", str(sst2_data), "--task", "sst2", "--k", "2",
            "--batches", "2", "--batch-size", "2", "--threads", "1"]
    capsys.readouterr()
    assert main(args + ["--out", str(out), "--probe", str(probe_json)]) == 0
    progress = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sensitivity: layer")]
    assert [line.split()[2] for line in progress] == ["0", "1", "2", "3"]  # a line per layer in the job's log
    assert figures_main(["sensitivity", "--sensitivity", str(out), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = json.loads(out.read_text())
    assert set(r) >= {"num_layers", "k", "eps", "seed", "z_seeds", "prefix_cache", "base_loss", "layers",
                      "most_sensitive_layer", "model", "task", "objective", "batch_ids", "probe_layer", "provenance"}
    assert r["probe_layer"] == 1 and r["k"] == 2 and r["eps"] == 1e-3 and r["objective"] == "candidates"
    stds = sorted((L["g"]["std"] for L in r["layers"]), reverse=True)
    assert r["probe_layer_rank"] == 1 + stds.index(r["layers"][1]["g"]["std"])
    assert len(r["batch_ids"]) == 2 and all(len(b) == 2 for b in r["batch_ids"]) and len(r["base_loss"]) == 2
    assert [L["index"] for L in r["layers"]] == [0, 1, 2, 3] and r["provenance"]["dtype"] == "float32"
    for L in r["layers"]:
        assert set(L) == {"index", "n_params", "g", "abs_diff", "samples"} and len(L["samples"]) == 4
        assert set(L["g"]) == {"n", "mean", "std", "median", "q05", "q25", "q75", "q95", "rms", "mean_abs",
                               "min", "max"}
        assert all(L["abs_diff"][k] >= 0 for k in ("min", "median", "mean"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".part")]
    # the same draws as the library call: the CLI adds nothing random
    again = tmp_path / "again.json"
    assert main(args + ["--out", str(again)]) == 0
    assert [L["samples"] for L in json.loads(again.read_text())["layers"]] == [L["samples"] for L in r["layers"]]
    with pytest.raises(DLZOError, match="nope.*does not exist"):
        main(["sensitivity", "--model", str(d), "--data", str(tmp_path / "nope"), "--task", "sst2",
              "--out", str(again)])
    with pytest.raises(DLZOError, match="layer index 9 is past"):
        main(args + ["--out", str(again), "--layers", "9"])


# --- first-order gradient norms ------------------------------------------------------------------------

def test_gradient_norms_equal_autograd_and_leave_the_model_as_it_was(tiny_models, sst2_data):
    """Per-batch squared norms summed by hooks = autograd's per-layer norms; RMS over batches; no gradient,
    requires_grad flag or weight changed afterwards."""
    d, _, tok = tiny_models("llama", 1)
    model = load_model(d, CPU, torch.float32)
    model.requires_grad_(False)
    before = state(model)
    batches = sens_batches(d, tok, sst2_data, n=2, bs=2)
    r = gradient_norms(model, batches)
    assert same_bits(before, state(model))
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    per_batch = [layer_grad_norms(load_model(d, CPU, torch.float32), b) for b in batches]
    for i, L in enumerate(r["layers"]):
        assert L["sq_norm_per_batch"] == pytest.approx([n[i] ** 2 for n in per_batch], rel=1e-6)
        assert L["rms_norm"] == pytest.approx(math.sqrt(sum(n[i] ** 2 for n in per_batch) / 2), rel=1e-6)
    # the planted outlier: the layers feeding it carry > 100x the gradient of the layers after it
    rms = [L["rms_norm"] for L in r["layers"]]
    assert min(rms[:2]) > 100 * max(rms[2:]) and r["largest_gradient_layer"] in (0, 1)
    assert r["other_params_rms_norm"] > 0 and len(r["losses"]) == 2


def test_probes_on_shared_prompt_batches_measure_what_per_candidate_batches_do(tiny_models, sst2_one_byte_data, tmp_path):
    """--scoring shared-prompt (as the task's training runs): half the sequences, the same sensitivity
    draws and gradient norms up to float rounding; the JSON says which scoring it used."""
    data = sst2_one_byte_data
    d, model, tok = tiny_models("llama", 1)
    per, _ = sensitivity_batches(tok, data, "sst2", 2, 2, 0, 128, CPU)
    shared, _ = sensitivity_batches(tok, data, "sst2", 2, 2, 0, 128, CPU, share_prompt=True)
    assert [b.input_ids.shape[0] for b in shared] == [2, 2] and [b.input_ids.shape[0] for b in per] == [4, 4]
    a = sensitivity(model, per, k=2, eps=1e-3, seed=0)
    b = sensitivity(model, shared, k=2, eps=1e-3, seed=0)
    for L, M in zip(a["layers"], b["layers"]):
        assert [s["g"] for s in M["samples"]] == pytest.approx([s["g"] for s in L["samples"]], rel=1e-3, abs=1e-3)
    ga, gb = gradient_norms(model, per), gradient_norms(model, shared)
    assert [L["rms_norm"] for L in gb["layers"]] == pytest.approx([L["rms_norm"] for L in ga["layers"]], rel=1e-4)
    out = tmp_path / "sens.json"
    assert main(["sensitivity", "--model", str(d), "--data", str(data), "--task", "sst2", "--out", str(out),
                 "--k", "1", "--batches", "1", "--batch-size", "2", "--layers", "2", "--scoring", "shared-prompt",
                 "--threads", "1"]) == 0
    assert json.loads(out.read_text())["scoring"] == "shared-prompt"


def test_gradnorm_cli_writes_json_and_the_three_predictor_figure(tiny_models, sst2_data, tmp_path, capsys):
    d, _, _ = tiny_models("llama", 1)
    probe_json, sens_json = tmp_path / "probe.json", tmp_path / "sensitivity.json"
    assert probe_main(["--model", str(d), "--out", str(probe_json), "--threads", "1"]) == 0
    assert main(["sensitivity", "--model", str(d), "--data", str(sst2_data), "--task", "sst2", "--k", "2",
                 "--batches", "1", "--batch-size", "2", "--threads", "1", "--out", str(sens_json)]) == 0
    out, png = tmp_path / "gradnorm.json", tmp_path / "layer_predictors.png"
    args = ["gradnorm", "--model", str(d), "--data", str(sst2_data), "--task", "sst2", "--batches", "2",
            "--batch-size", "2", "--threads", "1", "--out", str(out)]
    capsys.readouterr()
    assert main(args + ["--probe", str(probe_json)]) == 0
    assert capsys.readouterr().err.count("gradnorm: batch ") == 2  # progress in the job's log
    fig = ["predictors", "--probe", str(probe_json), "--sensitivity", str(sens_json), "--out", str(png)]
    assert figures_main(fig + ["--gradnorm", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["probe_layer"] == 1 and r["batches"] == 2 and len(r["batch_ids"]) == 2 and r["objective"] == "candidates"
    norms = sorted((L["rms_norm"] for L in r["layers"]), reverse=True)
    assert r["probe_layer_rank"] == 1 + norms.index(r["layers"][1]["rms_norm"])
    assert r["peak_memory_mb"] > 0 and r["inference_peak_mb"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = tmp_path / "again.json"
    assert main(args[:-1] + [str(again)]) == 0  # deterministic: no draw anywhere
    assert [L["sq_norm_per_batch"] for L in json.loads(again.read_text())["layers"]] == \
        [L["sq_norm_per_batch"] for L in r["layers"]]
    with pytest.raises(SystemExit) as err:  # the figure needs the three predictors
        figures_main(fig)
    assert err.value.code == 2


def test_profiles_cli_runs_as_a_module(tiny_models, sst2_data, tmp_path):
    """``python -m dlzo.profiles sensitivity`` as the workflow runs it; no command: usage, exit status 2."""
    d, _, _ = tiny_models("llama", 1)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out = tmp_path / "sens.json"
    run = subprocess.run([sys.executable, "-m", "dlzo.profiles", "sensitivity", "--model", str(d), "--data",
                          str(sst2_data), "--task", "sst2", "--k", "1", "--batches", "1", "--batch-size", "2",
                          "--layers", "1", "--threads", "1", "--out", str(out)], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert [L["index"] for L in json.loads(out.read_text())["layers"]] == [1]
    run = subprocess.run([sys.executable, "-m", "dlzo.profiles"], capture_output=True, text=True, env=env)
    assert run.returncode == 2 and "sensitivity" in run.stderr
