"""dlzo.bench: every mode runs on the tiny model, and the JSON carries the fields and ratios promised."""
import json
import pytest

from dlzo import bench


def test_every_mode_measures_round_robin(tiny_model):
    specs = {m: (m, 1) for m in bench.MODES}
    specs["layer@2"] = ("layer", 2)
    res = bench.measure_modes(specs, str(tiny_model), (4, 12), 2, "cpu", "fp32", 1)
    assert set(res) == set(specs)
    for r in res.values():
        assert r["s"] > 0 and r["peak_mb"] > 0


def test_json_fields_and_ratios(tmp_path, monkeypatch, tiny_model):
    fake = {"inference": 1.0, "mezo_faithful_full": 8.0, "full": 6.0, "layer": 2.0, "layer_paired": 1.8, "floor": 1.6}
    def fake_measure(specs, *a):
        return {name: {"s": fake[mode], "peak_mb": 100.0 + fake[mode]} for name, (mode, _) in specs.items()}

    monkeypatch.setattr(bench, "measure_modes", fake_measure)
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"first_outlier_layer": 3}))
    assert bench.main(["--model", str(tiny_model), "--out", str(tmp_path / "b.json"), "--probe", str(probe)]) == 0
    res = json.loads((tmp_path / "b.json").read_text())["results"]
    assert set(res) == {"sst2/layer-1", "sst2/layer-3", "copa/layer-1", "copa/layer-3"}
    r = res["sst2/layer-1"]
    assert r["speedup_vs_mezo"] == pytest.approx(4.0) and r["overhead_vs_floor"] == pytest.approx(1.25)
    assert r["inference_peak_mb"] == 101.0 and set(r["peak_mb"]) == {"mezo_faithful_full", "full", "layer", "floor"}
    assert r["shape"] == [16, 32] and res["copa/layer-3"]["shape"] == [16, 16]
