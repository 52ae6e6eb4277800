"""The tables stage's figures, readable in black and white (line styles and markers, not colours).

  layer_sweep.png   test accuracy against the tuned layer (the sweep), one panel per (model, task);
                    other methods as horizontal lines labelled with their values, the probe's layer and
                    the dominant run marked, the sweep layer chosen on dev ringed
  memory_accuracy.png  per (model, task): each method's peak training memory against its test accuracy,
                    the inference peak of the same model and batch as a line (MeZO's memory comparison)
  loss_curves.png   per (model, task): training loss (moving mean over steps, mean over seeds) and dev
                    loss at the checkpoints, for every method but the sweep, plus the sweep's dev-chosen layer
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from dlzo.io import atomic_path

# (linestyle, marker, grey) per method, in the tables' row order; methods beyond the list cycle through it
STYLES = [("-", "o", "0.0"), ("--", "s", "0.35"), (":", "^", "0.0"), ("-.", "D", "0.35"),
          ((0, (5, 1, 1, 1, 1, 1)), "v", "0.0"), ((0, (1, 1)), "P", "0.35"), ((0, (8, 2)), "X", "0.0"),
          ((0, (3, 1, 3, 3)), "<", "0.35")]
# horizontal reference lines: never solid, which is the sweep's own line
HLINES = [(":", "0.0"), ("--", "0.35"), ("-.", "0.0"), ((0, (5, 1, 1, 1, 1, 1)), "0.35"), ((0, (1, 1)), "0.35"),
          ((0, (8, 2)), "0.0"), ((0, (3, 1, 3, 3)), "0.35"), ((0, (2, 4)), "0.0")]
SWEEP = re.compile(r"layer-\d+")
AT_A_LAYER = re.compile(r"dominant.*|layer-\d+.*|fo-layer-\d+.*")  # methods that tune one layer


def _figure(n_panels: int, rows_per_panel: int = 1, w: float = 4.6, h: float = 3.3):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(3, max(1, n_panels))
    nrows = max(1, math.ceil(n_panels / ncols))
    fig, axes = plt.subplots(nrows * rows_per_panel, ncols, figsize=(w * ncols, h * nrows * rows_per_panel),
                             squeeze=False)
    return plt, fig, axes, ncols


def _save(plt, fig, png: Path, legend: dict) -> None:
    rows = 0
    if legend:
        ncol = max(1, min(5, len(legend), round(fig.get_figwidth() / 2.2)))  # about 2.2 inches a legend column
        fig.legend(list(legend.values()), list(legend.keys()), loc="lower center", ncol=ncol,
                   fontsize=8, frameon=False)
        rows = math.ceil(len(legend) / ncol)
    fig.tight_layout(rect=(0, min(0.3, 0.045 * rows * 6 / fig.get_figheight()), 1, 1))
    with atomic_path(png) as tmp:
        # tight: a legend wider than a one-panel figure (five columns) is kept whole, not clipped at the edges
        fig.savefig(tmp, dpi=150, format="png", bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)


def _style(method: str, order: list[str]):
    return STYLES[order.index(method) % len(STYLES)] if method in order else STYLES[-1]


def _spread_labels(ax, items: list[tuple[float, str]], min_gap: float = 0.075) -> None:
    """Value labels at the right edge of the axes, nudged apart so equal values stay legible."""
    lo, hi = ax.get_ylim()
    pos = sorted(((y - lo) / (hi - lo) if hi > lo else 0.5, text) for y, text in items)
    ys = [p for p, _ in pos]
    for i in range(1, len(ys)):
        ys[i] = max(ys[i], ys[i - 1] + min_gap)
    shift = max(0.0, ys[-1] - 0.98) if ys else 0.0
    ys = [y - shift for y in ys]
    for i in range(len(ys) - 2, -1, -1):  # pushed down past the bottom: spread from the top instead
        ys[i] = min(ys[i], ys[i + 1] - min_gap)
    for y, (_, text) in zip(ys, pos):
        ax.text(1.02, y, text, transform=ax.transAxes, fontsize=7, va="center", ha="left", clip_on=False)


def layer_sweep(evals: pd.DataFrame, runs: pd.DataFrame, probes: dict, best: pd.DataFrame, png) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    from dlzo.tables import order_methods

    panels = sorted(evals[["model", "task"]].drop_duplicates().itertuples(index=False))
    plt, fig, axes, ncols = _figure(len(panels), w=5.4)
    flat = [ax for row in axes for ax in row]
    lines = order_methods(m for m in evals["method"].unique() if not AT_A_LAYER.fullmatch(m))
    legend = {}
    for ax, (model, task) in zip(flat, panels):
        sub = evals[(evals["model"] == model) & (evals["task"] == task)]
        sweep = sub[sub["method"].str.fullmatch(SWEEP.pattern)].copy()
        if not sweep.empty:
            sweep["layer"] = sweep["method"].str.slice(6).astype(int)
            s = sweep.groupby("layer")["value"].agg(["mean", "std"]).fillna(0.0)
            ax.errorbar(s.index, s["mean"], yerr=s["std"], marker="o", color="black", capsize=2, linestyle="none")
            # lines only between adjacent layers: a line across a gap would invent the layers in between
            idx = list(s.index)
            start = 0
            for i in range(1, len(idx) + 1):
                if i == len(idx) or idx[i] != idx[i - 1] + 1:
                    if i - start > 1:
                        ax.plot(idx[start:i], s["mean"].iloc[start:i], "-", color="black", lw=1.2)
                    start = i
            legend["single layer (sweep), mean ± std over seeds"] = Line2D([], [], color="black", marker="o", lw=1.2)
            chosen = best[(best["model"] == model) & (best["task"] == task)]["chosen"]
            if not chosen.empty:
                k = int(chosen.iloc[0][6:])
                ax.plot([k], [s.loc[k, "mean"]], marker="s", ms=13, mfc="none", mec="black", mew=1.3,
                        linestyle="none")
                legend["sweep layer chosen on dev loss"] = Line2D([], [], marker="s", ms=10, mfc="none",
                                                                  mec="black", linestyle="none")
        labels = []
        for method in lines:
            v = sub[sub["method"] == method]["value"]
            if v.empty:
                continue
            ls, grey = HLINES[lines.index(method) % len(HLINES)]
            ax.axhline(v.mean(), linestyle=ls, color=grey, lw=1.3)
            labels.append((v.mean(), f"{method} {v.mean():.1f}"))
            legend[method] = Line2D([], [], linestyle=ls, color=grey, lw=1.3)
        first = (probes.get(model) or {}).get("first_outlier_layer")
        if first is not None:
            ax.axvline(first, linestyle="-.", color="0.2", linewidth=1)
            ax.annotate(f"probe: layer {first}", (first, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(3, -11), textcoords="offset points", fontsize=8)
        # drawn under the star, larger and hollow, so both stay visible when they coincide
        for method, marker, ms, z in (("dominant", "*", 14, 6), ("dominant-lora", "D", 13, 5)):
            dom = sub[sub["method"] == method]["value"]
            dl = runs[(runs["model"] == model) & (runs["method"] == method)]["layer"].dropna()
            if not dom.empty and not dl.empty:
                ax.plot([int(dl.iloc[0])], [dom.mean()], marker=marker, markersize=ms, color="black",
                        mfc="none" if method != "dominant" else "black", linestyle="none", zorder=z)
                legend[f"{method} (its layer)"] = Line2D([], [], marker=marker, ms=ms * 0.8, color="black",
                                                          mfc="none" if method != "dominant" else "black",
                                                          linestyle="none")
        n = (probes.get(model) or {}).get("num_layers")
        if n:
            ax.set_xlim(-1, n)
        ax.margins(y=0.12)  # room for the markers at the extremes
        lo, hi = ax.get_ylim()
        if hi - lo < 2:  # all values equal: a few points of range instead of float noise on an offset axis
            ax.set_ylim((lo + hi) / 2 - 1.5, (lo + hi) / 2 + 1.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        metric = "/".join(sorted(set(sub["metric"].dropna()))) or "accuracy"
        ax.set_title(f"{model} / {task}", fontsize=10)
        ax.set_xlabel("tuned decoder layer (0-based index)")
        ax.set_ylabel(f"test {'F1' if metric == 'f1' else metric} (%)")
        ax.grid(alpha=0.3)
        _spread_labels(ax, labels)
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    _save(plt, fig, Path(png), legend)


def _moving_mean(ys: list[float], w: int) -> list[float]:
    return list(pd.Series(ys, dtype=float).rolling(w, min_periods=1).mean())


def loss_curves(logs, best: pd.DataFrame, png) -> None:
    """Train loss (top) and dev loss (bottom) per method; the sweep shows only its dev-chosen layer."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    from dlzo.tables import order_methods

    runs = logs.runs
    panels = sorted(runs[["model", "task"]].drop_duplicates().itertuples(index=False))
    plt, fig, axes, ncols = _figure(len(panels), rows_per_panel=2, w=4.8, h=2.6)
    methods = order_methods(m for m in runs["method"].unique() if not SWEEP.fullmatch(m)) + ["(best sweep layer)"]
    legend = {}
    for i, (model, task) in enumerate(panels):
        r, c = divmod(i, ncols)
        top, bottom = axes[2 * r][c], axes[2 * r + 1][c]
        chosen = best[(best["model"] == model) & (best["task"] == task)]["chosen"]
        shown = [m for m in methods[:-1] if ((runs["model"] == model) & (runs["task"] == task)
                                             & (runs["method"] == m)).any()]
        picked = chosen.iloc[0] if not chosen.empty else None
        window = 1
        for method in shown + ([picked] if picked else []):
            style = _style("(best sweep layer)" if method == picked else method, methods)
            ls, marker, grey = style
            label = f"{method} (sweep, best on dev)" if method == picked else method
            keys = [k for k in logs.train_curves if k[:3] == (model, task, method)]
            curves = [dict(logs.train_curves[k]) for k in keys if logs.train_curves[k]]
            if curves:
                steps = sorted(set.intersection(*(set(cv) for cv in curves)))
                ys = [sum(cv[s] for cv in curves) / len(curves) for s in steps]
                window = max(1, len(steps) // 10)
                top.plot(steps, _moving_mean(ys, window), linestyle=ls, color=grey, marker=marker, mfc="white",
                         ms=5, markevery=max(1, len(steps) // 6), lw=1.3)
            devs = [dict(logs.dev_curves[k]) for k in keys if logs.dev_curves.get(k)]
            if devs:
                steps = sorted(set.intersection(*(set(cv) for cv in devs)))
                ys = [sum(cv[s] for cv in devs) / len(devs) for s in steps]
                bottom.plot(steps, ys, linestyle=ls, color=grey, marker=marker, mfc="white", ms=5, lw=1.3)
            legend[label if method != picked else "best sweep layer (dev)"] = Line2D(
                [], [], linestyle=ls, color=grey, marker=marker, mfc="white", ms=5, lw=1.3)
        top.set_title(f"{model} / {task}" + (f" (best sweep layer: {picked})" if picked else ""), fontsize=9)
        top.set_ylabel("train loss (nats)" + (f"\n{window}-step moving mean" if window > 1 else ""), fontsize=8)
        bottom.set_ylabel("dev loss (nats)", fontsize=8)
        bottom.set_xlabel("ZO step")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for i in range(len(panels), len(axes[0]) * (len(axes) // 2)):
        r, c = divmod(i, ncols)
        axes[2 * r][c].set_visible(False)
        axes[2 * r + 1][c].set_visible(False)
    _save(plt, fig, Path(png), legend)


def memory_accuracy(acc: pd.DataFrame, speed: pd.DataFrame, png) -> None:
    """Peak training memory against test accuracy, one panel per (model, task), one point per method
    (the sweep's single layers left out, the dominant run kept); the inference peak of the same model
    and batch as a vertical line when the logs record it (MeZO's memory comparison)."""
    from matplotlib.lines import Line2D

    if speed.empty or acc.empty:
        plt, fig, axes, _ = _figure(1)
        axes[0][0].text(0.5, 0.5, "no training runs", ha="center", va="center")
        axes[0][0].set_axis_off()
        _save(plt, fig, png, {})
        return
    speed = speed[~speed["method"].map(lambda m: bool(SWEEP.fullmatch(m)))]
    panels = sorted({(m, t) for m, t in zip(speed["model"], speed["task"])})
    plt, fig, axes, ncols = _figure(len(panels))
    order = list(dict.fromkeys(speed["method"]))
    legend = {}
    for k, (model, task) in enumerate(panels):
        ax = axes[k // ncols][k % ncols]
        rows = speed[(speed["model"] == model) & (speed["task"] == task)]
        for _, r in rows.iterrows():
            a = acc[(acc["model"] == model) & (acc["task"] == task) & (acc["method"] == r["method"])]
            if a.empty or pd.isna(r["peak_memory_mb"]):
                continue
            _, marker, grey = _style(r["method"], order)
            ax.plot([r["peak_memory_mb"]], [float(a["mean"].iloc[0])], marker=marker, color=grey, ls="none",
                    markersize=8, markerfacecolor="white" if order.index(r["method"]) % 2 else grey)
            # no text beside the points (coinciding methods would overwrite each other): the legend names them
            legend.setdefault(r["method"], Line2D([], [], marker=marker, color=grey, ls="none",
                                                  markerfacecolor="white" if order.index(r["method"]) % 2 else grey))
        inf = rows["inference_peak_mb"].dropna() if "inference_peak_mb" in rows else pd.Series(dtype=float)
        if not inf.empty:
            ax.axvline(float(inf.median()), ls=":", color="0.3", lw=1)
            ax.text(float(inf.median()), 0.97, " inference peak", transform=ax.get_xaxis_transform(), fontsize=7,
                    va="top", ha="left")
            legend.setdefault("inference peak (same model and batch)", Line2D([], [], ls=":", color="0.3"))
        ax.set_title(f"{model} / {task}", fontsize=10)
        ax.set_xlabel("peak memory of the training job (MB)")
        ax.set_ylabel("test accuracy / F1 (%)")
        ax.grid(alpha=0.3)
    for k in range(len(panels), len(axes) * ncols):
        axes[k // ncols][k % ncols].set_axis_off()
    _save(plt, fig, png, legend)


def sweep_panel(per_layer: pd.DataFrame, raw: bool = False) -> tuple[dict, str | None]:
    """The predictor figure's sweep panel: task -> {layer: value} and its y label. The dev-loss drop (the
    signal the pipeline selects on, far less noisy than a small test split) when every swept layer of every
    task has one, else the test gain (minus zero-shot; ``raw``: no zero-shot row, so the test value itself)."""
    def per_task(suffix):
        out = {}
        for col in sorted(c for c in per_layer.columns if c.endswith(suffix)):
            vals = per_layer.dropna(subset=[col])
            if not vals.empty:
                out[col[:-len(suffix)]] = {int(k): float(v) for k, v in zip(vals["layer"], vals[col])}
        return out

    gains, drops = per_task("_test_gain"), per_task("_dev_drop")
    if gains and set(drops) == set(gains) and all(set(drops[t]) == set(gains[t]) for t in gains):
        return drops, "sweep: dev-loss drop\n(step 0 minus best)"
    return gains, "sweep: test value (%)" if raw else "sweep: test value\nminus zero-shot (points)"


def layer_predictors(per_layer: pd.DataFrame, probe: dict, sens: dict, grad: dict, model: str, png,
                     raw: bool = False) -> None:
    """The three per-layer predictors (probe, ZO sensitivity, first-order gradient norm) and, below them, the
    sweep per task from ``dlzo.tables.layer_ranking`` (``sweep_panel``)."""
    from dlzo.probe import plot_predictors

    sweep, label = sweep_panel(per_layer, raw)
    plot_predictors(probe, sens, grad, png, title=f"{model}: three predictors of the layer to tune"
                    + (", and the sweep" if sweep else ""), sweep=sweep or None, sweep_label=label)
