import os

# Tests never touch the model hub: a missing local file must fail fast instead of downloading.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
SMOLLM2 = REPO / "results" / "models" / "smollm2-135m"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A 4-layer random LLaMA with a massive activation planted at layer 1 (built, not downloaded)."""
    from dlzo.models import build_tiny

    path = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny(path, arch="llama", layers=4, outlier_layer=1)
    return path


@pytest.fixture(scope="session")
def sst2_data(tmp_path_factory):
    from dlzo.data import prepare

    out = tmp_path_factory.mktemp("data") / "sst2"
    prepare("sst2", f"local:{FIXTURES}", 0, {"train": 6, "dev": 3, "test": 3}, out)
    return out


@pytest.fixture(scope="session")
def sst2_one_byte_data(sst2_data, tmp_path_factory):
    """sst2_data with the candidates "-" and "+": single tokens for the tiny model's byte tokenizer, so that
    shared-prompt scoring (one sequence per example) applies."""
    import json

    out = tmp_path_factory.mktemp("data") / "sst2-one-byte"
    out.mkdir()
    for split in ("train", "dev"):
        rows = [json.loads(x) for x in (sst2_data / f"{split}.jsonl").read_text().splitlines()]
        (out / f"{split}.jsonl").write_text("".join(json.dumps({**r, "candidates": ["-", "+"]}) + "\n" for r in rows))
    return out


@pytest.fixture(scope="session")
def squad_data(tmp_path_factory):
    from dlzo.data import prepare

    out = tmp_path_factory.mktemp("data") / "squad"
    prepare("squad", f"local:{FIXTURES}", 0, {"train": 6, "dev": 3, "test": 3}, out)
    return out


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # CI has 2 cores; one thread per test keeps timings and numbers steady
    yield
