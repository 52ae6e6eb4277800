"""The per-layer profiles of the layer to tune, beside the outlier probe (``dlzo.probe``), on training batches.

``python -m dlzo.profiles sensitivity``: the perturbation-sensitivity profile. Per decoder layer, K
single-layer ZO perturbations (the z a ZO-SGD run draws) on a few training batches: the spread of the
projected gradient and of |L(+) - L(-)| (``sensitivity``). Inference only.

``python -m dlzo.profiles gradnorm``: per decoder layer, the first-order gradient norm of the training loss
(``gradient_norms``), at near-inference memory.

Both read the batches a ``dlzo.train`` run with the same --seed sees first (``sensitivity_batches``), and the
probe's layer from its probe.json (``--probe``: recorded and ranked). Their figures are drawn from the JSON by
``python -m dlzo.figures sensitivity|predictors``.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dlzo import DLZOError
from dlzo.io import read_json, read_jsonl, write_json

COMMANDS = ("sensitivity", "gradnorm")

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

    Draw j on batch b is ``ZOSGD(param_groups(layer), seed=seed, restore="exact").projected_gradient(
    closure, step=j)``: the optimizer itself perturbs the layer with its z of step j and copies the
    weights back bit for bit after each pair of evaluations (also on an error), so the model leaves
    as it came. ``prefix``: run the frozen layers before the perturbed one once per batch
    (``FrozenPrefix`` cache="batch") where the model allows it.
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
    started = time.time()
    base = [float(objective_loss(model, b)) for b in batches]
    out_layers, used_prefix = [], set()
    for i in layers:
        opt = ZOSGD(param_groups(tuned_parameters(model, "layer", i), 0.0), lr=0.0, eps=eps, seed=seed,
                    restore="exact")
        fp = FrozenPrefix(model, i, "batch") if prefix and not FrozenPrefix.supported(model, i) else None
        used_prefix.add("batch" if fp is not None else "off")
        for b in batches:
            b.memo.clear()  # a cached prefix belongs to the layer it was computed for
        samples = []
        try:
            for j in range(k):
                for bi, b in enumerate(batches):
                    lp, lm, g = opt.projected_gradient(lambda: objective_loss(model, b, fp), step=j)
                    if not (math.isfinite(lp) and math.isfinite(lm)):
                        raise DLZOError(f"layer {i}, draw {j}, batch {bi}: non-finite loss L(+)={lp}, L(-)={lm} "
                                        f"in {opt.tensors()[0].dtype}; use a smaller --eps or --dtype bf16/fp32")
                    samples.append({"draw": j, "batch": bi, "loss_plus": lp, "loss_minus": lm, "g": g})
        finally:
            for b in batches:
                b.memo.clear()
        g = [r["g"] for r in samples]
        out_layers.append({"index": i, "n_params": sum(p.numel() for p in opt.tensors()), "g": _spread(g),
                           "abs_diff": _spread([abs(r["loss_plus"] - r["loss_minus"]) for r in samples]),
                           "samples": samples})
        # progress in the job's log: a 7B model's profile runs for a long time before its JSON appears
        print(f"sensitivity: layer {i} ({len(out_layers)}/{len(layers)}), {len(samples)} draws x batches, "
              f"std(g) {out_layers[-1]['g']['std']:.4g}, {time.time() - started:.0f} s so far",
              file=sys.stderr, flush=True)
    top = max(out_layers, key=lambda L: L["g"]["std"])
    return {"num_layers": n, "k": k, "eps": eps, "seed": seed, "z_seeds": [step_seed(seed, j) for j in range(k)],
            "prefix_cache": "batch" if used_prefix == {"batch"} else ("off" if used_prefix == {"off"} else "mixed"),
            "base_loss": base, "layers": out_layers, "most_sensitive_layer": top["index"],
            "stats": "g = (L(+) - L(-)) / 2eps per (draw, batch); std with ddof=1; quantiles linear "
                     "(numpy.percentile); E[g^2] = |grad of the layer|^2, so g.rms estimates it"}


def sensitivity_batches(tokenizer, data, task: str, n_batches: int, batch_size: int, seed: int,
                        max_len: int, device, share_prompt: bool = False) -> tuple[list, list[list]]:
    """The batches a ``dlzo.train`` run with ``seed`` sees at steps 0..n_batches-1 of ``data``'s train split
    (``share_prompt``: as ``train --scoring shared-prompt`` builds them)."""
    from dlzo.objectives import batch_indices, make_batch
    from dlzo.tasks import get_task

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
            print(f"gradnorm: batch {b_i + 1}/{len(batches)} backpropagated (loss {losses[-1]:.4f})",
                  file=sys.stderr, flush=True)
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


# --- the command line --------------------------------------------------------------------------------

@dataclass
class _Run:
    """What both commands set up from their common arguments: the model and the training batches."""
    args: argparse.Namespace
    started: float
    device: torch.device
    dtype: torch.dtype
    model: torch.nn.Module
    batches: list
    ids: list[list]
    probe_layer: int | None

    @property
    def name(self) -> str:
        return Path(self.args.model).name

    def rank(self, layers: list[dict], key) -> int | None:
        """The probe's layer's rank (1 = largest) among ``layers`` by ``key``; None without a probe."""
        ordered = sorted(layers, key=lambda L: -key(L))
        return next((r for r, L in enumerate(ordered, 1) if L["index"] == self.probe_layer), None)

    def fields(self) -> dict:
        """The JSON fields both commands record about their input."""
        a = self.args
        return dict(model=str(a.model), task=a.task, data=str(a.data), objective=self.batches[0].objective,
                    scoring=a.scoring, batch_size=len(self.ids[0]), batch_ids=self.ids, max_len=a.max_len)


def _parser(command: str, description: str, what: str, batches: int, seed_help: str, probe_help: str):
    """The parser of ``python -m dlzo.profiles <command>`` with the arguments both commands take."""
    from dlzo.runtime import add_runtime_args

    ap = argparse.ArgumentParser(prog=f"python -m dlzo.profiles {command}", description=description)
    ap.add_argument("--model", required=True, help="model folder (config.json + weights + tokenizer)")
    ap.add_argument("--data", required=True, help="prepared task folder (its train.jsonl) or a train.jsonl")
    ap.add_argument("--task", required=True, help="task name (decides the objective)")
    ap.add_argument("--out", required=True, help=f"{what} to write")
    ap.add_argument("--scoring", default="per-sequence", choices=["per-sequence", "shared-prompt"],
                    help="how candidates are scored, as dlzo.train --scoring (the same loss)")
    ap.add_argument("--probe", default=None, help=probe_help)
    ap.add_argument("--batches", type=int, default=batches, help="training batches (those a training run with "
                                                                 "--seed sees first)")
    ap.add_argument("--batch-size", type=int, default=8, help="examples per batch")
    ap.add_argument("--seed", type=int, default=0, help=seed_help)
    ap.add_argument("--max-len", type=int, default=256)
    add_runtime_args(ap)
    return ap


def _setup(args: argparse.Namespace) -> _Run:
    """Runtime, the probe's layer (from probe.json), the model and the training batches of ``args``."""
    from dlzo.models import load_model, load_tokenizer
    from dlzo.runtime import setup_runtime

    started = time.time()
    device, dtype = setup_runtime(args)
    probe_layer = read_json(args.probe, "probe file").get("first_outlier_layer") if args.probe else None
    model = load_model(args.model, device, dtype)
    tokenizer = load_tokenizer(args.model)
    batches, ids = sensitivity_batches(tokenizer, args.data, args.task, args.batches, args.batch_size, args.seed,
                                       args.max_len, device, args.scoring == "shared-prompt")
    return _Run(args, started, device, dtype, model, batches, ids, probe_layer)


def sensitivity_main(argv: list[str] | None = None) -> int:
    from dlzo.runtime import provenance

    ap = _parser("sensitivity", "Perturbation-sensitivity profile: per decoder layer, K single-layer ZO "
                 "perturbations at eps on a few training batches; the spread of (L(+)-L(-))/2eps and of |L(+)-L(-)|.",
                 "sensitivity JSON", batches=2, seed_help="z seeds and batch choice, as a training run's --seed",
                 probe_help="probe.json: its first outlier layer is recorded and marked")
    ap.add_argument("--k", type=int, default=8, help="perturbations (draws of z) per layer")
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="only these layers (default: all)")
    ap.add_argument("--prefix-cache", choices=["batch", "off"], default="batch",
                    help="run the frozen layers before the perturbed one once per batch, or every pass")
    args = ap.parse_args(argv)

    run = _setup(args)
    result = sensitivity(run.model, run.batches, args.k, args.eps, args.seed, args.layers,
                         args.prefix_cache == "batch")
    result.update(run.fields(), probe=args.probe, probe_layer=run.probe_layer,
                  provenance=provenance(run.device, run.dtype, run.started))
    result["probe_layer_rank"] = run.rank(result["layers"], lambda L: L["g"]["std"])
    write_json(args.out, result)
    print(f"{run.name}: largest spread of g at layer {result['most_sensitive_layer']}"
          + (f"; probe's first outlier layer {run.probe_layer} ranks {result['probe_layer_rank']} of "
             f"{len(result['layers'])} by the spread of g" if result["probe_layer_rank"] else ""))
    return 0


def gradnorm_main(argv: list[str] | None = None) -> int:
    from dlzo.objectives import measure_inference
    from dlzo.runtime import peak_memory_mb, provenance

    ap = _parser("gradnorm", "Per-layer first-order gradient norms: backprop of the training loss on a few "
                 "training batches (the ones a training run with --seed sees first), at near-inference memory.",
                 "gradient-norm JSON", batches=4, seed_help="batch choice, as a training run's --seed",
                 probe_help="probe.json: recorded, with the rank of its layer")
    args = ap.parse_args(argv)

    run = _setup(args)
    inference_mb = measure_inference(run.model, run.batches[0], run.device)  # first: CPU peak RSS only grows
    result = gradient_norms(run.model, run.batches)
    result.update(run.fields(), seed=args.seed, probe=args.probe, probe_layer=run.probe_layer,
                  probe_layer_rank=run.rank(result["layers"], lambda L: L["rms_norm"]),
                  peak_memory_mb=peak_memory_mb(run.device), inference_peak_mb=inference_mb,
                  provenance=provenance(run.device, run.dtype, run.started, config=vars(args)))
    write_json(args.out, result)
    print(f"{run.name}: largest gradient at layer {result['largest_gradient_layer']}"
          + (f"; the probe's layer {run.probe_layer} ranks {result['probe_layer_rank']} of {len(result['layers'])}"
             if result["probe_layer_rank"] else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sensitivity"]:
        return sensitivity_main(argv[1:])
    if argv[:1] == ["gradnorm"]:
        return gradnorm_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m dlzo.profiles", description=__doc__.split("\n\n")[0],
                                 epilog="python -m dlzo.profiles sensitivity --help: the perturbation-sensitivity "
                                        "profile; python -m dlzo.profiles gradnorm --help: per-layer first-order "
                                        "gradient norms")
    ap.add_argument("command", choices=COMMANDS)
    ap.parse_args(argv)  # no command, or an unknown one: usage and exit status 2
    return 2


if __name__ == "__main__":
    from dlzo import run_cli

    run_cli(main, "profiles")
