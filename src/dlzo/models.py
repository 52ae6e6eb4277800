"""Loading models and tokenizers, finding their decoder layers, choosing which parameters a method tunes, and
the tiny random models the tests build. What a training run builds on top (its tuned model, optimizer and
precision) is ``dlzo.tuning``: the probe stages, which import this module, do not depend on it."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dlzo import DLZOError
from dlzo.methods import KINDS

# Where the decoder layers live, for the families we know by name (LLaMA, Qwen2/Qwen3, Mistral and
# most current decoders use model.layers). Anything else falls back to the generic search below.
KNOWN_LAYER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers",
                     "transformer.blocks", "model.model.layers")

def _get_attr_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers, in order.

    Known paths first; otherwise the longest ``nn.ModuleList`` whose members all share one class
    (the shape of every decoder stack). A model without one gets an error that says so.
    """
    base = getattr(model, "base_model", model)
    base = getattr(base, "model", base) if type(base).__name__.startswith(("PeftModel", "LoraModel")) else base
    for root in (model, base):
        for path in KNOWN_LAYER_PATHS:
            found = _get_attr_path(root, path)
            if isinstance(found, nn.ModuleList) and len(found) > 0:
                return found
    best = None
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            kinds = {type(m) for m in module}
            if len(kinds) == 1 and (best is None or len(module) > len(best)):
                best = module
    if best is None:
        raise DLZOError(
            f"cannot locate the decoder layers of {type(model).__name__}: expected an nn.ModuleList "
            f"of identical blocks (e.g. model.layers as in LLaMA, Qwen and Mistral)")
    return best


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model_dir: str | Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise DLZOError(f"model folder {model_dir} has no config.json: run the download_model rule first")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def check_layer(layer: int, model: nn.Module, where: str) -> None:
    n = num_layers(model)
    if not 0 <= layer < n:
        raise DLZOError(f"{where}: layer index {layer} is past the model's depth "
                        f"(the model has {n} decoder layers, indices 0..{n - 1})")


def add_lora(model: nn.Module, layer: int | None, r: int, alpha: int, targets: list[str], seed: int):
    """Wrap ``model`` with peft LoRA adapters (every layer, or one layer when ``layer`` is set)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # lora_A's init is random: tie it to the run's seed
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), bias="none",
                     layers_to_transform=[layer] if layer is not None else None, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    peft_model.eval()
    return peft_model


def tuned_parameters(model: nn.Module, kind: str, layer: int | None) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs a method tunes, in a fixed order (the order z is drawn in)."""
    spec = KINDS.get(kind)
    if spec is None:
        raise DLZOError(f"no parameter set for method kind {kind!r}")
    if spec.lora:  # the adapters peft added (in every layer, or in one)
        params = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    elif spec.layer:
        block = decoder_layers(model)[layer]
        prefix = next(n for n, m in model.named_modules() if m is block)
        params = [(f"{prefix}.{n}", p) for n, p in block.named_parameters()]
    else:  # every parameter (sparse-mezo perturbs a magnitude mask of each tensor)
        params = list(model.named_parameters())
    if not params:
        raise DLZOError(f"method kind {kind!r} selected no parameters in {type(model).__name__}")
    # tied weights appear once in named_parameters(); keep that
    return params


# --- the tiny model the tests and tiny.yaml build (no download) ---------------------------------

def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + specials), built offline in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_random(arch: dict, device="cpu", dtype=torch.float32, seed: int = 0) -> nn.Module:
    """A model of a published architecture (``dlzo.architectures``: its config.json values) with random weights,
    built directly on ``device`` in ``dtype``: step time and memory do not depend on weight values, so a 7B
    shape can be measured or rehearsed without downloading 13 GB."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in arch.items() if k not in ("model_type", "torch_dtype")}
    config = AutoConfig.for_model(arch["model_type"], **cfg, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def build_tiny(out_dir: str | Path, arch: str = "llama", layers: int = 4, hidden: int = 64,
               outlier_layer: int | None = None, seed: int = 0) -> None:
    """A randomly initialised decoder of the given family, saved like a downloaded model.

    ``outlier_layer`` plants a massive activation: that layer's MLP writes a huge value into one
    channel (as the real outlier layers of LLaMA do), so the probe has something to find.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = byte_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    if arch == "qwen3":
        common["head_dim"] = hidden // 4
    if arch not in ("llama", "qwen2", "qwen3", "mistral"):
        raise DLZOError(f"tiny model: unknown arch {arch!r} (llama, qwen2, qwen3, mistral)")
    config = AutoConfig.for_model(arch, **common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if outlier_layer is not None:
        if not 0 <= outlier_layer < layers:
            raise DLZOError(f"tiny model: outlier_layer {outlier_layer} not in 0..{layers - 1}")
        with torch.no_grad():
            down = decoder_layers(model)[outlier_layer].mlp.down_proj.weight
            down[7].mul_(1.0e5)  # channel 7 of this layer's output becomes massive
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
