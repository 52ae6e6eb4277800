"""The code's shape: one method grammar (dlzo.methods), one path layout (dlzo.layout), stages that import
downward only, and a tables stage that runs without torch (envs/tables.yaml)."""
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import yaml

from conftest import REPO
from dlzo import DLZOError
from dlzo.layout import TEMPLATES, Layout, imported_modules, module_sources, parse, parse_eval
from dlzo.methods import (BEST_LAYER, base_method, grid_tag, hyper_block, is_grid_point, order_methods,
                          parse_method, resolve_layer, sweep_layer)

SRC = REPO / "src" / "dlzo"


def test_method_names():
    m = parse_method("layer-12")
    assert (m.kind, m.layer, m.family, m.is_sweep, m.is_single_layer, m.is_fo) == ("layer", 12, "layer", True, True, False)
    m = parse_method("layer-3-lora")
    assert (m.kind, m.layer, m.family, m.is_lora, m.is_sweep) == ("layer-lora", 3, "layer-lora", True, False)
    m = parse_method("dominant")
    assert (m.kind, m.layer, m.is_dominant, m.is_sweep, m.family) == ("layer", None, True, False, "layer")
    m = parse_method("dominant-lora")
    assert (m.kind, m.is_dominant, m.is_lora, m.family) == ("layer-lora", True, True, "layer-lora")
    assert (parse_method("fo-adamw").kind, parse_method("fo-adamw").is_fo, parse_method("fo-adamw").layer) == \
        ("fo-full", True, None)
    m = parse_method("fo-layer-7")
    assert (m.kind, m.layer, m.family, m.is_fo, m.is_single_layer, m.is_sweep) == ("fo-layer", 7, "fo", True, True, False)
    assert (parse_method("sparse-mezo").kind, parse_method("sparse-mezo").family) == ("sparse-mezo", "sparse")
    assert (parse_method("mezo-full").family, parse_method("lora-zo").family) == ("full", "lora")
    for bad in ("fo-layer", "fo-layer-1-lora", "sparse", "layer12", "zero-shot", "mezo-full@lr1e-05"):
        with pytest.raises(DLZOError, match="unknown method"):
            parse_method(bad)


def test_hyper_block_is_the_family_or_the_sweeps_own():
    hyper = {"layer": {}, "sweep": {}}
    assert hyper_block("layer-3", hyper) == "sweep" and hyper_block("dominant", hyper) == "layer"
    assert hyper_block("layer-3", {"layer": {}}) == "layer" and hyper_block("fo-layer-3", hyper) == "fo"


def test_grid_tags_and_run_paths_round_trip():
    tag = grid_tag(1e-5, 1e-3)
    assert tag == "@lr1e-05_eps0.001" and grid_tag(0.001, None) == "@lr0.001"
    L = Layout("res")
    path = L.train_log("m", "sst2", "dominant" + tag, 1)
    assert path == "res/train/m/sst2/dominant@lr1e-05_eps0.001/seed1/log.json"
    assert parse("train_log", path) == {"model": "m", "task": "sst2", "run": "dominant" + tag, "seed": 1,
                                        "method": "dominant", "tag": tag}
    assert parse("train_log", L.train_log("m", "sst2", "layer-3", 0))["tag"] == ""
    assert is_grid_point("dominant" + tag) and base_method("dominant" + tag) == "dominant"
    bench = L.train_benchmark("m", "copa", "fo-adamw@lr0.001", 2)
    assert bench == "res/benchmarks/zo_train/m/copa/fo-adamw@lr0.001/seed2.tsv"
    assert parse("train_benchmark", bench)["method"] == "fo-adamw"
    assert parse_eval(L.eval("m", "sst2", "mezo-full", 0)) == {"model": "m", "task": "sst2", "method": "mezo-full",
                                                               "seed": 0}
    assert parse_eval(L.eval("m", "sst2", "zero-shot"))["seed"] is None
    # the same templates are the rules' wildcard patterns
    assert L.train_log("{model}", "{task}", "{method}", "{seed}") == "res/train/{model}/{task}/{method}/seed{seed}/log.json"
    with pytest.raises(DLZOError, match=r"results layout \(expected .*eval/\{model\}"):
        parse_eval("res/somewhere/acc.json")
    assert set(TEMPLATES) >= {"train_log", "eval", "eval_frozen", "selection", "train_benchmark", "probe"}


def test_table_order():
    assert order_methods(["layer-10", "fo-layer-2", BEST_LAYER, "dominant", "layer-9", "zero-shot", "new-method"]) == \
        ["zero-shot", "dominant", BEST_LAYER, "fo-layer-2", "layer-9", "layer-10", "new-method"]
    assert sweep_layer("layer-10") == 10


def test_dominant_layer_is_resolved_once(tmp_path):
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"first_outlier_layer": 2, "num_layers": 4}))
    assert resolve_layer(parse_method("dominant"), probe, None, "m") == (2, "probe")
    assert resolve_layer(parse_method("dominant-lora"), probe, 0, "m") == (0, "pinned")
    assert resolve_layer(parse_method("layer-3"), None, None, "m") == (3, "method name")
    assert resolve_layer(parse_method("mezo-full"), None, None, "m") == (None, None)
    with pytest.raises(DLZOError, match="dominant_layer: m: layer index 4 is past the model's depth"):
        resolve_layer(parse_method("dominant"), probe, 4, "m")
    with pytest.raises(DLZOError, match="needs the probe's JSON"):
        resolve_layer(parse_method("dominant"), None, None, "m")


def _import_graph() -> dict[str, set[str]]:
    """Module -> the dlzo modules it imports anywhere in it (lazy imports inside functions included)."""
    mods = {p.stem for p in SRC.glob("*.py")} - {"__init__"}
    return {m: set(imported_modules(SRC / f"{m}.py")) & mods - {m} for m in mods}


def test_no_import_cycle_among_the_modules():
    graph = _import_graph()
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [m, dep]))
            if dep not in state:
                visit(dep, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    # the torch-free base that the workflow and the tables stage stand on imports no stage
    for base in ("methods", "layout", "io", "render", "tasks", "runtime"):
        assert not graph[base] - {"io", "methods", "layout", "render"}, (base, graph[base])


def test_code_inputs_follow_the_imports():
    """A rule's code input is every module its stage runs: an edit to load_tuned_model's module (models) or to the
    optimizer it replays (zo) reruns the evaluations."""
    names = lambda m: {p.stem for p in module_sources(m)}  # noqa: E731
    assert {"evaluate", "models", "zo", "select", "tasks"} <= names("evaluate")
    # the outlier probe runs no optimizer and no trainer: an edit to them reruns no probe (and nothing it feeds)
    assert not {"zo", "train", "objectives", "figures"} & names("probe")
    assert not {"train", "figures"} & names("profiles") and "zo" in names("profiles")
    assert "torch" not in " ".join(names("tables")) and {"tables", "figures", "layout", "methods", "render"} <= names("tables")
    assert not {"probe", "profiles", "train", "models", "objectives", "zo"} & names("tables")
    assert not {"probe", "profiles", "train", "models", "objectives", "zo"} & names("select")


def _env_modules(env_file) -> set[str]:
    """Top-level import names of an env file's pip packages and everything they require (installed metadata)."""
    spec = yaml.safe_load(env_file.read_text())
    pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict))
    todo = [re.split(r"[=<>!~ \[;]", p, maxsplit=1)[0] for p in pip]
    dists = set()
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in dists:
            continue
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        dists.add(name)
        todo += [re.split(r"[=<>!~ \[;(]", r, maxsplit=1)[0] for r in reqs if "extra ==" not in r]
    tops = {top for top, owners in md.packages_distributions().items()
            if any(o.lower().replace("_", "-") in dists for o in owners)}
    return tops


BLOCKER = """
import importlib.abc, sys
ALLOWED = set({allowed!r}) | {{"dlzo"}} | set(sys.stdlib_module_names) | set(sys.builtin_module_names)
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top not in ALLOWED and not top.startswith("_"):
            raise ModuleNotFoundError(f"No module named {{name!r}} (not in envs/tables.yaml)", name=name)
        return None
sys.meta_path.insert(0, Block())
"""


@pytest.mark.parametrize("stage", ["tables", "select"])
def test_torch_free_stages_run_with_only_the_tables_env(tmp_path, stage):
    """The tables and select_hyper rules run in envs/tables.yaml (pandas, matplotlib, numpy; no torch): simulated by a
    Python that refuses every module outside that env's packages. The tables stage draws every figure, the
    three-predictor one included (it once imported dlzo.probe, hence torch, and crashed under --sdm conda)."""
    from test_tables import make_results, put

    allowed = _env_modules(REPO / "envs" / "tables.yaml")
    assert {"pandas", "matplotlib", "numpy"} <= allowed and "torch" not in allowed
    r = tmp_path / "results"
    if stage == "tables":
        evals, logs, benches, probes = make_results(r)
        layers = range(8)
        put(r / "probe/m/probe.json", {"first_outlier_layer": 3, "num_layers": 8, "thresholds": {"abs": 100},
                                       "layers": [{"index": i, "max_abs": 10.0 * (i + 1), "median_abs": 1.0}
                                                  for i in layers]})
        sens = put(r / "probe/m/sensitivity.json", {"layers": [{"index": i, "g": {"rms": 8.0 - i, "n": 4}}
                                                               for i in layers]})
        grad = put(r / "probe/m/gradnorm.json", {"batches": 2, "largest_gradient_layer": 3,
                                                 "layers": [{"index": i, "rms_norm": 1.0 + i} for i in layers]})
        argv = ["--evals", *evals, "--train-logs", *logs, "--probes", *probes, "--benchmarks", *benches,
                "--sensitivity", sens, "--gradnorm", grad, "--out", str(tmp_path / "tables")]
        call = "from dlzo.tables import main"
    else:
        logs = [put(r / f"train/m/sst2/dominant@lr{lr:g}_eps0.001/seed0/log.json",
                    {"model": "m", "task": "sst2", "best_dev_loss": loss, "best_step": 3,
                     "hyper": {"lr": lr, "eps": 1e-3}}) for lr, loss in ((1e-3, 0.5), (1e-2, 0.4))]
        argv = ["--logs", *logs, "--out", str(tmp_path / "hyper_selection.json")]
        call = "from dlzo.select import main"
    code = BLOCKER.format(allowed=sorted(allowed)) + textwrap.dedent(f"""
        {call}
        code = main({argv!r})
        assert "torch" not in sys.modules, "torch was imported"
        sys.exit(code)
    """)
    proc = subprocess.run([os.path.abspath(sys.executable), "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin", "MPLBACKEND": "Agg"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    if stage == "tables":
        assert (tmp_path / "tables" / "layer_predictors_m.png").read_bytes()[:4] == b"\x89PNG"
    else:
        assert json.loads((tmp_path / "hyper_selection.json").read_text())["chosen"]["lr"] == 1e-2
