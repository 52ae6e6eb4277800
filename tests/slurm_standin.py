"""Stand-in SLURM commands for tests: `sbatch`, `srun`, `sacct`, `sacctmgr`, `sinfo`, `squeue`, `scontrol`
and `scancel` that run every job on this machine and record what was asked of them.

``install(bin_dir, state_dir)`` writes one small executable per command into ``bin_dir``; put it first on
PATH and snakemake-executor-plugin-slurm talks to them as to a cluster. They answer in the formats the
plugin parses (its source: snakemake_executor_plugin_slurm/{__init__,accounts,job_status_query,
partitions,submit_string}.py):

* ``sbatch --parsable ... --wrap="<cmd>"`` (or a script file / ``/dev/stdin``) records its argv, parsed
  flags and job script to ``<state>/sbatch.jsonl``, runs the script here (synchronously, in ``-D``
  with stdout/stderr to ``--output``, SLURM_* variables set as a real allocation would), stores the
  job's state (COMPLETED, or FAILED from a non-zero exit) and prints ``<jobid>`` as ``--parsable`` does.
* ``sacct -X --parsable2 --noheader --format=JobIdRaw,State --name <run>`` prints ``<id>|<STATE>`` lines;
  ``sacct -nu <user> -o Account%256`` (the plugin's account guess) prints the account.
* ``sacctmgr -n -s list user <user> format=account%256`` prints the account (the plugin validates it).
* ``sinfo -o %P`` lists partitions, the default one starred; ``scontrol show config`` gives MinJobAge
  and MaxArraySize; ``squeue`` answers like sacct; ``scancel`` records and succeeds.
* ``srun [options] <cmd...>`` (the jobstep plugin runs each job through it) records its options to
  ``<state>/srun.jsonl`` and executes ``<cmd...>``.

Every call is also appended to ``<state>/calls.jsonl``. The state folder is named by the environment
variable DLZO_SLURM_STANDIN (not SLURM_*: the jobstep plugin strips those before calling srun).
"""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
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
    record = {"jobid": jobid, "argv": argv, "flags": flags, "script": script, "cwd": os.getcwd()}
    _append("sbatch.jsonl", record)
    _write_state(jobid, name, "RUNNING")
    env = dict(os.environ, SLURM_JOB_ID=str(jobid), SLURM_JOBID=str(jobid), SLURM_JOB_NAME=name,
               SLURM_SUBMIT_DIR=os.getcwd(), SLURM_CLUSTER_NAME="standin", SLURM_NTASKS="1",
               SLURM_JOB_ACCOUNT=str(flags.get("-A", "")), SLURM_JOB_PARTITION=str(flags.get("-p", "")))
    for flag, var in (("--cpus-per-task", "SLURM_CPUS_PER_TASK"), ("--mem", "SLURM_MEM_PER_NODE"),
                      ("--gpus", "SLURM_GPUS"), ("--gres", "SLURM_JOB_GRES")):
        if flag in flags:
            env[var] = str(flags[flag])
    log = Path(str(flags.get("--output", workdir / "slurm-%j.out")).replace("%j", str(jobid)))
    log.parent.mkdir(parents=True, exist_ok=True)
    script_path = _state() / f"job{jobid}.sh"
    script_path.write_text(script)
    with open(log, "w") as out:
        code = subprocess.run(["/bin/sh", str(script_path)], cwd=workdir, env=env, stdout=out,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    _write_state(jobid, name, "COMPLETED" if code == 0 else "FAILED", code)
    print(f"{jobid}" if flags.get("--parsable") else f"Submitted batch job {jobid}")
    return 0


def _write_state(jobid: int, name: str, state: str, exit_code: int | None = None) -> None:
    path = _state() / "jobs" / f"{jobid}.json"
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"jobid": jobid, "name": name, "state": state, "exit_code": exit_code}))
    os.replace(tmp, path)


def _jobs(name: str | None = None) -> list[dict]:
    folder = _state() / "jobs"
    jobs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.exists() else []
    return [j for j in jobs if name is None or j["name"] == name]


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
        for job in _jobs(_value(argv, "--name")):
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
        for job in _jobs(_value(argv, "--name")):
            print(f"{job['jobid']}|{job['state']}")
        return 0
    if tool == "scontrol":  # scontrol show config: the two values the plugin reads
        print("Configuration data as of stand-in\nMaxArraySize            = 1001\nMinJobAge               = 300 sec")
        return 0
    if tool == "scancel":
        return 0
    print(f"slurm stand-in: unknown command {tool}", file=sys.stderr)
    return 1
