"""dlzo.bench: every mode runs on the tiny model, and the JSON carries the fields and ratios promised."""
import json
import queue

import pytest

from dlzo import bench


@pytest.mark.parametrize("mode", bench.MODES)
def test_each_mode_measures(tiny_model, mode):
    q = queue.Queue()
    bench._measure(mode, str(tiny_model), 1, (4, 12), 2, "cpu", "fp32", 1, q)
    r = q.get_nowait()
    assert r["s"] > 0 and r["peak_mb"] > 0


def test_json_fields_and_ratios(tmp_path, monkeypatch, tiny_model):
    fake = {"inference": 1.0, "mezo_faithful_full": 8.0, "full": 6.0, "layer": 2.0, "floor": 1.6}
    monkeypatch.setattr(bench, "run_mode", lambda mode, *a: {"s": fake[mode], "peak_mb": 100.0 + fake[mode]})
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"first_outlier_layer": 3}))
    assert bench.main(["--model", str(tiny_model), "--out", str(tmp_path / "b.json"), "--probe", str(probe)]) == 0
    res = json.loads((tmp_path / "b.json").read_text())["results"]
    assert set(res) == {"sst2/layer-1", "sst2/layer-3", "copa/layer-1", "copa/layer-3"}
    r = res["sst2/layer-1"]
    assert r["speedup_vs_mezo"] == pytest.approx(4.0) and r["overhead_vs_floor"] == pytest.approx(1.25)
    assert r["inference_peak_mb"] == 101.0 and set(r["peak_mb"]) == {"mezo_faithful_full", "full", "layer", "floor"}
    assert r["shape"] == [16, 32] and res["copa/layer-3"]["shape"] == [16, 16]
