"""Stage ``zo_train``: ZO-SGD fine-tuning of one (model, task, method, seed).

Methods: ``mezo-full`` (every parameter), ``layer-<i>`` (all parameters of decoder layer i),
``dominant`` (layer-i with i from the probe, or pinned), ``lora-zo`` (LoRA on q_proj/v_proj in every
layer), ``layer-<i>-lora`` / ``dominant-lora`` (LoRA inside one layer).

Outputs in ``--out`` (a run folder):
  trajectory.jsonl   header line, then one line per step (seed, g, lr, losses): replaying it on the
                     base model rebuilds the tuned weights exactly
  tuned.safetensors  the tuned tensors at the checkpoint with the lowest dev loss
  log.json           curves, timing (s/step split into forward, perturbation, update), peak memory,
                     the chosen checkpoint, config and provenance
While running, the trajectory grows in ``trajectory.partial.jsonl``: a rerun after an interruption
(preemption, SIGTERM) replays it and continues, ending bit-identical to an uninterrupted run on CPU.
"""
from __future__ import annotations

import argparse
import hashlib
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
from dlzo.models import add_lora, check_layer, load_model, load_tokenizer, parse_method, tuned_parameters
from dlzo.objectives import FrozenPrefix, make_batch, paired_loss
from dlzo.objectives import loss as objective_loss
from dlzo.runtime import add_runtime_args, peak_memory_mb, provenance, setup_runtime
from dlzo.zo import NonFiniteLoss, ZOSGD, param_groups

LORA_TARGETS = ["q_proj", "v_proj"]


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Examples of ``step``: epochs of seeded permutations, a pure function of (seed, step)."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[k * batch_size:(k + 1) * batch_size]


def resolve_method(method: str, probe_path: str | None, pinned: int | None, model_name: str):
    """(kind, layer, how): kind in mezo-full, lora-zo, layer, layer-lora."""
    kind, layer = parse_method(method)
    if kind in ("dominant", "dominant-lora"):
        if pinned is None and not probe_path:
            raise DLZOError(f"method {method} needs the probe's JSON (--probe) or a pinned layer (--layer)")
        from dlzo.probe import resolve_dominant_layer

        layer, how = resolve_dominant_layer(probe_path, pinned, model_name)
        return ("layer" if kind == "dominant" else "layer-lora"), layer, how
    return kind, layer, ("method name" if layer is not None else None)


def build(model_dir, kind: str, layer: int | None, device, dtype, lora_r: int, lora_alpha: int, seed: int,
          where: str = "--method"):
    model = load_model(model_dir, device, dtype)
    if layer is not None:
        check_layer(layer, model, where)
    if kind in ("lora-zo", "layer-lora"):
        model = add_lora(model, layer if kind == "layer-lora" else None, lora_r, lora_alpha, LORA_TARGETS, seed)
    named = tuned_parameters(model, kind, layer)
    return model, named


def _mean_loss(model, tokenizer, records, objective, device, batch_size, max_len) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(records), batch_size):
            chunk = records[i:i + batch_size]
            total += float(objective_loss(model, make_batch(tokenizer, chunk, objective, device, max_len))) * len(chunk)
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


def _header(args, kind, layer, how, n_params) -> dict:
    keys = ("model", "data", "task", "method", "seed", "steps", "lr", "eps", "weight_decay", "batch_size",
            "lora_r", "lora_alpha", "max_len", "restore", "prefix_cache", "paired_suffix", "dtype")
    cfg = {k: getattr(args, k) for k in keys}
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


def train(args) -> dict:
    started = time.time()
    device, dtype = setup_runtime(args)
    from dlzo.tasks import get_task

    task = get_task(args.task)
    data = Path(args.data)
    train_rows, dev_rows = read_jsonl(data / "train.jsonl"), read_jsonl(data / "dev.jsonl")
    if not train_rows:
        raise DLZOError(f"{data / 'train.jsonl'} is empty: nothing to train on")
    kind, layer, how = resolve_method(args.method, args.probe, args.layer, args.model_name)
    model, named = build(args.model, kind, layer, device, dtype, args.lora_r, args.lora_alpha, args.seed)
    tokenizer = load_tokenizer(args.model)
    n_params = sum(p.numel() for _, p in named)
    for _, p in named:
        p.requires_grad_(False)
    restore = args.restore if args.restore != "auto" else ("mezo" if kind == "mezo-full" else "exact")
    args.restore = restore
    if args.prefix_cache == "auto":
        single = kind in ("layer", "layer-lora") and not FrozenPrefix.supported(model, layer)
        args.prefix_cache = "dataset" if single else "off"
    if args.paired_suffix == "auto":
        args.paired_suffix = "on" if args.prefix_cache != "off" and device.type == "cuda" else "off"
    if args.paired_suffix == "on" and args.prefix_cache == "off":
        raise DLZOError(f"--paired-suffix on needs a single-layer method with a prefix cache "
                        f"(--prefix-cache dataset or batch), not {args.method} with --prefix-cache off")
    opt = ZOSGD(param_groups(named, args.weight_decay), lr=args.lr, eps=args.eps,
                weight_decay=args.weight_decay, seed=args.seed, restore=restore)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "trajectory.partial.jsonl"
    header = _header(args, kind, layer, how, n_params)
    done = _read_partial(partial, header)[: args.steps]
    opt.replay(done)
    with open(partial, "w") as fh:  # rewrite: drops a cut last line, keeps every good step
        fh.write(json.dumps(header) + "\n")
        for rec in done:
            fh.write(json.dumps(rec) + "\n")
    resumed_from = len(done)

    bs = min(args.batch_size, len(train_rows))
    prefix, mode = None, args.prefix_cache
    if mode != "off":
        if kind not in ("layer", "layer-lora"):
            raise DLZOError(f"--prefix-cache {mode} needs a single-layer method, not {args.method}")
        prefix = FrozenPrefix(model, layer, mode)
        if mode == "dataset":  # fixed chunks in file order: the same bits however the run is resumed
            prefix.fill(make_batch(tokenizer, train_rows[i:i + args.eval_batch_size], task.objective, device,
                                   args.max_len) for i in range(0, len(train_rows), args.eval_batch_size))

    dev_eval = dev_rows[: args.dev_eval_size] if args.dev_eval_size else dev_rows
    dev_loss = lambda: _mean_loss(model, tokenizer, dev_eval, task.objective, device, args.eval_batch_size,  # noqa: E731
                                  args.max_len) if dev_eval else float("nan")
    log_path = out / "log.partial.json"
    state = read_json(log_path) if resumed_from and log_path.exists() else {}
    dev_curve = state.get("dev_curve", [])
    best = state.get("best", {"step": 0, "dev_loss": math.inf})
    if not dev_curve:
        dev_curve.append({"step": 0, "dev_loss": dev_loss()})

    stop = _Stop()
    step_times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(range(resumed_from, args.steps), desc=f"{args.task} {args.method} seed {args.seed}",
               initial=resumed_from, total=args.steps, file=sys.stderr, mininterval=2.0)
    with open(partial, "a") as fh:
        for step in bar:
            idx = batch_indices(len(train_rows), bs, args.seed, step)
            batch = make_batch(tokenizer, [train_rows[i] for i in idx], task.objective, device, args.max_len)
            t0 = time.perf_counter()
            try:
                if args.paired_suffix == "on":
                    opt.step(pair_closure=lambda up, down: paired_loss(batch, prefix, up, down))
                else:
                    opt.step(lambda: objective_loss(model, batch, prefix))
            except NonFiniteLoss as err:
                fh.flush()
                raise DLZOError(f"{err}; the trajectory up to step {err.step - 1} is kept in {partial}. "
                                f"Lower the learning rate (or eps) and rerun") from err
            step_times.append(time.perf_counter() - t0)
            rec = opt.trajectory[-1]
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            bar.set_postfix(loss=f"{(rec['loss_plus'] + rec['loss_minus']) / 2:.4f}", g=f"{rec['g']:.3g}")
            done_steps = step + 1
            if done_steps % args.eval_every == 0 or done_steps == args.steps:
                dl = dev_loss()
                dev_curve.append({"step": done_steps, "dev_loss": dl})
                if not dev_eval or dl < best["dev_loss"]:  # no dev split: keep the last state
                    best = {"step": done_steps, "dev_loss": dl}
                write_json(log_path, {"dev_curve": dev_curve, "best": best})
            if stop.signal is not None:
                fh.flush()
                print(f"zo_train: signal {stop.signal} after step {done_steps}; trajectory saved in {partial}. "
                      f"Rerun to resume.", file=sys.stderr)
                sys.exit(128 + stop.signal)
    bar.close()

    traj = [json.loads(x) for x in partial.read_text().splitlines()]
    save_tuned = args.save_tuned
    if save_tuned == "auto":  # a 7B model's every weight is 13 GB per run: replay its trajectory instead
        save_tuned = "tensors" if n_params <= 5e8 else "replay"
    tensors = {}
    if save_tuned == "tensors":
        if best["step"] != args.steps:  # the best checkpoint is an earlier state: rebuild it exactly
            model, named = build(args.model, kind, layer, device, dtype, args.lora_r, args.lora_alpha, args.seed)
            ZOSGD(param_groups(named, args.weight_decay), lr=args.lr, eps=args.eps, weight_decay=args.weight_decay,
                  seed=args.seed, restore=restore).replay(traj[1:best["step"] + 1])
        tensors = {n: p.detach().to("cpu").contiguous() for n, p in named}
    from safetensors.torch import save_file

    with atomic_path(out / "tuned.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"method": args.method, "best_step": str(best["step"]),
                                               "replay": str(save_tuned == "replay").lower()})
    with atomic_path(out / "trajectory.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in traj))
    steps_run = len(step_times)
    train_curve = [{"step": r["step"], "loss": (r["loss_plus"] + r["loss_minus"]) / 2} for r in traj[1:]]
    result = {
        "model": args.model_name, "task": args.task, "method": args.method, "seed": args.seed,
        "kind": kind, "layer": layer, "layer_from": how, "tuned_params": n_params,
        "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "targets": LORA_TARGETS} if "lora" in kind else None,
        "hyper": {"steps": args.steps, "lr": args.lr, "eps": args.eps, "weight_decay": args.weight_decay,
                  "batch_size": bs, "max_len": args.max_len, "restore": restore, "prefix_cache": args.prefix_cache,
                  "paired_suffix": args.paired_suffix},
        "best_step": best["step"], "best_dev_loss": best["dev_loss"],
        "dev_curve": dev_curve, "train_curve": train_curve,
        "resumed_from_step": resumed_from,
        "timing": {
            "steps_timed": steps_run,
            "s_per_step": float(np.mean(step_times)) if step_times else None,
            "s_per_step_median": float(np.median(step_times)) if step_times else None,
            "train_s": float(np.sum(step_times)),
            **{k: v / steps_run if steps_run else None for k, v in
               (("forward_s_per_step", opt.timing["forward_s"]), ("perturb_s_per_step", opt.timing["perturb_s"]),
                ("update_s_per_step", opt.timing["update_s"]))},
        },
        "peak_memory_mb": peak_memory_mb(device),
        "provenance": provenance(device, dtype, started, config=vars(args)),
    }
    write_json(out / "log.json", result)
    partial.unlink(missing_ok=True)
    log_path.unlink(missing_ok=True)
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
    if meta.get("replay") == "true":  # rebuild the best checkpoint from the trajectory, bit for bit
        hyper = log["hyper"]
        traj = read_jsonl(run_dir / "trajectory.jsonl")[1:]
        ZOSGD(param_groups(named, hyper["weight_decay"]), lr=hyper["lr"], eps=hyper["eps"],
              weight_decay=hyper["weight_decay"], seed=log["seed"], restore=hyper["restore"]
              ).replay(traj[: log["best_step"]])
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
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=1000)
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
                    help="single-layer methods with a prefix cache: run the two perturbed outputs of the "
                         "tuned layer through the layers after it as one double batch (auto: on CUDA, "
                         "where the bigger batch is faster; off on CPU, where it is not)")
    ap.add_argument("--save-tuned", default="auto", choices=["auto", "tensors", "replay"],
                    help="tuned.safetensors holds the tuned tensors, or only says to replay the trajectory "
                         "(auto: replay above 5e8 tuned parameters)")
    add_runtime_args(ap)
    args = ap.parse_args(argv)
    if args.lr <= 0 or args.eps <= 0 or args.steps <= 0:
        ap.error(f"--lr, --eps and --steps must be > 0 (got lr={args.lr}, eps={args.eps}, steps={args.steps})")
    args.model_name = args.model_name or Path(args.model).name
    args.eval_every = max(1, args.eval_every)
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
          f"{res['best_step']}, {t['s_per_step']:.3f} s/step, peak {res['peak_memory_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
