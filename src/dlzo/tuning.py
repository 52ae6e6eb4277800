"""A training run's model: what training, evaluation and the benchmark share on top of ``dlzo.models``.

``build`` (the base model and the tensors a method kind tunes, LoRA adapters added), ``weights_dtype`` and
``amp_context`` (a method's precision), ``zo_optimizer`` (a run's ZO-SGD, the same for training, rebuilding
its best checkpoint and evaluation's replay), ``load_tuned_model`` (the base model with a finished run's
best checkpoint applied) and ``save_adapter`` (a LoRA run's best checkpoint as a standard peft adapter
folder: training writes ``<run>/adapter/`` beside ``tuned.safetensors``). Its command line writes a tuned run
as a Hugging Face model folder that any tool reads (LoRA merged into the weights), or a LoRA run as a peft
adapter folder (``--adapter``; for runs without one: made before adapters were saved, or saved as a
trajectory only), which is how a tuned number is rechecked outside the pipeline:

    python -m dlzo.tuning export --model <base model dir> --run <run dir> --out <folder> [--adapter] [--replay]

Apart from ``dlzo.models`` so that the stages that only read a model (the probe, the data and download
stages) do not depend on the optimizer: an edit here or in ``dlzo.zo`` reruns training and evaluation, never
the probe.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from dlzo import DLZOError
from dlzo.io import read_json, read_jsonl
from dlzo.methods import KINDS
from dlzo.models import add_lora, check_layer, load_model, tuned_parameters
from dlzo.runtime import pick_dtype
from dlzo.zo import ZOSGD, param_groups

LORA_TARGETS = ["q_proj", "v_proj"]  # the LoRA methods' adapted projections


def build(model_dir, kind: str, layer: int | None, device, dtype, lora_r: int, lora_alpha: int, seed: int,
          where: str = "--method"):
    """(model, tuned (name, parameter) pairs) of a method kind: the base model, its layer index checked
    against the model's depth, LoRA adapters added for the LoRA kinds (their init drawn from ``seed``)."""
    model = load_model(model_dir, device, dtype)
    if layer is not None:
        check_layer(layer, model, where)
    spec = KINDS[kind]
    if spec.lora:
        model = add_lora(model, layer if spec.layer else None, lora_r, lora_alpha, LORA_TARGETS, seed)
    return model, tuned_parameters(model, kind, layer)


def weights_dtype(requested: str, device: torch.device, fo: bool) -> torch.dtype:
    """ZO: the runtime's choice (fp16 on GPU). FO (``fo``): fp32 master weights unless bf16 is asked for
    (AdamW's steps fall below half precision's resolution); fp16 is refused (AdamW without loss scaling)."""
    if not fo:
        return pick_dtype(requested, device)
    dtype = pick_dtype(requested, device, gpu_default="fp32")
    if dtype == torch.float16:
        raise DLZOError("first-order methods need fp32 (auto) or bf16 weights, not fp16 (AdamW without loss "
                        "scaling): set runtime.dtype (--dtype) to auto, fp32 or bf16")
    return dtype


def amp_context(amp: str, device: torch.device, fo: bool):
    """(name, context factory): bf16 autocast for FO on GPU (the paper's FO precision); ZO never autocasts."""
    if amp == "auto":
        amp = "bf16" if fo and device.type == "cuda" else "off"
    if amp == "off":
        return amp, contextlib.nullcontext
    if not fo:
        raise DLZOError(f"--amp {amp} is for the first-order methods; ZO methods compute in --dtype")
    return amp, lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def zo_optimizer(named, lr: float, eps: float, weight_decay: float, seed: int, restore: str,
                 sparsity: float | None = None) -> ZOSGD:
    """A run's ZO-SGD, the same for training, rebuilding its best checkpoint and evaluation's replay.
    ``sparsity`` (sparse-mezo only): the magnitude masks' frozen fraction."""
    return ZOSGD(param_groups(named, weight_decay, sparsity), lr=lr, eps=eps, weight_decay=weight_decay,
                 seed=seed, restore=restore)


def load_tuned_model(model_dir, run_dir, device, dtype, replay: bool = False, merge: bool = True):
    """The base model with a training run's best checkpoint applied: its tuned tensors, or a replay of its
    trajectory when the run saved none (``--save-tuned replay``) or ``replay`` asks for one (a ZO run folder
    needs only ``log.json`` and ``trajectory.jsonl`` then: the committed references re-score their runs this
    way, bit for bit on CPU). LoRA is merged into the weights (a plain model), or with ``merge=False`` kept as
    the peft model the run trained (what evaluation scores: the forward its dev loss was measured with, no
    rounding of the adapters into half-precision weights, and what lm-eval loads from its adapter folder)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    log = read_json(run_dir / "log.json", "training log")
    lora = log.get("lora") or {}
    model, named = build(model_dir, log["kind"], log["layer"], device, dtype, lora.get("r", 8), lora.get("alpha", 16),
                         log["seed"])
    if replay:
        if KINDS[log["kind"]].fo:
            raise DLZOError(f"{run_dir}: a first-order run ({log['kind']}) has no trajectory to replay")
        info = {"replay": True}
    else:
        with safe_open(str(run_dir / "tuned.safetensors"), "pt") as fh:
            meta = fh.metadata() or {}
        info = json.loads(meta["dlzo"]) if "dlzo" in meta else meta  # earlier versions wrote three keys
    if info.get("replay") in (True, "true"):  # rebuild the best checkpoint from the trajectory, bit for bit
        hyper = log["hyper"]  # "sparsity" is there for sparse-mezo only
        traj = read_jsonl(run_dir / "trajectory.jsonl")[1:]
        zo_optimizer(named, hyper["lr"], hyper["eps"], hyper["weight_decay"], log["seed"], hyper["restore"],
                     hyper.get("sparsity")).replay(traj[: log["best_step"]])
    else:
        tensors = load_file(str(run_dir / "tuned.safetensors"))
        params = dict(named)
        missing = set(params) - set(tensors)
        if missing:
            raise DLZOError(f"{run_dir / 'tuned.safetensors'} lacks tuned tensors {sorted(missing)[:3]}...")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name].to(p.device, p.dtype))
    if merge and hasattr(model, "merge_and_unload"):  # LoRA folded into the weights: a plain model
        model = model.merge_and_unload()
    model.eval()
    return model


def save_adapter(model, out, tensors: dict | None = None) -> Path:
    """Write a peft model's LoRA adapters as a standard peft adapter folder with peft's own ``save_pretrained``
    (adapter_config.json, adapter_model.safetensors, README.md): ``tensors`` (the tuned tensors by the model's
    parameter names, as ``tuned.safetensors`` holds them) or else the model's own. Its base_model_name_or_path is
    the base model folder's absolute path; the same tensors give the same bytes. Complete or absent (written
    beside, then renamed)."""
    from dlzo.io import atomic_dir

    cfg = model.peft_config["default"]
    cfg.base_model_name_or_path = str(Path(model.get_base_model().name_or_path).resolve())
    cfg.target_modules = sorted(cfg.target_modules)  # a set: written in a per-process order otherwise
    with atomic_dir(Path(out)) as tmp:  # no embedding layers: they are never tuned (and "auto" may ask the Hub)
        model.save_pretrained(str(tmp), state_dict=tensors, save_embedding_layers=False)
    return Path(out)


def export(model_dir, run_dir, out, device, dtype, replay: bool = False, adapter: bool = False) -> Path:
    """Write the run's best checkpoint (LoRA merged) and the base model's tokenizer as a Hugging Face model
    folder, with ``dlzo_export.json`` naming the run; ``adapter``: a LoRA run's adapters as a peft adapter
    folder instead (``save_adapter``). Complete or absent (written beside, then renamed)."""
    from dlzo.io import atomic_dir, write_json
    from dlzo.models import load_tokenizer

    log = read_json(Path(run_dir) / "log.json", "training log")
    if adapter and not KINDS[log["kind"]].lora:
        raise DLZOError(f"{run_dir}: --adapter writes a LoRA run's adapters; this run ({log.get('method')}) tunes "
                        f"no LoRA: export it as a model folder (without --adapter)")
    model = load_tuned_model(model_dir, run_dir, device, dtype, replay=replay, merge=not adapter)
    if adapter:
        return save_adapter(model, out)
    with atomic_dir(Path(out)) as tmp:
        model.save_pretrained(str(tmp))
        load_tokenizer(model_dir).save_pretrained(str(tmp))
        write_json(tmp / "dlzo_export.json", {"base_model": str(model_dir), "run": str(run_dir),
                                              "method": log.get("method"), "best_step": log.get("best_step"),
                                              "replay": replay, "dtype": str(dtype).replace("torch.", "")})
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from dlzo.runtime import add_runtime_args, setup_runtime

    ap = argparse.ArgumentParser(prog="python -m dlzo.tuning", description="tuned runs as model folders")
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="a run's best checkpoint (LoRA merged) as a Hugging Face model folder, or "
                                       "a LoRA run's as a peft adapter folder (--adapter)")
    ex.add_argument("--model", required=True, help="the base model folder the run started from")
    ex.add_argument("--run", required=True, help="the training run folder (log.json, tuned.safetensors)")
    ex.add_argument("--out", required=True, help="the model folder to write")
    ex.add_argument("--replay", action="store_true", help="rebuild the weights from the run's trajectory.jsonl")
    ex.add_argument("--adapter", action="store_true",
                    help="a LoRA run: write its adapters as a peft adapter folder (load the base model, then "
                         "peft.PeftModel.from_pretrained(base, OUT); lm-eval: --model_args pretrained=BASE,peft=OUT)")
    add_runtime_args(ex)
    args = ap.parse_args(argv)
    device, dtype = setup_runtime(args)
    out = export(args.model, args.run, args.out, device, dtype, args.replay, args.adapter)
    print(f"dlzo.tuning: {args.run} -> {out}")
    return 0


if __name__ == "__main__":
    from dlzo import run_cli

    run_cli(main, "tuning")
