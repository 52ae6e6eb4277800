"""dlzo.probe: the first activation-outlier layer, on tiny models with a planted massive activation."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dlzo import DLZOError
from dlzo.figures import plot_profile
from dlzo.methods import parse_method, resolve_layer
from dlzo.models import build_tiny, decoder_layers, load_model, load_tokenizer
from dlzo.probe import BUILTIN_TEXTS, LayerStats, load_calibration, main, probe

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = REPO / "results" / "models" / "smollm2-135m"
CPU = torch.device("cpu")
TEXTS = BUILTIN_TEXTS[:6]


def resolve_dominant_layer(probe_json, pinned, model_name):
    """The dominant method's layer and how it was decided (``dlzo.methods.resolve_layer``)."""
    return resolve_layer(parse_method("dominant"), probe_json, pinned, model_name)


def no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("k", [1, 2])
def test_finds_the_planted_layer(tiny_models, k):
    _, model, tok = tiny_models("llama", k)
    r = probe(model, tok, TEXTS)
    assert r["first_outlier_layer"] == k and r["num_layers"] == 4
    assert [L["is_outlier"] for L in r["layers"]] == [i >= k for i in range(4)]  # it persists downstream
    assert [L["index"] for L in r["layers"]] == [0, 1, 2, 3]
    assert all(t["channel"] == 7 for t in r["layers"][k]["top"])  # build_tiny plants it in channel 7
    assert len(r["layers"][k]["top"]) == 5 and "note" not in r
    assert next(p for p in r["picks"] if p["label"] == "Sun et al. 2024")["first_outlier_layer"] == k


def test_stats_match_brute_force(tiny_models):
    """max, median, n_over and the top entries against every hidden state kept in full."""
    _, model, tok = tiny_models("llama", 1)
    full = {}
    hs = [b.register_forward_hook(lambda m, a, o, i=i: full.__setitem__(i, o[0] if isinstance(o, tuple) else o))
          for i, b in enumerate(decoder_layers(model))]
    try:
        enc = tok(TEXTS, return_tensors="pt", padding=True)
        with torch.no_grad():
            model(**enc)
    finally:
        for h in hs:
            h.remove()
    mask = enc["attention_mask"].bool()
    r = probe(model, tok, TEXTS, abs_threshold=100, ratio_threshold=1000, batch_size=8)
    assert r["calibration"]["tokens"] == int(mask.sum())
    for L in r["layers"]:
        h = full[L["index"]]
        a = h.abs()[mask]
        med = float(a.median())
        assert L["max_abs"] == pytest.approx(float(a.max()), rel=1e-6)
        assert L["median_abs"] == pytest.approx(med, rel=2e-3)  # histogram median: bins 0.14% wide
        assert L["n_over"] == int(((a > 100) & (a > 1000 * med)).sum()) and L["n_over_exact"]
        for t in L["top"]:
            assert mask[t["seq"], t["token"]]
            assert h[t["seq"], t["token"], t["channel"]].item() == pytest.approx(t["value"], rel=1e-6)
            assert t["abs"] == pytest.approx(abs(t["value"]))
            assert t["token_text"] == tok.decode([int(enc["input_ids"][t["seq"], t["token"]])])
    assert r["layers"][0]["n_over"] == 0 and r["layers"][1]["n_over"] > 0


def test_abs_threshold(tiny_models):
    _, model, tok = tiny_models("llama", 1)
    r = probe(model, tok, TEXTS, abs_threshold=1e12)
    assert r["first_outlier_layer"] is None and not any(L["is_outlier"] for L in r["layers"])
    assert all(L["n_over"] == 0 for L in r["layers"])
    assert "`dominant_layer`" in r["note"]
    # the preset picks ignore the user's thresholds; the "user" row follows them
    picks = {p["label"]: p["first_outlier_layer"] for p in r["picks"]}
    assert picks["Sun et al. 2024"] == 1 and picks["user"] is None
    # n_over counts only entries over the absolute threshold
    lo = probe(model, tok, TEXTS, abs_threshold=0, ratio_threshold=1)
    assert lo["first_outlier_layer"] == 0 and lo["layers"][1]["n_over"] > lo["layers"][1]["top"].__len__()


def test_ratio_threshold_moves_the_pick(tiny_models):
    """Layer 1 holds a planted outlier; make layer 2's 10x larger: a ratio between the two picks 2."""
    d, _, tok = tiny_models("llama", 1)
    model = load_model(d, CPU, torch.float32)
    with torch.no_grad():
        decoder_layers(model)[2].mlp.down_proj.weight[7].mul_(1e7)
    base = probe(model, tok, TEXTS)
    r1, r2 = base["layers"][1]["ratio"], base["layers"][2]["ratio"]
    assert base["first_outlier_layer"] == 1 and r2 > 2 * r1
    mid = probe(model, tok, TEXTS, ratio_threshold=(r1 * r2) ** 0.5)
    assert mid["first_outlier_layer"] == 2 and not mid["layers"][1]["is_outlier"]
    assert mid["layers"][1]["n_over"] == 0 and mid["layers"][2]["n_over"] > 0
    assert probe(model, tok, TEXTS, ratio_threshold=10 * max(r1, r2, base["layers"][3]["ratio"]))[
        "first_outlier_layer"] is None
    for L in mid["layers"]:  # the documented rule, layer by layer
        assert L["is_outlier"] == (L["max_abs"] > 100 and L["max_abs"] > (r1 * r2) ** 0.5 * L["median_abs"])


def test_no_outlier_model_needs_a_pin(tiny_models, tmp_path):
    _, model, tok = tiny_models("llama", None)
    r = probe(model, tok, TEXTS, model_name="tiny-none")
    assert r["first_outlier_layer"] is None and "dominant_layer" in r["note"] and "tiny-none" in r["note"]
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(r))
    with pytest.raises(DLZOError, match="dominant_layer") as err:
        resolve_dominant_layer(path, None, "tiny-none")
    assert "tiny-none: 3" in str(err.value)
    assert resolve_dominant_layer(path, 2, "tiny-none") == (2, "pinned")
    with pytest.raises(DLZOError, match="past the model's depth"):
        resolve_dominant_layer(path, 4, "tiny-none")
    with pytest.raises(DLZOError, match="does not exist"):
        resolve_dominant_layer(tmp_path / "missing.json", None, "tiny-none")


def test_resolve_uses_the_probe(tiny_models, tmp_path):
    _, model, tok = tiny_models("llama", 2)
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(probe(model, tok, TEXTS)))
    assert resolve_dominant_layer(path, None, "tiny") == (2, "probe")
    assert resolve_dominant_layer(path, 0, "tiny") == (0, "pinned")  # a pin wins over the probe


def test_hooks_are_removed(tiny_models):
    _, model, tok = tiny_models("llama", 1)
    probe(model, tok, TEXTS)
    assert no_hooks(model)
    tok.padding_side = "left"

    def boom(module, args, output):
        raise RuntimeError("boom")
    h = decoder_layers(model)[2].register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            probe(model, tok, TEXTS)
    finally:
        h.remove()
    assert no_hooks(model) and tok.padding_side == "left"  # the tokenizer is given back as it was


def test_batching_and_padding_do_not_change_stats(tiny_models):
    _, model, tok = tiny_models("llama", 1)
    texts = ["Hi.", BUILTIN_TEXTS[0], "A much longer text: " + BUILTIN_TEXTS[4], "Yes?"]
    alone = probe(model, tok, texts, batch_size=1)  # no padding at all
    for bs in (2, 4):
        padded = probe(model, tok, texts, batch_size=bs)
        assert padded["calibration"]["tokens"] == alone["calibration"]["tokens"]
        assert padded["first_outlier_layer"] == alone["first_outlier_layer"] == 1
        for a, b in zip(alone["layers"], padded["layers"]):
            assert b["max_abs"] == pytest.approx(a["max_abs"], rel=1e-5)
            assert b["median_abs"] == pytest.approx(a["median_abs"], rel=2e-3)
            assert b["n_over"] == a["n_over"]
            assert [(t["token"], t["channel"]) for t in b["top"]] == [(t["token"], t["channel"]) for t in a["top"]]


@pytest.mark.parametrize("arch", ["qwen3", "mistral"])
def test_other_architectures(tiny_models, arch):
    _, model, tok = tiny_models(arch, 2)
    r = probe(model, tok, TEXTS)
    assert r["first_outlier_layer"] == 2 and r["layers"][2]["top"][0]["channel"] == 7
    assert no_hooks(model)


def test_nonfinite_activations_name_the_fix():
    s = LayerStats(100.0, 5)
    h = torch.ones(1, 3, 4, dtype=torch.float16)
    h[0, 1, 2] = float("inf")
    with pytest.raises(DLZOError, match="--dtype bf16"):
        s.update(h, torch.ones(1, 3, dtype=torch.bool), 0, 4)


def test_calibration_sources(tmp_path):
    texts, src = load_calibration(None, 3)
    assert texts == BUILTIN_TEXTS[:3] and src == "builtin"
    (tmp_path / "a.txt").write_text("first line\n\n   \nsecond line\nthird\n")
    recs = [{"prompt": "Great film. It was", "candidates": [" terrible", " great"], "label": 1},
            {"prompt": "Q: capital of France?\nA:", "answers": [" Paris", " paris"]},
            {"prompt": "just a prompt"}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert load_calibration([str(tmp_path / "a.txt")], 8)[0] == ["first line", "second line", "third"]
    assert load_calibration([str(tmp_path / "t.jsonl")], 8)[0] == [
        "Great film. It was great", "Q: capital of France?\nA: Paris", "just a prompt"]
    # several files are interleaved, then cut to n_seqs
    texts, src = load_calibration([str(tmp_path / "t.jsonl"), str(tmp_path / "a.txt")], 4)
    assert texts == ["Great film. It was great", "first line", "Q: capital of France?\nA: Paris", "second line"]
    assert src == [str(tmp_path / "t.jsonl"), str(tmp_path / "a.txt")]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x", "candidates": ["a", "b"], "label": 5}) + "\n")
    with pytest.raises(DLZOError, match="record 1"):
        load_calibration([str(tmp_path / "bad.jsonl")], 8)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DLZOError, match="hold no text"):
        load_calibration([str(tmp_path / "empty.txt")], 8)
    with pytest.raises(DLZOError, match="does not exist"):
        load_calibration([str(tmp_path / "nope.txt")], 8)


def test_cli_writes_json_and_png(tiny_models, tmp_path):
    d, _, _ = tiny_models("llama", 1)
    (tmp_path / "cal.txt").write_text("\n".join(BUILTIN_TEXTS[:5]))
    out, png = tmp_path / "o" / "probe.json", tmp_path / "o" / "probe.png"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    run = subprocess.run([sys.executable, "-m", "dlzo.probe", "--model", str(d), "--out", str(out),
                          "--calibration", str(tmp_path / "cal.txt"), "--n-seqs", "4", "--max-len", "32",
                          "--threads", "1"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    # the figure is drawn from the JSON by dlzo.figures (the workflow's plot_probe), not by the probe job
    run = subprocess.run([sys.executable, "-m", "dlzo.figures", "profile", "--probe", str(out), "--out", str(png)],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    r = json.loads(out.read_text())
    assert set(r) >= {"first_outlier_layer", "num_layers", "thresholds", "layers", "picks", "calibration",
                      "model", "provenance"}
    assert r["first_outlier_layer"] == 1 and r["thresholds"] == {"abs": 100.0, "ratio": 1000.0}
    assert r["calibration"]["n_seqs"] == 4 and r["calibration"]["source"] == [str(tmp_path / "cal.txt")]
    assert r["calibration"]["tokens"] <= 4 * 32 and r["model"] == str(d)
    assert set(r["layers"][1]) >= {"index", "max_abs", "median_abs", "ratio", "top", "n_over", "is_outlier"}
    assert set(r["layers"][1]["top"][0]) == {"value", "abs", "seq", "token", "channel", "token_text"}
    assert [p["label"] for p in r["picks"]][-1] == "user" and len(r["picks"]) == 8
    assert r["provenance"]["dtype"] == "float32"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".part")]  # atomic writes left no temp
    with pytest.raises(DLZOError, match="config.json"):  # a folder without a model: a message, not a trace
        main(["--model", str(tmp_path), "--out", str(out)])
    with pytest.raises(DLZOError, match="python -m dlzo.profiles sensitivity"):  # the profiles moved
        main(["sensitivity", "--model", str(d)])


def test_plot_without_outlier(tiny_models, tmp_path):
    _, model, tok = tiny_models("llama", None)
    r = probe(model, tok, TEXTS)
    plot_profile(r, tmp_path / "p.png", title="none")
    assert (tmp_path / "p.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.skipif(not (SMOLLM2 / "config.json").exists(),
                    reason=f"no converted SmolLM2-135M at {SMOLLM2} (the download rule makes it)")
def test_smollm2_has_an_outlier_layer():
    tok = load_tokenizer(SMOLLM2)
    model = load_model(SMOLLM2, CPU, torch.float32)
    r = probe(model, tok, BUILTIN_TEXTS[:4], max_len=64)
    k = r["first_outlier_layer"]
    assert k is not None and 0 < k < r["num_layers"] - 1
    assert r["layers"][k]["max_abs"] > 1000 and r["layers"][k]["ratio"] > 1000
    assert no_hooks(model)
