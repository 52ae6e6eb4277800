"""The probe: find the first activation-outlier ("massive activation") layer of a pretrained model.

Sun et al. 2024 (arXiv 2402.17762) call an activation massive when |h| > 100 and |h| is ~1000x the
median |h| of its hidden state. DL-ZO's dominant layer is the first decoder layer whose OUTPUT holds
one. The thresholds are the paper's guess, not a law, so the whole per-layer table is written and
the pick is shown for several threshold settings.

Per layer, statistics are folded into small accumulators inside a forward hook (no hidden state is
kept): a log-spaced histogram of |h| gives the median over every non-pad entry of the calibration
set, whatever the batch size; the largest entries (all those over the absolute threshold, up to
KEEP_CAP) give the max, the top-k list and the exact count of entries over both thresholds.

The other per-layer predictors of the layer to tune (the ZO sensitivity profile, the first-order gradient
norms) are ``python -m dlzo.profiles``; the figure is drawn from the JSON by ``python -m dlzo.figures profile``.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from dlzo import DLZOError
from dlzo.io import read_jsonl, write_json

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


class LayerStats:
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
    stats = [LayerStats(abs_threshold, topk) for _ in blocks]
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


def main(argv: list[str] | None = None) -> int:
    from dlzo.models import load_model, load_tokenizer
    from dlzo.runtime import add_runtime_args, provenance, setup_runtime

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["sensitivity"], ["gradnorm"]):
        raise DLZOError(f"the {argv[0]} profile moved: python -m dlzo.profiles {argv[0]} (same flags)")
    ap = argparse.ArgumentParser(prog="python -m dlzo.probe", description=__doc__.split("\n\n")[0],
                                 epilog="python -m dlzo.profiles sensitivity|gradnorm --help: the other per-layer "
                                        "predictors (ZO sensitivity, first-order gradient norms)")
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
    k = result["first_outlier_layer"]
    print(f"{name}: first outlier layer = {k}" if k is not None else f"{name}: {result['note']}")
    return 0


if __name__ == "__main__":
    from dlzo import run_cli

    run_cli(main, "probe_outliers")
