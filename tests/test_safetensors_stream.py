"""io.write_safetensors (train.save_tuned's writer): safetensors' own file, byte for byte, one tensor at a time."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dlzo.io import write_safetensors


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(7, 5, generator=g),
        "model.norm.weight": torch.randn(5, generator=g),
        "a.half": torch.randn(3, 4, generator=g).half(),
        "b.bf16": torch.randn(9, generator=g).bfloat16(),
        "c.f64": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "d.i64": torch.arange(6).view(2, 3),
        "e.i32": torch.arange(3, dtype=torch.int32),
        "f.u8": torch.arange(4, dtype=torch.uint8),
        "g.i8": torch.arange(-2, 2, dtype=torch.int8),
        "h.i16": torch.arange(5, dtype=torch.int16),
        "i.bool": torch.tensor([True, False, True]),
        "j.scalar": torch.tensor(1.5),
        "k.empty": torch.zeros(0, 3),
        "B": torch.ones(1),  # upper case sorts before lower case
        "ü.name": torch.ones(2),  # non-ASCII name: raw UTF-8, as serde writes it
    }


@pytest.mark.parametrize("metadata", [None, {"dlzo": json.dumps({"method": "mezo-full", "best_step": 12,
                                                                   "replay": False}, sort_keys=True)},
                                      {"x": "quote \" backslash \\ newline \n tab \t ctrl \x01 é"}])
def test_same_bytes_as_save_file(tmp_path, metadata):
    tensors = _tensors()
    save_file(tensors, tmp_path / "ref.safetensors", metadata=metadata)
    write_safetensors(tmp_path / "ours.safetensors", tensors, metadata)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    back = load_file(tmp_path / "ours.safetensors")
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    with safe_open(tmp_path / "ours.safetensors", "pt") as fh:
        assert fh.metadata() == metadata


def test_model_state_and_non_contiguous(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(33, 17), torch.nn.LayerNorm(17), torch.nn.Linear(17, 2))
    tensors = {n: p.detach() for n, p in model.named_parameters()}
    tensors["t"] = torch.randn(4, 6).t()  # non-contiguous: written as its contiguous copy, as save_file does
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "ref.safetensors", metadata={"k": "v"})
    write_safetensors(tmp_path / "ours.safetensors", tensors, {"k": "v"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_save_tuned_matches_save_file(tmp_path):
    from dlzo.train import _tensors, save_tuned

    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4))
    named = list(model.named_parameters())
    save_tuned(tmp_path / "tuned.safetensors", _tensors(named, host=False), "mezo-full", 3)
    info = json.dumps({"method": "mezo-full", "best_step": 3, "replay": False}, sort_keys=True)
    save_file(_tensors(named), tmp_path / "ref.safetensors", metadata={"dlzo": info})
    assert (tmp_path / "tuned.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
