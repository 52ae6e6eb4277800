"""What the workflow tests share: a copy of the workflow in a fresh git repository, `snakemake` run there, and
readers of its results (provenance, the job stats of a dry run)."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

BIN = Path(sys.executable).parent
COPY = ["Snakefile", "config.yaml", "workflow", "src", "envs", "profiles", "tests/fixtures"]
GIT = ["git", "-c", "user.name=dlzo-test", "-c", "user.email=test@dlzo.invalid"]


def snakemake(cwd, *args, check=True, profile="none", env=None):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           **(env or {})}
    proc = subprocess.run([str(BIN / "snakemake"), "--workflow-profile", profile, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1200)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def copy_workflow(root: Path) -> Path:
    """A copy of the workflow, committed to a fresh git repository so results record a commit."""
    for item in COPY:
        src, dst = REPO / item, root / item
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    if shutil.which("git"):
        for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "test copy"]):
            subprocess.run([*GIT, *cmd], cwd=root, check=True, capture_output=True)
    return root


def head_commit(root: Path) -> str | None:
    if not shutil.which("git"):
        return None
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()


def check_provenance(path: Path, commit: str | None, torch_stage: bool, **config) -> dict:
    """``path``'s provenance names the config that made it (``config`` items must match), packages, the
    git commit, device, dtype and wall time."""
    doc = json.loads(path.read_text())
    prov = doc["provenance"]
    assert isinstance(prov["config"], dict) and prov["config"], path
    for key, value in config.items():
        assert prov["config"][key] == value, (path, key, prov["config"][key], value)
    assert prov["packages"]["torch"] and prov["packages"]["pandas"], path
    if commit is not None:
        assert prov["git_commit"] == commit, (path, prov["git_commit"], commit)
    assert prov["device"] == "cpu", path
    assert prov["dtype"] == ("float32" if torch_stage else None), path
    assert isinstance(prov["wall_s"], float) and prov["wall_s"] >= 0, path
    assert "slurm_job_id" in prov and prov["time"] and prov["host"], path
    return prov


def planned_jobs(proc) -> dict[str, int]:
    """Job counts from the `Job stats` table of a dry run."""
    stats = proc.stdout.split("Job stats:")[-1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M) if m.group(1) != "total"}
