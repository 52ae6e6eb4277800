"""Tables from small hand-made result files equal hand-computed values."""
import json

import pandas as pd
import pytest

from dlzo import DLZOError
from dlzo.tables import main, write_tables


def put(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return str(path)


@pytest.fixture
def results(tmp_path):
    r = tmp_path / "results"
    evals, logs = [], []
    acc = {  # (task, method, seed) -> accuracy fraction
        ("sst2", "mezo-full", 0): 0.80, ("sst2", "mezo-full", 1): 0.90,
        ("copa", "mezo-full", 0): 0.60, ("copa", "mezo-full", 1): 0.70,
        ("sst2", "dominant", 0): 0.85, ("sst2", "dominant", 1): 0.95,
        ("copa", "dominant", 0): 0.65, ("copa", "dominant", 1): 0.55,
        ("sst2", "layer-3", 0): 0.70, ("sst2", "layer-3", 1): 0.70,
        ("copa", "layer-3", 0): 0.50, ("copa", "layer-3", 1): 0.50,
        ("sst2", "layer-5", 0): 0.60, ("sst2", "layer-5", 1): 0.60,
        ("copa", "layer-5", 0): 0.40, ("copa", "layer-5", 1): 0.40,
    }
    dev = {"layer-3": {"sst2": 0.5, "copa": 0.9}, "layer-5": {"sst2": 0.6, "copa": 0.8}}
    step = {"mezo-full": 2.0, "dominant": 0.5, "layer-3": 0.4, "layer-5": 0.2}
    for (task, method, seed), v in acc.items():
        evals.append(put(r / f"eval/m/{task}/{method}/seed{seed}.json", {"metric": "acc", "value": v}))
        logs.append(put(r / f"train/m/{task}/{method}/seed{seed}/log.json", {
            "layer": 3 if method == "dominant" else (int(method[6:]) if method.startswith("layer-") else None),
            "layer_from": "probe" if method == "dominant" else None, "tuned_params": 10,
            "best_dev_loss": dev.get(method, {}).get(task, 1.0),
            "timing": {"s_per_step": step[method] * (1 + seed), "train_s": 10 * step[method] * (1 + seed),
                       "forward_s_per_step": 0.1, "perturb_s_per_step": 0.01, "update_s_per_step": 0.01}}))
    for task, v in (("sst2", 0.5), ("copa", 0.55)):
        evals.append(put(r / f"eval/m/{task}/zero-shot.json", {"metric": "acc", "value": v}))
    probes = [put(r / "probe/m/probe.json", {"first_outlier_layer": 3, "num_layers": 8})]
    return evals, logs, probes, tmp_path / "tables"


def cell(acc, method, task):
    return acc[(acc["method"] == method) & (acc["task"] == task)].iloc[0]


def test_accuracy_means_std_and_average(results):
    evals, logs, probes, out = results
    acc = write_tables(evals, logs, probes, out)["accuracy"]
    c = cell(acc, "mezo-full", "sst2")
    assert c["mean"] == pytest.approx(85.0) and c["std"] == pytest.approx(7.0710678) and c["n_seeds"] == 2
    # average over tasks per seed first: seed 0 (80+60)/2 = 70, seed 1 (90+70)/2 = 80 -> 75 +- 7.07
    avg = cell(acc, "mezo-full", "avg")
    assert avg["mean"] == pytest.approx(75.0) and avg["std"] == pytest.approx(7.0710678)
    d = cell(acc, "dominant", "avg")  # seeds: (85+65)/2 = 75, (95+55)/2 = 75
    assert d["mean"] == pytest.approx(75.0) and d["std"] == pytest.approx(0.0)
    assert cell(acc, "zero-shot", "avg")["mean"] == pytest.approx(52.5)
    # best layer by dev loss: layer-3 on sst2 (0.5 < 0.6), layer-5 on copa (0.8 < 0.9), never by test
    assert cell(acc, "best layer (dev)", "sst2")["chosen"] == "layer-3"
    assert cell(acc, "best layer (dev)", "copa")["chosen"] == "layer-5"
    assert cell(acc, "best layer (dev)", "avg")["mean"] == pytest.approx((70 + 40) / 2)
    md = (out / "accuracy.md").read_text()
    assert "| dominant (layer 3, probe) |" in md and "85.0 ± 7.1" in md
    assert pd.read_csv(out / "accuracy.csv").shape[0] == len(acc)
    assert (out / "layer_sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_speedups(results):
    evals, logs, probes, out = results
    sp = write_tables(evals, logs, probes, out)["speedup"].set_index(["task", "method"])
    # mean s/step over seeds: mezo (2+4)/2 = 3, dominant (0.5+1)/2 = 0.75 -> 4x
    assert sp.loc[("sst2", "dominant"), "s_per_step"] == pytest.approx(0.75)
    assert sp.loc[("sst2", "dominant"), "speedup_step_vs_mezo"] == pytest.approx(4.0)
    assert sp.loc[("copa", "layer-5"), "speedup_train_vs_mezo"] == pytest.approx(30 / 3)
    assert sp.loc[("sst2", "mezo-full"), "speedup_step_vs_mezo"] == pytest.approx(1.0)
    assert "4.00x" in (out / "speedup.md").read_text()


def test_missing_result_file_is_named(results, tmp_path):
    evals, logs, probes, out = results
    missing = str(tmp_path / "results/eval/m/sst2/lora-zo/seed0.json")
    with pytest.raises(DLZOError, match="lora-zo/seed0.json does not exist"):
        write_tables(evals + [missing], logs, probes, out)
    assert main(["--evals", missing, "--out", str(out)]) == 1


def test_result_outside_the_layout_is_refused(tmp_path, results):
    evals, logs, probes, out = results
    stray = put(tmp_path / "somewhere/acc.json", {"value": 0.5})
    with pytest.raises(DLZOError, match="results layout"):
        write_tables(evals + [stray], logs, probes, out)
