"""MeZO's token protocol: what the model is fed and which tokens are scored, for training and evaluation.

The one rule both stages use (``objectives.make_batch`` for training, ``harness.MeZOHFLM`` inside lm-eval
for evaluation), as MeZO's ``large_models/utils.py`` (``encode_prompt``) computes it:

* A candidate's sequence is ``tok(prompt + candidate)``, encoded whole with the tokenizer's own special
  tokens (its BOS rule: LLaMA-2 adds ``<s>``; Qwen3 and SmolLM2 add none).
* Its scored tokens are the last ``len(tok(prompt + candidate)) - len(tok(prompt))`` of that sequence.
  A prompt's final newline therefore stays in the input and is not scored, whatever the tokenizer does
  with it: Qwen3 merges ``?\\n`` into one token ``?Ċ`` (fed, not scored); LLaMA-2 keeps ``<0x0A>`` as a
  token of the prompt (fed, not scored). lm-eval's default split differs: it moves the prompt's trailing
  whitespace into the continuation and feeds ``tok(prompt.rstrip())`` + the rest, which drops Qwen3's
  newline from the input and scores LLaMA-2's newline as part of every candidate.
* Longer than ``max_len`` tokens: the sequence keeps its BOS (when the tokenizer adds one) and its last
  ``max_len - 1`` tokens; without a BOS, its last ``max_len`` (MeZO's truncation). Generation tasks are
  truncated to ``max_len - MAX_NEW_TOKENS``, leaving room for the answer (MeZO does this in training too).

Torch-free: the data stage counts truncated examples with it.
"""
from __future__ import annotations

from dataclasses import dataclass

from dlzo import DLZOError

MAX_LEN = 2048        # MeZO's --max_length
MAX_NEW_TOKENS = 50   # MeZO's --max_new_tokens: greedy generation's budget (SQuAD, DROP)


@dataclass(frozen=True)
class Encoded:
    ids: list[int]      # what the model is fed (after truncation)
    n_scored: int       # the last n_scored of ids are the candidate's scored tokens
    n_whole: int        # length before truncation

    @property
    def context(self) -> list[int]:
        return self.ids[: len(self.ids) - self.n_scored]

    @property
    def scored(self) -> list[int]:
        return self.ids[len(self.ids) - self.n_scored:]


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts every encoding with its BOS token (LLaMA-2: yes; Qwen3: no BOS at all)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_special[:1] == [bos] and plain[:1] != [bos]


def truncate(ids: list[int], max_len: int | None, keep_bos: bool) -> list[int]:
    """MeZO's truncation: the first token (BOS) and the last ``max_len - 1``, or the last ``max_len``."""
    if not max_len or len(ids) <= max_len:
        return list(ids)
    if keep_bos:
        return ids[:1] + ids[len(ids) - (max_len - 1):]
    return ids[len(ids) - max_len:]


def generation_max_len(max_len: int | None) -> int | None:
    """The prompt budget of a generation task: MeZO keeps MAX_NEW_TOKENS free for the answer."""
    if not max_len:
        return max_len
    if max_len <= MAX_NEW_TOKENS + 1:
        raise DLZOError(f"max_len {max_len} leaves no room for a prompt: generation tasks need more than "
                        f"{MAX_NEW_TOKENS + 1} tokens ({MAX_NEW_TOKENS} are kept for the answer)")
    return max_len - MAX_NEW_TOKENS


def encode_candidates(tokenizer, prompt: str, candidates: list[str], max_len: int | None = None,
                      keep_bos: bool | None = None, where: str = "") -> list[Encoded]:
    """Each candidate's ``tok(prompt + candidate)`` and scored length, truncated as MeZO does (the module
    doc); the prompt is tokenized once for all of them."""
    n_prompt = len(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    keep = adds_bos(tokenizer) if keep_bos is None else keep_bos
    out = []
    for candidate in candidates:
        whole = tokenizer(prompt + candidate, add_special_tokens=True)["input_ids"]
        n = len(whole) - n_prompt
        if n < 1:
            raise DLZOError(f"{where or 'record'}: candidate {candidate!r} adds no token to its prompt under this "
                            f"tokenizer (len(tok(prompt + candidate)) - len(tok(prompt)) = {n})")
        ids = truncate(whole, max_len, keep)
        if n > len(ids) - int(keep):
            raise DLZOError(f"{where or 'record'}: candidate {candidate!r} has {n} tokens, more than max_len "
                            f"{max_len} leaves after truncation")
        out.append(Encoded(ids, n, len(whole)))
    return out


def encode_candidate(tokenizer, prompt: str, candidate: str, max_len: int | None = None,
                     keep_bos: bool | None = None, where: str = "") -> Encoded:
    """One candidate's encoding (``encode_candidates``)."""
    return encode_candidates(tokenizer, prompt, [candidate], max_len, keep_bos, where)[0]


def count_truncated(tokenizer, records: list[dict], max_len: int | None) -> dict:
    """How many records ``max_len`` truncates (any candidate's sequence, or a generation prompt with the
    gold answer trained on after it) and the longest sequence."""
    from dlzo.tasks import gold_continuation

    keep = adds_bos(tokenizer)
    n, longest = 0, 0
    for rec in records:
        gen = rec.get("candidates") is None  # generation: prompt + gold answer in training
        texts = [gold_continuation(rec)] if gen else rec["candidates"]
        lengths = [e.n_whole for e in encode_candidates(tokenizer, rec["prompt"], texts, None, keep, rec.get("id"))]
        limit = generation_max_len(max_len) if gen else max_len
        longest = max(longest, *lengths)
        n += bool(limit) and max(lengths) > limit
    return {"truncated": n, "of": len(records), "longest": longest}
