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


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """tiny_models(arch, k) -> (model dir, model, tokenizer): a 4-layer random model of ``arch`` with a massive
    activation planted at layer ``k`` (None: none), built and loaded once per test module."""
    from dlzo.models import build_tiny, load_model, load_tokenizer

    cache = {}

    def get(arch="llama", k=None):
        if (arch, k) not in cache:
            d = tmp_path_factory.mktemp(f"{arch}_{k}")
            build_tiny(d, arch=arch, layers=4, outlier_layer=k)
            cache[arch, k] = (d, load_model(d, torch.device("cpu"), torch.float32), load_tokenizer(d))
        return cache[arch, k]
    return get


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


# The longest tests first, in this order (the rest keep theirs). Under `make test` (pytest-xdist, -n 2 --dist
# loadscope --no-loadscope-reorder) each module runs whole in one worker, taken in this order: one worker starts
# the tiny DAG (test_workflow.py, whose tests share one run) while the other takes the SLURM run and then the
# rest, so neither waits long at the end. (xdist_group/--dist loadgroup would be finer, but pytest-xdist 3.8
# does not group under pytest 9.) A name not collected is passed over.
LONGEST_FIRST = [
    "test_rehearsal.py::test_rehearsal_twin_runs_every_method_through_the_tables",
    "test_workflow.py::test_tiny_dag_runs_and_second_run_has_nothing_to_do",
    "test_workflow.py::test_tiny_dag_report_has_every_table_and_figure",
    "test_workflow.py::test_tiny_dag_results_carry_their_provenance",
    "test_workflow.py::test_minimal_reruns",
    "test_workflow_slurm.py::test_tiny_dag_through_the_slurm_executor_plugin",
    "test_interrupt.py::test_interrupted_job_finishes_identically",
    "test_bench.py::test_every_mode_measures",
    "test_bench.py::test_paper_scale_scaled_cpu_run",
    "test_train.py::test_sigterm_then_resume_is_bit_identical",
    "test_reference_replay.py::test_replay_rescores_a_committed_run",
    "test_models.py::test_gguf_package_conversion_is_deterministic",
    "test_evaluate.py::test_lm_eval_cli_reproduces",
    "test_bench.py::test_memory_modes_report_what_they_tune",
]


@pytest.hookimpl(trylast=True)  # after pytest's own ordering by fixture scope
def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def key(item):
        return rank.get(f"{item.path.name}::{item.originalname}", len(rank))
    items.sort(key=key)  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # CI has 2 cores; one thread per test keeps timings and numbers steady
    yield
