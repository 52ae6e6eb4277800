"""Where every result lives: the one place that builds and parses result paths.

Torch-free (the workflow's ``common.smk``, ``select`` and ``tables`` use it). Paths are built from
templates under a results root; the same templates, filled with Snakemake wildcards (``"{model}"``),
are the rules' input and output patterns, and parsed back (``parse``) by the stages that read files
by path. A training run's folder is ``<method>`` or, for a grid point, ``<method>@lr<lr>[_eps<eps>]``
(``dlzo.methods.grid_tag``)::

    models/<model>/                                  download_model
    data/<model>/<task>/{train,dev,test}.jsonl, meta.json    prepare_data (meta: the model's token counts)
    probe/<model>/probe.json, activation_profile.png probe_outliers (+ sensitivity, gradnorm)
    train/<model>/<task>/<run>/seed<s>/log.json      zo_train (+ tuned.safetensors, trajectory.jsonl)
    train/<model>/<task>/<method>/hyper_selection.json   select_hyper
    eval/<model>/<task>/<method>/seed<s>.json        evaluate (a frozen-model baseline: <method>.json)
    benchmarks/<rule>/...                            Snakemake's benchmark files
    logs/<rule>/...                                  each job's log
    tables/                                          the tables stage
"""
from __future__ import annotations

import ast
import re
from pathlib import Path, PurePosixPath

from dlzo import DLZOError
from dlzo.methods import base_method

TEMPLATES = {
    "model": "models/{model}",
    "data": "data/{model}/{task}/{split}.jsonl",
    "data_meta": "data/{model}/{task}/meta.json",
    "probe": "probe/{model}/probe.json",
    "probe_png": "probe/{model}/activation_profile.png",
    "sensitivity": "probe/{model}/sensitivity.json",
    "sensitivity_png": "probe/{model}/sensitivity_profile.png",
    "gradnorm": "probe/{model}/gradnorm.json",
    "predictors_png": "probe/{model}/layer_predictors.png",
    "train_log": "train/{model}/{task}/{run}/seed{seed}/log.json",
    "tuned": "train/{model}/{task}/{run}/seed{seed}/tuned.safetensors",
    "trajectory": "train/{model}/{task}/{run}/seed{seed}/trajectory.jsonl",
    "selection": "train/{model}/{task}/{method}/hyper_selection.json",
    "eval": "eval/{model}/{task}/{method}/seed{seed}.json",
    "eval_frozen": "eval/{model}/{task}/{method}.json",
    "train_benchmark": "benchmarks/zo_train/{model}/{task}/{run}/seed{seed}.tsv",
    "benchmark": "benchmarks/{rule}/{job}.tsv",
    "log": "logs/{rule}/{job}.log",
    "tables": "tables/{name}",
}
_FIELD = re.compile(r"\{(\w+)\}")


def _regex(template: str) -> re.Pattern:
    """A template as a regex over the end of a path: each field one path component (seed: digits)."""
    out, pos = [], 0
    for m in _FIELD.finditer(template):
        out.append(re.escape(template[pos:m.start()]))
        out.append(rf"(?P<{m[1]}>\d+)" if m[1] == "seed" else rf"(?P<{m[1]}>[^/]+)")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile(r"(?:^|/)" + "".join(out) + "$")


_REGEX = {k: _regex(t) for k, t in TEMPLATES.items()}


class Layout:
    """Result paths under ``root``; any argument may be a Snakemake wildcard such as ``"{model}"``."""

    def __init__(self, root: str | Path = "results"):
        self.root = str(root)

    def path(self, kind: str, **fields) -> str:
        return f"{self.root}/" + TEMPLATES[kind].format(**{k: str(v) for k, v in fields.items()})

    def model(self, model) -> str:
        return self.path("model", model=model)

    def data(self, model, task, split) -> str:
        return self.path("data", model=model, task=task, split=split)

    def data_meta(self, model, task) -> str:
        return self.path("data_meta", model=model, task=task)

    def probe(self, model, what: str = "probe") -> str:
        """``what``: probe, probe_png, sensitivity, sensitivity_png, gradnorm or predictors_png."""
        return self.path(what, model=model)

    def train_log(self, model, task, run, seed) -> str:
        return self.path("train_log", model=model, task=task, run=run, seed=seed)

    def selection(self, model, task, method) -> str:
        return self.path("selection", model=model, task=task, method=method)

    def eval(self, model, task, method, seed=None) -> str:
        """A trained method's result per seed; a frozen-model baseline (seed None) has one file."""
        if seed is None:
            return self.path("eval_frozen", model=model, task=task, method=method)
        return self.path("eval", model=model, task=task, method=method, seed=seed)

    def train_benchmark(self, model, task, run, seed) -> str:
        return self.path("train_benchmark", model=model, task=task, run=run, seed=seed)

    def benchmark(self, rule, job=None) -> str:
        """Snakemake's benchmark file of a job (``job`` None: a rule with one job)."""
        return self.path("benchmark", rule=rule, job=job) if job is not None else f"{self.root}/benchmarks/{rule}.tsv"

    def log(self, rule, job=None) -> str:
        """A job's log (``job`` None: a rule with one job)."""
        return self.path("log", rule=rule, job=job) if job is not None else f"{self.root}/logs/{rule}.log"

    def tables(self, name="") -> str:
        return self.path("tables", name=name).rstrip("/")


def parse(kind: str, path: str | Path, what: str | None = None) -> dict:
    """The fields of a result path (``kind`` as in TEMPLATES); a train path's ``run`` also gives ``method``
    (its base method) and ``tag`` (its grid point, '' for none); ``seed`` is an int. A path that does not
    follow the layout is an error naming the file and the expected form."""
    m = _REGEX[kind].search(PurePosixPath(Path(path).as_posix()).as_posix())
    if not m:
        raise DLZOError(f"{what or kind} {path}: the path does not follow the results layout "
                        f"(expected .../{TEMPLATES[kind]})")
    fields = m.groupdict()
    if "seed" in fields:
        fields["seed"] = int(fields["seed"])
    if "run" in fields:
        fields["method"] = base_method(fields["run"])
        fields["tag"] = fields["run"][len(fields["method"]):]
    return fields


def parse_eval(path: str | Path) -> dict:
    """model, task, method and seed (None for a frozen-model baseline) of an evaluation result."""
    try:
        return parse("eval", path, "evaluation result")
    except DLZOError:
        pass
    try:
        return {**parse("eval_frozen", path, "evaluation result"), "seed": None}
    except DLZOError:
        raise DLZOError(f"evaluation result {path}: the path does not follow the results layout (expected "
                        f".../{TEMPLATES['eval']} or .../{TEMPLATES['eval_frozen']})") from None


def module_sources(module: str, src: str | Path | None = None) -> list[Path]:
    """The source files a stage runs: ``dlzo/<module>.py`` and every dlzo module it imports, at any depth, lazy
    imports inside functions included, plus the package's ``__init__.py`` (the workflow's code inputs)."""
    pkg = Path(src) / "dlzo" if src is not None else Path(__file__).resolve().parent
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        path = pkg / f"{name}.py"
        if name in seen or not path.exists():
            continue
        seen.add(name)
        todo += imported_modules(path)
    return [pkg / f"{m}.py" for m in sorted(seen | {"__init__"})]


def imported_modules(path: str | Path) -> list[str]:
    """The dlzo modules a source file imports anywhere in it ('from dlzo import x', 'from dlzo.x import y',
    'import dlzo.x')."""
    out = []
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "dlzo":  # `from dlzo import figures`; names that are no module are passed over
                out += [a.name for a in node.names]
            elif node.module.startswith("dlzo."):
                out.append(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out += [a.name.split(".")[1] for a in node.names if a.name.startswith("dlzo.")]
    return out
