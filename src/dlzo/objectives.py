"""Training losses of the MeZO protocol, computed with the LM head only where the loss needs it.

Tokens are MeZO's (``dlzo.tokens``): each candidate's sequence is ``tok(prompt + candidate)`` with the
tokenizer's BOS rule, truncated keeping BOS, and its scored tokens are those that ``candidate`` adds to
``tok(prompt)``; evaluation (``dlzo.harness``) feeds and scores the same tokens.

``candidates``: each candidate is scored by the MEAN log-probability of its scored tokens; the loss is the
cross-entropy of those scores against the gold candidate (SST-2, RTE, CB, BoolQ, WSC, MultiRC).
``lm``: teacher-forced LM loss on the gold answer's scored tokens only (COPA, SQuAD, DROP). MeZO's own
code (``mezo.sh``: ``--train_as_classification False`` without ``--only_train_option``) takes this loss
over the whole sequence, prompt included; SPEC.md's protocol (answer tokens only) is kept here.

With ``share_prompt``, an example whose candidate sequences differ only in their LAST token (SST-2's
" terrible"/" great"; RTE's, CB's and BoolQ's "Yes"/"No" after the prompt's newline, under tokenizers
where each is one token) is one sequence, the prompt and the tokens the candidates share, and each
candidate's last token is read from the logits at that sequence's last position: the same scores as one
sequence per candidate (up to float rounding), at half the tokens for two.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from dlzo import DLZOError
from dlzo.tasks import gold_continuation


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Examples of ``step``: epochs of seeded permutations, a pure function of (seed, step)."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[k * batch_size:(k + 1) * batch_size]


@dataclass
class Batch:
    input_ids: torch.Tensor       # (n_seq, T) right-padded
    attention_mask: torch.Tensor  # (n_seq, T)
    score_pos: torch.Tensor       # (n_tok,) flat index into (n_seq*T) of positions whose logits predict a scored token
    score_tok: torch.Tensor       # (n_tok,) the scored token ids
    score_seq: torch.Tensor       # (n_tok,) which scored unit (candidate; for "lm", sequence) each token belongs to
    n_cands: list[int]            # candidates per example (objective "candidates"); [] for "lm"
    labels: torch.Tensor          # (n_examples,) gold candidate index; empty for "lm"
    objective: str
    keys: list[tuple] = field(default_factory=list)  # per sequence: (record id, candidate or "prompt"), prefix cache keys
    n_units: int = 0                                 # scored units: one per candidate ("lm": per sequence)
    memo: dict = field(default_factory=dict)          # per-batch work shared by the two perturbed passes


def _shares_prompt(encs: list) -> bool:
    """Candidates whose sequences differ only in their last token (the scored tokens before it shared)."""
    e0 = encs[0]
    return len(encs) > 1 and all(len(e.ids) == len(e0.ids) and e.n_scored == e0.n_scored
                                 and e.ids[:-1] == e0.ids[:-1] for e in encs)


def make_batch(tokenizer, records: list[dict], objective: str, device: torch.device,
               max_len: int | None = None, share_prompt: bool = False, generation: bool | None = None) -> Batch:
    """One padded batch of MeZO's token sequences (``dlzo.tokens``): each candidate's ``tok(prompt + cand)``,
    truncated keeping BOS, scored on its candidate tokens. ``share_prompt``: one sequence for an example
    whose candidates differ only in their last token (the others keep one sequence per candidate).
    ``generation`` (default: records without candidates): the length budget keeps MAX_NEW_TOKENS free."""
    from dlzo.tokens import adds_bos, encode_candidates, generation_max_len

    keep_bos = adds_bos(tokenizer)
    seqs, n_cands, labels, keys = [], [], [], []
    scored: list[tuple[list, bool]] = []  # per sequence: its scored (position, token)s (shared: a list per candidate)
    for rec in records:
        where = f"record {rec.get('id')!r}"
        if objective == "candidates":
            cands = rec.get("candidates")
            if not cands:
                raise DLZOError(f"{where}: objective 'candidates' needs a candidates list")
            n_cands.append(len(cands))
            labels.append(int(rec["label"]))
            texts = cands
        elif objective == "lm":
            texts = [gold_continuation(rec)]
        else:
            raise DLZOError(f"unknown objective {objective!r}: expected 'candidates' or 'lm'")
        gen = rec.get("candidates") is None if generation is None else generation
        limit = generation_max_len(max_len) if gen else max_len
        encs = encode_candidates(tokenizer, rec["prompt"], texts, limit, keep_bos, where)
        if share_prompt and _shares_prompt(encs):
            ids = encs[0].ids[:-1]  # the prompt and the candidates' shared tokens
            keys.append((rec.get("id"), "prompt"))
            seqs.append(ids)
            n = encs[0].n_scored
            common = [(j, ids[j]) for j in range(len(ids) - n + 1, len(ids))]
            # per candidate: the shared tokens, then its own last one, predicted by the sequence's last logits
            scored.append(([[*common, (len(ids), e.ids[-1])] for e in encs], True))
        else:
            for k, e in enumerate(encs):
                keys.append((rec.get("id"), k))
                seqs.append(e.ids)
                scored.append(([(j, e.ids[j]) for j in range(len(e.ids) - e.n_scored, len(e.ids))], False))
    T = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    pos, tok, unit_of = [], [], []
    n_units = 0
    for i, (ids, (marks, shared)) in enumerate(zip(seqs, scored)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        for unit in (marks if shared else [marks]):  # a shared sequence holds one unit per candidate
            for j, t in unit:  # logits at j-1 predict the token at j
                pos.append(i * T + j - 1)
                tok.append(t)
                unit_of.append(n_units)
            n_units += 1
    as_t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return Batch(input_ids.to(device), mask.to(device), as_t(pos), as_t(tok), as_t(unit_of),
                 n_cands, as_t(labels), objective, keys, n_units=n_units)


def _backbone_and_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None, None


def _pick_logprobs(head, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The LM head only at the positions the loss reads (not the whole vocabulary everywhere)."""
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.score_pos)
    return torch.log_softmax(head(h).float(), dim=-1).gather(1, batch.score_tok[:, None]).squeeze(1)


def token_logprobs(model, batch: Batch, prefix: "FrozenPrefix | None" = None) -> torch.Tensor:
    """log p(scored token | prefix) for every scored token, in float32."""
    if prefix is not None:
        return prefix.token_logprobs(batch)
    backbone, head = _backbone_and_head(model)
    if backbone is not None and head is not None:
        hidden = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          use_cache=False).last_hidden_state
        return _pick_logprobs(head, hidden, batch)
    else:  # models without a separable head: full logits, then pick
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        logits = out.reshape(-1, out.shape[-1]).index_select(0, batch.score_pos).float()
        return torch.log_softmax(logits, dim=-1).gather(1, batch.score_tok[:, None]).squeeze(1)


def sequence_scores(model, batch: Batch, prefix: "FrozenPrefix | None" = None) -> torch.Tensor:
    """Mean log-prob of each scored unit's continuation tokens (a unit: a candidate, or an "lm" sequence)."""
    return _scores(token_logprobs(model, batch, prefix), batch)


def _scores(lp: torch.Tensor, batch: Batch) -> torch.Tensor:
    n = batch.n_units or batch.input_ids.shape[0]
    total = torch.zeros(n, device=lp.device).index_add_(0, batch.score_seq, lp)
    count = torch.zeros(n, device=lp.device).index_add_(0, batch.score_seq, torch.ones_like(lp))
    return total / count


def loss(model, batch: Batch, prefix: "FrozenPrefix | None" = None) -> torch.Tensor:
    """The batch's training loss; with ``prefix``, only the layers from the tuned one on are run."""
    return loss_from_logprobs(token_logprobs(model, batch, prefix), batch)


def paired_loss(batch: Batch, prefix: "FrozenPrefix", set_plus, set_minus) -> tuple[torch.Tensor, torch.Tensor]:
    """L(theta + eps z) and L(theta - eps z) of a single-layer step, the frozen suffix run once on both.

    ``set_plus()`` / ``set_minus()`` put the tuned layer's weights at theta +- eps z (called in that
    order, once each); the two outputs of the tuned layer then go through the layers after it as one
    batch of twice the size. Same losses as two ``loss`` calls up to float rounding (GEMM shapes differ).
    """
    lp_plus, lp_minus = prefix.paired_token_logprobs(batch, set_plus, set_minus)
    return loss_from_logprobs(lp_plus, batch), loss_from_logprobs(lp_minus, batch)


def loss_from_logprobs(lp: torch.Tensor, batch: Batch) -> torch.Tensor:
    if batch.objective == "lm":
        return -lp.mean()
    scores = _scores(lp, batch)
    if len(set(batch.n_cands)) == 1:
        logits = scores.view(len(batch.n_cands), batch.n_cands[0])
        return F.cross_entropy(logits, batch.labels)
    losses, start = [], 0
    for k, label in zip(batch.n_cands, batch.labels):
        losses.append(F.cross_entropy(scores[start:start + k][None], label[None]))
        start += k
    return torch.stack(losses).mean()


class _Captured(Exception):
    pass


class FrozenPrefix:
    """Single-layer ZO without recomputing what cannot change: the layers before the tuned one.

    The tuned layer's input depends only on frozen weights, so it is computed once per sequence
    (``cache="dataset"``: for the whole training set up front, in fixed chunks, so resumed runs see
    the same bits) or once per batch (``cache="batch"``: shared by the two perturbed passes). A step
    then runs the tuned layer and the ones after it, and the LM head only at scored positions.
    Works for decoders whose layers take the same keyword arguments (mask, rotary embeddings) from
    the tuned layer on and that end in ``norm``; otherwise ``FrozenPrefix.supported`` says why not.
    """

    def __init__(self, model, layer: int, cache: str = "dataset"):
        from dlzo.models import decoder_layers

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.backbone, self.head = _backbone_and_head(base)
        self.layers = decoder_layers(base)
        self.layer, self.cache = layer, cache
        self.norm = getattr(self.backbone, "norm", None)
        self.store: dict[tuple, torch.Tensor] = {}
        why = self.supported(base, layer)
        if why:
            raise DLZOError(f"no frozen-prefix fast path for {type(base).__name__}: {why}")

    @staticmethod
    def supported(model, layer: int) -> str | None:
        from dlzo.models import decoder_layers

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        backbone, head = _backbone_and_head(base)
        if backbone is None or head is None or getattr(backbone, "norm", None) is None:
            return "no separable decoder / final norm / LM head"
        kinds = {getattr(m, "layer_type", getattr(m, "attention_type", None)) for m in decoder_layers(base)[layer:]}
        if len(kinds) > 1:
            return f"layers from {layer} on mix attention types {sorted(map(str, kinds))}"
        return None

    def _layer_inputs(self, input_ids, attention_mask):
        """Embeddings and the keyword arguments the model hands every decoder layer (mask, rotary)."""
        captured = {}

        def grab(module, args, kwargs):
            captured["h"] = args[0] if args else kwargs["hidden_states"]
            captured["kw"] = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "cache", "past_key_values")}
            captured["kw"]["use_cache"] = False
            raise _Captured

        handle = self.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _Captured:
            pass
        finally:
            handle.remove()
        return captured["h"], captured["kw"]

    @staticmethod
    def _run(h, kw, layers):
        for layer in layers:
            out = layer(h, **kw)
            h = out[0] if isinstance(out, tuple) else out
        return h

    def _prefix(self, batch: Batch) -> torch.Tensor:
        h, kw = self._layer_inputs(batch.input_ids, batch.attention_mask)
        return self._run(h, kw, self.layers[: self.layer])

    @torch.no_grad()
    def fill(self, batches) -> None:
        """Compute and keep the tuned layer's input for every sequence of ``batches`` (cache="dataset")."""
        for batch in batches:
            h = self._prefix(batch)
            lengths = batch.attention_mask.sum(1).tolist()
            for row, key in enumerate(batch.keys):
                self.store[key] = h[row, : lengths[row]].clone()

    def _inputs(self, batch: Batch):
        if "prefix" not in batch.memo:
            _, kw = self._layer_inputs(batch.input_ids, batch.attention_mask)
            if self.cache == "dataset":
                missing = [k for k in batch.keys if k not in self.store]
                if missing:
                    raise DLZOError(f"frozen-prefix cache has no entry for {missing[0]}: call fill() on the training set")
                h = torch.zeros(*batch.input_ids.shape, self.store[batch.keys[0]].shape[-1],
                                dtype=self.store[batch.keys[0]].dtype, device=batch.input_ids.device)
                for row, key in enumerate(batch.keys):
                    t = self.store[key]
                    h[row, : t.shape[0]] = t
            else:
                h = self._prefix(batch)
            batch.memo["prefix"] = (h, kw)
        return batch.memo["prefix"]

    def token_logprobs(self, batch: Batch) -> torch.Tensor:
        h, kw = self._inputs(batch)
        h = self.norm(self._run(h, kw, self.layers[self.layer:]))
        return _pick_logprobs(self.head, h, batch)

    def paired_token_logprobs(self, batch: Batch, set_plus, set_minus) -> tuple[torch.Tensor, torch.Tensor]:
        """The tuned layer at theta+ and at theta-, then the frozen suffix once on both outputs."""
        h, kw = self._inputs(batch)
        tuned = self.layers[self.layer: self.layer + 1]
        set_plus()
        h_plus = self._run(h, kw, tuned)
        set_minus()
        h_minus = self._run(h, kw, tuned)
        n = h.shape[0]
        both = self.norm(self._run(torch.cat([h_plus, h_minus]), _doubled(kw, n), self.layers[self.layer + 1:]))
        return _pick_logprobs(self.head, both[:n], batch), _pick_logprobs(self.head, both[n:], batch)


def _doubled(value, n: int):
    """Layer keyword arguments for a batch stacked twice: per-sequence tensors (leading dim n) repeated,
    broadcast ones (leading dim 1, e.g. position ids) kept as they are."""
    if isinstance(value, dict):
        return {k: _doubled(v, n) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_doubled(v, n) for v in value)
    if torch.is_tensor(value) and value.ndim and value.shape[0] == n and n > 1:
        return torch.cat([value, value])
    return value


def measure_inference(model, batch, device, amp=contextlib.nullcontext) -> float:
    """Peak memory (MB) of a no-grad forward of ``batch``: GPU peak allocation (the peak is reset after it), or on
    CPU the process's peak RSS so far (it only grows: measure before anything of training exists)."""
    from dlzo.runtime import peak_memory_mb

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad(), amp():
        loss(model, batch)
    peak = peak_memory_mb(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return peak
