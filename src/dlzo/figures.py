"""The tables stage's figures, readable in black and white (line styles and markers, not colours).

  layer_sweep.png   test accuracy against the tuned layer (the sweep), one panel per (model, task);
                    other methods as horizontal lines labelled with their values, the probe's layer and
                    the dominant run marked, the sweep layer chosen on dev ringed
  memory_accuracy.png  per (model, task): each method's peak training memory against its test accuracy,
                    the inference peak of the same model and batch as a line (MeZO's memory comparison)
  loss_curves.png   per (model, task): training loss (moving mean over steps, mean over seeds) and dev
                    loss at the checkpoints, for every method but the sweep, plus the sweep's dev-chosen layer
  layer_predictors.png  the probe's, the ZO sensitivity's and the gradient norms' per-layer profiles on one
                    layer axis, with the sweep per task below them (``layer_predictors``)

and the probe stages' own figures, drawn from their JSON by ``python -m dlzo.figures profile|sensitivity|predictors``
(the workflow's plot_probe, plot_sensitivity and plot_predictors rules): ``plot_profile`` (probe.json),
``plot_sensitivity`` (sensitivity.json) and ``plot_predictors`` (the three JSONs). The compute stages
(probe, profiles) do not draw: an edit here redraws figures and reruns no probe and no training.

Torch-free, and below every stage: it imports no stage module (not probe, profiles or tables), only
torch-free helpers (dlzo.io, dlzo.methods); the tables stage imports it. pandas and matplotlib are imported
where they are used.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from dlzo.io import atomic_path
from dlzo.methods import is_sweep, order_methods, sweep_layer, tunes_one_layer

if TYPE_CHECKING:
    import pandas as pd

# (linestyle, marker, grey) per method, in the tables' row order; methods beyond the list cycle through it
STYLES = [("-", "o", "0.0"), ("--", "s", "0.35"), (":", "^", "0.0"), ("-.", "D", "0.35"),
          ((0, (5, 1, 1, 1, 1, 1)), "v", "0.0"), ((0, (1, 1)), "P", "0.35"), ((0, (8, 2)), "X", "0.0"),
          ((0, (3, 1, 3, 3)), "<", "0.35")]
# horizontal reference lines: never solid, which is the sweep's own line
HLINES = [(":", "0.0"), ("--", "0.35"), ("-.", "0.0"), ((0, (5, 1, 1, 1, 1, 1)), "0.35"), ((0, (1, 1)), "0.35"),
          ((0, (8, 2)), "0.0"), ((0, (3, 1, 3, 3)), "0.35"), ((0, (2, 4)), "0.0")]


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

    panels = sorted(evals[["model", "task"]].drop_duplicates().itertuples(index=False))
    plt, fig, axes, ncols = _figure(len(panels), w=5.4)
    flat = [ax for row in axes for ax in row]
    lines = order_methods(m for m in evals["method"].unique() if not tunes_one_layer(m))
    legend = {}
    for ax, (model, task) in zip(flat, panels):
        sub = evals[(evals["model"] == model) & (evals["task"] == task)]
        sweep = sub[sub["method"].map(is_sweep).astype(bool)].copy()
        if not sweep.empty:
            sweep["layer"] = sweep["method"].map(sweep_layer).astype(int)
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
                k = sweep_layer(chosen.iloc[0])
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
    import pandas as pd

    return list(pd.Series(ys, dtype=float).rolling(w, min_periods=1).mean())


def loss_curves(logs, best: pd.DataFrame, png) -> None:
    """Train loss (top) and dev loss (bottom) per method; the sweep shows only its dev-chosen layer."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    runs = logs.runs
    panels = sorted(runs[["model", "task"]].drop_duplicates().itertuples(index=False))
    plt, fig, axes, ncols = _figure(len(panels), rows_per_panel=2, w=4.8, h=2.6)
    methods = order_methods(m for m in runs["method"].unique() if not is_sweep(m)) + ["(best sweep layer)"]
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
    import pandas as pd
    from matplotlib.lines import Line2D

    if speed.empty or acc.empty:
        plt, fig, axes, _ = _figure(1)
        axes[0][0].text(0.5, 0.5, "no training runs", ha="center", va="center")
        axes[0][0].set_axis_off()
        _save(plt, fig, png, {})
        return
    speed = speed[~speed["method"].map(is_sweep).astype(bool)]
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
    sweep, label = sweep_panel(per_layer, raw)
    plot_predictors(probe, sens, grad, png, title=f"{model}: three predictors of the layer to tune"
                    + (", and the sweep" if sweep else ""), sweep=sweep or None, sweep_label=label)


# --- the probe stages' figures ----------------------------------------------------------------------

def plot_profile(probe_dict: dict, png_path, title: str | None = None) -> None:
    """Per-layer max|h| and median|h| (log scale), thresholds, and the picked layer; PNG, atomic."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    layers = probe_dict["layers"]
    a_t, r_t = probe_dict["thresholds"]["abs"], probe_dict["thresholds"]["ratio"]
    x = [L["index"] for L in layers]
    mx = [L["max_abs"] for L in layers]
    med = [L["median_abs"] if L["median_abs"] else math.nan for L in layers]  # log axis: hide zeros
    fig = Figure(figsize=(7.5, 5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    # black/grey only, told apart by marker and line style; outlier layers filled, others hollow
    ax.plot(x, mx, "-o", color="black", mfc="white", ms=6, lw=1.5, label="max |h|")
    out = [(i, m) for i, m, L in zip(x, mx, layers) if L["is_outlier"]]
    if out:
        ax.plot(*zip(*out), "o", color="black", ms=6, label="max |h|, outlier layer")
    ax.plot(x, med, "--s", color="0.35", ms=4, mfc="white", lw=1.2, label="median |h|")
    ax.plot(x, [r_t * m for m in med], ":", color="0.35", lw=1.4, label=f"{r_t:g} \u00d7 median (ratio threshold)")
    ax.axhline(a_t, color="0.2", ls="-.", lw=1, label=f"|h| = {a_t:g} (absolute threshold)")
    k = probe_dict.get("first_outlier_layer")
    if k is not None:
        ax.axvline(k, color="black", ls="--", lw=1)
        # below the point and to the right: later layers usually keep the same max, so not above it
        left = k <= (x[0] + x[-1]) / 2  # text on the side with more room, so it stays inside the axes
        ratio = layers[k]["ratio"] or math.inf  # JSON stores an infinite ratio (zero median) as null
        ax.annotate(f"first outlier layer: {k}\nmax |h| = {mx[k]:.3g} ({ratio:.3g}\u00d7 median)",
                    xy=(k, mx[k]), xytext=(14 if left else -14, -70), textcoords="offset points", fontsize=9,
                    ha="left" if left else "right", multialignment="left",
                    arrowprops={"arrowstyle": "->", "lw": 0.8},
                    bbox={"boxstyle": "round", "fc": "white", "ec": "0.5"})
    else:
        ax.text(0.98, 0.04, "no layer passes both thresholds", transform=ax.transAxes, ha="right", fontsize=9,
                bbox={"boxstyle": "round", "fc": "white", "ec": "0.5"})
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer (0-based)")
    ax.set_ylabel("|activation|")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, which="major", color="0.9", lw=0.6)
    ax.set_title(title or "activation outlier profile", fontsize=11)
    # legend under the axes: inside, it would cover curves that can sit anywhere
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=150)


def plot_sensitivity(sens: dict, png_path, title: str | None = None) -> None:
    """Two panels on the decoder-layer axis: the projected gradient g (box: quartiles, whiskers: 5-95%,
    bar: median, x: mean) and |L(+) - L(-)| on a log scale; the probe's layer marked. PNG, atomic."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import MaxNLocator

    layers = sens["layers"]
    x = [L["index"] for L in layers]
    fig = Figure(figsize=(7.5, 6.6))
    FigureCanvasAgg(fig)
    ax_g, ax_d = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1, 1]})
    w = 0.6
    for xi, L in zip(x, layers):
        s = L["g"]
        ax_g.plot([xi, xi], [s["q05"], s["q25"]], color="black", lw=0.9)
        ax_g.plot([xi, xi], [s["q75"], s["q95"]], color="black", lw=0.9)
        ax_g.add_patch(Rectangle((xi - w / 2, s["q25"]), w, s["q75"] - s["q25"], fc="white", ec="black", lw=0.9))
        ax_g.plot([xi - w / 2, xi + w / 2], [s["median"]] * 2, color="black", lw=1.6)
    ax_g.plot(x, [L["g"]["mean"] for L in layers], "x", color="black", ms=5, label="mean")
    ax_g.plot(x, [L["g"]["std"] for L in layers], "--o", color="0.4", mfc="white", ms=3.5, lw=0.9,
              label="standard deviation")
    ax_g.axhline(0, color="0.6", lw=0.6)
    ax_g.plot([], [], "s", mfc="white", mec="black", ms=8, label="quartiles; whiskers 5-95%")
    ax_g.set_ylabel("projected gradient g\n(L(+) - L(-)) / 2eps")
    ax_g.legend(fontsize=8, loc="best", frameon=True, framealpha=0.9)

    d = [L["abs_diff"] for L in layers]
    pos = lambda v: v if v > 0 else math.nan  # noqa: E731 - a log axis cannot show a zero difference
    for xi, s in zip(x, d):
        ax_d.plot([xi, xi], [pos(s["q05"]), pos(s["q95"])], color="black", lw=0.9)
        ax_d.plot([xi, xi], [pos(s["q25"]), pos(s["q75"])], color="black", lw=4, solid_capstyle="butt")
    ax_d.plot(x, [pos(s["median"]) for s in d], "o", color="black", mfc="white", ms=5,
              label="median (bar: quartiles, line: 5-95%)")
    ax_d.plot([xi + 0.3 for xi in x], [pos(s["mean"]) for s in d], "x", color="black", ms=4, label="mean")
    ax_d.set_yscale("log")
    ax_d.set_ylabel("|L(+) - L(-)|")
    ax_d.set_xlabel("decoder layer (0-based)")
    ax_d.legend(fontsize=8, loc="best", frameon=True, framealpha=0.9)
    ax_d.xaxis.set_major_locator(MaxNLocator(integer=True))
    k = sens.get("probe_layer")
    for ax in (ax_g, ax_d):
        ax.grid(True, which="major", color="0.9", lw=0.6)
        if k is not None:  # behind the boxes and whiskers, so the marked layer's own stay visible
            ax.axvline(k, color="0.45", ls=":", lw=1.4, zorder=0)
    if k is not None:
        ax_g.annotate(f"probe: layer {k}", xy=(k, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                      textcoords="offset points", fontsize=8)
    n_s = layers[0]["g"]["n"]
    nb = len(sens["base_loss"])
    fig.suptitle(title or f"perturbation sensitivity per layer ({sens['k']} draws x {nb} batch{'es' * (nb > 1)} "
                          f"= {n_s} per layer, eps {sens['eps']:g})", fontsize=11)
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=150)


def plot_predictors(probe_dict: dict, sens: dict, grad: dict, png_path, title: str | None = None,
                    sweep: dict | None = None, sweep_label: str | None = None) -> None:
    """The three per-layer predictors of the layer to tune, on one layer axis: the outlier profile (max|h|),
    the ZO sensitivity (RMS of the projected gradient) and the first-order gradient norm; optionally a
    fourth panel with the sweep's result per task (``sweep``: task -> {layer: value}). PNG, atomic."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = 3 + (1 if sweep else 0)
    fig = Figure(figsize=(7.5, 2.2 * panels + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(panels, 1, sharex=True)
    lx = [L["index"] for L in probe_dict["layers"]]
    ax = axes[0]
    ax.plot(lx, [L["max_abs"] for L in probe_dict["layers"]], "-o", color="black", ms=3.5, label="max |h|")
    ax.plot(lx, [L["median_abs"] for L in probe_dict["layers"]], "--s", color="0.45", mfc="white", ms=3,
            label="median |h|")
    t = probe_dict.get("thresholds") or {}
    if t.get("abs"):
        ax.axhline(t["abs"], color="0.3", ls=":", lw=1, label=f"abs threshold {t['abs']:g}")
    ax.set_yscale("log")
    ax.set_ylabel("outlier probe\n|layer output|")
    sx = [L["index"] for L in sens["layers"]]
    axes[1].plot(sx, [L["g"]["rms"] for L in sens["layers"]], "-^", color="black", ms=4,
                 label=f"RMS of g ({sens['layers'][0]['g']['n']} draws)")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("ZO sensitivity\nRMS((L+ - L-)/2eps)")
    gx = [L["index"] for L in grad["layers"]]
    axes[2].plot(gx, [L["rms_norm"] for L in grad["layers"]], "-D", color="black", ms=3.5,
                 label=f"|grad| (backprop, {grad['batches']} batches)")
    axes[2].set_yscale("log")
    axes[2].set_ylabel("first-order\n|grad of the layer|")
    tops = [(axes[0], probe_dict.get("first_outlier_layer"), "first outlier layer"),
            (axes[1], max(sens["layers"], key=lambda L: L["g"]["rms"])["index"], "largest"),
            (axes[2], grad["largest_gradient_layer"], "largest")]
    styles = ["-o", "--s", ":^", "-.D", "-v", "--x"]
    if sweep:
        axs = axes[3]
        for n_, (task, vals) in enumerate(sorted(sweep.items())):
            xs = sorted(vals)
            # markers at the swept layers; the thin line only guides the eye across unswept ones
            axs.plot(xs, [vals[x] for x in xs], styles[n_ % len(styles)], color="black" if n_ % 2 == 0 else "0.4",
                     mfc="white", ms=4.5, lw=0.7, label=task)
        axs.axhline(0, color="0.6", lw=0.7)
        axs.set_ylabel(sweep_label or "sweep: test value\nminus zero-shot (points)")
    probe_layer = probe_dict.get("first_outlier_layer")
    for i, ax in enumerate(axes):
        ax.grid(True, which="major", color="0.9", lw=0.6)
        if probe_layer is not None:
            ax.axvline(probe_layer, color="0.45", ls=":", lw=1.3, zorder=0)
        ax.legend(fontsize=7.5, loc="best", frameon=True, framealpha=0.9)
    for ax, k, what in tops:  # at the foot of the panel, clear of the curve's peak
        if k is not None:
            ax.annotate(f"{what}: layer {k}", xy=(k, 0.0), xycoords=("data", "axes fraction"), xytext=(3, 4),
                        textcoords="offset points", fontsize=7.5)
    axes[-1].set_xlabel("decoder layer (0-based); dotted line: the probe's first outlier layer")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title or "three predictors of the layer to tune", fontsize=11)
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=150)


# --- the probe stages' figures as a command (the workflow's plot_* rules) -----------------------------

def _model_name(result: dict) -> str:
    return Path(str(result.get("model") or "model")).name


def profile_title(probe_dict: dict) -> str:
    cal = probe_dict["calibration"]
    return f"{_model_name(probe_dict)}: per-layer output |h| ({cal['n_seqs']} sequences, {cal['tokens']} tokens)"


def sensitivity_title(sens: dict) -> str:
    batches = len(sens["batch_ids"])
    return (f"{_model_name(sens)} on {sens['task']}: per-layer ZO sensitivity ({sens['k']} draws x {batches} "
            f"batch{'es' * (batches > 1)} of {sens['batch_size']}, eps {sens['eps']:g})")


def predictors_title(grad: dict) -> str:
    return f"{_model_name(grad)}: three predictors of the layer to tune"


def main(argv: list[str] | None = None) -> int:
    """``python -m dlzo.figures profile|sensitivity|predictors``: a probe stage's figure from its JSON. The
    figures are drawn apart from the GPU jobs that compute the JSON, so that an edit to a figure redraws
    figures and reruns no probe."""
    import argparse

    from dlzo.io import read_json

    ap = argparse.ArgumentParser(prog="python -m dlzo.figures", description=main.__doc__.split(".")[0])
    ap.add_argument("figure", choices=["profile", "sensitivity", "predictors"],
                    help="profile: the outlier probe's per-layer |h|; sensitivity: the ZO sensitivity profile; "
                         "predictors: the three per-layer predictors on one layer axis")
    ap.add_argument("--probe", help="probe.json (profile, predictors)")
    ap.add_argument("--sensitivity", help="sensitivity.json (sensitivity, predictors)")
    ap.add_argument("--gradnorm", help="gradnorm.json (predictors)")
    ap.add_argument("--out", required=True, help="PNG to write")
    a = ap.parse_args(argv)
    needs = {"profile": ["probe"], "sensitivity": ["sensitivity"], "predictors": ["probe", "sensitivity", "gradnorm"]}
    missing = [f"--{k}" for k in needs[a.figure] if not getattr(a, k)]
    if missing:
        ap.error(f"{a.figure} needs {' and '.join(missing)}")
    data = {k: read_json(getattr(a, k), f"{k} file") for k in needs[a.figure]}
    if a.figure == "profile":
        plot_profile(data["probe"], a.out, title=profile_title(data["probe"]))
    elif a.figure == "sensitivity":
        plot_sensitivity(data["sensitivity"], a.out, title=sensitivity_title(data["sensitivity"]))
    else:
        plot_predictors(data["probe"], data["sensitivity"], data["gradnorm"], a.out,
                        title=predictors_title(data["gradnorm"]))
    return 0


if __name__ == "__main__":
    from dlzo import run_cli

    run_cli(main, "figures")
