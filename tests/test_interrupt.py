"""Issue 23, item 8: a training job interrupted at any point, then rerun with the same command and run folder
(as Snakemake's retry does), ends exactly as the uninterrupted run: the same trajectory.jsonl bytes, dev
curve, best checkpoint, tuned.safetensors bytes and log.json numbers; and the rerun keeps the work the
interrupted job saved (``resumed_from_step``, ``timing.steps_timed``), as the module docstring of dlzo.train
documents it: a ZO run replays its saved trajectory after SIGTERM or SIGKILL, an FO run resumes from
``fo_state.partial.pt`` after SIGTERM and starts over after SIGKILL.

How: each job runs in a child forked from a driver process (one per method, so torch is imported once per
method, not once per job). Before ``dlzo.train.main`` runs, the child wraps one function at the chosen point
(a step, a forward pass inside a step, the dev loss, a trajectory record, an atomic write, ``Run.finish``, the
stepper's cleanup) to send itself SIGTERM or SIGKILL at its Nth call: no test hook lives in the production
code. The uninterrupted reference runs in a fresh ``python -m dlzo.train`` process. Sizes: 6 steps, a dev
checkpoint every 2.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS, EVAL_EVERY = 6, 2
OUTPUTS = ("log.json", "trajectory.jsonl", "tuned.safetensors")
# log.json fields that differ between two identical runs (wall time, memory of the process, when, where)
# or that say how the run got there (resumed_from_step: checked on its own)
VOLATILE = ("timing", "provenance", "resumed_from_step", "peak_memory_mb", "inference_peak_mb",
            "peak_memory_vs_inference")
# ZO with its exact restore and the prefix cache, ZO with MeZO's in-place restore, ZO LoRA (its adapter/ output
# too), first-order AdamW on one layer (fo-adamw's resume is test_train.py's test_fo_sigterm_then_resume_...)
METHODS = ("layer-1", "mezo-full", "layer-2-lora", "fo-layer-1")
TERM, KILL = "TERM", "KILL"


# ----------------------------------------------------------------------------------- the points

# point: (hook, Nth call, saved steps after SIGTERM (None: the job finishes, exit 0), saved steps after SIGKILL
# (ZO; an FO run killed saves nothing), outputs in place after SIGKILL). The steps saved are what the rerun
# must resume from (log.json's resumed_from_step). A SIGTERM arriving inside a step lets the step finish.
POINTS = {
    # before the first step: the untrained model's dev loss, before the signal handler is installed
    "init": ("dev", 1, 0, 0, ()),
    "first-step": ("step", 1, 1, 0, ()),                     # as the first step starts
    "mid-step": ("forward", 3, 3, 2, ()),                    # inside step 3's forward passes (ZO: between L+ and L-)
    "between": ("step", 4, 4, 3, ()),                        # steps 1-3 done and checkpoint 2 taken, step 4 not begun
    "record-cut": ("record", 4, 4, 3, ()),                   # ZO: as step 4's line is written (SIGKILL: half of it)
    "ckpt-write": ("ckpt", 1, 2, 2, ()),                     # inside the atomic write of checkpoint 2's file
    "after-last": ("step-end", STEPS, STEPS, STEPS - 1, ()),  # the last step computed, not yet recorded
    "final-dev": ("dev", 1 + STEPS // EVAL_EVERY, STEPS, STEPS, ()),  # the last checkpoint's dev evaluation
    "tuned-write": ("write:tuned.safetensors", 1, None, STEPS, ()),  # ZO: tuned.safetensors written aside
    "adapter-write": ("write:adapter", 1, None, STEPS, ("tuned.safetensors",)),  # LoRA: adapter/ written aside
    "before-finish": ("finish", 1, None, STEPS, ("tuned.safetensors",)),  # tuned in place, the rest not
    "traj-write": ("write:trajectory.jsonl", 1, None, STEPS, ("tuned.safetensors",)),
    "log-write": ("write:log.json", 1, None, STEPS, ("tuned.safetensors", "trajectory.jsonl")),
    "cleanup": ("cleanup", 1, None, STEPS, OUTPUTS),          # every output in place, the partial files not removed
    "cleanup-mid": ("cleanup-mid", 1, None, STEPS, OUTPUTS),  # the first partial file removed, not the other
    # (in chains only) a rerun's rewrite of the saved trajectory as it resumes (ZO)
    "resume-rewrite": ("resume-rewrite", 1, 0, 0, ()),
}
ZO_ONLY = {"record-cut", "tuned-write"}  # FO records live in memory; FO copies its best checkpoint into place
LORA_ONLY = {"adapter-write"}
CHAIN_ONLY = {"resume-rewrite"}
# Interrupted more than once: name: (the jobs' points and signals, their exit codes, steps the last rerun
# resumes from for ZO and for FO; None: not run for FO)
CHAINS = {
    # SIGTERM, then the rerun killed while it writes log.json (SIGTERM then, say, the time limit's SIGKILL)
    "term-then-kill-in-writes": ((("between", TERM), ("log-write", KILL)), (128 + signal.SIGTERM, -signal.SIGKILL),
                                 STEPS, 4),
    # SIGKILL, then the rerun killed as it rewrites the saved trajectory (dropping a cut last line)
    "kill-then-kill-in-resume": ((("between", KILL), ("resume-rewrite", KILL)), (-signal.SIGKILL,) * 2, 3, None),
}


def is_fo(method: str) -> bool:
    return method.startswith("fo-")


def is_lora(method: str) -> bool:
    return method.endswith("lora")


def outputs(method: str, point: str | None = None) -> tuple:
    """The run's outputs (LoRA: adapter/ too); with ``point``, those in place after a SIGKILL there."""
    names = POINTS[point][4] if point else OUTPUTS
    lora = is_lora(method) and "tuned.safetensors" in names and point != "adapter-write"
    return tuple(names) + (("adapter",) if lora else ())


def cases():
    for method in METHODS:
        for sig in (TERM, KILL):
            for point in POINTS:
                if not ((is_fo(method) and point in ZO_ONLY) or (not is_lora(method) and point in LORA_ONLY)
                        or point in CHAIN_ONLY):
                    yield method, sig, point
        for chain, (*_, fo_saved) in CHAINS.items():
            if not is_fo(method) or fo_saved is not None:
                yield method, "chain", chain


def stages(sig: str, point: str) -> tuple:
    return CHAINS[point][0] if sig == "chain" else ((point, sig),)


def case_id(method, sig, point) -> str:
    return f"{method}-{sig}-{point}"


def argv(model, data, method, out) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--task", "sst2", "--method", method, "--seed", "0",
            "--out", str(out), "--steps", str(STEPS), "--batch-size", "2", "--eval-every", str(EVAL_EVERY),
            "--lr", "1e-2", "--threads", "1"]


# ----------------------------------------------------------------------- the child (driver side)

def _arm(point: str, sig: str, fo: bool) -> None:
    """Wrap the function at ``point`` so that its Nth call sends this process ``sig``."""
    import dlzo.io as io_mod
    import dlzo.train as T

    hook, n, *_ = POINTS[point]
    signum = signal.SIGTERM if sig == TERM else signal.SIGKILL
    if hook == "ckpt":  # the file a dev checkpoint writes (ZO: its 1st write is the step-0 curve, at the start)
        hook, n = ("write:best.partial.safetensors", n) if fo else ("write:log.partial.json", n + 1)
    calls = collections.Counter()
    in_step = {"on": False, "forwards": 0}

    def hit(key: str) -> bool:
        calls[key] += 1
        return key == hook and calls[key] == n

    def fire():
        os.kill(os.getpid(), signum)

    def wrap_step(real):
        def stepped(*args, **kwargs):
            if hit("step"):
                fire()
            in_step.update(on=True, forwards=0)
            try:
                out = real(*args, **kwargs)
            finally:
                in_step["on"] = False
            if hit("step-end"):
                fire()
            return out
        return stepped

    T.zo_step, T.fo_step = wrap_step(T.zo_step), wrap_step(T.fo_step)
    real_loss = T.objective_loss

    def loss(*args, **kwargs):
        if in_step["on"]:
            in_step["forwards"] += 1
            # ZO: the second forward (L-, after L+); FO: its one forward, before the backward and the update
            if in_step["forwards"] == (1 if fo else 2) and calls["step"] == n and hook == "forward":
                fire()
        return real_loss(*args, **kwargs)

    T.objective_loss = loss

    def wrap_method(cls, name, key, before=None):
        real = getattr(cls, name)

        def wrapped(self, *args, **kwargs):
            if hit(key):
                if before:
                    before(self, *args)
                fire()
            return real(self, *args, **kwargs)
        setattr(cls, name, wrapped)

    wrap_method(T.Run, "dev_loss", "dev")
    wrap_method(T.Run, "finish", "finish")
    for cls in (T.ZOStepper, T.FOStepper):
        wrap_method(cls, "cleanup", "cleanup")
        real_cleanup = cls.cleanup

        def cleanup(self, real=real_cleanup):
            in_step["cleanup"] = True
            return real(self)
        cls.cleanup = cleanup
    real_unlink = Path.unlink

    def unlink(self, *args, **kwargs):  # the first file the stepper's cleanup removes, removed
        real_unlink(self, *args, **kwargs)
        if in_step.get("cleanup") and hit("cleanup-mid"):
            fire()
    Path.unlink = unlink
    real_open = open

    def open_(file, mode="r", *args, **kwargs):  # the saved trajectory opened for a rewrite (truncated)
        fh = real_open(file, mode, *args, **kwargs)
        if Path(file).name == "trajectory.partial.jsonl" and "w" in mode and hit("resume-rewrite"):
            fire()
        return fh
    T.open = open_

    def cut_line(stepper, rec):  # SIGKILL while the line is written: half of it reaches the file
        if signum == signal.SIGKILL:
            line = json.dumps(rec) + "\n"
            stepper.fh.write(line[: len(line) // 2])
            stepper.fh.flush()

    wrap_method(T.ZOStepper, "record", "record", before=cut_line)
    real_atomic = io_mod.atomic_path

    @contextlib.contextmanager
    def atomic(path):
        with real_atomic(path) as tmp:
            yield tmp
            name = Path(path).name
            if hit(f"write:{name}") or (name == "trajectory.partial.jsonl" and hit("resume-rewrite")):
                fire()  # written aside, not yet renamed into place

    io_mod.atomic_path = T.atomic_path = atomic
    real_dir = io_mod.atomic_dir

    @contextlib.contextmanager
    def atomic_dir(path):
        with real_dir(path) as tmp:
            yield tmp
            if hit(f"write:{Path(path).name}"):
                fire()

    io_mod.atomic_dir = atomic_dir


def _child(args: list[str], log: Path, point: str | None, sig: str | None, fo: bool) -> int:
    """Run ``dlzo.train.main(args)`` in a forked child (armed at ``point``); its exit code, -N if killed by N."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: a job as Snakemake starts it, its output to ``log``
        rc = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            for s in (signal.SIGTERM, signal.SIGINT):
                signal.signal(s, signal.SIG_DFL)
            signal.alarm(120)  # a job that hangs ends (exit -14) instead of holding the test
            if point:
                _arm(point, sig, fo)
            import dlzo.train as T

            rc = T.main(args)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - a crash is a result here
            traceback.print_exc()
            rc = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _drive(plan_path: str) -> None:
    """Every case of one method: its interrupted job(s), a snapshot of the run folder after each, the rerun."""
    import tqdm

    import dlzo.train as T

    tqdm.tqdm.monitor_interval = 0  # no monitor thread: the driver forks, and forks should have one thread
    plan = json.loads(Path(plan_path).read_text())
    # one whole run here first, so that every lazy import and first-use setup is done once, before the forks
    warm = list(plan["cases"][0]["argv"])
    warm[warm.index("--out") + 1] = str(Path(plan_path).with_suffix(".warmup"))
    with contextlib.redirect_stderr(open(os.devnull, "w")):
        assert T.main(warm) == 0
    for case in plan["cases"]:
        root, fo = Path(case["dir"]), is_fo(case["method"])
        out = root / "run"
        result = {"stages": []}
        for i, (point, sig) in enumerate(case["stages"]):
            t0 = time.time()
            rc = _child(case["argv"], root / f"stage{i}.log", point, sig, fo)
            shutil.copytree(out, root / f"after{i}") if out.exists() else (root / f"after{i}").mkdir()
            result["stages"].append({"point": point, "signal": sig, "rc": rc, "s": time.time() - t0})
        t0 = time.time()
        result["rerun_rc"] = _child(case["argv"], root / "rerun.log", None, None, fo)
        result["rerun_s"] = time.time() - t0
        (root / "result.json").write_text(json.dumps(result))


# ------------------------------------------------------------------------------ the test side

@pytest.fixture(scope="module")
def matrix(tmp_path_factory, tiny_model, sst2_data):
    """Every case run once: {method: reference run folder} and {case id: case folder}. One process computes
    the references (fresh, nothing inherited), then one driver per method, two at a time (two cores)."""
    root = tmp_path_factory.mktemp("interrupt")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO / "tests")]),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    refs = {m: root / "ref" / m for m in METHODS}
    procs = [("references", subprocess.Popen(
        [sys.executable, "-c", "import json, sys, dlzo.train as T\nfor a in json.loads(sys.argv[1]): assert T.main(a) == 0",
         json.dumps([argv(tiny_model, sst2_data, m, refs[m]) for m in METHODS])],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))]
    dirs = {}
    for method in METHODS:
        plan = []
        for m, sig, point in cases():
            if m != method:
                continue
            d = root / case_id(m, sig, point)
            d.mkdir()
            dirs[m, sig, point] = d
            plan.append({"method": m, "dir": str(d), "stages": stages(sig, point),
                         "argv": argv(tiny_model, sst2_data, m, d / "run")})
        path = root / f"plan-{method}.json"
        path.write_text(json.dumps({"cases": plan}))
        procs.append((method, [sys.executable, "-c", "import sys, test_interrupt as t; t._drive(sys.argv[1])",
                               str(path)]))
    running, failures = [], []

    def reap(name, proc):
        out, _ = proc.communicate(timeout=600)
        if proc.returncode:
            failures.append(f"{name}: exit {proc.returncode}\n{out.decode()[-3000:]}")

    for name, proc in procs:
        if not isinstance(proc, subprocess.Popen):
            proc = subprocess.Popen(proc, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        running.append((name, proc))
        while sum(p.poll() is None for _, p in running) >= 2:
            time.sleep(0.05)
    for name, proc in running:
        reap(name, proc)
    assert not failures, "\n".join(failures)
    return refs, dirs


def _log(path: Path) -> dict:
    log = json.loads(path.read_text())
    return {k: v for k, v in log.items() if k not in VOLATILE}


def _same_outputs(folder: Path, ref: Path, names) -> None:
    """The outputs ``names`` in ``folder`` are complete: the uninterrupted run's, to the byte (log.json: its
    numbers, curves, config; not the timing, memory or provenance)."""
    from safetensors.torch import load_file

    for name in names:
        assert (folder / name).exists(), f"{name} missing"
        if name == "log.json":
            got, want = _log(folder / name), _log(ref / name)
            assert (got["dev_curve"], got["best_step"]) == (want["dev_curve"], want["best_step"])
            assert got == want
        elif name == "tuned.safetensors":
            a, b = load_file(str(folder / name)), load_file(str(ref / name))
            assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), "tuned tensors differ"
            assert (folder / name).read_bytes() == (ref / name).read_bytes()
        elif name == "adapter":  # a folder: the same files, the same bytes
            files = sorted(p.name for p in (ref / name).iterdir())
            assert sorted(p.name for p in (folder / name).iterdir()) == files
            assert all((folder / name / f).read_bytes() == (ref / name / f).read_bytes() for f in files)
        else:
            assert (folder / name).read_bytes() == (ref / name).read_bytes(), f"{name} differs"


def expected_saved(method: str, sig: str, point: str) -> tuple[int | None, int | None]:
    """(exit code of the interrupted job, steps its rerun resumes from; None: the job finished, no rerun)."""
    _, _, on_term, on_kill, _ = POINTS[point]
    if sig == TERM:
        if point == "init":  # before the handler: SIGTERM's default action
            return -signal.SIGTERM, 0
        return (0, None) if on_term is None else (128 + signal.SIGTERM, on_term)
    return -signal.SIGKILL, 0 if is_fo(method) else on_kill


@pytest.mark.parametrize("method, sig, point", list(cases()), ids=[case_id(*c) for c in cases()])
def test_interrupted_job_finishes_identically(matrix, method, sig, point):
    refs, dirs = matrix
    ref, d = refs[method], dirs[method, sig, point]
    result = json.loads((d / "result.json").read_text())
    logs = {p.name: p.read_text()[-2000:] for p in sorted(d.glob("*.log"))}
    why = f"{json.dumps(result)}\n" + "\n".join(f"--- {k}\n{v}" for k, v in logs.items())
    _same_outputs(ref, ref, outputs(method))  # the reference itself is whole
    chain = sig == "chain"
    for i, st in enumerate(result["stages"]):
        after = d / f"after{i}"
        if chain:
            want_rc = CHAINS[point][1][i]
        else:
            want_rc, _ = expected_saved(method, sig, point)
        assert st["rc"] == want_rc, why
        # a file that exists is complete: an interrupted job never leaves a partial output that looks finished
        present = [n for n in outputs(method) if (after / n).exists()]
        _same_outputs(after, ref, present)
        if st["rc"] == 0:  # SIGTERM after the last checkpoint: the job writes its outputs and ends well
            assert sorted(p.name for p in after.iterdir()) == sorted(outputs(method)), why
            continue
        if st["signal"] == KILL:
            assert sorted(present) == sorted(outputs(method, st["point"])), why
        else:
            assert not present, why
            if st["point"] != "init":  # what the docstring promises a SIGTERM saves
                assert f"signal {signal.SIGTERM} after step" in logs[f"stage{i}.log"], why
                saved = "fo_state.partial.pt" if is_fo(method) else "trajectory.partial.jsonl"
                assert (after / saved).exists(), why
        if is_fo(method) and st["signal"] == KILL and not chain:
            assert not (after / "fo_state.partial.pt").exists(), why  # documented: it will start over
    last = result["stages"][-1]
    if last["rc"] == 0:
        return  # finished: Snakemake has nothing to rerun
    assert result["rerun_rc"] == 0, why
    run = d / "run"
    assert sorted(p.name for p in run.iterdir()) == sorted(outputs(method)), why  # no partial or temporary file
    _same_outputs(run, ref, outputs(method))
    log = json.loads((run / "log.json").read_text())
    if chain:
        want = CHAINS[point][3 if is_fo(method) else 2]
    else:
        want = expected_saved(method, sig, point)[1]
    # the rerun kept the saved work: it resumed from it and computed only the steps after it
    assert (log["resumed_from_step"], log["timing"]["steps_timed"]) == (want, STEPS - want), why
