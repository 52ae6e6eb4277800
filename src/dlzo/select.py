"""Stage ``select_hyper``: pick a method's learning rate (and eps) from a grid, on the dev split.

    python -m dlzo.select --logs <run>/log.json ... --out hyper_selection.json

Each log is one grid point of the same (model, task, method), trained with the method's first seed; its
run folder is named ``<method>@lr<lr>[_eps<eps>]``. The chosen point is the one with the lowest
``best_dev_loss`` (the dev loss of its best checkpoint, the same criterion that chooses the checkpoint
inside a run); ties go to the earlier point in the list. A point whose loss diverged keeps the best
checkpoint it reached before that (``diverged_at_step``), or none (dev loss +inf). The test split is
never read. The other seeds then train at the chosen point only (``dlzo.train --selection``), and the chosen
point's run stands for the first seed (``dlzo.evaluate --selection``): both read ``chosen_point``.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from dlzo import DLZOError
from dlzo.io import read_json, write_json
from dlzo.layout import parse
from dlzo.methods import is_grid_point


def _point(path: str) -> dict:
    m = parse("train_log", Path(path).resolve(), "training log")
    if not is_grid_point(m["run"]):
        raise DLZOError(f"training log {path}: not a grid run (expected .../<method>@lr<lr>[_eps<eps>]/seed<n>/log.json)")
    log = read_json(path, "training log")
    hyper = log.get("hyper") or {}
    dev = log.get("best_dev_loss")
    dev = float(dev) if dev is not None else math.nan
    if math.isnan(dev):
        raise DLZOError(f"training log {path}: no dev loss (best_dev_loss is {log.get('best_dev_loss')!r}); a grid "
                        f"needs a dev split (train.dev_eval_size and the task's dev size must be > 0)")
    return {"tag": m["tag"], "method": m["method"], "seed": int(m["seed"]), "log": str(path),
            "lr": hyper.get("lr"), "eps": hyper.get("eps"), "best_dev_loss": dev, "best_step": log.get("best_step"),
            "diverged_at_step": hyper.get("diverged_at_step"), "model": log.get("model"), "task": log.get("task")}


def select(paths: list[str]) -> dict:
    if not paths:
        raise DLZOError("select_hyper: no training logs given")
    points = [_point(p) for p in paths]
    keys = {(p["model"], p["task"], p["method"], p["seed"]) for p in points}
    if len(keys) != 1:
        raise DLZOError(f"select_hyper: the logs are not one (model, task, method, seed): {sorted(map(str, keys))}")
    best = min(range(len(points)), key=lambda i: (points[i]["best_dev_loss"], i))
    model, task, method, seed = keys.pop()
    return {"model": model, "task": task, "method": method, "seed": seed, "criterion": "lowest best_dev_loss",
            "grid": points, "chosen": points[best]}


def chosen_point(selection_path) -> dict:
    """The chosen grid point of a selection file: {"lr": float, "eps": float or None, "run": its run folder}.
    The method's other seeds train at this lr and eps (``dlzo.train --selection``); the run folder stands for
    the method's first seed (``dlzo.evaluate --selection``)."""
    sel = read_json(selection_path, "hyperparameter selection")
    chosen = sel.get("chosen") or {}
    if not isinstance(chosen.get("lr"), (int, float)) or not chosen.get("log"):
        raise DLZOError(f"{selection_path}: no chosen point with an lr and a log (rerun select_hyper)")
    folder = Path(chosen["log"]).parent
    if not (folder / "log.json").exists():
        raise DLZOError(f"{selection_path}: the chosen run {folder} has no log.json (rerun select_hyper)")
    eps = chosen.get("eps")
    return {"lr": float(chosen["lr"]), "eps": float(eps) if eps is not None else None, "run": str(folder)}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="python -m dlzo.select", description=__doc__.split("\n")[0])
    ap.add_argument("--logs", nargs="+", required=True, help="log.json of every grid point")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    res = select(args.logs)
    write_json(args.out, res)
    for p in res["grid"]:
        mark = "  <- chosen" if p is res["chosen"] else ""
        div = f" (diverged at step {p['diverged_at_step']})" if p["diverged_at_step"] is not None else ""
        print(f"{res['task']} {res['method']} {p['tag']}: best dev loss {p['best_dev_loss']:.4f}{div}{mark}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    from dlzo import run_cli

    run_cli(main, "select_hyper")
