"""Training losses of the MeZO protocol, computed with the LM head only where the loss needs it.

``candidates``: each candidate is scored by the MEAN log-probability of its tokens after the prompt;
the loss is the cross-entropy of those scores against the gold candidate (SST-2, RTE, CB, BoolQ,
WSC, MultiRC). ``lm``: teacher-forced LM loss on the gold answer tokens only (COPA, SQuAD, DROP).

Prompt and continuation are tokenised as lm-eval does (trailing spaces of the prompt move to the
continuation; the continuation's tokens are those of prompt+continuation past the prompt's), so
training scores exactly the token sequences that evaluation scores.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dlzo import DLZOError
from dlzo.tasks import gold_continuation


@dataclass
class Batch:
    input_ids: torch.Tensor       # (n_seq, T) right-padded
    attention_mask: torch.Tensor  # (n_seq, T)
    score_pos: torch.Tensor       # (n_tok,) flat index into (n_seq*T) of positions whose logits predict a scored token
    score_tok: torch.Tensor       # (n_tok,) the scored token ids
    score_seq: torch.Tensor       # (n_tok,) which sequence each scored token belongs to
    n_cands: list[int]            # candidates per example (objective "candidates"); [] for "lm"
    labels: torch.Tensor          # (n_examples,) gold candidate index; empty for "lm"
    objective: str


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's HFLM._encode_pair: the same split of prompt and continuation tokens."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=True)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=True)["input_ids"]
    return ctx, whole[len(ctx):]


def make_batch(tokenizer, records: list[dict], objective: str, device: torch.device,
               max_len: int | None = None) -> Batch:
    seqs, conts, n_cands, labels = [], [], [], []
    for rec in records:
        if objective == "candidates":
            cands = rec.get("candidates")
            if not cands:
                raise DLZOError(f"record {rec.get('id')!r}: objective 'candidates' needs a candidates list")
            n_cands.append(len(cands))
            labels.append(int(rec["label"]))
            pairs = [encode_pair(tokenizer, rec["prompt"], c) for c in cands]
        elif objective == "lm":
            pairs = [encode_pair(tokenizer, rec["prompt"], gold_continuation(rec))]
        else:
            raise DLZOError(f"unknown objective {objective!r}: expected 'candidates' or 'lm'")
        for ctx, cont in pairs:
            if not cont:
                raise DLZOError(f"record {rec.get('id')!r}: the continuation has no tokens")
            ids = ctx + cont
            if max_len and len(ids) > max_len:  # keep the end: the continuation must survive truncation
                cut = len(ids) - max_len
                ids = ids[cut:]
            seqs.append(ids)
            conts.append(len(cont))
    T = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    pos, tok, seq_of = [], [], []
    for i, (ids, n_cont) in enumerate(zip(seqs, conts)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        for j in range(len(ids) - n_cont, len(ids)):  # logits at j-1 predict token j
            pos.append(i * T + j - 1)
            tok.append(ids[j])
            seq_of.append(i)
    as_t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return Batch(input_ids.to(device), mask.to(device), as_t(pos), as_t(tok), as_t(seq_of),
                 n_cands, as_t(labels), objective)


def _backbone_and_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None, None


def token_logprobs(model, batch: Batch) -> torch.Tensor:
    """log p(scored token | prefix) for every scored token, in float32."""
    backbone, head = _backbone_and_head(model)
    if backbone is not None and head is not None:
        hidden = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.score_pos)
        logits = head(h).float()
    else:  # models without a separable head: full logits, then pick
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logits = out.reshape(-1, out.shape[-1]).index_select(0, batch.score_pos).float()
    return torch.log_softmax(logits, dim=-1).gather(1, batch.score_tok[:, None]).squeeze(1)


def sequence_scores(model, batch: Batch) -> torch.Tensor:
    """Mean log-prob of each sequence's continuation tokens."""
    lp = token_logprobs(model, batch)
    n_seq = batch.input_ids.shape[0]
    total = torch.zeros(n_seq, device=lp.device).index_add_(0, batch.score_seq, lp)
    count = torch.zeros(n_seq, device=lp.device).index_add_(0, batch.score_seq, torch.ones_like(lp))
    return total / count


def loss(model, batch: Batch) -> torch.Tensor:
    if batch.objective == "lm":
        return -token_logprobs(model, batch).mean()
    scores = sequence_scores(model, batch)
    if len(set(batch.n_cands)) == 1:
        logits = scores.view(len(batch.n_cands), batch.n_cands[0])
        return F.cross_entropy(logits, batch.labels)
    losses, start = [], 0
    for k, label in zip(batch.n_cands, batch.labels):
        losses.append(F.cross_entropy(scores[start:start + k][None], label[None]))
        start += k
    return torch.stack(losses).mean()
