"""The per-rule conda envs pin exactly the versions `make` installs (requirements.txt)."""
import re

import yaml

from conftest import REPO


def pins(lines):
    out = {}
    for line in lines:
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)==([^\s#]+)", line)
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def test_every_env_package_is_pinned_to_the_tested_version():
    required = pins((REPO / "requirements.txt").read_text().splitlines())
    envs = sorted((REPO / "envs").glob("*.yaml"))
    assert envs
    used = set(re.findall(r'"\.\./\.\./envs/(\w+)\.yaml"', "".join(p.read_text() for p in (REPO / "workflow/rules").glob("*.smk"))))
    assert used == {p.stem for p in envs}, "every env file is used by a rule and every rule's env exists"
    for env in envs:
        spec = yaml.safe_load(env.read_text())
        deps = spec["dependencies"]
        conda = [d for d in deps if isinstance(d, str)]
        pip = next(d["pip"] for d in deps if isinstance(d, dict))
        assert all("==" in d for d in conda + pip), f"{env.name}: every package needs an exact == pin"
        for name, version in pins(pip).items():
            assert required.get(name) == version, f"{env.name}: {name}=={version} but requirements.txt has {required.get(name)}"
