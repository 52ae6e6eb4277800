"""Benchmark: seconds per ZO step and peak memory, MeZO-faithful vs ours vs the forward-pass floor.

    python -m dlzo.bench --model <model dir> --out bench.json [--probe probe.json] [--layers 1]

In one run, on batches shaped like SST-2 (16 x 32 tokens) and COPA (16 x 16 tokens), for each layer
(index 1, LLaMA2-7B's dominant layer and the worst case, plus the probe's layer when given):
  mezo_faithful_full_s  MeZO's step on every parameter as its trainer codes it (ZOSGD restore="mezo"):
                        z regenerated four times, out-of-place perturbations and update, the loss
                        from the model's labels path (full logits at every position)
  full_s                our full-model step: in place, restore and update fused (three draws of z,
                        not four), LM head only at the scored positions
  layer_s               our single-layer step (z drawn once, exact restore, frozen prefix cached)
  layer_paired_s        the single-layer step with the two perturbed branches run through the layers
                        after the tuned one as one double batch (train --paired-suffix; on by default on CUDA)
  floor_s               two forward passes from the tuned layer on, with only the logits the loss needs
  speedup_vs_mezo = mezo_faithful_full_s / layer_s;  overhead_vs_floor = layer_s / floor_s
Each mode runs in its own process, so its peak memory (GPU: max allocated; CPU: peak RSS) is its own;
``inference_peak_mb`` is plain inference on the same batch. Step times are medians over --steps, taken
round-robin (one step of each mode in turn, one process computing at a time) so that machine noise
hits every mode alike.

    python -m dlzo.bench --memory --model <model dir> --out memory.json [--layers 11 1] [--shapes sst2]

The memory comparison of the paper's methods, each step as the pipeline runs it, at the same batch:
inference, mezo-full (MeZO's step as its trainer writes it: out-of-place arithmetic, whose temporaries
of the largest tensor cost memory), mezo-full-fused (the same maths in place, ``--restore fused``),
sparse-mezo (mezo-full with fixed magnitude masks, one byte a parameter), dominant-layer ZO (``layer-<i>``: exact restore, frozen prefix cached), fo-adamw
(backprop + AdamW on every parameter) and fo-layer-<i> (AdamW on layer i only). Per method:
``peak_mb``, ``vs_inference`` = peak_mb / inference's, and ``vs_inference_net``, the same ratio after
taking off each process's memory before the model was loaded (CPU: the Python and torch runtime's
RSS, a few hundred MB that every method pays alike; GPU: zero). Weights are fp32 on CPU; on GPU the
ZO rows and inference use the runtime dtype (fp16 by default) and the FO rows fp32 master weights
under bf16 autocast, as dlzo.train runs them.

    python -m dlzo.bench --scoring --model <model dir> --data <prepared task folder> --task rte --out scoring.json

The training loss of a task scored by candidates, on its real training batches (as a run with seed 0
draws them), one sequence per candidate against ``train --scoring shared-prompt`` (one sequence per
example whose candidates differ only in their last token): per mode the tokens per batch and the
median seconds of a ZO step's two forward passes, taken alternately on the same batches; ``speedup``
and the largest difference of the two modes' losses (float rounding only).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time

import torch

from dlzo.io import read_json, write_json

SHAPES = {"sst2": (16, 32), "copa": (16, 16)}
MODES = ("inference", "mezo_faithful_full", "full", "layer", "layer_paired", "floor", "mezo_full", "sparse_mezo",
         "fo_full", "fo_layer")
# --memory: method name -> bench mode; layer modes get one row per --layers entry
MEMORY_ROWS = {"inference": "inference", "mezo-full": "mezo_full", "mezo-full-fused": "full",
               "sparse-mezo": "sparse_mezo", "fo-adamw": "fo_full"}
MEMORY_LAYER_ROWS = {"layer-{}": "layer", "fo-layer-{}": "fo_layer"}
FO_MODES = {"fo_full": "fo-full", "fo_layer": "fo-layer"}  # first-order modes -> the method kind they step


def _batch(tokenizer_vocab: int, n: int, t: int, device, seed: int = 0):
    from dlzo.objectives import Batch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, tokenizer_vocab, (n, t), generator=gen)
    pos = torch.arange(n) * t + (t - 2)  # one scored token per sequence (the candidate), as SST-2
    tok = ids[:, t - 1]
    return Batch(ids.to(device), torch.ones_like(ids).to(device), pos.to(device), tok.to(device),
                 torch.arange(n, device=device), [], torch.zeros(0, dtype=torch.long, device=device), "lm",
                 keys=[(i, 0) for i in range(n)])


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _worker(mode: str, model_dir: str, layer: int, shape: tuple[int, int], device_name: str, dtype_name: str,
            threads: int | None, sparsity: float, conn) -> None:
    """One mode in its own process (its peak memory is its own): set up, say "ready", then time one step
    per "step" message; on "stop", report peak memory and what was tuned."""
    from dlzo.models import load_model, tuned_parameters
    from dlzo.tuning import amp_context, weights_dtype, zo_optimizer
    from dlzo.objectives import FrozenPrefix, loss
    from dlzo.runtime import peak_memory_mb, pick_device, set_threads
    from dlzo.train import fo_step, zo_step
    from dlzo.zo import param_groups

    set_threads(threads)
    device = pick_device(device_name)
    fo = mode in FO_MODES
    dtype = weights_dtype(dtype_name, device, fo)
    amp_name, amp = amp_context("auto", device, fo)
    base_mb = peak_memory_mb(device)  # the runtime before any model: every mode pays it alike
    model = load_model(model_dir, device, dtype)
    batch = _batch(model.config.vocab_size, *shape, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # what MeZO's zo_forward computes: the model's own loss from labels (-100 except the answer tokens),
    # i.e. logits over the whole vocabulary at every position, shifted and upcast by transformers
    labels = torch.full_like(batch.input_ids, -100)
    labels.view(-1)[batch.score_pos + 1] = batch.score_tok

    def full_logits_loss():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels,
                     use_cache=False).loss

    prefix = None
    if mode in ("layer", "layer_paired", "floor", "fo_layer"):
        prefix = FrozenPrefix(model, layer, "dataset")
        with torch.no_grad(), amp():
            prefix.fill([batch])
    tuned = model.num_parameters()
    if mode == "inference":
        run = lambda: loss(model, batch)  # noqa: E731
    elif mode == "floor":
        def run():
            batch.memo.clear()
            return loss(model, batch, prefix), loss(model, batch, prefix)
    elif fo:  # dlzo.train's first-order step: forward (autocast on GPU), backward, clip, AdamW
        named = tuned_parameters(model, FO_MODES[mode], layer)
        params = [p for _, p in named]
        for p in params:
            p.requires_grad_(True)
        tuned = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(param_groups(named, 0.0), lr=1e-6, weight_decay=0.0)

        def run():
            batch.memo.clear()
            with torch.enable_grad():
                return fo_step(model, batch, prefix, opt, params, 1.0, amp)[0]
    else:  # dlzo.train's ZO step, except MeZO's own (its loss through the full logits)
        if mode in ("layer", "layer_paired"):
            named, restore = list(prefix.layers[layer].named_parameters()), "exact"
        else:
            named = list(model.named_parameters())
            restore = "mezo" if mode in ("mezo_faithful_full", "mezo_full", "sparse_mezo") else "fused"
        opt = zo_optimizer(named, 1e-6, 1e-3, 0.0, 0, restore, sparsity if mode == "sparse_mezo" else None)
        if mode == "sparse_mezo":
            tuned = sum(int(m.sum()) for g in opt.param_groups for m in g["masks"])
        elif prefix is not None:
            tuned = sum(p.numel() for _, p in named)

        def run():
            batch.memo.clear()
            if mode == "mezo_faithful_full":
                return opt.step(full_logits_loss)
            return zo_step(opt, model, batch, prefix, mode == "layer_paired")
    conn.send("ready")
    with torch.no_grad():
        while conn.recv() == "step":  # the first step is warm-up (and allocates AdamW's states)
            _sync(device)
            t0 = time.perf_counter()
            run()
            _sync(device)
            conn.send(time.perf_counter() - t0)
    conn.send({"peak_mb": peak_memory_mb(device), "base_mb": base_mb, "tuned_params": tuned,
               "weights_dtype": str(dtype).replace("torch.", ""), "amp": amp_name})


def measure_modes(specs: dict, model_dir: str, shape, steps: int, device: str, dtype: str, threads: int | None,
                  sparsity: float = 0.75, concurrent: bool = True) -> dict:
    """Median seconds per step (after one warm-up step) and peak memory of each mode in ``specs``
    ({name: (mode, layer)}), each mode in its own process.

    ``concurrent``: all processes live at once and the steps run round-robin (one step of each mode in
    turn, one process computing at a time), so machine noise slows every mode alike and the ratios
    hold. Otherwise one process after the other (for memory: a 7B model's modes do not fit side by side).
    """
    ctx = mp.get_context("spawn")

    def start(name):
        mode, layer = specs[name]
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(mode, model_dir, layer, shape, device, dtype, threads, sparsity, child))
        proc.start()
        if not parent.poll(3600) or parent.recv() != "ready":
            raise RuntimeError(f"bench worker {name} ({mode}) did not start")
        return proc, parent

    def finish(name, proc, conn, times):
        conn.send("stop")
        res = conn.recv()
        proc.join(timeout=60)
        return {"s": statistics.median(times[1:]), **res}

    out, procs = {}, {}
    try:
        if concurrent:
            procs = {name: start(name) for name in specs}
            times = {name: [] for name in specs}
            for _ in range(steps + 1):
                for name, (_, conn) in procs.items():
                    conn.send("step")
                    times[name].append(conn.recv())
            return {name: finish(name, proc, conn, times[name]) for name, (proc, conn) in procs.items()}
        for name in specs:
            procs = {name: start(name)}
            proc, conn = procs[name]
            times = []
            for _ in range(steps + 1):
                conn.send("step")
                times.append(conn.recv())
            out[name] = finish(name, proc, conn, times)
        return out
    finally:
        for proc, _ in procs.values():
            if proc.is_alive():
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()


def bench(model_dir: str, layers: list[int], steps: int, device: str, dtype: str, threads: int | None) -> dict:
    out = {"model": model_dir, "steps": steps, "device": device, "dtype": dtype, "threads": threads,
           "schedule": "round-robin: one step of each mode in turn, each mode in its own process",
           "results": {}}
    for shape_name, shape in SHAPES.items():
        specs = {m: (m, layers[0]) for m in ("inference", "mezo_faithful_full", "full")}
        for layer in layers:
            specs.update({f"layer@{layer}": ("layer", layer), f"layer_paired@{layer}": ("layer_paired", layer),
                          f"floor@{layer}": ("floor", layer)})
        m = measure_modes(specs, model_dir, shape, steps, device, dtype, threads)
        for layer in layers:
            lay, flo = m[f"layer@{layer}"], m[f"floor@{layer}"]
            r = {
                "shape": list(shape), "layer": layer,
                "mezo_faithful_full_s": m["mezo_faithful_full"]["s"], "full_s": m["full"]["s"],
                "layer_s": lay["s"], "floor_s": flo["s"], "inference_s": m["inference"]["s"],
            }
            r["speedup_vs_mezo"] = r["mezo_faithful_full_s"] / r["layer_s"]
            r["overhead_vs_floor"] = r["layer_s"] / r["floor_s"]
            r["full_vs_mezo"] = r["mezo_faithful_full_s"] / r["full_s"]
            r["layer_paired_s"] = m[f"layer_paired@{layer}"]["s"]  # both branches through the suffix as one batch
            r["paired_vs_layer"] = r["layer_s"] / r["layer_paired_s"]
            r["peak_mb"] = {"mezo_faithful_full": m["mezo_faithful_full"]["peak_mb"], "full": m["full"]["peak_mb"],
                            "layer": lay["peak_mb"], "floor": flo["peak_mb"]}
            r["inference_peak_mb"] = m["inference"]["peak_mb"]
            r["layer_peak_vs_inference"] = r["peak_mb"]["layer"] / r["inference_peak_mb"]
            out["results"][f"{shape_name}/layer-{layer}"] = r
            print(json.dumps({f"{shape_name}/layer-{layer}": r}), file=sys.stderr)
    return out


def memory_bench(model_dir: str, layers: list[int], shapes: list[str], steps: int, device: str, dtype: str,
                 threads: int | None, sparsity: float) -> dict:
    """Peak memory of each method's step against inference on the same batch, one fresh process each."""
    out = {"bench": "memory", "model": model_dir, "steps": steps, "device": device, "dtype": dtype,
           "threads": threads, "layers": layers, "sparsity": sparsity, "results": {}}
    for shape_name in shapes:
        specs = {name: (mode, layers[0]) for name, mode in MEMORY_ROWS.items()}
        for layer in layers:
            specs.update({name.format(layer): (mode, layer) for name, mode in MEMORY_LAYER_ROWS.items()})
        rows = measure_modes(specs, model_dir, SHAPES[shape_name], steps, device, dtype, threads, sparsity,
                             concurrent=False)
        inf = rows["inference"]
        for r in rows.values():
            r["vs_inference"] = r["peak_mb"] / inf["peak_mb"]
            r["vs_inference_net"] = (r["peak_mb"] - r["base_mb"]) / (inf["peak_mb"] - inf["base_mb"])
        out["results"][shape_name] = {"shape": list(SHAPES[shape_name]), "methods": rows}
        print(f"{shape_name} {SHAPES[shape_name]}: " + ", ".join(
            f"{k} {r['peak_mb']:.0f} MB ({r['vs_inference']:.2f}x)" for k, r in rows.items()), file=sys.stderr)
    return out


def scoring_bench(model_dir: str, data: str, task: str, batch_size: int, max_len: int, steps: int, device: str,
                  dtype: str, threads: int | None) -> dict:
    """Per-candidate against shared-prompt scoring of one task's training batches (see the docstring)."""
    from pathlib import Path

    from dlzo import DLZOError
    from dlzo.io import read_jsonl
    from dlzo.models import load_model, load_tokenizer
    from dlzo.objectives import batch_indices, loss, make_batch
    from dlzo.runtime import pick_device, set_threads
    from dlzo.tasks import get_task
    from dlzo.tuning import weights_dtype

    set_threads(threads)
    dev = pick_device(device)
    spec = get_task(task)
    if spec.objective != "candidates":
        raise DLZOError(f"--scoring: task {task} has objective {spec.objective!r}: nothing is scored by candidates")
    rows = read_jsonl(Path(data) / "train.jsonl")
    model = load_model(model_dir, dev, weights_dtype(dtype, dev, fo=False))
    tok = load_tokenizer(model_dir)
    modes = {"per-sequence": False, "shared-prompt": True}
    times = {m: [] for m in modes}
    tokens = {m: [] for m in modes}
    diff = 0.0
    with torch.no_grad():
        for step in range(steps + 1):  # step 0 warms up and is not timed
            idx = batch_indices(len(rows), min(batch_size, len(rows)), 0, step)
            losses = {}
            for m, share in modes.items():
                batch = make_batch(tok, [rows[i] for i in idx], spec.objective, dev, max_len, share)
                _sync(dev)
                t0 = time.perf_counter()
                losses[m] = float(loss(model, batch))
                loss(model, batch)  # a ZO step runs two forward passes
                _sync(dev)
                if step:
                    times[m].append(time.perf_counter() - t0)
                    tokens[m].append(int(batch.input_ids.numel()))
            diff = max(diff, abs(losses["per-sequence"] - losses["shared-prompt"]))
    res = {"bench": "scoring", "model": model_dir, "data": data, "task": task, "batch_size": batch_size,
           "max_len": max_len, "steps": steps, "device": str(dev), "threads": threads,
           "schedule": "alternating: each batch in both modes, per-sequence first",
           "modes": {m: {"s_per_step": statistics.median(times[m]), "tokens_per_batch": statistics.mean(tokens[m])}
                     for m in modes},
           "max_abs_loss_diff": diff}
    res["speedup"] = res["modes"]["per-sequence"]["s_per_step"] / res["modes"]["shared-prompt"]["s_per_step"]
    res["token_ratio"] = (res["modes"]["per-sequence"]["tokens_per_batch"]
                          / res["modes"]["shared-prompt"]["tokens_per_batch"])
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--probe", default=None, help="probe.json: also measure the probe's layer")
    ap.add_argument("--layers", type=int, nargs="*", default=[1])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--memory", action="store_true", help="the memory comparison of the methods (see above)")
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES), help="--memory: batch shapes")
    ap.add_argument("--sparsity", type=float, default=0.75, help="--memory: sparse-mezo's frozen fraction")
    ap.add_argument("--scoring", action="store_true", help="per-candidate vs shared-prompt scoring (see above)")
    ap.add_argument("--data", default=None, help="--scoring: a prepared task folder (train.jsonl)")
    ap.add_argument("--task", default=None, help="--scoring: the task's name (its objective and prompt)")
    ap.add_argument("--batch-size", type=int, default=8, help="--scoring: examples per batch")
    ap.add_argument("--max-len", type=int, default=256, help="--scoring: as train --max-len")
    a = ap.parse_args(argv)
    if a.scoring and not (a.data and a.task):
        ap.error("--scoring needs --data <prepared task folder> and --task <name>")
    layers = list(a.layers)
    if a.probe:
        first = read_json(a.probe, "probe result").get("first_outlier_layer")
        if first is not None and first not in layers:
            layers.append(first)
    if a.scoring:
        res = scoring_bench(a.model, a.data, a.task, a.batch_size, a.max_len, a.steps, a.device, a.dtype, a.threads)
    elif a.memory:
        res = memory_bench(a.model, layers, a.shapes, a.steps, a.device, a.dtype, a.threads, a.sparsity)
    else:
        res = bench(a.model, layers, a.steps, a.device, a.dtype, a.threads)
    write_json(a.out, res)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
