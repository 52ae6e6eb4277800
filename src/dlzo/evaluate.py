"""Evaluate a (tuned) model on a prepared task's test split with lm-eval, on MeZO's tokens.

    python -m dlzo.evaluate --model <model dir> --data <prepared task dir> --task <name>
        [--run <training run dir>] --out <result.json> [--tasks-dir <folder for the lm-eval YAML>]
        [--batch-size 8] [--max-len 2048] [--limit N] [--device auto] [--dtype auto] [--threads N]
        [--method NAME] [--seed N]

The test split is handed to lm-eval as a task YAML over the prepared ``test.jsonl`` (absolute
path), run by lm-eval with the ``dlzo-hf`` model class (``dlzo.harness``: lm-eval's HFLM feeding and
scoring MeZO's tokens), so the same numbers come out of lm-eval's command line on a saved model:

    python -m dlzo.harness --model dlzo-hf --model_args pretrained=<model dir>,dtype=float32,max_length=2048 \\
        --include_path <tasks dir> --tasks dlzo_<task> --batch_size 8

Protocol (MeZO's): each candidate's sequence is ``tok(prompt + candidate)``, its scored tokens those the
candidate adds to ``tok(prompt)`` (``dlzo.tokens``). Multiple choice: the headline ``acc_per_token`` is
the accuracy of the argmax over candidates of the MEAN log-probability of the scored tokens (MeZO's
``run.py``); ``acc`` (argmax of the summed log-likelihood) and ``acc_norm`` (summed log-likelihood divided
by the candidate's length in characters) are lm-eval's, kept beside it. Generation = greedy, at most 50
new tokens, stop at a newline, SQuAD-normalised token F1, max over gold answers. Every value is a
fraction in 0..1 (acc 0.91, not 91).
"""
from __future__ import annotations

import argparse
import collections
import inspect
import json
import re
import string
import sys
import time
from pathlib import Path

from dlzo import DLZOError
from dlzo.io import atomic_path, read_json, read_jsonl, write_json
from dlzo.runtime import add_runtime_args
from dlzo.tokens import MAX_LEN

MAX_GEN_TOKS = 50
MC_METRICS = ("acc_per_token", "acc", "acc_norm")
GEN_METRICS = ("f1", "exact_match")


# --- metrics: SQuAD v1.1 answers, and the multiple-choice accuracies -----------------------------------
# These functions are also copied verbatim into the utils.py written beside the task YAML
# (inspect.getsource), so the task cannot drift from this code. They may use only re, string and collections.

def normalize_answer(s):
    """SQuAD normalisation: lowercase, drop punctuation, drop articles a/an/the, fold whitespace."""
    s = s.lower()
    s = s.translate(str.maketrans("", "", string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def token_f1(prediction, gold):
    """SQuAD v1.1 token F1 (0 when nothing is shared, also when both normalise to empty)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def process_results(doc, results):
    """lm-eval hook for generate_until: best F1 and exact match over the gold answers."""
    pred, golds = results[0], doc["answers"] or [""]
    return {"f1": max(token_f1(pred, g) for g in golds),
            "exact_match": max(float(normalize_answer(pred) == normalize_answer(g)) for g in golds)}


def argmax_first(scores):
    """The first index of the largest score (np.argmax's tie rule, as lm-eval and MeZO break ties)."""
    return max(range(len(scores)), key=lambda k: (scores[k], -k))


def process_choices(doc, results):
    """lm-eval hook for multiple_choice: MeZO's acc_per_token (argmax of the mean token log-probability),
    and lm-eval's acc (summed log-likelihood) and acc_norm (divided by the candidate's characters)."""
    lls = [r[0] for r in results]
    counts = [getattr(ll, "n_tokens", None) for ll in lls]
    if None in counts:
        raise ValueError("this dlzo task scores per token: run it with the dlzo-hf model class "
                         "(python -m dlzo.harness --model dlzo-hf ...), not with " + type(lls[0]).__name__ + "s")
    gold, choices = doc["label"], doc["candidates"]
    return {"acc_per_token": float(argmax_first([ll / n for ll, n in zip(lls, counts)]) == gold),
            "acc": float(argmax_first(lls) == gold),
            "acc_norm": float(argmax_first([ll / max(len(c), 1) for ll, c in zip(lls, choices)]) == gold)}


# --- task YAML ----------------------------------------------------------------------------------------

def task_kind(task: str, records: list[dict]) -> tuple[str, str]:
    """(kind, headline metric) from the task table, checked against what the records look like."""
    from dlzo.tasks import get_task

    kind = "generate" if records and records[0].get("candidates") is None else "multiple_choice"
    spec = get_task(task)
    if records and spec.kind != kind:
        raise DLZOError(f"task {task!r} is {spec.kind} but its test records look like {kind} "
                        f"(candidates {'missing' if kind == 'generate' else 'present'})")
    return spec.kind, spec.metric


def _check_records(records: list[dict], kind: str, path: Path) -> None:
    if not records:
        raise DLZOError(f"test file {path} has no records")
    for i, r in enumerate(records, 1):
        if not isinstance(r.get("prompt"), str):
            raise DLZOError(f"{path}, record {i}: no prompt string")
        if kind == "multiple_choice":
            c, y = r.get("candidates"), r.get("label")
            if not (isinstance(c, list) and len(c) >= 2 and isinstance(y, int) and 0 <= y < len(c)):
                raise DLZOError(f"{path}, record {i}: multiple choice needs >= 2 candidates and a label "
                                f"indexing them (got candidates={c!r}, label={y!r})")
        elif not (isinstance(r.get("answers"), list) and r["answers"]):
            raise DLZOError(f"{path}, record {i}: a generation record needs a non-empty answers list")


def _utils_source() -> str:
    body = "\n\n".join(inspect.getsource(f) for f in (normalize_answer, token_f1, process_results, argmax_first,
                                                      process_choices))
    return ('"""Written by dlzo.evaluate: the metrics of the dlzo tasks (run them with python -m dlzo.harness)."""\n'
            "import collections\nimport re\nimport string\n\n\n" + body)


def _write_text(path: Path, text: str) -> None:
    # skip identical rewrites: lm-eval caches utils.py by mtime, and concurrent readers see no churn
    if path.exists() and path.read_text() == text:
        return
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_task_yaml(task: str, test_jsonl: str | Path, out_dir: str | Path, name: str | None = None) -> str:
    """Write ``<out_dir>/dlzo_<task>.yaml`` (+ utils.py for generation) over ``test_jsonl``.

    Fields are named directly (doc_to_text: prompt), not as Jinja templates: lm-eval then returns the
    record's value untouched (a template's output is re-parsed, e.g. a digit-only prompt turns int).
    target_delimiter is empty: the text scored is exactly prompt + candidate. The tokens are MeZO's only
    under the ``dlzo-hf`` model class (``dlzo.harness``); multiple-choice metrics come from
    ``utils.process_choices``, which refuses to score without that class's token counts.
    """
    test_jsonl = Path(test_jsonl).resolve()  # lm-eval resolves relative data paths against the cwd
    if not test_jsonl.exists():
        raise DLZOError(f"test file {test_jsonl} does not exist: run the data rule for task {task!r} first")
    records = read_jsonl(test_jsonl)
    kind, _ = task_kind(task, records)
    _check_records(records, kind, test_jsonl)
    name = name or f"dlzo_{task}"
    out_dir = Path(out_dir)
    q = json.dumps  # JSON strings are valid YAML scalars, and quote any path safely
    lines = [f"task: {name}", "dataset_path: json",
             f"dataset_kwargs:\n  data_files:\n    test: {q(str(test_jsonl))}",
             "test_split: test", "num_fewshot: 0", "doc_to_text: prompt"]
    _write_text(out_dir / "utils.py", _utils_source())
    if kind == "multiple_choice":
        lines += ["output_type: multiple_choice", "doc_to_choice: candidates", "doc_to_target: label",
                  'target_delimiter: ""', "process_results: !function utils.process_choices", "metric_list:"]
        lines += [f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true" for m in MC_METRICS]
    else:
        lines += ["output_type: generate_until", "doc_to_target: answers", 'target_delimiter: " "',
                  "generation_kwargs:", '  until: ["\\n"]', f"  max_gen_toks: {MAX_GEN_TOKS}",
                  "  do_sample: false", "process_results: !function utils.process_results", "metric_list:"]
        lines += [f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true" for m in GEN_METRICS]
    lines.append("metadata:\n  version: 1.0")
    _write_text(out_dir / f"{name}.yaml", "# written by dlzo.evaluate\n" + "\n".join(lines) + "\n")
    return name


# --- evaluation ---------------------------------------------------------------------------------------

def _flatten(task_result: dict) -> dict:
    """{"acc,none": .., "acc_stderr,none": ..} -> {"acc": .., "acc_stderr": ..}; "N/A" -> None."""
    out = {}
    for key, value in task_result.items():
        if key in ("alias", "name", "sample_len"):
            continue
        metric, _, filt = key.partition(",")
        out[metric if filt in ("", "none") else key] = value if isinstance(value, (int, float)) else None
    return out


def cli_command(model_dir, tasks_dir, name, batch_size, dtype="float32", device="cpu", limit=None,
                max_len: int = MAX_LEN, peft=None) -> str:
    """The lm-eval command (lm-eval's CLI with the dlzo-hf class) that reproduces an evaluation of a saved
    model folder, with the peft adapter folder ``peft`` on it if given."""
    soft = ",softmax_dtype=float32" if dtype in ("float16", "bfloat16") else ""  # as evaluate() does
    adapter = f",peft={Path(peft).resolve()}" if peft else ""
    cmd = (f"python -m dlzo.harness --model dlzo-hf --model_args pretrained={Path(model_dir).resolve()}{adapter},"
           f"dtype={dtype}{soft},max_length={max_len} --include_path {Path(tasks_dir).resolve()} --tasks {name} "
           f"--batch_size {batch_size} --device {device}")
    return cmd + (f" --limit {limit}" if limit else "")


def recheck_command(model_dir, run_dir, replay: bool, tasks_dir, name, batch_size, dtype, device, limit=None,
                    max_len: int = MAX_LEN, lora: bool = False) -> str:
    """The command that reproduces a result outside the pipeline: lm-eval on the base model folder; for a LoRA
    run (``lora``) lm-eval on the base model with the run's peft adapter folder (``peft=<run>/adapter``; a run
    without one, or ``replay``, first writes it with ``python -m dlzo.tuning export --adapter``); for any other
    tuned run, the run exported as a model folder (``python -m dlzo.tuning export``) and lm-eval on that."""
    args = (tasks_dir, name, batch_size, dtype, device, limit, max_len)
    if not run_dir:
        return cli_command(model_dir, *args)
    saved = Path(run_dir) / "adapter"
    if lora and not replay and (saved / "adapter_config.json").exists():
        return cli_command(model_dir, *args, peft=saved)
    folder = Path(tasks_dir).resolve() / ("tuned_adapter" if lora else "tuned_model")
    export = (f"python -m dlzo.tuning export --model {Path(model_dir).resolve()} --run {Path(run_dir).resolve()} "
              f"--out {folder} --device {device} --dtype {dtype}" + (" --adapter" if lora else "")
              + (" --replay" if replay else ""))
    return export + " && " + (cli_command(model_dir, *args, peft=folder) if lora else cli_command(folder, *args))


def _harness_lm(model, tokenizer, batch_size: int, max_len: int):
    """The dlzo-hf lm-eval model over an in-memory model; log-softmax in fp32 for half-precision weights
    (half precision loses digits in the candidates' log-likelihoods)."""
    import torch

    from dlzo.harness import MeZOHFLM

    dtype = next(model.parameters()).dtype
    return MeZOHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_len,
                    softmax_dtype=torch.float32 if dtype in (torch.float16, torch.bfloat16) else None)


def _simple_evaluate(lm, names: list[str], tasks_dir, **kwargs) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=lm, tasks=names, num_fewshot=0, use_cache=None, cache_requests=False, write_out=False,
        # only our folder: indexing lm-eval's built-in task tree is slow and not needed
        task_manager=TaskManager(include_path=str(Path(tasks_dir).resolve()), include_defaults=False), **kwargs)


def evaluate(model, tokenizer, task: str, data_dir, tasks_dir, batch_size: int = 8,
             limit: int | None = None, max_len: int = MAX_LEN) -> dict:
    """Zero-shot lm-eval of an in-memory model on ``<data_dir>/test.jsonl``; see the module doc."""
    test = Path(data_dir) / "test.jsonl"
    name = write_task_yaml(task, test, tasks_dir)
    kind, headline = task_kind(task, read_jsonl(test))
    lm = _harness_lm(model, tokenizer, batch_size, max_len)
    started = time.time()
    out = _simple_evaluate(lm, [name], tasks_dir, limit=limit, log_samples=False, bootstrap_iters=1000)
    seconds = time.time() - started
    metrics = _flatten(out["results"][name])
    n = int(out["n-samples"][name]["effective"])
    if headline not in metrics:
        raise DLZOError(f"lm-eval returned no {headline!r} for {name} (got {sorted(metrics)})")
    result = {"task": task, "lm_eval_task": name, "kind": kind, "metric": headline,
              "value": metrics[headline], "metrics": metrics, "n": n,
              "examples_per_s": round(n / seconds, 3), "seconds": round(seconds, 3),
              "batch_size": batch_size, "limit": limit, "max_len": max_len, "tokens": "mezo"}
    print(f"[evaluate] {task}: {headline}={metrics[headline]:.4f} on {n} examples in {seconds:.1f} s "
          f"({n / seconds:.2f} examples/s, batch {batch_size})", file=sys.stderr)
    return result


# --- calibrated-zero-shot: the bias-only baseline -------------------------------------------------------

def candidate_scores(model, tokenizer, task: str, files: dict, tasks_dir, batch_size: int = 8,
                     max_len: int = MAX_LEN) -> dict:
    """Per split, lm-eval's log-likelihood of every candidate of every record: {split: (scores, labels, metric)}.

    ``files`` maps split -> JSONL. One lm-eval task per split (``dlzo_<task>_<split>``), samples logged; the
    score is what the task's headline metric compares: the mean token log-probability (acc_per_token), the
    summed log-likelihood (acc), or the latter divided by the candidate's length in characters (acc_norm)."""
    names = {split: write_task_yaml(task, path, tasks_dir, name=f"dlzo_{task}_{split}") for split, path in files.items()}
    kind, headline = task_kind(task, read_jsonl(next(iter(files.values()))))
    if kind != "multiple_choice":
        raise DLZOError(f"calibrated-zero-shot needs a multiple-choice task; {task!r} is {kind}")
    lm = _harness_lm(model, tokenizer, batch_size, max_len)
    out = _simple_evaluate(lm, list(names.values()), tasks_dir, log_samples=True, bootstrap_iters=0)
    result = {}
    for split, name in names.items():
        records = read_jsonl(files[split])
        samples = sorted(out["samples"][name], key=lambda x: x["doc_id"])
        if len(samples) != len(records):
            raise DLZOError(f"lm-eval scored {len(samples)} of the {len(records)} records of {files[split]}")
        scores = []
        for rec, smp in zip(records, samples):
            lls = [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in smp["resps"]]
            if headline == "acc_norm":
                lls = [ll / max(len(c), 1) for ll, c in zip(lls, rec["candidates"])]
            elif headline == "acc_per_token":  # the token counts the harness scored (TokenLogLik)
                lls = [ll / ll.n_tokens for ll in lls]
            scores.append([float(ll) for ll in lls])
        lm_metric = _flatten(out["results"][name]).get(headline)
        result[split] = (scores, [int(r["label"]) for r in records], headline, lm_metric)
    return result


def fit_offsets(scores, labels, l2: float):
    """One offset per candidate position, by maximum likelihood of softmax(score + offset) on (scores,
    labels) with an L2 penalty (float64 L-BFGS, deterministic). The first offset is held at 0 when l2 = 0."""
    import torch

    s = torch.tensor(scores, dtype=torch.float64)
    y = torch.tensor(labels)
    free = torch.zeros(s.shape[1] - (1 if l2 == 0 else 0), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([free], lr=1.0, max_iter=200, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def offsets():
        return torch.cat([torch.zeros(1, dtype=torch.float64), free]) if l2 == 0 else free

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(s + offsets(), y) + l2 * (offsets() ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return [float(v) for v in offsets().detach()]


def offset_accuracy(scores, labels, offsets) -> float:
    hits = [argmax_first([a + b for a, b in zip(sc, offsets)]) == y for sc, y in zip(scores, labels)]
    return sum(hits) / len(hits)


def calibrate(model, tokenizer, task: str, data_dir, tasks_dir, batch_size: int = 8,
              l2s=(0.0, 0.01, 0.1, 1.0), max_len: int = MAX_LEN) -> dict:
    """calibrated-zero-shot: offsets fitted on train for each L2 strength, the strength with the best dev
    accuracy kept (ties: the lower dev cross-entropy), its test accuracy reported."""
    import math

    data_dir = Path(data_dir)
    files = {split: data_dir / f"{split}.jsonl" for split in ("train", "dev", "test")}
    for split, path in files.items():
        if not path.exists():
            raise DLZOError(f"{path} does not exist: calibrated-zero-shot fits on train, chooses on dev and "
                            f"reports test; run the data rule for task {task!r} first")
        if not read_jsonl(path):
            raise DLZOError(f"{path} has no records: calibrated-zero-shot needs a non-empty {split} split")
    started = time.time()
    sc = candidate_scores(model, tokenizer, task, files, tasks_dir, batch_size, max_len)
    (tr, ytr, metric, _), (dv, ydv, _, _), (te, yte, _, lm_test) = sc["train"], sc["dev"], sc["test"]
    k = {len(x) for split in sc.values() for x in split[0]}
    if len(k) != 1:
        raise DLZOError(f"task {task!r}: calibrated-zero-shot needs the same number of candidates in every record "
                        f"(got {sorted(k)})")

    def dev_ce(off):
        tot = 0.0
        for s_, y in zip(dv, ydv):
            z = [a + b for a, b in zip(s_, off)]
            m = max(z)
            tot += m + math.log(sum(math.exp(v - m) for v in z)) - z[y]
        return tot / len(dv)

    grid = []
    for l2 in l2s:
        off = fit_offsets(tr, ytr, float(l2))
        grid.append({"l2": float(l2), "offsets": off, "train_acc": offset_accuracy(tr, ytr, off),
                     "dev_acc": offset_accuracy(dv, ydv, off), "dev_ce": dev_ce(off)})
    best = max(range(len(grid)), key=lambda i: (grid[i]["dev_acc"], -grid[i]["dev_ce"], -i))
    chosen = grid[best]
    zero = [0.0] * len(chosen["offsets"])
    uncal = offset_accuracy(te, yte, zero)
    value = offset_accuracy(te, yte, chosen["offsets"])
    seconds = time.time() - started
    result = {"task": task, "kind": "multiple_choice", "metric": metric, "value": value,
              "metrics": {metric: value, f"{metric}_uncalibrated": uncal, f"dev_{metric}": chosen["dev_acc"],
                          f"dev_{metric}_uncalibrated": offset_accuracy(dv, ydv, zero),
                          f"train_{metric}": chosen["train_acc"],
                          f"train_{metric}_uncalibrated": offset_accuracy(tr, ytr, zero)},
              "offsets": chosen["offsets"], "l2": chosen["l2"], "grid": grid,
              "predicted_share": [sum(argmax_first([a + b for a, b in zip(s_, chosen["offsets"])]) == c for s_ in te) / len(te)
                                  for c in range(len(zero))],
              "uncalibrated_predicted_share": [sum(argmax_first(s_) == c for s_ in te) / len(te) for c in range(len(zero))],
              # the uncalibrated test accuracy recomputed from the logged samples equals lm-eval's own metric
              "lm_eval_test_metric": lm_test, "n": len(te), "n_train": len(tr), "n_dev": len(dv),
              "seconds": round(seconds, 3), "batch_size": batch_size}
    if lm_test is not None and abs(lm_test - uncal) > 1e-9:
        raise DLZOError(f"calibrated-zero-shot on {task}: the test {metric} recomputed from lm-eval's samples "
                        f"({uncal:.4f}) differs from lm-eval's ({lm_test:.4f})")
    print(f"[calibrate] {task}: {metric} {uncal:.4f} -> {value:.4f} (offsets {[round(o, 3) for o in chosen['offsets']]}, "
          f"l2 {chosen['l2']}, dev {chosen['dev_acc']:.4f}) in {seconds:.1f} s", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dlzo.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="base model folder (config.json, weights, tokenizer)")
    p.add_argument("--data", required=True, help="prepared task folder holding test.jsonl (and meta.json)")
    p.add_argument("--task", required=True)
    p.add_argument("--run", help="training run folder: evaluate the tuned model (dlzo.tuning.load_tuned_model)")
    p.add_argument("--selection", help="instead of --run: a grid's hyper_selection.json, whose chosen point's run "
                                       "folder is evaluated")
    p.add_argument("--replay", action="store_true",
                   help="with --run: rebuild the tuned weights from the run's trajectory.jsonl (a ZO run folder with "
                        "log.json and trajectory.jsonl suffices), e.g. to re-score a committed reference run")
    p.add_argument("--out", required=True, help="result JSON")
    p.add_argument("--tasks-dir", help="folder for the lm-eval task YAML (default: <out without .json>.lm_eval/)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=MAX_LEN,
                   help="sequences longer than this are truncated keeping BOS, as in training (MeZO's 2048)")
    p.add_argument("--limit", type=int, help="first N test examples only (smoke tests)")
    add_runtime_args(p)
    p.add_argument("--calibrate", action="store_true",
                   help="calibrated-zero-shot: the frozen model's candidate scores plus one offset per candidate, "
                        "fitted on train.jsonl, chosen on dev.jsonl, reported on test.jsonl (multiple choice only)")
    p.add_argument("--calibration-l2", type=float, nargs="+", default=[0.0, 0.01, 0.1, 1.0],
                   help="--calibrate: L2 strengths tried on the offsets (the best dev accuracy is kept)")
    p.add_argument("--method", help="recorded in the result only")
    p.add_argument("--seed", type=int, help="recorded in the result only")
    args = p.parse_args(argv)
    if args.selection and args.run:
        p.error("--selection names the run itself: give --run or --selection, not both")
    if args.replay and not (args.run or args.selection):
        p.error("--replay rebuilds a training run: give --run")

    from dlzo.models import load_model, load_tokenizer
    from dlzo.runtime import provenance, setup_runtime

    started = time.time()
    device, dtype = setup_runtime(args)
    out = Path(args.out)
    tasks_dir = Path(args.tasks_dir) if args.tasks_dir else out.with_name(out.stem + ".lm_eval")
    data_dir = Path(args.data)
    if not (data_dir / "test.jsonl").exists():  # fail before the (slow) model load
        raise DLZOError(f"test file {data_dir / 'test.jsonl'} does not exist: run the data rule first")
    if args.selection:
        from dlzo.select import chosen_point

        args.run = chosen_point(args.selection)["run"]
    tokenizer = load_tokenizer(args.model)
    if args.run:
        from dlzo.tuning import load_tuned_model

        model = load_tuned_model(args.model, args.run, device, dtype, replay=args.replay, merge=False)
    else:
        model = load_model(args.model, device, dtype)
    if args.calibrate:
        if args.run:
            raise DLZOError("--calibrate is the frozen model's baseline: it takes no --run")
        result = calibrate(model, tokenizer, args.task, data_dir, tasks_dir, args.batch_size, args.calibration_l2,
                           args.max_len)
        result["lm_eval_task"] = f"dlzo_{args.task}_test"
    else:
        result = evaluate(model, tokenizer, args.task, data_dir, tasks_dir, args.batch_size, args.limit, args.max_len)
    meta = read_json(data_dir / "meta.json", "data meta file") if (data_dir / "meta.json").exists() else {}
    result.update(
        model=str(args.model), run=args.run, data=str(data_dir), tasks_dir=str(tasks_dir),
        method=args.method or ("calibrated-zero-shot" if args.calibrate else "zero-shot" if not args.run else None),
        seed=args.seed,
        protocol=meta.get("protocol"),
        # outside the pipeline: a LoRA run as its peft adapter on the base model, another tuned run first written
        # as a model folder (dlzo.tuning export)
        lm_eval_cli=recheck_command(args.model, args.run, args.replay, tasks_dir, result["lm_eval_task"],
                                    args.batch_size, str(dtype).replace("torch.", ""), str(device), args.limit,
                                    args.max_len, lora=hasattr(model, "peft_config")),
        provenance=provenance(device, dtype, started, config=vars(args)))
    write_json(out, result)
    return 0


if __name__ == "__main__":
    from dlzo import run_cli

    run_cli(main, "evaluate")
