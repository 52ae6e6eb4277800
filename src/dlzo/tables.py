"""Stage ``tables``: the paper's accuracy and speedup tables and the layer-sweep figure.

Every number is found by path: ``eval/<model>/<task>/<method>/seed<s>.json`` (or ``zero-shot.json``)
and ``train/<model>/<task>/<method>/seed<s>/log.json``. Outputs (Markdown + CSV + PNG):
  accuracy.md/.csv   methods x tasks (+ average), mean +- std over seeds, in percent
  speedup.md/.csv    seconds per step (forward / perturbation / update), training time, and the
                     speedup of every method over mezo-full
  layer_sweep.png    accuracy against the tuned layer, baselines as lines, the probe's layer marked
  provenance.json    what made them: the arguments, every input file's sha256, packages, git commit, wall time
"""
from __future__ import annotations

import argparse
import hashlib
import re
import sys
import time
from pathlib import Path

import pandas as pd

from dlzo import DLZOError
from dlzo.io import atomic_path, read_json, write_json
from dlzo.runtime import provenance

EVAL_RE = re.compile(r"eval/(?P<model>[^/]+)/(?P<task>[^/]+)/(?:(?P<method>[^/]+)/seed(?P<seed>\d+)|zero-shot)\.json$")
LOG_RE = re.compile(r"train/(?P<model>[^/]+)/(?P<task>[^/]+)/(?P<method>[^/]+)/seed(?P<seed>\d+)/log\.json$")
ROW_ORDER = ["zero-shot", "mezo-full", "lora-zo", "dominant", "dominant-lora", "best layer (dev)"]


def _match(regex, path: str, what: str) -> dict:
    m = regex.search(Path(path).as_posix())
    if not m:
        raise DLZOError(f"{what} {path}: the path does not follow the results layout ({regex.pattern})")
    return m.groupdict()


def load_evals(paths: list[str]) -> pd.DataFrame:
    rows = []
    for path in paths:
        key = _match(EVAL_RE, path, "evaluation result")
        res = read_json(path, "evaluation result")
        if "value" not in res:
            raise DLZOError(f"evaluation result {path} has no `value` field")
        rows.append({"model": key["model"], "task": key["task"], "method": key["method"] or "zero-shot",
                     "seed": int(key["seed"]) if key["seed"] else None, "metric": res.get("metric"),
                     "value": 100.0 * float(res["value"])})
    return pd.DataFrame(rows, columns=["model", "task", "method", "seed", "metric", "value"])


def load_logs(paths: list[str]) -> pd.DataFrame:
    rows = []
    for path in paths:
        key = _match(LOG_RE, path, "training log")
        log = read_json(path, "training log")
        t = log.get("timing") or {}
        rows.append({"model": key["model"], "task": key["task"], "method": key["method"], "seed": int(key["seed"]),
                     "layer": log.get("layer"), "layer_from": log.get("layer_from"),
                     "tuned_params": log.get("tuned_params"), "best_dev_loss": log.get("best_dev_loss"),
                     "s_per_step": t.get("s_per_step"), "train_s": t.get("train_s"),
                     "forward_s": t.get("forward_s_per_step"), "perturb_s": t.get("perturb_s_per_step"),
                     "update_s": t.get("update_s_per_step"), "peak_memory_mb": log.get("peak_memory_mb"),
                     "lr": (log.get("hyper") or {}).get("lr")})
    return pd.DataFrame(rows)


def best_layer_rows(evals: pd.DataFrame, logs: pd.DataFrame) -> pd.DataFrame:
    """Per (model, task): the sweep layer with the lowest mean dev loss, relabelled 'best layer (dev)'.

    Chosen on dev, never on test, so the row is a fair competitor to the others.
    """
    sweep = logs[logs["method"].str.fullmatch(r"layer-\d+")]
    if sweep.empty:
        return evals.iloc[0:0]
    dev = sweep.groupby(["model", "task", "method"])["best_dev_loss"].mean().reset_index()
    pick = dev.loc[dev.groupby(["model", "task"])["best_dev_loss"].idxmin()]
    rows = evals.merge(pick[["model", "task", "method"]], on=["model", "task", "method"])
    rows = rows.assign(chosen=rows["method"], method="best layer (dev)")
    return rows


def accuracy_table(evals: pd.DataFrame, logs: pd.DataFrame) -> pd.DataFrame:
    """Long table: model, method, task, mean, std, n_seeds (the average is a task 'avg')."""
    best = best_layer_rows(evals, logs)
    allrows = pd.concat([evals.assign(chosen=None), best], ignore_index=True)
    g = allrows.groupby(["model", "method", "task"])
    out = g["value"].agg(mean="mean", std=lambda v: v.std(ddof=1) if len(v) > 1 else 0.0,
                         n_seeds="count").reset_index()
    chosen = g["chosen"].first().reset_index()
    out = out.merge(chosen, on=["model", "method", "task"])
    # The average over tasks, per seed first, so its std is the spread of the seeds' averages.
    per_seed = allrows.assign(seed=allrows["seed"].fillna(-1))
    ntask = per_seed.groupby("model")["task"].nunique()
    avg = per_seed.groupby(["model", "method", "seed"]).agg(value=("value", "mean"), tasks=("task", "nunique"))
    avg = avg.reset_index()
    avg = avg[avg["tasks"] == avg["model"].map(ntask)]  # only methods with every task
    # zero-shot has no seed: its average joins every seed of the others
    a = avg.groupby(["model", "method"])["value"].agg(
        mean="mean", std=lambda v: v.std(ddof=1) if len(v) > 1 else 0.0, n_seeds="count").reset_index()
    a["task"] = "avg"
    a["chosen"] = None
    return pd.concat([out, a], ignore_index=True)


def _method_label(method: str, logs: pd.DataFrame, model: str) -> str:
    if method in ("dominant", "dominant-lora"):
        sel = logs[(logs["model"] == model) & (logs["method"] == method)]
        if not sel.empty:
            return f"{method} (layer {int(sel['layer'].iloc[0])}, {sel['layer_from'].iloc[0]})"
    return method


def _order(methods) -> list[str]:
    known = [m for m in ROW_ORDER if m in methods]
    layers = sorted((m for m in methods if m not in ROW_ORDER), key=lambda m: (len(m), m))
    return known + layers


def accuracy_markdown(table: pd.DataFrame, logs: pd.DataFrame) -> str:
    parts = []
    for model, sub in table.groupby("model", sort=False):
        tasks = [t for t in sub["task"].unique() if t != "avg"] + (["avg"] if (sub["task"] == "avg").any() else [])
        header = "| method | " + " | ".join(tasks) + " |"
        lines = [f"### {model}", "", header, "|" + "---|" * (len(tasks) + 1)]
        for method in _order(sub["method"].unique()):
            cells = []
            for task in tasks:
                r = sub[(sub["method"] == method) & (sub["task"] == task)]
                if r.empty:
                    cells.append("-")
                    continue
                r = r.iloc[0]
                cell = f"{r['mean']:.1f}" + (f" ± {r['std']:.1f}" if r["n_seeds"] > 1 else "")
                if isinstance(r["chosen"], str):
                    cell += f" ({r['chosen']})"
                cells.append(cell)
            lines.append(f"| {_method_label(method, logs, model)} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    note = ("Accuracy (F1 for SQuAD/DROP) on each task's test split, percent; mean ± std over seeds where "
            "there are several. 'best layer (dev)': the sweep layer with the lowest dev loss, per task.")
    return "\n\n".join(parts + [note]) + "\n"


def speedup_table(logs: pd.DataFrame) -> pd.DataFrame:
    cols = ["s_per_step", "train_s", "forward_s", "perturb_s", "update_s", "peak_memory_mb", "tuned_params"]
    g = logs.groupby(["model", "task", "method"])[cols].mean().reset_index()
    ref = g[g["method"] == "mezo-full"].set_index(["model", "task"])
    key = list(zip(g["model"], g["task"]))
    g["speedup_step_vs_mezo"] = [ref["s_per_step"].get(k, float("nan")) / v for k, v in zip(key, g["s_per_step"])]
    g["speedup_train_vs_mezo"] = [ref["train_s"].get(k, float("nan")) / v for k, v in zip(key, g["train_s"])]
    g["layer"] = logs.groupby(["model", "task", "method"])["layer"].first().values
    return g


def speedup_markdown(sp: pd.DataFrame) -> str:
    parts = []
    for (model, task), sub in sp.groupby(["model", "task"], sort=False):
        lines = [f"### {model} / {task}", "",
                 "| method | tuned params | s/step | forward s | perturb s | update s | train s | speedup vs mezo-full |",
                 "|---|---|---|---|---|---|---|---|"]
        for method in _order(sub["method"].unique()):
            r = sub[sub["method"] == method].iloc[0]
            label = method + (f" (layer {int(r['layer'])})" if method.startswith("dominant") else "")
            lines.append(f"| {label} | {int(r['tuned_params']):,} | {r['s_per_step']:.3f} | {r['forward_s']:.3f} | "
                         f"{r['perturb_s']:.4f} | {r['update_s']:.4f} | {r['train_s']:.1f} | "
                         f"{r['speedup_step_vs_mezo']:.2f}x |")
        parts.append("\n".join(lines))
    note = ("Seconds per ZO step measured inside the training jobs (mean over steps and seeds), split into the "
            "two forward passes, the perturbations (z draws and restores) and the update.")
    return "\n\n".join(parts + [note]) + "\n"


def layer_figure(evals: pd.DataFrame, probes: dict[str, dict], logs: pd.DataFrame, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [(m, t) for m, t in evals[["model", "task"]].drop_duplicates().itertuples(index=False)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.2 * max(1, len(panels)), 3.4), squeeze=False)
    styles = {"mezo-full": ("-", "mezo-full"), "lora-zo": ("--", "lora-zo"), "zero-shot": (":", "zero-shot")}
    for ax, (model, task) in zip(axes[0], panels):
        sub = evals[(evals["model"] == model) & (evals["task"] == task)]
        sweep = sub[sub["method"].str.fullmatch(r"layer-\d+")].copy()
        if not sweep.empty:
            sweep["layer"] = sweep["method"].str.slice(6).astype(int)
            s = sweep.groupby("layer")["value"].agg(["mean", "std"]).fillna(0.0)
            dense = len(s) > 2 and (s.index.to_series().diff().dropna() == 1).all()
            ax.errorbar(s.index, s["mean"], yerr=s["std"], marker="o", color="black", capsize=2,
                        linestyle="-" if dense else "none",  # a line between far-apart layers would invent values
                        label="single layer (sweep)")
        for method, (ls, label) in styles.items():
            v = sub[sub["method"] == method]["value"]
            if not v.empty:
                ax.axhline(v.mean(), linestyle=ls, color="0.35", label=label)
        first = (probes.get(model) or {}).get("first_outlier_layer")
        if first is not None:
            ax.axvline(first, linestyle="-.", color="0.2", linewidth=1)
            ax.annotate(f"probe: layer {first}", (first, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(3, -12), textcoords="offset points", fontsize=8)
        dom = sub[sub["method"] == "dominant"]["value"]
        dl = logs[(logs["model"] == model) & (logs["method"] == "dominant")]["layer"]
        if not dom.empty and not dl.empty:
            ax.plot([int(dl.iloc[0])], [dom.mean()], marker="*", markersize=13, color="black",
                    linestyle="none", label="dominant")
        n = (probes.get(model) or {}).get("num_layers")
        if n:
            ax.set_xlim(-0.5, n - 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{model} / {task}", fontsize=10)
        ax.set_xlabel("tuned decoder layer (0-based)")
        ax.set_ylabel("test accuracy / F1 (%)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=150, format="png")
    plt.close(fig)


def write_tables(evals_paths, log_paths, probe_paths, out_dir) -> dict:
    out = Path(out_dir)
    evals, logs = load_evals(evals_paths), load_logs(log_paths)
    if evals.empty:
        raise DLZOError("no evaluation results were given: nothing to tabulate")
    probes = {}
    for p in probe_paths:
        probes[Path(p).parent.name] = read_json(p, "probe result")
    acc = accuracy_table(evals, logs)
    sp = speedup_table(logs) if not logs.empty else pd.DataFrame()
    for name, text in (("accuracy.md", accuracy_markdown(acc, logs)),
                       ("speedup.md", speedup_markdown(sp) if not sp.empty else "no training runs\n")):
        with atomic_path(out / name) as tmp:
            tmp.write_text(text)
    for name, df in (("accuracy.csv", acc), ("speedup.csv", sp)):
        with atomic_path(out / name) as tmp:
            df.to_csv(tmp, index=False, float_format="%.6g")
    layer_figure(evals, probes, logs, out / "layer_sweep.png")
    return {"accuracy": acc, "speedup": sp}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--evals", nargs="+", required=True)
    ap.add_argument("--train-logs", nargs="*", default=[])
    ap.add_argument("--probes", nargs="*", default=[])
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    started = time.time()
    try:
        write_tables(a.evals, a.train_logs, a.probes, a.out)
    except DLZOError as err:
        print(f"tables: error: {err}", file=sys.stderr)
        return 1
    inputs = {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in [*a.evals, *a.train_logs, *a.probes]}
    write_json(Path(a.out) / "provenance.json",
               {"inputs_sha256": inputs, "provenance": provenance(started=started, config=vars(a))})
    print((Path(a.out) / "accuracy.md").read_text())
    print((Path(a.out) / "speedup.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
