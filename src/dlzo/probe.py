"""The probe: find the first activation-outlier ("massive activation") layer of a pretrained model.

Sun et al. 2024 (arXiv 2402.17762) call an activation massive when |h| > 100 and |h| is ~1000x the
median |h| of its hidden state. DL-ZO's dominant layer is the first decoder layer whose OUTPUT holds
one. The thresholds are the paper's guess, not a law, so the whole per-layer table is written and
the pick is shown for several threshold settings.

Per layer, statistics are folded into small accumulators inside a forward hook (no hidden state is
kept): a log-spaced histogram of |h| gives the median over every non-pad entry of the calibration
set, whatever the batch size; the largest entries (all those over the absolute threshold, up to
KEEP_CAP) give the max, the top-k list and the exact count of entries over both thresholds.

``python -m dlzo.probe sensitivity`` writes the perturbation-sensitivity profile: per layer, K
single-layer ZO perturbations (ZO-SGD's z) on a few training batches, the spread of the projected
gradient and of |L(+) - L(-)| (``sensitivity``, ``plot_sensitivity``).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from dlzo import DLZOError
from dlzo.io import atomic_path, read_json, read_jsonl, write_json

# Histogram of log2|h| over [2^-32, 2^32): 512 bins per octave = bins 0.14% wide, so the median is
# within 0.14% of the exact one (irrelevant next to a "~1000x" threshold); 256 KiB per layer.
LOG2_LO, LOG2_HI, BINS_PER_OCTAVE = -32, 32, 512
NBINS = (LOG2_HI - LOG2_LO) * BINS_PER_OCTAVE
KEEP_CAP = 100_000  # entries kept per layer for n_over; past it n_over is a lower bound

# (abs, ratio, label): the settings whose picks every probe file reports side by side
PRESETS = [(100, 1000, "Sun et al. 2024"), (50, 100, "loose"), (100, 100, "abs 100, ratio 100"),
           (50, 1000, "abs 50"), (200, 1000, "abs 200"), (500, 1000, "abs 500"), (1000, 1000, "abs 1000")]

# Default calibration: varied English (prose, dialogue, numbers, a list, a question) so that start
# tokens, full stops and newlines - where massive activations sit - all occur. No network needed.
BUILTIN_TEXTS = [
    "The committee met on Tuesday to discuss the budget. After a long debate, the proposal was approved.",
    "Preheat the oven to 180 degrees. Mix the flour, sugar and butter, then add two eggs and stir well.",
    "\"Where are you going?\" she asked. \"To the station,\" he said, \"the last train leaves at nine.\"",
    "Photosynthesis converts light energy into chemical energy, which plants store as glucose.",
    "Shopping list:\n- apples\n- bread\n- milk\nRemember to pick up the parcel from the post office.",
    "In 1969, Apollo 11 landed on the Moon, and Neil Armstrong became the first person to walk on it.",
    "Is it better to rent or to buy a house? The answer depends on prices, interest rates and plans.",
    "The quick brown fox jumps over the lazy dog, but the dog does not seem to mind at all.",
    "Our results show that the new method reduces the error rate by 12% compared with the baseline.",
    "Dear Sir or Madam, I am writing to complain about the delay in delivering my order.",
]


def _record_text(rec: dict, where: str) -> str:
    """A prepared task record as prompt + gold continuation (what the model sees in training)."""
    prompt = rec.get("prompt")
    if not isinstance(prompt, str):
        raise DLZOError(f"{where}: no 'prompt' string (prepared task records need one)")
    cands, label, answers = rec.get("candidates"), rec.get("label"), rec.get("answers")
    if isinstance(cands, list) and isinstance(label, int) and not isinstance(label, bool) \
            and 0 <= label < len(cands):
        return prompt + str(cands[label])
    if cands is not None:
        raise DLZOError(f"{where}: 'label' must index 'candidates' (got label={label!r}, "
                        f"{len(cands) if isinstance(cands, list) else cands!r} candidates)")
    if isinstance(answers, list) and answers:
        return prompt + str(answers[0])
    if isinstance(answers, str):
        return prompt + answers
    return prompt


def load_calibration(paths: list[str] | None, n_seqs: int) -> tuple[list[str], str | list[str]]:
    """(texts, source). No paths: the built-in texts. ``*.jsonl``: prepared task records; anything
    else: plain text, one sequence per non-empty line. Several files are interleaved (one from each
    in turn) so a few sequences still cover every task; the first ``n_seqs`` are kept."""
    if n_seqs < 1:
        raise DLZOError(f"--n-seqs must be >= 1 (got {n_seqs})")
    if not paths:
        return BUILTIN_TEXTS[:n_seqs], "builtin"
    per_file = []
    for p in map(Path, paths):
        if not p.exists():
            raise DLZOError(f"calibration file {p} does not exist")
        if p.suffix == ".jsonl":
            per_file.append([_record_text(r, f"{p}, record {i}") for i, r in enumerate(read_jsonl(p), 1)])
        else:
            per_file.append([ln for ln in p.read_text().splitlines() if ln.strip()])
    texts = [f[i] for i in range(max(map(len, per_file))) for f in per_file if i < len(f)]
    if not texts:
        raise DLZOError(f"calibration file(s) {', '.join(map(str, paths))} hold no text")
    return texts[:n_seqs], [str(p) for p in paths]


class _LayerStats:
    """Running statistics of one layer's output |h| over the non-pad positions."""

    def __init__(self, abs_threshold: float, topk: int):
        self.abs_threshold, self.topk = abs_threshold, topk
        self.hist = torch.zeros(NBINS, dtype=torch.int64)
        self.n = 0  # non-pad entries seen
        self.n_over_abs = 0  # entries with |h| > abs_threshold
        self.vals = torch.empty(0)  # kept |h|, descending
        self.signed = torch.empty(0)
        self.where = torch.empty(0, 3, dtype=torch.int64)  # (seq, token, channel)

    def update(self, h: torch.Tensor, mask: torch.Tensor, seq_offset: int, layer: int) -> None:
        a = h.detach().abs().float()  # fp32: log2 and comparisons of fp16 values stay exact
        valid = a[mask]
        if not torch.isfinite(valid).all():
            raise DLZOError(f"decoder layer {layer} produced inf/NaN activations in {h.dtype}: rerun the "
                            f"probe with --dtype bf16 or --dtype fp32 (fp16 overflows on massive activations)")
        idx = ((valid.clamp_min(2.0 ** LOG2_LO).log2() - LOG2_LO) * BINS_PER_OCTAVE).long().clamp_(0, NBINS - 1)
        self.hist += torch.bincount(idx.flatten(), minlength=NBINS).cpu()
        self.n += valid.numel()
        flat = a.masked_fill(~mask[..., None], -1.0).flatten()  # pads rank below every real entry
        n_sel = int((flat > self.abs_threshold).sum())
        self.n_over_abs += n_sel
        vals, pos = flat.topk(min(flat.numel(), max(self.topk, min(n_sel, KEEP_CAP))))
        real = vals >= 0
        vals, pos = vals[real], pos[real]
        _, T, H = a.shape
        where = torch.stack([pos // (T * H) + seq_offset, (pos // H) % T, pos % H], dim=1)
        self._merge(vals.cpu(), h.detach().flatten()[pos].float().cpu(), where.cpu())

    def _merge(self, vals, signed, where) -> None:
        vals, signed = torch.cat([self.vals, vals]), torch.cat([self.signed, signed])
        where = torch.cat([self.where, where])
        keep = min(len(vals), max(self.topk, min(self.n_over_abs, KEEP_CAP)))
        # ties (the start token's state is identical in every sequence) go to the earliest
        # (seq, token, channel), so the top list does not depend on the batch size
        order = torch.arange(len(vals))
        for col in (2, 1, 0):
            order = order[torch.argsort(where[order, col], stable=True)]
        order = order[torch.argsort(vals[order], descending=True, stable=True)][:keep]
        self.vals, self.signed, self.where = vals[order], signed[order], where[order]

    def median(self) -> float:
        """Lower median (as torch.median) from the histogram, log-interpolated inside its bin."""
        k = (self.n - 1) // 2
        cum = self.hist.cumsum(0)
        b = int(torch.searchsorted(cum, torch.tensor(k), right=True))
        if b == 0:
            return 0.0  # the underflow bin: |h| below 2^-32, i.e. zero for our purposes
        frac = (k - int(cum[b] - self.hist[b]) + 0.5) / int(self.hist[b])
        return 2.0 ** (LOG2_LO + (b + frac) / BINS_PER_OCTAVE)


def _is_outlier(max_abs: float, median: float, abs_t: float, ratio_t: float) -> bool:
    return max_abs > abs_t and max_abs > ratio_t * median


def first_outlier(layers: list[dict], abs_threshold: float, ratio_threshold: float) -> int | None:
    """The first layer with some |h| over both thresholds (max|h| and the median decide it)."""
    return next((L["index"] for L in layers
                 if _is_outlier(L["max_abs"], L["median_abs"], abs_threshold, ratio_threshold)), None)


def _pin_note(layers: list[dict], model_name: str) -> str:
    best = max(layers, key=lambda L: L["ratio"] if math.isfinite(L["ratio"]) else -1.0)
    return (f"no decoder layer passed both thresholds, so there is no dominant layer to pick: pin it "
            f"with the config key `dominant_layer` (model name -> 0-based layer index), e.g. "
            f"`dominant_layer: {{{model_name}: {best['index']}}}` (layer {best['index']} has the largest "
            f"max/median ratio, {best['ratio']:.0f}x), or lower the thresholds")


@torch.no_grad()
def probe(model, tokenizer, texts: list[str], abs_threshold: float = 100.0, ratio_threshold: float = 1000.0,
          topk: int = 5, max_len: int = 128, batch_size: int = 8, model_name: str = "<model>") -> dict:
    """Hook every decoder layer's output over ``texts`` and return the per-layer outlier table."""
    from dlzo.models import decoder_layers

    if not texts:
        raise DLZOError("the probe needs at least one calibration text")
    if min(topk, max_len, batch_size) < 1:
        raise DLZOError(f"topk, max_len and batch_size must be >= 1 (got {topk}, {max_len}, {batch_size})")
    blocks = decoder_layers(model)
    stats = [_LayerStats(abs_threshold, topk) for _ in blocks]
    state: dict = {}

    def hook_for(i):
        def hook(module, args, output):
            # transformers 5 decoder layers return the hidden state, older ones a tuple starting with it
            h = output[0] if isinstance(output, (tuple, list)) else output
            stats[i].update(h, state["mask"], state["offset"], i)
        return hook

    device = next(model.parameters()).device
    # right padding: pads then sit after every real token, and causal attention keeps them out of
    # the real positions (left padding would shift position ids and change the statistics)
    old_side, tokenizer.padding_side = tokenizer.padding_side, "right"
    handles = [blk.register_forward_hook(hook_for(i)) for i, blk in enumerate(blocks)]
    ids, n_tokens = [], 0
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                            truncation=True, max_length=max_len)
            mask = enc["attention_mask"].bool()
            ids += [row[m].tolist() for row, m in zip(enc["input_ids"], mask)]
            n_tokens += int(mask.sum())
            state.update(mask=mask.to(device), offset=start)
            model(input_ids=enc["input_ids"].to(device), attention_mask=mask.long().to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        tokenizer.padding_side = old_side

    layers = []
    for i, s in enumerate(stats):
        med, max_abs = s.median(), float(s.vals[0])
        top = [{"value": float(s.signed[j]), "abs": float(s.vals[j]), "seq": int(s.where[j, 0]),
                "token": int(s.where[j, 1]), "channel": int(s.where[j, 2]),
                "token_text": tokenizer.decode([ids[int(s.where[j, 0])][int(s.where[j, 1])]])}
               for j in range(min(topk, len(s.vals)))]
        over = s.vals > max(abs_threshold, ratio_threshold * med)
        layers.append({"index": i, "max_abs": max_abs, "median_abs": med,
                       "ratio": max_abs / med if med > 0 else math.inf, "top": top,
                       "n_over": int(over.sum()), "n_over_exact": s.n_over_abs <= len(s.vals),
                       "is_outlier": _is_outlier(max_abs, med, abs_threshold, ratio_threshold)})
    first = first_outlier(layers, abs_threshold, ratio_threshold)
    picks = [{"label": lab, "abs": a, "ratio": r, "first_outlier_layer": first_outlier(layers, a, r)}
             for a, r, lab in PRESETS + [(abs_threshold, ratio_threshold, "user")]]
    out = {"first_outlier_layer": first, "num_layers": len(blocks),
           "thresholds": {"abs": abs_threshold, "ratio": ratio_threshold},
           "layers": layers, "picks": picks,
           "calibration": {"source": "texts", "n_seqs": len(texts), "tokens": n_tokens, "max_len": max_len},
           "median_method": f"log2 histogram, {BINS_PER_OCTAVE} bins per octave (within 0.14% of exact)"}
    if first is None:
        out["note"] = _pin_note(layers, model_name)
    return out


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


# --- perturbation-sensitivity profile -------------------------------------------------------------
#
# The paper's explanation of why one layer suffices: ZO-SGD's step size along z is the projected
# gradient g = (L(+) - L(-)) / 2eps, and for z ~ N(0, I) on one layer E[g^2] = |grad of that layer|^2.
# So per layer, K draws of z (the same draws a ZO-SGD run with the same seed makes at steps 0..K-1)
# on a few training batches show how strongly ZO "feels" that layer: the spread of g (its RMS
# estimates the layer's gradient norm) and of |L(+) - L(-)|, the loss difference the two forward
# passes must resolve (it drowns in rounding when it is tiny). Inference only.

SENS_QUANTILES = (5, 25, 50, 75, 95)


def _spread(values: list[float]) -> dict:
    """mean, std (sample, ddof=1), median, quantiles, rms and mean |x| of a list of floats."""
    import numpy as np

    a = np.asarray(values, dtype=np.float64)
    q = np.percentile(a, SENS_QUANTILES)
    return {"n": int(a.size), "mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
            "median": float(q[2]), **{f"q{p:02d}": float(v) for p, v in zip(SENS_QUANTILES, q) if p != 50},
            "rms": float(np.sqrt((a * a).mean())), "mean_abs": float(np.abs(a).mean()),
            "min": float(a.min()), "max": float(a.max())}


@torch.no_grad()
def sensitivity(model, batches: list, k: int = 8, eps: float = 1e-3, seed: int = 0,
                layers: list[int] | None = None, prefix: bool = True) -> dict:
    """Per decoder layer: ``k`` single-layer perturbations x ``batches`` (``dlzo.objectives.Batch``).

    z for draw j is what ``ZOSGD(param_groups(layer), seed=seed, restore="exact")`` draws at step j
    (same seed, same tensor order, same generator); theta +- eps*z is set by copying the saved
    weights back first, and the weights are copied back after each layer (also on an error), so the
    model leaves bit for bit as it came. ``prefix``: run the frozen layers before the perturbed one
    once per batch (``FrozenPrefix`` cache="batch") where the model allows it.
    """
    from dlzo.models import decoder_layers, tuned_parameters
    from dlzo.objectives import FrozenPrefix
    from dlzo.objectives import loss as objective_loss
    from dlzo.zo import ZOSGD, param_groups, step_seed

    if k < 1 or not batches:
        raise DLZOError(f"the sensitivity profile needs k >= 1 and at least one batch (got k={k}, "
                        f"{len(batches)} batches)")
    if not eps > 0:
        raise DLZOError(f"eps must be > 0 (got {eps})")
    n = len(decoder_layers(model))
    layers = list(range(n)) if layers is None else [int(i) for i in layers]
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise DLZOError(f"layer index {bad[0]} is past the model's depth ({n} decoder layers, indices 0..{n - 1})")
    for b in batches:
        b.memo.clear()
    base = [float(objective_loss(model, b)) for b in batches]
    seeds = [step_seed(seed, j) for j in range(k)]
    out_layers, used_prefix = [], set()
    for i in layers:
        named = tuned_parameters(model, "layer", i)
        opt = ZOSGD(param_groups(named, 0.0), lr=0.0, eps=eps, seed=seed, restore="exact")  # its z draws
        fp = FrozenPrefix(model, i, "batch") if prefix and not FrozenPrefix.supported(model, i) else None
        used_prefix.add("batch" if fp is not None else "off")
        for b in batches:
            b.memo.clear()  # a cached prefix belongs to the layer it was computed for
        params = [p for _, p, _ in opt._params()]
        saved = [p.detach().clone() for p in params]
        samples = []
        try:
            for j, s in enumerate(seeds):
                zs = [z for _, _, z, _ in opt._draw(s)]

                def shift(scale):
                    for p, orig, z in zip(params, saved, zs):
                        p.copy_(orig).add_(z, alpha=scale)

                for bi, b in enumerate(batches):
                    shift(eps)
                    lp = float(objective_loss(model, b, fp))
                    shift(-eps)
                    lm = float(objective_loss(model, b, fp))
                    if not (math.isfinite(lp) and math.isfinite(lm)):
                        raise DLZOError(f"layer {i}, draw {j}, batch {bi}: non-finite loss L(+)={lp}, L(-)={lm} "
                                        f"in {params[0].dtype}; use a smaller --eps or --dtype bf16/fp32")
                    samples.append({"draw": j, "batch": bi, "loss_plus": lp, "loss_minus": lm,
                                    "g": (lp - lm) / (2 * eps)})
        finally:
            for p, orig in zip(params, saved):
                p.copy_(orig)
            for b in batches:
                b.memo.clear()
        g = [r["g"] for r in samples]
        out_layers.append({"index": i, "n_params": sum(p.numel() for p in params), "g": _spread(g),
                           "abs_diff": _spread([abs(r["loss_plus"] - r["loss_minus"]) for r in samples]),
                           "samples": samples})
    top = max(out_layers, key=lambda L: L["g"]["std"])
    return {"num_layers": n, "k": k, "eps": eps, "seed": seed, "z_seeds": seeds,
            "prefix_cache": "batch" if used_prefix == {"batch"} else ("off" if used_prefix == {"off"} else "mixed"),
            "base_loss": base, "layers": out_layers, "most_sensitive_layer": top["index"],
            "stats": "g = (L(+) - L(-)) / 2eps per (draw, batch); std with ddof=1; quantiles linear "
                     "(numpy.percentile); E[g^2] = |grad of the layer|^2, so g.rms estimates it"}


def sensitivity_batches(tokenizer, data, task: str, n_batches: int, batch_size: int, seed: int,
                        max_len: int, device, share_prompt: bool = False) -> tuple[list, list[list]]:
    """The batches a ``dlzo.train`` run with ``seed`` sees at steps 0..n_batches-1 of ``data``'s train split
    (``share_prompt``: as ``train --scoring shared-prompt`` builds them)."""
    from dlzo.objectives import make_batch
    from dlzo.tasks import get_task
    from dlzo.objectives import batch_indices

    path = Path(data)
    path = path / "train.jsonl" if path.is_dir() else path
    if not path.exists():
        raise DLZOError(f"training data {path} does not exist: run the prepare_data rule for task {task} "
                        f"(or pass a prepared task folder / train.jsonl)")
    rows = read_jsonl(path)
    if not rows:
        raise DLZOError(f"{path} holds no records")
    if n_batches < 1 or batch_size < 1:
        raise DLZOError(f"--batches and --batch-size must be >= 1 (got {n_batches}, {batch_size})")
    objective = get_task(task).objective
    bs = min(batch_size, len(rows))
    idx = [batch_indices(len(rows), bs, seed, step).tolist() for step in range(n_batches)]
    return [make_batch(tokenizer, [rows[i] for i in ix], objective, device, max_len, share_prompt) for ix in idx], \
        [[rows[i].get("id", i) for i in ix] for ix in idx]


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


def _training_batch_args(ap, what: str) -> None:
    """The arguments of the profiles that run on training batches: model, data, task, output."""
    ap.add_argument("--model", required=True, help="model folder (config.json + weights + tokenizer)")
    ap.add_argument("--data", required=True, help="prepared task folder (its train.jsonl) or a train.jsonl")
    ap.add_argument("--task", required=True, help="task name (decides the objective)")
    ap.add_argument("--out", required=True, help=f"{what} to write")
    ap.add_argument("--scoring", default="per-sequence", choices=["per-sequence", "shared-prompt"],
                    help="how candidates are scored, as dlzo.train --scoring (the same loss)")


def sensitivity_main(argv: list[str] | None = None) -> int:
    from dlzo.models import load_model, load_tokenizer
    from dlzo.runtime import add_runtime_args, provenance, setup_runtime

    ap = argparse.ArgumentParser(
        prog="python -m dlzo.probe sensitivity",
        description="Perturbation-sensitivity profile: per decoder layer, K single-layer ZO perturbations at "
                    "eps on a few training batches; the spread of (L(+)-L(-))/2eps and of |L(+)-L(-)|.")
    _training_batch_args(ap, "sensitivity JSON")
    ap.add_argument("--plot", default=None, help="also write the profile as a PNG")
    ap.add_argument("--probe", default=None, help="probe.json: its first outlier layer is recorded and marked")
    ap.add_argument("--k", type=int, default=8, help="perturbations (draws of z) per layer")
    ap.add_argument("--batches", type=int, default=2, help="training batches each draw is evaluated on")
    ap.add_argument("--batch-size", type=int, default=8, help="examples per batch")
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0, help="z seeds and batch choice, as a training run's --seed")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="only these layers (default: all)")
    ap.add_argument("--prefix-cache", choices=["batch", "off"], default="batch",
                    help="run the frozen layers before the perturbed one once per batch, or every pass")
    add_runtime_args(ap)
    args = ap.parse_args(argv)

    started = time.time()
    device, dtype = setup_runtime(args)
    probe_layer = None
    if args.probe:
        probe_layer = read_json(args.probe, "probe file").get("first_outlier_layer")
    model = load_model(args.model, device, dtype)
    tokenizer = load_tokenizer(args.model)
    batches, ids = sensitivity_batches(tokenizer, args.data, args.task, args.batches, args.batch_size, args.seed,
                                       args.max_len, device, args.scoring == "shared-prompt")
    result = sensitivity(model, batches, args.k, args.eps, args.seed, args.layers, args.prefix_cache == "batch")
    name = Path(args.model).name
    result.update(model=str(args.model), task=args.task, data=str(args.data), objective=batches[0].objective,
                  scoring=args.scoring, batch_size=len(ids[0]), batch_ids=ids, max_len=args.max_len, probe=args.probe,
                  probe_layer=probe_layer, provenance=provenance(device, dtype, started))
    by_std = sorted(result["layers"], key=lambda L: -L["g"]["std"])
    result["probe_layer_rank"] = next((r for r, L in enumerate(by_std, 1) if L["index"] == probe_layer), None)
    write_json(args.out, result)
    if args.plot:
        plot_sensitivity(result, args.plot, title=f"{name} on {args.task}: per-layer ZO sensitivity ({args.k} draws "
                                                  f"x {args.batches} batch{'es' * (args.batches > 1)} of "
                                                  f"{len(ids[0])}, eps {args.eps:g})")
    top = result["most_sensitive_layer"]
    print(f"{name}: largest spread of g at layer {top}"
          + (f"; probe's first outlier layer {probe_layer} ranks {result['probe_layer_rank']} of "
             f"{len(by_std)} by the spread of g" if result["probe_layer_rank"] else ""))
    return 0


# --- first-order gradient norms per layer ------------------------------------------------------------

def gradient_norms(model, batches: list) -> dict:
    """Per decoder layer: |grad of the training loss w.r.t. the layer's parameters|, by backpropagation on
    each batch (``dlzo.objectives.Batch``, the training objective). Each parameter's gradient is squared
    and summed by a hook the moment it is accumulated, then freed, so memory stays near inference (no
    full set of gradients is ever held). Reported per layer: the RMS over batches of the per-batch norm,
    sqrt(mean_b |g_b|^2), which is what the sensitivity profile's RMS(g) estimates (E[g^2] = |grad|^2)."""
    from dlzo.models import decoder_layers
    from dlzo.objectives import loss as objective_loss

    if not batches:
        raise DLZOError("the gradient-norm profile needs at least one batch")
    layers = decoder_layers(model)
    owner = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
    n = len(layers)
    sq = [[0.0] * len(batches) for _ in range(n)]
    rest = [0.0] * len(batches)
    current = {"b": 0}
    hooks, flags = [], []
    for p in model.parameters():
        flags.append((p, p.requires_grad))
        p.requires_grad_(True)

        def hook(param, i=owner.get(id(p))):
            v = float(param.grad.detach().double().pow(2).sum())
            if i is None:
                rest[current["b"]] += v
            else:
                sq[i][current["b"]] += v
            param.grad = None

        hooks.append(p.register_post_accumulate_grad_hook(hook))
    losses = []
    try:
        was_training = model.training
        model.eval()  # no dropout: the same function the ZO probes evaluate
        for b_i, batch in enumerate(batches):
            current["b"] = b_i
            batch.memo.clear()
            loss = objective_loss(model, batch)
            losses.append(loss.item())
            loss.backward()
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags:
            p.grad = None
            p.requires_grad_(flag)
    n_params = [sum(q.numel() for q in layer.parameters()) for layer in layers]
    out = [{"index": i, "n_params": n_params[i], "sq_norm_per_batch": sq[i],
            "rms_norm": math.sqrt(sum(sq[i]) / len(batches)),
            "rms_norm_per_param": math.sqrt(sum(sq[i]) / len(batches) / max(n_params[i], 1))}
           for i in range(n)]
    top = max(out, key=lambda L: L["rms_norm"])
    return {"num_layers": n, "batches": len(batches), "losses": losses, "layers": out,
            "other_params_rms_norm": math.sqrt(sum(rest) / len(batches)), "largest_gradient_layer": top["index"],
            "stats": "rms_norm = sqrt(mean over batches of |grad_b|^2) over the layer's parameters; "
                     "grad_b = d(training loss of batch b)/d(theta), fp32 backprop, model in eval mode"}


def gradnorm_main(argv: list[str] | None = None) -> int:
    from dlzo.models import load_model, load_tokenizer
    from dlzo.runtime import add_runtime_args, peak_memory_mb, provenance, setup_runtime
    from dlzo.objectives import measure_inference

    ap = argparse.ArgumentParser(
        prog="python -m dlzo.probe gradnorm",
        description="Per-layer first-order gradient norms: backprop of the training loss on a few training "
                    "batches (the ones a training run with --seed sees first), at near-inference memory.")
    _training_batch_args(ap, "gradient-norm JSON")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0, help="batch choice, as a training run's --seed")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--probe", default=None, help="probe.json: recorded, with the rank of its layer")
    ap.add_argument("--sensitivity", default=None, help="sensitivity.json: with --probe, draw the three "
                                                        "layer predictors in one figure (--plot)")
    ap.add_argument("--plot", default=None, help="PNG of the predictors (needs --probe and --sensitivity)")
    add_runtime_args(ap)
    args = ap.parse_args(argv)
    if args.plot and not (args.probe and args.sensitivity):
        ap.error("--plot draws the three predictors: it needs --probe and --sensitivity")

    started = time.time()
    device, dtype = setup_runtime(args)
    model = load_model(args.model, device, dtype)
    tokenizer = load_tokenizer(args.model)
    batches, ids = sensitivity_batches(tokenizer, args.data, args.task, args.batches, args.batch_size, args.seed,
                                       args.max_len, device, args.scoring == "shared-prompt")
    inference_mb = measure_inference(model, batches[0], device)  # first: CPU peak RSS only grows
    result = gradient_norms(model, batches)
    probe_layer = read_json(args.probe, "probe file").get("first_outlier_layer") if args.probe else None
    by_norm = sorted(result["layers"], key=lambda L: -L["rms_norm"])
    result.update(model=str(args.model), task=args.task, data=str(args.data), objective=batches[0].objective,
                  scoring=args.scoring, batch_size=len(ids[0]), batch_ids=ids, max_len=args.max_len, seed=args.seed,
                  probe=args.probe,
                  probe_layer=probe_layer,
                  probe_layer_rank=next((r for r, L in enumerate(by_norm, 1) if L["index"] == probe_layer), None),
                  peak_memory_mb=peak_memory_mb(device), inference_peak_mb=inference_mb,
                  provenance=provenance(device, dtype, started, config=vars(args)))
    write_json(args.out, result)
    if args.plot:
        plot_predictors(read_json(args.probe, "probe file"), read_json(args.sensitivity, "sensitivity file"),
                        result, args.plot, title=f"{Path(args.model).name}: three predictors of the layer to tune")
    print(f"{Path(args.model).name}: largest gradient at layer {result['largest_gradient_layer']}"
          + (f"; the probe's layer {probe_layer} ranks {result['probe_layer_rank']} of {len(by_norm)}"
             if result["probe_layer_rank"] else ""))
    return 0


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


def main(argv: list[str] | None = None) -> int:
    from dlzo.models import load_model, load_tokenizer
    from dlzo.runtime import add_runtime_args, provenance, setup_runtime

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sensitivity"]:
        return sensitivity_main(argv[1:])
    if argv[:1] == ["gradnorm"]:
        return gradnorm_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m dlzo.probe", description=__doc__.split("\n\n")[0],
                                 epilog="python -m dlzo.probe sensitivity --help: the perturbation-sensitivity profile; "
                                        "python -m dlzo.probe gradnorm --help: per-layer first-order gradient norms")
    ap.add_argument("--model", required=True, help="model folder (config.json + weights + tokenizer)")
    ap.add_argument("--out", required=True, help="probe JSON to write")
    ap.add_argument("--calibration", nargs="+", default=None,
                    help="text file(s) (one sequence per line) or prepared task *.jsonl; default: built-in texts")
    ap.add_argument("--n-seqs", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--abs-threshold", type=float, default=100.0)
    ap.add_argument("--ratio-threshold", type=float, default=1000.0)
    ap.add_argument("--topk", type=int, default=5)
    add_runtime_args(ap)
    ap.add_argument("--plot", default=None, help="also write the per-layer profile as a PNG")
    args = ap.parse_args(argv)

    started = time.time()
    device, dtype = setup_runtime(args)
    texts, source = load_calibration(args.calibration, args.n_seqs)
    name = Path(args.model).name
    model = load_model(args.model, device, dtype)  # first: it says what a folder without a model lacks
    tokenizer = load_tokenizer(args.model)
    result = probe(model, tokenizer, texts, args.abs_threshold, args.ratio_threshold, args.topk,
                   args.max_len, args.batch_size, model_name=name)
    result["calibration"]["source"] = source
    result["model"] = str(args.model)
    result["provenance"] = provenance(device, dtype, started, config=vars(args))
    write_json(args.out, result)
    if args.plot:
        plot_profile(result, args.plot, title=f"{name}: per-layer output |h| ({result['calibration']['n_seqs']} "
                                              f"sequences, {result['calibration']['tokens']} tokens)")
    k = result["first_outlier_layer"]
    print(f"{name}: first outlier layer = {k}" if k is not None else f"{name}: {result['note']}")
    return 0


if __name__ == "__main__":
    from dlzo import run_cli

    run_cli(main, "probe_outliers")
