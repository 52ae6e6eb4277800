"""Stage ``zo_train``: fine-tuning of one (model, task, method, seed): ZO-SGD and the first-order baselines.

ZO-SGD methods: ``mezo-full`` (every parameter), ``layer-<i>`` (all parameters of decoder layer i),
``dominant`` (layer-i with i from the probe, or pinned), ``lora-zo`` (LoRA on q_proj/v_proj in every
layer), ``layer-<i>-lora`` / ``dominant-lora`` (LoRA inside one layer), ``sparse-mezo`` (MeZO on the
smallest-magnitude weights of every tensor: a fixed mask, ``--sparsity`` = the fraction left frozen).
First-order baselines (backpropagation, ``torch.optim.AdamW``): ``fo-adamw`` (every parameter) and
``fo-layer-<i>`` (only decoder layer i requires grad); fp32 master weights, bf16 autocast on GPU.
The learning rate and eps are ``--lr``/``--eps``, or a grid's chosen point (``--selection``).

The code, top down: ``RunSpec`` is the run resolved once from the arguments (frozen: the method's kind
and layer, the steps, every 'auto'); ``Run`` holds what lives (data, model, tuned tensors, batches, dev
loss, outputs); ``fit`` is the one training loop (batch, step, record, dev checkpoint, stop on a signal)
and drives a ``ZOStepper`` or an ``FOStepper``, which own their optimizer, resume state and checkpoints.

Outputs in ``--out`` (a run folder):
  trajectory.jsonl   header line, then one line per step. ZO: (seed, g, lr, losses), and replaying it
                     on the base model rebuilds the tuned weights exactly. FO: (loss, lr, grad norm), a record.
  tuned.safetensors  the tuned tensors at the checkpoint with the lowest dev loss
  adapter/           LoRA runs (saved tensors): the same tensors as a standard peft adapter folder
  log.json           curves, timing (s/step split into forward, perturbation or backward, update), the
                     chosen checkpoint, config, provenance, and memory: ``peak_memory_mb`` (training) and
                     ``inference_peak_mb`` (inference on the same model and first batch)
Memory is GPU peak allocation, or on CPU the process's peak RSS. ``inference_peak_mb`` is measured in
this process before anything of training exists: the model loaded, one no-grad forward of the first
training batch (CPU peak RSS only grows, so it must come first; on GPU the peak is reset after it).
``peak_memory_mb`` is taken when the training loop ends, before the best checkpoint is rebuilt or saved.

Resume: ZO runs grow ``trajectory.partial.jsonl`` (one line per step, as it is taken) and the dev curve in
``log.partial.json``; a rerun after an interruption (preemption, SIGTERM, even SIGKILL) replays the saved
steps, none recomputed, and continues. FO runs, on SIGTERM/SIGINT, finish the step and save weights and
AdamW state to ``fo_state.partial.pt`` (the best checkpoint so far is in ``best.partial.safetensors``); a
rerun loads them and continues. Either way the result is bit-identical to an uninterrupted run on CPU. A
signal during the training loop ends the process with 128 + its number once the step is saved; before
the loop (the model loading, the saved steps replaying) its default action ends the process at once; after
the last dev checkpoint, the outputs are written and the run ends normally. An FO run killed without a
signal (SIGKILL, out of memory) starts over, or from the ``fo_state.partial.pt`` of an earlier signal.
Every file is written aside and renamed into place (``dlzo.io.atomic_path``), so a file that exists is
complete; a rerun removes the temporary files of a write cut by a kill. The outputs are written in the
order tuned.safetensors (adapter/), trajectory.jsonl, log.json, and only then are the partial files removed:
a run killed while it writes them is resumed by its rerun like any other.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dlzo import DLZOError
from dlzo.io import atomic_path, read_json, read_jsonl, write_json
from dlzo.methods import SAVE_TENSORS_UP_TO, Method, parse_method, resolve_layer
from dlzo.models import load_tokenizer
from dlzo.tuning import LORA_TARGETS, amp_context, build, save_adapter, weights_dtype, zo_optimizer
from dlzo.objectives import FrozenPrefix, batch_indices, make_batch, measure_inference, paired_loss
from dlzo.objectives import loss as objective_loss
from dlzo.runtime import add_runtime_args, peak_memory_mb, pick_device, provenance, set_threads
from dlzo.tokens import MAX_LEN
from dlzo.zo import NonFiniteLoss, param_groups

DEFAULT_LR, DEFAULT_EPS = 1e-6, 1e-3
# the run's config in the trajectory header; its hash decides whether a partial run resumes (keep the keys)
HASHED = ("model", "data", "task", "method", "seed", "steps", "lr", "eps", "weight_decay", "batch_size", "lora_r",
          "lora_alpha", "max_len", "restore", "prefix_cache", "paired_suffix", "dtype", "sparsity", "amp",
          "max_grad_norm")
# taken from the arguments as they are
ASKED = ("model", "model_name", "data", "task", "seed", "out", "epochs", "weight_decay", "batch_size",
         "dev_eval_size", "eval_batch_size", "max_len", "lora_r", "lora_alpha", "scoring", "sparsity", "dtype",
         "max_grad_norm", "on_nonfinite", "save_tuned")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run, resolved once from the parsed arguments and never changed: the method and its layer, the
    steps (``--epochs``), the eval period, lr and eps (``--selection``), and each 'auto' decided."""
    asked: dict              # the parsed arguments (provenance)
    method: Method
    layer: int | None
    layer_from: str | None   # 'method name', 'pinned', 'probe' or None
    device: torch.device
    torch_dtype: torch.dtype  # the weights' (``dtype`` is what was asked: hashed)
    n_train: int
    steps: int
    eval_every: int
    lr: float
    eps: float
    restore: str | None      # ZO: mezo, exact or fused; FO: None
    amp: str
    prefix_cache: str
    paired_suffix: str
    model: str
    model_name: str
    data: str
    task: str
    seed: int
    out: str
    epochs: int | None
    weight_decay: float
    batch_size: int
    dev_eval_size: int
    eval_batch_size: int
    max_len: int
    lora_r: int
    lora_alpha: int
    scoring: str
    sparsity: float
    dtype: str
    max_grad_norm: float
    on_nonfinite: str
    save_tuned: str

    @classmethod
    def resolve(cls, args, device: torch.device, n_train: int) -> RunSpec:
        """Everything but the prefix cache's and paired suffix's 'auto' (``with_model`` decides those)."""
        method = parse_method(args.method)
        layer, how = resolve_layer(method, args.probe, args.layer, args.model_name)
        dtype = weights_dtype(args.dtype, device, method.is_fo)
        amp, _ = amp_context(args.amp, device, method.is_fo)
        if method.is_fo and args.save_tuned == "replay":
            raise DLZOError(f"--save-tuned replay: {args.method} is first-order, its steps cannot be replayed")
        if args.prefix_cache not in ("auto", "off") and not method.is_single_layer:
            raise DLZOError(f"--prefix-cache {args.prefix_cache} needs a single-layer method, not {args.method}")
        per_epoch = max(1, n_train // min(args.batch_size, n_train))
        if method.is_fo:
            restore = None
        elif args.restore == "auto":  # MeZO's own restore for the whole-model methods, bit-exact for the others
            restore = "exact" if method.is_lora or method.is_single_layer else "mezo"
        else:
            restore = args.restore
        lr, eps = args.lr, args.eps
        if args.selection:
            from dlzo.select import chosen_point

            point = chosen_point(args.selection)
            lr, eps = point["lr"], point["eps"] if point["eps"] is not None else DEFAULT_EPS
        return cls(asked=dict(vars(args)), method=method, layer=layer, layer_from=how, device=device,
                   torch_dtype=dtype, n_train=n_train, steps=args.epochs * per_epoch if args.epochs else args.steps,
                   eval_every=args.eval_every or per_epoch, lr=lr, eps=eps, restore=restore, amp=amp,
                   prefix_cache=args.prefix_cache, paired_suffix=args.paired_suffix,
                   **{k: getattr(args, k) for k in ASKED})

    def with_model(self, model) -> RunSpec:
        """The spec with the prefix cache's and paired suffix's 'auto' decided on the built model."""
        prefix, paired, fo = self.prefix_cache, self.paired_suffix, self.method.is_fo
        if prefix == "auto":
            single = self.method.is_single_layer and not FrozenPrefix.supported(model, self.layer)
            prefix = "dataset" if single else "off"
        if paired == "auto":
            paired = "on" if prefix != "off" and self.device.type == "cuda" and not fo else "off"
        if paired == "on" and (prefix == "off" or fo):
            raise DLZOError(f"--paired-suffix on needs a zeroth-order single-layer method with a prefix cache "
                            f"(--prefix-cache dataset or batch), not {self.method.name} with --prefix-cache {prefix}")
        return dataclasses.replace(self, prefix_cache=prefix, paired_suffix=paired)

    @property
    def bs(self) -> int:
        """The batch size used: --batch-size, or the training set when smaller."""
        return min(self.batch_size, self.n_train)

    @property
    def share_prompt(self) -> bool:
        """Candidates read at the shared prompt's last position (--scoring shared-prompt)."""
        return self.scoring == "shared-prompt"

    @property
    def masks_at(self) -> float | None:
        """sparse-mezo's frozen fraction (its magnitude masks); None for every other method."""
        return self.sparsity if self.method.family == "sparse" else None

    def header(self, tuned_params: int) -> dict:
        """The trajectory's first line: the config and its hash (a partial run resumes only under the same)."""
        cfg = {k: getattr(self, k) for k in HASHED} | {"method": self.method.name}
        if self.scoring != "per-sequence":  # only when set: runs from before the option keep their hash (and resume)
            cfg["scoring"] = self.scoring
        # MeZO's tokens (dlzo.tokens): partial runs from the earlier lm-eval split do not resume under them
        cfg.update(kind=self.method.kind, layer=self.layer, layer_from=self.layer_from, tuned_params=tuned_params,
                   tokens="mezo")
        digest = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return {"header": cfg, "config_hash": digest}

    def config(self) -> dict:
        """The arguments with the resolved values (log.json's provenance)."""
        resolved = ("steps", "eval_every", "lr", "eps", "restore", "prefix_cache", "paired_suffix", "amp")
        return self.asked | {k: getattr(self, k) for k in resolved}


def nonfinite_advice(spec: RunSpec) -> str:
    """What to change after a non-finite ZO loss: the weights' dtype when it is float16 (activations of a model
    trained in bfloat16 can overflow float16's range), else the learning rate."""
    if spec.torch_dtype == torch.float16:
        return (f"The weights are float16 (--dtype {spec.dtype}): a model trained in bfloat16 can overflow "
                f"float16 activations; rerun with --dtype bfloat16 (config: models.<name>.dtype or runtime.dtype), "
                f"or lower the learning rate (or eps)")
    return f"Lower the learning rate (or eps) and rerun (weights {str(spec.torch_dtype).replace('torch.', '')})"


def mean_loss(model, tokenizer, records, objective, device, batch_size, max_len,
               amp=contextlib.nullcontext, share_prompt: bool = False) -> float:
    total, n = 0.0, 0
    with torch.no_grad(), amp():
        for i in range(0, len(records), batch_size):
            chunk = records[i:i + batch_size]
            batch = make_batch(tokenizer, chunk, objective, device, max_len, share_prompt)
            total += float(objective_loss(model, batch)) * len(chunk)
            n += len(chunk)
    return total / max(n, 1)


class Run:
    """What lives while a run trains: its spec, data, model, tuned tensors, tokenizer and output folder."""

    def __init__(self, args):
        from dlzo.tasks import get_task

        self.started = time.time()
        set_threads(args.threads)
        device = pick_device(args.device)
        self.task = get_task(args.task)
        data = Path(args.data)
        self.train_rows, dev_rows = read_jsonl(data / "train.jsonl"), read_jsonl(data / "dev.jsonl")
        if not self.train_rows:
            raise DLZOError(f"{data / 'train.jsonl'} is empty: nothing to train on")
        spec = RunSpec.resolve(args, device, len(self.train_rows))
        self.device, self.amp = device, amp_context(spec.amp, device, spec.method.is_fo)[1]
        self.model, self.named = self.build(spec)
        self.spec = spec = spec.with_model(self.model)
        self.tokenizer = load_tokenizer(spec.model)
        self.n_params = sum(p.numel() for _, p in self.named)
        for _, p in self.named:
            p.requires_grad_(False)
        # first, before any training state exists (optimizer, masks, saved copies, the prefix cache)
        self.inference_peak_mb = measure_inference(self.model, self.batch(0), device, self.amp)
        self.out = Path(spec.out)
        self.out.mkdir(parents=True, exist_ok=True)
        for tmp in self.out.glob(".*.part"):  # a write cut by a kill (dlzo.io.atomic_path/atomic_dir): no result
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        self.dev_eval = dev_rows[: spec.dev_eval_size] if spec.dev_eval_size else dev_rows

    def build(self, spec: RunSpec | None = None):
        """(model, tuned named parameters): the base model as the run starts from it."""
        s = spec or self.spec
        return build(s.model, s.method.kind, s.layer, s.device, s.torch_dtype, s.lora_r, s.lora_alpha, s.seed)

    def batch(self, step: int):
        s = self.spec
        idx = batch_indices(len(self.train_rows), s.bs, s.seed, step)
        return make_batch(self.tokenizer, [self.train_rows[i] for i in idx], self.task.objective, self.device,
                          s.max_len, s.share_prompt)

    def dev_loss(self) -> float:
        s = self.spec
        if not self.dev_eval:
            return float("nan")
        return mean_loss(self.model, self.tokenizer, self.dev_eval, self.task.objective, self.device,
                          s.eval_batch_size, s.max_len, self.amp, s.share_prompt)

    def initial_dev_loss(self) -> float:
        """The untrained model's dev loss; non-finite there, the weights' dtype is the likely cause."""
        value = self.dev_loss()
        if self.dev_eval and not math.isfinite(value):
            raise DLZOError(f"the model as loaded gives a non-finite dev loss ({value}) on {self.spec.task}, before "
                            f"any step. {nonfinite_advice(self.spec)}")
        return value

    def prefix(self):
        """The frozen-prefix cache of single-layer methods (None for the others, or with --prefix-cache off)."""
        s, mode = self.spec, self.spec.prefix_cache
        if mode == "off":
            return None
        prefix = FrozenPrefix(self.model, s.layer, mode)
        if mode == "dataset":  # fixed chunks in file order: the same bits however the run is resumed
            with self.amp():
                prefix.fill(make_batch(self.tokenizer, self.train_rows[i:i + s.eval_batch_size], self.task.objective,
                                       self.device, s.max_len, s.share_prompt)
                            for i in range(0, len(self.train_rows), s.eval_batch_size))
        return prefix

    def finish(self, traj: list, hyper: dict, tuned_params: int, timing: dict, best: dict, dev_curve: list,
               resumed_from: int, step_times: list, train_peak: float) -> dict:
        """Write trajectory.jsonl and log.json (tuned.safetensors is already in place)."""
        s, n = self.spec, len(step_times)
        with atomic_path(self.out / "trajectory.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in traj))
        result = {
            "model": s.model_name, "task": s.task, "method": s.method.name, "seed": s.seed,
            "kind": s.method.kind, "layer": s.layer, "layer_from": s.layer_from, "tuned_params": tuned_params,
            "tensor_params": self.n_params,
            "lora": {"r": s.lora_r, "alpha": s.lora_alpha, "targets": LORA_TARGETS} if s.method.is_lora else None,
            "hyper": hyper,
            "best_step": best["step"], "best_dev_loss": best["dev_loss"],
            "dev_curve": dev_curve, "train_curve": [{"step": r["step"], "loss": train_loss(r)} for r in traj[1:]],
            "resumed_from_step": resumed_from,
            "timing": {
                "steps_timed": n,
                "s_per_step": float(np.mean(step_times)) if step_times else None,
                "s_per_step_median": float(np.median(step_times)) if step_times else None,
                "train_s": float(np.sum(step_times)),
                **{f"{k[:-2]}_s_per_step": (v / n if n else None) for k, v in timing.items()},
            },
            "peak_memory_mb": train_peak,
            "inference_peak_mb": self.inference_peak_mb,
            "peak_memory_vs_inference": train_peak / self.inference_peak_mb if self.inference_peak_mb else None,
            "provenance": provenance(self.device, s.torch_dtype, self.started, config=s.config(), amp=s.amp),
        }
        write_json(self.out / "log.json", result)
        return result


def train_loss(record: dict) -> float:
    """A step record's training loss (ZO: the mean of its two perturbed losses)."""
    return record["loss"] if "loss" in record else (record["loss_plus"] + record["loss_minus"]) / 2


class _Stop:
    """SIGTERM/SIGINT (preemption): noted here; the loop finishes the step, saves and exits 128 + signum."""

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


def train(args) -> dict:
    run = Run(args)
    return fit(run, (FOStepper if run.spec.method.is_fo else ZOStepper)(run))


def fit(run: Run, stepper) -> dict:
    """The training loop: batch, step, record, dev checkpoint (the lowest dev loss is the best), stop on a
    signal; then the outputs. What a step is, how a run resumes and what a checkpoint saves is ``stepper``'s."""
    s = run.spec
    start, dev_curve, best = stepper.resume()  # dev_curve starts with step 0, the untrained model's
    recovered = start + len(stepper.pending)  # steps the interrupted run had saved
    prefix = run.prefix()
    stop, step_times = _Stop(), []
    bar = tqdm(range(start, s.steps), desc=f"{s.task} {s.method.name} seed {s.seed}", initial=start, total=s.steps,
               file=sys.stderr, mininterval=2.0)
    for step in bar:
        if stepper.recorded(step):  # saved before an interruption, past the last checkpoint: re-applied, not rerun
            rec = stepper.reapply(step)
        else:
            batch = run.batch(step)
            t0 = _now(run.device)
            rec = stepper.step(step, batch, prefix)
            if rec is None:  # a non-finite loss under --on-nonfinite stop: the run ends at its best checkpoint so far
                break
            step_times.append(_now(run.device) - t0)
            stepper.record(rec)
        bar.set_postfix(loss=f"{train_loss(rec):.4f}")
        done = step + 1
        if done % s.eval_every == 0 or done == s.steps:
            dev = run.dev_loss()
            dev_curve.append({"step": done, "dev_loss": dev})
            is_best = not run.dev_eval or dev < best["dev_loss"]  # no dev split: keep the last state
            if is_best:
                best.update(step=done, dev_loss=dev)
            stepper.checkpoint(done, is_best, dev_curve, best)
        if stop.signal is not None:
            saved = stepper.suspend(done, dev_curve, best)
            print(f"zo_train: signal {stop.signal} after step {done}; {saved}. Rerun to resume.", file=sys.stderr)
            sys.exit(128 + stop.signal)
    bar.close()
    train_peak = peak_memory_mb(run.device)
    traj, hyper, tuned_params = stepper.finalize(best)
    result = run.finish(traj, hyper, tuned_params, stepper.timing, best, dev_curve, recovered, step_times, train_peak)
    stepper.cleanup()
    return result


def zo_step(opt, model, batch, prefix=None, paired: bool = False) -> float:
    """One ZO-SGD step on ``batch`` (the projected gradient); ``paired``: both perturbed outputs of the tuned
    layer through the layers after it as one double batch (needs ``prefix``)."""
    if paired:
        return opt.step(pair_closure=lambda up, down: paired_loss(batch, prefix, up, down))
    return opt.step(lambda: objective_loss(model, batch, prefix))


def fo_step(model, batch, prefix, opt, params, max_grad_norm: float, amp=contextlib.nullcontext, step: int = 0,
            now=time.perf_counter, timing: dict | None = None) -> tuple[float, float | None]:
    """One first-order step: forward (under ``amp``), backward, clip to ``max_grad_norm`` (0: no clipping),
    ``opt``'s update, gradients freed. (loss, grad norm or None); seconds added to ``timing``'s
    forward_s, backward_s and update_s. A non-finite loss is an error, before any update."""
    t0 = now()
    with amp():
        loss = objective_loss(model, batch, prefix)
    t1 = now()
    value = loss.item()
    if not math.isfinite(value):
        raise DLZOError(f"non-finite training loss at step {step} ({value}): lower the learning rate and rerun "
                        f"(in float16, a model trained in bfloat16 can overflow: use --dtype bfloat16)")
    loss.backward()
    t2 = now()
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm) if max_grad_norm > 0 else None
    opt.step()
    opt.zero_grad(set_to_none=True)
    t3 = now()
    del loss
    if timing is not None:
        for key, dt in (("forward_s", t1 - t0), ("backward_s", t2 - t1), ("update_s", t3 - t2)):
            timing[key] += dt
    return value, float(norm) if norm is not None else None


def _read_partial(path: Path, config_hash: str) -> list[dict]:
    """Steps of an interrupted run with the same config; [] when there is none or it does not match."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    try:
        head = json.loads(lines[0])
    except (IndexError, json.JSONDecodeError):
        return []
    if head.get("config_hash") != config_hash:
        print(f"zo_train: {path} belongs to another config; starting over", file=sys.stderr)
        return []
    steps = []
    for line in lines[1:]:
        try:
            steps.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by the interruption: everything before it is good
    return steps


def save_tuned(path: Path, tensors: dict, method: str, best_step: int, replay: bool = False) -> None:
    """tuned.safetensors: the bytes safetensors' save_file writes, streamed one tensor at a time (save_file holds
    a bytes copy of every tensor: the whole model again, for mezo-full), so writing it costs no memory."""
    from dlzo.io import write_safetensors

    # one metadata key: safetensors writes its metadata map in a random order per process, so three keys
    # gave the same tensors under different file bytes
    info = json.dumps({"method": method, "best_step": best_step, "replay": replay}, sort_keys=True)
    write_safetensors(path, tensors, metadata={"dlzo": info})


def _tensors(named, host: bool = True) -> dict:
    """The tuned tensors by name; ``host=False``: as they are (save_tuned copies each to the host as it writes
    it, instead of a host copy of all of them at once)."""
    return {n: p.detach().to("cpu").contiguous() if host else p.detach() for n, p in named}


class ZOStepper:
    """ZO-SGD on the run's tuned tensors. Its state is its trajectory: ``trajectory.partial.jsonl`` (one line a
    step, replayed on resume) and the dev curve so far, ``log.partial.json``; the best checkpoint is rebuilt
    from the trajectory at the end."""

    def __init__(self, run: Run):
        self.run, self.spec = run, run.spec
        self.opt = self._optimizer(run.named)
        self.timing = self.opt.timing
        self.header = self.spec.header(run.n_params)
        self.partial, self.log_path = run.out / "trajectory.partial.jsonl", run.out / "log.partial.json"
        self.diverged_at, self.fh, self.pending = None, None, {}

    def _optimizer(self, named):
        s = self.spec
        return zo_optimizer(named, s.lr, s.eps, s.weight_decay, s.seed, s.restore, s.masks_at)

    def resume(self) -> tuple[int, list, dict]:
        """(step to go on from, dev curve, best): an interrupted run's, replayed to its last dev checkpoint;
        else a fresh start. Steps recorded after that checkpoint are kept and re-applied by the loop
        (``recorded``/``reapply``), so the checkpoints they passed are evaluated as in an uninterrupted run."""
        done = _read_partial(self.partial, self.header["config_hash"])[: self.spec.steps]
        state = read_json(self.log_path) if done and self.log_path.exists() else {}
        dev_curve = state.get("dev_curve", [])
        best = state.get("best", {"step": 0, "dev_loss": math.inf})
        if not dev_curve:  # the untrained model's: measured before replaying a run cut before its 1st checkpoint
            dev_curve.append({"step": 0, "dev_loss": self.run.initial_dev_loss()})
            write_json(self.log_path, {"dev_curve": dev_curve})
        start = min(dev_curve[-1]["step"], len(done))
        self.opt.replay(done[:start])
        self.pending = {start + i: rec for i, rec in enumerate(done[start:])}
        with atomic_path(self.partial) as tmp:  # rewrite: drops a cut last line, keeps every good step (a kill
            tmp.write_text("".join(json.dumps(r) + "\n" for r in [self.header, *done]))  # meanwhile loses none)
        self.fh = open(self.partial, "a")
        return start, dev_curve, best

    def recorded(self, step: int) -> bool:
        return step in self.pending

    def reapply(self, step: int) -> dict:
        """A step the trajectory already holds: its update applied again (the same bits), its record kept."""
        rec = self.pending.pop(step)
        self.opt.replay([rec])
        return rec

    def step(self, step: int, batch, prefix) -> dict | None:
        """The step's trajectory record; None when the loss was non-finite and --on-nonfinite is stop."""
        try:
            zo_step(self.opt, self.run.model, batch, prefix, self.spec.paired_suffix == "on")
        except NonFiniteLoss as err:
            self.fh.flush()
            if self.spec.on_nonfinite == "stop":  # a grid point too large: keep the best checkpoint before it
                self.diverged_at = err.step
                print(f"zo_train: {err}; stopping (--on-nonfinite stop): the result is the best dev "
                      f"checkpoint before step {err.step}", file=sys.stderr)
                return None
            raise DLZOError(f"{err}; the trajectory up to step {err.step - 1} is kept in {self.partial}. "
                            f"{nonfinite_advice(self.spec)}") from err
        return self.opt.trajectory[-1]

    def record(self, rec: dict) -> None:
        self.fh.write(json.dumps(rec) + "\n")
        self.fh.flush()

    def checkpoint(self, done: int, is_best: bool, dev_curve: list, best: dict) -> None:
        write_json(self.log_path, {"dev_curve": dev_curve, "best": best})  # the steps are in the trajectory

    def suspend(self, done: int, dev_curve: list, best: dict) -> str:
        self.fh.flush()
        return f"trajectory saved in {self.partial}"

    def finalize(self, best: dict) -> tuple[list, dict, int]:
        """Save tuned.safetensors (the best checkpoint, rebuilt by replay when it is not the last state), for LoRA
        also as adapter/; (trajectory, hyper, tuned parameter count)."""
        s, run = self.spec, self.run
        self.fh.close()
        traj = [json.loads(x) for x in self.partial.read_text().splitlines()]
        mode = s.save_tuned
        if mode == "auto":  # a 7B model's every weight is 13 GB per run: replay its trajectory instead
            mode = "tensors" if run.n_params <= SAVE_TENSORS_UP_TO else "replay"
        tuned = run.n_params
        if s.masks_at is not None:  # sparse-mezo tunes the weights its masks select
            tuned = sum(m.count() for g in self.opt.param_groups for m in g["masks"])
        tensors = {}
        if mode == "tensors":
            named = run.named
            if best["step"] != s.steps:  # the best checkpoint is an earlier state: rebuild it exactly
                if not s.method.is_lora:  # the final weights are in the trajectory: free them (and the
                    for _, p in run.named:  # optimizer's masks and buffers) before loading the base model again,
                        p.data = torch.empty(0, dtype=p.dtype, device=p.device)  # one model in memory, not two
                    for g in self.opt.param_groups:
                        g.pop("masks", None)
                    self.opt._buffers.clear()
                _, named = run.build()
                self._optimizer(named).replay(traj[1:best["step"] + 1])
            tensors = _tensors(named, host=s.method.is_lora)  # LoRA's go to save_adapter too: small, on the host
        save_tuned(run.out / "tuned.safetensors", tensors, s.method.name, best["step"], replay=mode == "replay")
        if tensors and s.method.is_lora:  # the same tensors as a standard peft adapter folder
            save_adapter(run.model, run.out / "adapter", tensors)
        elif (run.out / "adapter").exists():  # an earlier run's, saved in another mode: not this run's weights
            shutil.rmtree(run.out / "adapter")
        hyper = {"steps": s.steps, "lr": s.lr, "eps": s.eps, "weight_decay": s.weight_decay, "batch_size": s.bs,
                 "max_len": s.max_len, "restore": s.restore, "prefix_cache": s.prefix_cache,
                 "paired_suffix": s.paired_suffix, "scoring": s.scoring}
        if s.masks_at is not None:
            hyper["sparsity"] = s.sparsity
        if self.diverged_at is not None:
            hyper["diverged_at_step"] = self.diverged_at
        return traj, hyper, tuned

    def cleanup(self) -> None:
        # the dev curve first: killed in between, the rerun still replays the steps (and re-evaluates their
        # checkpoints) instead of training from scratch
        self.log_path.unlink(missing_ok=True)
        self.partial.unlink(missing_ok=True)


class FOStepper:
    """AdamW through backpropagation on the run's tuned tensors (every one, or one decoder layer's). Its state,
    saved on a signal: weights, AdamW state, records and dev curve in ``fo_state.partial.pt``; the best
    checkpoint so far is saved as it happens, to ``best.partial.safetensors``."""

    def __init__(self, run: Run):
        self.run, self.spec = run, run.spec
        self.params = [p for _, p in run.named]
        for p in self.params:
            p.requires_grad_(True)
        s = self.spec
        self.opt = torch.optim.AdamW(param_groups(run.named, s.weight_decay), lr=s.lr, weight_decay=s.weight_decay)
        self.header = s.header(run.n_params)
        self.header["header"]["optimizer"] = "adamw"  # after the hash: runs from before it still resume
        self.state_path, self.best_path = run.out / "fo_state.partial.pt", run.out / "best.partial.safetensors"
        self.pending = {}  # a first-order run resumes from its saved state only: no recorded steps to re-apply
        self.records, self.timing = [], {"forward_s": 0.0, "backward_s": 0.0, "update_s": 0.0}

    def resume(self) -> tuple[int, list, dict]:
        """(steps done, dev curve, best): an interrupted run's, its weights and AdamW state loaded; else a fresh start."""
        dev_curve, best, start = [], {"step": 0, "dev_loss": math.inf}, 0
        if self.state_path.exists():
            st = torch.load(self.state_path, map_location=self.run.device, weights_only=True)
            if st.get("config_hash") != self.header["config_hash"]:
                print(f"zo_train: {self.state_path} belongs to another config; starting over", file=sys.stderr)
            elif st["best"]["step"] and not self.best_path.exists():
                print(f"zo_train: {self.state_path} has no best checkpoint beside it ({self.best_path.name}); "
                      f"starting over", file=sys.stderr)
            else:
                with torch.no_grad():
                    for n, p in self.run.named:
                        p.copy_(st["params"][n])
                self.opt.load_state_dict(st["opt"])
                self.records, dev_curve, best, start = st["records"], st["dev_curve"], st["best"], st["step"]
        if not dev_curve:
            dev_curve.append({"step": 0, "dev_loss": self.run.initial_dev_loss()})
        return start, dev_curve, best

    def step(self, step: int, batch, prefix) -> dict:
        run = self.run
        value, norm = fo_step(run.model, batch, prefix, self.opt, self.params, self.spec.max_grad_norm, run.amp,
                              step, lambda: _now(run.device), self.timing)
        return {"step": step, "loss": value, "lr": self.opt.param_groups[0]["lr"], "grad_norm": norm}

    def recorded(self, step: int) -> bool:
        return step in self.pending

    def record(self, rec: dict) -> None:
        self.records.append(rec)

    def checkpoint(self, done: int, is_best: bool, dev_curve: list, best: dict) -> None:
        if is_best:
            save_tuned(self.best_path, _tensors(self.run.named, host=False), self.spec.method.name, done)

    def suspend(self, done: int, dev_curve: list, best: dict) -> str:
        with atomic_path(self.state_path) as tmp:
            torch.save({"config_hash": self.header["config_hash"], "step": done, "records": self.records,
                        "dev_curve": dev_curve, "best": best, "opt": self.opt.state_dict(),
                        "params": {n: p.detach() for n, p in self.run.named}}, tmp)
        return f"weights and AdamW state saved in {self.state_path}"

    def finalize(self, best: dict) -> tuple[list, dict, int]:
        """tuned.safetensors is the best checkpoint saved during the run; (trajectory, hyper, tuned parameter count)."""
        s = self.spec
        # copied, not moved: killed before cleanup, a run resumed from fo_state still has its best checkpoint
        with atomic_path(self.run.out / "tuned.safetensors") as tmp:
            shutil.copyfile(self.best_path, tmp)
        hyper = {"optimizer": "adamw", "steps": s.steps, "epochs": s.epochs, "lr": s.lr,
                 "weight_decay": s.weight_decay, "betas": list(self.opt.defaults["betas"]),
                 "adam_eps": self.opt.defaults["eps"], "max_grad_norm": s.max_grad_norm, "schedule": "constant",
                 "batch_size": s.bs, "max_len": s.max_len, "prefix_cache": s.prefix_cache, "amp": s.amp,
                 "scoring": s.scoring, "weights_dtype": str(s.torch_dtype).replace("torch.", "")}
        return [self.header, *self.records], hyper, self.run.n_params

    def cleanup(self) -> None:
        self.state_path.unlink(missing_ok=True)  # first: a best checkpoint alone is never resumed from
        self.best_path.unlink(missing_ok=True)


def _parser() -> argparse.ArgumentParser:
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
    ap.add_argument("--lr", type=float, default=None, help=f"learning rate (default {DEFAULT_LR:g})")
    ap.add_argument("--eps", type=float, default=None, help=f"ZO perturbation scale (default {DEFAULT_EPS:g})")
    ap.add_argument("--selection", default=None,
                    help="hyper_selection.json (select_hyper): train at the grid's chosen lr and eps, instead of "
                         "--lr and --eps")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=1000, help="steps between dev-loss checkpoints (0 = once an epoch)")
    ap.add_argument("--dev-eval-size", type=int, default=0, help="dev examples for checkpoint choice (0 = all)")
    ap.add_argument("--eval-batch-size", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=MAX_LEN,
                    help="longer sequences are truncated keeping BOS, as in evaluation (dlzo.tokens; MeZO's 2048)")
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
                         "(auto: replay above 5e8 tuned parameters, methods.SAVE_TENSORS_UP_TO)")
    add_runtime_args(ap)
    return ap


def parse_args(argv=None):
    """The arguments as given, checked (a bad value is a usage error: exit 2), lr and eps defaulted unless
    --selection gives them (``RunSpec.resolve`` reads it)."""
    ap = _parser()
    args = ap.parse_args(argv)
    if args.selection and (args.lr is not None or args.eps is not None):
        ap.error("--selection gives the lr and eps (the grid's chosen point): drop --lr and --eps, or --selection")
    if not args.selection:  # the defaults (None marks an lr or eps not given, for the check above)
        args.lr = DEFAULT_LR if args.lr is None else args.lr
        args.eps = DEFAULT_EPS if args.eps is None else args.eps
    if (args.lr is not None and args.lr <= 0) or (args.eps is not None and args.eps <= 0) or args.steps <= 0:
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
    speed = f"{t['s_per_step']:.3f} s/step" if t["s_per_step"] is not None else "no step run here (resumed)"
    print(f"{args.task} {args.method} seed {args.seed}: best dev loss {res['best_dev_loss']:.4f} at step "
          f"{res['best_step']}, {speed}, peak {res['peak_memory_mb']:.0f} MB "
          f"(inference {res['inference_peak_mb']:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
