"""zo_train on the tiny model: every method (ZO, Sparse-MeZO, first-order AdamW), outputs, checkpoint choice,
resume after SIGTERM, memory fields, errors."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from dlzo import DLZOError
from dlzo.models import load_model, load_tokenizer
from dlzo.tuning import build, load_tuned_model, zo_optimizer
from dlzo.objectives import make_batch
from dlzo.train import RunSpec, main, parse_args, train

from conftest import REPO


def run(tmp_path, tiny_model, data, method, task="sst2", extra=(), name=None):
    out = tmp_path / (name or method)
    argv = ["--model", str(tiny_model), "--data", str(data), "--task", task, "--method", method,
            "--seed", "0", "--out", str(out), "--steps", "4", "--batch-size", "2", "--eval-every", "2",
            "--lr", "1e-2", "--threads", "1", *extra]
    return train(parse_args(argv)), out


@pytest.mark.parametrize("method", ["mezo-full", "layer-2", "lora-zo", "layer-0-lora"])
def test_methods_tune_only_their_parameters(tmp_path, tiny_model, sst2_data, method):
    res, out = run(tmp_path, tiny_model, sst2_data, method, extra=["--dev-eval-size", "0"])
    lora = {"adapter"} if "lora" in method else set()  # the LoRA runs' peft adapter folder (tests/test_adapters.py)
    assert {p.name for p in out.iterdir()} == {"log.json", "tuned.safetensors", "trajectory.jsonl"} | lora
    log = json.loads((out / "log.json").read_text())
    assert log["best_step"] in (2, 4) and len(log["train_curve"]) == 4
    assert log["timing"]["s_per_step"] > 0 and log["peak_memory_mb"] > 0
    assert 0 < log["inference_peak_mb"] <= log["peak_memory_mb"]
    assert log["provenance"]["dtype"] == "float32" and log["provenance"]["device"] == "cpu"
    base = load_model(tiny_model, torch.device("cpu"), torch.float32)
    tuned = load_tuned_model(tiny_model, out, torch.device("cpu"), torch.float32)
    changed = {n for n, p in tuned.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])}
    if method == "mezo-full":
        assert len(changed) == len(list(base.parameters()))
    elif method == "layer-2":
        assert changed and all(n.startswith("model.layers.2.") for n in changed)
    elif method == "lora-zo":  # merged LoRA moves q_proj and v_proj of every layer, nothing else
        assert changed == {f"model.layers.{i}.self_attn.{m}.weight" for i in range(4) for m in ("q_proj", "v_proj")}
    else:
        assert changed == {f"model.layers.0.self_attn.{m}.weight" for m in ("q_proj", "v_proj")}


def test_tuned_checkpoint_is_the_best_dev_step(tmp_path, tiny_model, sst2_data):
    res, out = run(tmp_path, tiny_model, sst2_data, "layer-1", extra=["--steps", "6"])
    dev = {d["step"]: d["dev_loss"] for d in res["dev_curve"] if d["step"] > 0}
    assert res["best_step"] == min(dev, key=dev.get)
    # the saved tensors equal a replay of the trajectory up to the best step
    from dlzo.zo import ZOSGD, param_groups

    model, named = build(tiny_model, "layer", 1, torch.device("cpu"), torch.float32, 8, 16, 0)
    traj = [json.loads(x) for x in (out / "trajectory.jsonl").read_text().splitlines()][1:]
    ZOSGD(param_groups(named, 0.0), lr=1e-2, restore="exact").replay(traj[: res["best_step"]])
    saved = load_file(str(out / "tuned.safetensors"))
    for n, p in named:
        assert torch.equal(saved[n], p), n


def test_dominant_uses_probe_or_pin(tmp_path, tiny_model, sst2_data):
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"first_outlier_layer": 1, "num_layers": 4, "layers": [],
                                 "thresholds": {"abs": 100, "ratio": 1000}}))
    res, _ = run(tmp_path, tiny_model, sst2_data, "dominant", extra=["--probe", str(probe)])
    assert (res["layer"], res["layer_from"]) == (1, "probe")
    res, _ = run(tmp_path, tiny_model, sst2_data, "dominant", extra=["--probe", str(probe), "--layer", "3"],
                 name="pinned")
    assert (res["layer"], res["layer_from"]) == (3, "pinned")
    probe.write_text(json.dumps({"first_outlier_layer": None, "num_layers": 4, "layers": [],
                                 "thresholds": {"abs": 100, "ratio": 1000}}))
    with pytest.raises(DLZOError, match="dominant_layer"):
        run(tmp_path, tiny_model, sst2_data, "dominant", extra=["--probe", str(probe)], name="none")


def test_layer_past_depth_and_bad_method(tmp_path, tiny_model, sst2_data):
    with pytest.raises(DLZOError, match="past the model's depth"):
        run(tmp_path, tiny_model, sst2_data, "layer-9")
    with pytest.raises(DLZOError, match="unknown method"):
        run(tmp_path, tiny_model, sst2_data, "layer-x")


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_nan_loss_stops_with_step_and_keeps_trajectory(tmp_path, tiny_model, sst2_data, monkeypatch, bad):
    import dlzo.train as train_mod

    real, calls = train_mod.objective_loss, {"n": 0}

    def diverging(model, batch, prefix=None):  # the 3rd step's forward passes return NaN/inf (2 passes per step)
        calls["n"] += 1
        return torch.tensor(float(bad)) if calls["n"] > 4 + 1 else real(model, batch, prefix)

    monkeypatch.setattr(train_mod, "objective_loss", diverging)
    monkeypatch.setattr(train_mod, "mean_loss", lambda *a: 0.5)  # dev loss: not a training forward
    with pytest.raises(DLZOError, match=r"non-finite loss at step 2.*trajectory up to step 1"):
        run(tmp_path, tiny_model, sst2_data, "mezo-full", extra=["--steps", "10"], name="nan")
    partial = tmp_path / "nan" / "trajectory.partial.jsonl"
    assert len(partial.read_text().splitlines()) == 1 + 2  # header + the two good steps
    assert not (tmp_path / "nan" / "log.json").exists()


def test_lm_objective_trains(tmp_path, tiny_model, squad_data):
    res, out = run(tmp_path, tiny_model, squad_data, "layer-3", task="squad")
    assert res["best_dev_loss"] > 0
    # training moved the model: every tensor of layer 3 and nothing else, and the dev loss with it
    base = dict(load_model(tiny_model, torch.device("cpu"), torch.float32).named_parameters())
    tuned = load_tuned_model(tiny_model, out, torch.device("cpu"), torch.float32)
    changed = {n for n, p in tuned.named_parameters() if not torch.equal(p, base[n])}
    assert changed == {n for n in base if n.startswith("model.layers.3.")}
    dev = {d["step"]: d["dev_loss"] for d in res["dev_curve"]}
    assert dev[res["best_step"]] == res["best_dev_loss"] != dev[0]
    assert len({r["loss"] for r in res["train_curve"]}) == len(res["train_curve"])  # a new loss at every step


@pytest.mark.parametrize("flag, value", [("--lr", "0"), ("--eps", "-1"), ("--steps", "0"), ("--epochs", "0"),
                                         ("--sparsity", "1"), ("--eval-every", "-1")])
def test_cli_rejects_bad_hyperparameters(tiny_model, sst2_data, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_:
        main(["--model", str(tiny_model), "--data", str(sst2_data), "--task", "sst2", "--method", "layer-1",
              "--out", str(tmp_path / "x"), flag, value])
    assert exit_.value.code == 2  # a usage error, before anything runs
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_run_is_resolved_once_and_the_arguments_stay_as_given(tmp_path, tiny_model, squad_data):
    """--epochs, --eval-every 0 and every 'auto' are resolved into the frozen RunSpec; the parsed arguments
    (the provenance's 'as asked') are not rewritten."""
    import dataclasses

    args = parse_args(["--model", str(tiny_model), "--data", str(squad_data), "--task", "squad", "--method",
                       "fo-layer-2", "--out", str(tmp_path / "r"), "--epochs", "2", "--eval-every", "0",
                       "--batch-size", "2", "--threads", "1"])
    asked = dict(vars(args))
    res = train(args)
    assert vars(args) == asked
    per_epoch = len((squad_data / "train.jsonl").read_text().splitlines()) // 2
    assert res["hyper"]["steps"] == 2 * per_epoch and [d["step"] for d in res["dev_curve"]] == [0, per_epoch,
                                                                                              2 * per_epoch]
    assert (res["hyper"]["prefix_cache"], res["hyper"]["amp"]) == ("dataset", "off")
    config = res["provenance"]["config"]
    assert (config["steps"], config["eval_every"], config["restore"], config["amp"]) == (2 * per_epoch, per_epoch,
                                                                                         None, "off")
    spec = RunSpec.resolve(args, torch.device("cpu"), 6)
    assert (spec.method.kind, spec.layer, spec.layer_from, spec.restore) == ("fo-layer", 2, "method name", None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.steps = 1


def test_sigterm_then_resume_is_bit_identical(tmp_path, tiny_model, sst2_data):
    args = ["--model", str(tiny_model), "--data", str(sst2_data), "--task", "sst2", "--seed", "1",
            "--steps", "150", "--batch-size", "2", "--eval-every", "40", "--lr", "1e-2", "--threads", "1"]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    for method in ("layer-2", "mezo-full"):
        ref, cut = tmp_path / f"ref-{method}", tmp_path / f"cut-{method}"
        subprocess.run([sys.executable, "-m", "dlzo.train", *args, "--method", method, "--out", str(ref)],
                       check=True, env=env, capture_output=True)
        proc = subprocess.Popen([sys.executable, "-m", "dlzo.train", *args, "--method", method, "--out", str(cut)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        partial = cut / "trajectory.partial.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and (not partial.exists() or len(partial.read_text().splitlines()) < 50):
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0, err.decode()[-500:]
        assert not (cut / "log.json").exists() and not (cut / "tuned.safetensors").exists()
        n_done = len(partial.read_text().splitlines()) - 1
        assert 50 <= n_done < 150
        subprocess.run([sys.executable, "-m", "dlzo.train", *args, "--method", method, "--out", str(cut)],
                       check=True, env=env, capture_output=True)
        log = json.loads((cut / "log.json").read_text())
        assert log["resumed_from_step"] == n_done
        assert (cut / "trajectory.jsonl").read_text() == (ref / "trajectory.jsonl").read_text()
        a, b = load_file(str(cut / "tuned.safetensors")), load_file(str(ref / "tuned.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        # the file too, byte for byte (three processes wrote these: the header must not depend on the process)
        assert (cut / "tuned.safetensors").read_bytes() == (ref / "tuned.safetensors").read_bytes()
        assert log["best_step"] == json.loads((ref / "log.json").read_text())["best_step"]


@pytest.mark.parametrize("method", ["layer-1", "layer-2-lora"])
def test_frozen_prefix_path_matches_plain_path(tmp_path, tiny_model, sst2_data, method):
    """Same seed: the cached-prefix steps give the plain path's projected gradients and weights."""
    runs = {}
    for mode in ("off", "batch", "dataset"):
        res, out = run(tmp_path, tiny_model, sst2_data, method, extra=["--prefix-cache", mode, "--steps", "5"],
                       name=f"{method}-{mode}")
        assert res["hyper"]["prefix_cache"] == mode
        traj = [json.loads(x) for x in (out / "trajectory.jsonl").read_text().splitlines()][1:]
        runs[mode] = ([r["g"] for r in traj], load_file(str(out / "tuned.safetensors")))
    for mode in ("batch", "dataset"):
        # g = (L+ - L-) / 2eps moves in steps of ulp(L) / 2eps, about 3e-5 here (float32 L near 0.7, eps 1e-3):
        # the two paths' losses differ by rounding, a few ulps (layer-2-lora: 4, as on the code before RunSpec)
        assert runs[mode][0] == pytest.approx(runs["off"][0], rel=1e-3, abs=3e-4)
        for k, v in runs["off"][1].items():
            torch.testing.assert_close(runs[mode][1][k], v, rtol=1e-3, atol=2e-5)


@pytest.mark.parametrize("method", ["layer-1", "layer-2-lora", "layer-3"])
def test_paired_suffix_matches_two_passes(tmp_path, tiny_model, sst2_data, method):
    """The two perturbed branches through the frozen suffix as one double batch: same numbers."""
    runs = {}
    for paired in ("off", "on"):
        res, out = run(tmp_path, tiny_model, sst2_data, method, name=f"{method}-{paired}",
                       extra=["--prefix-cache", "dataset", "--paired-suffix", paired, "--steps", "5"])
        assert res["hyper"]["paired_suffix"] == paired
        traj = [json.loads(x) for x in (out / "trajectory.jsonl").read_text().splitlines()][1:]
        runs[paired] = (traj, load_file(str(out / "tuned.safetensors")))
    for a, b in zip(runs["on"][0], runs["off"][0]):
        assert a["seed"] == b["seed"]
        assert a["loss_plus"] == pytest.approx(b["loss_plus"], rel=1e-5)
        assert a["loss_minus"] == pytest.approx(b["loss_minus"], rel=1e-5)
        assert a["g"] == pytest.approx(b["g"], rel=1e-2, abs=1e-3)
    for k, v in runs["off"][1].items():
        torch.testing.assert_close(runs["on"][1][k], v, rtol=1e-3, atol=2e-5)


@pytest.mark.parametrize("method", ["mezo-full", "layer-1", "fo-adamw"])
def test_shared_prompt_scoring_trains_as_per_sequence(tmp_path, tiny_model, sst2_one_byte_data, method):
    """--scoring shared-prompt (candidates read from one pass of the prompt): the same losses,
    projected gradients and tuned weights as one sequence per candidate, with the prefix cache too; the
    option is in the run's config hash only when set, so runs made before it existed still resume."""
    data = sst2_one_byte_data
    rows = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()]
    shared = make_batch(load_tokenizer(tiny_model), rows, "candidates", torch.device("cpu"), share_prompt=True)
    assert shared.input_ids.shape[0] == len(rows)  # one sequence per example, not two: the path is taken
    runs = {}
    for scoring in ("per-sequence", "shared-prompt"):
        res, out = run(tmp_path, tiny_model, data, method, name=f"{method}-{scoring}",
                       extra=["--scoring", scoring, "--steps", "4"])
        assert res["hyper"]["scoring"] == scoring
        lines = [json.loads(x) for x in (out / "trajectory.jsonl").read_text().splitlines()]
        runs[scoring] = (lines, load_file(str(out / "tuned.safetensors")), res)
    (head_per, *per), weights_per, res_per = runs["per-sequence"]
    (head_sh, *sh), weights_sh, res_sh = runs["shared-prompt"]
    assert "scoring" not in head_per["header"] and head_sh["header"]["scoring"] == "shared-prompt"
    assert head_per["config_hash"] != head_sh["config_hash"]
    # AdamW turns float-rounding differences of near-zero gradients into whole steps of lr: after the
    # first update a first-order run agrees only roughly, and its weights are not compared
    fo = method == "fo-adamw"
    for i, (a, b) in enumerate(zip(sh, per)):
        for key in ("loss", "loss_plus", "loss_minus"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-3 if fo and i else 1e-5)
    assert [d["dev_loss"] for d in res_sh["dev_curve"]] == pytest.approx([d["dev_loss"] for d in res_per["dev_curve"]],
                                                                          rel=1e-3 if fo else 1e-5)
    for k, v in weights_per.items():
        if not fo:
            torch.testing.assert_close(weights_sh[k], v, rtol=1e-3, atol=2e-5)


def test_paired_suffix_needs_a_prefix(tmp_path, tiny_model, sst2_data):
    with pytest.raises(DLZOError, match="paired-suffix on needs"):
        run(tmp_path, tiny_model, sst2_data, "mezo-full", extra=["--paired-suffix", "on"])


def test_prefix_cache_refuses_multi_layer_methods(tmp_path, tiny_model, sst2_data):
    with pytest.raises(DLZOError, match="single-layer method"):
        run(tmp_path, tiny_model, sst2_data, "mezo-full", extra=["--prefix-cache", "dataset"])


@pytest.mark.parametrize("method", ["mezo-full", "layer-1"])
def test_replay_mode_rebuilds_the_same_model(tmp_path, tiny_model, sst2_data, method):
    """Large runs keep only the trajectory; evaluation rebuilds the best checkpoint bit for bit."""
    extra = ["--steps", "6", "--eval-every", "2"]
    _, saved = run(tmp_path, tiny_model, sst2_data, method, extra=extra + ["--save-tuned", "tensors"], name="t")
    _, replay = run(tmp_path, tiny_model, sst2_data, method, extra=extra + ["--save-tuned", "replay"], name="r")
    assert load_file(str(replay / "tuned.safetensors")) == {}
    a = load_tuned_model(tiny_model, saved, torch.device("cpu"), torch.float32)
    from safetensors.torch import save_file
    # the marker as written, then as earlier versions wrote it (three metadata keys, not one JSON key)
    for old_marker in (None, {"method": method, "best_step": "6", "replay": "true"}):
        if old_marker:
            save_file({}, str(replay / "tuned.safetensors"), metadata=old_marker)
        pb = dict(load_tuned_model(tiny_model, replay, torch.device("cpu"), torch.float32).named_parameters())
        assert all(torch.equal(p, pb[n]) for n, p in a.named_parameters())


# --- the paper's other baselines: first-order AdamW and Sparse-MeZO ------------------------------

def _train_set_loss(model_dir, run_dir, data, objective):
    """Mean training loss over the whole training split, of the base model (run_dir None) or a run's best."""
    from dlzo.io import read_jsonl
    from dlzo.models import load_tokenizer
    from dlzo.train import mean_loss

    cpu = torch.device("cpu")
    model = (load_tuned_model(model_dir, run_dir, cpu, torch.float32) if run_dir
             else load_model(model_dir, cpu, torch.float32))
    return mean_loss(model, load_tokenizer(model_dir), read_jsonl(data / "train.jsonl"), objective, cpu, 8, 512)


def test_fo_adamw_lowers_the_training_loss(tmp_path, tiny_model, squad_data):
    # 4 epochs of the 6 training answers (LM loss), one checkpoint at the end: the tuned model is the last state
    n_train = len((squad_data / "train.jsonl").read_text().splitlines())
    steps = 4 * (n_train // 2)
    res, out = run(tmp_path, tiny_model, squad_data, "fo-adamw", task="squad",
                   extra=["--epochs", "4", "--eval-every", str(steps), "--lr", "1e-2"])
    assert res["hyper"]["steps"] == steps and res["best_step"] == steps and res["kind"] == "fo-full"
    assert {p.name for p in out.iterdir()} == {"log.json", "tuned.safetensors", "trajectory.jsonl"}
    before = _train_set_loss(tiny_model, None, squad_data, "lm")
    after = _train_set_loss(tiny_model, out, squad_data, "lm")
    assert after < before - 0.25, (before, after)  # 5.58 -> 5.08 here: the outlier channel slows it
    traj = [json.loads(x) for x in (out / "trajectory.jsonl").read_text().splitlines()]
    assert traj[0]["header"]["optimizer"] == "adamw" and len(traj) == 1 + steps
    assert all(r["grad_norm"] > 0 for r in traj[1:])
    t = res["timing"]
    assert t["forward_s_per_step"] > 0 and t["backward_s_per_step"] > 0 and t["update_s_per_step"] > 0
    assert res["tuned_params"] == sum(p.numel() for p in load_model(tiny_model, torch.device("cpu"),
                                                                      torch.float32).parameters())
    # memory: training holds weights, grads and two AdamW states on top of what inference needs
    assert res["peak_memory_mb"] >= res["inference_peak_mb"] > 0


def test_fo_layer_moves_only_that_layer_and_prefix_cache_agrees(tmp_path, tiny_model, sst2_data):
    base = dict(load_model(tiny_model, torch.device("cpu"), torch.float32).named_parameters())
    layer2 = {n for n in base if n.startswith("model.layers.2.")}
    tuned = {}
    for mode in ("off", "dataset"):
        res, out = run(tmp_path, tiny_model, sst2_data, "fo-layer-2", extra=["--prefix-cache", mode],
                       name=f"fo-layer-2-{mode}")
        assert (res["kind"], res["layer"], res["hyper"]["prefix_cache"]) == ("fo-layer", 2, mode)
        model = load_tuned_model(tiny_model, out, torch.device("cpu"), torch.float32)
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, base[n])}
        assert changed == layer2  # every tensor of layer 2 moves, nothing else does
        tuned[mode] = load_file(str(out / "tuned.safetensors"))
    assert tuned["off"].keys() == tuned["dataset"].keys() == layer2
    for k, v in tuned["off"].items():  # the cached prefix is the same maths: equal up to rounding, which
        torch.testing.assert_close(tuned["dataset"][k], v, rtol=1e-3, atol=1e-4)  # Adam amplifies in tiny grads


def test_fo_sigterm_then_resume_is_bit_identical(tmp_path, tiny_model, sst2_data, monkeypatch):
    import dlzo.train as train_mod

    extra = ["--steps", "6", "--eval-every", "2", "--seed", "3"]
    ref, ref_out = run(tmp_path, tiny_model, sst2_data, "fo-adamw", extra=extra, name="ref")
    real, calls = train_mod.objective_loss, {"n": 0}

    def interrupted(model, batch, prefix=None):  # SIGTERM arrives during the 4th training step
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 4:
                os.kill(os.getpid(), signal.SIGTERM)
        return real(model, batch, prefix)

    monkeypatch.setattr(train_mod, "objective_loss", interrupted)
    with pytest.raises(SystemExit) as stop:
        run(tmp_path, tiny_model, sst2_data, "fo-adamw", extra=extra, name="cut")
    assert stop.value.code == 128 + signal.SIGTERM
    cut = tmp_path / "cut"
    assert (cut / "fo_state.partial.pt").exists() and not (cut / "log.json").exists()
    monkeypatch.setattr(train_mod, "objective_loss", real)
    res, _ = run(tmp_path, tiny_model, sst2_data, "fo-adamw", extra=extra, name="cut")
    assert res["resumed_from_step"] == 4 and not (cut / "fo_state.partial.pt").exists()
    assert (res["train_curve"], res["dev_curve"], res["best_step"]) == (ref["train_curve"], ref["dev_curve"],
                                                                          ref["best_step"])
    a, b = load_file(str(cut / "tuned.safetensors")), load_file(str(ref_out / "tuned.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fo_bf16_autocast_path_and_refusals(tmp_path, tiny_model, sst2_data):
    res, _ = run(tmp_path, tiny_model, sst2_data, "fo-layer-1", extra=["--amp", "bf16", "--steps", "2"])
    assert res["hyper"]["amp"] == "bf16" and res["hyper"]["weights_dtype"] == "float32"
    assert all(math.isfinite(c["loss"]) for c in res["train_curve"])
    with pytest.raises(DLZOError, match="first-order methods"):
        run(tmp_path, tiny_model, sst2_data, "layer-1", extra=["--amp", "bf16"], name="zo-amp")
    with pytest.raises(DLZOError, match="not fp16"):
        run(tmp_path, tiny_model, sst2_data, "fo-adamw", extra=["--dtype", "fp16"], name="fp16")
    with pytest.raises(DLZOError, match="cannot be replayed"):
        run(tmp_path, tiny_model, sst2_data, "fo-adamw", extra=["--save-tuned", "replay"], name="replay")


def test_sparse_mezo_moves_exactly_the_masked_weights(tmp_path, tiny_model, sst2_data):
    from dlzo.zo import magnitude_mask

    res, out = run(tmp_path, tiny_model, sst2_data, "sparse-mezo", extra=["--sparsity", "0.6", "--weight-decay", "0.1"])
    assert res["hyper"]["sparsity"] == 0.6 and res["hyper"]["restore"] == "mezo"
    base = dict(load_model(tiny_model, torch.device("cpu"), torch.float32).named_parameters())
    tuned = dict(load_tuned_model(tiny_model, out, torch.device("cpu"), torch.float32).named_parameters())
    n_masked = 0
    for n, p in base.items():
        mask = magnitude_mask(p, 0.6)
        n_masked += int(mask.sum())
        moved = tuned[n] != p
        assert not (moved & ~mask).any(), n  # nothing above the threshold moves, not even by weight decay
        # ...and the masked weights do (a step below half an ulp of a weight may round away: rare)
        assert moved.sum() >= 0.99 * mask.sum(), n
    assert res["tuned_params"] == n_masked < res["tensor_params"]


def test_sparse_mezo_replay_is_bit_identical(tmp_path, tiny_model, sst2_data):
    extra = ["--steps", "6", "--eval-every", "2", "--lr", "1e-3"]
    _, saved = run(tmp_path, tiny_model, sst2_data, "sparse-mezo", extra=extra + ["--save-tuned", "tensors"], name="t")
    _, replay = run(tmp_path, tiny_model, sst2_data, "sparse-mezo", extra=extra + ["--save-tuned", "replay"], name="r")
    a = load_tuned_model(tiny_model, saved, torch.device("cpu"), torch.float32)
    b = dict(load_tuned_model(tiny_model, replay, torch.device("cpu"), torch.float32).named_parameters())
    assert all(torch.equal(p, b[n]) for n, p in a.named_parameters())


def test_on_nonfinite_stop_keeps_the_best_checkpoint_before_it(tmp_path, tiny_model, sst2_data, monkeypatch):
    """A grid point that diverges is an outcome: the run ends there, its log says so, and its tuned weights are
    the best dev checkpoint it reached (rebuilt exactly from the trajectory)."""
    import dlzo.train as train_mod

    real, calls = train_mod.objective_loss, {"n": 0}

    def diverging(model, batch, prefix=None):  # the inference-memory pass, steps 0-4 (2 passes each), then NaN
        calls["n"] += 1
        return torch.tensor(float("nan")) if calls["n"] > 1 + 10 else real(model, batch, prefix)

    dev = iter([0.9, 0.7, 0.8])  # dev loss at steps 0, 2, 4: the best checkpoint is step 2
    monkeypatch.setattr(train_mod, "objective_loss", diverging)
    monkeypatch.setattr(train_mod, "mean_loss", lambda *a: next(dev))
    res, out = run(tmp_path, tiny_model, sst2_data, "layer-2", extra=["--steps", "10", "--on-nonfinite", "stop"])
    assert res["hyper"]["diverged_at_step"] == 5
    assert [p["step"] for p in res["dev_curve"]] == [0, 2, 4]
    assert res["best_step"] == 2 and res["best_dev_loss"] == 0.7
    traj = [json.loads(x) for x in (out / "trajectory.jsonl").read_text().splitlines()]
    assert len(traj) == 1 + 5 and not (out / "trajectory.partial.jsonl").exists()
    # the tuned tensors are the state after best_step steps: replaying that many steps gives the same bits
    monkeypatch.setattr(train_mod, "objective_loss", real)
    model = load_model(tiny_model, torch.device("cpu"), torch.float32)
    named = [(n, p) for n, p in model.named_parameters() if ".layers.2." in n]
    zo_optimizer(named, 1e-2, 1e-3, 0.0, 0, "exact").replay(traj[1:res["best_step"] + 1])
    saved = load_file(str(out / "tuned.safetensors"))
    assert all(torch.equal(saved[n], p.detach()) for n, p in named)


def test_select_picks_the_lowest_dev_loss_and_refuses_mixed_runs(tmp_path):
    from dlzo.select import select

    def log(method, tag, seed, dev, diverged=None, task="sst2"):
        path = tmp_path / "train" / "m" / task / f"{method}{tag}" / f"seed{seed}" / "log.json"
        path.parent.mkdir(parents=True)
        hyper = {"lr": float(tag.split("lr")[1].split("_")[0]), "eps": 1e-3}
        if diverged is not None:
            hyper["diverged_at_step"] = diverged
        path.write_text(json.dumps({"model": "m", "task": task, "method": method, "seed": seed,
                                    "best_dev_loss": dev, "best_step": 4, "hyper": hyper}))
        return str(path)

    a = log("dominant", "@lr0.0001_eps0.001", 0, 0.70)
    b = log("dominant", "@lr0.001_eps0.001", 0, 0.61)
    c = log("dominant", "@lr0.01_eps0.001", 0, float("inf"), diverged=3)
    res = select([a, b, c])
    assert res["chosen"]["tag"] == "@lr0.001_eps0.001" and res["chosen"]["lr"] == 1e-3
    assert [p["diverged_at_step"] for p in res["grid"]] == [None, None, 3]
    tie = log("dominant", "@lr0.1_eps0.001", 0, 0.61)
    assert select([b, tie])["chosen"]["tag"] == "@lr0.001_eps0.001"  # a tie goes to the earlier point
    other = log("dominant", "@lr0.0001_eps0.001", 0, 0.5, task="copa")
    with pytest.raises(DLZOError, match="not one"):
        select([a, other])
    with pytest.raises(DLZOError, match="not a grid run"):
        select([str(tmp_path / "train/m/sst2/dominant/seed0/log.json")])


def test_select_cli_writes_the_choice_and_train_reads_it(tmp_path, capsys, tiny_model, sst2_data):
    """The JSON, then the other seeds' training at its choice (``--selection``) and the evaluation's run folder."""
    from dlzo.select import chosen_point
    from dlzo.select import main as select_main

    logs = []
    for lr, dev in ((1e-4, 0.8), (1e-3, 0.5)):
        d = tmp_path / f"train/m/sst2/layer-3@lr{lr:g}_eps0.002/seed0"
        d.mkdir(parents=True)
        (d / "log.json").write_text(json.dumps({"model": "m", "task": "sst2", "method": "layer-3", "seed": 0,
                                                "best_dev_loss": dev, "best_step": 2, "hyper": {"lr": lr, "eps": 2e-3}}))
        logs.append(str(d / "log.json"))
    out = tmp_path / "sel.json"
    assert select_main(["--logs", *logs, "--out", str(out)]) == 0
    assert chosen_point(out) == {"lr": 1e-3, "eps": 2e-3,
                                 "run": str(tmp_path / "train/m/sst2/layer-3@lr0.001_eps0.002/seed0")}
    assert parse_args(["--model", "m", "--data", "d", "--task", "sst2", "--method", "layer-3", "--out", "o",
                       "--lr", "0.5", "--lr", "0.001", "--eps", "0.001"]).lr == 1e-3  # the last one counts
    capsys.readouterr()
    for flag in ("--lr", "--eps"):
        with pytest.raises(SystemExit) as exit_:
            parse_args(["--model", "m", "--data", "d", "--task", "sst2", "--method", "layer-3", "--out", "o",
                        "--selection", str(out), flag, "0.1"])
        assert exit_.value.code == 2 and "--selection" in capsys.readouterr().err
    argv = ["--model", str(tiny_model), "--data", str(sst2_data), "--task", "sst2", "--method", "layer-3",
            "--seed", "1", "--steps", "2", "--batch-size", "2", "--threads", "1"]
    res = train(parse_args([*argv, "--out", str(tmp_path / "sel-run"), "--selection", str(out)]))
    assert (res["hyper"]["lr"], res["hyper"]["eps"]) == (1e-3, 2e-3)
    same = train(parse_args([*argv, "--out", str(tmp_path / "flag-run"), "--lr", "1e-3", "--eps", "2e-3"]))
    assert (tmp_path / "sel-run/trajectory.jsonl").read_text() == (tmp_path / "flag-run/trajectory.jsonl").read_text()
    assert res["best_dev_loss"] == same["best_dev_loss"]
    (tmp_path / "train/m/sst2/layer-3@lr0.001_eps0.002/seed0/log.json").unlink()
    with pytest.raises(DLZOError, match="has no log.json"):
        chosen_point(out)


@pytest.mark.parametrize("method", ["layer-2", "mezo-full"])
def test_resume_before_the_first_checkpoint_keeps_step_0_the_untrained_model(tmp_path, tiny_model, sst2_data,
                                                                             method):
    """A run cut before its first dev checkpoint resumes to the reference's dev curve: its step-0 dev loss is the
    untrained model's, not that of the steps replayed (a bug that mislabelled three study runs)."""
    extra = ["--steps", "6", "--eval-every", "4", "--lr", "1e-1"]
    ref_res, ref = run(tmp_path, tiny_model, sst2_data, method, extra=extra, name="ref")
    lines = (ref / "trajectory.jsonl").read_text().splitlines()
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "trajectory.partial.jsonl").write_text("\n".join(lines[:1 + 3]) + "\n")  # header + 3 steps, no log
    res, _ = run(tmp_path, tiny_model, sst2_data, method, extra=extra, name="cut")
    assert res["resumed_from_step"] == 3  # the saved steps, re-applied from the trajectory (none recomputed)
    assert res["dev_curve"] == ref_res["dev_curve"]
    assert ref_res["dev_curve"][1]["dev_loss"] != ref_res["dev_curve"][0]["dev_loss"]  # the steps moved the loss
    assert (cut / "trajectory.jsonl").read_text() == (ref / "trajectory.jsonl").read_text()


def test_nonfinite_in_fp16_names_the_dtype(tmp_path, tiny_model, sst2_data, monkeypatch):
    """fp16 weights of a bf16-trained model can overflow: a non-finite loss says which dtype and what to set."""
    import types

    from dlzo.train import nonfinite_advice

    fp16 = nonfinite_advice(types.SimpleNamespace(torch_dtype=torch.float16, dtype="fp16"))
    assert "float16 (--dtype fp16)" in fp16 and "--dtype bfloat16" in fp16 and "models.<name>.dtype" in fp16
    assert "float32" in nonfinite_advice(types.SimpleNamespace(torch_dtype=torch.float32, dtype="auto"))
    import dlzo.train as train_mod

    # the model as loaded already overflows (the dev loss before any step): stopped there, the dtype named
    monkeypatch.setattr(train_mod, "mean_loss", lambda *a: float("inf"))
    with pytest.raises(DLZOError, match=r"non-finite dev loss \(inf\) on sst2, before any step.*weights float32"):
        run(tmp_path, tiny_model, sst2_data, "layer-1", extra=["--steps", "2"], name="overflow")


@pytest.mark.parametrize("method", ["layer-2", "mezo-full"])
def test_cut_after_the_last_step_before_its_checkpoint_finishes_identically(tmp_path, tiny_model, sst2_data, method):
    """Every step saved, the last dev checkpoint not: the rerun re-applies the saved steps (none recomputed),
    evaluates the missed checkpoint, and ends as the uninterrupted run (a bug that left the run unable to finish)."""
    extra = ["--steps", "6", "--eval-every", "2", "--lr", "1e-1"]
    ref_res, ref = run(tmp_path, tiny_model, sst2_data, method, extra=extra, name="ref")
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "trajectory.partial.jsonl").write_text((ref / "trajectory.jsonl").read_text())  # all 6 steps
    state = {"dev_curve": ref_res["dev_curve"][:3]}  # checkpoints at 0, 2, 4: the one at 6 was never taken
    state["best"] = min(({"step": c["step"], "dev_loss": c["dev_loss"]} for c in state["dev_curve"][1:]),
                        key=lambda c: c["dev_loss"])  # the untrained model (step 0) is never the best
    (cut / "log.partial.json").write_text(json.dumps(state))
    res, _ = run(tmp_path, tiny_model, sst2_data, method, extra=extra, name="cut")
    assert res["resumed_from_step"] == 6 and res["timing"]["s_per_step"] is None  # no step recomputed
    assert res["dev_curve"] == ref_res["dev_curve"] and len(res["dev_curve"]) == 4
    assert (res["best_step"], res["best_dev_loss"]) == (ref_res["best_step"], ref_res["best_dev_loss"])
    assert (cut / "trajectory.jsonl").read_text() == (ref / "trajectory.jsonl").read_text()
    assert (cut / "tuned.safetensors").read_bytes() == (ref / "tuned.safetensors").read_bytes()
