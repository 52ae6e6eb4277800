"""Stand-in SLURM commands for tests: `sbatch`, `srun`, `sacct`, `sacctmgr`, `sinfo`, `squeue`, `scontrol`
and `scancel` that run every job on this machine and record what was asked of them.

``install(bin_dir, state_dir)`` writes one small executable per command into ``bin_dir``; put it first on
PATH and snakemake-executor-plugin-slurm talks to them as to a cluster. They answer in the formats the
plugin parses (its source: snakemake_executor_plugin_slurm/{__init__,accounts,job_status_query,
partitions,submit_string}.py):

* ``sbatch --parsable ... --wrap="<cmd>"`` (or a script file / ``/dev/stdin``) records its argv, parsed
  flags and job script to ``<state>/sbatch.jsonl``, queues the job (PENDING) and prints ``<jobid>`` as
  ``--parsable`` does. A detached runner (``python slurm_standin.py run <jobid>``, its own session, as an
  allocation) waits until the job has been seen PENDING by ``pending_polls`` status queries, then runs the
  script RUNNING (in ``-D``, stdout/stderr to ``--output``, SLURM_* variables set as a real allocation
  would) and stores its end: COMPLETED, or FAILED from a non-zero exit.
* Faults, from ``<state>/faults.json`` (written by the test): ``pending_polls`` (default 0);
  ``fail_first``: rules whose first job fails at once (a node failure: FAILED, exit 1, nothing run);
  ``term``: ``{"rule", "model", "after_lines"}``: the first job of that rule and model gets SIGTERM, as
  SLURM's ``--signal`` delivers it to the job's steps, once its ``trajectory.partial.jsonl`` has that many
  lines. Every state change is appended to ``<state>/transitions.jsonl``, every status answer to
  ``<state>/polls.jsonl``.
* ``sacct -X --parsable2 --noheader --format=JobIdRaw,State --name <run>`` prints ``<id>|<STATE>`` lines;
  ``sacct -nu <user> -o Account%256`` (the plugin's account guess) prints the account.
* ``sacctmgr -n -s list user <user> format=account%256`` prints the account (the plugin validates it).
* ``sinfo -o %P`` lists partitions, the default one starred; ``scontrol show config`` gives MinJobAge
  and MaxArraySize; ``squeue`` answers like sacct; ``scancel`` records and succeeds.
* ``srun [options] <cmd...>`` (the jobstep plugin runs each job through it) records its options to
  ``<state>/srun.jsonl`` and executes ``<cmd...>``; ``scancel <id>`` ends a job's session.

Every call is also appended to ``<state>/calls.jsonl``. The state folder is named by the environment
variable DLZO_SLURM_STANDIN (not SLURM_*: the jobstep plugin strips those before calling srun).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ENV = "DLZO_SLURM_STANDIN"
ACCOUNT = "dlzo-test"
PARTITIONS = ["gpu*", "cpu"]
COMMANDS = ("sbatch", "srun", "sacct", "sacctmgr", "sinfo", "squeue", "scontrol", "scancel")
# sbatch/srun options the plugins pass that take no value
SWITCHES = {"--parsable", "--requeue", "--no-requeue", "--exclusive", "-X"}


def install(bin_dir: Path, state_dir: Path) -> dict[str, str]:
    """Write the stand-in executables; return the environment a run needs (PATH with them first, the state)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).resolve().parent
    for name in COMMANDS:
        exe = bin_dir / name
        exe.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(here)!r})\n"
                       f"from slurm_standin import main\nsys.exit(main({name!r}, sys.argv[1:]))\n")
        exe.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", ENV: str(state_dir)}


def _state() -> Path:
    path = os.environ.get(ENV)
    if not path:
        sys.exit(f"slurm stand-in: ${ENV} is not set (the folder where jobs are recorded)")
    return Path(path)


def _append(name: str, record: dict) -> None:
    with open(_state() / name, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write(json.dumps(record) + "\n")


def _next_jobid() -> int:
    with open(_state() / "jobid.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        last = int(fh.read().strip() or 1000)
        fh.seek(0)
        fh.truncate()
        fh.write(str(last + 1))
        return last + 1


def parse_options(argv: list[str], stop_at_command: bool) -> tuple[dict[str, str | bool], list[str]]:
    """``--opt=value``, ``--opt value``, ``-X value``, ``-Xvalue`` and switches -> (flags, the rest).

    With ``stop_at_command`` (srun) the first word that is not an option starts the command."""
    flags: dict[str, str | bool] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("-") or tok == "-":
            if stop_at_command:
                return flags, argv[i:]
            rest.append(tok)
        elif tok in SWITCHES:
            flags[tok] = True
        elif tok.startswith("--") and "=" in tok:
            key, value = tok.split("=", 1)
            flags[key] = value
        elif tok.startswith("--") or len(tok) == 2:
            if i + 1 >= len(argv):
                sys.exit(f"slurm stand-in: option {tok} needs a value")
            flags[tok] = argv[i + 1]
            i += 1
        else:  # -n1
            flags[tok[:2]] = tok[2:]
        i += 1
    return flags, rest


def sbatch(argv: list[str]) -> int:
    flags, rest = parse_options(argv, stop_at_command=False)
    if "--wrap" in flags:
        script = f"#!/bin/sh\n{flags['--wrap']}\n"
    elif rest:
        script = sys.stdin.read() if rest[0] in ("/dev/stdin", "-") else Path(rest[0]).read_text()
    else:
        print("sbatch: error: no job script and no --wrap", file=sys.stderr)
        return 1
    jobid = _next_jobid()
    name = str(flags.get("--job-name", flags.get("-J", "sbatch")))
    workdir = Path(str(flags.get("-D", flags.get("--chdir", os.getcwd()))))
    _append("sbatch.jsonl", {"jobid": jobid, "argv": argv, "flags": flags, "script": script, "cwd": os.getcwd()})
    env = dict(SLURM_JOB_ID=str(jobid), SLURM_JOBID=str(jobid), SLURM_JOB_NAME=name, SLURM_SUBMIT_DIR=os.getcwd(),
               SLURM_CLUSTER_NAME="standin", SLURM_NTASKS="1", SLURM_JOB_ACCOUNT=str(flags.get("-A", "")),
               SLURM_JOB_PARTITION=str(flags.get("-p", "")))
    for flag, var in (("--cpus-per-task", "SLURM_CPUS_PER_TASK"), ("--mem", "SLURM_MEM_PER_NODE"),
                      ("--gpus", "SLURM_GPUS"), ("--gres", "SLURM_JOB_GRES")):
        if flag in flags:
            env[var] = str(flags[flag])
    log = str(flags.get("--output", workdir / "slurm-%j.out")).replace("%j", str(jobid))
    (_state() / f"job{jobid}.sh").write_text(script)
    target = re.search(r"--target-jobs '(\w+):([^']*)'", script)
    job = {"jobid": jobid, "name": name, "workdir": str(workdir), "log": log, "env": env,
           "rule": target.group(1) if target else None,
           "wildcards": dict(kv.split("=", 1) for kv in target.group(2).split(",")) if target else {}}
    with _locked():
        _write_job(job, state="PENDING", pending_polls=int(_faults().get("pending_polls", 0)))
    runner = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "run", str(jobid)], cwd=workdir,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    with _locked():
        _write_job(_job(jobid), runner_pid=runner.pid)
    print(f"{jobid}" if flags.get("--parsable") else f"Submitted batch job {jobid}")
    return 0


def _faults() -> dict:
    path = _state() / "faults.json"
    return json.loads(path.read_text()) if path.exists() else {}


@contextlib.contextmanager
def _locked():
    """One reader-writer at a time over the jobs' state (sbatch, the runners and sacct run concurrently)."""
    with open(_state() / "state.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _job(jobid: int) -> dict:
    return json.loads((_state() / "jobs" / f"{jobid}.json").read_text())


def _write_job(job: dict, **changes) -> dict:
    """Store a job's record (under _locked); a change of state is appended to transitions.jsonl."""
    if "state" in changes and changes["state"] != job.get("state"):
        _append("transitions.jsonl", {"jobid": job["jobid"], "rule": job["rule"], "state": changes["state"],
                                      "time": time.time(), **({"exit_code": changes["exit_code"]}
                                                               if "exit_code" in changes else {})})
    job = {**job, **changes}
    path = _state() / "jobs" / f"{job['jobid']}.json"
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(job))
    os.replace(tmp, path)
    return job


def _claim_fault(kind: str, job: dict) -> bool:
    """Whether this job is the first of its kind to get fault ``kind`` (each fault strikes once)."""
    faults = _faults()
    spec = faults.get(kind)
    if not spec:
        return False
    if kind == "fail_first":
        hit = job["rule"] in spec
    else:
        hit = job["rule"] == spec["rule"] and job["wildcards"].get("model") == spec.get("model", job["wildcards"].get("model"))
    marker = _state() / f"fault-{kind}-{job['rule']}"
    with _locked():
        if not hit or marker.exists():
            return False
        marker.write_text(str(job["jobid"]))
    return True


def _session_processes(sid: int, needle: str) -> list[int]:
    """Processes of session ``sid`` (this job's allocation) whose command line contains ``needle``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.getsid(int(proc.name)) == sid and needle in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                pids.append(int(proc.name))
        except (OSError, ProcessLookupError):
            continue
    return pids


def run_job(jobid: int) -> int:
    """The allocation: wait PENDING for the status queries, run the script RUNNING, store how it ended."""
    job = _job(jobid)
    deadline = time.time() + 300
    while _job(jobid)["pending_polls"] > 0 and time.time() < deadline:
        time.sleep(0.05)
    Path(job["log"]).parent.mkdir(parents=True, exist_ok=True)
    if _claim_fault("fail_first", job):
        Path(job["log"]).write_text("slurm stand-in: node failure injected before the job started\n")
        with _locked():
            _write_job(_job(jobid), state="FAILED", exit_code=1)
        return 0
    with _locked():
        _write_job(_job(jobid), state="RUNNING")
    term = _faults().get("term") if _claim_fault("term", job) else None
    with open(job["log"], "w") as out:
        proc = subprocess.Popen(["/bin/sh", str(_state() / f"job{jobid}.sh")], cwd=job["workdir"],
                                env={**os.environ, **job["env"]}, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        while term and proc.poll() is None:
            w = job["wildcards"]
            partial = list(Path(job["workdir"]).glob(f"**/train/{w['model']}/{w['task']}/{w['method']}/seed{w['seed']}/"
                                                     "trajectory.partial.jsonl"))
            lines = len(partial[0].read_text().splitlines()) if partial else 0
            targets = _session_processes(os.getsid(0), "dlzo.train") if lines >= term["after_lines"] else []
            for pid in targets:  # what --signal=TERM@<s> does: the job's steps get SIGTERM before the limit
                os.kill(pid, signal.SIGTERM)
            if targets:
                _append("transitions.jsonl", {"jobid": jobid, "rule": job["rule"], "signal": "TERM",
                                              "pids": targets, "partial_lines": lines, "time": time.time()})
                term = None
            time.sleep(0.01)
        code = proc.wait()
    with _locked():
        _write_job(_job(jobid), state="COMPLETED" if code == 0 else "FAILED", exit_code=code)
    return 0


TERMINAL = ("COMPLETED", "FAILED")


def _jobs(name: str | None = None, poll: bool = False) -> list[dict]:
    """The jobs of run ``name``. ``poll``: a status query. A PENDING job counts it down (at zero its runner starts;
    this query still answers PENDING). So that the plugin's back-off (10 s more after each query that finds no job
    ended) does not make the test wait minutes, a query that would report no new end waits (up to 20 s) for one."""
    folder = _state() / "jobs"

    def read():
        jobs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.exists() else []
        return [j for j in jobs if name is None or j["name"] == name]

    if not poll:
        with _locked():
            return read()
    with _locked():
        jobs = read()
        pending = {j["jobid"] for j in jobs if j["state"] == "PENDING"}
        for j in jobs:
            if j["jobid"] in pending and j["pending_polls"] > 0:
                _write_job(j, pending_polls=j["pending_polls"] - 1)
    deadline = time.time() + 20
    while time.time() < deadline:
        with _locked():
            jobs = read()
            if any(j["state"] in TERMINAL and not j.get("reported") for j in jobs) or \
                    all(j["state"] in TERMINAL for j in jobs):
                break
        time.sleep(0.05)
    with _locked():
        jobs = [dict(j, state="PENDING") if j["jobid"] in pending else j for j in read()]
        for j in jobs:
            if j["state"] in TERMINAL and not j.get("reported"):
                _write_job(_job(j["jobid"]), reported=True)
        _append("polls.jsonl", {"time": time.time(), "states": {j["jobid"]: j["state"] for j in jobs}})
    return jobs


def _value(argv: list[str], *names: str) -> str | None:
    """The value of the first of ``names`` given as ``--opt=value`` or ``--opt value``."""
    for i, tok in enumerate(argv):
        for name in names:
            if tok.startswith(name + "="):
                return tok[len(name) + 1:]
            if tok == name and i + 1 < len(argv):
                return argv[i + 1]
    return None


def sacct(argv: list[str]) -> int:
    fmt = (_value(argv, "--format", "-o") or "").lower()
    if fmt.startswith("account"):  # the plugin's guess: sacct -nu <user> -o Account%256 | tail -1
        print(ACCOUNT)
        return 0
    if "reason" in fmt:  # sacct -j <id>.<step> --format=Reason --noheader, after a failure
        jobid, _, step = (_value(argv, "-j", "--jobs") or "").partition(".")
        job = next((j for j in _jobs() if str(j["jobid"]) == jobid), None)
        if job and job["state"] == "FAILED" and step in ("", "0"):
            print(f"NonZeroExitCode ({job['exit_code']})")
        return 0
    if fmt.startswith("jobidraw,state"):
        for job in _jobs(_value(argv, "--name"), poll=True):
            print(f"{job['jobid']}|{job['state']}")
        return 0
    print(f"sacct: error: the stand-in does not answer --format={fmt!r}", file=sys.stderr)
    return 1


def main(tool: str, argv: list[str]) -> int:
    _append("calls.jsonl", {"tool": tool, "argv": argv})
    if tool == "sbatch":
        return sbatch(argv)
    if tool == "srun":
        flags, command = parse_options(argv, stop_at_command=True)
        _append("srun.jsonl", {"jobid": os.environ.get("SLURM_JOB_ID"), "flags": flags, "command": command})
        if not command:
            print("srun: error: no command", file=sys.stderr)
            return 1
        os.execvp(command[0], command)
    if tool == "sacct":
        return sacct(argv)
    if tool == "sacctmgr":  # sacctmgr -n -s list user <user> format=account%256
        if "list" in argv and any(a.lower().startswith("format=account") for a in argv):
            print(ACCOUNT)
            return 0
        print(f"sacctmgr: error: the stand-in does not answer {argv}", file=sys.stderr)
        return 1
    if tool == "sinfo":  # sinfo -o %P: partitions, the default starred
        print("PARTITION\n" + "\n".join(PARTITIONS))
        return 0
    if tool == "squeue":  # squeue --format=%i|%T --states=all --noheader --name <run>
        for job in _jobs(_value(argv, "--name"), poll=True):
            print(f"{job['jobid']}|{job['state']}")
        return 0
    if tool == "scontrol":  # scontrol show config: the two values the plugin reads
        print("Configuration data as of stand-in\nMaxArraySize            = 1001\nMinJobAge               = 300 sec")
        return 0
    if tool == "scancel":  # scancel <id>...: end the jobs' allocations
        for jobid in (a for a in argv if a.isdigit()):
            with contextlib.suppress(OSError, KeyError, FileNotFoundError):
                os.killpg(_job(int(jobid))["runner_pid"], signal.SIGTERM)
        return 0
    print(f"slurm stand-in: unknown command {tool}", file=sys.stderr)
    return 1


if __name__ == "__main__" and sys.argv[1:2] == ["run"]:  # a job's allocation (started by sbatch)
    sys.exit(run_job(int(sys.argv[2])))
