"""A stand-in `conda` for Snakemake's real conda deployment (`--sdm conda`), and the per-env check built on it:
every rule of the tiny DAG runs in the env its rule names, each env holding exactly its env file's packages.

No conda channel is reachable here (shared/OFFLINE.md), and installing torch once per env from pip would take
minutes. So ``conda env create --file <env.yaml> --prefix <p>`` builds a venv (`python -m venv --without-pip`, the
same Python) whose site-packages holds, for each `name==version` of the file's pip section, symlinks to exactly
that distribution's files in this venv (its RECORD, via importlib.metadata): a package not in the file is not
importable there. The commands are those Snakemake 9 calls (snakemake/deployment/conda.py): `conda info --json`
(the base prefix, whose bin/activate the jobs source), `conda --version` (>= 24.7.1), `conda config --get
channel_priority --json`, `conda env create --quiet --no-default-packages --file F --prefix P`; every job then
runs `source <base>/bin/activate '<env>'; <command>`, and Snakemake drops an inherited PYTHONPATH, so dlzo comes
from the rules' own `export PYTHONPATH=src` (workflow/rules/common.smk), as on a cluster.

    python tests/conda_standin.py check [--keep DIR]     (make env-check): the table below, exit 1 on a failure

prints, per env and rule, `pass` or `FAIL` with the missing module (e.g. `env tables  rule tables  FAIL  No
module named 'pandas'`).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from importlib import metadata as md
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.version import Version

VERSION = "24.7.1"  # Snakemake's MIN_CONDA_VER
ENV = "DLZO_CONDA_STANDIN"  # the base prefix: bin/conda, bin/activate, created.jsonl
SITE = f"lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"
ACTIVATE = """\
# stand-in for conda's activate: `source activate <env prefix>` puts the env's bin first on PATH
[ -d "$1/bin" ] || {{ echo "activate: no environment at $1" >&2; return 1; }}
export PATH="$1/bin:$PATH" CONDA_PREFIX="$1" CONDA_DEFAULT_ENV="$1" CONDA_EXE="{conda}"
unset PYTHONHOME
echo "$1" >> "{base}/activated.txt"
"""


def install(base: Path) -> dict[str, str]:
    """Write the stand-in base prefix (bin/conda, bin/activate); return the environment a run needs."""
    (base / "bin").mkdir(parents=True, exist_ok=True)
    conda = base / "bin" / "conda"
    conda.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                     f"from conda_standin import main\nsys.exit(main(sys.argv[1:]))\n")
    conda.chmod(0o755)
    (base / "bin" / "activate").write_text(ACTIVATE.format(conda=conda, base=base))
    return {"PATH": f"{base / 'bin'}{os.pathsep}{os.environ['PATH']}", ENV: str(base)}


def env_pins(env_file: Path) -> dict[str, str]:
    """{distribution: version} of an env file's pip section; the conda section must be this Python (pip, conda's
    installer, is imported by no rule: the stand-in needs none)."""
    spec = yaml.safe_load(env_file.read_text())
    pins, pip = {}, []
    for dep in spec["dependencies"]:
        if isinstance(dep, dict):
            pip += dep["pip"]
        elif dep.startswith("python"):
            want = dep.split("==")[-1]
            if want != f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}":
                raise SystemExit(f"{env_file}: {dep}, but the stand-in can only build envs of this Python, "
                                 f"{sys.version.split()[0]}")
    for line in pip:
        if line.startswith("-"):  # --extra-index-url: where pip looks, nothing to link
            continue
        req = Requirement(line)
        pins[req.name] = str(next(iter(req.specifier)).version)
    return pins


def link_env(env_file: Path, prefix: Path) -> int:
    """The venv of ``env_file`` at ``prefix``: symlinks to the files of exactly its pinned distributions."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(prefix)], check=True)
    site = prefix / SITE
    n, linked = 0, set()
    owners = _owners()
    for name, version in env_pins(env_file).items():
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            raise SystemExit(f"{env_file}: {name}=={version} is not installed in {sys.prefix} (run make setup)") from None
        # the public version must match; the local label may not (the env's torch+cu126 is this venv's torch+cpu)
        if Version(dist.version).public != Version(version).public:
            raise SystemExit(f"{env_file}: {name}=={version} but {sys.prefix} has {dist.version}")
        own = {dist.name}  # read once: each .name parses the METADATA file again
        for f in dist.files or []:
            src = Path(dist.locate_file(f))
            if not src.is_file():
                continue
            if f.parts[0] == "..":  # a console script in bin/: its shebang must name the env's python
                dst = prefix / "bin" / f.name
                text = src.read_bytes()
                if text.startswith(b"#!"):
                    text = b"#!" + str(prefix / "bin" / "python").encode() + text[text.index(b"\n"):]
                dst.write_bytes(text)
                dst.chmod(0o755)
            elif owners.get(f.parts[0]) == own and len(f.parts) > 1:
                # a folder no other distribution writes into (torch/): one link for all its files, fast
                if f.parts[0] not in linked:
                    (site / f.parts[0]).symlink_to(dist.locate_file(f.parts[0]))
                    linked.add(f.parts[0])
            else:  # a shared folder (a namespace package) or a top-level file: file by file
                dst = site / f
                dst.parent.mkdir(parents=True, exist_ok=True)
                if not dst.exists():
                    dst.symlink_to(src)
            n += 1
    return n


def _owners() -> dict[str, set[str]]:
    """{top-level entry of site-packages: the installed distributions with files in it}."""
    out: dict[str, set[str]] = {}
    for dist in md.distributions():
        name = dist.name
        for top in {f.parts[0] for f in dist.files or []}:
            out.setdefault(top, set()).add(name)
    return out


def main(argv: list[str]) -> int:
    base = Path(os.environ.get(ENV) or Path(sys.argv[0]).resolve().parent.parent)
    if argv == ["--version"]:
        print(f"conda {VERSION}")
    elif argv[:2] == ["info", "--json"]:
        print(json.dumps({"conda_prefix": str(base), "root_prefix": str(base), "platform": "linux-64",
                          "conda_version": VERSION, "envs_dirs": [], "pkgs_dirs": []}))
    elif argv[:3] == ["config", "--get", "channel_priority"]:
        print(json.dumps({"get": {"channel_priority": "strict"}, "rc_path": None, "success": True, "warnings": []}))
    elif argv[:2] == ["env", "create"]:
        opts = {a: b for a, b in zip(argv, argv[1:]) if a in ("--file", "--prefix")}
        env_file, prefix = Path(opts["--file"]), Path(opts["--prefix"])
        n = link_env(env_file, prefix)
        with open(base / "created.jsonl", "a") as fh:
            fh.write(json.dumps({"prefix": str(prefix), "file": str(env_file), "files": n}) + "\n")
        print(f"stand-in conda: {prefix} holds the {n} files of {env_file.name}'s packages")
    elif argv[:1] == ["clean"]:
        pass
    else:
        print(f"stand-in conda: `conda {' '.join(argv)}` is not implemented (Snakemake 9 does not call it "
              f"for a plain --sdm conda run)", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------------------------------------------------------
# The per-env check: the tiny DAG, cut to one job or two per rule, through `snakemake --sdm conda`.

def check_config(tiny: Path, out: Path) -> Path:
    """workflow/configs/tiny.yaml with one task, one grid method and no sweep: every rule still runs
    (download, data, the three probes and their plots, a 2-point grid, select_hyper, the three evaluations,
    tables), each once or twice, so that the check adds a minute, not the whole tiny DAG's time."""
    cfg = yaml.safe_load(tiny.read_text())
    cfg["tasks"] = {"sst2": cfg["tasks"]["sst2"]}
    cfg.update(methods=["zero-shot", "dominant"], sweep_layers=[], method_seeds={}, results="results/env-check")
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def rule_envs(root: Path) -> dict[str, str]:
    """{rule: env name} from the rules' `conda:` directives."""
    sys.path.insert(0, str(root / "envs"))
    import pin

    return {rule: env for env, rules in pin.env_rules(root / "workflow" / "rules").items() for rule in rules}


def run_check(root: Path, snakemake: list[str], env: dict[str, str], targets: list[str] = ()):
    """Run the check DAG in the workflow copy ``root`` with the stand-in conda. Returns one row per rule of the
    workflow (env, rule, jobs planned and finished, status: pass, FAIL, not run (an upstream job failed) or not
    planned, and for a failure the error its log ends with), the envs the stand-in created, Snakemake's output."""
    base = root / ".conda-standin"
    env = {**env, **install(base), "PATH": f"{base / 'bin'}{os.pathsep}{env['PATH']}"}
    cfg = check_config(root / "workflow/configs/tiny.yaml", root / "env-check.yaml")
    args = [*snakemake, "--sdm", "conda", "--configfile", str(cfg), "--cores", "2", "--keep-going", *targets]
    plan = subprocess.run([*args, "-n"], cwd=root, env=env, capture_output=True, text=True)
    planned = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", plan.stdout.split("Job stats:")[-1], re.M)}
    planned.pop("total", None)
    proc = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    done: dict[str, int] = {}
    for rule in re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", log):
        done[rule] = done.get(rule, 0) + 1
    errors: dict[str, str] = {}
    for block in re.split(r"(?=^Error in rule )", log, flags=re.M)[1:]:
        rule = re.match(r"Error in rule (\w+):", block).group(1)
        logfile = re.search(r"^\s+log: (\S+)", block, re.M)
        text = (root / logfile.group(1)).read_text() if logfile and (root / logfile.group(1)).exists() else block
        last = [ln for ln in text.splitlines() if re.match(r"^\w*(Error|Exception)\b", ln)]
        errors.setdefault(rule, last[-1] if last else text.strip().splitlines()[-1])
    rows = []
    for rule, name in sorted(rule_envs(root).items(), key=lambda kv: (kv[1], kv[0])):
        n, ok = planned.get(rule, 0), done.get(rule, 0)
        status = "pass" if n and ok == n else "FAIL" if rule in errors else "not run" if n else "not planned"
        rows.append(dict(env=name, rule=rule, planned=n, finished=ok, status=status, error=errors.get(rule, "")))
    made = base / "created.jsonl"
    created = [json.loads(x) for x in made.read_text().splitlines()] if made.exists() else []
    return rows, created, log


def table(rows: list[dict]) -> str:
    return "\n".join(f"env {r['env']:<9} rule {r['rule']:<20} {r['status']:<5} "
                     f"({r['finished']}/{r['planned']} jobs){'  ' + r['error'] if r['error'] else ''}" for r in rows)


if __name__ == "__main__" and sys.argv[1:2] == ["check"]:
    sys.path.insert(0, str(Path(__file__).parent))
    from workflow_support import BIN, copy_workflow

    keep = sys.argv[3] if sys.argv[2:3] == ["--keep"] else None
    root = Path(keep or tempfile.mkdtemp(prefix="dlzo-env-check-"))
    copy_workflow(root)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    rows, _, _ = run_check(root, [str(BIN / "snakemake"), "--workflow-profile", "none"], env)
    print(table(rows))
    sys.exit(0 if all(r["status"] == "pass" for r in rows) else 1)
elif __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
