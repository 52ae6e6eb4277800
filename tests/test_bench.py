"""dlzo.bench: every mode runs on the tiny model, and the JSON carries the fields and ratios promised."""
import json

import pytest

from dlzo import bench


def test_every_mode_measures(tiny_model):
    specs = {m: (m, 1) for m in bench.MODES}
    specs["layer@2"] = ("layer", 2)
    res = bench.measure_modes(specs, str(tiny_model), (4, 12), 2, "cpu", "fp32", 1)
    assert set(res) == set(specs)
    for r in res.values():
        assert r["s"] > 0 and r["peak_mb"] > 0 and r["tuned_params"] > 0


def _fake_measure(values):
    calls = []

    def fake(specs, model_dir, shape, *a, **k):
        calls.append((dict(specs), tuple(shape), k.get("concurrent", True)))
        return {name: {"s": values[mode], "peak_mb": 100.0 + values[mode] + layer, "base_mb": 40.0, "tuned_params": 1}
                for name, (mode, layer) in specs.items()}

    return fake, calls


def test_json_fields_and_ratios(tmp_path, monkeypatch, tiny_model):
    fake, calls = _fake_measure({"inference": 1.0, "mezo_faithful_full": 8.0, "full": 6.0, "layer": 2.0,
                                 "layer_paired": 1.6, "floor": 1.6})
    monkeypatch.setattr(bench, "measure_modes", fake)
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"first_outlier_layer": 3}))
    assert bench.main(["--model", str(tiny_model), "--out", str(tmp_path / "b.json"), "--probe", str(probe)]) == 0
    res = json.loads((tmp_path / "b.json").read_text())["results"]
    assert set(res) == {"sst2/layer-1", "sst2/layer-3", "copa/layer-1", "copa/layer-3"}
    r = res["sst2/layer-1"]
    assert r["speedup_vs_mezo"] == pytest.approx(4.0) and r["overhead_vs_floor"] == pytest.approx(1.25)
    assert r["paired_vs_layer"] == pytest.approx(1.25) and r["full_vs_mezo"] == pytest.approx(8 / 6)
    assert r["inference_peak_mb"] == 102.0 and set(r["peak_mb"]) == {"mezo_faithful_full", "full", "layer", "floor"}
    assert r["shape"] == [16, 32] and res["copa/layer-3"]["shape"] == [16, 16]
    assert all(c[2] for c in calls)  # timing: every mode of a shape side by side, round-robin


def test_memory_mode_rows_and_ratios(tmp_path, monkeypatch, tiny_model):
    """--memory: one row per method (layer rows per --layers), ratios to inference, raw and net of the runtime."""
    fake, calls = _fake_measure({"inference": 1000.0, "mezo_full": 1100.0, "full": 1050.0, "sparse_mezo": 1150.0,
                                 "fo_full": 2800.0, "layer": 1010.0, "fo_layer": 1300.0})
    monkeypatch.setattr(bench, "measure_modes", fake)
    assert bench.main(["--memory", "--model", str(tiny_model), "--out", str(tmp_path / "m.json"),
                       "--layers", "3", "1", "--shapes", "sst2"]) == 0
    res = json.loads((tmp_path / "m.json").read_text())
    assert res["bench"] == "memory" and set(res["results"]) == {"sst2"}
    rows = res["results"]["sst2"]["methods"]
    assert set(rows) == {"inference", "mezo-full", "mezo-full-fused", "sparse-mezo", "fo-adamw", "layer-3", "layer-1",
                         "fo-layer-3", "fo-layer-1"}
    assert res["results"]["sst2"]["shape"] == [16, 32] and [c[1] for c in calls] == [(16, 32)]
    assert calls[0][2] is False  # memory: one process after the other
    inf = 100.0 + 1000.0 + 3  # the shared rows run with the first layer given
    assert rows["fo-adamw"]["vs_inference"] == pytest.approx((100 + 2800 + 3) / inf)
    assert rows["fo-adamw"]["vs_inference_net"] == pytest.approx((100 + 2800 + 3 - 40) / (inf - 40))
    assert rows["layer-1"]["vs_inference"] == pytest.approx(1111 / inf) and rows["inference"]["vs_inference"] == 1


def test_memory_modes_report_what_they_tune(tiny_model):
    """The FO and Sparse-MeZO modes tune what the pipeline's methods tune; FO keeps fp32 weights."""
    import torch

    from dlzo.models import load_model

    specs = {m: (m, 2) for m in ("fo_full", "fo_layer", "sparse_mezo", "layer")}
    out = bench.measure_modes(specs, str(tiny_model), (4, 12), 1, "cpu", "auto", 1, 0.75, concurrent=False)
    model = load_model(tiny_model, torch.device("cpu"), torch.float32)
    layer2 = sum(p.numel() for p in model.model.layers[2].parameters())
    assert out["fo_full"]["tuned_params"] == model.num_parameters() > out["sparse_mezo"]["tuned_params"]
    assert out["fo_layer"]["tuned_params"] == out["layer"]["tuned_params"] == layer2
    assert out["fo_full"]["weights_dtype"] == "float32" and out["fo_full"]["amp"] == "off"


def test_scoring_mode_times_both_scorings_on_real_batches(tmp_path, tiny_model, sst2_one_byte_data, squad_data):
    """--scoring: the task's training batches scored per candidate and with a shared prompt; one-byte
    candidates (single tokens for the tiny byte tokenizer) halve the sequences, the losses agree."""
    data = sst2_one_byte_data
    out = tmp_path / "scoring.json"
    assert bench.main(["--scoring", "--model", str(tiny_model), "--data", str(data), "--task", "sst2",
                       "--batch-size", "4", "--steps", "2", "--threads", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["modes"]) == {"per-sequence", "shared-prompt"}
    per, shared = res["modes"]["per-sequence"], res["modes"]["shared-prompt"]
    assert per["tokens_per_batch"] > shared["tokens_per_batch"] and 1.7 < res["token_ratio"] < 2.3
    assert res["speedup"] == pytest.approx(per["s_per_step"] / shared["s_per_step"])
    assert res["max_abs_loss_diff"] < 1e-5
    with pytest.raises(SystemExit):  # --data and --task are required
        bench.main(["--scoring", "--model", str(tiny_model), "--out", str(out)])
    with pytest.raises(Exception, match="nothing is scored by candidates"):
        bench.scoring_bench(str(tiny_model), str(squad_data), "squad", 2, 64, 1, "cpu", "fp32", 1)


# --- --paper-scale (make gpu-bench): on CPU with the architectures scaled down --------------------------------------

def test_paper_scale_scaled_cpu_run(tmp_path, capsys):
    """`--paper-scale --scaled`: both paper architectures built at 1/128 width (fp32, CPU), every mode measured on
    COPA's MeZO batch, the budget printed first, the JSON with the paper's speedup beside ours."""
    out = tmp_path / "gpu_bench.json"
    code = bench.main(["--paper-scale", "--scaled", "128", "--tasks", "copa", "--steps", "1", "--threads", "1",
                       "--probe-dir", str(tmp_path / "no-probe"), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert printed.startswith("time budget (CPU")
    res = json.loads(out.read_text())
    assert res["bench"] == "paper-scale" and res["scaled"] == 128 and res["device_type"] == "cpu"
    assert set(res["models"]) == {"llama2-7b", "qwen3-8b"} and res["paper_speedup_vs_mezo"]["copa"] == 4.52
    keys = {"inference", "mezo_faithful_full", "full", "sparse_mezo", "layer@1", "layer_paired@1", "floor@1", "lora_zo"}
    for name, m in res["models"].items():
        assert m["dtype"] == "float32" and m["width_divisor"] == 128 and m["build_s"] > 0
        sh = m["shapes"]["copa"]
        assert sh["batch"] == [16, 21] and set(sh["modes"]) == keys
        for key, r in sh["modes"].items():
            assert r["s"] > 0 and r["peak_mb"] > 0 and r["peak_vs_inference"] > 0, (name, key, r)
        assert sh["modes"]["mezo_faithful_full"]["speedup_vs_mezo"] == 1.0
        assert sh["modes"]["layer@1"]["tuned_params"] < sh["modes"]["full"]["tuned_params"]
        assert 0 < sh["modes"]["lora_zo"]["tuned_params"] < sh["modes"]["layer@1"]["tuned_params"] * m["layers"]
    llama, qwen = res["models"]["llama2-7b"], res["models"]["qwen3-8b"]
    assert llama["dominant_layer"] == 1 and llama["shapes"]["copa"]["speedups"]["paper_speedup_vs_mezo"] == 4.52
    assert llama["shapes"]["copa"]["speedups"]["dominant_speedup_vs_mezo"] > 0
    assert qwen["dominant_layer"] is None and qwen["dominant_source"].startswith("not known")
    assert qwen["shapes"]["copa"]["speedups"]["layer1_speedup_vs_mezo"] > 0
    assert [r["model"] for r in res["summary"]] == ["llama2-7b", "qwen3-8b"]


def test_paper_scale_refuses_without_gpu(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--paper-scale", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "--scaled" in err and not (tmp_path / "x.json").exists()


def test_paper_budget_fits_one_gpu_in_eight_minutes():
    b = bench.paper_budget(list(bench.PAPER_MODELS), ["sst2", "copa"], 3, 1, "cuda",
                           {"llama2-7b": [1], "qwen3-8b": [1, 3]}, bench.PAPER_LIMIT_S)
    assert b["fits"] and b["total_s"] < 480 and set(b["models"]) == {"llama2-7b", "qwen3-8b"}
    assert "sst2/layer_paired@3" in b["models"]["qwen3-8b"]["modes"]
    m = b["models"]["llama2-7b"]["modes"]  # the step-time model: MeZO's four out-of-place passes cost most
    assert m["copa/mezo_faithful_full"]["step_s"] > m["copa/full"]["step_s"] > m["copa/layer@1"]["step_s"]


def test_paper_shapes_layers_and_mezo_literal(tmp_path):
    """MeZO's batches (SST-2: 16 examples x 2 candidates x 43 tokens; COPA: 16 x 21, lm); the dominant layer's
    sources; MezoLiteral (MeZO's out-of-place arithmetic) takes the same step as dlzo.zo's restore="mezo"."""
    import torch

    from dlzo.architectures import get_architecture
    from dlzo.models import build_random
    from dlzo.objectives import loss
    from dlzo.zo import ZOSGD, param_groups

    sst2, copa = bench.paper_shape("sst2"), bench.paper_shape("copa")
    assert (sst2["sequences"], sst2["tokens"], sst2["objective"]) == (32, 43, "candidates")
    assert (copa["sequences"], copa["tokens"], copa["objective"]) == (16, 21, "lm")
    assert bench._resolve_dominant("llama2-7b", {}, None)[0] == 1
    assert bench._resolve_dominant("qwen3-8b", {"qwen3-8b": 4}, None) == (4, "--dominant")
    probe = tmp_path / "qwen3-8b" / "probe.json"
    probe.parent.mkdir()
    probe.write_text(json.dumps({"first_outlier_layer": 3}))
    assert bench._resolve_dominant("qwen3-8b", {}, str(tmp_path))[0] == 3
    assert bench._resolve_dominant("qwen3-8b", {}, None)[0] is None

    arch = {**get_architecture("llama2-7b", 256), "num_hidden_layers": 2, "vocab_size": 300}
    models = [build_random(arch, "cpu", torch.float32, seed=0) for _ in range(2)]
    batch = bench._paper_batch(300, sst2, torch.device("cpu"))
    assert batch.input_ids.shape == (32, 43) and batch.score_pos.numel() == 32 and len(batch.n_cands) == 16
    for cls, model in zip((bench.MezoLiteral, ZOSGD), models):
        opt = cls(param_groups(list(model.named_parameters()), 0.0), lr=1e-3, eps=1e-3, seed=0, restore="mezo")
        with torch.no_grad():
            opt.step(lambda: loss(model, batch))
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.equal(models[0].model.layers[0].mlp.up_proj.weight,
                           build_random(arch, "cpu", torch.float32, seed=0).model.layers[0].mlp.up_proj.weight)
