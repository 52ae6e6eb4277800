"""Stage ``zo_train``: fine-tuning of one (model, task, method, seed): ZO-SGD and the first-order baselines.

ZO-SGD methods: ``mezo-full`` (every parameter), ``layer-<i>`` (all parameters of decoder layer i),
``dominant`` (layer-i with i from the probe, or pinned), ``lora-zo`` (LoRA on q_proj/v_proj in every
layer), ``layer-<i>-lora`` / ``dominant-lora`` (LoRA inside one layer), ``sparse-mezo`` (MeZO on the
smallest-magnitude weights of every tensor: a fixed mask, ``--sparsity`` = the fraction left frozen).
First-order baselines (backpropagation, ``torch.optim.AdamW``): ``fo-adamw`` (every parameter) and
``fo-layer-<i>`` (only decoder layer i requires grad); fp32 master weights, bf16 autocast on GPU.

Outputs in ``--out`` (a run folder):
  trajectory.jsonl   header line, then one line per step. ZO: (seed, g, lr, losses), and replaying it
                     on the base model rebuilds the tuned weights exactly. FO: (loss, lr, grad norm), a record.
  tuned.safetensors  the tuned tensors at the checkpoint with the lowest dev loss
  log.json           curves, timing (s/step split into forward, perturbation or backward, update), the
                     chosen checkpoint, config, provenance, and memory: ``peak_memory_mb`` (training) and
                     ``inference_peak_mb`` (inference on the same model and first batch)
Memory is GPU peak allocation, or on CPU the process's peak RSS. ``inference_peak_mb`` is measured in
this process before anything of training exists: the model loaded, one no-grad forward of the first
training batch (CPU peak RSS only grows, so it must come first; on GPU the peak is reset after it).
``peak_memory_mb`` is taken when the training loop ends, before the best checkpoint is rebuilt or saved.

Resume: ZO runs grow ``trajectory.partial.jsonl``; a rerun after an interruption (preemption, SIGTERM)
replays it and continues. FO runs, on SIGTERM/SIGINT, finish the step and save weights and AdamW state
to ``fo_state.partial.pt`` (the best checkpoint so far is in ``best.partial.safetensors``); a rerun loads
them and continues. Either way the result is bit-identical to an uninterrupted run on CPU. An FO run
killed without a signal (SIGKILL, out of memory) starts over.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import json
import math
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dlzo import DLZOError
from dlzo.io import atomic_path, read_json, read_jsonl, write_json
from dlzo.methods import parse_method, resolve_layer
from dlzo.models import add_lora, check_layer, load_model, load_tokenizer, tuned_parameters
from dlzo.objectives import FrozenPrefix, batch_indices, make_batch, measure_inference, paired_loss
from dlzo.objectives import loss as objective_loss
from dlzo.runtime import add_runtime_args, peak_memory_mb, pick_device, pick_dtype, provenance, set_threads
from dlzo.zo import NonFiniteLoss, ZOSGD, param_groups

LORA_TARGETS = ["q_proj", "v_proj"]
FO_KINDS = ("fo-full", "fo-layer")
SINGLE_LAYER_KINDS = ("layer", "layer-lora", "fo-layer")


def resolve_method(method: str, probe_path: str | None, pinned: int | None, model_name: str):
    """(kind, layer, how): kind in mezo-full, sparse-mezo, lora-zo, layer, layer-lora, fo-full, fo-layer."""
    m = parse_method(method)
    layer, how = resolve_layer(m, probe_path, pinned, model_name)
    return m.kind, layer, how


def weights_dtype(requested: str, device: torch.device, kind: str) -> torch.dtype:
    """ZO: the runtime's choice (fp16 on GPU). FO: fp32 master weights unless bf16 is asked for (AdamW's
    steps fall below half precision's resolution); fp16 is refused (AdamW without loss scaling)."""
    if kind not in FO_KINDS:
        return pick_dtype(requested, device)
    dtype = pick_dtype(requested, device, gpu_default="fp32")
    if dtype == torch.float16:
        raise DLZOError("first-order methods need fp32 (auto) or bf16 weights, not fp16 (AdamW without loss "
                        "scaling): set runtime.dtype (--dtype) to auto, fp32 or bf16")
    return dtype


def amp_context(amp: str, device: torch.device, kind: str):
    """(name, context factory): bf16 autocast for FO on GPU (the paper's FO precision); ZO never autocasts."""
    if amp == "auto":
        amp = "bf16" if kind in FO_KINDS and device.type == "cuda" else "off"
    if amp == "off":
        return amp, contextlib.nullcontext
    if kind not in FO_KINDS:
        raise DLZOError(f"--amp {amp} is for the first-order methods; ZO methods compute in --dtype")
    return amp, lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def zo_optimizer(named, kind: str, lr: float, eps: float, weight_decay: float, seed: int, restore: str,
                 sparsity: float | None = None) -> ZOSGD:
    """The run's ZO-SGD: the same for training, rebuilding the best checkpoint and evaluation's replay."""
    masks_at = sparsity if kind == "sparse-mezo" else None
    return ZOSGD(param_groups(named, weight_decay, masks_at), lr=lr, eps=eps, weight_decay=weight_decay,
                 seed=seed, restore=restore)


def build(model_dir, kind: str, layer: int | None, device, dtype, lora_r: int, lora_alpha: int, seed: int,
          where: str = "--method"):
    model = load_model(model_dir, device, dtype)
    if layer is not None:
        check_layer(layer, model, where)
    if kind in ("lora-zo", "layer-lora"):
        model = add_lora(model, layer if kind == "layer-lora" else None, lora_r, lora_alpha, LORA_TARGETS, seed)
    named = tuned_parameters(model, kind, layer)
    return model, named


def _mean_loss(model, tokenizer, records, objective, device, batch_size, max_len,
               amp=contextlib.nullcontext, share_prompt: bool = False) -> float:
    total, n = 0.0, 0
    with torch.no_grad(), amp():
        for i in range(0, len(records), batch_size):
            chunk = records[i:i + batch_size]
            batch = make_batch(tokenizer, chunk, objective, device, max_len, share_prompt)
            total += float(objective_loss(model, batch)) * len(chunk)
            n += len(chunk)
    return total / max(n, 1)


class _Stop:
    """SIGTERM/SIGINT (preemption): finish the current step, flush the trajectory, exit non-zero."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.signal = signum


def _now(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _header(args, kind, layer, how, n_params) -> dict:
    keys = ("model", "data", "task", "method", "seed", "steps", "lr", "eps", "weight_decay", "batch_size",
            "lora_r", "lora_alpha", "max_len", "restore", "prefix_cache", "paired_suffix", "dtype", "sparsity", "amp",
            "max_grad_norm")
    cfg = {k: getattr(args, k) for k in keys}
    if args.scoring != "per-sequence":  # only when set: runs from before the option keep their hash (and resume)
        cfg["scoring"] = args.scoring
    cfg.update(kind=kind, layer=layer, layer_from=how, tuned_params=n_params)
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"header": cfg, "config_hash": digest}


def _read_partial(path: Path, header: dict) -> list[dict]:
    """Steps of an interrupted run with the same config; [] when there is none or it does not match."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    try:
        head = json.loads(lines[0])
    except (IndexError, json.JSONDecodeError):
        return []
    if head.get("config_hash") != header["config_hash"]:
        print(f"zo_train: {path} belongs to another config; starting over", file=sys.stderr)
        return []
    steps = []
    for line in lines[1:]:
        try:
            steps.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by the interruption: everything before it is good
    return steps


class _Run:
    """What every method's loop shares: data, model, tuned tensors, batches, dev loss, output folder."""

    def __init__(self, args):
        from dlzo.tasks import get_task

        self.started = time.time()
        self.args = args
        set_threads(args.threads)
        self.device = pick_device(args.device)
        self.task = get_task(args.task)
        data = Path(args.data)
        self.train_rows, self.dev_rows = read_jsonl(data / "train.jsonl"), read_jsonl(data / "dev.jsonl")
        if not self.train_rows:
            raise DLZOError(f"{data / 'train.jsonl'} is empty: nothing to train on")
        self.kind, self.layer, self.how = resolve_method(args.method, args.probe, args.layer, args.model_name)
        self.fo = self.kind in FO_KINDS
        self.share_prompt = args.scoring == "shared-prompt"
        self.dtype = weights_dtype(args.dtype, self.device, self.kind)
        args.amp, self.amp = amp_context(args.amp, self.device, self.kind)
        if self.fo and args.save_tuned == "replay":
            raise DLZOError(f"--save-tuned replay: {args.method} is first-order, its steps cannot be replayed")
        self.model, self.named = self.build()
        self.tokenizer = load_tokenizer(args.model)
        self.n_params = sum(p.numel() for _, p in self.named)
        for _, p in self.named:
            p.requires_grad_(False)
        self.bs = min(args.batch_size, len(self.train_rows))
        self.per_epoch = max(1, len(self.train_rows) // self.bs)
        if args.epochs:
            args.steps = args.epochs * self.per_epoch
        if args.eval_every == 0:
            args.eval_every = self.per_epoch
        # first, before any training state exists (optimizer, masks, saved copies, the prefix cache)
        self.inference_peak_mb = measure_inference(self.model, self.batch(0), self.device, self.amp)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.dev_eval = self.dev_rows[: args.dev_eval_size] if args.dev_eval_size else self.dev_rows
        if args.prefix_cache == "auto":
            single = self.kind in SINGLE_LAYER_KINDS and not FrozenPrefix.supported(self.model, self.layer)
            args.prefix_cache = "dataset" if single else "off"
        if args.paired_suffix == "auto":
            args.paired_suffix = "on" if args.prefix_cache != "off" and self.device.type == "cuda" and not self.fo else "off"
        if args.paired_suffix == "on" and (args.prefix_cache == "off" or self.fo):
            raise DLZOError(f"--paired-suffix on needs a zeroth-order single-layer method with a prefix cache "
                            f"(--prefix-cache dataset or batch), not {args.method} with --prefix-cache {args.prefix_cache}")

    def build(self):
        a = self.args
        return build(a.model, self.kind, self.layer, self.device, self.dtype, a.lora_r, a.lora_alpha, a.seed)

    def batch(self, step: int):
        idx = batch_indices(len(self.train_rows), self.bs, self.args.seed, step)
        return make_batch(self.tokenizer, [self.train_rows[i] for i in idx], self.task.objective, self.device,
                          self.args.max_len, self.share_prompt)

    def dev_loss(self) -> float:
        a = self.args
        if not self.dev_eval:
            return float("nan")
        return _mean_loss(self.model, self.tokenizer, self.dev_eval, self.task.objective, self.device,
                          a.eval_batch_size, a.max_len, self.amp, self.share_prompt)

    def prefix(self):
        """The frozen-prefix cache of single-layer methods (None for the others)."""
        a, mode = self.args, self.args.prefix_cache
        if mode == "off":
            return None
        if self.kind not in SINGLE_LAYER_KINDS:
            raise DLZOError(f"--prefix-cache {mode} needs a single-layer method, not {a.method}")
        prefix = FrozenPrefix(self.model, self.layer, mode)
        if mode == "dataset":  # fixed chunks in file order: the same bits however the run is resumed
            with self.amp():
                prefix.fill(make_batch(self.tokenizer, self.train_rows[i:i + a.eval_batch_size], self.task.objective,
                                       self.device, a.max_len, self.share_prompt)
                            for i in range(0, len(self.train_rows), a.eval_batch_size))
        return prefix

    def bar(self, start: int):
        a = self.args
        return tqdm(range(start, a.steps), desc=f"{a.task} {a.method} seed {a.seed}", initial=start,
                    total=a.steps, file=sys.stderr, mininterval=2.0)

    def checkpoint(self, done_steps: int, dev_curve: list, best: dict) -> bool | None:
        """At eval points, append the dev loss and return whether this state is the new best checkpoint;
        None between eval points."""
        if done_steps % self.args.eval_every and done_steps != self.args.steps:
            return None
        dl = self.dev_loss()
        dev_curve.append({"step": done_steps, "dev_loss": dl})
        if not self.dev_eval or dl < best["dev_loss"]:  # no dev split: keep the last state
            best.update(step=done_steps, dev_loss=dl)
            return True
        return False

    def finish(self, traj: list, best: dict, dev_curve: list, resumed_from: int, step_times: list, hyper: dict,
               timing: dict, train_peak: float, tuned_params: int) -> dict:
        """Write trajectory.jsonl and log.json (tuned.safetensors is already in place)."""
        a = self.args
        with atomic_path(self.out / "trajectory.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in traj))
        steps_run = len(step_times)
        train_curve = [{"step": r["step"], "loss": r["loss"] if "loss" in r else (r["loss_plus"] + r["loss_minus"]) / 2}
                       for r in traj[1:]]
        result = {
            "model": a.model_name, "task": a.task, "method": a.method, "seed": a.seed,
            "kind": self.kind, "layer": self.layer, "layer_from": self.how, "tuned_params": tuned_params,
            "tensor_params": self.n_params,
            "lora": {"r": a.lora_r, "alpha": a.lora_alpha, "targets": LORA_TARGETS} if "lora" in self.kind else None,
            "hyper": hyper,
            "best_step": best["step"], "best_dev_loss": best["dev_loss"],
            "dev_curve": dev_curve, "train_curve": train_curve,
            "resumed_from_step": resumed_from,
            "timing": {
                "steps_timed": steps_run,
                "s_per_step": float(np.mean(step_times)) if step_times else None,
                "s_per_step_median": float(np.median(step_times)) if step_times else None,
                "train_s": float(np.sum(step_times)),
                **{f"{k[:-2]}_s_per_step": (v / steps_run if steps_run else None) for k, v in timing.items()},
            },
            "peak_memory_mb": train_peak,
            "inference_peak_mb": self.inference_peak_mb,
            "peak_memory_vs_inference": train_peak / self.inference_peak_mb if self.inference_peak_mb else None,
            "provenance": provenance(self.device, self.dtype, self.started, config=vars(a), amp=a.amp),
        }
        write_json(self.out / "log.json", result)
        return result


def train(args) -> dict:
    run = _Run(args)
    return _train_fo(run) if run.fo else _train_zo(run)


def _train_zo(run: _Run) -> dict:
    args, kind, out = run.args, run.kind, run.out
    restore = args.restore if args.restore != "auto" else ("mezo" if kind in ("mezo-full", "sparse-mezo") else "exact")
    args.restore = restore
    make_opt = lambda named: zo_optimizer(named, kind, args.lr, args.eps, args.weight_decay, args.seed,  # noqa: E731
                                          restore, args.sparsity)
    opt = make_opt(run.named)
    tuned = run.n_params
    if kind == "sparse-mezo":
        tuned = sum(int(m.sum()) for g in opt.param_groups for m in g["masks"])
    partial = out / "trajectory.partial.jsonl"
    header = _header(args, kind, run.layer, run.how, run.n_params)
    done = _read_partial(partial, header)[: args.steps]
    resumed_from = len(done)
    log_path = out / "log.partial.json"
    state = read_json(log_path) if resumed_from and log_path.exists() else {}
    dev_curve = state.get("dev_curve", [])
    best = state.get("best", {"step": 0, "dev_loss": math.inf})
    if not dev_curve:  # step 0 is the untrained model's: measured before replaying a run cut before its 1st checkpoint
        dev_curve.append({"step": 0, "dev_loss": run.dev_loss()})
        write_json(log_path, {"dev_curve": dev_curve})
    opt.replay(done)
    with open(partial, "w") as fh:  # rewrite: drops a cut last line, keeps every good step
        fh.write(json.dumps(header) + "\n")
        for rec in done:
            fh.write(json.dumps(rec) + "\n")

    prefix, model = run.prefix(), run.model

    stop = _Stop()
    step_times = []
    diverged_at = None
    bar = run.bar(resumed_from)
    with open(partial, "a") as fh:
        for step in bar:
            batch = run.batch(step)
            t0 = time.perf_counter()
            try:
                if args.paired_suffix == "on":
                    opt.step(pair_closure=lambda up, down: paired_loss(batch, prefix, up, down))
                else:
                    opt.step(lambda: objective_loss(model, batch, prefix))
            except NonFiniteLoss as err:
                fh.flush()
                if args.on_nonfinite == "stop":  # a grid point too large: keep the best checkpoint before it
                    diverged_at = err.step
                    print(f"zo_train: {err}; stopping (--on-nonfinite stop): the result is the best dev "
                          f"checkpoint before step {err.step}", file=sys.stderr)
                    break
                raise DLZOError(f"{err}; the trajectory up to step {err.step - 1} is kept in {partial}. "
                                f"Lower the learning rate (or eps) and rerun") from err
            step_times.append(time.perf_counter() - t0)
            rec = opt.trajectory[-1]
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            bar.set_postfix(loss=f"{(rec['loss_plus'] + rec['loss_minus']) / 2:.4f}", g=f"{rec['g']:.3g}")
            done_steps = step + 1
            if run.checkpoint(done_steps, dev_curve, best) is not None:
                write_json(log_path, {"dev_curve": dev_curve, "best": best})
            if stop.signal is not None:
                fh.flush()
                print(f"zo_train: signal {stop.signal} after step {done_steps}; trajectory saved in {partial}. "
                      f"Rerun to resume.", file=sys.stderr)
                sys.exit(128 + stop.signal)
    bar.close()
    train_peak = peak_memory_mb(run.device)

    traj = [json.loads(x) for x in partial.read_text().splitlines()]
    save_tuned = args.save_tuned
    if save_tuned == "auto":  # a 7B model's every weight is 13 GB per run: replay its trajectory instead
        save_tuned = "tensors" if run.n_params <= 5e8 else "replay"
    tensors = {}
    if save_tuned == "tensors":
        named = run.named
        if best["step"] != args.steps:  # the best checkpoint is an earlier state: rebuild it exactly
            _, named = run.build()
            make_opt(named).replay(traj[1:best["step"] + 1])
        tensors = {n: p.detach().to("cpu").contiguous() for n, p in named}
    _save_tuned(out / "tuned.safetensors", tensors, args.method, best["step"], replay=save_tuned == "replay")
    hyper = {"steps": args.steps, "lr": args.lr, "eps": args.eps, "weight_decay": args.weight_decay,
             "batch_size": run.bs, "max_len": args.max_len, "restore": restore, "prefix_cache": args.prefix_cache,
             "paired_suffix": args.paired_suffix, "scoring": args.scoring}
    if kind == "sparse-mezo":
        hyper["sparsity"] = args.sparsity
    if diverged_at is not None:
        hyper["diverged_at_step"] = diverged_at
    result = run.finish(traj, best, dev_curve, resumed_from, step_times, hyper, opt.timing, train_peak, tuned)
    partial.unlink(missing_ok=True)
    log_path.unlink(missing_ok=True)
    return result


def _save_tuned(path: Path, tensors: dict, method: str, best_step: int, replay: bool = False) -> None:
    from safetensors.torch import save_file

    # one metadata key: safetensors writes its metadata map in a random order per process, so three keys
    # gave the same tensors under different file bytes
    info = json.dumps({"method": method, "best_step": best_step, "replay": replay}, sort_keys=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"dlzo": info})


def _train_fo(run: _Run) -> dict:
    """AdamW through backpropagation on the tuned tensors (every one, or one decoder layer's)."""
    args, out, device, model = run.args, run.out, run.device, run.model
    args.restore = None
    params = [p for _, p in run.named]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(param_groups(run.named, args.weight_decay), lr=args.lr, weight_decay=args.weight_decay)
    header = _header(args, run.kind, run.layer, run.how, run.n_params)
    header["header"]["optimizer"] = "adamw"
    state_path, best_path = out / "fo_state.partial.pt", out / "best.partial.safetensors"
    records, dev_curve, best, start = [], [], {"step": 0, "dev_loss": math.inf}, 0
    if state_path.exists():
        st = torch.load(state_path, map_location=device, weights_only=True)
        if st.get("config_hash") == header["config_hash"] and (best_path.exists() or not st["best"]["step"]):
            with torch.no_grad():
                for n, p in run.named:
                    p.copy_(st["params"][n])
            opt.load_state_dict(st["opt"])
            records, dev_curve, best, start = st["records"], st["dev_curve"], st["best"], st["step"]
        else:
            print(f"zo_train: {state_path} belongs to another config; starting over", file=sys.stderr)
    prefix = run.prefix()
    if not dev_curve:
        dev_curve.append({"step": 0, "dev_loss": run.dev_loss()})

    stop = _Stop()
    step_times, timing = [], {"forward_s": 0.0, "backward_s": 0.0, "update_s": 0.0}
    bar = run.bar(start)
    for step in bar:
        batch = run.batch(step)
        t0 = _now(device)
        with run.amp():
            loss = objective_loss(model, batch, prefix)
        t1 = _now(device)
        value = loss.item()
        if not math.isfinite(value):
            raise DLZOError(f"non-finite training loss at step {step} ({value}): lower the learning rate and rerun")
        loss.backward()
        t2 = _now(device)
        norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm) if args.max_grad_norm > 0 else None
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = _now(device)
        del loss
        for key, dt in (("forward_s", t1 - t0), ("backward_s", t2 - t1), ("update_s", t3 - t2)):
            timing[key] += dt
        step_times.append(t3 - t0)
        records.append({"step": step, "loss": value, "lr": opt.param_groups[0]["lr"],
                        "grad_norm": float(norm) if norm is not None else None})
        bar.set_postfix(loss=f"{value:.4f}")
        done_steps = step + 1
        if run.checkpoint(done_steps, dev_curve, best):
            _save_tuned(best_path, {n: p.detach().to("cpu").contiguous() for n, p in run.named}, args.method,
                        done_steps)
        if stop.signal is not None:
            with atomic_path(state_path) as tmp:
                torch.save({"config_hash": header["config_hash"], "step": done_steps, "records": records,
                            "dev_curve": dev_curve, "best": best, "opt": opt.state_dict(),
                            "params": {n: p.detach() for n, p in run.named}}, tmp)
            print(f"zo_train: signal {stop.signal} after step {done_steps}; weights and AdamW state saved in "
                  f"{state_path}. Rerun to resume.", file=sys.stderr)
            sys.exit(128 + stop.signal)
    bar.close()
    train_peak = peak_memory_mb(device)
    os.replace(best_path, out / "tuned.safetensors")
    hyper = {"optimizer": "adamw", "steps": args.steps, "epochs": args.epochs, "lr": args.lr,
             "weight_decay": args.weight_decay, "betas": list(opt.defaults["betas"]), "adam_eps": opt.defaults["eps"],
             "max_grad_norm": args.max_grad_norm, "schedule": "constant", "batch_size": run.bs,
             "max_len": args.max_len, "prefix_cache": args.prefix_cache, "amp": args.amp, "scoring": args.scoring,
             "weights_dtype": str(run.dtype).replace("torch.", "")}
    result = run.finish([header, *records], best, dev_curve, start, step_times, hyper, timing, train_peak,
                        run.n_params)
    state_path.unlink(missing_ok=True)
    return result


def load_tuned_model(model_dir, run_dir, device, dtype):
    """The base model with a training run's best checkpoint applied (LoRA merged into the weights)."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    log = read_json(run_dir / "log.json", "training log")
    model, named = build(model_dir, log["kind"], log["layer"], device, dtype,
                         (log.get("lora") or {}).get("r", 8), (log.get("lora") or {}).get("alpha", 16), log["seed"])
    from safetensors import safe_open

    with safe_open(str(run_dir / "tuned.safetensors"), "pt") as fh:
        meta = fh.metadata() or {}
    info = json.loads(meta["dlzo"]) if "dlzo" in meta else meta  # earlier versions wrote three keys
    if info.get("replay") in (True, "true"):  # rebuild the best checkpoint from the trajectory, bit for bit
        hyper = log["hyper"]
        traj = read_jsonl(run_dir / "trajectory.jsonl")[1:]
        zo_optimizer(named, log["kind"], hyper["lr"], hyper["eps"], hyper["weight_decay"], log["seed"],
                     hyper["restore"], hyper.get("sparsity")).replay(traj[: log["best_step"]])
        return _finish(model)
    tensors = load_file(str(run_dir / "tuned.safetensors"))
    params = dict(named)
    missing = set(params) - set(tensors)
    if missing:
        raise DLZOError(f"{run_dir / 'tuned.safetensors'} lacks tuned tensors {sorted(missing)[:3]}...")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(p.device, p.dtype))
    return _finish(model)


def _finish(model):
    if hasattr(model, "merge_and_unload"):  # LoRA folded into the weights: a plain model for lm-eval
        model = model.merge_and_unload()
    model.eval()
    return model


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder (from download_model)")
    ap.add_argument("--model-name", default=None, help="the config's name for the model (messages, pins)")
    ap.add_argument("--data", required=True, help="prepared task folder with train.jsonl and dev.jsonl")
    ap.add_argument("--task", required=True)
    ap.add_argument("--method", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="run folder")
    ap.add_argument("--probe", default=None, help="probe.json (for dominant methods)")
    ap.add_argument("--layer", type=int, default=None, help="pin the dominant layer instead of the probe's")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=None,
                    help="instead of --steps: passes over the training set (steps = epochs x (train size // batch))")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=1000, help="steps between dev-loss checkpoints (0 = once an epoch)")
    ap.add_argument("--dev-eval-size", type=int, default=0, help="dev examples for checkpoint choice (0 = all)")
    ap.add_argument("--eval-batch-size", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=int, default=16)
    ap.add_argument("--restore", default="auto", choices=["auto", "mezo", "exact", "fused"],
                    help="auto: mezo (in place, four draws of z, as MeZO) for mezo-full, exact (copy back) "
                         "otherwise; fused: in place with three draws (restore and update share one)")
    ap.add_argument("--prefix-cache", default="auto", choices=["auto", "dataset", "batch", "off"],
                    help="single-layer methods: compute the frozen layers before the tuned one once per "
                         "training sequence (dataset), once per batch (batch), or every pass (off)")
    ap.add_argument("--paired-suffix", default="auto", choices=["auto", "on", "off"],
                    help="single-layer ZO methods with a prefix cache: run the two perturbed outputs of the "
                         "tuned layer through the layers after it as one double batch (auto: on CUDA, "
                         "where the bigger batch is faster; off on CPU, where it is not)")
    ap.add_argument("--scoring", default="per-sequence", choices=["per-sequence", "shared-prompt"],
                    help="objective 'candidates': one sequence per candidate, or (shared-prompt) one sequence per "
                         "example whose candidates differ only in their last token, each read at the sequence's "
                         "last position: the same loss up to float rounding, half the tokens for two candidates")
    ap.add_argument("--sparsity", type=float, default=0.75,
                    help="sparse-mezo: the fraction of each tensor left frozen; the rest, the smallest |w| of the "
                         "base model, is perturbed and updated")
    ap.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"],
                    help="first-order methods: bf16 autocast (auto: on GPU) over fp32 master weights")
    ap.add_argument("--max-grad-norm", type=float, default=1.0, help="first-order methods: clip (0 = off)")
    ap.add_argument("--on-nonfinite", default="error", choices=["error", "stop"],
                    help="ZO methods, a non-finite loss: fail (error), or end the run there and keep its best dev "
                         "checkpoint so far (stop: for grid searches, where a too-large lr is an outcome)")
    ap.add_argument("--save-tuned", default="auto", choices=["auto", "tensors", "replay"],
                    help="tuned.safetensors holds the tuned tensors, or only says to replay the trajectory "
                         "(auto: replay above 5e8 tuned parameters)")
    add_runtime_args(ap)
    args = ap.parse_args(argv)
    if args.lr <= 0 or args.eps <= 0 or args.steps <= 0:
        ap.error(f"--lr, --eps and --steps must be > 0 (got lr={args.lr}, eps={args.eps}, steps={args.steps})")
    if args.epochs is not None and args.epochs <= 0:
        ap.error(f"--epochs must be > 0 (got {args.epochs})")
    if not 0.0 <= args.sparsity < 1.0:
        ap.error(f"--sparsity is the frozen fraction of each tensor, in [0, 1) (got {args.sparsity})")
    if args.eval_every < 0 or args.max_grad_norm < 0:
        ap.error(f"--eval-every and --max-grad-norm must be >= 0 (got {args.eval_every}, {args.max_grad_norm})")
    args.model_name = args.model_name or Path(args.model).name
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        res = train(args)
    except DLZOError as err:
        print(f"zo_train: error: {err}", file=sys.stderr)
        return 1
    t = res["timing"]
    print(f"{args.task} {args.method} seed {args.seed}: best dev loss {res['best_dev_loss']:.4f} at step "
          f"{res['best_step']}, {t['s_per_step']:.3f} s/step, peak {res['peak_memory_mb']:.0f} MB "
          f"(inference {res['inference_peak_mb']:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
