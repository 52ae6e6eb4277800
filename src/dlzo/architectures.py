"""The published architectures of the paper's models (and the demo's), written here so that nothing needs a
download to size a job or build a model of the same shape.

Torch-free: the workflow sizes each job's cluster resources from these numbers (``dlzo.cluster``). The
values are the ``config.json`` of each checkpoint on the Hugging Face hub (the keys are transformers'):

* ``llama2-7b``: meta-llama/Llama-2-7b-hf (LlamaForCausalLM): 6,738,415,616 parameters.
* ``qwen3-8b``: Qwen/Qwen3-8B-Base (Qwen3ForCausalLM; the same shape as Qwen/Qwen3-8B): 8,190,735,360.
* ``smollm2-135m``: HuggingFaceTB/SmolLM2-135M (LlamaForCausalLM, tied embeddings): 134,515,008.
"""
from __future__ import annotations

from dlzo import DLZOError

ARCHITECTURES: dict[str, dict] = {
    "llama2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, head_dim=128, vocab_size=32000,
                      max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=False, torch_dtype="float16"),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                     tie_word_embeddings=False, torch_dtype="bfloat16"),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=True, torch_dtype="bfloat16"),
}


def get_architecture(name: str, width_divisor: int = 1) -> dict:
    """The published architecture ``name``; ``width_divisor`` > 1 scales it down for CPU (the same depth, vocabulary,
    family and GQA layout; hidden and MLP widths and the head counts divided, heads at least one), e.g. a CPU twin
    of a 7B rehearsal or benchmark."""
    if name not in ARCHITECTURES:
        raise DLZOError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    arch = dict(ARCHITECTURES[name])
    if width_divisor != 1:
        d = int(width_divisor)
        if d < 1 or arch["hidden_size"] % d:
            raise DLZOError(f"architecture {name}: width divisor {width_divisor} must divide its hidden size "
                            f"{arch['hidden_size']}")
        heads = max(1, arch["num_attention_heads"] // d)
        kv = max(1, arch["num_key_value_heads"] * heads // arch["num_attention_heads"])
        arch.update(hidden_size=arch["hidden_size"] // d, intermediate_size=max(1, arch["intermediate_size"] // d),
                    num_attention_heads=heads, num_key_value_heads=kv, head_dim=arch["hidden_size"] // d // heads)
    return arch


def layer_params(arch: dict) -> int:
    """Parameters of one decoder layer: attention (q, k, v, o), the gated MLP, two RMSNorms (and Qwen3's
    per-head q/k norms)."""
    h, inter, hd = arch["hidden_size"], arch["intermediate_size"], arch["head_dim"]
    q, kv = arch["num_attention_heads"] * hd, arch["num_key_value_heads"] * hd
    attention = h * q + 2 * h * kv + q * h
    qk_norms = 2 * hd if arch["model_type"] == "qwen3" else 0
    return attention + 3 * h * inter + 2 * h + qk_norms


def total_params(arch: dict) -> int:
    """Every parameter: the layers, the embeddings (and an untied output head), the final norm."""
    embed = arch["vocab_size"] * arch["hidden_size"]
    head = 0 if arch["tie_word_embeddings"] else embed
    return arch["num_hidden_layers"] * layer_params(arch) + embed + head + arch["hidden_size"]


def lora_params(arch: dict, r: int, targets: tuple[str, ...] = ("q_proj", "v_proj"), layers: int | None = None) -> int:
    """LoRA's A and B of rank ``r`` on ``targets`` in ``layers`` decoder layers (default: every layer)."""
    h, hd = arch["hidden_size"], arch["head_dim"]
    out = {"q_proj": arch["num_attention_heads"] * hd, "k_proj": arch["num_key_value_heads"] * hd,
           "v_proj": arch["num_key_value_heads"] * hd, "o_proj": h}
    per_layer = sum(r * (h + out[t]) for t in targets)
    return per_layer * (arch["num_hidden_layers"] if layers is None else layers)
