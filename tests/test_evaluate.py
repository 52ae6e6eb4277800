"""dlzo.evaluate: lm-eval task YAML over prepared records, scoring, F1, CLI parity, errors."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import glob
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dlzo import DLZOError
from dlzo.evaluate import cli_command, evaluate, main, process_results, token_f1, write_task_yaml
from dlzo.models import build_tiny, load_model, load_tokenizer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    build_tiny(path, layers=2, hidden=32)
    return path, load_model(path, CPU, torch.float32), load_tokenizer(path)


def split(dir_, records, meta=None):
    dir_.mkdir(parents=True, exist_ok=True)
    (dir_ / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if meta is not None:
        (dir_ / "meta.json").write_text(json.dumps(meta))
    return dir_


def mc(task, prompts, candidates, labels):
    return [{"id": str(i), "task": task, "prompt": p, "candidates": candidates, "label": y, "answers": None}
            for i, (p, y) in enumerate(zip(prompts, labels))]


SST2 = mc("sst2", [f"A film number {i}, {'fine' if i % 2 else 'dull'}. It was" for i in range(6)],
          [" terrible", " great"], [i % 2 for i in range(6)])


def hand_ll(model, tok, context, continuation):
    """MeZO's score, by hand: (sum of log p of the tokens that continuation adds to tok(context), their count),
    feeding tok(context + continuation) whole."""
    ids = tok(context + continuation)["input_ids"]
    n = len(ids) - len(tok(context)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return sum(logp[i - 1, ids[i]].item() for i in range(len(ids) - n, len(ids))), n


def samples(model, tok, tasks_dir, name):
    """lm-eval's per-document log (arguments and responses) for a YAML in tasks_dir."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from dlzo.harness import MeZOHFLM

    out = lm_eval.simple_evaluate(model=MeZOHFLM(pretrained=model, tokenizer=tok, batch_size=4), tasks=[name],
                                  num_fewshot=0, log_samples=True,
                                  task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False))
    return sorted(out["samples"][name], key=lambda s: s["doc_id"])


def test_multiple_choice_yaml_and_accuracy(tiny, tmp_path):
    model_dir, model, tok = tiny
    data = split(tmp_path / "data", SST2)
    name = write_task_yaml("sst2", data / "test.jsonl", tmp_path / "tasks")
    text = (tmp_path / "tasks" / f"{name}.yaml").read_text()
    assert name == "dlzo_sst2" and str((data / "test.jsonl").resolve()) in text
    res = evaluate(model, tok, "sst2", data, tmp_path / "tasks", batch_size=4, limit=None)
    assert res["metric"] == "acc_per_token" and res["value"] == res["metrics"]["acc_per_token"]
    assert all(0.0 <= res["metrics"][m] <= 1.0 for m in ("acc", "acc_norm", "acc_per_token"))
    assert res["n"] == len(SST2) and res["examples_per_s"] > 0
    assert evaluate(model, tok, "sst2", data, tmp_path / "tasks", batch_size=2, limit=3)["n"] == 3


def test_scored_string_is_prompt_plus_candidate(tiny, tmp_path):
    _, model, tok = tiny
    # second record: a prompt ending in a newline (RTE/CB style), candidates without a leading space
    recs = SST2[:2] + mc("rte", ["Cats purr.\nDoes this mean that \"cats talk\" is true? Yes or No?\n"],
                         ["Yes", "No"], [1])
    data = split(tmp_path / "data", recs)
    got = samples(model, tok, tmp_path / "tasks", write_task_yaml("sst2", data / "test.jsonl", tmp_path / "tasks"))
    assert len(got) == 3
    for smp, rec in zip(got, recs):
        prompt = rec["prompt"]
        for (ctx, cont), (ll, _) in zip(smp["arguments"], smp["filtered_resps"]):
            assert (ctx, cont) == (prompt, rec["candidates"][smp["arguments"].index((ctx, cont))])
            # MeZO's tokens: the prompt's newline stays in the input, only the candidate's tokens are scored
            want, n = hand_ll(model, tok, prompt, cont)
            assert ll == pytest.approx(want, abs=1e-4)
    # SST-2 style prompt (no trailing space): exactly the candidate's tokens given the prompt
    (ctx, cont), (ll, _) = got[0]["arguments"][1], got[0]["filtered_resps"][1]
    assert (ctx, cont) == (SST2[0]["prompt"], " great")
    assert ll == pytest.approx(hand_ll(model, tok, SST2[0]["prompt"], " great")[0], abs=1e-4)


def test_three_class_accuracy_matches_hand_argmax(tiny, tmp_path):
    _, model, tok = tiny
    recs = mc("cb", [f"Suppose it rained {i} times. Can we infer that \"it is wet\"? Yes, No, or Maybe?\n"
                     for i in range(6)], ["Yes", "No", "Maybe"], [0, 1, 2, 0, 1, 2])
    data = split(tmp_path / "data", recs)
    res = evaluate(model, tok, "cb", data, tmp_path / "tasks", batch_size=4, limit=None)
    hand = {"acc": [], "acc_per_token": []}
    for r in recs:
        scores = [hand_ll(model, tok, r["prompt"], c) for c in r["candidates"]]
        for metric, key in (("acc", lambda k: scores[k][0]), ("acc_per_token", lambda k: scores[k][0] / scores[k][1])):
            hand[metric].append(float(max(range(3), key=lambda k: (key(k), -k)) == r["label"]))
    assert res["n"] == 6 and res["metric"] == "acc_per_token"
    for metric, hits in hand.items():
        assert res["metrics"][metric] == pytest.approx(sum(hits) / len(hits))


def test_f1_hand_values(tmp_path):
    assert token_f1("The Cat sat", "cat sat.") == 1.0
    # {cat, sat, on, mat} vs {cat, on, hat}: P = 2/4, R = 2/3 -> F1 = 4/7
    assert token_f1("the cat sat on the mat", "a cat on a hat") == pytest.approx(4 / 7)
    assert token_f1("dog", "cat") == 0.0 and token_f1("", "") == 0.0  # SQuAD v1.1: nothing shared -> 0
    best = process_results({"answers": ["a dog", "cat sat", "cat"]}, ["The cat sat."])
    assert best == {"f1": 1.0, "exact_match": 1.0}
    part = process_results({"answers": ["dog", "cat on the mat"]}, ["cat sat"])
    assert part["f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3)) and part["exact_match"] == 0.0
    # the utils.py beside the YAML carries the same code
    split(tmp_path / "data", [{"id": "0", "task": "squad", "prompt": "Q?\nAnswer:", "candidates": None,
                               "label": None, "answers": ["x"]}])
    write_task_yaml("squad", tmp_path / "data" / "test.jsonl", tmp_path / "tasks")
    spec = importlib.util.spec_from_file_location("written_utils", tmp_path / "tasks" / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    assert utils.token_f1("the cat sat on the mat", "a cat on a hat") == pytest.approx(4 / 7)
    assert utils.process_results({"answers": ["dog", "cat on the mat"]}, ["cat sat"]) == part


def greedy(model, tok, prompt, max_new=50):
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0]


def gen_records(model, tok):
    # a randomly initialised tied-embedding model echoes the prompt's last byte: prompts ending in a
    # letter give a word, so the F1 below is not trivially 0
    prompts = [f"Context: item {i}\nQuestion: which?\nAnswer: {'kqz'[i]}" for i in range(3)]
    gens = [greedy(model, tok, p) for p in prompts]
    answers = [["an unrelated answer", gens[0]], ["nothing shared"], [f"{gens[2]} plus more words"]]
    recs = [{"id": str(i), "task": "squad", "prompt": p, "candidates": None, "label": None, "answers": a}
            for i, (p, a) in enumerate(zip(prompts, answers))]
    want = [process_results(r, [g]) for r, g in zip(recs, gens)]
    return recs, gens, want


def test_generation_f1(tiny, tmp_path):
    _, model, tok = tiny
    recs, gens, want = gen_records(model, tok)
    data = split(tmp_path / "data", recs)
    res = evaluate(model, tok, "squad", data, tmp_path / "tasks", batch_size=2, limit=None)
    assert res["metric"] == "f1" and res["n"] == 3 and 0.0 <= res["value"] <= 1.0
    assert res["value"] == pytest.approx(sum(w["f1"] for w in want) / 3)
    assert res["metrics"]["exact_match"] == pytest.approx(sum(w["exact_match"] for w in want) / 3)
    assert 0.3 < res["value"] < 0.9  # 1 + 0 + a partial match
    got = samples(model, tok, tmp_path / "tasks", "dlzo_squad")
    assert [s["filtered_resps"][0] for s in got] == gens


@pytest.mark.slow
def test_lm_eval_cli_reproduces(tiny, tmp_path):
    model_dir, model, tok = tiny
    tasks = tmp_path / "tasks"
    mc_res = evaluate(model, tok, "sst2", split(tmp_path / "mc", SST2), tasks, batch_size=4, limit=None)
    recs, _, _ = gen_records(model, tok)
    gen_res = evaluate(model, tok, "squad", split(tmp_path / "gen", recs), tasks, batch_size=4, limit=None)
    # the command each result records (dlzo.evaluate.cli_command), run as a user would
    cmd = shlex.split(cli_command(model_dir, tasks, "dlzo_sst2,dlzo_squad", 4, "float32", "cpu"))
    assert cmd[:5] == ["python", "-m", "dlzo.harness", "--model", "dlzo-hf"]
    cmd = [sys.executable, *cmd[1:], "--output_path", str(tmp_path / "cli")]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = glob.glob(str(tmp_path / "cli" / "**" / "results_*.json"), recursive=True)
    cli = json.loads(open(path).read())["results"]
    assert mc_res["metric"] == "acc_per_token"
    for metric in ("acc_per_token", "acc", "acc_norm"):  # to the last digit
        assert cli["dlzo_sst2"][f"{metric},none"] == mc_res["metrics"][metric]
    assert cli["dlzo_squad"]["f1,none"] == gen_res["value"]
    # lm-eval's own hf class splits tokens its way: the task refuses to score instead of mixing protocols
    plain = [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={model_dir}",
             "--include_path", str(tasks), "--tasks", "dlzo_sst2", "--device", "cpu"]
    proc = subprocess.run(plain, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode != 0 and "run it with the dlzo-hf model class" in proc.stderr
    print(f"lm-eval CLI took {time.time() - t0:.1f} s")


def test_missing_test_file(tiny, tmp_path):
    _, model, tok = tiny
    missing = tmp_path / "nodata" / "test.jsonl"
    with pytest.raises(DLZOError, match=re.escape(str(missing))):
        write_task_yaml("sst2", missing, tmp_path / "tasks")
    with pytest.raises(DLZOError, match="test.jsonl"):
        evaluate(model, tok, "sst2", tmp_path / "nodata", tmp_path / "tasks", 4, None)
    with pytest.raises(DLZOError, match="test.jsonl"):
        main(["--model", str(tiny[0]), "--data", str(tmp_path / "nodata"), "--task", "sst2",
              "--out", str(tmp_path / "r.json")])


def test_bad_records(tmp_path):
    bad = [dict(SST2[0], label=2)]  # label past the candidates
    split(tmp_path / "data", bad)
    with pytest.raises(DLZOError, match="record 1"):
        write_task_yaml("sst2", tmp_path / "data" / "test.jsonl", tmp_path / "tasks")


def test_main_writes_result(tiny, tmp_path, monkeypatch):
    model_dir, _, _ = tiny
    data = split(tmp_path / "data", SST2, meta={"protocol": "demo: carved from validation"})
    out = tmp_path / "res" / "zero.json"
    main(["--model", str(model_dir), "--data", str(data), "--task", "sst2", "--out", str(out),
          "--batch-size", "4", "--device", "cpu", "--threads", "1", "--seed", "3"])
    res = json.loads(out.read_text())
    assert res["n"] == len(SST2) and res["metric"] == "acc_per_token" and 0 <= res["value"] <= 1
    assert res["protocol"] == "demo: carved from validation" and res["seed"] == 3
    assert res["method"] == "zero-shot" and res["provenance"]["device"] == "cpu"
    assert (tmp_path / "res" / "zero.lm_eval" / "dlzo_sst2.yaml").exists()
    assert "--include_path" in res["lm_eval_cli"] and "dlzo_sst2" in res["lm_eval_cli"]

    # --run goes through dlzo.tuning.load_tuned_model (stubbed here: the base model, call recorded)
    calls = []

    def load_tuned_model(model_dir, run_dir, device, dtype, replay=False, merge=True):
        calls.append(run_dir)
        return load_model(model_dir, device, dtype)

    monkeypatch.setattr("dlzo.tuning.load_tuned_model", load_tuned_model)
    main(["--model", str(model_dir), "--data", str(data), "--task", "sst2", "--run", str(tmp_path / "run"),
          "--out", str(out), "--batch-size", "4", "--device", "cpu", "--method", "dominant"])
    res = json.loads(out.read_text())
    assert calls == [str(tmp_path / "run")] and res["method"] == "dominant"
    assert res["run"] == str(tmp_path / "run") and res["n"] == len(SST2)



def test_fit_offsets_recovers_a_planted_label_bias():
    """Scores that prefer candidate 1 by a constant 2.0: the fitted offsets undo it (their difference), and the
    calibrated accuracy is the bias-free one."""
    from dlzo.evaluate import fit_offsets, offset_accuracy

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (400,), generator=g)
    clean = torch.randn(400, 2, generator=g) * 0.5
    clean[torch.arange(400), labels] += 1.0  # informative scores
    biased = clean.clone()
    biased[:, 1] += 2.0
    off = fit_offsets(biased.tolist(), labels.tolist(), 0.0)
    assert off[0] == 0.0 and abs(off[1] + 2.0) < 0.25
    assert offset_accuracy(biased.tolist(), labels.tolist(), [0.0, 0.0]) < 0.6
    assert offset_accuracy(biased.tolist(), labels.tolist(), off) == pytest.approx(
        offset_accuracy(clean.tolist(), labels.tolist(), [0.0, 0.0]), abs=0.02)
    strong = fit_offsets(biased.tolist(), labels.tolist(), 100.0)  # L2 pulls the offsets towards 0
    assert abs(strong[1] - strong[0]) < abs(off[1] - off[0]) / 5


def test_calibrate_fits_on_train_chooses_on_dev_and_matches_lm_eval(tiny, tmp_path):
    from dlzo.evaluate import calibrate

    path, model, tok = tiny
    d = tmp_path / "sst2"
    recs = mc("sst2", [f"Review {i}: {'a fine' if i % 2 else 'a dull'} film, number {i}. It was" for i in range(24)],
              [" terrible", " great"], [i % 2 for i in range(24)])
    split(d, recs[16:])
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:10]))
    (d / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[10:16]))
    res = calibrate(model, tok, "sst2", d, tmp_path / "tasks", batch_size=4, l2s=(0.0, 1.0))
    # the uncalibrated test accuracy is lm-eval's own (the function raises otherwise), from the same samples
    direct = evaluate(model, tok, "sst2", d, tmp_path / "tasks2", batch_size=4)
    assert res["metric"] == direct["metric"] == "acc_per_token"
    assert res["metrics"]["acc_per_token_uncalibrated"] == pytest.approx(direct["value"])
    assert res["lm_eval_test_metric"] == pytest.approx(direct["value"])
    assert [g["l2"] for g in res["grid"]] == [0.0, 1.0]
    best = max(res["grid"], key=lambda g: g["dev_acc"])
    assert res["metrics"]["dev_acc_per_token"] == best["dev_acc"] and res["offsets"] in [g["offsets"] for g in res["grid"]]
    # the reported value is the test accuracy of argmax(mean token log-prob + offset), recomputed here from
    # lm-eval's samples and the candidates' token counts
    smp = samples(model, tok, tmp_path / "tasks", "dlzo_sst2_test")
    counts = [len(tok(" terrible")["input_ids"]), len(tok(" great")["input_ids"])]  # byte tokenizer, no BOS
    hits = [max((r[0][0] / n + o, -k) for k, (r, n, o) in enumerate(zip(s["resps"], counts, res["offsets"])))[1] * -1
            == rec["label"] for s, rec in zip(smp, recs[16:])]
    assert res["value"] == pytest.approx(sum(hits) / len(hits))
    assert sum(res["predicted_share"]) == pytest.approx(1.0) and res["n_train"] == 10 and res["n_dev"] == 6


def test_calibrate_refuses_generation_tasks_and_missing_splits(tiny, tmp_path):
    from dlzo import DLZOError
    from dlzo.evaluate import calibrate

    path, model, tok = tiny
    d = split(tmp_path / "sst2", SST2)
    with pytest.raises(DLZOError, match=r"train.jsonl does not exist"):
        calibrate(model, tok, "sst2", d, tmp_path / "tasks")
    g = tmp_path / "squad"
    rec = [{"id": "0", "task": "squad", "prompt": "Q: x\nA:", "candidates": None, "label": None, "answers": ["x"]}]
    for name in ("train", "dev", "test"):
        split(g, rec)
        (g / f"{name}.jsonl").write_text(json.dumps(rec[0]) + "\n")
    with pytest.raises(DLZOError, match="multiple-choice"):
        calibrate(model, tok, "squad", g, tmp_path / "tasks")


@pytest.mark.parametrize("method, replay", [("lora-zo", False), ("lora-zo", True), ("layer-1", False)])
def test_tuned_number_rechecked_outside_with_the_recorded_command(tmp_path, tiny_model, sst2_data, method, replay):
    """A tuned run's result records the command that reproduces it outside the pipeline: for a LoRA run, lm-eval
    on the base model with the run's peft adapter folder (``peft=``; evaluated by replay, the adapter is first
    written by ``dlzo.tuning export --adapter --replay``); for another run, the run exported as a model folder,
    then lm-eval on that. Run as a user would, it gives the same numbers."""
    from dlzo.train import main as train

    run = tmp_path / "run"
    assert train(["--model", str(tiny_model), "--data", str(sst2_data), "--task", "sst2", "--method", method,
                  "--seed", "0", "--out", str(run), "--steps", "4", "--batch-size", "2", "--eval-every", "2",
                  "--lr", "1e-1", "--threads", "1"]) == 0
    out = tmp_path / "res.json"
    main(["--model", str(tiny_model), "--data", str(sst2_data), "--task", "sst2", "--run", str(run), "--out", str(out),
          "--batch-size", "2", "--device", "cpu", "--threads", "1", "--method", method] + (["--replay"] if replay else []))
    res = json.loads(out.read_text())
    cmd = res["lm_eval_cli"]
    tuned = Path(res["tasks_dir"]).resolve() / ("tuned_adapter" if method == "lora-zo" else "tuned_model")
    harness = "python -m dlzo.harness --model dlzo-hf --model_args pretrained="
    if method == "lora-zo" and not replay:
        assert cmd.startswith(f"{harness}{tiny_model.resolve()},peft={(run / 'adapter').resolve()},")
    elif method == "lora-zo":
        assert cmd.startswith("python -m dlzo.tuning export ") and " --adapter --replay && " in cmd
        assert f" && {harness}{tiny_model.resolve()},peft={tuned}," in cmd
    else:
        assert cmd.startswith("python -m dlzo.tuning export ") and f" && {harness}{tuned}," in cmd
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run(["bash", "-c", cmd + f" --output_path {tmp_path / 'cli'}"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = glob.glob(str(tmp_path / "cli" / "**" / "results_*.json"), recursive=True)
    cli = json.loads(open(path).read())["results"]["dlzo_sst2"]
    for metric in ("acc_per_token", "acc", "acc_norm"):
        assert cli[f"{metric},none"] == res["metrics"][metric], metric
    if method != "lora-zo":
        exported = json.loads((tuned / "dlzo_export.json").read_text())
        assert exported["run"] == str(run) and exported["method"] == method
