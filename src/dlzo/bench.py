"""Benchmark: seconds per ZO step and peak memory, MeZO-faithful vs ours vs the forward-pass floor.

    python -m dlzo.bench --model <model dir> --out bench.json [--probe probe.json] [--layers 1]

In one run, on batches shaped like SST-2 (16 x 32 tokens) and COPA (16 x 16 tokens), for each layer
(index 1, LLaMA2-7B's dominant layer and the worst case, plus the probe's layer when given):
  mezo_faithful_full_s  MeZO's step on every parameter as its trainer codes it (``MezoLiteral``: MeZO's
                        arithmetic as dlzo.zo's default, but out of place as MeZO allocates it):
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
inference, mezo-full (MeZO's step with its trainer's arithmetic bit for bit, the default ``--restore mezo``:
run in place, chunk by chunk), mezo-full-fused (in place with one draw of z less, ``--restore fused``),
sparse-mezo (mezo-full with fixed magnitude masks, one bit a parameter), dominant-layer ZO (``layer-<i>``: exact restore, frozen prefix cached), fo-adamw
(backprop + AdamW on every parameter) and fo-layer-<i> (AdamW on layer i only). Per method:
``peak_mb`` (for the tuned methods after the steps and then writing their checkpoint as dlzo.train does,
``step_peak_mb`` the peak before the write, ``checkpoint_mb`` its size), ``vs_inference`` = peak_mb / inference's, and ``vs_inference_net``, the same ratio after
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

    python -m dlzo.bench --paper-scale --out results/gpu_bench.json     (make gpu-bench; one GPU, ~3-4 min)
    python -m dlzo.bench --paper-scale --scaled 64 --out bench.json    (CPU: widths / 64, fp32)

The paper's two models at their published shapes (``dlzo.architectures``), built with random weights directly on
the GPU (``dlzo.models.build_random``; no download: step time and memory do not depend on the weights' values):
LLaMA2-7B in fp16 and Qwen3-8B in bf16 (each checkpoint's dtype). Batches are MeZO's at batch size 16, padded to
``TaskSpec.tokens`` (the 90th-percentile prompt + candidate length under LLaMA-2's tokenizer, used for both
models): SST-2 one sequence per candidate (MeZO's train_as_classification), 32 x 43, one scored token each; COPA
the gold answer only (an "lm" objective), 16 x 21, 5 scored tokens. Per model and batch, seconds per step and
peak memory of: inference; mezo_faithful_full (``MezoLiteral``: MeZO's four draws of z and out-of-place
arithmetic, full logits at every position); full (ours: fused, three draws); sparse_mezo (the pipeline's, 75%
frozen, its exact magnitude masks selected on the GPU); layer@i and
layer_paired@i (single-layer ZO without / with the paired suffix) and floor@i for i = 1 and the dominant layer
(``--dominant``, else ``--probe-dir``/<model>/probe.json, else the paper's: LLaMA2-7B's is 1; Qwen3-8B's is not
known: layer 1 only); lora_zo (r 8, alpha 16 on q_proj and v_proj in every layer, exact restore). Ratios:
``speedup_vs_mezo`` = mezo_faithful_full's s/step / the mode's; ``peak_vs_inference``; beside them the paper's
end-to-end speedups for LLaMA2-7B (SST-2 2.45x, COPA 4.52x). Design: one spawned process per model, built once;
every (mode, batch) in turn in it, peak reset after the mode's set-up (GPU: ``torch.cuda.max_memory_allocated``
since ``reset_peak_memory_stats`` is that mode's alone; CPU: VmHWM reset through /proc/self/clear_refs), 1 warm-up
+ ``--steps`` (3) timed steps, synchronized, median. A budget is printed first; no mode starts after
``--time-limit`` (480 s) and the JSON says which were skipped. Without a GPU it refuses unless ``--scaled``.
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
    """n random sequences of t tokens, each scoring its last token (one candidate per sequence, as SST-2)."""
    return _paper_batch(tokenizer_vocab, {"sequences": n, "tokens": t, "scored_per_seq": 1, "objective": "lm"},
                        device, seed)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _worker(mode: str, model_dir: str, layer: int, shape: tuple[int, int], device_name: str, dtype_name: str,
            threads: int | None, sparsity: float, conn) -> None:
    """One mode in its own process (its peak memory is its own): set up, say "ready", then time one step
    per "step" message; on "stop", report peak memory and what was tuned."""
    from dlzo.models import load_model, tuned_parameters
    from dlzo.tuning import amp_context, weights_dtype
    from dlzo.objectives import FrozenPrefix
    from dlzo.runtime import peak_memory_mb, pick_device, set_threads
    from dlzo.train import fo_step
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

    tuned = model.num_parameters()  # inference and floor: the model's, as the memory rows report them
    ckpt = None  # the tuned tensors a training run saves (train.save_tuned) after its steps
    if fo:  # dlzo.train's first-order step: forward (autocast on GPU), backward, clip, AdamW
        prefix = None
        if mode == "fo_layer":
            prefix = FrozenPrefix(model, layer, "dataset")
            with torch.no_grad(), amp():
                prefix.fill([batch])
        named = tuned_parameters(model, FO_MODES[mode], layer)
        params = [p for _, p in named]
        for p in params:
            p.requires_grad_(True)
        tuned = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(param_groups(named, 0.0), lr=1e-6, weight_decay=0.0)
        ckpt = named

        def run():
            batch.memo.clear()
            with torch.enable_grad():
                return fo_step(model, batch, prefix, opt, params, 1.0, amp)[0]
    else:  # the paper-scale bench's set-up of the same mode (dlzo.train's ZO step, except MeZO's own)
        with torch.no_grad():
            run, n_tuned, named, _held = _mode_setup(mode, layer, model, batch, sparsity)
        if named:
            tuned, ckpt = n_tuned, named
    conn.send("ready")
    with torch.no_grad():
        while conn.recv() == "step":  # the first step is warm-up (and allocates AdamW's states)
            _sync(device)
            t0 = time.perf_counter()
            run()
            _sync(device)
            conn.send(time.perf_counter() - t0)
    res = {"peak_mb": peak_memory_mb(device), "base_mb": base_mb, "tuned_params": tuned,
           "weights_dtype": str(dtype).replace("torch.", ""), "amp": amp_name}
    if ckpt is not None:  # the run's checkpoint write, as dlzo.train writes tuned.safetensors: its peak counts
        import tempfile
        from pathlib import Path

        from dlzo.train import _tensors, save_tuned

        res["step_peak_mb"] = res["peak_mb"]
        with tempfile.TemporaryDirectory() as tmp:
            save_tuned(Path(tmp) / "tuned.safetensors", _tensors(ckpt, host=False), mode, 0)
            res["checkpoint_mb"] = (Path(tmp) / "tuned.safetensors").stat().st_size / 2**20
        res["peak_mb"] = peak_memory_mb(device)
    conn.send(res)


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


# --- --paper-scale: the paper's two architectures at full size on one GPU (random weights, no download) -----------
#
# One process per model (spawned): the model is built once, directly on the device, and every mode of every
# shape is measured in turn on it. Per mode: set up (optimizer, masks, prefix cache, adapters), reset the peak,
# one warm-up step + ``steps`` timed steps (synchronized), read the peak, free everything the mode made. On GPU,
# ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` is exactly this mode's peak (weights, what
# the mode keeps, its step's transients). On CPU, the peak resident set size is reset the same way through
# /proc/self/clear_refs (Linux). Weights are not restored between modes: they are random, step time and memory do
# not depend on their values, and a few ZO steps at lr 1e-6 leave them where they were up to rounding.
# LoRA wraps the model (peft), so lora-zo runs last.

from dlzo.zo import ZOSGD  # noqa: E402

PAPER_MODELS = {"llama2-7b": "float16", "qwen3-8b": "bfloat16"}  # each checkpoint's dtype (its config.json)
# LLaMA2-7B's dominant layer (paper [S]; Sun et al.'s first massive-activation layer). Qwen3-8B's is not known
# (SPEC: "the pipeline measures it"); random weights have no outliers, so the probe cannot find it here.
PAPER_DOMINANT = {"llama2-7b": 1}
PAPER_SPEEDUP = {"sst2": 2.45, "copa": 4.52}  # LLaMA2-7B, dominant layer vs MeZO, end-to-end (paper, Table 4 [S])
PAPER_SCORED = {"sst2": 1, "copa": 5}  # scored tokens per sequence: SST-2's one-token candidates; a COPA answer
PAPER_LORA = dict(r=8, alpha=16)
PAPER_LIMIT_S = 480.0
# step-time model for the printed budget (dlzo.cluster's defaults on GPU: achieved TFLOP/s and TB/s)
BUDGET_RATES = {"cuda": dict(tflops=100.0, tbps=1.5, step_overhead_s=0.02, mode_overhead_s=1.5, start_s=20.0,
                             build_s_per_gb=1.5, build_s=10.0),
                "cpu": dict(tflops=0.03, tbps=0.003, step_overhead_s=0.03, mode_overhead_s=0.3, start_s=6.0,
                            build_s_per_gb=20.0, build_s=1.0)}


def paper_shape(task: str) -> dict:
    """MeZO's batch of ``task``: 16 examples, one sequence per candidate for a candidates objective (MeZO's
    train_as_classification: SST-2's two) or one for "lm" (COPA: the gold answer), all padded to
    ``TaskSpec.tokens`` (the 90th-percentile prompt + candidate length under LLaMA-2's tokenizer)."""
    from dlzo.tasks import TASKS

    spec = TASKS[task]
    per = spec.choices if spec.objective == "candidates" else 1
    return {"task": task, "examples": 16, "seqs_per_example": per, "sequences": 16 * per, "tokens": spec.tokens,
            "scored_per_seq": PAPER_SCORED[task], "objective": spec.objective, "choices": spec.choices}


def _paper_batch(vocab: int, shape: dict, device, seed: int = 0):
    from dlzo.objectives import Batch

    n, t, k = shape["sequences"], shape["tokens"], shape["scored_per_seq"]
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, t), generator=gen)
    cols = torch.arange(t - k, t)
    pos = (torch.arange(n)[:, None] * t + cols[None, :] - 1).reshape(-1)  # logits at j-1 predict token j
    tok = ids[:, t - k:].reshape(-1)
    unit = torch.arange(n)[:, None].expand(n, k).reshape(-1)
    if shape["objective"] == "candidates":
        c = shape["choices"]
        n_cands, labels = [c] * shape["examples"], torch.randint(0, c, (shape["examples"],), generator=gen)
        keys = [(i // c, i % c) for i in range(n)]
    else:
        n_cands, labels, keys = [], torch.zeros(0, dtype=torch.long), [(i, 0) for i in range(n)]
    dev = lambda x: x.to(device)  # noqa: E731
    return Batch(dev(ids), dev(torch.ones_like(ids)), dev(pos), dev(tok), dev(unit), n_cands, dev(labels),
                 shape["objective"], keys=keys, n_units=n)


def paper_modes(layers: list[int]) -> list[tuple[str, str, int | None]]:
    """(key, mode, layer) in the order measured: lora-zo last (it wraps the model)."""
    modes = [("inference", "inference", None), ("mezo_faithful_full", "mezo_faithful_full", None),
             ("full", "full", None), ("sparse_mezo", "sparse_mezo", None)]
    for layer in layers:
        modes += [(f"layer@{layer}", "layer", layer), (f"layer_paired@{layer}", "layer_paired", layer),
                  (f"floor@{layer}", "floor", layer)]
    return modes + [("lora_zo", "lora_zo", None)]


def _zo_optimizer(mode: str, named, restore: str, sparsity: float):
    """A ZO mode's optimizer: MeZO's own for mezo_faithful_full (``MezoLiteral``: its out-of-place arithmetic and
    allocations, where dlzo.zo's are in place), else the pipeline's (dlzo.tuning; sparse_mezo with its exact
    magnitude masks, selected chunk by chunk on the tensors' device)."""
    from dlzo.tuning import zo_optimizer
    from dlzo.zo import param_groups

    if mode == "mezo_faithful_full":
        return MezoLiteral(param_groups(named, 0.0), lr=1e-6, eps=1e-3, weight_decay=0.0, seed=0, restore="mezo")
    return zo_optimizer(named, 1e-6, 1e-3, 0.0, 0, restore, sparsity if mode == "sparse_mezo" else None)


class MezoLiteral(ZOSGD):
    """ZO-SGD with MeZO's trainer's arithmetic exactly as it writes it (restore="mezo"'s maths): z drawn whole
    at each of the four uses, ``p.data = p.data + scaling_factor * z * eps`` and ``p.data = p.data - lr * (g * z
    + wd * p.data)`` (no wd term for no-decay tensors), out of place: the temporaries of the largest tensor it
    allocates are part of MeZO's step time and peak memory, whatever ``dlzo.zo`` does in place."""

    @torch.no_grad()
    def _perturb(self, seed: int, factor: float, eps: float) -> None:
        for _, p, z, _ in self._draw(seed):
            p.data = p.data + factor * z * eps

    @torch.no_grad()
    def _update(self, seed: int, g: float, zs=None) -> None:
        for group, p, z, _ in self._draw(seed):
            lr, wd = group["lr"], group["weight_decay"]
            if group.get("decay", True):
                p.data = p.data - lr * (g * z + wd * p.data)
            else:
                p.data = p.data - lr * (g * z)


class _Peak:
    """This mode's peak memory in MB: GPU, torch's max allocated since ``reset``; CPU (Linux), the peak resident
    set since ``reset`` (VmHWM, reset through /proc/self/clear_refs), else the process's peak so far."""

    def __init__(self, device):
        self.device = device
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "cpu VmHWM (reset per mode)"

    def reset(self) -> None:
        import gc

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so the reset starts from what is live
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            self.kind = "cpu ru_maxrss (process peak so far: not per mode)"

    def mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        from dlzo.runtime import peak_memory_mb

        return peak_memory_mb(self.device)


def _mode_setup(mode: str, layer: int | None, model, batch, sparsity: float):
    """(run one step, parameters tuned, the (name, tensor) pairs tuned, the objects to free) of a mode that is
    not first-order, on ``model`` (lora_zo: the peft model), for both benches. inference and floor tune nothing
    (0, []); the ZO modes step as dlzo.train does (restore: exact for a layer or LoRA, fused for ``full``, MeZO's
    in-place chunks for mezo_full and sparse_mezo), except mezo_faithful_full (MeZO's own, MezoLiteral)."""
    from dlzo.models import tuned_parameters
    from dlzo.objectives import FrozenPrefix, loss
    from dlzo.train import zo_step
    from dlzo.tuning import zo_optimizer

    prefix = None
    if mode in ("layer", "layer_paired", "floor"):
        prefix = FrozenPrefix(model, layer, "dataset")
        prefix.fill([batch])
    if mode == "inference":
        return (lambda: loss(model, batch)), 0, [], []
    if mode == "floor":  # the two forward passes from the tuned layer on, nothing else
        def floor():
            batch.memo.clear()
            return loss(model, batch, prefix), loss(model, batch, prefix)
        return floor, 0, [], [prefix]
    if mode in ("layer", "layer_paired"):
        named = list(prefix.layers[layer].named_parameters())
        opt = zo_optimizer(named, 1e-6, 1e-3, 0.0, 0, "exact")
    elif mode == "lora_zo":  # train's restore for LoRA methods: exact; MeZO's LoRA lr / eps
        named = tuned_parameters(model, "lora-zo", None)
        opt = zo_optimizer(named, 1e-4, 1e-2, 0.0, 0, "exact")
    else:
        named = list(model.named_parameters())
        opt = _zo_optimizer(mode, named, "fused" if mode == "full" else "mezo", sparsity)
    tuned = (sum(m.count() for g in opt.param_groups for m in g["masks"]) if mode == "sparse_mezo"
             else sum(p.numel() for _, p in named))
    if mode == "mezo_faithful_full":  # what MeZO's zo_forward computes: the model's own loss from labels (-100
        # except the answer tokens), i.e. logits over the whole vocabulary at every position, shifted and upcast
        labels = torch.full_like(batch.input_ids, -100)
        labels.view(-1)[batch.score_pos + 1] = batch.score_tok

        def full_logits_loss():
            return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels,
                         use_cache=False).loss
        return (lambda: opt.step(full_logits_loss)), tuned, named, [opt, labels]

    def step():
        batch.memo.clear()
        return zo_step(opt, model, batch, prefix, mode == "layer_paired")
    return step, tuned, named, [opt, prefix]


def _paper_worker(name: str, divisor: int, device_name: str, steps: int, tasks: list[str], layers: list[int],
                  sparsity: float, threads: int | None, deadline: float, conn) -> None:
    """One model in its own process: build it once, measure every (mode, shape), send the result (or the error)."""
    import traceback

    try:
        conn.send(("ok", _paper_model(name, divisor, device_name, steps, tasks, layers, sparsity, threads, deadline)))
    except BaseException:  # noqa: BLE001 - the parent records it and goes on with the next model
        conn.send(("error", traceback.format_exc()))


def _paper_model(name, divisor, device_name, steps, tasks, layers, sparsity, threads, deadline) -> dict:
    import platform

    from dlzo.architectures import get_architecture, total_params
    from dlzo.models import add_lora, build_random
    from dlzo.runtime import pick_device, set_threads
    from dlzo.tuning import LORA_TARGETS

    set_threads(threads)
    t_start = time.perf_counter()
    device = pick_device(device_name)
    dtype = getattr(torch, PAPER_MODELS[name]) if device.type == "cuda" else torch.float32
    arch = get_architecture(name, divisor)
    peak = _Peak(device)
    peak.reset()
    base_mb = peak.mb() if device.type != "cuda" else 0.0
    t0 = time.perf_counter()
    model = build_random(arch, device, dtype, seed=0)
    model.requires_grad_(False)
    _sync(device)
    build_s = time.perf_counter() - t0
    weights_mb = (torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda"
                  else sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20)
    res = {"architecture": name, "width_divisor": divisor, "params": total_params(arch),
           "params_built": model.num_parameters(), "layers": arch["num_hidden_layers"], "hidden": arch["hidden_size"],
           "vocab": arch["vocab_size"], "dtype": str(dtype).replace("torch.", ""), "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "build_s": build_s, "weights_mb": weights_mb, "base_mb": base_mb, "peak_kind": peak.kind,
           "start_to_built_s": time.perf_counter() - t_start, "shapes": {}}
    shapes = {t: paper_shape(t) for t in tasks}
    batches = {t: _paper_batch(arch["vocab_size"], shapes[t], device, seed=i) for i, t in enumerate(tasks)}
    for t in tasks:
        res["shapes"][t] = {**shapes[t], "batch": [shapes[t]["sequences"], shapes[t]["tokens"]], "modes": {}}
    target = model
    with torch.no_grad():
        for key, mode, layer in paper_modes(layers):
            if mode == "lora_zo" and time.time() < deadline:
                target = add_lora(model, None, PAPER_LORA["r"], PAPER_LORA["alpha"], LORA_TARGETS, seed=0)
            for t in tasks:
                row = res["shapes"][t]["modes"]
                if time.time() > deadline:
                    row[key] = {"skipped": "time limit (--time-limit) reached before this mode"}
                    continue
                t_mode = time.perf_counter()
                held = []
                try:
                    peak.reset()
                    run, tuned, _named, held = _mode_setup(mode, layer, target, batches[t], sparsity)
                    setup_s = time.perf_counter() - t_mode
                    peak.reset()  # after set-up: what the mode keeps is live and counted, its set-up transients not
                    times = []
                    for _ in range(steps + 1):  # the first step warms up and is not counted
                        _sync(device)
                        s0 = time.perf_counter()
                        run()
                        _sync(device)
                        times.append(time.perf_counter() - s0)
                    row[key] = {"mode": mode, "layer": layer, "s": statistics.median(times[1:]), "times": times[1:],
                                "warmup_s": times[0], "setup_s": setup_s, "peak_mb": peak.mb(), "tuned_params": tuned}
                except Exception as err:  # noqa: BLE001 - one mode failing (e.g. out of memory) keeps the others
                    row[key] = {"mode": mode, "layer": layer, "error": f"{type(err).__name__}: {err}"[:2000]}
                finally:
                    run = held = None  # noqa: F841
                    batches[t].memo.clear()
                    peak.reset()
                row[key]["wall_s"] = time.perf_counter() - t_mode
                print(f"  {name} {t} {key}: " + (f"{row[key]['s']:.4f} s/step, peak {row[key]['peak_mb']:.0f} MB"
                      if "s" in row[key] else row[key].get("error") or row[key].get("skipped")),
                      file=sys.stderr, flush=True)
    res["wall_s"] = time.perf_counter() - t_start
    return res


def paper_ratios(model: dict, name: str, dominant: int | None) -> None:
    """Add the speedups vs MeZO-faithful and the peaks vs inference to every shape of a model's result."""
    for task, sh in model["shapes"].items():
        modes = sh["modes"]
        ok = {k: m for k, m in modes.items() if "s" in m}
        mezo, inf = ok.get("mezo_faithful_full"), ok.get("inference")
        base = model.get("base_mb", 0.0)
        for m in ok.values():
            m["speedup_vs_mezo"] = mezo["s"] / m["s"] if mezo else None
            m["peak_vs_inference"] = m["peak_mb"] / inf["peak_mb"] if inf else None
            m["peak_vs_inference_net"] = ((m["peak_mb"] - base) / (inf["peak_mb"] - base)
                                          if inf and inf["peak_mb"] > base else None)
        d = {"layer": dominant}
        for suffix, key in (("", "layer"), ("_paired", "layer_paired")):
            for label, layer in (("layer1", 1), ("dominant", dominant)):
                m = ok.get(f"{key}@{layer}") if layer is not None else None
                d[f"{label}{suffix}_speedup_vs_mezo"] = m["speedup_vs_mezo"] if m else None
        d["paper_speedup_vs_mezo"] = PAPER_SPEEDUP.get(task) if name == "llama2-7b" else None
        d["paper_note"] = ("LLaMA2-7B, end-to-end training (paper Table 4 [S]); ours: per ZO step"
                           if name == "llama2-7b" else "the paper's speedup is reported for LLaMA2-7B only [S]")
        sh["speedups"] = d


def paper_budget(models: list[str], tasks: list[str], steps: int, divisor: int, device_type: str,
                 layers: dict[str, list[int]], limit_s: float) -> dict:
    """The run's estimated seconds: per model its process start and build, per (mode, shape) its set-up and
    ``steps`` + 1 steps, from FLOPs and passes over the weights at BUDGET_RATES (rough; printed beside the
    measured times at the end)."""
    from dlzo.architectures import get_architecture, layer_params, lora_params, total_params

    c = BUDGET_RATES["cuda" if device_type == "cuda" else "cpu"]
    out = {"rates": c, "steps": steps, "limit_s": limit_s, "models": {}}
    total = 0.0
    for name in models:
        arch = get_architecture(name, divisor)
        nbytes = 2 if device_type == "cuda" else 4
        P, Lp, L = total_params(arch), layer_params(arch), arch["num_hidden_layers"]
        head = arch["vocab_size"] * arch["hidden_size"]
        fwd = lambda params, tokens: max(2 * params * tokens / (c["tflops"] * 1e12),  # noqa: E731
                                         params * nbytes / (c["tbps"] * 1e12))
        passes = lambda params, n: n * params * nbytes / (c["tbps"] * 1e12)  # noqa: E731
        build = c["start_s"] + c["build_s"] + c["build_s_per_gb"] * P * nbytes / 1e9
        m = {"build_s": build, "modes": {}}
        model_total = build
        for t in tasks:
            sh = paper_shape(t)
            tok = sh["sequences"] * sh["tokens"]
            lora = lora_params(arch, PAPER_LORA["r"])
            step = {"inference": fwd(L * Lp, tok),
                    "mezo_faithful_full": 2 * fwd(L * Lp + head, tok) + passes(P, 20),
                    "full": 2 * fwd(L * Lp, tok) + passes(P, 10), "sparse_mezo": 2 * fwd(L * Lp, tok) + passes(P, 24),
                    "lora_zo": 2.2 * fwd(L * Lp, tok) + passes(lora, 10)}
            setup = {"sparse_mezo": passes(P, 4), "lora_zo": 2.0}
            for layer in layers[name]:
                suffix = 2 * fwd((L - layer) * Lp, tok)
                step.update({f"layer@{layer}": suffix + passes(Lp, 10), f"layer_paired@{layer}": suffix + passes(Lp, 10),
                             f"floor@{layer}": suffix})
                setup[f"layer@{layer}"] = setup[f"layer_paired@{layer}"] = setup[f"floor@{layer}"] = fwd(layer * Lp, tok)
            for key, s in step.items():
                est = c["mode_overhead_s"] + setup.get(key, 0.0) + (steps + 1) * (s + c["step_overhead_s"])
                m["modes"][f"{t}/{key}"] = {"step_s": s + c["step_overhead_s"], "total_s": est}
                model_total += est
        m["total_s"] = model_total
        out["models"][name] = m
        total += model_total
    out["total_s"] = total
    out["fits"] = total <= limit_s
    return out


def _print_budget(b: dict, device_type: str) -> None:
    c = b["rates"]
    print(f"time budget ({'GPU' if device_type == 'cuda' else 'CPU, rough'}: {c['tflops']:g} TFLOP/s, "
          f"{c['tbps']:g} TB/s achieved; {b['steps']} timed steps + 1 warm-up per mode), limit {b['limit_s']:.0f} s:")
    for name, m in b["models"].items():
        print(f"  {name}: process start + build {m['build_s']:.0f} s; modes {m['total_s'] - m['build_s']:.0f} s "
              f"({len(m['modes'])} mode x shape); model total {m['total_s']:.0f} s")
        for key, v in m["modes"].items():
            print(f"    {key:28s} ~{v['step_s']:.3f} s/step, {v['total_s']:.1f} s")
    print(f"  estimated total {b['total_s']:.0f} s of {b['limit_s']:.0f} s"
          + ("" if b["fits"] else "  (OVER the limit: modes past --time-limit are skipped)"), flush=True)


def _resolve_dominant(name: str, pinned: dict[str, int], probe_dir: str | None) -> tuple[int | None, str]:
    from pathlib import Path

    if name in pinned:
        return pinned[name], "--dominant"
    probe = Path(probe_dir) / name / "probe.json" if probe_dir else None
    if probe is not None and probe.exists():
        first = read_json(probe, "probe result").get("first_outlier_layer")
        if first is not None:
            return int(first), f"probe: {probe}"
    if name in PAPER_DOMINANT:
        return PAPER_DOMINANT[name], "paper [S]: LLaMA2-7B's dominant layer is 1 (SPEC.md), its first massive-activation layer"
    return None, ("not known: SPEC.md says Qwen3-8B's dominant layer is measured by the pipeline's probe, and random "
                  "weights have no outliers to probe; pass --dominant qwen3-8b=<i> or a probe.json under --probe-dir. "
                  "Only layer 1 is timed: a later layer runs fewer layers per step, so layer 1 bounds its step time")


def paper_scale_bench(models: list[str], tasks: list[str], steps: int, divisor: int, device: str, out: str,
                      threads: int | None, sparsity: float, limit_s: float, pinned: dict[str, int],
                      probe_dir: str | None) -> int:
    """The --paper-scale run (see the module docstring); writes ``out`` after each model; 0 when every mode ran."""
    import platform

    t0, deadline = time.perf_counter(), time.time() + limit_s
    device_type = "cuda" if (device in ("auto", "cuda") or device.startswith("cuda")) and torch.cuda.is_available() \
        else "cpu"
    if divisor == 1 and device_type != "cuda":
        print("dlzo.bench: no CUDA GPU: --paper-scale builds LLaMA2-7B and Qwen3-8B at full size (13-17 GB of "
              "half-precision weights) and times them on a GPU; run with --scaled 64 on CPU (the same architectures, "
              "widths divided by 64, fp32)", file=sys.stderr)
        return 2
    dominant = {name: _resolve_dominant(name, pinned, probe_dir) for name in models}
    layers = {name: [1] + ([d] if d is not None and d != 1 else []) for name, (d, _) in dominant.items()}
    budget = paper_budget(models, tasks, steps, divisor, device_type, layers, limit_s)
    _print_budget(budget, device_type)
    try:
        import peft
        import transformers
        versions = {"transformers": transformers.__version__, "peft": peft.__version__}
    except ImportError:
        versions = {}
    res = {"bench": "paper-scale", "scaled": divisor if divisor != 1 else None, "steps": steps,
           "device_type": device_type, "torch": torch.__version__, "cuda": torch.version.cuda, **versions,
           "python": platform.python_version(), "host": platform.node(),
           "shapes": {t: paper_shape(t) for t in tasks}, "sparsity": sparsity, "lora": PAPER_LORA,
           "paper_speedup_vs_mezo": {"model": "llama2-7b", **PAPER_SPEEDUP,
                                     "note": "end-to-end training speedup of the dominant layer vs MeZO (Table 4 [S])"},
           "design": "one spawned process per model: built once on the device with random weights "
                     "(dlzo.models.build_random), every (mode, shape) measured in turn: set up, peak reset, 1 warm-up "
                     f"+ {steps} timed steps (synchronized), median; GPU peak = max_memory_allocated since the reset",
           "budget": budget, "models": {}, "summary": []}
    ctx = mp.get_context("spawn")
    failed = False
    for name in models:
        d, source = dominant[name]
        print(f"{name}: building ({'scaled 1/' + str(divisor) if divisor != 1 else 'full size'}), "
              f"layers {layers[name]}, dominant layer {d} ({source.split(':')[0]})", flush=True)
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_paper_worker, args=(name, divisor, device, steps, tasks, layers[name], sparsity,
                                                       threads, deadline, child))
        proc.start()
        status, payload = ("error", "worker exited without a result")
        if parent.poll(max(60.0, deadline - time.time() + 120.0)):
            try:
                status, payload = parent.recv()
            except EOFError:
                pass
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
        if status != "ok":
            failed = True
            res["models"][name] = {"error": payload, "dominant_layer": d, "dominant_source": source}
            print(f"{name}: FAILED\n{payload}", flush=True)
            write_json(out, res)
            continue
        payload.update(dominant_layer=d, dominant_source=source)
        paper_ratios(payload, name, d)
        res["models"][name] = payload
        res["device"] = payload["device_name"]
        for task, sh in payload["shapes"].items():
            failed |= any("s" not in m for m in sh["modes"].values())
            modes = sh["modes"]
            get = lambda k, f="s": modes.get(k, {}).get(f)  # noqa: E731
            row = {"model": name, "task": task, "batch": sh["batch"], "dtype": payload["dtype"],
                   "mezo_faithful_full_s": get("mezo_faithful_full"), "full_s": get("full"),
                   "layer1_s": get("layer@1"), "layer1_paired_s": get("layer_paired@1"),
                   "dominant_layer": d, "dominant_s": get(f"layer@{d}") if d is not None else None,
                   "dominant_paired_s": get(f"layer_paired@{d}") if d is not None else None,
                   "lora_zo_s": get("lora_zo"), "sparse_mezo_s": get("sparse_mezo"), **sh["speedups"],
                   "peak_vs_inference": {k: m.get("peak_vs_inference") for k, m in modes.items()}}
            res["summary"].append(row)
        print(f"{name}: built in {payload['build_s']:.1f} s, measured in {payload['wall_s']:.1f} s "
              f"(budget {budget['models'][name]['total_s']:.0f} s)", flush=True)
        write_json(out, res)
    res["elapsed_s"] = time.perf_counter() - t0
    write_json(out, res)
    _print_paper_summary(res)
    print(f"elapsed {res['elapsed_s']:.0f} s (budget {budget['total_s']:.0f} s, limit {limit_s:.0f} s); wrote {out}")
    return 1 if failed else 0


def _print_paper_summary(res: dict) -> None:
    fmt = lambda x, f="{:.4f}": "-" if x is None else f.format(x)  # noqa: E731
    print(f"device {res.get('device', '?')}, torch {res['torch']}, CUDA {res['cuda']}"
          + (f", architectures scaled 1/{res['scaled']}" if res["scaled"] else ""))
    for name, m in res["models"].items():
        if "shapes" not in m:
            continue
        print(f"{name} ({m['dtype']}, {m['params_built'] / 1e9:.3f}B params, weights {m['weights_mb']:.0f} MB, "
              f"dominant layer {m['dominant_layer']})")
        for task, sh in m["shapes"].items():
            sp = sh["speedups"]
            print(f"  {task} batch {sh['batch'][0]}x{sh['batch'][1]}: dominant vs MeZO "
                  f"{fmt(sp['dominant_speedup_vs_mezo'], '{:.2f}x')} (paired {fmt(sp['dominant_paired_speedup_vs_mezo'], '{:.2f}x')}), "
                  f"layer 1 {fmt(sp['layer1_speedup_vs_mezo'], '{:.2f}x')}; paper {fmt(sp['paper_speedup_vs_mezo'], '{:.2f}x')}")
            print(f"    {'mode':24s} {'s/step':>9s} {'vs MeZO':>8s} {'peak MB':>10s} {'vs inf':>7s}")
            for key, r in sh["modes"].items():
                if "s" not in r:
                    print(f"    {key:24s} {r.get('error') or r.get('skipped')}")
                    continue
                print(f"    {key:24s} {r['s']:9.4f} {fmt(r['speedup_vs_mezo'], '{:.2f}x'):>8s} {r['peak_mb']:10.0f} "
                      f"{fmt(r['peak_vs_inference'], '{:.3f}'):>7s}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="the model folder (every mode but --paper-scale)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--probe", default=None, help="probe.json: also measure the probe's layer")
    ap.add_argument("--layers", type=int, nargs="*", default=[1])
    ap.add_argument("--steps", type=int, default=None, help="timed steps per mode after one warm-up (default 5; "
                                                             "--paper-scale: 3)")
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
    pa = ap.add_argument_group("--paper-scale: LLaMA2-7B and Qwen3-8B at their published shapes, random weights")
    pa.add_argument("--paper-scale", action="store_true",
                    help="time every method's ZO step on the paper's models built on the GPU (see above; `make gpu-bench`)")
    pa.add_argument("--scaled", type=int, default=1, metavar="DIVISOR",
                    help="--paper-scale: widths divided by DIVISOR (same depth and vocabulary), for CPU: fp32")
    pa.add_argument("--models", nargs="+", choices=sorted(PAPER_MODELS), default=list(PAPER_MODELS))
    pa.add_argument("--tasks", nargs="+", choices=sorted(PAPER_SPEEDUP), default=list(PAPER_SPEEDUP),
                    help="--paper-scale: MeZO's batches of these tasks (paper_shape)")
    pa.add_argument("--time-limit", type=float, default=PAPER_LIMIT_S,
                    help="--paper-scale: seconds from the start after which no new mode starts (the JSON says which)")
    pa.add_argument("--dominant", nargs="*", default=[], metavar="MODEL=LAYER",
                    help="--paper-scale: a model's dominant layer (else its probe.json under --probe-dir, else the "
                         "paper's: LLaMA2-7B 1)")
    pa.add_argument("--probe-dir", default="results/probe", help="--paper-scale: <dir>/<model>/probe.json")
    a = ap.parse_args(argv)
    if a.paper_scale:
        try:
            pinned = {k: int(v) for k, v in (x.split("=", 1) for x in a.dominant)}
        except ValueError:
            ap.error("--dominant takes MODEL=LAYER, e.g. qwen3-8b=3")
        return paper_scale_bench(a.models, a.tasks, 3 if a.steps is None else a.steps, a.scaled, a.device, a.out,
                                 a.threads, a.sparsity, a.time_limit, pinned, a.probe_dir)
    if not a.model:
        ap.error("--model is required (except with --paper-scale)")
    if a.steps is None:
        a.steps = 5
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
