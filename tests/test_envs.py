"""The per-rule conda envs: generated from envs/sources.yaml with every package pinned to requirements.txt's version
(envs/pin.py, `make envs`), used by the rules, closed under their packages' requirements, and each holding what
its rules import: the workflow run under Snakemake's real conda deployment with a stand-in `conda`
(tests/conda_standin.py) that builds each env with exactly its file's packages."""
import os
import re
import subprocess
import sys
from importlib import metadata as md

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import conda_standin
from conftest import REPO
from workflow_support import BIN, copy_workflow

sys.path.insert(0, str(REPO / "envs"))
import pin  # noqa: E402

ENVS = sorted(p for p in (REPO / "envs").glob("*.yaml") if p.name != "sources.yaml")


def pip_section(env_file):
    spec = yaml.safe_load(env_file.read_text())
    return next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict))


def pins(env_file):
    return {canonicalize_name(Requirement(p).name): str(next(iter(Requirement(p).specifier)).version)
            for p in pip_section(env_file) if not p.startswith("-")}


def test_regenerating_from_the_source_gives_the_committed_env_files():
    line = pin.committed_line()
    generated = pin.generate(line)
    assert sorted(generated) == [p.name for p in ENVS], "an env file without a source entry, or the reverse"
    for env in ENVS:
        assert env.read_text() == generated[env.name], f"envs/{env.name} is not what envs/sources.yaml generates: run `make envs CUDA={line}`"
    assert subprocess.run([sys.executable, str(REPO / "envs/pin.py"), "--check"]).returncode == 0


def test_the_login_node_gets_snakemake_and_its_slurm_plugin_alone():
    """requirements-head.txt: Snakemake, the SLURM plugin and the hub client, their closure pinned; no torch."""
    path, text = pin.head_requirements()
    assert path.read_text() == text, "requirements-head.txt is stale: run `make envs`"
    names = {canonicalize_name(Requirement(line).name) for line in text.splitlines() if not line.startswith("#")}
    assert {"snakemake", "snakemake-executor-plugin-slurm", "huggingface-hub"} <= names
    assert not names & {"torch", "transformers", "lm-eval", "peft"}  # (the SLURM plugin needs pandas)


def test_every_pin_is_the_requirements_txt_version_and_torch_names_its_cuda_line():
    required = {k: v for k, (_, v) in pin.requirements().items()}
    src = yaml.safe_load((REPO / "envs/sources.yaml").read_text())
    for env in ENVS:
        spec = yaml.safe_load(env.read_text())
        conda = [d for d in spec["dependencies"] if isinstance(d, str)]
        assert conda == [f"python=={src['python']}", f"pip=={src['pip']}"], env.name
        assert spec["channels"] == ["conda-forge", "nodefaults"], env.name
        gpu = src["envs"][env.stem].get("cuda", False)
        for name, version in pins(env).items():
            v = Version(version)
            if name == "torch" and gpu:
                line = pin.committed_line()
                assert v.local == line, f"{env.name}: torch=={version}, expected +{line}"
                assert f"--extra-index-url https://download.pytorch.org/whl/{line}" in pip_section(env), env.name
            else:
                assert v.local is None, f"{env.name}: {name}=={version} carries a local label"
            assert required.get(name) == str(v.public), f"{env.name}: {name}=={version} but requirements.txt has {required.get(name)}"
        assert ("torch" in pins(env)) == gpu, f"{env.name}: torch only in the GPU envs (`cuda: true`)"
    # the CPU-only envs have no torch at all; the tables env none of the GPU stack
    assert "torch" not in pins(REPO / "envs/tables.yaml") and "torch" not in pins(REPO / "envs/data.yaml")


def test_every_env_file_is_used_by_a_rule_and_every_rule_env_exists():
    used = pin.env_rules()
    assert set(used) == {p.stem for p in ENVS}
    smk = "".join(p.read_text() for p in (REPO / "workflow/rules").glob("*.smk"))
    rules = re.findall(r"^rule (\w+):", smk, re.M)
    assert sorted(r for rs in used.values() for r in rs) == sorted(rules), "a rule without a `conda:` env"


def test_each_env_is_closed_under_its_packages_requirements():
    """Every requirement (its marker true for the env's Python, extras as asked) of every pinned package is
    pinned too, at a version it accepts: pip would install nothing the file does not name."""
    for env in ENVS:
        have = pins(env)
        for name, version in have.items():
            for text in md.distribution(name).requires or []:
                req = Requirement(text)
                if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                    continue
                dep = canonicalize_name(req.name)
                assert dep in have, f"envs/{env.name}: {name}=={version} requires `{text}`, which the env lacks"
                assert req.specifier.contains(Version(have[dep]).public, prereleases=True), \
                    f"envs/{env.name}: {name} requires `{text}` but the env pins {dep}=={have[dep]}"


def test_pin_errors_name_the_env_the_package_and_what_was_expected(tmp_path, monkeypatch):
    src = yaml.safe_load((REPO / "envs/sources.yaml").read_text())
    src["envs"]["tables"]["packages"].append("pytest-of-nothing")
    bad = tmp_path / "sources.yaml"
    bad.write_text(yaml.safe_dump(src))
    with pytest.raises(pin.PinError, match=r"envs/tables.yaml: pytest-of-nothing .* is not installed"):
        pin.generate(sources=bad)
    reqs = pin.requirements()
    monkeypatch.setattr(pin, "requirements", lambda: {k: v for k, v in reqs.items() if k != "pandas"})
    with pytest.raises(pin.PinError, match=r"envs/data.yaml: pandas \(required by datasets\) has no pin in requirements.txt"):
        pin.generate()
    with pytest.raises(pin.PinError, match="CUDA line 'cu118'"):
        pin.cuda_line("cu118")
    assert pin.cuda_line("cu126") == ("12.6", "525.60.13")


def test_the_standin_env_holds_exactly_its_files_packages(tmp_path):
    n = conda_standin.link_env(REPO / "envs/tables.yaml", tmp_path / "tables")
    assert n > 1000
    py = str(tmp_path / "tables/bin/python")
    code = "import pandas, matplotlib, importlib.metadata as m; print(m.version('pandas'))"
    out = subprocess.run([py, "-c", code], capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert out.returncode == 0 and out.stdout.strip() == pins(REPO / "envs/tables.yaml")["pandas"], out.stderr
    for absent in ("torch", "transformers", "yaml", "dlzo"):  # not in the file, so not there
        proc = subprocess.run([py, "-c", f"import {absent}"], capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
        assert f"No module named '{absent}'" in proc.stderr, absent


def _run(tmp_path, targets=(), break_env=None):
    root = copy_workflow(tmp_path / "wf")
    if break_env:
        name, package = break_env
        f = root / "envs" / f"{name}.yaml"
        f.write_text("".join(line for line in f.read_text().splitlines(True)
                             if not re.match(rf"\s+- {package}==", line)))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    rows, created, log = conda_standin.run_check(root, [str(BIN / "snakemake"), "--workflow-profile", "none"], env, list(targets))
    print("\n" + conda_standin.table(rows))
    return rows, created, log


def test_a_rule_whose_env_lacks_a_module_it_imports_fails_and_is_named(tmp_path):
    """The models env without torch: download_model (which builds the tiny model with torch) fails in it, and
    the check names the env, the rule and the missing module."""
    rows, created, log = _run(tmp_path, ["--until", "download_model"], break_env=("models", "torch"))
    row = next(r for r in rows if r["rule"] == "download_model")
    assert (row["env"], row["status"]) == ("models", "FAIL"), log[-3000:]
    assert "No module named 'torch'" in row["error"], row
    assert "env models    rule download_model       FAIL" in conda_standin.table(rows)
    assert "torch==" not in (tmp_path / "wf/envs/models.yaml").read_text()  # Snakemake creates every env first


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DLZO_ENV_CHECK"), reason="the whole check DAG, ~1 min on 2 cores: make env-check (CI runs it after make test)")
def test_every_rule_runs_in_the_env_its_rule_names(tmp_path):
    """Each rule of the tiny DAG (every rule of the workflow, once or twice) runs in the env its rule names,
    built with exactly that env file's packages by Snakemake's own conda deployment."""
    rows, created, log = _run(tmp_path)
    assert len(created) == len(ENVS), created
    assert {r["rule"] for r in rows} == {r for rs in pin.env_rules().values() for r in rs}
    failed = [r for r in rows if r["status"] != "pass"]
    assert not failed, conda_standin.table(failed) + "\n" + log[-4000:]
