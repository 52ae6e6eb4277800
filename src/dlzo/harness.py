"""lm-eval, extended to feed and score MeZO's tokens: the ``dlzo-hf`` model class and its command line.

``MeZOHFLM`` is lm-eval's ``HFLM`` with MeZO's token protocol (``dlzo.tokens``) in place of lm-eval's
default context/continuation split, registered with lm-eval as ``dlzo-hf``:

* log-likelihood requests feed ``tok(prompt + candidate)`` (the prompt's final newline stays in the
  input) and score the tokens the candidate adds to ``tok(prompt)``, truncated keeping BOS to
  ``max_length`` (MeZO's 2048 unless given);
* generation prompts are truncated keeping BOS to ``max_length - max_gen_toks``, then left-padded;
* each returned log-likelihood is a ``TokenLogLik``: the float lm-eval expects (the sum over the scored
  tokens) that also carries ``n_tokens``, so the task's ``process_results`` (dlzo.evaluate) can report
  MeZO's metric, the argmax of the MEAN token log-probability (``acc_per_token``), beside ``acc`` and
  ``acc_norm``.
* ``peft=<adapter folder>`` (a LoRA run's ``adapter/``) is loaded by peft onto the model as it is, without
  lm-eval's resize of the embeddings to the tokenizer's length (which changes a model whose ``vocab_size``
  pads its tokenizer's, as Qwen3's does; the adapters add no tokens).

lm-eval's own CLI cannot import a model class from outside lm-eval, so the same CLI runs with the
class registered:

    python -m dlzo.harness --model dlzo-hf --model_args pretrained=<model dir>,dtype=float32,max_length=2048 \\
        --include_path <tasks dir> --tasks dlzo_<task> --batch_size 8

(every other argument is lm-eval's: ``python -m dlzo.harness --help``).
"""
from __future__ import annotations

import sys

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from dlzo.tokens import MAX_LEN, adds_bos, encode_candidate, truncate

MODEL_NAME = "dlzo-hf"


class TokenLogLik(float):
    """A summed log-likelihood (a float, as lm-eval expects) that knows how many tokens it sums."""

    def __new__(cls, value: float, n_tokens: int):
        obj = super().__new__(cls, value)
        obj.n_tokens = int(n_tokens)
        return obj

    def __reduce__(self):  # pickles (lm-eval's request cache) with its count
        return (TokenLogLik, (float(self), self.n_tokens))


@register_model(MODEL_NAME)
class MeZOHFLM(HFLM):
    """``HFLM`` feeding and scoring MeZO's tokens; ``max_length`` defaults to MeZO's 2048."""

    def __init__(self, *args, max_length: int | None = MAX_LEN, **kwargs):
        super().__init__(*args, max_length=int(max_length) if max_length else MAX_LEN, **kwargs)
        self._keep_bos = adds_bos(self.tokenizer)

    def _create_model(self, *args, peft: str | None = None, **kwargs) -> None:
        """lm-eval's, then a ``peft`` adapter folder loaded onto the model with ``PeftModel.from_pretrained``."""
        super()._create_model(*args, **kwargs)
        if peft:
            from peft import PeftModel

            self._model = PeftModel.from_pretrained(self._model, peft)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        enc = encode_candidate(self.tokenizer, context, continuation, self.max_length, self._keep_bos)
        return enc.context, enc.scored

    def _loglikelihood_tokens(self, requests, **kwargs):
        """lm-eval's scoring of ((context, continuation), context ids, continuation ids) requests, each summed
        log-likelihood returned with its continuation's token count (the results come back in request order)."""
        out = super()._loglikelihood_tokens(requests, **kwargs)
        return [(TokenLogLik(ll, len(cont)), greedy) for (ll, greedy), (_, _, cont) in zip(out, requests)]

    def tok_batch_encode(self, strings: list[str], padding_side: str = "left", left_truncate_len: int | None = None,
                         truncation: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Generation prompts: ``tok(prompt)`` each, truncated keeping BOS, padded on ``padding_side``."""
        rows = [truncate(self.tokenizer(s, add_special_tokens=True)["input_ids"], left_truncate_len, self._keep_bos)
                for s in strings]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            span = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
            ids[i, span] = torch.tensor(r, dtype=torch.long)
            mask[i, span] = 1
        return ids, mask


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with ``dlzo-hf`` registered (this module's import registers it)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
